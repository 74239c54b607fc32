//! Security against a real etcd: TLS (server verification, mutual TLS, every
//! certificate failure named), etcd authentication (roles per namespace,
//! permission errors naming the key, wrong password, token refresh past its
//! TTL), and secrets kept out of logs, messages and `Debug`.
//!
//! Certificates are made at test time (rcgen). Every etcd is private, on
//! free loopback ports.

mod capi;
mod common;
#[path = "common/tls.rs"]
mod tls;

use std::path::Path;
use std::sync::{Mutex, Once};
use std::time::Duration;

use common::{etcdctl_ok, unique_namespace, EtcdServer};
use nixl_etcd::ffi::*;
use tls::{Ca, Leaf, TlsEtcd};

/// Every log line of this test process, at every level.
static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct Capture;
impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, record: &log::Record) {
        LINES
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(format!(
                "{} {}: {}",
                record.level(),
                record.target(),
                record.args()
            ));
    }
    fn flush(&self) {}
}

/// Installs the capturing logger before any client is opened in this
/// process (so the library's own logger stays out), at TRACE.
fn setup() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        log::set_logger(&Capture).expect("no logger installed before");
        log::set_max_level(log::LevelFilter::Trace);
    });
}

fn opts(endpoint: &str, ns: &str, extra: &str) -> String {
    let mut s = format!("{{\"endpoints\":\"{endpoint}\",\"namespace\":\"{ns}\",\"timeout_s\":5");
    if !extra.is_empty() {
        s.push(',');
        s.push_str(extra);
    }
    s.push('}');
    s
}

fn p(path: &Path) -> String {
    path.display().to_string()
}

/// Register, look up, wait and close over an open client.
fn exercise(c: capi::Handle, engine: &str) {
    c.register(engine, 0, b"\x00md-0\xff").unwrap();
    assert_eq!(c.lookup(engine, 0).unwrap(), b"\x00md-0\xff");
    c.register(engine, 1, b"md-1").unwrap();
    assert_eq!(c.wait(engine, 1, 5000).unwrap(), b"md-1");
    c.close().unwrap();
}

// ---------------------------------------------------------------- TLS

#[test]
fn tls_server_verified_against_the_ca() {
    setup();
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("nixl-etcd test CA");
    let ca_file = ca.write_cert(dir.path(), "ca.pem");
    let server = ca.issue(dir.path(), "server", Leaf::Good);
    let etcd = TlsEtcd::start(&server, None);
    let ns = unique_namespace("tls");
    let c = capi::open(&opts(
        &etcd.endpoint(),
        &ns,
        &format!("\"ca_cert\":\"{}\"", p(&ca_file)),
    ))
    .unwrap_or_else(|f| panic!("{f:?}\n{}", etcd.log()));
    exercise(c, "prefill_engine");
}

#[test]
fn mutual_tls_works_with_a_client_certificate_and_fails_clearly_without() {
    setup();
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("nixl-etcd test CA");
    let ca_file = ca.write_cert(dir.path(), "ca.pem");
    let server = ca.issue(dir.path(), "server", Leaf::Good);
    let client = ca.issue(dir.path(), "client", Leaf::Good);
    let etcd = TlsEtcd::start(&server, Some(&ca_file));
    let ns = unique_namespace("mtls");
    let with_cert = format!(
        "\"ca_cert\":\"{}\",\"cert\":\"{}\",\"key\":\"{}\"",
        p(&ca_file),
        p(&client.cert),
        p(&client.key)
    );
    let c = capi::open(&opts(&etcd.endpoint(), &ns, &with_cert))
        .unwrap_or_else(|f| panic!("{f:?}\n{}", etcd.log()));
    exercise(c, "decode_engine");

    let f = capi::open(&opts(
        &etcd.endpoint(),
        &ns,
        &format!("\"ca_cert\":\"{}\"", p(&ca_file)),
    ))
    .unwrap_err();
    eprintln!("without a client certificate: {}", f.message);
    assert_eq!(f.status, NIXL_ETCD_ERR_CONNECTION, "{f:?}");
    assert!(
        f.message.contains("refused the client certificate")
            && f.message.contains("no client certificate"),
        "{f:?}"
    );

    // A client certificate from another CA is refused as well.
    let other = Ca::new("another CA").issue(dir.path(), "stranger", Leaf::Good);
    let f = capi::open(&opts(
        &etcd.endpoint(),
        &ns,
        &format!(
            "\"ca_cert\":\"{}\",\"cert\":\"{}\",\"key\":\"{}\"",
            p(&ca_file),
            p(&other.cert),
            p(&other.key)
        ),
    ))
    .unwrap_err();
    eprintln!("client certificate of another CA: {}", f.message);
    assert_eq!(f.status, NIXL_ETCD_ERR_CONNECTION, "{f:?}");
    assert!(
        f.message.contains("refused the client certificate") && f.message.contains(&p(&other.cert)),
        "{f:?}"
    );
}

