//! Client configuration: the guide's environment variables, overridden key by
//! key by the JSON options given to `nixl_etcd_open`.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::keys;
use crate::nixl_layout;
use crate::secret::Secret;

pub const ENV_USE_ETCD: &str = "VLLM_NIXL_USE_ETCD";
pub const ENV_ENDPOINTS: &str = "VLLM_NIXL_ETCD_ENDPOINTS";
/// NIXL's built-in exchange's variable. Not read: while it is set, NIXL
/// itself writes lease-less keys for every agent the process creates.
pub const ENV_NIXL_ENDPOINTS: &str = "NIXL_ETCD_ENDPOINTS";
pub const ENV_NAMESPACE: &str = "VLLM_NIXL_ETCD_NAMESPACE";
pub const ENV_TIMEOUT: &str = "VLLM_NIXL_ETCD_TIMEOUT";
pub const ENV_LEASE_TTL: &str = "VLLM_NIXL_ETCD_LEASE_TTL";
pub const ENV_HOST: &str = "VLLM_NIXL_SIDE_CHANNEL_HOST";
/// NIXL's own variable for its etcd exchange's namespace, read for the
/// NIXL-native key layout (`nixl_etcd_publish_nixl` and friends).
pub const ENV_NIXL_NAMESPACE: &str = "NIXL_ETCD_NAMESPACE";
/// PEM file of the CA that signed etcd's server certificate (https:// only;
/// the system's roots when unset).
pub const ENV_CA_CERT: &str = "VLLM_NIXL_ETCD_CA_CERT";
/// PEM client certificate for mutual TLS (with [`ENV_KEY`]).
pub const ENV_CERT: &str = "VLLM_NIXL_ETCD_CERT";
/// PEM private key of the client certificate.
pub const ENV_KEY: &str = "VLLM_NIXL_ETCD_KEY";
/// etcd user (etcd authentication).
pub const ENV_USERNAME: &str = "VLLM_NIXL_ETCD_USERNAME";
/// The etcd user's password.
pub const ENV_PASSWORD: &str = "VLLM_NIXL_ETCD_PASSWORD";
/// A file holding the etcd user's password (instead of [`ENV_PASSWORD`]).
pub const ENV_PASSWORD_FILE: &str = "VLLM_NIXL_ETCD_PASSWORD_FILE";
/// A file holding the shared HMAC key that signs records.
pub const ENV_HMAC_KEY_FILE: &str = "VLLM_NIXL_ETCD_HMAC_KEY_FILE";
/// A file holding the previous HMAC key, accepted for verification only
/// while a key rotation rolls out.
pub const ENV_HMAC_PREVIOUS_KEY_FILE: &str = "VLLM_NIXL_ETCD_HMAC_PREVIOUS_KEY_FILE";

pub const DEFAULT_ENDPOINT: &str = "http://localhost:2379";
pub const DEFAULT_TIMEOUT_S: f64 = 10.0;
/// Records of a crashed process vanish within this many seconds; the lease is
/// renewed every third of it, so an etcd blip shorter than about 2/3 of it
/// costs nothing.
pub const DEFAULT_LEASE_TTL_S: i64 = 10;
/// etcd's default `--max-request-bytes` (1.5 MiB).
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 1536 * 1024;
/// An engine no client of the process read for this long is dropped from
/// the cache, with its watch (option `cache_idle_s`; 0 keeps every engine).
pub const DEFAULT_CACHE_IDLE_S: u64 = 300;
const MAX_TIMEOUT_S: f64 = 86_400.0;
const MAX_LEASE_TTL_S: i64 = 86_400;
const MAX_WORLD_SIZE: u64 = 65_536;

