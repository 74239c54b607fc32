//! TCPStore keys -> etcd keys.
//!
//! NIXL's TCPStore backend names metadata `/nixl/agents/{label}/{agent}/{dst}`
//! (`dst` is `NULL_AGENT` for metadata published to everyone). Those
//! broadcast keys are stored in NIXL's etcd layout, `{nixl_namespace}/{agent}/{label}`
//! plus the agent's marker `{nixl_namespace}/{agent}/`, exactly what NIXL's
//! own etcd backend and this library's `publish_nixl` write: all three see
//! each other. Any other key is stored verbatim under [`VERBATIM_PREFIX`].

use crate::nixl_layout;

/// Where NIXL's TCPStore backend puts its keys.
pub const TCPSTORE_PREFIX: &str = "/nixl/agents/";
/// NIXL's null agent: the `dst` of broadcast metadata.
pub const NULL_AGENT: &str = "NULL_AGENT";
/// Every TCPStore key that is not broadcast metadata is kept under this
/// prefix, verbatim: TCPStore key `K` is etcd key `/nixl-etcd/tcpstore` + `K`.
pub const VERBATIM_PREFIX: &str = "/nixl-etcd/tcpstore";

/// Where one TCPStore key lives in etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mapped {
    /// Broadcast metadata of `agent` under `label`, at `key` in NIXL's layout.
    Broadcast {
        agent: String,
        label: String,
        key: String,
    },
    /// Anything else, at `key` (under [`VERBATIM_PREFIX`]).
    Verbatim { key: String },
}

impl Mapped {
    pub fn etcd_key(&self) -> &str {
        match self {
            Mapped::Broadcast { key, .. } | Mapped::Verbatim { key } => key,
        }
    }
}

/// Maps a TCPStore key, given the NIXL namespace (used verbatim) and the
/// rank-record namespace (broadcast keys that would land among rank records
/// are kept verbatim instead). `None`: the key is not UTF-8.
pub fn map(nixl_ns: &str, rank_ns: &str, tcp_key: &[u8]) -> Option<Mapped> {
    let key = std::str::from_utf8(tcp_key).ok()?;
    Some(
        broadcast(nixl_ns, rank_ns, key).unwrap_or_else(|| Mapped::Verbatim {
            key: format!("{VERBATIM_PREFIX}{key}"),
        }),
    )
}

fn broadcast(nixl_ns: &str, rank_ns: &str, key: &str) -> Option<Mapped> {
    let rest = key.strip_prefix(TCPSTORE_PREFIX)?;
    let mut parts = rest.split('/');
    let (label, agent, dst) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || dst != NULL_AGENT || label.is_empty() {
        return None;
    }
    nixl_layout::validate_agent_name(agent).ok()?;
    if nixl_layout::resolve_label(Some(label)).ok()? != label {
        return None;
    }
    let marker = nixl_layout::marker_key(nixl_ns, agent);
    if nixl_layout::overlaps_rank_records(rank_ns, &marker) {
        return None;
    }
    Some(Mapped::Broadcast {
        agent: agent.to_owned(),
        label: label.to_owned(),
        key: nixl_layout::nixl_key(nixl_ns, agent, label),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NS: &str = "/nixl/agents/";
    const RANKS: &str = "/vllm/nixl/agents";

    fn b(agent: &str, label: &str, key: &str) -> Option<Mapped> {
        Some(Mapped::Broadcast {
            agent: agent.into(),
            label: label.into(),
            key: key.into(),
        })
    }

    fn v(key: &str) -> Option<Mapped> {
        Some(Mapped::Verbatim { key: key.into() })
    }

    #[test]
    fn broadcast_keys_land_in_nixls_etcd_layout() {
        assert_eq!(
            map(NS, RANKS, b"/nixl/agents/metadata/A/NULL_AGENT"),
            b("A", "metadata", "/nixl/agents//A/metadata")
        );
        assert_eq!(
            map(NS, RANKS, b"/nixl/agents/lbl/prefill-0/NULL_AGENT"),
            b("prefill-0", "lbl", "/nixl/agents//prefill-0/lbl")
        );
        assert_eq!(
            map("/x/y", RANKS, b"/nixl/agents/metadata/A/NULL_AGENT"),
            b("A", "metadata", "/x/y/A/metadata")
        );
    }

    #[test]
    fn other_keys_are_kept_verbatim() {
        for k in [
            "/nixl/agents/metadata/A/B",
            "/nixl/agents/metadata/A",
            "/nixl/agents/metadata/A/NULL_AGENT/x",
            "/nixl/agents//A/NULL_AGENT",
            "/nixl/agents/metadata/../NULL_AGENT",
            "/other",
            "",
        ] {
            assert_eq!(
                map(NS, RANKS, k.as_bytes()),
                v(&format!("/nixl-etcd/tcpstore{k}")),
                "{k}"
            );
        }
        // An agent prefix that would cover rank records is not used.
        assert_eq!(
            map(
                "/vllm/nixl/agents",
                RANKS,
                b"/nixl/agents/metadata/e/NULL_AGENT"
            ),
            v("/nixl-etcd/tcpstore/nixl/agents/metadata/e/NULL_AGENT")
        );
        assert_eq!(map(NS, RANKS, b"\xff\xfe"), None);
    }
}