#[test]
fn certificate_problems_name_the_check_that_failed() {
    setup();
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("nixl-etcd test CA");
    let ca_file = ca.write_cert(dir.path(), "ca.pem");
    let wrong_ca = Ca::new("wrong CA").write_cert(dir.path(), "wrong-ca.pem");
    let good = TlsEtcd::start(&ca.issue(dir.path(), "good", Leaf::Good), None);
    let expired = TlsEtcd::start(&ca.issue(dir.path(), "expired", Leaf::Expired), None);
    let misnamed = TlsEtcd::start(&ca.issue(dir.path(), "misnamed", Leaf::OtherName), None);
    let ns = unique_namespace("badcert");
    let ca_opt = |f: &Path| format!("\"ca_cert\":\"{}\"", p(f));
    let cases = [
        (&good, ca_opt(&wrong_ca), vec!["unknown CA", "wrong-ca.pem"]),
        (
            &good,
            String::new(),
            vec!["unknown CA", "system's CA roots"],
        ),
        (&expired, ca_opt(&ca_file), vec!["check failed: expired"]),
        (&misnamed, ca_opt(&ca_file), vec!["name mismatch"]),
    ];
    for (etcd, extra, wants) in cases {
        let f = capi::open(&opts(&etcd.endpoint(), &ns, &extra)).unwrap_err();
        eprintln!("{extra}: {}", f.message);
        assert_eq!(f.status, NIXL_ETCD_ERR_CONNECTION, "{f:?}");
        for w in wants {
            assert!(f.message.contains(w), "want {w:?}: {f:?}");
        }
    }
}

#[test]
fn unreadable_or_non_pem_files_are_named() {
    setup();
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "this is not PEM\n").unwrap();
    let missing = dir.path().join("missing.pem");
    let ep = "https://127.0.0.1:1";
    let cases = [
        (
            format!("\"ca_cert\":\"{}\"", p(&missing)),
            format!("cannot read VLLM_NIXL_ETCD_CA_CERT={}", p(&missing)),
        ),
        (
            format!("\"ca_cert\":\"{}\"", p(&junk)),
            format!(
                "VLLM_NIXL_ETCD_CA_CERT={} (option \"ca_cert\") holds no PEM certificate",
                p(&junk)
            ),
        ),
        (
            format!("\"cert\":\"{}\",\"key\":\"{}\"", p(&junk), p(&junk)),
            format!("VLLM_NIXL_ETCD_CERT={}", p(&junk)),
        ),
    ];
    for (extra, want) in cases {
        let f = capi::open(&opts(ep, "/x", &extra)).unwrap_err();
        eprintln!("{extra}: {}", f.message);
        assert_eq!(f.status, NIXL_ETCD_ERR_INVALID_ARGUMENT, "{f:?}");
        assert!(f.message.contains(&want), "want {want:?}: {f:?}");
    }
}