/// Everything a client needs to know, after validation. Its `Debug` output
/// never shows a secret: the password is a [`Secret`], and key files are
/// held as paths only.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Normalized to `http://host:port`.
    pub endpoints: Vec<String>,
    /// Normalized: leading `/`, no trailing `/`.
    pub namespace: String,
    /// Bounds connecting and every call.
    pub timeout: Duration,
    pub lease_ttl_s: i64,
    /// Recorded as the rank's host.
    pub host: String,
    /// The etcd server's request limit; a record must fit below it.
    pub max_request_bytes: usize,
    /// Largest metadata accepted; above what fits in one request it is
    /// stored in chunks (see `blob`).
    pub max_metadata_bytes: usize,
    /// The local engine's number of ranks, recorded in each rank's record so
    /// peers can wait for the whole engine.
    pub world_size: Option<u32>,
    /// Namespace of the NIXL-native key layout, used verbatim (NIXL does not
    /// normalize it): option `nixl_namespace`, else `NIXL_ETCD_NAMESPACE`,
    /// else NIXL's default `/nixl/agents/`.
    pub nixl_namespace: String,
    /// CA certificate (PEM) that etcd's server certificate must chain to;
    /// the system's roots when `None`. https:// endpoints only.
    pub ca_cert: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS; always with `key`.
    pub cert: Option<PathBuf>,
    /// Private key (PEM) of `cert`.
    pub key: Option<PathBuf>,
    /// etcd user; always with `password`.
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// How long an engine nobody in the process reads stays cached
    /// (`None`: for the process's life). The first client of a process's
    /// shared cache sets it.
    pub cache_idle: Option<Duration>,
    /// Shared HMAC key that signs records (see [`crate::sign`]).
    pub hmac_key_file: Option<PathBuf>,
    /// The previous HMAC key, for verification only, during a rotation.
    pub hmac_previous_key_file: Option<PathBuf>,
}

/// Every key of `nixl_etcd_open`'s options JSON, with the environment
/// variable it overrides (`None`: an option only). The one list: the unknown
/// key message, the header's doc of `nixl_etcd_open`, the options table of
/// docs/configuration.md and the Python package's `OPTIONS` are checked against it
/// (`tests/integration/single_source.rs`).
pub const OPTIONS: &[(&str, Option<&str>)] = &[
    ("endpoints", Some(ENV_ENDPOINTS)),
    ("namespace", Some(ENV_NAMESPACE)),
    ("timeout_s", Some(ENV_TIMEOUT)),
    ("lease_ttl_s", Some(ENV_LEASE_TTL)),
    ("host", Some(ENV_HOST)),
    ("max_request_bytes", None),
    ("max_metadata_bytes", None),
    ("world_size", None),
    ("nixl_namespace", Some(ENV_NIXL_NAMESPACE)),
    ("ca_cert", Some(ENV_CA_CERT)),
    ("cert", Some(ENV_CERT)),
    ("key", Some(ENV_KEY)),
    ("username", Some(ENV_USERNAME)),
    ("password", Some(ENV_PASSWORD)),
    ("password_file", Some(ENV_PASSWORD_FILE)),
    ("hmac_key_file", Some(ENV_HMAC_KEY_FILE)),
    ("hmac_previous_key_file", Some(ENV_HMAC_PREVIOUS_KEY_FILE)),
    ("cache_idle_s", None),
];

impl Config {
    /// Configuration from the process environment, then `options_json`.
    pub fn load(options_json: Option<&str>) -> Result<Config> {
        Self::from_sources(|k| std::env::var(k).ok(), options_json)
    }

    /// Same as [`Config::load`] with an injectable environment (for tests).
    pub fn from_sources(
        env: impl Fn(&str) -> Option<String>,
        options_json: Option<&str>,
    ) -> Result<Config> {
        let mut cfg = Config::from_env(&env)?;
        if let Some(json) = options_json.filter(|s| !s.trim().is_empty()) {
            cfg.apply_options(json)?;
        }
        cfg.check_security()?;
        Ok(cfg)
    }

