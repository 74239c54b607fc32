//! Without NIXL, loading fails with a clear error instead of aborting.

#[test]
fn a_missing_library_is_an_error_not_an_abort() {
    std::env::set_var("NIXL_CAPI_LIB", "/nonexistent/libnixl_capi.so");
    std::env::set_var("NIXL_PYTHON", "/nonexistent/python3");
    std::env::remove_var("LD_LIBRARY_PATH");
    let err = match nixl_sys::Agent::new("x") {
        Ok(_) => panic!("an agent without NIXL"),
        Err(e) => e,
    };
    assert!(err.message.contains("could not be loaded"), "{err}");
    assert!(err.message.contains("NIXL_CAPI_LIB"), "{err}");
    assert!(
        err.message.contains("/nonexistent/libnixl_capi.so"),
        "{err}"
    );
    // Asking again gives the same error, still no abort.
    assert!(nixl_sys::api().is_err());
}
