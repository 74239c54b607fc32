//! Property-based fuzzing (proptest) of everything that parses input the
//! library does not control: the record decoder (values read from etcd),
//! the options parser and the environment (`Config::from_sources`), engine
//! ids and namespaces, and the tensor-parallel mapping. Each property feeds
//! arbitrary bytes or strings, or structured near-misses, and asserts: no
//! panic, and every error carries its status and a message.
//!
//! Bounded for CI: `PROPTEST_CASES` (default 5,000 per property; a few
//! seconds in all). For a longer local run: `PROPTEST_CASES=200000 cargo test
//! --release --test integration fuzz_decoders::`.

use std::collections::HashMap;

use nixl_etcd::{keys, tp, Config, Record, Status};
use proptest::prelude::*;
use serde_json::{json, Value};

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000)
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: cases(),
        max_shrink_iters: 2000,
        // A failure prints its minimal input; worth keeping ones go to
        // `known_hard_inputs` below.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Text that looks like JSON often enough to get past the first byte.
fn jsonish() -> impl Strategy<Value = String> {
    prop_oneof![
        "[{}\\[\\]\":,0-9a-z_ .\\-eE+\\\\/]{0,200}",
        "\\{(\"[a-z_]{0,12}\":[-0-9.eE\"a-z\\[\\]{},]{0,20},?){0,8}\\}",
        any::<String>(),
    ]
}

/// Any JSON value, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        any::<String>().prop_map(Value::from),
        "[A-Za-z0-9+/=!]{0,40}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::hash_map("[a-z_]{1,10}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A valid record of ("e", 3), with some fields replaced by arbitrary
/// values, some removed, and maybe an extra one.
fn near_record() -> impl Strategy<Value = Vec<u8>> {
    const FIELDS: [&str; 11] = [
        "format",
        "engine_id",
        "rank",
        "host",
        "pid",
        "incarnation",
        "registered_at_ms",
        "world_size",
        "metadata_len",
        "metadata",
        "blob",
    ];
    (
        prop::collection::vec((0..FIELDS.len(), json_value()), 0..4),
        prop::collection::vec(0..FIELDS.len(), 0..3),
        prop::option::of(("[a-z_]{1,10}", json_value())),
    )
        .prop_map(|(replace, remove, extra)| {
            let rec = Record::new("e", 3, "node1", "0123456789abcdef", b"some\0metadata");
            let mut v: Value = serde_json::from_slice(&rec.to_json()).unwrap();
            for (i, val) in replace {
                v[FIELDS[i]] = val;
            }
            for i in remove {
                v.as_object_mut().unwrap().remove(FIELDS[i]);
            }
            if let Some((k, val)) = extra {
                v[k] = val;
            }
            serde_json::to_vec(&v).unwrap()
        })
}

const KEY: &str = "/ns/e/rank_3";