    fn from_env(env: &impl Fn(&str) -> Option<String>) -> Result<Config> {
        let var = |k: &str| env(k).filter(|v| !v.trim().is_empty());
        let endpoints = match var(ENV_ENDPOINTS) {
            Some(v) => parse_endpoints(&v, ENV_ENDPOINTS)?,
            None => vec![DEFAULT_ENDPOINT.to_owned()],
        };
        let namespace = keys::normalize_namespace(
            &var(ENV_NAMESPACE).unwrap_or_else(|| keys::DEFAULT_NAMESPACE.to_owned()),
        )?;
        let timeout = match var(ENV_TIMEOUT) {
            Some(v) => parse_timeout(v.trim().parse::<f64>().ok(), ENV_TIMEOUT, &v)?,
            None => Duration::from_secs_f64(DEFAULT_TIMEOUT_S),
        };
        let lease_ttl_s = match var(ENV_LEASE_TTL) {
            Some(v) => parse_ttl(v.trim().parse::<i64>().ok(), ENV_LEASE_TTL, &v)?,
            None => DEFAULT_LEASE_TTL_S,
        };
        let host = match var(ENV_HOST) {
            Some(h) => check_host(h.trim(), ENV_HOST)?,
            None => local_hostname(),
        };
        // Verbatim: only an unset or blank variable means the default.
        let nixl_namespace = match env(ENV_NIXL_NAMESPACE).filter(|v| !v.trim().is_empty()) {
            Some(ns) => {
                nixl_layout::validate_namespace(&ns, ENV_NIXL_NAMESPACE)?;
                ns
            }
            None => nixl_layout::DEFAULT_NIXL_NAMESPACE.to_owned(),
        };
        let path = |k: &str| var(k).map(|v| PathBuf::from(v.trim()));
        let password = match (
            env(ENV_PASSWORD).filter(|v| !v.is_empty()),
            path(ENV_PASSWORD_FILE),
        ) {
            (Some(_), Some(_)) => {
                return Err(Error::invalid(format!(
                    "both {ENV_PASSWORD} and {ENV_PASSWORD_FILE} are set; set only one"
                )))
            }
            (Some(p), None) => Some(Secret::new(p)),
            (None, Some(file)) => Some(read_password_file(&file, ENV_PASSWORD_FILE)?),
            (None, None) => None,
        };
        let username = match var(ENV_USERNAME) {
            Some(u) => Some(check_username(u.trim(), ENV_USERNAME)?),
            None => None,
        };
        Ok(Config {
            endpoints,
            namespace,
            timeout,
            lease_ttl_s,
            host,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            max_metadata_bytes: crate::limits::DEFAULT_MAX_METADATA_BYTES,
            world_size: None,
            nixl_namespace,
            ca_cert: path(ENV_CA_CERT),
            cert: path(ENV_CERT),
            key: path(ENV_KEY),
            username,
            password,
            hmac_key_file: path(ENV_HMAC_KEY_FILE),
            hmac_previous_key_file: path(ENV_HMAC_PREVIOUS_KEY_FILE),
            cache_idle: Some(Duration::from_secs(DEFAULT_CACHE_IDLE_S)),
        })
    }

    /// Whether the endpoints are https:// (all of them: mixing is refused).
    pub fn uses_tls(&self) -> bool {
        self.endpoints.iter().all(|e| e.starts_with("https://"))
    }

    /// Cross-checks of the TLS and authentication settings, once the
    /// environment and the options are both applied.
    fn check_security(&self) -> Result<()> {
        let tls = self
            .endpoints
            .iter()
            .filter(|e| e.starts_with("https://"))
            .count();
        if tls > 0 && tls < self.endpoints.len() {
            return Err(Error::invalid(format!(
                "{ENV_ENDPOINTS} mixes https:// and plaintext endpoints ({}); use https:// for \
                 every endpoint (a plaintext one would carry the same data unencrypted)",
                self.endpoints.join(",")
            )));
        }
        let files = [
            (ENV_CA_CERT, "ca_cert", &self.ca_cert),
            (ENV_CERT, "cert", &self.cert),
            (ENV_KEY, "key", &self.key),
        ];
        if tls == 0 {
            if let Some((env, opt, _)) = files.iter().find(|(_, _, p)| p.is_some()) {
                return Err(Error::invalid(format!(
                    "TLS is configured ({env} / option \"{opt}\") but the endpoints are \
                     plaintext ({}); use https://host:port endpoints (nixl-etcd never sends \
                     over plaintext what was configured for TLS)",
                    self.endpoints.join(",")
                )));
            }
        }
        if self.cert.is_some() != self.key.is_some() {
            return Err(Error::invalid(format!(
                "mutual TLS needs both a client certificate and its key: set both {ENV_CERT} \
                 and {ENV_KEY} (options \"cert\" and \"key\"), or neither"
            )));
        }
        match (&self.username, &self.password) {
            (Some(_), None) => Err(Error::invalid(format!(
                "{ENV_USERNAME} is set but no password: set {ENV_PASSWORD} or \
                 {ENV_PASSWORD_FILE} (options \"password\" or \"password_file\")"
            ))),
            (None, Some(_)) => Err(Error::invalid(format!(
                "a password is set ({ENV_PASSWORD}, {ENV_PASSWORD_FILE} or an option) but no \
                 user: set {ENV_USERNAME} (option \"username\")"
            ))),
            _ => Ok(()),
        }
    }

