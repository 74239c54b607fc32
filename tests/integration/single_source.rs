//! One source of truth: the statuses (`Status::ALL`) and the open options
//! (`config::OPTIONS`) are defined once in Rust; the header, the docs' tables
//! (docs/c-api.md, docs/configuration.md) and the Python package must say the
//! same. Fails when they drift.

use std::collections::BTreeMap;
use std::path::Path;

use nixl_etcd::config::OPTIONS;
use nixl_etcd::{Config, Status};

fn read(path: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The lines between `<!-- {name}:begin -->` and `<!-- {name}:end -->`.
fn block<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    let begin = format!("<!-- {name}:begin -->");
    let end = format!("<!-- {name}:end -->");
    let start = text.find(&begin).unwrap_or_else(|| panic!("no {begin}")) + begin.len();
    let stop = text[start..]
        .find(&end)
        .unwrap_or_else(|| panic!("no {end}"))
        + start;
    text[start..stop].lines().collect()
}

/// The cells of a Markdown table row, trimmed, backticks removed.
fn cells(row: &str) -> Vec<String> {
    row.trim()
        .trim_matches('|')
        .split('|')
        .map(|c| c.trim().trim_matches('`').to_owned())
        .collect()
}

fn table_rows(lines: &[&str]) -> Vec<Vec<String>> {
    lines
        .iter()
        .filter(|l| l.trim_start().starts_with('|'))
        .skip(2) // header and separator
        .map(|l| cells(l))
        .collect()
}

fn statuses() -> Vec<(String, i32)> {
    Status::ALL
        .iter()
        .map(|s| (s.c_name().to_owned(), *s as i32))
        .collect()
}

#[test]
fn the_statuses_are_the_same_in_the_header_the_readme_and_python() {
    let want = statuses();
    assert_eq!(want.len(), 12);
    assert!(want.iter().enumerate().all(|(i, (_, n))| *n == -(i as i32)));

    let header: Vec<(String, i32)> = read("include/nixl_etcd.h")
        .lines()
        .filter_map(|l| l.strip_prefix("#define "))
        .filter_map(|l| l.split_once(' '))
        .filter(|(name, _)| *name == "NIXL_ETCD_OK" || name.starts_with("NIXL_ETCD_ERR_"))
        .map(|(name, n)| (name.to_owned(), n.trim().parse().unwrap()))
        .collect();
    assert_eq!(header, want, "include/nixl_etcd.h");

    let readme: Vec<(String, i32)> = table_rows(&block(&read("docs/c-api.md"), "statuses"))
        .into_iter()
        .map(|c| (c[0].clone(), c[1].parse().unwrap()))
        .collect();
    assert_eq!(readme, want, "docs/c-api.md statuses table");

    let py: Vec<(String, i32)> = read("python/nixl_etcd/_ffi.py")
        .lines()
        .filter_map(|l| l.split_once(" = "))
        .filter(|(name, _)| *name == "OK" || name.starts_with("ERR_"))
        .filter_map(|(name, n)| Some((format!("NIXL_ETCD_{name}"), n.trim().parse().ok()?)))
        .collect();
    assert_eq!(py, want, "python/nixl_etcd/_ffi.py");

    // Every error status has its exception class in the Python package.
    let errors = read("python/nixl_etcd/errors.py");
    for (name, _) in want.iter().skip(1) {
        let line = format!("STATUS = _ffi.{}", name.trim_start_matches("NIXL_ETCD_"));
        assert!(errors.contains(&line), "errors.py has no class with {line}");
    }
}

