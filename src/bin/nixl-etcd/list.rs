//! `list` and `list --nixl`: what is registered, read straight from etcd
//! with each key's lease.

use std::collections::{BTreeMap, BTreeSet};

use etcd_client::KeyValue;
use nixl_etcd::{keys, Config};
use serde_json::{json, Value};

use crate::etcd::{self, Etcd};
use crate::fail::CliError;
use crate::fmt;

/// One rank record, read leniently: fields it does not know are ignored, so
/// records of newer writers (with more fields) still list.
#[derive(Debug, Clone)]
pub struct RankRow {
    pub engine: String,
    pub rank: u32,
    pub key: String,
    pub host: String,
    pub pid: Option<u64>,
    pub incarnation: String,
    pub registered_at_ms: Option<u64>,
    pub world_size: Option<u32>,
    pub metadata_len: Option<u64>,
    pub lease_id: i64,
    /// Seconds left; `None` when the lease is gone (or there is none).
    pub lease_ttl_s: Option<i64>,
    pub revision: i64,
    /// Why the record cannot be read, when it cannot.
    pub error: Option<String>,
}

pub fn parse_rank_row(namespace: &str, kv: &KeyValue) -> Option<RankRow> {
    let key = std::str::from_utf8(kv.key()).ok()?;
    let (engine, rank) = keys::parse_rank_key(namespace, key)?;
    let mut row = RankRow {
        engine: engine.to_owned(),
        rank,
        key: key.to_owned(),
        host: String::new(),
        pid: None,
        incarnation: String::new(),
        registered_at_ms: None,
        world_size: None,
        metadata_len: None,
        lease_id: kv.lease(),
        lease_ttl_s: None,
        revision: kv.mod_revision(),
        error: None,
    };
    let v: Value = match serde_json::from_slice(kv.value()) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => {
            row.error = Some("not a JSON object".into());
            return Some(row);
        }
        Err(e) => {
            row.error = Some(format!("not JSON: {e}"));
            return Some(row);
        }
    };
    let text = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
    row.host = text("host");
    row.incarnation = text("incarnation");
    row.pid = v.get("pid").and_then(Value::as_u64);
    row.registered_at_ms = v.get("registered_at_ms").and_then(Value::as_u64);
    row.world_size = v
        .get("world_size")
        .and_then(Value::as_u64)
        .and_then(|n| u32::try_from(n).ok());
    row.metadata_len = v.get("metadata_len").and_then(Value::as_u64);
    let named_engine = v.get("engine_id").and_then(Value::as_str);
    let named_rank = v.get("rank").and_then(Value::as_u64);
    if v.get("format").and_then(Value::as_u64).is_none() {
        row.error = Some("no format version".into());
    } else if named_engine != Some(engine) || named_rank != Some(u64::from(rank)) {
        row.error = Some(format!(
            "it names engine {:?} rank {:?}",
            named_engine.unwrap_or(""),
            named_rank
        ));
    }
    Some(row)
}

/// One engine: its ranks, and whether all of its world is there.
#[derive(Debug, Clone)]
pub struct EngineRows {
    pub engine: String,
    pub ranks: Vec<RankRow>,
    pub world_size: Option<u32>,
    /// Ranks below the world size with no readable record.
    pub missing: Vec<u32>,
}

impl EngineRows {
    pub fn complete(&self) -> Option<bool> {
        self.world_size.map(|_| self.missing.is_empty())
    }
}

pub fn group(rows: Vec<RankRow>) -> Vec<EngineRows> {
    let mut by_engine: BTreeMap<String, Vec<RankRow>> = BTreeMap::new();
    for r in rows {
        by_engine.entry(r.engine.clone()).or_default().push(r);
    }
    by_engine
        .into_iter()
        .map(|(engine, mut ranks)| {
            ranks.sort_by_key(|r| r.rank);
            // As the library decides: rank 0's, else the largest declared.
            let world_size = ranks
                .iter()
                .find(|r| r.rank == 0 && r.error.is_none())
                .and_then(|r| r.world_size)
                .or_else(|| ranks.iter().filter_map(|r| r.world_size).max());
            let present: BTreeSet<u32> = ranks
                .iter()
                .filter(|r| r.error.is_none())
                .map(|r| r.rank)
                .collect();
            let missing = match world_size {
                Some(n) => (0..n).filter(|r| !present.contains(r)).collect(),
                None => Vec::new(),
            };
            EngineRows {
                engine,
                ranks,
                world_size,
                missing,
            }
        })
        .collect()
}