    fn apply_options(&mut self, json: &str) -> Result<()> {
        let value: Value = serde_json::from_str(json).map_err(|e| {
            Error::invalid(format!(
                "options are not valid JSON: {e}; pass a JSON object or NULL"
            ))
        })?;
        let Value::Object(map) = value else {
            return Err(Error::invalid(
                "options must be a JSON object such as {\"endpoints\":\"http://host:2379\"}",
            ));
        };
        // The same conflict the environment refuses: not "the last one wins".
        if map.contains_key("password") && map.contains_key("password_file") {
            return Err(Error::invalid(
                "both options \"password\" and \"password_file\" are given; give only one",
            ));
        }
        for (key, v) in &map {
            self.apply_option(key, v)?;
        }
        Ok(())
    }

    fn apply_option(&mut self, key: &str, v: &Value) -> Result<()> {
        let what = format!("option \"{key}\"");
        match key {
            "endpoints" => {
                self.endpoints = match v {
                    Value::String(s) => parse_endpoints(s, &what)?,
                    Value::Array(items) => {
                        let mut list = Vec::new();
                        for item in items {
                            let s = item.as_str().ok_or_else(|| wrong_type(key, "strings", v))?;
                            list.push(s.to_owned());
                        }
                        parse_endpoints(&list.join(","), &what)?
                    }
                    _ => return Err(wrong_type(key, "a string or an array of strings", v)),
                }
            }
            "namespace" => {
                let s = v.as_str().ok_or_else(|| wrong_type(key, "a string", v))?;
                self.namespace = keys::normalize_namespace(s)?;
            }
            "timeout_s" => {
                self.timeout = parse_timeout(v.as_f64(), &what, &v.to_string())?;
            }
            "lease_ttl_s" => {
                self.lease_ttl_s = parse_ttl(v.as_i64(), &what, &v.to_string())?;
            }
            "cache_idle_s" => {
                let n = v
                    .as_u64()
                    .filter(|n| *n <= MAX_TIMEOUT_S as u64)
                    .ok_or_else(|| {
                        Error::invalid(format!(
                            "{what} must be an integer number of seconds from 0 (keep every \
                         engine) to {MAX_TIMEOUT_S}, got {v}"
                        ))
                    })?;
                self.cache_idle = (n > 0).then(|| Duration::from_secs(n));
            }
            "host" => {
                let s = v.as_str().ok_or_else(|| wrong_type(key, "a string", v))?;
                self.host = check_host(s, &what)?;
            }
            "max_request_bytes" => {
                let n = v
                    .as_u64()
                    .filter(|n| (4096..=(1u64 << 31)).contains(n))
                    .ok_or_else(|| {
                        Error::invalid(format!(
                            "{what} must be an integer number of bytes from 4096 to 2147483648, \
                             got {v}"
                        ))
                    })?;
                self.max_request_bytes = n as usize;
            }
            "max_metadata_bytes" => {
                let max = crate::limits::MAX_METADATA_BYTES_LIMIT as u64;
                let n = v.as_u64().filter(|n| *n <= max).ok_or_else(|| {
                    Error::invalid(format!(
                        "{what} must be an integer number of bytes from 0 to {max}, got {v}"
                    ))
                })?;
                self.max_metadata_bytes = n as usize;
            }
            "world_size" => {
                let n = v
                    .as_u64()
                    .filter(|n| (1..=MAX_WORLD_SIZE).contains(n))
                    .ok_or_else(|| {
                        Error::invalid(format!(
                            "{what} must be an integer number of ranks from 1 to \
                             {MAX_WORLD_SIZE}, got {v}"
                        ))
                    })?;
                self.world_size = Some(n as u32);
            }
            "nixl_namespace" => {
                let s = v.as_str().ok_or_else(|| wrong_type(key, "a string", v))?;
                nixl_layout::validate_namespace(s, &what)?;
                self.nixl_namespace = s.to_owned();
            }
            "ca_cert" | "cert" | "key" | "hmac_key_file" | "hmac_previous_key_file" => {
                let s = v
                    .as_str()
                    .ok_or_else(|| wrong_type(key, "a file path (string)", v))?;
                let p = (!s.trim().is_empty()).then(|| PathBuf::from(s.trim()));
                match key {
                    "ca_cert" => self.ca_cert = p,
                    "cert" => self.cert = p,
                    "key" => self.key = p,
                    "hmac_key_file" => self.hmac_key_file = p,
                    _ => self.hmac_previous_key_file = p,
                }
            }
            "username" => {
                let s = v.as_str().ok_or_else(|| wrong_type(key, "a string", v))?;
                self.username = Some(check_username(s, &what)?);
            }
            "password" => {
                // Never echo the value: a wrong type says only what it is.
                let s = v
                    .as_str()
                    .ok_or_else(|| Error::invalid(format!("option \"{key}\" must be a string")))?;
                self.password = Some(Secret::new(s));
            }
            "password_file" => {
                let s = v
                    .as_str()
                    .ok_or_else(|| wrong_type(key, "a file path (string)", v))?;
                self.password = Some(read_password_file(&PathBuf::from(s.trim()), &what)?);
            }
            _ => {
                return Err(Error::invalid(format!(
                    "unknown option \"{key}\"; known options: {}",
                    OPTIONS
                        .iter()
                        .map(|(k, _)| *k)
                        .collect::<Vec<_>>()
                        .join(", ")
                )))
            }
        }
        Ok(())
    }
}

