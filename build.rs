//! Generates the C header from `src/ffi/` into OUT_DIR. The checked-in copy
//! `include/nixl_etcd.h` is refreshed with NIXL_ETCD_WRITE_HEADER=1; a test
//! fails when it is stale.

use std::path::PathBuf;

fn main() {
    soname();
    println!("cargo:rerun-if-changed=src/ffi");
    println!("cargo:rerun-if-changed=src/error.rs");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    println!("cargo:rerun-if-env-changed=NIXL_ETCD_WRITE_HEADER");
    let crate_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("nixl_etcd.h");
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml"))
        .expect("cbindgen.toml is readable");
    let bindings = cbindgen::Builder::new()
        .with_config(config)
        .with_after_include(version_defines())
        .with_src(crate_dir.join("src/ffi/mod.rs"))
        .generate()
        .expect("cbindgen generates the header");
    bindings.write_to_file(&out);
    if std::env::var_os("NIXL_ETCD_WRITE_HEADER").is_some() {
        bindings.write_to_file(crate_dir.join("include/nixl_etcd.h"));
    }
}

/// The shared library names itself `libnixl_etcd.so.<major>` (its SONAME),
/// so programs linked against it record that name and keep working across
/// compatible upgrades; `make install` installs `libnixl_etcd.so.<version>`
/// with the symlinks `libnixl_etcd.so.<major>` and `libnixl_etcd.so`.
fn soname() {
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        let major = std::env::var("CARGO_PKG_VERSION_MAJOR").unwrap();
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libnixl_etcd.so.{major}");
    }
}

/// The crate's version as macros in the header, so that C code can check at
/// compile time what `nixl_etcd_version()` says at run time.
fn version_defines() -> String {
    let part = |p: &str| std::env::var(format!("CARGO_PKG_VERSION_{p}")).unwrap();
    format!(
        "\n/** This header's version (equal to what nixl_etcd_version() returns). */\n\
         #define NIXL_ETCD_VERSION_MAJOR {}\n\
         #define NIXL_ETCD_VERSION_MINOR {}\n\
         #define NIXL_ETCD_VERSION_PATCH {}\n",
        part("MAJOR"),
        part("MINOR"),
        part("PATCH")
    )
}
