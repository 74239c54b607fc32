//! Signed records: HMAC-SHA256 under a key shared by every engine of a
//! deployment, so a reader can tell a record written by a holder of the key
//! from one written by anybody else with write access to etcd.
//!
//! * The key comes from a file (`VLLM_NIXL_ETCD_HMAC_KEY_FILE`, option
//!   `hmac_key_file`): its bytes, less one trailing newline, at least
//!   [`MIN_KEY_LEN`] bytes (`openssl rand -base64 32 > key` is a good one).
//! * A previous key (`VLLM_NIXL_ETCD_HMAC_PREVIOUS_KEY_FILE`, option
//!   `hmac_previous_key_file`) is accepted for verification only, so a key
//!   can be rotated without a flag day: roll out "new key + previous = old
//!   key" everywhere, then drop the previous key.
//! * Each key has a key id, a short hash of the key ([`key_id`]), and a
//!   signature says which key made it: `"<key_id>:<base64 HMAC-SHA256>"`.
//! * Verification compares MACs in constant time.
//!
//! # Records
//!
//! [`Signer::seal`] and [`Signer::open`] carry the signature inside a JSON
//! record as its last member, `"sig":"<key_id>:<base64>"`, over exactly the
//! bytes of the record without it, bound to the etcd key (see
//! [`Signer::sign_record`]), so a signed record cannot be replayed under
//! another key and no re-serialization is needed to verify.

use std::fmt;
use std::path::Path;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::config::{self, Config};
use crate::error::{Error, Result};
use crate::secret::Secret;

type HmacSha256 = Hmac<Sha256>;

/// Shortest key accepted, in bytes.
pub const MIN_KEY_LEN: usize = 16;
/// Hex digits of a key id.
pub const KEY_ID_LEN: usize = 8;
/// The member a signed record carries its signature in.
pub const SIG_FIELD: &str = "sig";
/// Domain separation of record signatures (the format can change with it).
const RECORD_CONTEXT: &[u8] = b"nixl-etcd record v1\0";
const KEY_ID_CONTEXT: &[u8] = b"nixl-etcd key id\0";
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Why a signature was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignError {
    /// The record carries no signature.
    Missing,
    /// The signature is not `<key_id>:<base64>` of an HMAC-SHA256.
    Malformed(String),
    /// Signed with a key this reader does not hold.
    UnknownKey { key_id: String, known: Vec<String> },
    /// The key id is known but the MAC does not match: the record was changed
    /// after signing, or signed by a different key with a colliding id.
    WrongSignature { key_id: String },
}

impl fmt::Display for SignError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SignError::Missing => write!(
                f,
                "missing signature: the record is not signed; every writer needs \
                 {} set to the shared key",
                config::ENV_HMAC_KEY_FILE
            ),
            SignError::Malformed(why) => write!(f, "malformed signature: {why}"),
            SignError::UnknownKey { key_id, known } => write!(
                f,
                "unknown key id {key_id}: signed with a key this reader does not hold (it holds \
                 {}); check {} and {} on both sides",
                known.join(", "),
                config::ENV_HMAC_KEY_FILE,
                config::ENV_HMAC_PREVIOUS_KEY_FILE
            ),
            SignError::WrongSignature { key_id } => write!(
                f,
                "wrong signature for key id {key_id}: the record was modified after it was \
                 signed, or signed by someone without the key"
            ),
        }
    }
}

impl std::error::Error for SignError {}

/// The id of `key`: the first [`KEY_ID_LEN`] hex digits of
/// SHA-256("nixl-etcd key id\0" || key). It names the key, and reveals
/// nothing usable about it.
pub fn key_id(key: &[u8]) -> String {
    let digest = Sha256::new()
        .chain_update(KEY_ID_CONTEXT)
        .chain_update(key)
        .finalize();
    digest
        .iter()
        .take(KEY_ID_LEN / 2)
        .map(|b| format!("{b:02x}"))
        .collect()
}

struct Key {
    id: String,
    secret: Secret,
}

