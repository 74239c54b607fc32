//! Thin Rust wrappers over the exported C functions, so tests drive the real C
//! ABI (the same symbols a C engine links).
#![allow(dead_code)]

use std::ffi::{CStr, CString};

use nixl_etcd::ffi::*;

/// An open client handle. The library is thread-safe, so the handle may be
/// shared across threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Handle(pub *mut nixl_etcd_client);
unsafe impl Send for Handle {}
unsafe impl Sync for Handle {}

/// A failed call: its status and this thread's last error message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub status: i32,
    pub message: String,
}

pub fn last_error() -> String {
    unsafe { CStr::from_ptr(nixl_etcd_last_error()) }
        .to_string_lossy()
        .into_owned()
}

fn check(rc: i32) -> Result<(), Failure> {
    if rc == NIXL_ETCD_OK {
        Ok(())
    } else {
        Err(Failure {
            status: rc,
            message: last_error(),
        })
    }
}

pub fn open(options: &str) -> Result<Handle, Failure> {
    let opts = CString::new(options).unwrap();
    let mut h = std::ptr::null_mut();
    check(unsafe { nixl_etcd_open(opts.as_ptr(), &mut h) })?;
    assert!(!h.is_null());
    Ok(Handle(h))
}

fn take(buf: &mut nixl_etcd_buffer) -> Vec<u8> {
    let v = if buf.len == 0 {
        assert!(buf.data.is_null());
        Vec::new()
    } else {
        unsafe { std::slice::from_raw_parts(buf.data, buf.len) }.to_vec()
    };
    unsafe { nixl_etcd_buffer_free(buf) };
    assert!(buf.data.is_null() && buf.len == 0);
    v
}

impl Handle {
    pub fn register(&self, engine: &str, rank: u32, md: &[u8]) -> Result<(), Failure> {
        let e = CString::new(engine).unwrap();
        check(unsafe { nixl_etcd_register(self.0, e.as_ptr(), rank, md.as_ptr(), md.len()) })
    }

    pub fn unregister(&self, engine: &str, rank: u32) -> Result<(), Failure> {
        let e = CString::new(engine).unwrap();
        check(unsafe { nixl_etcd_unregister(self.0, e.as_ptr(), rank) })
    }

    pub fn lookup(&self, engine: &str, rank: u32) -> Result<Vec<u8>, Failure> {
        let e = CString::new(engine).unwrap();
        let mut buf = nixl_etcd_buffer {
            data: std::ptr::null_mut(),
            len: 0,
        };
        check(unsafe { nixl_etcd_lookup(self.0, e.as_ptr(), rank, &mut buf) })?;
        Ok(take(&mut buf))
    }

    pub fn wait(&self, engine: &str, rank: u32, timeout_ms: i64) -> Result<Vec<u8>, Failure> {
        let e = CString::new(engine).unwrap();
        let mut buf = nixl_etcd_buffer {
            data: std::ptr::null_mut(),
            len: 0,
        };
        check(unsafe { nixl_etcd_wait(self.0, e.as_ptr(), rank, timeout_ms, &mut buf) })?;
        Ok(take(&mut buf))
    }

    pub fn close(self) -> Result<(), Failure> {
        check(unsafe { nixl_etcd_close(self.0) })
    }
}

/// A deterministic blob of `len` bytes with NUL bytes in it, different per seed.
pub fn blob(seed: u32, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            if i % 7 == 0 {
                0
            } else {
                x as u8
            }
        })
        .collect()
}