#[test]
fn plaintext_and_tls_mismatches_fail_clearly_and_never_hang() {
    setup();
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("nixl-etcd test CA");
    let ca_file = ca.write_cert(dir.path(), "ca.pem");
    let etcd = TlsEtcd::start(&ca.issue(dir.path(), "server", Leaf::Good), None);
    let plain = EtcdServer::start();
    let ns = unique_namespace("mismatch");

    // A plaintext client against the TLS server: an error within the timeout.
    let http = format!("http://127.0.0.1:{}", etcd.client_port);
    let f = capi::open(&opts(&http, &ns, "\"timeout_s\":2")).unwrap_err();
    eprintln!("plaintext client, TLS server: {}", f.message);
    assert!(
        f.status == NIXL_ETCD_ERR_CONNECTION || f.status == NIXL_ETCD_ERR_TIMEOUT,
        "{f:?}"
    );
    assert!(
        f.message.contains("ETCD connection failed") && f.message.contains("use https://"),
        "{f:?}"
    );

    // TLS configured with an http:// endpoint: refused before connecting.
    let f = capi::open(&opts(
        &http,
        &ns,
        &format!("\"ca_cert\":\"{}\"", p(&ca_file)),
    ))
    .unwrap_err();
    eprintln!("TLS settings, http endpoint: {}", f.message);
    assert_eq!(f.status, NIXL_ETCD_ERR_INVALID_ARGUMENT, "{f:?}");
    assert!(f.message.contains("TLS is configured"), "{f:?}");

    // Mixed endpoints: refused.
    let f = capi::open(&opts(
        &format!("{},{}", etcd.endpoint(), plain.endpoint()),
        &ns,
        "",
    ))
    .unwrap_err();
    eprintln!("mixed endpoints: {}", f.message);
    assert_eq!(f.status, NIXL_ETCD_ERR_INVALID_ARGUMENT, "{f:?}");
    assert!(f.message.contains("mixes https:// and plaintext"), "{f:?}");

    // A TLS client against a plaintext server: no fallback, a clear error.
    let https = format!("https://127.0.0.1:{}", plain.client_port());
    let f = capi::open(&opts(
        &https,
        &ns,
        &format!("\"ca_cert\":\"{}\",\"timeout_s\":2", p(&ca_file)),
    ))
    .unwrap_err();
    eprintln!("TLS client, plaintext server: {}", f.message);
    assert_eq!(f.status, NIXL_ETCD_ERR_CONNECTION, "{f:?}");
    assert!(f.message.contains("does not speak TLS"), "{f:?}");
}

// ---------------------------------------------------------------- auth

const ROOT_PW: &str = "root-pw-Qz81";

/// etcd with authentication on: root, and per user a role with readwrite on
/// one namespace prefix only.
fn auth_etcd(users: &[(&str, &str, &str)], extra_args: &[&str]) -> EtcdServer {
    let mut b = EtcdServer::builder();
    for a in extra_args {
        b = b.arg(a);
    }
    let etcd = b.start();
    etcdctl_ok(&etcd, &["user", "add", &format!("root:{ROOT_PW}")]);
    for (user, pw, ns) in users {
        let role = format!("role-{user}");
        etcdctl_ok(&etcd, &["role", "add", &role]);
        etcdctl_ok(
            &etcd,
            &[
                "role",
                "grant-permission",
                &role,
                "--prefix=true",
                "readwrite",
                // The namespace without its '/': the records and, beside
                // them, the chunks of large metadata (`{ns}.blobs/`).
                ns,
            ],
        );
        etcdctl_ok(&etcd, &["user", "add", &format!("{user}:{pw}")]);
        etcdctl_ok(&etcd, &["user", "grant-role", user, &role]);
    }
    etcdctl_ok(&etcd, &["auth", "enable"]);
    etcd
}

fn creds(user: &str, pw: &str) -> String {
    format!("\"username\":\"{user}\",\"password\":\"{pw}\"")
}

