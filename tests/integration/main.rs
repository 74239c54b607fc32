//! The integration tests that can share a process, in one test binary, so
//! the harness (`tests/common`, `tests/capi`) and the library are compiled and
//! linked once instead of once per file. Each file is a module; a test's
//! name is `FILE::NAME` (`cargo test --release --all-features --test
//! integration c_api::` runs one file's tests). Every test starts its own
//! etcd and uses its own key namespace, so the tests of all files run side by
//! side.
//!
//! Test files that need a process of their own stay beside this folder, one
//! binary each (`tests/FILE.rs`):
//!
//! * `fork.rs`: forks and checks the child through the fork handler;
//! * `env_config.rs`: sets the `VLLM_NIXL_*` environment variables;
//! * `host_logger.rs`, `security.rs`: install the process's `log` logger and
//!   read every line the library logs;
//! * `faults.rs`: measures time with its tests alone on the machine, sets
//!   `VLLM_LOGGING_LEVEL` for the whole process, reruns itself under valgrind;
//! * `stress.rs`: forks under 64 threads at the library's default log level
//!   and measures the process's open fds and RSS;
//! * `nixl_interop.rs`: bounds invalidation delays of UCX agents measured
//!   with its tests alone.
//!
//! A new test file goes here (`mod NAME;` below, `use crate::common;` in the
//! file) unless it changes something process-wide like those.

#[path = "../capi/mod.rs"]
mod capi;
#[path = "../common/mod.rs"]
mod common;

mod c_api;
mod c_examples;
mod c_examples_tp;
mod cli;
mod concurrency;
mod fuzz_decoders;
mod harness;
mod hostile_input;
mod informer;
mod install;
mod large_metadata;
mod lease;
mod nixl_e2e;
mod nixl_native;
mod nixl_store;
mod prewarm;
mod proxy;
mod recheck;
mod shared_cache;
mod signed_records;
mod single_source;