fn check_username(u: &str, what: &str) -> Result<String> {
    if u.is_empty() || u.len() > 255 || u.chars().any(|c| c.is_control()) {
        return Err(Error::invalid(format!(
            "{what}={u:?} is not an etcd user name"
        )));
    }
    Ok(u.to_owned())
}

fn read_password_file(path: &std::path::Path, what: &str) -> Result<Secret> {
    let s = Secret::read_file(path, what)
        .map_err(|e| Error::invalid(format!("{e}; it must hold the etcd user's password")))?;
    if s.expose_str().is_none() {
        return Err(Error::invalid(format!(
            "{what}={} is not UTF-8 text; etcd passwords are text",
            path.display()
        )));
    }
    Ok(s)
}

fn wrong_type(key: &str, want: &str, got: &Value) -> Error {
    Error::invalid(format!("option \"{key}\" must be {want}, got {got}"))
}

fn parse_timeout(v: Option<f64>, what: &str, raw: &str) -> Result<Duration> {
    match v {
        // A value so small that it rounds to zero nanoseconds (found by
        // `tests/integration/fuzz_decoders.rs`: 3.2e-52) would time every call out at
        // once, as 0 would: refused like 0.
        Some(s) if s > 0.0 && s <= MAX_TIMEOUT_S && !Duration::from_secs_f64(s).is_zero() => {
            Ok(Duration::from_secs_f64(s))
        }
        _ => Err(Error::invalid(format!(
            "{what}={raw} is not a timeout; give a number of seconds above 0 and at most \
             {MAX_TIMEOUT_S}"
        ))),
    }
}

fn parse_ttl(v: Option<i64>, what: &str, raw: &str) -> Result<i64> {
    match v {
        Some(s) if (1..=MAX_LEASE_TTL_S).contains(&s) => Ok(s),
        _ => Err(Error::invalid(format!(
            "{what}={raw} is not a lease TTL; give a whole number of seconds from 1 to \
             {MAX_LEASE_TTL_S}"
        ))),
    }
}

fn check_host(h: &str, what: &str) -> Result<String> {
    if h.is_empty() || h.len() > 255 || h.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(Error::invalid(format!(
            "{what}={h:?} is not a host name or address"
        )));
    }
    Ok(h.to_owned())
}

