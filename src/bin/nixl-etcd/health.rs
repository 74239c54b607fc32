//! `health`: each endpoint on its own connection, so a member that is down
//! shows as unreachable while the others answer.

use std::time::{Duration, Instant};

use nixl_etcd::Config;
use serde_json::{json, Value};

use crate::etcd::{self, connect_to};
use crate::fail::{etcd_cause, CliError, EXIT_DEGRADED, EXIT_OK, EXIT_UNREACHABLE};
use crate::fmt;

#[derive(Debug, Clone, Default)]
pub struct Member {
    pub endpoint: String,
    pub reachable: bool,
    pub member_id: u64,
    pub leader_id: u64,
    pub version: String,
    pub db_size: i64,
    pub raft_term: u64,
    pub raft_index: u64,
    pub rtt: Option<Duration>,
    pub errors: Vec<String>,
    pub error: Option<String>,
    /// A linearizable read through this member succeeded (it reaches a
    /// quorum); `false` with the cause in `quorum_error` otherwise.
    pub quorum: bool,
    pub quorum_error: Option<String>,
}

/// Longest wait for the linearizable read: without a quorum etcd holds it
/// until its own request timeout.
const QUORUM_READ_LIMIT: Duration = Duration::from_secs(5);

impl Member {
    fn healthy(&self) -> bool {
        self.reachable && self.leader_id != 0 && self.errors.is_empty() && self.quorum
    }
}

async fn probe(cfg: Config, endpoint: String, timeout: Duration) -> Member {
    let mut m = Member {
        endpoint: endpoint.clone(),
        ..Member::default()
    };
    let run = async {
        let client = connect_to(&cfg, std::slice::from_ref(&endpoint), timeout)
            .await
            .map_err(|e| e.message)?;
        let mut maint = client.maintenance_client();
        // The first request may open the connection; the second is timed.
        maint.status().await.map_err(|e| etcd_cause(&e))?;
        let started = Instant::now();
        let status = maint.status().await.map_err(|e| etcd_cause(&e))?;
        let rtt = started.elapsed();
        // As `etcdctl endpoint health`: a linearizable read of key "health"
        // (its absence is fine), which needs a leader with a quorum; a
        // member may still call itself leader just after losing it.
        let mut kv = client.kv_client();
        let read = tokio::time::timeout(QUORUM_READ_LIMIT.min(timeout), kv.get("health", None));
        let quorum = match read.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(etcd_cause(&e)),
            Err(_) => Err(format!(
                "no answer to a linearizable read within {:.1} s",
                QUORUM_READ_LIMIT.min(timeout).as_secs_f64()
            )),
        };
        Ok::<_, String>((status, rtt, quorum))
    };
    match tokio::time::timeout(timeout + QUORUM_READ_LIMIT, run).await {
        Ok(Ok((s, rtt, quorum))) => {
            m.quorum = quorum.is_ok();
            m.quorum_error = quorum.err();
            m.reachable = true;
            m.member_id = s.header().map(|h| h.member_id()).unwrap_or(0);
            m.leader_id = s.leader();
            m.version = s.version().to_owned();
            m.db_size = s.db_size();
            m.raft_term = s.raft_term();
            m.raft_index = s.raft_index();
            m.errors = s.errors().to_vec();
            m.rtt = Some(rtt);
        }
        Ok(Err(e)) => m.error = Some(e),
        Err(_) => {
            m.error = Some(format!(
                "no answer within {:.1} s (VLLM_NIXL_ETCD_TIMEOUT)",
                timeout.as_secs_f64()
            ))
        }
    }
    m
}

/// Probes every endpoint at once.
pub fn probe_all(cfg: &Config) -> Result<Vec<Member>, CliError> {
    let rt = etcd::runtime()?;
    Ok(rt.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for (i, ep) in cfg.endpoints.iter().enumerate() {
            let ep = ep.clone();
            let (cfg, timeout) = (cfg.clone(), cfg.timeout);
            set.spawn(async move { (i, probe(cfg, ep, timeout).await) });
        }
        let mut out: Vec<(usize, Member)> = Vec::new();
        while let Some(r) = set.join_next().await {
            if let Ok(pair) = r {
                out.push(pair);
            }
        }
        out.sort_by_key(|(i, _)| *i);
        out.into_iter().map(|(_, m)| m).collect()
    }))
}

