//! The value stored under a rank's key: a JSON record that `etcdctl get`
//! shows readably, with the NIXL metadata in base64.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::blob::BlobRef;
use crate::error::{Error, Result};

/// Version of the record layout. Readers refuse versions they do not know.
///
/// The rule for mixed versions (a rolling upgrade, docs/design.md): within one
/// format a newer writer may only add optional fields, which older readers
/// ignore; anything an older reader would misread takes a new format number,
/// which such a reader refuses by name. Records in the wire format 0.1 writes
/// are kept as fixtures (`tests/fixtures/records/`): this version reads them
/// and writes the same bytes for the same fields.
pub const FORMAT_VERSION: u32 = 1;

/// One rank's registration, as written to etcd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub format: u32,
    pub engine_id: String,
    pub rank: u32,
    /// `VLLM_NIXL_SIDE_CHANNEL_HOST` of the registrant, else its hostname.
    pub host: String,
    pub pid: u32,
    /// Unique per client: a new value means the rank restarted.
    pub incarnation: String,
    /// Registration time, milliseconds since the Unix epoch.
    pub registered_at_ms: u64,
    /// Number of ranks of the engine, when the registrant declared it
    /// (open option `world_size`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub world_size: Option<u32>,
    /// Length of `metadata` once decoded; checked on read.
    pub metadata_len: usize,
    /// The NIXL agent metadata (opaque bytes), base64 (standard alphabet);
    /// empty when the metadata is stored in chunks (`blob`).
    pub metadata: String,
    /// Where the metadata is, when it was too large for the record itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blob: Option<BlobRef>,
}

impl Record {
    /// Builds a record around raw metadata.
    pub fn new(
        engine_id: &str,
        rank: u32,
        host: &str,
        incarnation: &str,
        metadata: &[u8],
    ) -> Record {
        let registered_at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Record {
            format: FORMAT_VERSION,
            engine_id: engine_id.to_owned(),
            rank,
            host: host.to_owned(),
            pid: std::process::id(),
            incarnation: incarnation.to_owned(),
            registered_at_ms,
            world_size: None,
            metadata_len: metadata.len(),
            metadata: base64::engine::general_purpose::STANDARD.encode(metadata),
            blob: None,
        }
    }

    /// A record whose metadata (`metadata_len` bytes) is stored in chunks.
    pub fn chunked(
        engine_id: &str,
        rank: u32,
        host: &str,
        incarnation: &str,
        metadata_len: usize,
        blob: BlobRef,
    ) -> Record {
        Record {
            metadata_len,
            blob: Some(blob),
            ..Record::new(engine_id, rank, host, incarnation, &[])
        }
    }

    /// Size of the encoded value for `metadata_len` bytes of metadata, without
    /// encoding it: base64 plus a bound on the JSON around it.
    pub fn encoded_size_bound(metadata_len: usize, engine_id: &str, host: &str) -> usize {
        metadata_len.div_ceil(3) * 4 + engine_id.len() * 6 + host.len() * 6 + 320
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Serializing plain strings and integers cannot fail.
        serde_json::to_vec(self).expect("record serializes")
    }

    /// Parses and checks a value read from `key`, expected to hold
    /// (`engine_id`, `rank`); returns the record (its base64 copy dropped)
    /// and the decoded metadata. One JSON pass and one base64 pass. For a
    /// chunked record (`blob`) the metadata is empty: the caller fetches the
    /// chunks (see `blob::assemble`).
    pub fn from_json(
        key: &str,
        value: &[u8],
        engine_id: &str,
        rank: u32,
    ) -> Result<(Record, Vec<u8>)> {
        let mut rec: Record = match serde_json::from_slice(value) {
            Ok(rec) => rec,
            Err(e) => return Err(Self::explain(key, value, e)),
        };
        if rec.format != FORMAT_VERSION {
            return Err(Self::unknown_format(key, rec.format));
        }
        if rec.engine_id != engine_id || rec.rank != rank {
            return Err(Error::bad_record(
                key,
                format!(
                    "it names engine {:?} rank {}, expected engine {engine_id:?} rank {rank}",
                    rec.engine_id, rec.rank
                ),
            ));
        }
        if let Some(blob) = &rec.blob {
            check_blob_ref(key, blob, &rec)?;
            return Ok((rec, Vec::new()));
        }
        let md = rec.decode_metadata(key)?;
        if md.len() != rec.metadata_len {
            return Err(Error::bad_record(
                key,
                format!(
                    "metadata is {} bytes, the record says {}",
                    md.len(),
                    rec.metadata_len
                ),
            ));
        }
        rec.metadata = String::new();
        Ok((rec, md))
    }

