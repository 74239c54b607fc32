//! `get ENGINE RANK [--raw FILE]`: one record, read through the library (so
//! the metadata is checked as every reader checks it), with its lease.

use std::io::Write;

use base64::Engine as _;
use nixl_etcd::{keys, Client, Config};
use serde_json::json;

use crate::etcd::{self, Etcd};
use crate::fail::CliError;
use crate::fmt;

pub struct Output {
    /// What goes to stdout.
    pub stdout: Vec<u8>,
    /// What goes to stderr (the readable record when the metadata itself
    /// goes to stdout).
    pub stderr: String,
}

pub fn run(
    cfg: &Config,
    engine: &str,
    rank: u32,
    raw: Option<&str>,
    as_json: bool,
) -> Result<Output, CliError> {
    keys::validate_engine_id(engine)?;
    let client = Client::open(cfg.clone())?;
    let found = client.lookup(engine, rank);
    let _ = client.close();
    let found = found?;
    let key = keys::rank_key(&cfg.namespace, engine, rank);
    let rt = etcd::runtime()?;
    // The lease: the record's key, read again (it may be gone meanwhile).
    let (lease_id, ttl) = rt.block_on(async {
        let etcd = Etcd::connect(cfg).await?;
        let lease_id = etcd.get(&key).await?.map(|kv| kv.lease()).unwrap_or(0);
        let ttls = etcd.lease_ttls([lease_id]).await?;
        Ok::<_, CliError>((lease_id, ttls.get(&lease_id).copied().flatten()))
    })?;
    let rec = &found.record;
    let md = &found.metadata;
    let now = fmt::now_ms();
    let age = now.saturating_sub(rec.registered_at_ms) / 1000;
    let mut out = Output {
        stdout: Vec::new(),
        stderr: String::new(),
    };
    match raw {
        Some("-") => out.stdout.extend_from_slice(md),
        Some(path) => std::fs::File::create(path)
            .and_then(|mut f| f.write_all(md).and_then(|_| f.sync_all()))
            .map_err(|e| CliError::io(&format!("cannot write the metadata to {path}"), e))?,
        None => {}
    }
    let text = if as_json {
        let mut v = json!({
            "engine_id": rec.engine_id,
            "rank": rec.rank,
            "key": key,
            "host": rec.host,
            "pid": rec.pid,
            "incarnation": rec.incarnation,
            "registered_at_ms": rec.registered_at_ms,
            "age_s": age,
            "world_size": rec.world_size,
            "lease_id": lease_id,
            "lease_ttl_s": ttl,
            "revision": found.revision,
            "metadata_len": md.len(),
        });
        if raw.is_none() {
            v["metadata_base64"] = base64::engine::general_purpose::STANDARD
                .encode(md.as_slice())
                .into();
        } else {
            v["metadata_file"] = raw.into();
        }
        v.to_string() + "\n"
    } else {
        let lease = match (lease_id, ttl) {
            (0, _) => "none".to_owned(),
            (id, Some(s)) => format!("{id:x} ({} left)", fmt::duration_s(s)),
            (id, None) => format!("{id:x} (expired)"),
        };
        let mut t = String::new();
        let mut line = |k: &str, v: String| t.push_str(&format!("{k:<13}{v}\n"));
        line("engine:", rec.engine_id.clone());
        line("rank:", rec.rank.to_string());
        line("key:", key.clone());
        line("host:", rec.host.clone());
        line("pid:", rec.pid.to_string());
        line("incarnation:", rec.incarnation.clone());
        line(
            "registered:",
            format!(
                "{} ({} ago)",
                fmt::utc(rec.registered_at_ms),
                fmt::duration_s(age as i64)
            ),
        );
        line(
            "world size:",
            rec.world_size
                .map(|n| n.to_string())
                .unwrap_or_else(|| "not declared".into()),
        );
        line("lease:", lease);
        line("revision:", found.revision.to_string());
        line(
            "metadata:",
            format!("{} bytes: {}", md.len(), fmt::hex_preview(md, 32)),
        );
        if let Some(p) = raw.filter(|p| *p != "-") {
            line("written to:", p.to_owned());
        }
        t
    };
    if raw == Some("-") {
        out.stderr = text;
    } else {
        out.stdout = text.into_bytes();
    }
    Ok(out)
}