#[test]
fn a_role_works_inside_its_namespace_and_nobody_else_can_read_or_overwrite_it() {
    setup();
    let ns_a = unique_namespace("auth-a");
    let ns_b = unique_namespace("auth-b");
    let etcd = auth_etcd(
        &[
            ("alice", "alice-pw-7f3", &ns_a),
            ("bob", "bob-pw-91c", &ns_b),
        ],
        &[],
    );
    let alice = capi::open(&opts(
        &etcd.endpoint(),
        &ns_a,
        &format!("{},\"lease_ttl_s\":2", creds("alice", "alice-pw-7f3")),
    ))
    .unwrap_or_else(|f| panic!("{f:?}"));
    alice.register("prefill_engine", 0, b"alice-md").unwrap();
    assert_eq!(alice.lookup("prefill_engine", 0).unwrap(), b"alice-md");
    assert_eq!(alice.wait("prefill_engine", 0, 5000).unwrap(), b"alice-md");
    // The lease is kept alive past three TTLs: the record is still there.
    std::thread::sleep(Duration::from_secs(6));
    let out = etcdctl_ok(
        &etcd,
        &[
            "--user",
            &format!("root:{ROOT_PW}"),
            "get",
            &format!("{ns_a}/prefill_engine/rank_0"),
            "--print-value-only",
        ],
    );
    assert!(out.contains("\"engine_id\":\"prefill_engine\""), "{out}");
    // Metadata over one request goes in chunks beside the namespace, which
    // the role covers too.
    let big = capi::blob(3, 2 << 20);
    alice.register("prefill_engine", 1, &big).unwrap();
    assert_eq!(alice.lookup("prefill_engine", 1).unwrap(), big);

    // bob, granted only ns_b, aims at ns_a.
    let bob = capi::open(&opts(&etcd.endpoint(), &ns_a, &creds("bob", "bob-pw-91c")))
        .unwrap_or_else(|f| panic!("{f:?}"));
    let f = bob.lookup("prefill_engine", 0).unwrap_err();
    eprintln!("bob reads: {}", f.message);
    assert_eq!(f.status, NIXL_ETCD_ERR_PERMISSION, "{f:?}");
    assert!(
        f.message.contains("user \"bob\"") && f.message.contains(&format!("{ns_a}/")),
        "{f:?}"
    );
    let f = bob.register("prefill_engine", 0, b"bob-md").unwrap_err();
    eprintln!("bob overwrites: {}", f.message);
    assert_eq!(f.status, NIXL_ETCD_ERR_PERMISSION, "{f:?}");
    assert!(
        f.message
            .contains(&format!("key {ns_a}/prefill_engine/rank_0"))
            && f.message.contains("user \"bob\""),
        "{f:?}"
    );
    let f = bob.lookup("prefill_engine", 1).unwrap_err();
    assert_eq!(f.status, NIXL_ETCD_ERR_PERMISSION, "{f:?}");
    bob.close().unwrap();
    // Nothing of alice's changed.
    assert_eq!(alice.lookup("prefill_engine", 0).unwrap(), b"alice-md");
    alice.close().unwrap();

    // Without credentials etcd refuses too.
    let f = capi::open(&opts(&etcd.endpoint(), &ns_a, "")).and_then(|c| {
        let r = c.register("prefill_engine", 0, b"anon");
        let _ = c.close();
        r
    });
    let f = f.unwrap_err();
    eprintln!("no credentials: {}", f.message);
    assert_eq!(f.status, NIXL_ETCD_ERR_PERMISSION, "{f:?}");
}

#[test]
fn a_wrong_password_is_a_clear_error_that_does_not_show_it() {
    setup();
    let ns = unique_namespace("wrongpw");
    let etcd = auth_etcd(&[("alice", "alice-pw-7f3", &ns)], &[]);
    let f = capi::open(&opts(
        &etcd.endpoint(),
        &ns,
        &creds("alice", "not-her-pw-55"),
    ))
    .unwrap_err();
    eprintln!("wrong password: {}", f.message);
    assert_eq!(f.status, NIXL_ETCD_ERR_PERMISSION, "{f:?}");
    assert!(
        f.message
            .contains("refused the credentials of user \"alice\"")
            && f.message.contains("VLLM_NIXL_ETCD_PASSWORD"),
        "{f:?}"
    );
    assert!(!f.message.contains("not-her-pw-55"), "{f:?}");
}

#[test]
fn the_auth_token_is_refreshed_past_its_ttl() {
    setup();
    let ns = unique_namespace("token");
    // Simple tokens expire after 2 s unused.
    let etcd = auth_etcd(
        &[("alice", "alice-pw-7f3", &ns)],
        &["--auth-token", "simple", "--auth-token-ttl", "2"],
    );
    // The premise: an idle client's token does expire.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let expired = rt.block_on(async {
        let opts = etcd_client::ConnectOptions::new().with_user("alice", "alice-pw-7f3");
        let mut raw = etcd_client::Client::connect([etcd.endpoint()], Some(opts))
            .await
            .unwrap();
        raw.get(format!("{ns}/probe"), None).await.unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
        raw.get(format!("{ns}/probe"), None).await
    });
    let e = expired.expect_err("the token should have expired");
    assert!(e.to_string().contains("invalid auth token"), "{e}");

    // Our client, idle just as long (its lease renewal, every 10 s, is not
    // due), keeps working: writes, a new read, a new watch.
    let c = capi::open(&opts(
        &etcd.endpoint(),
        &ns,
        &format!("{},\"lease_ttl_s\":30", creds("alice", "alice-pw-7f3")),
    ))
    .unwrap_or_else(|f| panic!("{f:?}"));
    c.register("prefill_engine", 0, b"before").unwrap();
    std::thread::sleep(Duration::from_secs(5));
    c.register("prefill_engine", 1, b"after")
        .unwrap_or_else(|f| panic!("register after the token TTL: {f:?}"));
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        c.lookup("decode_engine", 0).unwrap_err().status,
        NIXL_ETCD_ERR_NOT_FOUND
    );
    std::thread::sleep(Duration::from_secs(5));
    c.register("decode_engine", 0, b"d").unwrap();
    assert_eq!(c.wait("decode_engine", 0, 5000).unwrap(), b"d");
    c.close().unwrap();
}

