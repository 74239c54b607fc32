//! Generates the raw bindings from `nixl_capi.h` with bindgen, as a table of
//! function pointers loaded at run time (no link-time dependency on NIXL).

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=nixl_capi.h");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("bindings.rs");
    bindgen::Builder::default()
        .header("nixl_capi.h")
        .allowlist_function("nixl_capi_.*")
        .allowlist_type("nixl_capi_.*")
        .default_enum_style(bindgen::EnumVariation::Consts)
        .dynamic_library_name("NixlCapi")
        .dynamic_link_require_all(true)
        .layout_tests(false)
        .generate()
        .expect("bindgen could not read nixl_capi.h (is libclang installed? apt-get install libclang-dev)")
        .write_to_file(&out)
        .expect("write bindings");
}
