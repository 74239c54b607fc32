//! The etcd connection, built from the configuration: endpoints, TLS (the
//! server verified against a CA, a client certificate for mutual TLS) and
//! etcd credentials.
//!
//! Every file is read and parsed here, before connecting, so a file that is
//! missing or not PEM is an error naming the file. https:// endpoints are
//! always TLS: nothing here can fall back to plaintext.

use std::path::{Path, PathBuf};
use std::time::Duration;

use etcd_client::{Certificate, Identity, TlsOptions};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{self, Config};
use crate::error::{Error, Result};
use crate::etcd_error::{self, Op};
use crate::secret::Secret;

/// TLS material read from the configured files.
#[derive(Clone)]
pub struct TlsMaterial {
    /// The CA file and its PEM; `None`: the system's roots.
    pub ca: Option<(PathBuf, Vec<u8>)>,
    /// Client certificate and key files and their PEM (mutual TLS).
    pub identity: Option<(PathBuf, Vec<u8>, PathBuf, Secret)>,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("ca", &self.ca.as_ref().map(|(p, _)| p))
            .field(
                "identity",
                &self.identity.as_ref().map(|(c, _, k, _)| (c, k)),
            )
            .finish()
    }
}

/// Everything needed to connect, checked.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub endpoints: Vec<String>,
    pub timeout: Duration,
    /// Present exactly when the endpoints are https://.
    pub tls: Option<TlsMaterial>,
    /// etcd user name and password.
    pub user: Option<(String, Secret)>,
}

impl ConnectOptions {
    /// Reads and checks the TLS files and the credentials of `cfg`.
    pub fn from_config(cfg: &Config) -> Result<ConnectOptions> {
        let tls = if cfg.uses_tls() {
            let ca = match &cfg.ca_cert {
                Some(p) => Some((p.clone(), read_certs(p, config::ENV_CA_CERT, "ca_cert")?)),
                None => None,
            };
            let identity = match (&cfg.cert, &cfg.key) {
                (Some(c), Some(k)) => Some((
                    c.clone(),
                    read_certs(c, config::ENV_CERT, "cert")?,
                    k.clone(),
                    read_key(k)?,
                )),
                _ => None,
            };
            Some(TlsMaterial { ca, identity })
        } else {
            None
        };
        let user = match (&cfg.username, &cfg.password) {
            (Some(u), Some(p)) => Some((u.clone(), p.clone())),
            _ => None,
        };
        Ok(ConnectOptions {
            endpoints: cfg.endpoints.clone(),
            timeout: cfg.timeout,
            tls,
            user,
        })
    }

    /// The etcd-client options. The password goes to etcd-client only.
    pub fn etcd_options(&self) -> Result<etcd_client::ConnectOptions> {
        let mut opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(self.timeout)
            .with_keep_alive(Duration::from_secs(5), self.timeout);
        if let Some(tls) = &self.tls {
            let mut t = TlsOptions::new();
            t = match &tls.ca {
                Some((_, pem)) => t.ca_certificate(Certificate::from_pem(pem)),
                None => t.with_native_roots(),
            };
            if let Some((_, cert, _, key)) = &tls.identity {
                t = t.identity(Identity::from_pem(cert, key.expose()));
            }
            opts = opts.with_tls(t);
        }
        if let Some((user, password)) = &self.user {
            let password = password
                .expose_str()
                .ok_or_else(|| Error::invalid("the etcd password is not UTF-8 text"))?;
            // etcd's simple tokens expire (--auth-token-ttl, 5 min by
            // default): a refused token is refreshed with the credentials and
            // the request sent again.
            opts = opts
                .with_user(user.clone(), password.to_owned())
                .with_auto_token_refresh(true);
        }
        Ok(opts)
    }

    /// What is used, for the debug log: files and user name, never content.
    pub fn describe(&self) -> String {
        let mut out = match &self.tls {
            None => "plaintext".to_owned(),
            Some(t) => {
                let mut s = match &t.ca {
                    Some((p, _)) => format!("TLS, server verified against CA {}", p.display()),
                    None => "TLS, server verified against the system's roots".to_owned(),
                };
                if let Some((c, _, _, _)) = &t.identity {
                    s.push_str(&format!(", client certificate {}", c.display()));
                }
                s
            }
        };
        if let Some((u, _)) = &self.user {
            out.push_str(&format!(", etcd user {u:?}"));
        }
        out
    }
}