/// Parses a comma-separated endpoint list: `http://host:port`, `host:port`
/// (plaintext) or `https://host:port` (TLS).
pub fn parse_endpoints(raw: &str, what: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for item in raw.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let bad = |why: &str| {
            Err(Error::invalid(format!(
                "{what}: endpoint {item:?} {why}; expected http://host:port, https://host:port or \
                 host:port, comma-separated"
            )))
        };
        let (scheme, hostport) = match item.split_once("://") {
            Some((scheme @ ("http" | "https"), rest)) => (scheme, rest),
            Some((scheme, _)) => return bad(&format!("has unsupported scheme {scheme:?}")),
            None => ("http", item),
        };
        let hostport = hostport.trim_end_matches('/');
        let Some((host, port)) = hostport.rsplit_once(':') else {
            return bad("has no port");
        };
        if host.is_empty() || host.contains('/') || host.chars().any(|c| c.is_whitespace()) {
            return bad("has no valid host");
        }
        if port.parse::<u16>().map(|p| p == 0).unwrap_or(true) {
            return bad("has no valid port");
        }
        out.push(format!("{scheme}://{host}:{port}"));
    }
    if out.is_empty() {
        return Err(Error::invalid(format!(
            "{what} is empty; give at least one endpoint such as http://localhost:2379"
        )));
    }
    Ok(out)
}

/// The machine's host name, or "localhost" if it cannot be read.
fn local_hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates
    // when the name fits, and we stop at the first NUL or the buffer's end.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    match std::str::from_utf8(&buf[..end]) {
        Ok(h) if rc == 0 && !h.is_empty() => h.to_owned(),
        _ => "localhost".to_owned(),
    }
}