pub fn run(cfg: &Config, engine: Option<&str>, as_json: bool) -> Result<String, CliError> {
    if let Some(e) = engine {
        keys::validate_engine_id(e)?;
    }
    let prefix = match engine {
        Some(e) => keys::engine_prefix(&cfg.namespace, e),
        None => format!("{}/", cfg.namespace),
    };
    let rt = etcd::runtime()?;
    let mut rows = rt.block_on(async {
        let etcd = Etcd::connect(cfg).await?;
        let mut rows: Vec<RankRow> = etcd
            .list(&prefix)
            .await?
            .iter()
            .filter_map(|kv| parse_rank_row(&cfg.namespace, kv))
            .collect();
        let ttls = etcd.lease_ttls(rows.iter().map(|r| r.lease_id)).await?;
        for r in rows.iter_mut() {
            r.lease_ttl_s = ttls.get(&r.lease_id).copied().flatten();
        }
        Ok::<_, CliError>(rows)
    })?;
    rows.retain(|r| engine.is_none_or(|e| e == r.engine));
    let engines = group(rows);
    let now = fmt::now_ms();
    if as_json {
        return Ok(engines_json(&cfg.namespace, &engines, now).to_string() + "\n");
    }
    Ok(engines_text(&cfg.namespace, engine, &engines, now))
}

fn age_s(row: &RankRow, now_ms: u64) -> Option<i64> {
    row.registered_at_ms
        .map(|t| (now_ms.saturating_sub(t) / 1000) as i64)
}

fn lease_text(lease_id: i64, ttl: Option<i64>) -> String {
    match (lease_id, ttl) {
        (0, _) => "none".into(),
        (_, Some(s)) => fmt::duration_s(s),
        (_, None) => "expired".into(),
    }
}

