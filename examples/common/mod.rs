//! What the two-process NIXL examples (`kv_transfer`, `gpu_kv`) share: the
//! record their KV layout goes under, and the run of one role.

use std::process::ExitCode;

use nixl_etcd::{Client, Config};

/// The engine id under which a prefill publishes its KV layout, beside its
/// agent metadata under `engine`.
pub fn layout_engine(engine: &str) -> String {
    format!("{engine}.kv")
}

/// Opens a client from the environment, runs `prefill` or `decode` (by
/// `role`) on it, closes it; exit status 1 with the error on failure, 2 for
/// a bad command line (`parsed` failed).
pub fn run_role<A>(
    program: &str,
    parsed: Result<A, String>,
    role: impl Fn(&A) -> &str,
    prefill: impl FnOnce(&A, &Client) -> Result<(), String>,
    decode: impl FnOnce(&A, &Client) -> Result<(), String>,
) -> ExitCode {
    let args = match parsed {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{program}: {e}");
            return ExitCode::from(2);
        }
    };
    let result = Config::load(None)
        .and_then(Client::open)
        .map_err(|e| e.to_string())
        .and_then(|client| {
            let r = if role(&args) == "prefill" {
                prefill(&args, &client)
            } else {
                decode(&args, &client)
            };
            let _ = client.close();
            r
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{program} {}: {e}", role(&args));
            ExitCode::FAILURE
        }
    }
}
