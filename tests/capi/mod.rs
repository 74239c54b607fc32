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

/// An event copied out of the callback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedEvent {
    pub kind: i32,
    pub engine_id: String,
    pub rank: u32,
    pub incarnation: String,
    pub host: String,
    pub metadata: Vec<u8>,
    pub revision: i64,
}

/// A live subscription; events arrive on `rx`.
pub struct Subscription {
    pub id: u64,
    pub rx: std::sync::mpsc::Receiver<OwnedEvent>,
    _tx: Box<std::sync::mpsc::Sender<OwnedEvent>>,
}

unsafe extern "C" fn forward(user_data: *mut std::ffi::c_void, ev: *const nixl_etcd_event) {
    let tx = &*(user_data as *const std::sync::mpsc::Sender<OwnedEvent>);
    let ev = &*ev;
    let text = |p: *const std::ffi::c_char| CStr::from_ptr(p).to_string_lossy().into_owned();
    let metadata = if ev.metadata.is_null() {
        Vec::new()
    } else {
        std::slice::from_raw_parts(ev.metadata, ev.metadata_len).to_vec()
    };
    let _ = tx.send(OwnedEvent {
        kind: ev.kind,
        engine_id: text(ev.engine_id),
        rank: ev.rank,
        incarnation: text(ev.incarnation),
        host: text(ev.host),
        metadata,
        revision: ev.revision,
    });
}

/// A record copied out of `nixl_etcd_lookup_record`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedRecord {
    pub engine_id: String,
    pub rank: u32,
    pub world_size: u32,
    pub host: String,
    pub pid: u32,
    pub incarnation: String,
    pub registered_at_ms: u64,
    pub revision: i64,
    pub metadata: Vec<u8>,
}

impl Handle {
    pub fn subscribe(&self, engine: Option<&str>) -> Result<Subscription, Failure> {
        let (tx, rx) = std::sync::mpsc::channel();
        let tx = Box::new(tx);
        let e = engine.map(|e| CString::new(e).unwrap());
        let mut id = 0u64;
        check(unsafe {
            nixl_etcd_subscribe(
                self.0,
                e.as_ref().map_or(std::ptr::null(), |e| e.as_ptr()),
                Some(forward),
                &*tx as *const _ as *mut std::ffi::c_void,
                &mut id,
            )
        })?;
        Ok(Subscription { id, rx, _tx: tx })
    }

    pub fn unsubscribe(&self, id: u64) -> Result<(), Failure> {
        check(unsafe { nixl_etcd_unsubscribe(self.0, id) })
    }

    pub fn wait_engine(&self, engine: &str, timeout_ms: i64) -> Result<u32, Failure> {
        let e = CString::new(engine).unwrap();
        let mut size = 0u32;
        check(unsafe { nixl_etcd_wait_engine(self.0, e.as_ptr(), timeout_ms, &mut size) })?;
        Ok(size)
    }

    pub fn lookup_record(&self, engine: &str, rank: u32) -> Result<OwnedRecord, Failure> {
        let e = CString::new(engine).unwrap();
        let mut rec: nixl_etcd_record = unsafe { std::mem::zeroed() };
        check(unsafe { nixl_etcd_lookup_record(self.0, e.as_ptr(), rank, &mut rec) })?;
        let text =
            |p: *mut std::ffi::c_char| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
        let out = OwnedRecord {
            engine_id: text(rec.engine_id),
            rank: rec.rank,
            world_size: rec.world_size,
            host: text(rec.host),
            pid: rec.pid,
            incarnation: text(rec.incarnation),
            registered_at_ms: rec.registered_at_ms,
            revision: rec.revision,
            metadata: take(&mut rec.metadata),
        };
        unsafe { nixl_etcd_record_free(&mut rec) };
        assert!(rec.engine_id.is_null() && rec.host.is_null() && rec.incarnation.is_null());
        Ok(out)
    }
}

/// `nixl_etcd_target_ranks` with room for `cap` ranks.
pub fn target_ranks(
    local_tp: u32,
    local_rank: u32,
    remote_tp: u32,
    cap: usize,
) -> Result<Vec<u32>, (Failure, usize)> {
    let mut out = vec![0u32; cap];
    let mut n = 0usize;
    let rc = unsafe {
        nixl_etcd_target_ranks(
            local_tp,
            local_rank,
            remote_tp,
            out.as_mut_ptr(),
            cap,
            &mut n,
        )
    };
    match check(rc) {
        Ok(()) => {
            out.truncate(n);
            Ok(out)
        }
        Err(f) => Err((f, n)),
    }
}

/// A C string for an optional argument (NULL when `None`).
fn opt_cstring(s: Option<&str>) -> Option<CString> {
    s.map(|s| CString::new(s).unwrap())
}

fn opt_ptr(s: &Option<CString>) -> *const std::ffi::c_char {
    s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr())
}

/// The NIXL-native layout (`nixl_etcd_*_nixl`).
impl Handle {
    pub fn publish_nixl(
        &self,
        agent: &str,
        label: Option<&str>,
        blob: &[u8],
    ) -> Result<(), Failure> {
        let a = CString::new(agent).unwrap();
        let l = opt_cstring(label);
        check(unsafe {
            nixl_etcd_publish_nixl(self.0, a.as_ptr(), opt_ptr(&l), blob.as_ptr(), blob.len())
        })
    }

    pub fn fetch_nixl(
        &self,
        agent: &str,
        label: Option<&str>,
        timeout_ms: i64,
    ) -> Result<Vec<u8>, Failure> {
        let a = CString::new(agent).unwrap();
        let l = opt_cstring(label);
        let mut buf = nixl_etcd_buffer {
            data: std::ptr::null_mut(),
            len: 0,
        };
        check(unsafe {
            nixl_etcd_fetch_nixl(self.0, a.as_ptr(), opt_ptr(&l), timeout_ms, &mut buf)
        })?;
        Ok(take(&mut buf))
    }

    pub fn unpublish_nixl(&self, agent: &str) -> Result<(), Failure> {
        let a = CString::new(agent).unwrap();
        check(unsafe { nixl_etcd_unpublish_nixl(self.0, a.as_ptr()) })
    }
}