impl Key {
    fn new(secret: Secret, what: &str) -> std::result::Result<Key, String> {
        if secret.len() < MIN_KEY_LEN {
            return Err(format!(
                "{what} is too short ({} bytes); use at least {MIN_KEY_LEN} random bytes, \
                 32 recommended (openssl rand -base64 32)",
                secret.len()
            ));
        }
        Ok(Key {
            id: key_id(secret.expose()),
            secret,
        })
    }

    fn mac(&self, parts: &[&[u8]]) -> HmacSha256 {
        // HMAC takes keys of any length.
        let mut mac = HmacSha256::new_from_slice(self.secret.expose())
            .expect("HMAC accepts keys of any length");
        for p in parts {
            mac.update(p);
        }
        mac
    }
}

/// Signs with the current key; verifies with the current or the previous one.
pub struct Signer {
    current: Key,
    previous: Option<Key>,
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signer")
            .field("key_id", &self.current.id)
            .field("previous_key_id", &self.previous.as_ref().map(|k| &k.id))
            .finish()
    }
}

impl Signer {
    /// From key bytes. Errors name the key ("current"/"previous"), never
    /// its bytes.
    pub fn new(current: Secret, previous: Option<Secret>) -> std::result::Result<Signer, String> {
        let current = Key::new(current, "the HMAC key")?;
        let previous = match previous {
            Some(p) => Some(Key::new(p, "the previous HMAC key")?),
            None => None,
        };
        if let Some(p) = &previous {
            if p.id == current.id {
                return Err(format!(
                    "the previous HMAC key has the same key id as the current one ({}): it is \
                     the same key; drop the previous key, or give the old one",
                    p.id
                ));
            }
        }
        Ok(Signer { current, previous })
    }

    /// From key files (`what`: the settings' names, for errors).
    pub fn load(current: &Path, previous: Option<&Path>) -> Result<Signer> {
        let read = |p: &Path, what: &str| {
            Secret::read_file(p, what).map_err(|e| {
                Error::invalid(format!(
                    "{e}; it must hold the shared HMAC key of the records"
                ))
            })
        };
        let cur = read(current, config::ENV_HMAC_KEY_FILE)?;
        let prev = match previous {
            Some(p) => Some(read(p, config::ENV_HMAC_PREVIOUS_KEY_FILE)?),
            None => None,
        };
        Signer::new(cur, prev).map_err(|e| {
            Error::invalid(format!(
                "{e} ({}={}{})",
                config::ENV_HMAC_KEY_FILE,
                current.display(),
                previous
                    .map(|p| format!(", {}={}", config::ENV_HMAC_PREVIOUS_KEY_FILE, p.display()))
                    .unwrap_or_default()
            ))
        })
    }

    /// The signer the configuration asks for: `None` without a key file; a
    /// previous key without a current one is an error.
    pub fn from_config(cfg: &Config) -> Result<Option<Signer>> {
        match (&cfg.hmac_key_file, &cfg.hmac_previous_key_file) {
            (Some(cur), prev) => Signer::load(cur, prev.as_deref()).map(Some),
            (None, Some(_)) => Err(Error::invalid(format!(
                "{} is set without {}: the previous key only verifies during a rotation; set \
                 the current key too",
                config::ENV_HMAC_PREVIOUS_KEY_FILE,
                config::ENV_HMAC_KEY_FILE
            ))),
            (None, None) => Ok(None),
        }
    }

    /// The current key's id.
    pub fn key_id(&self) -> &str {
        &self.current.id
    }

    /// The previous key's id, if one is configured.
    pub fn previous_key_id(&self) -> Option<&str> {
        self.previous.as_ref().map(|k| k.id.as_str())
    }

    /// `"<key_id>:<base64 HMAC-SHA256(key, bytes)>"` with the current key.
    pub fn sign(&self, bytes: &[u8]) -> String {
        self.sign_parts(&[bytes])
    }

    /// Checks `sig` over `bytes` with whichever configured key it names.
    pub fn verify(&self, bytes: &[u8], sig: Option<&str>) -> std::result::Result<(), SignError> {
        self.verify_parts(&[bytes], sig)
    }

    fn sign_parts(&self, parts: &[&[u8]]) -> String {
        let tag = self.current.mac(parts).finalize().into_bytes();
        format!("{}:{}", self.current.id, B64.encode(tag))
    }

