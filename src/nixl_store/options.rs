//! How the store behaves: one table of options, read by `nixl-etcd serve`'s
//! flags (`--max-connections 64`) and by the in-process store's JSON options
//! (`{"max_connections": 64}`), with the same parsers and the same checks.

use std::time::Duration;

use crate::error::{Error, Result};

/// The port `nixl-etcd serve` listens on by default (PyTorch's TCPStore
/// default is 29500; this one is apart from it).
pub const DEFAULT_PORT: u16 = 29479;

/// Default of [`StoreOptions::check_wait`], in milliseconds.
pub const DEFAULT_CHECK_WAIT_MS: u64 = 1000;

/// How the store decides that a writer is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// A process on this host that the store can see in `/proc` and watch
    /// with a pidfd keeps its keys until it exits; any other writer is
    /// followed by its connections.
    Auto,
    /// Every writer is followed by its connections (keep-alive, then the
    /// grace period), as when pidfd is unavailable or processes are hidden.
    Connection,
}

/// The store's options; [`StoreOptions::default`] is what `nixl-etcd serve`
/// uses without flags.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreOptions {
    /// Longest a CHECK waits for an absent key before answering NOT_READY
    /// (NIXL re-asks 100 ms later). Zero: answer at once.
    pub check_wait: Duration,
    /// How long a writer followed by its connections keeps its keys after
    /// its last connection closed (a reconnect within it keeps them).
    pub remote_grace: Duration,
    /// Once a query started, how long its rest may take to arrive.
    pub stall: Duration,
    pub liveness: Liveness,
    /// TCP keep-alive on every connection: first probe after this much
    /// silence, then one every `keepalive_interval`, `keepalive_count`
    /// unanswered probes declare the peer dead (`TCP_USER_TIMEOUT` is the
    /// same total, for data that is never acknowledged).
    pub keepalive_idle: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_count: u32,
    /// Longest a SET or DELETE_KEY waits for etcd's acknowledgement before
    /// the connection goes on; the write stays queued and is sent when etcd
    /// answers (the store's copy serves it meanwhile).
    pub write_wait: Duration,
    pub max_connections: usize,
    pub max_writers: usize,
    /// Longest value accepted; `None`: what one etcd request holds
    /// (`max_request_bytes`).
    pub max_value_bytes: Option<usize>,
    pub max_key_bytes: usize,
    pub max_check_keys: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            check_wait: Duration::from_millis(DEFAULT_CHECK_WAIT_MS),
            remote_grace: Duration::from_secs(10),
            stall: Duration::from_secs(5),
            liveness: Liveness::Auto,
            keepalive_idle: Duration::from_secs(5),
            keepalive_interval: Duration::from_secs(2),
            keepalive_count: 3,
            write_wait: Duration::from_millis(1000),
            max_connections: 4096,
            max_writers: 4096,
            max_value_bytes: None,
            max_key_bytes: 4096,
            max_check_keys: 1024,
        }
    }
}

impl StoreOptions {
    /// How long a silent peer takes to be declared dead by TCP.
    pub fn keepalive_detection(&self) -> Duration {
        self.keepalive_idle + self.keepalive_interval * self.keepalive_count
    }

    /// The longest a writer followed by its connections keeps its keys
    /// after its host died: detection, then the grace period.
    pub fn dead_host_bound(&self) -> Duration {
        self.keepalive_detection() + self.remote_grace
    }

    /// Sets option `name` (a key of [`OPTIONS`]) from its text form.
    pub fn set(&mut self, name: &str, value: &str) -> Result<()> {
        let opt = OPTIONS.iter().find(|o| o.name == name).ok_or_else(|| {
            let known: Vec<&str> = OPTIONS.iter().map(|o| o.name).collect();
            Error::invalid(format!(
                "unknown NIXL store option {name:?}; known: {}",
                known.join(", ")
            ))
        })?;
        (opt.apply)(self, value.trim()).map_err(|why| {
            Error::invalid(format!(
                "invalid NIXL store option {name} (--{}) = {value:?}: {why}",
                opt.flag()
            ))
        })
    }

