//! Size limits shared by the configuration and the record and chunk formats.
//! The bottom of the crate: it imports nothing.

/// Largest metadata accepted by default (option `max_metadata_bytes`).
pub const DEFAULT_MAX_METADATA_BYTES: usize = 64 << 20;
/// Upper bound for `max_metadata_bytes`: the cache holds every blob in memory.
pub const MAX_METADATA_BYTES_LIMIT: usize = 1 << 30;
