//! A host process that installed its own logger keeps it: opening a client
//! neither fails nor replaces it, and our lines reach the host's logger.

mod capi;
mod common;

use std::sync::Mutex;

use common::{unique_namespace, EtcdServer};

static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct HostLogger;
impl log::Log for HostLogger {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, record: &log::Record) {
        LINES.lock().unwrap().push(format!("{}", record.args()));
    }
    fn flush(&self) {}
}

#[test]
fn a_host_logger_is_kept() {
    log::set_logger(&HostLogger).unwrap();
    log::set_max_level(log::LevelFilter::Info);
    let etcd = EtcdServer::start();
    let c = capi::open(&etcd.options_json(&unique_namespace("logger"), "")).unwrap();
    c.register("prefill_engine", 0, b"x").unwrap();
    c.close().unwrap();
    let lines = LINES.lock().unwrap();
    assert!(
        lines.iter().any(|l| l == "Registered NIXL agent with ETCD"),
        "{lines:?}"
    );
    assert!(lines
        .iter()
        .any(|l| l == "Initialized NIXL ETCD coordinator: engine_id=prefill_engine"));
}