fn engines_text(ns: &str, engine: Option<&str>, engines: &[EngineRows], now: u64) -> String {
    if engines.is_empty() {
        return match engine {
            Some(e) => format!("engine {e} has no ranks registered under {ns}/\n"),
            None => format!("no engines registered under {ns}/\n"),
        };
    }
    let mut rows = Vec::new();
    for e in engines {
        let complete = match e.complete() {
            Some(true) => "yes".to_owned(),
            Some(false) => format!(
                "no (missing {})",
                e.missing
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            None => "unknown".to_owned(),
        };
        for r in &e.ranks {
            if let Some(err) = &r.error {
                rows.push(vec![
                    e.engine.clone(),
                    r.rank.to_string(),
                    format!("unreadable: {err}"),
                ]);
                continue;
            }
            rows.push(vec![
                e.engine.clone(),
                r.rank.to_string(),
                r.host.clone(),
                r.pid.map(|p| p.to_string()).unwrap_or_default(),
                r.incarnation.clone(),
                age_s(r, now).map(fmt::duration_s).unwrap_or("-".into()),
                lease_text(r.lease_id, r.lease_ttl_s),
                r.metadata_len.map(fmt::size).unwrap_or("-".into()),
                e.world_size
                    .map(|n| n.to_string())
                    .unwrap_or_else(|| "-".into()),
                complete.clone(),
            ]);
        }
    }
    let ranks: usize = engines.iter().map(|e| e.ranks.len()).sum();
    let mut out = fmt::table(
        &[
            "ENGINE",
            "RANK",
            "HOST",
            "PID",
            "INCARNATION",
            "AGE",
            "LEASE LEFT",
            "METADATA",
            "WORLD",
            "COMPLETE",
        ],
        &rows,
    );
    out.push_str(&format!(
        "{} engine{}, {ranks} rank{} under {ns}/\n",
        engines.len(),
        if engines.len() == 1 { "" } else { "s" },
        if ranks == 1 { "" } else { "s" },
    ));
    out
}

fn engines_json(ns: &str, engines: &[EngineRows], now: u64) -> Value {
    let engines: Vec<Value> = engines
        .iter()
        .map(|e| {
            let ranks: Vec<Value> = e
                .ranks
                .iter()
                .map(|r| {
                    json!({
                        "rank": r.rank,
                        "key": r.key,
                        "host": r.host,
                        "pid": r.pid,
                        "incarnation": r.incarnation,
                        "registered_at_ms": r.registered_at_ms,
                        "age_s": age_s(r, now),
                        "lease_id": r.lease_id,
                        "lease_ttl_s": r.lease_ttl_s,
                        "metadata_len": r.metadata_len,
                        "world_size": r.world_size,
                        "revision": r.revision,
                        "error": r.error,
                    })
                })
                .collect();
            json!({
                "engine_id": e.engine,
                "world_size": e.world_size,
                "complete": e.complete(),
                "missing_ranks": e.missing,
                "ranks": ranks,
            })
        })
        .collect();
    json!({ "namespace": ns, "engines": engines })
}

/// One agent in NIXL's layout.
#[derive(Debug, Default)]
struct Agent {
    marker: bool,
    /// label -> (size, lease id)
    labels: BTreeMap<String, (usize, i64)>,
    /// Lease ids of every key of the agent (0: none).
    leases: BTreeSet<i64>,
}

pub fn run_nixl(cfg: &Config, as_json: bool) -> Result<String, CliError> {
    let ns = cfg.nixl_namespace.clone();
    let rt = etcd::runtime()?;
    let (agents, ttls) = rt.block_on(async {
        let etcd = Etcd::connect(cfg).await?;
        let mut agents: BTreeMap<String, Agent> = BTreeMap::new();
        for kv in etcd.list(&ns).await? {
            let Ok(key) = std::str::from_utf8(kv.key()) else {
                continue;
            };
            // ns + "/" + agent + "/" + label (label empty: the marker).
            let Some(rest) = key
                .strip_prefix(ns.as_str())
                .and_then(|r| r.strip_prefix('/'))
            else {
                continue;
            };
            let Some((agent, label)) = rest.split_once('/') else {
                continue;
            };
            if agent.is_empty() {
                continue;
            }
            let a = agents.entry(agent.to_owned()).or_default();
            a.leases.insert(kv.lease());
            if label.is_empty() {
                a.marker = true;
            } else {
                a.labels
                    .insert(label.to_owned(), (kv.value().len(), kv.lease()));
            }
        }
        let ids: Vec<i64> = agents.values().flat_map(|a| a.leases.clone()).collect();
        let ttls = etcd.lease_ttls(ids).await?;
        Ok::<_, CliError>((agents, ttls))
    })?;
    let ttl_of = |id: i64| ttls.get(&id).copied().flatten();
    if as_json {
        let list: Vec<Value> = agents
            .iter()
            .map(|(name, a)| {
                let labels: Vec<Value> = a
                    .labels
                    .iter()
                    .map(|(l, (size, lease))| {
                        json!({"label": l, "size": size, "lease_id": lease,
                               "lease_ttl_s": ttl_of(*lease)})
                    })
                    .collect();
                json!({
                    "agent": name,
                    "marker": a.marker,
                    "labels": labels,
                    "no_lease": a.leases.contains(&0),
                    "lease_ids": a.leases,
                })
            })
            .collect();
        return Ok(json!({"nixl_namespace": ns, "agents": list}).to_string() + "\n");
    }
    if agents.is_empty() {
        return Ok(format!("no NIXL agents under {ns:?}\n"));
    }
    let rows: Vec<Vec<String>> = agents
        .iter()
        .map(|(name, a)| {
            let labels = a
                .labels
                .iter()
                .map(|(l, (size, _))| format!("{l} ({})", fmt::size(*size as u64)))
                .collect::<Vec<_>>()
                .join(", ");
            let lease = a
                .leases
                .iter()
                .map(|&id| lease_text(id, ttl_of(id)))
                .collect::<Vec<_>>()
                .join(",");
            let note = if a.leases.contains(&0) {
                "NO LEASE: stays in etcd after a crash"
            } else if !a.marker {
                "no marker: peers do not see it"
            } else {
                ""
            };
            vec![
                name.clone(),
                if a.marker { "yes" } else { "no" }.into(),
                if labels.is_empty() {
                    "-".into()
                } else {
                    labels
                },
                lease,
                note.into(),
            ]
        })
        .collect();
    let mut out = fmt::table(&["AGENT", "MARKER", "LABELS", "LEASE LEFT", "NOTE"], &rows);
    let stale = agents.values().filter(|a| a.leases.contains(&0)).count();
    out.push_str(&format!(
        "{} agent{} under {ns:?}, {stale} without a lease\n",
        agents.len(),
        if agents.len() == 1 { "" } else { "s" }
    ));
    Ok(out)
}