/// The output and the exit status: 0 when every endpoint is healthy, 5 when
/// none answers, 6 otherwise.
pub fn run(cfg: &Config, as_json: bool) -> Result<(String, i32), CliError> {
    let members = probe_all(cfg)?;
    let healthy = members.iter().filter(|m| m.healthy()).count();
    let reachable = members.iter().filter(|m| m.reachable).count();
    let code = if healthy == members.len() {
        EXIT_OK
    } else if reachable == 0 {
        EXIT_UNREACHABLE
    } else {
        EXIT_DEGRADED
    };
    // The leader as members with a quorum see it.
    let leader = members.iter().find(|m| m.healthy());
    let leader_endpoint = leader.and_then(|l| {
        members
            .iter()
            .find(|m| m.reachable && m.member_id == l.leader_id)
            .map(|m| m.endpoint.clone())
    });
    if as_json {
        let list: Vec<Value> = members
            .iter()
            .map(|m| {
                json!({
                    "endpoint": m.endpoint,
                    "reachable": m.reachable,
                    "healthy": m.healthy(),
                    "member_id": m.reachable.then(|| format!("{:x}", m.member_id)),
                    "leader_id": (m.leader_id != 0).then(|| format!("{:x}", m.leader_id)),
                    "is_leader": m.reachable && m.leader_id != 0 && m.leader_id == m.member_id,
                    "version": m.reachable.then(|| m.version.clone()),
                    "db_size": m.reachable.then_some(m.db_size),
                    "raft_term": m.reachable.then_some(m.raft_term),
                    "raft_index": m.reachable.then_some(m.raft_index),
                    "rtt_ms": m.rtt.map(|d| d.as_secs_f64() * 1e3),
                    "quorum": m.quorum,
                    "errors": m.errors,
                    "error": m.error.clone().or_else(|| m.quorum_error.clone()),
                })
            })
            .collect();
        let v = json!({
            "endpoints": list,
            "healthy": healthy,
            "total": members.len(),
            "leader_endpoint": leader_endpoint,
        });
        return Ok((v.to_string() + "\n", code));
    }
    let rows: Vec<Vec<String>> = members
        .iter()
        .map(|m| {
            if !m.reachable {
                return vec![
                    m.endpoint.clone(),
                    "no".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    m.error.clone().unwrap_or_default(),
                ];
            }
            let leader = match m.leader_id {
                0 => "none".to_owned(),
                id if id == m.member_id => "yes (this member)".to_owned(),
                id => format!("{id:x}"),
            };
            vec![
                m.endpoint.clone(),
                "yes".into(),
                format!("{:x}", m.member_id),
                leader,
                m.version.clone(),
                m.rtt
                    .map(|d| format!("{:.2} ms", d.as_secs_f64() * 1e3))
                    .unwrap_or_default(),
                fmt::size(m.db_size.max(0) as u64),
                if m.quorum { "yes" } else { "no" }.into(),
                m.errors
                    .iter()
                    .cloned()
                    .chain(m.quorum_error.clone())
                    .collect::<Vec<_>>()
                    .join("; "),
            ]
        })
        .collect();
    let mut out = fmt::table(
        &[
            "ENDPOINT",
            "REACHABLE",
            "MEMBER",
            "LEADER",
            "VERSION",
            "RTT",
            "DB SIZE",
            "QUORUM",
            "ERROR",
        ],
        &rows,
    );
    out.push_str(&format!(
        "{healthy} of {} endpoint{} healthy; leader: {}\n",
        members.len(),
        if members.len() == 1 { "" } else { "s" },
        match (leader, &leader_endpoint) {
            (Some(l), Some(ep)) => format!("{:x} at {ep}", l.leader_id),
            (Some(l), None) => format!("{:x}", l.leader_id),
            (None, _) => "none with a quorum".into(),
        }
    ));
    Ok((out, code))
}