/// Connects (lazily: the channel opens on the first request; with
/// credentials, that is the authentication, done here). The caller bounds it
/// with the configured timeout.
pub async fn connect(cfg: &Config) -> Result<etcd_client::Client> {
    let opts = ConnectOptions::from_config(cfg)?;
    log::debug!(
        "connecting to {} ({})",
        cfg.endpoints.join(","),
        opts.describe()
    );
    let etcd_opts = opts.etcd_options()?;
    etcd_error::retry_transient(cfg, || {
        etcd_client::Client::connect(&opts.endpoints, Some(etcd_opts.clone()))
    })
    .await
    .map_err(|e| etcd_error::map(e, Op::Connect, cfg))
}

fn read_file(path: &Path, env: &str, opt: &str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| {
        Error::invalid(format!(
            "cannot read {env}={} (option \"{opt}\"): {e}",
            path.display()
        ))
    })
}

/// A PEM file of one or more certificates.
fn read_certs(path: &Path, env: &str, opt: &str) -> Result<Vec<u8>> {
    let pem = read_file(path, env, opt)?;
    let certs: std::result::Result<Vec<CertificateDer>, _> =
        CertificateDer::pem_slice_iter(&pem).collect();
    match certs {
        Ok(c) if !c.is_empty() => Ok(pem),
        Ok(_) => Err(Error::invalid(format!(
            "{env}={} (option \"{opt}\") holds no PEM certificate (no \"-----BEGIN \
             CERTIFICATE-----\" block)",
            path.display()
        ))),
        Err(e) => Err(Error::invalid(format!(
            "{env}={} (option \"{opt}\") is not a valid PEM certificate file: {e}",
            path.display()
        ))),
    }
}

/// The client certificate's private key (PKCS#8, PKCS#1 or SEC1 PEM). Its
/// bytes never reach a message.
fn read_key(path: &Path) -> Result<Secret> {
    let (env, opt) = (config::ENV_KEY, "key");
    let pem = Secret::new(read_file(path, env, opt)?);
    match PrivateKeyDer::from_pem_slice(pem.expose()) {
        Ok(_) => Ok(pem),
        Err(rustls_pki_types::pem::Error::NoItemsFound) => Err(Error::invalid(format!(
            "{env}={} (option \"{opt}\") holds no PEM private key (no \"-----BEGIN ... \
             PRIVATE KEY-----\" block)",
            path.display()
        ))),
        // The error names a section or base64 problem, never the key bytes.
        Err(e) => Err(Error::invalid(format!(
            "{env}={} (option \"{opt}\") is not a valid PEM private key: {e}",
            path.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cfg(env: &[(&str, &str)]) -> Config {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_sources(|k| env.get(k).cloned(), None).unwrap()
    }

    #[test]
    fn files_are_checked_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let junk = junk.to_str().unwrap();
        let missing = dir.path().join("missing.pem");
        let missing = missing.to_str().unwrap();
        let tls = ("VLLM_NIXL_ETCD_ENDPOINTS", "https://127.0.0.1:2379");
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[tls, ("VLLM_NIXL_ETCD_CA_CERT", missing)],
                "cannot read VLLM_NIXL_ETCD_CA_CERT=",
            ),
            (
                &[tls, ("VLLM_NIXL_ETCD_CA_CERT", junk)],
                "holds no PEM certificate",
            ),
            (
                &[
                    tls,
                    ("VLLM_NIXL_ETCD_CERT", junk),
                    ("VLLM_NIXL_ETCD_KEY", junk),
                ],
                "VLLM_NIXL_ETCD_CERT=",
            ),
        ];
        for (env, want) in cases {
            let e = ConnectOptions::from_config(&cfg(env)).unwrap_err();
            assert!(e.message.contains(want), "{env:?}: {}", e.message);
        }
    }

    #[test]
    fn plaintext_has_no_tls_and_debug_hides_the_password() {
        let o = ConnectOptions::from_config(&cfg(&[
            ("VLLM_NIXL_ETCD_USERNAME", "u"),
            ("VLLM_NIXL_ETCD_PASSWORD", "very-secret-pw"),
        ]))
        .unwrap();
        assert!(o.tls.is_none());
        assert!(!format!("{o:?}").contains("very-secret-pw"));
        assert!(!o.describe().contains("very-secret-pw"));
        assert!(o.describe().contains("etcd user \"u\""), "{}", o.describe());
    }
}
