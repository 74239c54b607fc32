//! Command-line parsing: global options anywhere on the line, then one
//! command with its own arguments.

use std::time::Duration;

use nixl_etcd::nixl_store::{StoreOptions, OPTIONS};

use crate::fail::{CliError, EXIT_USAGE};

pub const USAGE: &str = "\
usage: nixl-etcd [OPTIONS] COMMAND [ARGS]

Inspect the NIXL agent metadata that engines publish in etcd.

Commands:
  list [ENGINE]                 engines and ranks: host, incarnation, age, lease
                                time left, metadata size, world size, complete
  list --nixl                   agents in NIXL's own key layout (marks keys
                                without a lease, which outlive a crash)
  get ENGINE RANK [--raw FILE]  one record; --raw writes the metadata to FILE
                                byte for byte ('-' for stdout)
  watch [ENGINE]                live ADDED/UPDATED/REPLACED/REMOVED events, one
                                line each, until SIGINT or SIGTERM
  wait ENGINE [--rank N | --all] [--timeout S]
                                block until rank N (or every rank of the
                                engine's world size, the default) is registered
  health                        every endpoint: reachable, leader, version,
                                round-trip time, and whether a linearizable
                                read through it succeeds (a quorum)
  serve [--listen HOST:PORT] [--metrics HOST:PORT] [STORE OPTIONS]
                                the metadata store behind stock NIXL's
                                NIXL_TCPSTORE_ENDPOINT, with etcd behind it
                                (default 127.0.0.1:29479); prints one ready
                                line, stops on SIGINT or SIGTERM; --metrics
                                serves /metrics (OpenMetrics), /healthz and
                                /readyz (etcd answers a read) over HTTP

Options (anywhere on the line; the environment applies as for the library:
VLLM_NIXL_ETCD_ENDPOINTS, VLLM_NIXL_ETCD_NAMESPACE, VLLM_NIXL_ETCD_TIMEOUT,
NIXL_ETCD_NAMESPACE, ...):
  --endpoints URLS      comma-separated etcd endpoints (option \"endpoints\")
  --namespace NS        namespace of the rank records (option \"namespace\")
  --nixl-namespace NS   namespace of NIXL's layout (option \"nixl_namespace\")
  --options JSON        a JSON object of the library's options
  --json                machine-readable output (one JSON document, or one
                        JSON object per line for watch)
  -h, --help            this text
  -V, --version         the version

Exit status:
  0  success (wait: found; health: every endpoint healthy)
  1  any other failure (an unreadable record, an I/O error)
  2  bad command line, option or environment value
  3  not found (get)
  4  timed out (wait, or an etcd call past VLLM_NIXL_ETCD_TIMEOUT)
  5  etcd unreachable
  6  health: some endpoints unreachable, or without a leader or quorum
";

/// What to wait for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitFor {
    Rank(u32),
    All,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    List {
        engine: Option<String>,
        nixl: bool,
    },
    Get {
        engine: String,
        rank: u32,
        raw: Option<String>,
    },
    Watch {
        engine: Option<String>,
    },
    Wait {
        engine: String,
        what: WaitFor,
        timeout: Option<Duration>,
    },
    Health,
    Serve(ServeArgs),
    Help,
    Version,
}

/// `serve`'s arguments.
#[derive(Debug, Clone, PartialEq)]
pub struct ServeArgs {
    pub listen: String,
    /// `--metrics HOST:PORT`: `/metrics`, `/healthz` and `/readyz` over HTTP.
    pub metrics: Option<String>,
    pub store: StoreOptions,
}

/// The usage text, with the store's options from their one table.
pub fn usage() -> String {
    let mut out = USAGE.to_owned();
    out.push_str("\nStore options (serve; the same keys in the in-process store's JSON):\n");
    for o in OPTIONS {
        let flag = format!("  --{} {}", o.flag(), o.value);
        out.push_str(&format!("{flag:<32}{}\n", o.doc));
    }
    out
}

/// The `--flag` of a store option, if `flag` is one: its option name.
fn store_option(flag: &str) -> Option<&'static str> {
    let name = flag.strip_prefix("--")?;
    OPTIONS.iter().find(|o| o.flag() == name).map(|o| o.name)
}

#[derive(Debug, Clone, PartialEq)]
pub struct Args {
    pub json: bool,
    /// The library's options as one JSON object (`--options` merged with
    /// the flags that override single keys), or `None` for the environment
    /// alone.
    pub options: Option<String>,
    pub command: Command,
}

fn usage_err(msg: impl Into<String>) -> CliError {
    CliError::new(
        EXIT_USAGE,
        format!("{}; run nixl-etcd --help for usage", msg.into()),
    )
}

/// Splits `--name=value` and takes the value of `--name value`.
struct Words {
    items: Vec<String>,
    pos: usize,
}

impl Words {
    fn next(&mut self) -> Option<String> {
        let w = self.items.get(self.pos).cloned();
        self.pos += 1;
        w
    }
    fn value(&mut self, flag: &str, inline: Option<String>) -> Result<String, CliError> {
        match inline {
            Some(v) => Ok(v),
            None => self
                .next()
                .ok_or_else(|| usage_err(format!("{flag} needs a value"))),
        }
    }
}

pub fn parse(argv: Vec<String>) -> Result<Args, CliError> {
    let mut words = Words {
        items: argv,
        pos: 0,
    };
    let mut json = false;
    let mut base_options: Option<serde_json::Map<String, serde_json::Value>> = None;
    let mut overrides = serde_json::Map::new();
    let mut positional: Vec<String> = Vec::new();
    let mut nixl = false;
    let mut all = false;
    let mut rank: Option<u32> = None;
    let mut raw: Option<String> = None;
    let mut timeout: Option<Duration> = None;
    let mut help = false;
    let mut version = false;
    let mut only_positional = false;
    let mut listen: Option<String> = None;
    let mut metrics: Option<String> = None;
    let mut store = StoreOptions::default();
    let mut store_flags: Vec<String> = Vec::new();
    while let Some(word) = words.next() {
        if only_positional || !word.starts_with('-') || word == "-" {
            positional.push(word);
            continue;
        }
        if word == "--" {
            only_positional = true;
            continue;
        }
        let (flag, inline) = match word.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (word.clone(), None),
        };
        match flag.as_str() {
            "-h" | "--help" => help = true,
            "-V" | "--version" => version = true,
            "--json" => json = true,
            "--nixl" => nixl = true,
            "--all" => all = true,
            "--endpoints" => {
                let v = words.value(&flag, inline)?;
                overrides.insert("endpoints".into(), v.into());
            }
            "--namespace" => {
                let v = words.value(&flag, inline)?;
                overrides.insert("namespace".into(), v.into());
            }
            "--nixl-namespace" => {
                let v = words.value(&flag, inline)?;
                overrides.insert("nixl_namespace".into(), v.into());
            }
            "--options" => {
                let v = words.value(&flag, inline)?;
                match serde_json::from_str::<serde_json::Value>(&v) {
                    Ok(serde_json::Value::Object(m)) => base_options = Some(m),
                    Ok(_) => {
                        return Err(usage_err(
                            "--options must be a JSON object such as \
                             {\"endpoints\":\"http://host:2379\"}",
                        ))
                    }
                    Err(e) => return Err(usage_err(format!("--options is not valid JSON: {e}"))),
                }
            }
            "--rank" => {
                let v = words.value(&flag, inline)?;
                rank = Some(parse_rank(&v)?);
            }
            "--raw" => raw = Some(words.value(&flag, inline)?),
            "--listen" => listen = Some(words.value(&flag, inline)?),
            "--metrics" => metrics = Some(words.value(&flag, inline)?),
            "--timeout" => {
                let v = words.value(&flag, inline)?;
                timeout = Some(parse_seconds(&v)?);
            }
            _ => match store_option(&flag) {
                Some(name) => {
                    let v = words.value(&flag, inline)?;
                    store.set(name, &v).map_err(|e| usage_err(e.message))?;
                    store_flags.push(flag);
                }
                None => return Err(usage_err(format!("unknown option {flag}"))),
            },
        }
    }
    let options = if base_options.is_none() && overrides.is_empty() {
        None
    } else {
        let mut m = base_options.unwrap_or_default();
        m.extend(overrides);
        Some(serde_json::Value::Object(m).to_string())
    };
    let done = |command| {
        Ok(Args {
            json,
            options: options.clone(),
            command,
        })
    };
    if help {
        return done(Command::Help);
    }
    if version {
        return done(Command::Version);
    }
    let mut pos = positional.into_iter();
    let Some(name) = pos.next() else {
        return Err(usage_err("no command given"));
    };
    let rest: Vec<String> = pos.collect();
    let refuse = |what: &str, allowed: bool| {
        if allowed {
            Ok(())
        } else {
            Err(usage_err(format!("{what} does not apply to {name}")))
        }
    };
    refuse("--nixl", !nixl || name == "list")?;
    refuse("--all", !all || name == "wait")?;
    refuse("--rank", rank.is_none() || name == "wait")?;
    refuse("--timeout", timeout.is_none() || name == "wait")?;
    refuse("--raw", raw.is_none() || name == "get")?;
    refuse("--listen", listen.is_none() || name == "serve")?;
    refuse("--metrics", metrics.is_none() || name == "serve")?;
    for f in &store_flags {
        refuse(f, name == "serve")?;
    }
    let max_args = |n: usize| {
        if rest.len() > n {
            Err(usage_err(format!(
                "{name} takes at most {n} argument(s), got {:?}",
                rest
            )))
        } else {
            Ok(())
        }
    };
    let command = match name.as_str() {
        "list" => {
            max_args(1)?;
            if nixl && !rest.is_empty() {
                return Err(usage_err("list --nixl takes no ENGINE"));
            }
            Command::List {
                engine: rest.first().cloned(),
                nixl,
            }
        }
        "get" => {
            if rest.len() != 2 {
                return Err(usage_err("get needs ENGINE and RANK"));
            }
            Command::Get {
                engine: rest[0].clone(),
                rank: parse_rank(&rest[1])?,
                raw,
            }
        }
        "watch" => {
            max_args(1)?;
            Command::Watch {
                engine: rest.first().cloned(),
            }
        }
        "wait" => {
            if rest.len() != 1 {
                return Err(usage_err("wait needs ENGINE"));
            }
            if all && rank.is_some() {
                return Err(usage_err("give --rank N or --all, not both"));
            }
            Command::Wait {
                engine: rest[0].clone(),
                what: rank.map(WaitFor::Rank).unwrap_or(WaitFor::All),
                timeout,
            }
        }
        "health" => {
            max_args(0)?;
            Command::Health
        }
        "serve" => {
            max_args(0)?;
            Command::Serve(ServeArgs {
                listen: listen.unwrap_or_else(|| {
                    format!("127.0.0.1:{}", nixl_etcd::nixl_store::DEFAULT_PORT)
                }),
                metrics: metrics.clone(),
                store: store.clone(),
            })
        }
        "help" => Command::Help,
        other => return Err(usage_err(format!("unknown command {other:?}"))),
    };
    done(command)
}