    /// Why a value is not a record: a newer format says so rather than
    /// failing on a field it changed.
    fn explain(key: &str, value: &[u8], e: serde_json::Error) -> Error {
        #[derive(Deserialize)]
        struct Probe {
            format: Option<u32>,
        }
        match serde_json::from_slice::<Probe>(value) {
            Ok(Probe { format: Some(v) }) if v != FORMAT_VERSION => Self::unknown_format(key, v),
            Ok(Probe { format: None }) => Error::bad_record(key, "no format version"),
            _ => Error::bad_record(key, e),
        }
    }

    fn unknown_format(key: &str, v: u32) -> Error {
        Error::bad_record(
            key,
            format!("format version {v}, this library reads version {FORMAT_VERSION}"),
        )
    }

    pub fn decode_metadata(&self, key: &str) -> Result<Vec<u8>> {
        base64::engine::general_purpose::STANDARD
            .decode(&self.metadata)
            .map_err(|e| Error::bad_record(key, format!("metadata is not base64: {e}")))
    }
}

/// A chunk reference must be plausible before anything is fetched for it:
/// its generation becomes a key segment, its sizes bound the read.
fn check_blob_ref(key: &str, blob: &BlobRef, rec: &Record) -> Result<()> {
    let bad = |why: String| Err(Error::bad_record(key, why));
    if blob.generation.is_empty()
        || blob.generation.len() > 64
        || !blob.generation.bytes().all(|b| b.is_ascii_alphanumeric())
    {
        return bad(format!(
            "blob generation {:?} is not a plain id",
            blob.generation
        ));
    }
    if !rec.metadata.is_empty() {
        return bad("it has both inline and chunked metadata".to_owned());
    }
    let chunks = blob.chunks as usize;
    let fits = blob.chunk_size > 0
        && chunks == rec.metadata_len.div_ceil(blob.chunk_size)
        && rec.metadata_len <= crate::limits::MAX_METADATA_BYTES_LIMIT;
    if !fits {
        return bad(format!(
            "blob of {} chunks of {} bytes cannot hold {} bytes of metadata",
            blob.chunks, blob.chunk_size, rec.metadata_len
        ));
    }
    if blob.sha256.len() != 64 || !blob.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return bad("blob sha256 is not 64 hex digits".to_owned());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Status;

    fn blob() -> Vec<u8> {
        (0..8192u32).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn round_trips_binary_metadata_with_nul_bytes() {
        let md = blob();
        let rec = Record::new("e", 3, "node1", "inc-1", &md);
        let json = rec.to_json();
        let (back, decoded) = Record::from_json("k", &json, "e", 3).unwrap();
        assert_eq!(
            back,
            Record {
                metadata: String::new(),
                ..rec
            }
        );
        assert_eq!(decoded, md);
        assert!(json.len() <= Record::encoded_size_bound(md.len(), "e", "node1"));
    }

    #[test]
    fn record_is_readable_json() {
        let rec = Record::new("prefill_engine", 0, "node1", "abc", b"\0\x01");
        let v: serde_json::Value = serde_json::from_slice(&rec.to_json()).unwrap();
        assert_eq!(v["format"], 1);
        assert_eq!(v["engine_id"], "prefill_engine");
        assert_eq!(v["rank"], 0);
        assert_eq!(v["host"], "node1");
        assert_eq!(v["incarnation"], "abc");
        assert_eq!(v["metadata"], "AAE=");
        assert_eq!(v["pid"], std::process::id());
    }

    #[test]
    fn unreadable_records_are_errors_not_crashes() {
        let good = Record::new("e", 1, "h", "i", b"xyz");
        let mut other_version: serde_json::Value = serde_json::from_slice(&good.to_json()).unwrap();
        other_version["format"] = 2.into();
        let mut bad_b64 = good.clone();
        bad_b64.metadata = "!!!".into();
        let mut bad_len = good.clone();
        bad_len.metadata_len = 4;
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"not json".to_vec(), "unreadable"),
            (b"{}".to_vec(), "no format version"),
            (
                serde_json::to_vec(&other_version).unwrap(),
                "format version 2",
            ),
            (
                Record::new("other", 1, "h", "i", b"x").to_json(),
                "expected engine",
            ),
            (
                Record::new("e", 2, "h", "i", b"x").to_json(),
                "expected engine",
            ),
            (bad_b64.to_json(), "not base64"),
            (bad_len.to_json(), "the record says 4"),
            (vec![0xff, 0xfe], "unreadable"),
        ];
        for (value, want) in cases {
            let err = Record::from_json("/ns/e/rank_1", &value, "e", 1).unwrap_err();
            assert_eq!(err.status, Status::ErrBadRecord);
            assert!(err.message.contains(want), "{} lacks {want}", err.message);
            assert!(err.message.contains("/ns/e/rank_1"));
        }
    }

    /// A record in the wire format 0.1 writes (`tests/fixtures/records/NAME`).
    fn fixture(name: &str) -> Vec<u8> {
        let path = format!(
            "{}/tests/fixtures/records/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// `rec` with the fields `Record::new` takes from the process and clock.
    fn as_written(rec: Record, pid: u32, registered_at_ms: u64) -> Record {
        Record {
            pid,
            registered_at_ms,
            ..rec
        }
    }

    #[test]
    fn records_in_0_1s_wire_format_are_read_and_written_byte_for_byte() {
        // Inline metadata: read by this version, and written the same.
        let v = fixture("inline-0.1.json");
        let (rec, md) = Record::from_json("k", &v, "prefill_engine", 0).unwrap();
        assert_eq!(md, b"nixl\0{\"md\":1");
        assert_eq!((rec.host.as_str(), rec.pid), ("10.0.0.7", 4242));
        let now = Record::new("prefill_engine", 0, "10.0.0.7", "9f2c1e5a7b3d4c6e", &md);
        assert_eq!(as_written(now, 4242, 1764547200000).to_json(), v);

        let v = fixture("world-size-0.1.json");
        let (rec, md) = Record::from_json("k", &v, "prefill_tp4", 3).unwrap();
        assert_eq!(
            (rec.world_size, md.as_slice()),
            (Some(4), &[0, 1, 2, 3, 255][..])
        );
        let mut now = Record::new("prefill_tp4", 3, "gpu-node-12", "0a1b2c3d4e5f6071", &md);
        now.world_size = Some(4);
        assert_eq!(as_written(now, 777, 1764547200123).to_json(), v);

        // Chunked: the reference is read (the chunks are fetched after).
        let v = fixture("chunked-0.1.json");
        let (rec, md) = Record::from_json("k", &v, "big_engine", 1).unwrap();
        assert!(md.is_empty());
        let blob = rec.blob.clone().unwrap();
        assert_eq!((blob.chunks, blob.chunk_size), (3, 1 << 20));
        let now = Record::chunked(
            "big_engine",
            1,
            "gpu-node-3",
            "ffeeddccbbaa9988",
            3_000_000,
            blob,
        );
        assert_eq!(as_written(now, 9001, 1764547201000).to_json(), v);
    }

    #[test]
    fn a_later_writers_optional_field_is_ignored_and_a_later_format_refused_by_name() {
        let mut v: serde_json::Value = serde_json::from_slice(&fixture("inline-0.1.json")).unwrap();
        v["added_later"] = serde_json::json!({"any": [1, 2]});
        let (_, md) =
            Record::from_json("k", &serde_json::to_vec(&v).unwrap(), "prefill_engine", 0).unwrap();
        assert_eq!(md, b"nixl\0{\"md\":1");
        v["format"] = 2.into();
        let err = Record::from_json(
            "/ns/k",
            &serde_json::to_vec(&v).unwrap(),
            "prefill_engine",
            0,
        )
        .unwrap_err();
        assert_eq!(
            err.message,
            "record at key /ns/k is unreadable: format version 2, this library reads version 1; \
             check that every writer under this namespace runs a compatible nixl-etcd"
        );
    }
}
