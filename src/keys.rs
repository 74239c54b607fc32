//! Key layout: `{namespace}/{engine_id}/rank_{rank}`, and the validation that
//! keeps every id inside its namespace.

use crate::error::{Error, Result};

/// Longest engine id accepted, in bytes. Keys stay short and readable.
pub const MAX_ENGINE_ID_LEN: usize = 200;
/// Longest namespace accepted, in bytes.
pub const MAX_NAMESPACE_LEN: usize = 512;
pub const DEFAULT_NAMESPACE: &str = "/vllm/nixl/agents";

/// Checks an engine id: non-empty, bounded, and unable to escape or alias the
/// namespace (no `/`, `\`, `..`, `.`, NUL or other control characters).
pub fn validate_engine_id(id: &str) -> Result<()> {
    validate_id(id, "engine_id")
}

/// The engine id rules, for any id that becomes one key segment; `what`
/// names the argument in the message (`engine_id`, `agent_name`).
pub fn validate_id(id: &str, what: &str) -> Result<()> {
    let bad = |why: &str| {
        Err(Error::invalid(format!(
            "invalid {what} {id:?}: {why}; use letters, digits, '-', '_', '.' or ':'"
        )))
    };
    if id.is_empty() {
        return bad("it is empty");
    }
    if id.len() > MAX_ENGINE_ID_LEN {
        return Err(Error::invalid(format!(
            "invalid {what}: {} bytes, over the limit of {MAX_ENGINE_ID_LEN}",
            id.len()
        )));
    }
    if id.contains('/') || id.contains('\\') {
        return bad("it contains a path separator");
    }
    if id == "." || id.contains("..") {
        return bad("it contains '.' or '..' path components");
    }
    if id.chars().any(|c| c.is_control()) {
        return bad("it contains a control character");
    }
    if id.trim() != id {
        return bad("it starts or ends with whitespace");
    }
    Ok(())
}

/// Normalizes a namespace: one leading `/`, no trailing `/`, no empty, `.` or
/// `..` segments, no control characters. `"vllm//nixl/"` becomes `"/vllm/nixl"`.
pub fn normalize_namespace(ns: &str) -> Result<String> {
    let bad = |why: &str| {
        Err(Error::invalid(format!(
            "invalid namespace {ns:?} (VLLM_NIXL_ETCD_NAMESPACE): {why}"
        )))
    };
    if ns.len() > MAX_NAMESPACE_LEN {
        return bad("too long");
    }
    if ns.chars().any(|c| c.is_control()) {
        return bad("it contains a control character");
    }
    let mut out = String::with_capacity(ns.len() + 1);
    for seg in ns.split('/').filter(|s| !s.is_empty()) {
        if seg == "." || seg == ".." {
            return bad("it contains '.' or '..' segments");
        }
        out.push('/');
        out.push_str(seg);
    }
    if out.is_empty() {
        return bad("it has no segment; use something like /vllm/nixl/agents");
    }
    Ok(out)
}

/// The key of one rank's record.
pub fn rank_key(namespace: &str, engine_id: &str, rank: u32) -> String {
    format!("{namespace}/{engine_id}/rank_{rank}")
}

/// The prefix of every key of one engine (with the trailing `/`, so that
/// `engine1` never matches `engine10`).
pub fn engine_prefix(namespace: &str, engine_id: &str) -> String {
    format!("{namespace}/{engine_id}/")
}

/// Splits a key under `namespace` into (engine_id, rank); `None` if the key is
/// not a rank record.
pub fn parse_rank_key<'a>(namespace: &str, key: &'a str) -> Option<(&'a str, u32)> {
    let rest = key.strip_prefix(namespace)?.strip_prefix('/')?;
    let (engine, tail) = rest.split_once('/')?;
    let rank = tail.strip_prefix("rank_")?;
    if rank.is_empty() || !rank.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((engine, rank.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_matches_the_guides_layout() {
        let ns = normalize_namespace(DEFAULT_NAMESPACE).unwrap();
        assert_eq!(
            rank_key(&ns, "prefill_engine", 0),
            "/vllm/nixl/agents/prefill_engine/rank_0"
        );
        assert_eq!(engine_prefix(&ns, "e1"), "/vllm/nixl/agents/e1/");
    }

    #[test]
    fn namespace_is_normalized() {
        assert_eq!(normalize_namespace("vllm//nixl/").unwrap(), "/vllm/nixl");
        assert_eq!(
            normalize_namespace("/vllm/prod/nixl/agents/").unwrap(),
            "/vllm/prod/nixl/agents"
        );
        for bad in ["", "/", "//", "/a/../b", "/a/./b", "/a\0b", "/a\nb"] {
            assert!(normalize_namespace(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn engine_ids_that_escape_are_refused() {
        for ok in ["prefill_engine", "decode-tp8", "e.1", "host:5600", "引擎"] {
            validate_engine_id(ok).unwrap();
        }
        let long = "x".repeat(MAX_ENGINE_ID_LEN + 1);
        for bad in [
            "",
            "a/b",
            "/",
            "..",
            ".",
            "a..b",
            "a\\b",
            "a\0b",
            "a\tb",
            "a\u{7f}",
            " a",
            "a ",
            long.as_str(),
        ] {
            let err = validate_engine_id(bad).unwrap_err();
            assert_eq!(err.status, crate::Status::ErrInvalidArgument, "{bad:?}");
            assert!(err.message.contains("engine_id"), "{}", err.message);
        }
    }

    #[test]
    fn rank_keys_parse_back() {
        let ns = "/vllm/nixl/agents";
        assert_eq!(parse_rank_key(ns, &rank_key(ns, "e", 7)), Some(("e", 7)));
        assert_eq!(parse_rank_key(ns, "/vllm/nixl/agents/e/rank_"), None);
        assert_eq!(parse_rank_key(ns, "/vllm/nixl/agents/e/rank_x"), None);
        assert_eq!(parse_rank_key(ns, "/vllm/nixl/agents/e/meta"), None);
        assert_eq!(parse_rank_key(ns, "/vllm/nixl/agentsX/e/rank_1"), None);
        assert_eq!(
            parse_rank_key(ns, "/vllm/nixl/agents/e/rank_99999999999"),
            None
        );
    }
}