    fn verify_parts(
        &self,
        parts: &[&[u8]],
        sig: Option<&str>,
    ) -> std::result::Result<(), SignError> {
        let sig = sig
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .ok_or(SignError::Missing)?;
        let (id, b64) = sig.split_once(':').ok_or_else(|| {
            SignError::Malformed("expected <key_id>:<base64>, found no ':'".to_owned())
        })?;
        let tag = B64
            .decode(b64)
            .map_err(|e| SignError::Malformed(format!("the MAC is not base64: {e}")))?;
        if tag.len() != 32 {
            return Err(SignError::Malformed(format!(
                "the MAC is {} bytes, an HMAC-SHA256 is 32",
                tag.len()
            )));
        }
        let key = std::iter::once(&self.current)
            .chain(self.previous.as_ref())
            .find(|k| k.id == id)
            .ok_or_else(|| SignError::UnknownKey {
                key_id: id.to_owned(),
                known: std::iter::once(&self.current)
                    .chain(self.previous.as_ref())
                    .map(|k| k.id.clone())
                    .collect(),
            })?;
        // Constant-time comparison (hmac's verify_slice uses `subtle`).
        key.mac(parts)
            .verify_slice(&tag)
            .map_err(|_| SignError::WrongSignature {
                key_id: id.to_owned(),
            })
    }

    /// The signature of a record: over `"nixl-etcd record v1\0" || etcd_key
    /// || "\0" || body`, where `body` is the record's JSON without the
    /// signature member. Binding the key stops a valid record from being
    /// copied under another engine, rank or namespace.
    pub fn sign_record(&self, etcd_key: &str, body: &[u8]) -> String {
        self.sign_parts(&[RECORD_CONTEXT, etcd_key.as_bytes(), b"\0", body])
    }

    /// Checks a signature made by [`sign_record`](Self::sign_record).
    pub fn verify_record(
        &self,
        etcd_key: &str,
        body: &[u8],
        sig: Option<&str>,
    ) -> std::result::Result<(), SignError> {
        self.verify_parts(&[RECORD_CONTEXT, etcd_key.as_bytes(), b"\0", body], sig)
    }

    /// A JSON object `body` (`{...}`) with the signature appended as its last
    /// member: `{...,"sig":"<key_id>:<base64>"}`.
    pub fn seal(&self, etcd_key: &str, body: &[u8]) -> std::result::Result<Vec<u8>, SignError> {
        let inner = object_inner(body).ok_or_else(|| {
            SignError::Malformed("only a JSON object (\"{...}\") can be sealed".to_owned())
        })?;
        let sig = self.sign_record(etcd_key, body.trim_ascii());
        let mut out = Vec::with_capacity(body.len() + sig.len() + 10);
        out.push(b'{');
        out.extend_from_slice(inner);
        if !inner.iter().all(u8::is_ascii_whitespace) {
            out.push(b',');
        }
        out.extend_from_slice(format!("\"{SIG_FIELD}\":\"{sig}\"}}").as_bytes());
        Ok(out)
    }

    /// Splits a value made by [`seal`](Self::seal) into the record without
    /// its signature and checks the signature; returns that record.
    pub fn open(&self, etcd_key: &str, value: &[u8]) -> std::result::Result<Vec<u8>, SignError> {
        let (body, sig) = unseal(value);
        self.verify_record(etcd_key, &body, sig)?;
        Ok(body)
    }
}

/// What is between a JSON object's outer braces.
fn object_inner(body: &[u8]) -> Option<&[u8]> {
    let t = body.trim_ascii();
    (t.len() >= 2 && t[0] == b'{' && t[t.len() - 1] == b'}').then(|| &t[1..t.len() - 1])
}

