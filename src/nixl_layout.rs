//! The key layout of NIXL's built-in etcd exchange, so that engines using it
//! can switch to this library without their peers noticing.
//!
//! A key is `namespace + "/" + agent + "/" + label`, with the namespace used
//! verbatim: the default namespace `/nixl/agents/` therefore gives a double
//! slash, `/nixl/agents//A/metadata`. The agent's marker is the same with an
//! empty label, `/nixl/agents//A/`; it is also the prefix of every key of the
//! agent.

use crate::error::{Error, Result, Status};
use crate::keys;

/// NIXL's default namespace (when neither the open option `nixl_namespace`
/// nor `NIXL_ETCD_NAMESPACE` gives one).
pub const DEFAULT_NIXL_NAMESPACE: &str = "/nixl/agents/";
/// The label of an agent's full metadata blob.
pub const DEFAULT_LABEL: &str = "metadata";
/// Longest label accepted, in bytes.
pub const MAX_LABEL_LEN: usize = 200;

/// The key of one label of an agent: `ns + "/" + agent + "/" + label`.
pub fn nixl_key(ns: &str, agent: &str, label: &str) -> String {
    format!("{ns}/{agent}/{label}")
}

/// The agent's marker key, `ns + "/" + agent + "/"`: written empty when the
/// agent publishes, watched by peers, and the prefix of all its keys.
pub fn marker_key(ns: &str, agent: &str) -> String {
    nixl_key(ns, agent, "")
}

/// Checks a NIXL namespace without changing it (it is used verbatim):
/// non-empty, bounded, no control characters. `what` names its source.
pub fn validate_namespace(ns: &str, what: &str) -> Result<()> {
    let bad = |why: &str| {
        Err(Error::invalid(format!(
            "invalid NIXL namespace {ns:?} ({what}): {why}; NIXL's default is \
             {DEFAULT_NIXL_NAMESPACE:?}"
        )))
    };
    if ns.is_empty() {
        return bad("it is empty");
    }
    if ns.len() > keys::MAX_NAMESPACE_LEN {
        return bad(&format!(
            "{} bytes, over the limit of {}",
            ns.len(),
            keys::MAX_NAMESPACE_LEN
        ));
    }
    if ns.chars().any(|c| c.is_control()) {
        return bad("it contains a control character");
    }
    Ok(())
}

/// Checks an agent name: the rules of engine ids (non-empty, bounded, no
/// `/`, `\`, `.`, `..`, control characters or surrounding whitespace).
pub fn validate_agent_name(agent: &str) -> Result<()> {
    keys::validate_id(agent, "agent_name")
}

/// The label to use: NULL or empty means the full metadata, `"metadata"`.
/// Otherwise non-empty, bounded, no `/` and no control characters.
pub fn resolve_label(label: Option<&str>) -> Result<&str> {
    let label = match label {
        None | Some("") => return Ok(DEFAULT_LABEL),
        Some(l) => l,
    };
    let bad = |why: &str| {
        Err(Error::invalid(format!(
            "invalid label {label:?}: {why}; NULL or \"\" means {DEFAULT_LABEL:?}"
        )))
    };
    if label.len() > MAX_LABEL_LEN {
        return Err(Error::invalid(format!(
            "invalid label: {} bytes, over the limit of {MAX_LABEL_LEN}",
            label.len()
        )));
    }
    if label.contains('/') {
        return bad("it contains '/'");
    }
    if label.chars().any(|c| c.is_control()) {
        return bad("it contains a control character");
    }
    Ok(label)
}

/// `TOO_LARGE` unless a blob of `len` bytes fits in one etcd request of
/// `max_request_bytes` beside its key and the agent's marker (NIXL's layout
/// keeps each blob in one key), with room for the lease and the framing.
pub fn check_fits(
    max_request_bytes: usize,
    agent: &str,
    label: &str,
    key: &str,
    marker: &str,
    len: usize,
) -> Result<()> {
    let limit = max_request_bytes.saturating_sub(marker.len() + key.len() + 512);
    if len > limit {
        return Err(Error::new(
            Status::ErrTooLarge,
            format!(
                "NIXL metadata of {len} bytes for agent {agent} (label {label}) is over the \
                 {limit} bytes that fit in one etcd request with its keys \
                 (max_request_bytes={max_request_bytes}); nothing was written"
            ),
        ));
    }
    Ok(())
}