fn parse_rank(v: &str) -> Result<u32, CliError> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(usage_err(format!(
            "rank {v:?} is not a rank; give a whole number from 0"
        )));
    }
    v.parse::<u32>()
        .map_err(|_| usage_err(format!("rank {v} is out of range")))
}

fn parse_seconds(v: &str) -> Result<Duration, CliError> {
    match v.trim().parse::<f64>() {
        Ok(s) if (0.0..=86_400.0).contains(&s) => Ok(Duration::from_secs_f64(s)),
        _ => Err(usage_err(format!(
            "--timeout {v:?} is not a timeout; give a number of seconds from 0 to 86400"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(line: &str) -> Result<Args, CliError> {
        parse(line.split_whitespace().map(str::to_owned).collect())
    }

    #[test]
    fn commands_and_global_options_anywhere() {
        let a = p("list --json e1 --endpoints=http://h:1").unwrap();
        assert!(a.json);
        assert_eq!(
            a.command,
            Command::List {
                engine: Some("e1".into()),
                nixl: false
            }
        );
        let o: serde_json::Value = serde_json::from_str(a.options.as_deref().unwrap()).unwrap();
        assert_eq!(o["endpoints"], "http://h:1");
        let a = p("wait e --rank 3 --timeout 1.5").unwrap();
        assert_eq!(
            a.command,
            Command::Wait {
                engine: "e".into(),
                what: WaitFor::Rank(3),
                timeout: Some(Duration::from_millis(1500))
            }
        );
        assert_eq!(p("get e 2").unwrap().options, None);
    }

    #[test]
    fn serve_takes_its_listen_address_and_tunables() {
        assert_eq!(
            p("serve").unwrap().command,
            Command::Serve(ServeArgs {
                listen: "127.0.0.1:29479".into(),
                metrics: None,
                store: StoreOptions::default(),
            })
        );
        let store = StoreOptions {
            check_wait: Duration::ZERO,
            remote_grace: Duration::from_millis(2500),
            max_connections: 64,
            liveness: nixl_etcd::nixl_store::Liveness::Connection,
            ..StoreOptions::default()
        };
        assert_eq!(
            p(
                "serve --listen 0.0.0.0:7000 --check-wait-ms 0 --remote-grace 2.5 \
               --max-connections=64 --liveness connection"
            )
            .unwrap()
            .command,
            Command::Serve(ServeArgs {
                listen: "0.0.0.0:7000".into(),
                metrics: None,
                store,
            })
        );
    }

    #[test]
    fn flags_override_options_key_by_key() {
        let a = parse(vec![
            "--options".into(),
            r#"{"endpoints":"http://a:1","timeout_s":2}"#.into(),
            "--endpoints".into(),
            "http://b:2".into(),
            "health".into(),
        ])
        .unwrap();
        let o: serde_json::Value = serde_json::from_str(a.options.as_deref().unwrap()).unwrap();
        assert_eq!(o["endpoints"], "http://b:2");
        assert_eq!(o["timeout_s"], 2);
    }

    #[test]
    fn bad_lines_are_usage_errors() {
        for bad in [
            "",
            "frobnicate",
            "get e",
            "get e x",
            "get e -1",
            "wait",
            "wait e --rank 1 --all",
            "list --raw f",
            "list --nixl e",
            "health extra",
            "wait e --timeout -2",
            "list --bogus",
            "list --endpoints",
            "serve extra",
            "list --listen 127.0.0.1:1",
            "serve --check-wait-ms 9999",
            "serve --check-wait-ms x",
            "serve --remote-grace -1",
            "serve --max-connections 0",
            "serve --liveness pid",
            "serve --keepalive-idle 0",
            "list --max-writers 5",
        ] {
            let e = p(bad).unwrap_err();
            assert_eq!(e.code, EXIT_USAGE, "{bad:?}");
            assert!(e.message.contains("--help"), "{}", e.message);
        }
    }
}