/// `VLLM_NIXL_USE_ETCD`: 1/true/yes/on (any case) enables.
pub fn etcd_enabled_from(value: Option<&str>) -> bool {
    matches!(
        value.map(|v| v.trim().to_ascii_lowercase()).as_deref(),
        Some("1" | "true" | "yes" | "on")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn load(env: &[(&str, &str)], opts: Option<&str>) -> Result<Config> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_sources(|k| env.get(k).cloned(), opts)
    }

    #[test]
    fn defaults_follow_the_guide() {
        let c = load(&[], None).unwrap();
        assert_eq!(c.endpoints, vec!["http://localhost:2379"]);
        assert_eq!(c.namespace, "/vllm/nixl/agents");
        assert_eq!(c.timeout, Duration::from_secs(10));
        assert_eq!(c.lease_ttl_s, DEFAULT_LEASE_TTL_S);
        assert_eq!(c.max_request_bytes, 1_572_864);
        assert!(!c.host.is_empty());
        assert_eq!(c.nixl_namespace, "/nixl/agents/");
    }

    #[test]
    fn nixl_endpoints_are_not_read() {
        let c = load(&[(ENV_NIXL_ENDPOINTS, "nixl-etcd:2379")], None).unwrap();
        assert_eq!(c.endpoints, vec![DEFAULT_ENDPOINT]);
    }

    #[test]
    fn environment_is_read() {
        let c = load(
            &[
                (ENV_ENDPOINTS, "http://etcd1:2379, etcd2:2380,"),
                (ENV_NAMESPACE, "/vllm/dev/nixl/agents/"),
                (ENV_TIMEOUT, "2.5"),
                (ENV_LEASE_TTL, "4"),
                (ENV_HOST, "node1.example.com"),
            ],
            None,
        )
        .unwrap();
        assert_eq!(c.endpoints, vec!["http://etcd1:2379", "http://etcd2:2380"]);
        assert_eq!(c.namespace, "/vllm/dev/nixl/agents");
        assert_eq!(c.timeout, Duration::from_millis(2500));
        assert_eq!(c.lease_ttl_s, 4);
        assert_eq!(c.host, "node1.example.com");
    }

    #[test]
    fn options_override_the_environment_key_by_key() {
        let c = load(
            &[(ENV_ENDPOINTS, "a:1"), (ENV_TIMEOUT, "3")],
            Some(r#"{"endpoints":["b:2","http://c:3"],"lease_ttl_s":5,"host":"h","namespace":"x/y","max_request_bytes":65536,"world_size":8}"#),
        )
        .unwrap();
        assert_eq!(c.endpoints, vec!["http://b:2", "http://c:3"]);
        assert_eq!(c.timeout, Duration::from_secs(3));
        assert_eq!(c.lease_ttl_s, 5);
        assert_eq!(c.host, "h");
        assert_eq!(c.namespace, "/x/y");
        assert_eq!(c.max_request_bytes, 65536);
        assert_eq!(c.world_size, Some(8));
        assert_eq!(load(&[], Some("  ")).unwrap(), load(&[], None).unwrap());
    }

    #[test]
    fn bad_values_are_clear_errors() {
        type Case<'a> = (&'a [(&'a str, &'a str)], Option<&'a str>, &'a str);
        let cases: &[Case] = &[
            (&[(ENV_TIMEOUT, "ten")], None, "VLLM_NIXL_ETCD_TIMEOUT=ten"),
            (&[(ENV_TIMEOUT, "0")], None, "VLLM_NIXL_ETCD_TIMEOUT=0"),
            (&[(ENV_TIMEOUT, "-1")], None, "VLLM_NIXL_ETCD_TIMEOUT"),
            (
                &[(ENV_LEASE_TTL, "1.5")],
                None,
                "VLLM_NIXL_ETCD_LEASE_TTL=1.5",
            ),
            (&[(ENV_LEASE_TTL, "0")], None, "VLLM_NIXL_ETCD_LEASE_TTL"),
            (&[(ENV_ENDPOINTS, "localhost")], None, "has no port"),
            (&[(ENV_ENDPOINTS, "grpc://a:1")], None, "unsupported scheme"),
            (
                &[(ENV_ENDPOINTS, "https://a:1,http://b:2")],
                None,
                "mixes https:// and plaintext",
            ),
            (
                &[(ENV_CA_CERT, "/ca.pem")],
                None,
                "TLS is configured (VLLM_NIXL_ETCD_CA_CERT",
            ),
            (
                &[(ENV_ENDPOINTS, "https://a:1"), (ENV_CERT, "/c.pem")],
                None,
                "needs both a client certificate and its key",
            ),
            (&[(ENV_USERNAME, "u")], None, "no password"),
            (&[(ENV_PASSWORD, "pw")], None, "no user"),
            (
                &[
                    (ENV_USERNAME, "u"),
                    (ENV_PASSWORD, "pw"),
                    (ENV_PASSWORD_FILE, "/pw"),
                ],
                None,
                "set only one",
            ),
            (
                &[(ENV_USERNAME, "u")],
                Some(r#"{"password": "pw", "password_file": "/pw"}"#),
                "both options \"password\" and \"password_file\" are given; give only one",
            ),
            (
                &[(ENV_USERNAME, "u"), (ENV_PASSWORD_FILE, "/nonexistent/pw")],
                None,
                "cannot read VLLM_NIXL_ETCD_PASSWORD_FILE=/nonexistent/pw",
            ),
            (&[], Some(r#"{"ca_cert":1}"#), "option \"ca_cert\""),
            (&[(ENV_ENDPOINTS, "a:99999")], None, "no valid port"),
            (&[(ENV_ENDPOINTS, " , ")], None, "is empty"),
            (
                &[(ENV_NAMESPACE, "/a/../b")],
                None,
                "VLLM_NIXL_ETCD_NAMESPACE",
            ),
            (&[], Some(r#"{"bogus":1}"#), "unknown option \"bogus\""),
            (&[], Some(r#"{"timeout_s":"5"}"#), "option \"timeout_s\""),
            (
                &[],
                Some(r#"{"lease_ttl_s":2.5}"#),
                "option \"lease_ttl_s\"",
            ),
            (
                &[],
                Some(r#"{"endpoints":5}"#),
                "option \"endpoints\" must be",
            ),
            (
                &[],
                Some(r#"{"endpoints":[1]}"#),
                "option \"endpoints\" must be",
            ),
            (&[], Some(r#"{"host":"a b"}"#), "option \"host\""),
            (&[], Some(r#"{"namespace":7}"#), "option \"namespace\""),
            (
                &[],
                Some(r#"{"max_request_bytes":10}"#),
                "option \"max_request_bytes\"",
            ),
            (&[], Some(r#"{"world_size":0}"#), "option \"world_size\""),
            (
                &[],
                Some(r#"{"nixl_namespace":""}"#),
                "option \"nixl_namespace\"",
            ),
            (
                &[],
                Some(r#"{"nixl_namespace":"/a\nb"}"#),
                "control character",
            ),
            (
                &[],
                Some(r#"{"nixl_namespace":5}"#),
                "option \"nixl_namespace\" must be",
            ),
            (
                &[(ENV_NIXL_NAMESPACE, "/a\tb")],
                None,
                "NIXL_ETCD_NAMESPACE",
            ),
            (&[], Some("[1,2]"), "must be a JSON object"),
            (&[], Some("{"), "not valid JSON"),
        ];
        for (env, opts, want) in cases {
            let err = load(env, *opts).unwrap_err();
            assert_eq!(err.status, crate::Status::ErrInvalidArgument);
            assert!(
                err.message.contains(want),
                "{:?}: {}",
                (env, opts),
                err.message
            );
        }
    }

    #[test]
    fn tls_and_auth_settings() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "from-file-pw\n").unwrap();
        let c = load(
            &[
                (ENV_ENDPOINTS, "https://etcd1:2379,https://etcd2:2379/"),
                (ENV_CA_CERT, "/etc/ca.pem"),
                (ENV_CERT, "/etc/c.pem"),
                (ENV_KEY, "/etc/c.key"),
                (ENV_USERNAME, "alice"),
                (ENV_PASSWORD_FILE, pw.to_str().unwrap()),
                (ENV_HMAC_KEY_FILE, "/etc/hmac"),
            ],
            None,
        )
        .unwrap();
        assert_eq!(
            c.endpoints,
            vec!["https://etcd1:2379", "https://etcd2:2379"]
        );
        assert!(c.uses_tls());
        assert_eq!(
            c.ca_cert.as_deref(),
            Some(std::path::Path::new("/etc/ca.pem"))
        );
        assert_eq!(c.username.as_deref(), Some("alice"));
        assert_eq!(c.password.as_ref().unwrap().expose(), b"from-file-pw");
        assert_eq!(
            c.hmac_key_file.as_deref(),
            Some(std::path::Path::new("/etc/hmac"))
        );
        // The options win, key by key; the password never shows in Debug.
        let c = load(
            &[(ENV_USERNAME, "alice"), (ENV_PASSWORD, "env-pw-123")],
            Some(
                r#"{"endpoints":"https://e:1","ca_cert":"/ca","username":"bob","password":"opt-pw-456","hmac_previous_key_file":"/old"}"#,
            ),
        )
        .unwrap();
        assert_eq!(c.username.as_deref(), Some("bob"));
        assert_eq!(c.password.as_ref().unwrap().expose(), b"opt-pw-456");
        assert_eq!(
            c.hmac_previous_key_file.as_deref(),
            Some(std::path::Path::new("/old"))
        );
        let debug = format!("{c:?}");
        assert!(
            !debug.contains("opt-pw-456") && !debug.contains("env-pw-123"),
            "{debug}"
        );
        assert!(debug.contains("Secret(<redacted>)"), "{debug}");
        // A password of the wrong type is not echoed.
        let e = load(&[], Some(r#"{"password":12345678}"#)).unwrap_err();
        assert!(!e.message.contains("12345678"), "{}", e.message);
    }

    #[test]
    fn the_nixl_namespace_is_verbatim_and_the_option_wins() {
        let c = load(&[(ENV_NIXL_NAMESPACE, "/team/nixl//")], None).unwrap();
        assert_eq!(c.nixl_namespace, "/team/nixl//");
        // NIXL's variable leaves the rank namespace alone, and the reverse.
        assert_eq!(c.namespace, "/vllm/nixl/agents");
        let c = load(&[(ENV_NAMESPACE, "/other")], None).unwrap();
        assert_eq!(c.nixl_namespace, "/nixl/agents/");
        let c = load(
            &[(ENV_NIXL_NAMESPACE, "/from/env")],
            Some(r#"{"nixl_namespace":"mine/"}"#),
        )
        .unwrap();
        assert_eq!(c.nixl_namespace, "mine/");
        let c = load(&[(ENV_NIXL_NAMESPACE, "  ")], None).unwrap();
        assert_eq!(c.nixl_namespace, "/nixl/agents/");
    }

    #[test]
    fn use_etcd_flag() {
        for on in ["1", "true", "TRUE", " yes ", "on"] {
            assert!(etcd_enabled_from(Some(on)), "{on}");
        }
        for off in ["0", "", "false", "no", "2"] {
            assert!(!etcd_enabled_from(Some(off)), "{off}");
        }
        assert!(!etcd_enabled_from(None));
    }
}