    /// The defaults with the keys of a JSON object applied (`null` or ""
    /// means the defaults).
    pub fn from_json(json: &str) -> Result<StoreOptions> {
        let mut opts = StoreOptions::default();
        if json.trim().is_empty() {
            return Ok(opts);
        }
        let v: serde_json::Value = serde_json::from_str(json)
            .map_err(|e| Error::invalid(format!("NIXL store options are not JSON: {e}")))?;
        let obj = match v {
            serde_json::Value::Null => return Ok(opts),
            serde_json::Value::Object(o) => o,
            _ => return Err(Error::invalid("NIXL store options must be a JSON object")),
        };
        for (k, v) in obj {
            let text = match v {
                serde_json::Value::String(s) => s,
                serde_json::Value::Number(n) => n.to_string(),
                other => {
                    return Err(Error::invalid(format!(
                        "NIXL store option {k} must be a number or a string, not {other}"
                    )))
                }
            };
            opts.set(&k, &text)?;
        }
        Ok(opts)
    }
}

/// One option: its name (JSON key; the flag is `--` and the name with `-`),
/// what its value is, and what it does.
pub struct Opt {
    pub name: &'static str,
    pub value: &'static str,
    pub doc: &'static str,
    apply: fn(&mut StoreOptions, &str) -> std::result::Result<(), String>,
}

impl Opt {
    /// The command-line flag, without the leading `--`.
    pub fn flag(&self) -> String {
        self.name.replace('_', "-")
    }
}

fn count(v: &str) -> std::result::Result<usize, String> {
    match v.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err("expected a whole number above 0".into()),
    }
}

fn seconds(v: &str) -> std::result::Result<Duration, String> {
    match v.parse::<f64>() {
        Ok(s) if s.is_finite() && (0.0..=86_400.0).contains(&s) => Ok(Duration::from_secs_f64(s)),
        _ => Err("expected seconds, from 0 to 86400".into()),
    }
}

fn positive_seconds(v: &str) -> std::result::Result<Duration, String> {
    match seconds(v)? {
        d if d >= Duration::from_secs(1) => Ok(d),
        _ => Err("expected at least 1 second (TCP counts keep-alive in whole seconds)".into()),
    }
}

fn millis(v: &str) -> std::result::Result<Duration, String> {
    match v.parse::<u64>() {
        Ok(ms) if ms <= 86_400_000 => Ok(Duration::from_millis(ms)),
        _ => Err("expected milliseconds, a whole number from 0 to 86400000".into()),
    }
}

