//! `nixl-etcd`: inspect and wait for the NIXL agent metadata that engines
//! publish in etcd. Reads the same environment variables and options as the
//! library. Run `nixl-etcd --help` for the commands and exit statuses.

mod args;
mod etcd;
mod fail;
mod fmt;
mod get;
mod health;
mod http;
mod list;
mod serve;
mod wait;
mod watch;

use std::io::Write;

use args::Command;
use fail::{CliError, EXIT_FAILURE, EXIT_OK};
use nixl_etcd::Config;

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let code = match args::parse(argv).and_then(|args| {
        // Before any other thread exists, so that every later thread
        // inherits the mask and `watch` takes SIGINT/SIGTERM on its own.
        let signals = matches!(args.command, Command::Watch { .. } | Command::Serve(_))
            .then(watch::block_signals);
        nixl_etcd::logging::init();
        run(args, signals)
    }) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("nixl-etcd: {}", e.message.replace('\n', " "));
            e.code
        }
    };
    let _ = std::io::stdout().flush();
    std::process::exit(code);
}

fn print(bytes: &[u8]) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)
        .and_then(|_| out.flush())
        .map_err(|e| CliError::io("cannot write to stdout", e))
}

fn run(args: args::Args, signals: Option<libc::sigset_t>) -> Result<i32, CliError> {
    match args.command {
        Command::Help => {
            print(args::usage().as_bytes())?;
            return Ok(EXIT_OK);
        }
        Command::Version => {
            print(format!("nixl-etcd {}\n", env!("CARGO_PKG_VERSION")).as_bytes())?;
            return Ok(EXIT_OK);
        }
        _ => {}
    }
    let cfg = Config::load(args.options.as_deref())?;
    let json = args.json;
    match args.command {
        Command::List { engine, nixl } => {
            let out = if nixl {
                list::run_nixl(&cfg, json)?
            } else {
                list::run(&cfg, engine.as_deref(), json)?
            };
            print(out.as_bytes())?;
        }
        Command::Get { engine, rank, raw } => {
            let out = get::run(&cfg, &engine, rank, raw.as_deref(), json)?;
            eprint!("{}", out.stderr);
            print(&out.stdout)?;
        }
        Command::Watch { engine } => {
            let signals = signals.ok_or_else(|| {
                CliError::new(EXIT_FAILURE, "signals were not blocked before watching")
            })?;
            watch::run(&cfg, engine.as_deref(), json, signals)?;
        }
        Command::Wait {
            engine,
            what,
            timeout,
        } => {
            let out = wait::run(&cfg, &engine, &what, timeout, json)?;
            print(out.as_bytes())?;
        }
        Command::Health => {
            let (out, code) = health::run(&cfg, json)?;
            print(out.as_bytes())?;
            return Ok(code);
        }
        Command::Serve(serve_args) => {
            let signals = signals.ok_or_else(|| {
                CliError::new(EXIT_FAILURE, "signals were not blocked before serving")
            })?;
            serve::run(&cfg, &serve_args, signals)?;
        }
        Command::Help | Command::Version => unreachable!("handled above"),
    }
    Ok(EXIT_OK)
}