#[test]
fn the_options_are_the_same_in_the_header_the_readme_and_python() {
    let keys: Vec<&str> = OPTIONS.iter().map(|(k, _)| *k).collect();
    assert_eq!(keys.len(), 18);

    // The header's doc of nixl_etcd_open: "The option keys are `a`, `b`, ... ."
    let header = read("include/nixl_etcd.h");
    let open = header
        .find("nixl_etcd_status nixl_etcd_open(")
        .expect("nixl_etcd_open in the header");
    let doc = &header[header[..open].rfind("/**").unwrap()..open];
    let list = doc
        .split_once("The option keys are")
        .expect("the doc of nixl_etcd_open lists the option keys")
        .1;
    let list = &list[..list.find(". ").or_else(|| list.find(".\n")).unwrap()];
    let documented: Vec<&str> = list.split('`').skip(1).step_by(2).collect();
    assert_eq!(documented, keys, "the header's doc of nixl_etcd_open");

    let readme: BTreeMap<String, Option<String>> =
        table_rows(&block(&read("docs/configuration.md"), "options"))
            .into_iter()
            .map(|c| {
                let env = (c[2] != "none").then(|| c[2].clone());
                (c[0].clone(), env)
            })
            .collect();
    let want: BTreeMap<String, Option<String>> = OPTIONS
        .iter()
        .map(|(k, env)| (k.to_string(), env.map(str::to_owned)))
        .collect();
    assert_eq!(
        readme, want,
        "docs/configuration.md options table (key, env var)"
    );

    let client = read("python/nixl_etcd/client.py");
    let tuple = client
        .split_once("\nOPTIONS = (")
        .expect("OPTIONS in client.py")
        .1;
    let tuple = &tuple[..tuple.find(')').unwrap()];
    let py: Vec<&str> = tuple.split('"').skip(1).step_by(2).collect();
    assert_eq!(py, keys, "python/nixl_etcd/client.py OPTIONS");
}

#[test]
fn every_listed_option_is_accepted_and_no_other() {
    let no_env = |_: &str| None;
    for (key, _) in OPTIONS {
        // A value of the wrong type for every key: refused for its type,
        // never as an unknown key.
        let e = Config::from_sources(no_env, Some(&format!(r#"{{"{key}": [[]]}}"#))).unwrap_err();
        assert_eq!(e.status, Status::ErrInvalidArgument);
        assert!(
            !e.message.contains("unknown option"),
            "{key}: {}",
            e.message
        );
    }
    let e = Config::from_sources(no_env, Some(r#"{"no_such_option": 1}"#)).unwrap_err();
    assert_eq!(e.status, Status::ErrInvalidArgument);
    let known: Vec<&str> = OPTIONS.iter().map(|(k, _)| *k).collect();
    assert_eq!(
        e.message,
        format!(
            "unknown option \"no_such_option\"; known options: {}",
            known.join(", ")
        )
    );
}

#[test]
fn the_store_options_are_the_same_in_serve_help_and_the_docs() {
    use nixl_etcd::nixl_store::OPTIONS as STORE;
    let doc = read("docs/nixl-store.md");
    let rows = table_rows(&block(&doc, "store-options"));
    let documented: Vec<(String, String)> = rows
        .iter()
        .map(|r| {
            let flag = r[0].split_whitespace().next().unwrap_or("").to_owned();
            (flag, r[1].clone())
        })
        .collect();
    let want: Vec<(String, String)> = STORE
        .iter()
        .map(|o| (format!("--{}", o.flag()), o.name.to_owned()))
        .collect();
    assert_eq!(documented, want, "docs/nixl-store.md, store-options");
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_nixl-etcd"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for (flag, _) in &want {
        assert!(
            help.contains(&format!("  {flag} ")),
            "nixl-etcd --help lacks {flag}"
        );
    }
}

#[test]
fn the_version_is_the_same_in_the_header_the_library_cargo_and_python() {
    let header = read("include/nixl_etcd.h");
    let define = |part: &str| -> String {
        let name = format!("#define NIXL_ETCD_VERSION_{part} ");
        header
            .lines()
            .find_map(|l| l.strip_prefix(name.as_str()))
            .unwrap_or_else(|| panic!("the header lacks NIXL_ETCD_VERSION_{part}"))
            .trim()
            .to_owned()
    };
    let from_header = format!(
        "{}.{}.{}",
        define("MAJOR"),
        define("MINOR"),
        define("PATCH")
    );
    // SAFETY: a static NUL-terminated string.
    let from_library = unsafe { std::ffi::CStr::from_ptr(nixl_etcd::ffi::nixl_etcd_version()) }
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(from_header, env!("CARGO_PKG_VERSION"));
    assert_eq!(from_library, env!("CARGO_PKG_VERSION"));
    // The Python package takes its version from Cargo.toml (python/setup.py).
    let setup = read("python/setup.py");
    assert!(
        setup.contains("version=crate_version()"),
        "setup.py's version"
    );
}
