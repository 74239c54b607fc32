//! `serve [--listen HOST:PORT] [store options]`: the metadata store behind stock NIXL's
//! `NIXL_TCPSTORE_ENDPOINT`, with etcd behind it, until SIGINT or SIGTERM;
//! with `--metrics HOST:PORT`, its HTTP endpoints ([`crate::http`]).

use std::io::Write;

use nixl_etcd::nixl_store::NixlStore;
use nixl_etcd::{Client, Config};

use crate::args::ServeArgs;
use crate::fail::{CliError, EXIT_FAILURE};

pub fn run(cfg: &Config, args: &ServeArgs, signals: libc::sigset_t) -> Result<(), CliError> {
    let client = Client::open(cfg.clone())?;
    let store = match NixlStore::start(&client, &args.listen, args.store.clone()) {
        Ok(s) => s,
        Err(e) => {
            let _ = client.close();
            return Err(e.into());
        }
    };
    let addr = store.local_addr();
    let metrics = match &args.metrics {
        Some(at) => match crate::http::start(at, client.clone()) {
            Ok(bound) => format!(", metrics http://{bound}/metrics"),
            Err(e) => {
                let _ = store.stop();
                let _ = client.close();
                return Err(e);
            }
        },
        None => String::new(),
    };
    {
        // The ready line: scripts wait for it and take the endpoint from it.
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "nixl-etcd serve: ready, NIXL_TCPSTORE_ENDPOINT={addr} (etcd {}, NIXL namespace {:?}, \
             pid {}){metrics}",
            cfg.endpoints.join(","),
            cfg.nixl_namespace,
            std::process::id()
        )
        .and_then(|_| out.flush())
        .map_err(|e| CliError::io("cannot write to stdout", e))?;
    }
    let sig = wait_signal(&signals);
    log::info!("nixl-etcd serve: signal {sig}, stopping: revoking every writer's lease");
    let stopped = store.stop();
    let closed = client.close();
    stopped.and(closed).map_err(|e| {
        CliError::new(
            EXIT_FAILURE,
            format!("stopped, but some leases were not revoked ({e}); they expire by their TTL"),
        )
    })?;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "nixl-etcd serve: stopped (signal {sig}); every lease revoked"
    );
    let _ = out.flush();
    Ok(())
}

fn wait_signal(set: &libc::sigset_t) -> i32 {
    loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: `set` is an initialized signal set; `sig` is writable.
        if unsafe { libc::sigwait(set, &mut sig) } == 0 {
            return sig;
        }
    }
}
