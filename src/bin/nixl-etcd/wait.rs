//! `wait ENGINE [--rank N | --all] [--timeout S]`: for scripts.

use std::time::Duration;

use nixl_etcd::{keys, Client, Config};
use serde_json::json;

use crate::args::WaitFor;
use crate::fail::CliError;

pub fn run(
    cfg: &Config,
    engine: &str,
    what: &WaitFor,
    timeout: Option<Duration>,
    as_json: bool,
) -> Result<String, CliError> {
    keys::validate_engine_id(engine)?;
    let mut cfg = cfg.clone();
    let limit = timeout.unwrap_or(cfg.timeout);
    // The wait's budget also bounds connecting, so that a script's
    // `--timeout` holds even when etcd does not answer at all.
    if !limit.is_zero() && limit < cfg.timeout {
        cfg.timeout = limit;
    }
    let client = Client::open(cfg)?;
    // 0 means one look: the smallest wait the library accepts.
    let limit = limit.max(Duration::from_millis(1));
    let result = match what {
        WaitFor::Rank(rank) => client.wait(engine, *rank, Some(limit)).map(|found| {
            let r = &found.record;
            if as_json {
                json!({"engine_id": engine, "rank": rank, "found": true, "host": r.host,
                       "incarnation": r.incarnation, "metadata_len": found.metadata.len()})
                .to_string()
                    + "\n"
            } else {
                format!(
                    "engine {engine} rank {rank} is registered (host {}, incarnation {}, {} \
                     bytes of metadata)\n",
                    r.host,
                    r.incarnation,
                    found.metadata.len()
                )
            }
        }),
        WaitFor::All => client.wait_engine(engine, Some(limit)).map(|n| {
            if as_json {
                json!({"engine_id": engine, "world_size": n, "complete": true}).to_string() + "\n"
            } else {
                format!("engine {engine} is complete: all {n} ranks are registered\n")
            }
        }),
    };
    let _ = client.close();
    Ok(result?)
}