/// Whether deleting everything under `marker` (an agent's prefix) could
/// touch rank records of the rank namespace `rank_ns` (normalized, no
/// trailing `/`), or a key under it could be a rank record: true when the
/// marker covers the whole rank namespace, or is exactly one engine's prefix
/// in it.
pub fn overlaps_rank_records(rank_ns: &str, marker: &str) -> bool {
    let engines = format!("{rank_ns}/");
    if engines.starts_with(marker) {
        return true;
    }
    match marker.strip_prefix(&engines) {
        Some(rest) => rest
            .strip_suffix('/')
            .is_some_and(|engine| !engine.is_empty() && !engine.contains('/')),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_namespace_gives_a_double_slash() {
        let ns = DEFAULT_NIXL_NAMESPACE;
        assert_eq!(nixl_key(ns, "A", "metadata"), "/nixl/agents//A/metadata");
        assert_eq!(marker_key(ns, "A"), "/nixl/agents//A/");
        assert_eq!(nixl_key(ns, "A", "part_1"), "/nixl/agents//A/part_1");
    }

    #[test]
    fn namespaces_are_used_verbatim() {
        assert_eq!(nixl_key("/x/y", "A", "metadata"), "/x/y/A/metadata");
        assert_eq!(marker_key("/x/y", "A"), "/x/y/A/");
        assert_eq!(nixl_key("nixl", "A", "metadata"), "nixl/A/metadata");
        assert_eq!(nixl_key("/x//", "A", "metadata"), "/x///A/metadata");
        for ok in ["/nixl/agents/", "/x/y", "nixl", "/", "a b"] {
            validate_namespace(ok, "test").unwrap();
        }
        let long = "n".repeat(keys::MAX_NAMESPACE_LEN + 1);
        for bad in ["", "/a\nb", "/a\0b", "\t", long.as_str()] {
            let err = validate_namespace(bad, "NIXL_ETCD_NAMESPACE").unwrap_err();
            assert_eq!(err.status, crate::Status::ErrInvalidArgument, "{bad:?}");
            assert!(
                err.message.contains("NIXL_ETCD_NAMESPACE"),
                "{}",
                err.message
            );
        }
    }

    #[test]
    fn agent_names_follow_the_engine_id_rules_and_say_agent_name() {
        for ok in ["A", "prefill-0", "agent.1", "host:5600"] {
            validate_agent_name(ok).unwrap();
        }
        let long = "a".repeat(keys::MAX_ENGINE_ID_LEN + 1);
        for bad in ["", "a/b", "..", ".", "a\\b", "a\0b", " a", long.as_str()] {
            let err = validate_agent_name(bad).unwrap_err();
            assert_eq!(err.status, crate::Status::ErrInvalidArgument, "{bad:?}");
            assert!(err.message.contains("agent_name"), "{}", err.message);
            assert!(!err.message.contains("engine_id"), "{}", err.message);
        }
    }

    #[test]
    fn labels() {
        assert_eq!(resolve_label(None).unwrap(), "metadata");
        assert_eq!(resolve_label(Some("")).unwrap(), "metadata");
        assert_eq!(resolve_label(Some("part_1")).unwrap(), "part_1");
        let long = "l".repeat(MAX_LABEL_LEN + 1);
        for bad in ["a/b", "/", "a\nb", "a\0b", long.as_str()] {
            let err = resolve_label(Some(bad)).unwrap_err();
            assert_eq!(err.status, crate::Status::ErrInvalidArgument, "{bad:?}");
            assert!(err.message.contains("label"), "{}", err.message);
        }
    }

    #[test]
    fn agent_prefixes_that_would_cover_rank_records_are_detected() {
        let rns = "/vllm/nixl/agents";
        // The same namespace: the agent's prefix is an engine's prefix.
        assert!(overlaps_rank_records(rns, &marker_key(rns, "e")));
        // A prefix covering the whole rank namespace.
        assert!(overlaps_rank_records(
            rns,
            &marker_key("/vllm/nixl", "agents")
        ));
        assert!(overlaps_rank_records(rns, &marker_key("", "vllm")));
        // Disjoint, or unable to hold a rank record (empty engine id).
        assert!(!overlaps_rank_records(
            rns,
            &marker_key("/nixl/agents/", "e")
        ));
        assert!(!overlaps_rank_records(
            rns,
            &marker_key("/vllm/nixl/agents/", "e")
        ));
        assert!(!overlaps_rank_records(
            rns,
            &marker_key("/vllm/nixl/agents/e", "x")
        ));
        assert!(!overlaps_rank_records(
            rns,
            &marker_key("/vllm/nixl/agentsX", "e")
        ));
    }
}