/// Every option, once: the flags of `serve`, the JSON keys of the in-process
/// store, `nixl-etcd --help` and docs/nixl-store.md are checked against it.
pub const OPTIONS: &[Opt] = &[
    Opt {
        name: "check_wait_ms",
        value: "MS",
        doc: "longest a CHECK of an absent key waits for it (default 1000; 0: answer at once)",
        apply: |o, v| {
            o.check_wait = millis(v)?;
            if o.check_wait > Duration::from_secs(4) {
                return Err("expected at most 4000 ms (below NIXL's 5 s operation timeout)".into());
            }
            Ok(())
        },
    },
    Opt {
        name: "remote_grace",
        value: "S",
        doc: "seconds a writer followed by its connections keeps its keys after its last \
              connection closed (default 10)",
        apply: |o, v| {
            o.remote_grace = seconds(v)?;
            Ok(())
        },
    },
    Opt {
        name: "liveness",
        value: "auto|connection",
        doc: "auto: processes on this host by pidfd, other writers by connection; connection: \
              every writer by connection (default auto)",
        apply: |o, v| {
            o.liveness = match v {
                "auto" => Liveness::Auto,
                "connection" => Liveness::Connection,
                _ => return Err("expected auto or connection".into()),
            };
            Ok(())
        },
    },
    Opt {
        name: "keepalive_idle",
        value: "S",
        doc: "seconds of silence before TCP's first keep-alive probe (default 5)",
        apply: |o, v| {
            o.keepalive_idle = positive_seconds(v)?;
            Ok(())
        },
    },
    Opt {
        name: "keepalive_interval",
        value: "S",
        doc: "seconds between keep-alive probes (default 2)",
        apply: |o, v| {
            o.keepalive_interval = positive_seconds(v)?;
            Ok(())
        },
    },
    Opt {
        name: "keepalive_count",
        value: "N",
        doc: "unanswered probes that declare a peer dead (default 3)",
        apply: |o, v| {
            o.keepalive_count = u32::try_from(count(v)?).map_err(|e| e.to_string())?;
            Ok(())
        },
    },
    Opt {
        name: "write_wait_ms",
        value: "MS",
        doc: "longest a SET waits for etcd before the connection goes on; the write stays \
              queued until etcd answers (default 1000)",
        apply: |o, v| {
            o.write_wait = millis(v)?;
            Ok(())
        },
    },
    Opt {
        name: "max_connections",
        value: "N",
        doc: "connections open at once; more are closed at accept (default 4096)",
        apply: |o, v| {
            o.max_connections = count(v)?;
            Ok(())
        },
    },
    Opt {
        name: "max_writers",
        value: "N",
        doc: "writers (processes with keys) at once; a new one's first write is refused \
              (default 4096)",
        apply: |o, v| {
            o.max_writers = count(v)?;
            Ok(())
        },
    },
    Opt {
        name: "max_value_bytes",
        value: "N",
        doc: "longest SET value, refused before it is read (default: what one etcd request \
              holds, max_request_bytes)",
        apply: |o, v| {
            o.max_value_bytes = Some(count(v)?);
            Ok(())
        },
    },
    Opt {
        name: "max_key_bytes",
        value: "N",
        doc: "longest key (default 4096)",
        apply: |o, v| {
            o.max_key_bytes = count(v)?;
            Ok(())
        },
    },
    Opt {
        name: "max_check_keys",
        value: "N",
        doc: "most keys in one CHECK (default 1024)",
        apply: |o, v| {
            o.max_check_keys = count(v)?;
            Ok(())
        },
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_and_json_share_one_parser() {
        let mut by_flag = StoreOptions::default();
        by_flag.set("max_connections", "64").unwrap();
        by_flag.set("liveness", "connection").unwrap();
        by_flag.set("remote_grace", "2.5").unwrap();
        let by_json = StoreOptions::from_json(
            r#"{"max_connections": 64, "liveness": "connection", "remote_grace": 2.5}"#,
        )
        .unwrap();
        assert_eq!(by_flag, by_json);
        assert_eq!(by_json.remote_grace, Duration::from_millis(2500));
        assert_eq!(by_json.liveness, Liveness::Connection);
    }

    #[test]
    fn bad_values_name_the_option_and_the_flag() {
        let e = StoreOptions::from_json(r#"{"max_connections": 0}"#).unwrap_err();
        assert!(
            e.message
                .contains("max_connections (--max-connections) = \"0\""),
            "{}",
            e.message
        );
        let e = StoreOptions::from_json(r#"{"max_conections": 5}"#).unwrap_err();
        assert!(
            e.message.contains("unknown NIXL store option"),
            "{}",
            e.message
        );
        assert!(StoreOptions::from_json(r#"{"keepalive_idle": 0.5}"#).is_err());
        assert!(StoreOptions::from_json(r#"{"liveness": "pid"}"#).is_err());
        assert!(StoreOptions::from_json("[1]").is_err());
        assert_eq!(
            StoreOptions::from_json("").unwrap(),
            StoreOptions::default()
        );
    }

    #[test]
    fn the_default_dead_host_bound_is_at_most_30_s() {
        let o = StoreOptions::default();
        assert_eq!(o.keepalive_detection(), Duration::from_secs(11));
        assert_eq!(o.dead_host_bound(), Duration::from_secs(21));
    }
}
