//! `watch [ENGINE]`: every change as one line, until SIGINT or SIGTERM.

use std::io::Write;
use std::sync::mpsc;

use nixl_etcd::{keys, Client, Config, Event, EventKind, Status};
use serde_json::json;

use crate::fail::{CliError, EXIT_FAILURE};
use crate::fmt;

enum Msg {
    Line(String),
    Signal(i32),
}

pub fn kind_name(kind: EventKind) -> &'static str {
    match kind {
        EventKind::Added => "ADDED",
        EventKind::Updated => "UPDATED",
        EventKind::Replaced => "REPLACED",
        EventKind::Removed => "REMOVED",
    }
}

fn line(ev: &Event, as_json: bool) -> String {
    let now = fmt::now_ms();
    if as_json {
        return json!({
            "time_ms": now,
            "event": kind_name(ev.kind),
            "engine_id": ev.engine_id,
            "rank": ev.rank,
            "host": ev.host,
            "incarnation": ev.incarnation,
            "metadata_len": ev.metadata.len(),
            "revision": ev.revision,
        })
        .to_string();
    }
    let mut s = format!(
        "{} {:<8} {} rank={} host={} incarnation={}",
        fmt::utc(now),
        kind_name(ev.kind),
        ev.engine_id,
        ev.rank,
        ev.host,
        ev.incarnation
    );
    if ev.kind != EventKind::Removed {
        s.push_str(&format!(" metadata={}", ev.metadata.len()));
    }
    s.push_str(&format!(" revision={}", ev.revision));
    s
}

/// Blocks SIGINT and SIGTERM in the calling thread, so that every thread
/// started afterwards inherits the mask and only [`signal_thread`] takes
/// them. Call before any other thread starts.
pub fn block_signals() -> libc::sigset_t {
    // SAFETY: plain libc calls on a local, initialized signal set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn signal_thread(set: libc::sigset_t, tx: mpsc::Sender<Msg>) {
    std::thread::Builder::new()
        .name("nixl-etcd-signals".into())
        .spawn(move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` is an initialized signal set; `sig` is writable.
            let rc = unsafe { libc::sigwait(&set, &mut sig) };
            if rc == 0 {
                let _ = tx.send(Msg::Signal(sig));
                return;
            }
        })
        .expect("start the signal thread");
}

pub fn run(
    cfg: &Config,
    engine: Option<&str>,
    as_json: bool,
    signals: libc::sigset_t,
) -> Result<(), CliError> {
    if let Some(e) = engine {
        keys::validate_engine_id(e)?;
    }
    let (tx, rx) = mpsc::channel::<Msg>();
    signal_thread(signals, tx.clone());
    let client = Client::open(cfg.clone())?;
    let events = tx.clone();
    let sub = client.subscribe(
        engine,
        Box::new(move |ev: &Event| {
            let _ = events.send(Msg::Line(line(ev, as_json)));
        }),
    )?;
    // Once the subscription's informer has listed, every later change is
    // delivered: a lookup waits for that list.
    let probe = engine.unwrap_or("nixl-etcd-watch");
    match client.lookup(probe, u32::MAX) {
        Ok(_) => {}
        Err(e) if e.status == Status::ErrNotFound => {}
        Err(e) => {
            let _ = client.close();
            return Err(e.into());
        }
    }
    let what = match engine {
        Some(e) => format!("engine {e} under {}/", cfg.namespace),
        None => format!("{}/", cfg.namespace),
    };
    eprintln!("nixl-etcd: watching {what} (SIGINT or SIGTERM stops)");
    let stdout = std::io::stdout();
    let mut result = Ok(());
    for msg in rx {
        match msg {
            Msg::Line(l) => {
                let mut out = stdout.lock();
                if writeln!(out, "{l}").and_then(|_| out.flush()).is_err() {
                    // The reader went away (a closed pipe): stop quietly.
                    break;
                }
            }
            Msg::Signal(sig) => {
                let name = if sig == libc::SIGINT {
                    "SIGINT"
                } else {
                    "SIGTERM"
                };
                eprintln!("nixl-etcd: {name}: stopped watching");
                break;
            }
        }
    }
    let _ = client.unsubscribe(sub);
    if let Err(e) = client.close() {
        result = Err(CliError::new(EXIT_FAILURE, e.message));
    }
    result
}
