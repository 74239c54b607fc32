//! Which records a pre-warm loads: engines by id or prefix, ranks by vLLM's
//! TP mapping.

use super::Ranks;
use crate::error::{Error, Result};
use crate::keys;
use crate::tp;

/// Exact ids and prefixes, checked once.
#[derive(Debug)]
pub(super) struct Filter {
    pub(super) ids: Vec<String>,
    pub(super) prefixes: Vec<String>,
}

impl Filter {
    pub(super) fn parse(patterns: &[String]) -> Result<Filter> {
        let mut f = Filter {
            ids: Vec::new(),
            prefixes: Vec::new(),
        };
        for p in patterns {
            match p.strip_suffix('*') {
                Some("") => f.prefixes.push(String::new()),
                Some(prefix) => {
                    keys::validate_engine_id(prefix).map_err(|e| {
                        Error::invalid(format!("pre-warm engine prefix {p:?}: {}", e.message))
                    })?;
                    f.prefixes.push(prefix.to_owned());
                }
                None => {
                    keys::validate_engine_id(p).map_err(|e| {
                        Error::invalid(format!("pre-warm engine {p:?}: {}", e.message))
                    })?;
                    f.ids.push(p.clone());
                }
            }
        }
        if patterns.is_empty() {
            f.prefixes.push(String::new());
        }
        Ok(f)
    }

    pub(super) fn matches(&self, engine: &str) -> bool {
        self.ids.iter().any(|i| i == engine) || self.prefixes.iter().any(|p| engine.starts_with(p))
    }
}

/// Whether `rank` of an engine of `world_size` ranks is one `ranks` selects.
pub(super) fn wants_rank(ranks: Ranks, rank: u32, world_size: Option<u32>) -> bool {
    match ranks {
        Ranks::All => true,
        Ranks::Tp {
            local_tp,
            local_rank,
        } => tp::target_ranks(local_tp, local_rank, world_size.unwrap_or(local_tp))
            .map(|r| r.contains(&rank))
            .unwrap_or(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Status;

    fn filter(p: &[&str]) -> Result<Filter> {
        Filter::parse(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn ids_and_prefixes_select_engines() {
        let f = filter(&["prefill_a", "pool-*"]).unwrap();
        assert!(f.matches("prefill_a"));
        assert!(!f.matches("prefill_ab"));
        assert!(f.matches("pool-1"));
        assert!(f.matches("pool-"));
        assert!(!f.matches("pool"));
        assert!(filter(&[]).unwrap().matches("anything"));
        assert!(filter(&["*"]).unwrap().matches("anything"));
    }

    #[test]
    fn ids_that_could_escape_the_namespace_are_refused() {
        for bad in ["../x", "a/b", "a/*", ""] {
            let e = filter(&[bad]).unwrap_err();
            assert_eq!(e.status, Status::ErrInvalidArgument, "{bad}");
            assert!(e.message.starts_with("pre-warm engine"), "{}", e.message);
        }
    }
}
