//! Heterogeneous tensor parallelism: which remote ranks a local rank reads
//! from, with vLLM's mapping.

use crate::error::{Error, Result};

/// Largest tensor-parallel size accepted (the limit of the `world_size`
/// option). Fault found by `tests/integration/hostile_input.rs`: without it,
/// `target_ranks(1, 0, u32::MAX)` built a list of 4,294,967,295 ranks (16
/// GiB) before `nixl_etcd_target_ranks` could compare it with `cap`, and the
/// process aborted on the failed allocation (or ran out of memory).
pub const MAX_TP: u32 = 65_536;

/// The remote ranks local rank `local_rank` of a `local_tp`-way engine reads
/// from, when the remote engine is `remote_tp`-way.
///
/// - `local_tp >= remote_tp`: with `ratio = local_tp / remote_tp`, the one
///   remote rank `local_rank / ratio`.
/// - `remote_tp > local_tp`: with `k = remote_tp / local_tp`, remote ranks
///   `local_rank * k ..= local_rank * k + k - 1`.
///
/// The larger size must be a multiple of the smaller.
pub fn target_ranks(local_tp: u32, local_rank: u32, remote_tp: u32) -> Result<Vec<u32>> {
    if local_tp == 0 || remote_tp == 0 || local_tp > MAX_TP || remote_tp > MAX_TP {
        return Err(Error::invalid(format!(
            "tensor-parallel sizes must be at least 1 and at most {MAX_TP} (local_tp={local_tp}, \
             remote_tp={remote_tp})"
        )));
    }
    if local_rank >= local_tp {
        return Err(Error::invalid(format!(
            "local_rank {local_rank} is out of range for local_tp={local_tp} (0..{})",
            local_tp - 1
        )));
    }
    let (big, small) = (local_tp.max(remote_tp), local_tp.min(remote_tp));
    if big % small != 0 {
        return Err(Error::invalid(format!(
            "local_tp={local_tp} and remote_tp={remote_tp}: the larger must be a multiple of \
             the smaller"
        )));
    }
    if local_tp >= remote_tp {
        Ok(vec![local_rank / (local_tp / remote_tp)])
    } else {
        let k = remote_tp / local_tp;
        Ok((local_rank * k..local_rank * k + k).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(local_tp: u32, remote_tp: u32) -> Vec<Vec<u32>> {
        (0..local_tp)
            .map(|r| target_ranks(local_tp, r, remote_tp).unwrap())
            .collect()
    }

    // The exact tables (4->8, 8->4, 2->2, 1->8, 8->1) are asserted through the
    // C ABI in tests/integration/informer.rs.

    #[test]
    fn every_remote_rank_is_read_by_someone() {
        for (l, r) in [(4, 8), (8, 4), (2, 2), (1, 8), (8, 1), (3, 6), (16, 2)] {
            let mut seen: Vec<u32> = table(l, r).into_iter().flatten().collect();
            seen.sort_unstable();
            seen.dedup();
            assert_eq!(seen, (0..r).collect::<Vec<_>>(), "{l}->{r}");
        }
    }

    #[test]
    fn invalid_combinations_are_refused() {
        for (l, rank, r, want) in [
            (0, 0, 4, "at least 1"),
            (4, 0, 0, "at least 1"),
            (4, 4, 8, "out of range"),
            (3, 0, 4, "multiple"),
            (4, 0, 6, "multiple"),
        ] {
            let err = target_ranks(l, rank, r).unwrap_err();
            assert_eq!(err.status, crate::Status::ErrInvalidArgument);
            assert!(err.message.contains(want), "{}", err.message);
        }
    }
}