fn check_decode(value: &[u8]) -> Result<(), TestCaseError> {
    match Record::from_json(KEY, value, "e", 3) {
        Ok((rec, md)) => {
            // Whatever it accepts is a record of ("e", 3) whose metadata has
            // the length it declares.
            prop_assert_eq!(rec.engine_id.as_str(), "e");
            prop_assert_eq!(rec.rank, 3);
            match &rec.blob {
                // Chunked: the chunks are read later; the claim is bounded.
                Some(b) => {
                    prop_assert!(md.is_empty());
                    prop_assert!(rec.metadata_len <= nixl_etcd::blob::MAX_METADATA_BYTES_LIMIT);
                    prop_assert_eq!(b.chunks as usize, rec.metadata_len.div_ceil(b.chunk_size));
                }
                None => prop_assert_eq!(rec.metadata_len, md.len()),
            }
            prop_assert_eq!(rec.format, nixl_etcd::record::FORMAT_VERSION);
        }
        Err(e) => {
            prop_assert_eq!(e.status, Status::ErrBadRecord, "{}", e.message);
            prop_assert!(e.message.contains(KEY), "{}", e.message);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn record_decoder_takes_arbitrary_bytes(value in prop::collection::vec(any::<u8>(), 0..2048)) {
        check_decode(&value)?;
    }

    #[test]
    fn record_decoder_takes_arbitrary_jsonish_text(value in jsonish()) {
        check_decode(value.as_bytes())?;
    }

    #[test]
    fn record_decoder_takes_near_miss_records(value in near_record()) {
        check_decode(&value)?;
    }

    #[test]
    fn chunk_assembly_takes_arbitrary_chunks_and_claims(
        chunks in prop::collection::vec((0u32..6, prop::collection::vec(any::<u8>(), 0..64)), 0..8),
        claimed_chunks in 0u32..8,
        chunk_size in 0usize..80,
        metadata_len in 0usize..600,
        honest in any::<bool>(),
    ) {
        let prefix = "/ns.blobs/e/rank_3/g/";
        let read: Vec<(Vec<u8>, Vec<u8>)> = chunks
            .iter()
            .map(|(i, v)| (format!("{prefix}{i:06}").into_bytes(), v.clone()))
            .collect();
        let joined: Vec<u8> = read.iter().flat_map(|(_, v)| v.clone()).collect();
        let blob = nixl_etcd::blob::BlobRef {
            generation: "g".into(),
            chunks: claimed_chunks,
            chunk_size,
            sha256: if honest { nixl_etcd::blob::sha256_hex(&joined) } else { "0".repeat(64) },
        };
        match nixl_etcd::blob::assemble(KEY, prefix, &blob, metadata_len, &read) {
            // Accepted only when everything the record claims holds.
            Ok(md) => {
                prop_assert_eq!(&md, &joined);
                prop_assert_eq!(md.len(), metadata_len);
                prop_assert_eq!(read.len(), claimed_chunks as usize);
                prop_assert!(honest);
            }
            Err(e) => {
                prop_assert_eq!(e.status, Status::ErrBadRecord);
                prop_assert!(e.message.contains(KEY), "{}", e.message);
            }
        }
    }

    #[test]
    fn records_round_trip(
        engine in "[a-zA-Z0-9_:-]{1,40}",
        rank in any::<u32>(),
        host in any::<String>(),
        metadata in prop::collection::vec(any::<u8>(), 0..4096),
        world_size in prop::option::of(1u32..=65_536),
    ) {
        prop_assume!(keys::validate_engine_id(&engine).is_ok());
        let mut rec = Record::new(&engine, rank, &host, "0123456789abcdef", &metadata);
        rec.world_size = world_size;
        let json = rec.to_json();
        prop_assert!(json.len() <= Record::encoded_size_bound(metadata.len(), &engine, &host) + 16,
            "{} > bound {}", json.len(), Record::encoded_size_bound(metadata.len(), &engine, &host));
        let key = keys::rank_key("/ns", &engine, rank);
        let (back, md) = Record::from_json(&key, &json, &engine, rank).map_err(|e| TestCaseError::fail(e.message))?;
        prop_assert_eq!(md, metadata);
        prop_assert_eq!(back, Record { metadata: String::new(), ..rec });
    }

    #[test]
    fn options_parser_takes_arbitrary_text(options in jsonish()) {
        let env = |_: &str| None;
        if let Err(e) = Config::from_sources(env, Some(&options)) {
            prop_assert_eq!(e.status, Status::ErrInvalidArgument, "{}", e.message);
            prop_assert!(!e.message.is_empty());
        }
    }

    #[test]
    fn options_parser_takes_any_value_for_every_key(
        entries in prop::collection::vec((prop_oneof![
            Just("endpoints"), Just("namespace"), Just("timeout_s"), Just("lease_ttl_s"),
            Just("host"), Just("max_request_bytes"), Just("world_size"), Just("nixl_namespace"),
            Just("unknown"),
        ], json_value()), 0..6),
    ) {
        let obj: serde_json::Map<String, Value> =
            entries.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        let text = Value::Object(obj.clone()).to_string();
        match Config::from_sources(|_: &str| None, Some(&text)) {
            Ok(cfg) => {
                // What it accepts is within the documented bounds.
                prop_assert!(!obj.contains_key("unknown"));
                prop_assert!(!cfg.endpoints.is_empty());
                prop_assert!(cfg.endpoints.iter().all(|e| e.starts_with("http://")));
                prop_assert!(cfg.namespace.starts_with('/') && !cfg.namespace.ends_with('/'));
                prop_assert!(cfg.timeout.as_secs_f64() > 0.0 && cfg.timeout.as_secs_f64() <= 86_400.0);
                prop_assert!((1..=86_400).contains(&cfg.lease_ttl_s));
                prop_assert!(cfg.world_size.is_none_or(|w| (1..=65_536).contains(&w)));
                prop_assert!((4096..=1usize << 31).contains(&cfg.max_request_bytes));
            }
            Err(e) => {
                prop_assert_eq!(e.status, Status::ErrInvalidArgument, "{}", e.message);
                prop_assert!(!e.message.is_empty());
            }
        }
    }

    #[test]
    fn environment_takes_arbitrary_values(
        vars in prop::collection::hash_map(prop_oneof![
            Just("VLLM_NIXL_ETCD_ENDPOINTS"), Just("VLLM_NIXL_ETCD_NAMESPACE"),
            Just("VLLM_NIXL_ETCD_TIMEOUT"), Just("VLLM_NIXL_ETCD_LEASE_TTL"),
            Just("VLLM_NIXL_SIDE_CHANNEL_HOST"), Just("NIXL_ETCD_NAMESPACE"),
        ], any::<String>(), 0..6),
        options in prop::option::of(jsonish()),
    ) {
        let env: HashMap<&str, String> = vars;
        let r = Config::from_sources(|k| env.get(k).cloned(), options.as_deref());
        if let Err(e) = r {
            prop_assert_eq!(e.status, Status::ErrInvalidArgument, "{}", e.message);
            prop_assert!(!e.message.is_empty());
        }
    }

    #[test]
    fn engine_ids_that_pass_stay_in_their_key(id in any::<String>(), rank in any::<u32>()) {
        match keys::validate_engine_id(&id) {
            Ok(()) => {
                prop_assert!(!id.contains('/') && !id.contains("..") && !id.is_empty() && id.len() <= 200);
                let key = keys::rank_key("/ns", &id, rank);
                prop_assert_eq!(keys::parse_rank_key("/ns", &key), Some((id.as_str(), rank)));
            }
            Err(e) => prop_assert_eq!(e.status, Status::ErrInvalidArgument),
        }
    }

    #[test]
    fn namespaces_normalize_or_fail(ns in any::<String>()) {
        if let Ok(n) = keys::normalize_namespace(&ns) {
            prop_assert!(n.starts_with('/') && !n.ends_with('/') && !n.contains("//"), "{n:?}");
            prop_assert!(!n.split('/').any(|s| s == "." || s == ".."), "{n:?}");
            prop_assert_eq!(keys::normalize_namespace(&n).ok(), Some(n.clone()));
        }
    }

    #[test]
    fn target_ranks_never_panics_nor_explodes(l in any::<u32>(), r in any::<u32>(), rt in any::<u32>()) {
        match tp::target_ranks(l, r, rt) {
            Ok(v) => {
                prop_assert!(!v.is_empty() && v.len() <= tp::MAX_TP as usize);
                prop_assert!(v.iter().all(|&x| x < rt));
            }
            Err(e) => prop_assert_eq!(e.status, Status::ErrInvalidArgument),
        }
    }

    #[test]
    fn target_ranks_small_sizes_cover_the_remote(base in 1u32..=16, k in 1u32..=8, up in any::<bool>()) {
        let (l, rt) = if up { (base, base * k) } else { (base * k, base) };
        let mut all: Vec<u32> = (0..l).flat_map(|r| tp::target_ranks(l, r, rt).unwrap()).collect();
        all.sort_unstable();
        all.dedup();
        prop_assert_eq!(all, (0..rt).collect::<Vec<_>>());
    }
}

/// Inputs found worth keeping, run every time.
#[test]
fn known_hard_inputs() {
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    for v in [
        &b""[..],
        b"\xff",
        b"{\"format\":1e999}",
        b"{\"format\":-0}",
        b"{\"format\":1,\"metadata_len\":18446744073709551615}",
        deep.as_bytes(),
    ] {
        check_decode(v).unwrap();
    }
    let r = Config::from_sources(|_| None, Some(&deep));
    assert_eq!(r.unwrap_err().status, Status::ErrInvalidArgument);
    for t in [f64::MAX, 3.2468362717509925e-52, 1e-10, f64::MIN_POSITIVE] {
        let r = Config::from_sources(|_| None, Some(&json!({ "timeout_s": t }).to_string()));
        assert_eq!(r.unwrap_err().status, Status::ErrInvalidArgument, "{t}");
    }
    let env = |k: &str| (k == "VLLM_NIXL_ETCD_TIMEOUT").then(|| "1e-300".to_owned());
    assert_eq!(
        Config::from_sources(env, None).unwrap_err().status,
        Status::ErrInvalidArgument
    );
}