/// A sealed value's record without the signature, and the signature (None
/// when the value does not end with a `"sig"` member). Inside JSON strings
/// a quote is escaped, so `,"sig":"` can only be a member; and the body is
/// under the MAC, so whatever a forger puts there fails verification.
pub fn unseal(value: &[u8]) -> (Vec<u8>, Option<&str>) {
    let t = value.trim_ascii();
    let marker = format!("\"{SIG_FIELD}\":\"");
    let m = marker.as_bytes();
    let Some(pos) = t.windows(m.len()).rposition(|w| w == m) else {
        return (t.to_vec(), None);
    };
    let rest = &t[pos + m.len()..];
    let Some(sig) = rest
        .strip_suffix(b"\"}")
        .filter(|s| !s.contains(&b'"'))
        .and_then(|s| std::str::from_utf8(s).ok())
    else {
        return (t.to_vec(), None);
    };
    let head = &t[..pos];
    let mut body = match head.strip_suffix(b",") {
        Some(h) => h.to_vec(),
        // `{"sig":...}`: the record was `{}`.
        None => head.to_vec(),
    };
    body.push(b'}');
    (body, Some(sig))
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &[u8] = b"0123456789abcdef0123456789abcdef";
    const K2: &[u8] = b"fedcba9876543210fedcba9876543210";

    fn signer(cur: &[u8], prev: Option<&[u8]>) -> Signer {
        Signer::new(Secret::new(cur), prev.map(Secret::new)).unwrap()
    }

    #[test]
    fn sign_then_verify() {
        let s = signer(K1, None);
        let sig = s.sign(b"hello");
        let (id, b64) = sig.split_once(':').unwrap();
        assert_eq!(id, key_id(K1));
        assert_eq!(id.len(), KEY_ID_LEN);
        assert_eq!(B64.decode(b64).unwrap().len(), 32);
        assert_eq!(s.verify(b"hello", Some(&sig)), Ok(()));
        // Deterministic, and different for other bytes or keys.
        assert_eq!(s.sign(b"hello"), sig);
        assert_ne!(s.sign(b"hellp"), sig);
        assert_ne!(signer(K2, None).sign(b"hello"), sig);
    }

    #[test]
    fn known_answer() {
        // RFC 4231 test case 2: key "Jefe" is too short for a Signer, so the
        // MAC is checked with the same construction directly.
        let mut mac = HmacSha256::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        let hex: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn every_failure_has_its_reason() {
        let s = signer(K1, None);
        let sig = s.sign(b"data");
        assert_eq!(s.verify(b"data", None), Err(SignError::Missing));
        assert_eq!(s.verify(b"data", Some("  ")), Err(SignError::Missing));
        assert!(matches!(
            s.verify(b"data", Some("nocolon")),
            Err(SignError::Malformed(_))
        ));
        assert!(matches!(
            s.verify(b"data", Some(&format!("{}:!!!", key_id(K1)))),
            Err(SignError::Malformed(_))
        ));
        assert!(matches!(
            s.verify(b"data", Some(&format!("{}:AAAA", key_id(K1)))),
            Err(SignError::Malformed(_))
        ));
        assert_eq!(
            s.verify(b"datA", Some(&sig)),
            Err(SignError::WrongSignature { key_id: key_id(K1) })
        );
        let other = signer(K2, None).sign(b"data");
        let err = s.verify(b"data", Some(&other)).unwrap_err();
        assert_eq!(
            err,
            SignError::UnknownKey {
                key_id: key_id(K2),
                known: vec![key_id(K1)]
            }
        );
        assert!(err.to_string().starts_with("unknown key id "), "{err}");
        // A MAC of the right key id but flipped bits.
        let (id, b64) = sig.split_once(':').unwrap();
        let mut tag = B64.decode(b64).unwrap();
        tag[31] ^= 1;
        let forged = format!("{id}:{}", B64.encode(tag));
        assert!(matches!(
            s.verify(b"data", Some(&forged)),
            Err(SignError::WrongSignature { .. })
        ));
    }

    #[test]
    fn rotation_accepts_the_previous_key_for_verification_only() {
        let old = signer(K1, None);
        let rotated = signer(K2, Some(K1));
        let by_old = old.sign(b"rec");
        assert_eq!(rotated.verify(b"rec", Some(&by_old)), Ok(()));
        // Signing uses the new key only.
        let by_new = rotated.sign(b"rec");
        assert!(by_new.starts_with(&key_id(K2)));
        assert_eq!(rotated.key_id(), key_id(K2));
        assert_eq!(rotated.previous_key_id(), Some(key_id(K1).as_str()));
        // A reader not yet rotated does not know the new key.
        assert!(matches!(
            old.verify(b"rec", Some(&by_new)),
            Err(SignError::UnknownKey { .. })
        ));
    }

    #[test]
    fn bad_keys_are_refused_without_showing_them() {
        let e = Signer::new(Secret::new("short-key"), None).unwrap_err();
        assert!(e.contains("too short (9 bytes)"), "{e}");
        assert!(!e.contains("short-key"), "{e}");
        let e = Signer::new(Secret::new(K1), Some(Secret::new(K1))).unwrap_err();
        assert!(e.contains("same key id"), "{e}");
        // Debug shows key ids only.
        let d = format!("{:?}", signer(K2, Some(K1)));
        assert!(
            !d.contains("0123456789abcdef") && !d.contains("fedcba"),
            "{d}"
        );
        assert!(d.contains(&key_id(K2)), "{d}");
    }

    #[test]
    fn key_files_and_config() {
        let dir = tempfile::tempdir().unwrap();
        let cur = dir.path().join("cur");
        let prev = dir.path().join("prev");
        std::fs::write(&cur, [K2, b"\n"].concat()).unwrap();
        std::fs::write(&prev, K1).unwrap();
        let s = Signer::load(&cur, Some(&prev)).unwrap();
        assert_eq!(s.key_id(), key_id(K2));
        assert_eq!(s.previous_key_id(), Some(key_id(K1).as_str()));
        let e = Signer::load(&dir.path().join("none"), None).unwrap_err();
        assert!(
            e.message
                .starts_with("cannot read VLLM_NIXL_ETCD_HMAC_KEY_FILE="),
            "{}",
            e.message
        );
        std::fs::write(&cur, "tiny").unwrap();
        let e = Signer::load(&cur, None).unwrap_err();
        assert!(e.message.contains("too short") && !e.message.contains("tiny"));

        let env = |k: &str| match k {
            "VLLM_NIXL_ETCD_HMAC_PREVIOUS_KEY_FILE" => Some(prev.display().to_string()),
            _ => None,
        };
        let cfg = Config::from_sources(env, None).unwrap();
        let e = Signer::from_config(&cfg).unwrap_err();
        assert!(e
            .message
            .contains("set without VLLM_NIXL_ETCD_HMAC_KEY_FILE"));
        let cfg = Config::from_sources(|_| None, None).unwrap();
        assert!(Signer::from_config(&cfg).unwrap().is_none());
    }

    #[test]
    fn sealed_records_round_trip_and_are_bound_to_their_key() {
        let s = signer(K1, None);
        let body = br#"{"format":1,"engine_id":"e","note":"a \",\"sig\":\"x\"}"}"#;
        let sealed = s.seal("/ns/e/rank_0", body).unwrap();
        let text = std::str::from_utf8(&sealed).unwrap();
        assert!(
            text.ends_with(&format!(
                ",\"sig\":\"{}\"}}",
                s.sign_record("/ns/e/rank_0", body)
            )),
            "{text}"
        );
        // Still one JSON object, with the signature as a member.
        let v: serde_json::Value = serde_json::from_slice(&sealed).unwrap();
        assert!(v["sig"].as_str().unwrap().starts_with(&key_id(K1)));
        assert_eq!(s.open("/ns/e/rank_0", &sealed).unwrap(), body.to_vec());
        // Another key: refused.
        assert!(matches!(
            s.open("/ns/e/rank_1", &sealed),
            Err(SignError::WrongSignature { .. })
        ));
        // Unsigned: missing.
        assert_eq!(s.open("/ns/e/rank_0", body), Err(SignError::Missing));
        // A changed body: wrong signature.
        let tampered = text.replace("\"engine_id\":\"e\"", "\"engine_id\":\"f\"");
        assert!(matches!(
            s.open("/ns/e/rank_0", tampered.as_bytes()),
            Err(SignError::WrongSignature { .. })
        ));
        // The empty object.
        let sealed = s.seal("k", b"{}").unwrap();
        assert!(sealed.starts_with(b"{\"sig\":\""));
        assert_eq!(s.open("k", &sealed).unwrap(), b"{}".to_vec());
        assert!(s.seal("k", b"[1]").is_err());
    }
}
