//! TLS for the test harness: certificates made at test time (rcgen) and a
//! private etcd serving its clients over TLS. Use it beside `common` with
//! `#[path = "common/tls.rs"] mod tls;`.
#![allow(dead_code)]

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::common::{health_ok, READY_POLL, READY_TIMEOUT, START_ATTEMPTS};

/// A certificate authority that signs test certificates.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// A certificate and its key as files.
#[derive(Clone, Debug)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// How a leaf certificate differs from a good one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Leaf {
    /// Valid now, for 127.0.0.1 and localhost.
    Good,
    /// Valid only in 2020.
    Expired,
    /// Valid, but only for the name `etcd.invalid`.
    OtherName,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let key = KeyPair::generate().expect("generate CA key");
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = p.self_signed(&key).expect("self-sign CA");
        Ca { cert, key }
    }

    /// Writes the CA certificate to `dir/name`.
    pub fn write_cert(&self, dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, self.cert.pem()).unwrap();
        p
    }

    /// A leaf certificate for server and client use, written to
    /// `dir/<name>.pem` and `dir/<name>-key.pem`.
    pub fn issue(&self, dir: &Path, name: &str, kind: Leaf) -> CertFiles {
        let names = match kind {
            Leaf::OtherName => vec!["etcd.invalid".to_owned()],
            _ => vec!["localhost".to_owned()],
        };
        let mut p = CertificateParams::new(names).unwrap();
        if kind != Leaf::OtherName {
            p.subject_alt_names
                .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        }
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        if kind == Leaf::Expired {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2020, 12, 31);
        }
        let key = KeyPair::generate().expect("generate leaf key");
        let cert = p.signed_by(&key, &self.cert, &self.key).expect("sign leaf");
        let files = CertFiles {
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}-key.pem")),
        };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        files
    }
}

/// A private single-member etcd whose client port speaks only TLS. Its
/// health is polled on a plaintext metrics port. Dropping it kills etcd.
pub struct TlsEtcd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    pub client_port: u16,
}

impl TlsEtcd {
    /// Starts etcd serving `server` on https://127.0.0.1:P; with
    /// `client_ca`, clients must present a certificate signed by it
    /// (`--client-cert-auth`).
    pub fn start(server: &CertFiles, client_ca: Option<&Path>) -> TlsEtcd {
        let mut last = String::new();
        for _ in 0..START_ATTEMPTS {
            let ports: Vec<u16> = {
                let held: Vec<_> = (0..3)
                    .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
                    .collect();
                held.iter()
                    .map(|l| l.local_addr().unwrap().port())
                    .collect()
            };
            let (client, peer, metrics) = (ports[0], ports[1], ports[2]);
            let dir = tempfile::Builder::new()
                .prefix("nixl-etcd-tls-")
                .tempdir()
                .unwrap();
            let log = dir.path().join("etcd.log");
            let out = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .unwrap();
            let client_url = format!("https://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let mut cmd = Command::new(crate::common::etcd_bin());
            cmd.arg("--name")
                .arg("tls")
                .arg("--data-dir")
                .arg(dir.path().join("data"))
                .arg("--listen-client-urls")
                .arg(&client_url)
                .arg("--advertise-client-urls")
                .arg(&client_url)
                .arg("--listen-peer-urls")
                .arg(&peer_url)
                .arg("--initial-advertise-peer-urls")
                .arg(&peer_url)
                .arg("--initial-cluster")
                .arg(format!("tls={peer_url}"))
                .arg("--listen-metrics-urls")
                .arg(format!("http://127.0.0.1:{metrics}"))
                .arg("--cert-file")
                .arg(&server.cert)
                .arg("--key-file")
                .arg(&server.key);
            if let Some(ca) = client_ca {
                cmd.arg("--client-cert-auth")
                    .arg("--trusted-ca-file")
                    .arg(ca);
            }
            for (key, _) in std::env::vars_os() {
                if key.to_string_lossy().starts_with("ETCD_") {
                    cmd.env_remove(&key);
                }
            }
            cmd.stdin(Stdio::null())
                .stdout(Stdio::from(out.try_clone().unwrap()))
                .stderr(Stdio::from(out));
            let child = cmd.spawn().expect("spawn etcd");
            let mut srv = TlsEtcd {
                child: Some(child),
                dir,
                client_port: client,
            };
            let deadline = Instant::now() + READY_TIMEOUT;
            loop {
                if let Ok(Some(st)) = srv.child.as_mut().unwrap().try_wait() {
                    last = format!(
                        "etcd exited with {st}: {}",
                        crate::common::read_to_string_lossy(&log)
                    );
                    break;
                }
                if health_ok(metrics, Duration::from_millis(500)) {
                    return srv;
                }
                if Instant::now() >= deadline {
                    panic!(
                        "TLS etcd not healthy: {}",
                        crate::common::read_to_string_lossy(&log)
                    );
                }
                thread::sleep(READY_POLL);
            }
            if !last.contains("address already in use") {
                break;
            }
        }
        panic!("TLS etcd failed to start: {last}");
    }

    /// `https://127.0.0.1:P`
    pub fn endpoint(&self) -> String {
        format!("https://127.0.0.1:{}", self.client_port)
    }

    pub fn log(&self) -> String {
        crate::common::read_to_string_lossy(&self.dir.path().join("etcd.log"))
    }
}

impl Drop for TlsEtcd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
