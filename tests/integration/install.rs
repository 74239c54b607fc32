//! `make install` into a temporary prefix, then what a user of the install
//! does: build a C program (dynamically and statically linked) and a C++
//! program with `pkg-config --cflags --libs nixl_etcd`, and run them and the
//! installed `nixl-etcd` against a private etcd.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::common::{self, repo_root, target_dir, unique_namespace, EtcdServer};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs `cmd`, echoes it and its output (the test's transcript), and
/// panics unless it succeeds.
fn checked(what: &str, cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    println!("$ {what}\n{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    out
}

fn pkg_config(prefix: &Path, args: &[&str]) -> Vec<String> {
    let out = checked(
        &format!("pkg-config {}", args.join(" ")),
        Command::new("pkg-config")
            .env("PKG_CONFIG_PATH", prefix.join("lib/pkgconfig"))
            .env_remove("PKG_CONFIG_LIBDIR")
            .args(args),
    );
    text(&out.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// The entries of one tag of an ELF file's dynamic section (readelf -d),
/// e.g. `NEEDED`: the names in brackets.
fn dynamic(file: &Path, tag: &str) -> Vec<String> {
    let out = Command::new("readelf")
        .arg("-d")
        .arg(file)
        .output()
        .expect("run readelf");
    assert!(out.status.success(), "readelf -d {}", file.display());
    text(&out.stdout)
        .lines()
        .filter(|l| l.contains(&format!("({tag})")))
        .filter_map(|l| Some(l.split_once('[')?.1.split_once(']')?.0.to_owned()))
        .collect()
}

/// The shared libraries a program names (readelf's NEEDED entries).
fn needed(program: &Path) -> String {
    dynamic(program, "NEEDED").join("\n")
}

/// `libnixl_etcd.so.<major>`: the SONAME build.rs gives the library.
fn soname() -> String {
    format!("libnixl_etcd.so.{}", env!("CARGO_PKG_VERSION_MAJOR"))
}

#[test]
fn the_shared_library_is_named_by_its_major_version() {
    let lib = common::cdylib_path();
    assert_eq!(dynamic(&lib, "SONAME"), [soname()], "{}", lib.display());
    assert_eq!(soname(), "libnixl_etcd.so.0");
}

#[test]
fn make_install_gives_pkg_config_users_a_working_library_header_and_command() {
    let prefix_dir = tempfile::tempdir().unwrap();
    let prefix = prefix_dir.path().to_path_buf();
    let features = if cfg!(feature = "nixl") { "nixl" } else { "" };
    // What `cargo test` built: the libraries beside this test, the command.
    checked(
        "make install-only",
        Command::new("make")
            .arg("-C")
            .arg(repo_root())
            .arg("install-only")
            .arg(format!("PREFIX={}", prefix.display()))
            .arg(format!("BUILD_DIR={}", target_dir().display()))
            .arg(format!("BIN={}", env!("CARGO_BIN_EXE_nixl-etcd")))
            .arg(format!("FEATURES={features}"))
            .stdin(Stdio::null()),
    );
    // The library under its full version, found through the SONAME link
    // (what programs load) and the development link (what -l finds).
    let lib = prefix.join("lib");
    let real = format!("libnixl_etcd.so.{}", env!("CARGO_PKG_VERSION"));
    assert!(lib.join(&real).is_file() && !lib.join(&real).is_symlink());
    assert_eq!(
        std::fs::read_link(lib.join(soname())).unwrap(),
        Path::new(&real)
    );
    assert_eq!(
        std::fs::read_link(lib.join("libnixl_etcd.so")).unwrap(),
        Path::new(&soname())
    );
    assert_eq!(dynamic(&lib.join(&real), "SONAME"), [soname()]);
    for f in [
        "lib/libnixl_etcd.so",
        "lib/libnixl_etcd.a",
        "lib/pkgconfig/nixl_etcd.pc",
        "include/nixl_etcd.h",
        "include/nixl_etcd.hpp",
        "bin/nixl-etcd",
    ] {
        assert!(prefix.join(f).is_file(), "{f} not installed");
    }
    let pc = std::fs::read_to_string(prefix.join("lib/pkgconfig/nixl_etcd.pc")).unwrap();
    println!("--- nixl_etcd.pc ---\n{pc}");
    assert_eq!(
        pkg_config(&prefix, &["--modversion", "nixl_etcd"]),
        [env!("CARGO_PKG_VERSION")]
    );
    assert_eq!(
        pkg_config(&prefix, &["--variable=prefix", "nixl_etcd"]),
        [prefix.display().to_string()]
    );
    let flags = pkg_config(&prefix, &["--cflags", "--libs", "nixl_etcd"]);
    assert!(
        flags.contains(&format!("-I{}/include", prefix.display())),
        "{flags:?}"
    );
    assert!(flags.contains(&"-lnixl_etcd".to_owned()), "{flags:?}");
    assert_eq!(
        flags.contains(&"-DNIXL_ETCD_WITH_NIXL".to_owned()),
        cfg!(feature = "nixl")
    );
    // Static: the archive, then the system libraries of Libs.private.
    let static_flags: Vec<String> =
        pkg_config(&prefix, &["--cflags", "--static", "--libs", "nixl_etcd"])
            .into_iter()
            .flat_map(|f| match f.as_str() {
                "-lnixl_etcd" => vec![
                    "-Wl,-Bstatic".to_owned(),
                    f.clone(),
                    "-Wl,-Bdynamic".to_owned(),
                ],
                _ => vec![f],
            })
            .collect();

    // The sources, copied away from c_examples/: the headers must come from
    // the prefix.
    let build = tempfile::tempdir().unwrap();
    let src = repo_root().join("c_examples");
    for f in [
        "prefill.c",
        "decode.c",
        "cli.h",
        "pattern.h",
        "raii_engine.cpp",
    ] {
        std::fs::copy(src.join(f), build.path().join(f)).unwrap();
    }
    let exe = |name: &str| -> PathBuf { build.path().join(name) };
    let compile = |compiler: &str, std: &str, source: &str, out: &str, flags: &[String]| {
        checked(
            &format!("{compiler} {std} {source} -o {out} {}", flags.join(" ")),
            Command::new(compiler)
                .current_dir(build.path())
                .args([std, "-Wall", "-Wextra", "-Werror", "-O2", source, "-o", out])
                .args(flags),
        );
    };
    compile("cc", "-std=c11", "prefill.c", "prefill", &flags);
    compile("cc", "-std=c11", "decode.c", "decode_static", &static_flags);
    compile(
        "c++",
        "-std=c++17",
        "raii_engine.cpp",
        "raii_engine",
        &flags,
    );
    // Linked with -lnixl_etcd (the development link), they load the SONAME.
    assert!(dynamic(&exe("prefill"), "NEEDED").contains(&soname()));
    assert!(dynamic(&exe("raii_engine"), "NEEDED").contains(&soname()));
    assert!(!needed(&exe("decode_static")).contains("libnixl_etcd"));

    // Run them against etcd: the dynamic ones find the installed library
    // only (LD_LIBRARY_PATH), the static one needs none.
    let etcd = EtcdServer::start();
    let ns = unique_namespace("install");
    let env = |cmd: &mut Command, dynamic: bool| {
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("VLLM_") {
                cmd.env_remove(&k);
            }
        }
        cmd.env("VLLM_NIXL_ETCD_ENDPOINTS", etcd.endpoint())
            .env("VLLM_NIXL_ETCD_NAMESPACE", &ns)
            .env("VLLM_NIXL_USE_ETCD", "1")
            .stdin(Stdio::null());
        if dynamic {
            cmd.env("LD_LIBRARY_PATH", prefix.join("lib"));
        } else {
            cmd.env_remove("LD_LIBRARY_PATH");
        }
    };
    let installed = prefix.join("bin/nixl-etcd");
    let cli = |args: &[&str]| {
        let mut c = Command::new(&installed);
        env(&mut c, false);
        c.args(args);
        checked(&format!("nixl-etcd {}", args.join(" ")), &mut c)
    };

    let mut prefill = Command::new(exe("prefill"));
    env(&mut prefill, true);
    let mut prefill = prefill
        .args(["prefill_engine", "2", "--options", r#"{"world_size":2}"#])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(prefill.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("holding") {
        line.clear();
        assert!(
            lines.read_line(&mut line).unwrap() > 0,
            "prefill exited early"
        );
    }
    println!("$ prefill prefill_engine 2 (C, shared library)\n{line}");

    let out = cli(&["wait", "prefill_engine", "--all", "--timeout", "30"]);
    assert!(text(&out.stdout).contains("all 2 ranks are registered"));

    let mut decode = Command::new(exe("decode_static"));
    env(&mut decode, false);
    let out = checked(
        "decode_static prefill_engine 2 (C, static library)",
        decode.args(["prefill_engine", "2"]),
    );
    assert_eq!(text(&out.stdout).matches("8192 bytes verified").count(), 2);

    let mut cxx = Command::new(exe("raii_engine"));
    env(&mut cxx, true);
    let out = checked(
        "raii_engine cxx_engine 1 prefill_engine 2 (C++)",
        cxx.args(["cxx_engine", "1", "prefill_engine", "2"]),
    );
    let stdout = text(&out.stdout);
    assert_eq!(stdout.matches("8192 bytes verified").count(), 3, "{stdout}");
    assert!(stdout.contains("as expected, nixl_etcd_lookup failed: not found"));

    let out = cli(&["list"]);
    let listing = text(&out.stdout);
    assert!(listing.contains("1 engine, 2 ranks"), "{listing}");

    // SAFETY: kill(2) on our own child, not yet reaped.
    assert_eq!(unsafe { libc::kill(prefill.id() as i32, libc::SIGTERM) }, 0);
    assert!(prefill.wait().unwrap().success());
    let out = cli(&["list", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["engines"], serde_json::json!([]));
}
