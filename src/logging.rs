//! Logging through `log`, with the guide's levels. A host process that already
//! installed a logger keeps it.

use std::io::Write;
use std::sync::Once;

use log::LevelFilter;

pub const ENV_LOGGING_LEVEL: &str = "VLLM_LOGGING_LEVEL";

/// `VLLM_LOGGING_LEVEL` names (DEBUG, INFO, WARNING, ERROR) to a filter.
pub fn level_from_vllm(value: &str) -> Option<LevelFilter> {
    match value.trim().to_ascii_uppercase().as_str() {
        "TRACE" => Some(LevelFilter::Trace),
        "DEBUG" => Some(LevelFilter::Debug),
        "INFO" => Some(LevelFilter::Info),
        "WARNING" | "WARN" => Some(LevelFilter::Warn),
        "ERROR" | "CRITICAL" => Some(LevelFilter::Error),
        _ => None,
    }
}

fn level_name(level: log::Level) -> &'static str {
    match level {
        log::Level::Error => "ERROR",
        log::Level::Warn => "WARNING",
        log::Level::Info => "INFO",
        log::Level::Debug => "DEBUG",
        log::Level::Trace => "TRACE",
    }
}

/// Installs a stderr logger once per process, unless the host has one.
/// Level: `VLLM_LOGGING_LEVEL`, else `RUST_LOG`, else INFO for this crate.
pub fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let mut builder = env_logger::Builder::new();
        let vllm = std::env::var(ENV_LOGGING_LEVEL).ok();
        match (
            vllm.as_deref().and_then(level_from_vllm),
            std::env::var("RUST_LOG"),
        ) {
            (Some(level), _) => {
                builder.filter_module("nixl_etcd", level);
            }
            (None, Ok(spec)) if !spec.trim().is_empty() => {
                builder.parse_filters(&spec);
            }
            _ => {
                builder.filter_module("nixl_etcd", LevelFilter::Info);
            }
        }
        builder.format(|buf, record| {
            writeln!(buf, "{}: {}", level_name(record.level()), record.args())
        });
        // Fails only when the host installed a logger first: ours then stays out.
        let _ = builder.try_init();
        if let Some(v) = vllm.filter(|v| level_from_vllm(v).is_none()) {
            log::warn!(
                "{ENV_LOGGING_LEVEL}={v} is not a level; use DEBUG, INFO, WARNING or ERROR \
                 (using INFO)"
            );
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vllm_levels_map() {
        assert_eq!(level_from_vllm("DEBUG"), Some(LevelFilter::Debug));
        assert_eq!(level_from_vllm("info"), Some(LevelFilter::Info));
        assert_eq!(level_from_vllm("WARNING"), Some(LevelFilter::Warn));
        assert_eq!(level_from_vllm("ERROR"), Some(LevelFilter::Error));
        assert_eq!(level_from_vllm("loud"), None);
    }
}