// ---------------------------------------------------------------- secrets

#[test]
fn secrets_never_reach_logs_messages_or_debug() {
    setup();
    const PW: &str = "pw-SECRET-a91f3c7e";
    const KEY: &str = "hmac-KEY-4be1d0c2f7a98e35b6";
    const OLD_KEY: &str = "hmac-OLDKEY-77d2e9a01c3b5f48";
    let ns = unique_namespace("secrets");
    let etcd = auth_etcd(&[("alice", PW, &ns)], &[]);
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("hmac.key");
    let old_file = dir.path().join("hmac-old.key");
    let pw_file = dir.path().join("pw");
    std::fs::write(&key_file, format!("{KEY}\n")).unwrap();
    std::fs::write(&old_file, OLD_KEY).unwrap();
    std::fs::write(&pw_file, format!("{PW}\n")).unwrap();
    let mut messages = Vec::new();

    let keys = format!(
        "\"hmac_key_file\":\"{}\",\"hmac_previous_key_file\":\"{}\"",
        p(&key_file),
        p(&old_file)
    );
    for password in [
        format!("\"password\":\"{PW}\""),
        format!("\"password_file\":\"{}\"", p(&pw_file)),
    ] {
        let o = opts(
            &etcd.endpoint(),
            &ns,
            &format!("\"username\":\"alice\",{password},{keys}"),
        );
        let cfg = nixl_etcd::Config::load(Some(&o)).unwrap();
        let debug = format!("{cfg:?} {cfg:#?}");
        let signer = nixl_etcd::sign::Signer::from_config(&cfg).unwrap().unwrap();
        let sig = signer.sign(b"record");
        assert_eq!(signer.verify(b"record", Some(&sig)), Ok(()));
        let debug = format!("{debug} {signer:?} {sig}");
        for s in [PW, KEY, OLD_KEY] {
            assert!(!debug.contains(s), "{s} in {debug}");
        }
        log::debug!("config under test: {cfg:?}");

        let c = capi::open(&o).unwrap_or_else(|f| panic!("{f:?}"));
        c.register("prefill_engine", 0, b"md").unwrap();
        assert_eq!(c.lookup("prefill_engine", 0).unwrap(), b"md");
        assert_eq!(c.wait("prefill_engine", 0, 5000).unwrap(), b"md");
        messages.push(c.lookup("absent_engine", 0).unwrap_err().message);
        c.close().unwrap();
    }
    // Failures that involve the secrets.
    let failures = [
        opts(
            &etcd.endpoint(),
            &ns,
            &creds("alice", &format!("{PW}-wrong")),
        ),
        opts(&etcd.endpoint(), &ns, &format!("\"password\":\"{PW}\"")),
        opts(
            &etcd.endpoint(),
            &ns,
            &format!(
                "\"username\":\"alice\",\"password\":\"{PW}\",\"password_file\":\"{}\"",
                p(&dir.path().join("none"))
            ),
        ),
    ];
    for o in failures {
        messages.push(capi::open(&o).unwrap_err().message);
    }
    std::fs::write(&key_file, "shK3y9").unwrap();
    let cfg = nixl_etcd::Config::load(Some(&opts(&etcd.endpoint(), &ns, &keys))).unwrap();
    messages.push(
        nixl_etcd::sign::Signer::from_config(&cfg)
            .unwrap_err()
            .message,
    );

    let lines = LINES.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("DEBUG") && l.contains("connecting to")),
        "DEBUG lines were not captured: {lines:#?}"
    );
    for text in lines.iter().chain(messages.iter()) {
        for s in [PW, KEY, OLD_KEY, "shK3y9"] {
            assert!(!text.contains(s), "secret {s:?} in: {text}");
        }
    }
    eprintln!(
        "{} log lines and {} messages checked",
        lines.len(),
        messages.len()
    );
}
