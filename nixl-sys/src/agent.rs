//! A safe layer over the raw bindings: agents, backends, registered memory,
//! metadata, transfers and notifications.

use std::ffi::{c_char, c_void, CStr, CString};
use std::ptr::null_mut;
use std::time::{Duration, Instant};

use crate::loader::{api, Error, Result};
use crate::raw::{self, NixlCapi};

fn check(status: raw::nixl_capi_status_t, op: &str) -> Result<()> {
    if status == raw::nixl_capi_status_t_NIXL_CAPI_SUCCESS {
        return Ok(());
    }
    let what = match status {
        raw::nixl_capi_status_t_NIXL_CAPI_ERROR_INVALID_PARAM => "invalid parameter",
        raw::nixl_capi_status_t_NIXL_CAPI_ERROR_BACKEND => "backend error",
        raw::nixl_capi_status_t_NIXL_CAPI_ERROR_INVALID_STATE => "invalid state",
        raw::nixl_capi_status_t_NIXL_CAPI_ERROR_EXCEPTION => "exception inside NIXL",
        raw::nixl_capi_status_t_NIXL_CAPI_ERROR_NOT_FOUND => "not found",
        raw::nixl_capi_status_t_NIXL_CAPI_IN_PROG => "still in progress",
        _ => "unknown error",
    };
    Err(Error::new(
        status,
        format!("NIXL {op} failed: {what} (status {status})"),
    ))
}

fn cstring(s: &str, what: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::new(-1, format!("{what} contains a NUL byte")))
}

/// Where a region lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemType {
    /// Host memory.
    Dram,
    /// GPU memory; the descriptors' `dev_id` is the CUDA device.
    Vram,
}

impl MemType {
    fn raw(self) -> raw::nixl_capi_mem_type_t {
        match self {
            MemType::Dram => raw::nixl_capi_mem_type_t_NIXL_CAPI_MEM_DRAM,
            MemType::Vram => raw::nixl_capi_mem_type_t_NIXL_CAPI_MEM_VRAM,
        }
    }
}

/// Direction of a transfer, seen from the local agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XferOp {
    /// Remote to local.
    Read,
    /// Local to remote.
    Write,
}

/// A notification received from a remote agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    pub from: String,
    pub message: Vec<u8>,
}

/// Optional arguments (backend, notification message), freed on drop.
struct OptArgs {
    api: &'static NixlCapi,
    raw: raw::nixl_capi_opt_args_t,
}

impl OptArgs {
    fn new(api: &'static NixlCapi, backend: Option<&Backend>) -> Result<OptArgs> {
        let mut raw = null_mut();
        // SAFETY: `raw` is a valid out pointer.
        check(
            unsafe { api.nixl_capi_create_opt_args(&mut raw) },
            "create_opt_args",
        )?;
        let args = OptArgs { api, raw };
        if let Some(b) = backend {
            // SAFETY: both handles are live.
            check(
                unsafe { api.nixl_capi_opt_args_add_backend(args.raw, b.raw) },
                "opt_args_add_backend",
            )?;
        }
        Ok(args)
    }

    fn notify(&self, message: &[u8]) -> Result<()> {
        // SAFETY: the message is valid for its length; NIXL copies it.
        unsafe {
            check(
                self.api.nixl_capi_opt_args_set_notif_msg(
                    self.raw,
                    message.as_ptr().cast(),
                    message.len(),
                ),
                "opt_args_set_notif_msg",
            )?;
            check(
                self.api.nixl_capi_opt_args_set_has_notif(self.raw, true),
                "opt_args_set_has_notif",
            )
        }
    }
}

impl Drop for OptArgs {
    fn drop(&mut self) {
        // SAFETY: created by create_opt_args, destroyed once.
        unsafe { self.api.nixl_capi_destroy_opt_args(self.raw) };
    }
}

/// A NIXL agent. Not `Sync`: NIXL agents are created without thread
/// synchronization; use one from one thread at a time.
pub struct Agent {
    api: &'static NixlCapi,
    raw: raw::nixl_capi_agent_t,
    name: String,
}

// SAFETY: the agent may move between threads; it is used by one at a time.
unsafe impl Send for Agent {}

impl Agent {
    /// Creates an agent named `name` (unique among the agents that exchange
    /// metadata).
    pub fn new(name: &str) -> Result<Agent> {
        let api = api()?;
        let c = cstring(name, "agent name")?;
        let mut raw = null_mut();
        // SAFETY: valid C string and out pointer.
        check(
            unsafe { api.nixl_capi_create_agent(c.as_ptr(), &mut raw) },
            "create_agent",
        )?;
        Ok(Agent {
            api,
            raw,
            name: name.to_owned(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The raw handle, for C APIs that take a `nixl_capi_agent_t`.
    pub fn as_raw(&self) -> raw::nixl_capi_agent_t {
        self.raw
    }

    /// Names of the backend plugins NIXL found.
    pub fn plugins(&self) -> Result<Vec<String>> {
        let mut list = null_mut();
        // SAFETY: live agent, valid out pointer.
        check(
            unsafe {
                self.api
                    .nixl_capi_get_available_plugins(self.raw, &mut list)
            },
            "get_available_plugins",
        )?;
        let mut n = 0usize;
        let mut out = Vec::new();
        // SAFETY: `list` is live until destroyed below; strings are copied.
        unsafe {
            let res = check(
                self.api.nixl_capi_string_list_size(list, &mut n),
                "string_list_size",
            );
            for i in 0..n {
                let mut s: *const c_char = std::ptr::null();
                if res.is_ok()
                    && self.api.nixl_capi_string_list_get(list, i, &mut s) == 0
                    && !s.is_null()
                {
                    out.push(CStr::from_ptr(s).to_string_lossy().into_owned());
                }
            }
            self.api.nixl_capi_destroy_string_list(list);
            res?;
        }
        Ok(out)
    }

    /// Creates a backend from a plugin (e.g. "UCX") with its default
    /// parameters, overridden by `params`.
    pub fn create_backend(&self, plugin: &str, params: &[(&str, &str)]) -> Result<Backend> {
        let name = cstring(plugin, "plugin name")?;
        let mut mems = null_mut();
        let mut defaults = null_mut();
        // SAFETY: live agent; out pointers valid; lists destroyed below.
        unsafe {
            check(
                self.api.nixl_capi_get_plugin_params(
                    self.raw,
                    name.as_ptr(),
                    &mut mems,
                    &mut defaults,
                ),
                "get_plugin_params",
            )?;
            self.api.nixl_capi_destroy_mem_list(mems);
            for (k, v) in params {
                let (k, v) = (
                    cstring(k, "parameter name")?,
                    cstring(v, "parameter value")?,
                );
                check(
                    self.api
                        .nixl_capi_params_add(defaults, k.as_ptr(), v.as_ptr()),
                    "params_add",
                )
                .inspect_err(|_| {
                    self.api.nixl_capi_destroy_params(defaults);
                })?;
            }
            let mut backend = null_mut();
            let res = check(
                self.api
                    .nixl_capi_create_backend(self.raw, name.as_ptr(), defaults, &mut backend),
                "create_backend",
            );
            self.api.nixl_capi_destroy_params(defaults);
            res?;
            Ok(Backend {
                api: self.api,
                raw: backend,
            })
        }
    }

    /// Registers regions `(address, length, device id)` of one memory type
    /// with `backend`; deregistered when the result is dropped (drop it
    /// before the memory is freed).
    pub fn register<'a>(
        &'a self,
        mem: MemType,
        regions: &[(usize, usize, u64)],
        backend: &Backend,
    ) -> Result<Registration<'a>> {
        let mut dlist = null_mut();
        // SAFETY: out pointer valid; the list is owned by the Registration.
        check(
            unsafe { self.api.nixl_capi_create_reg_dlist(mem.raw(), &mut dlist) },
            "create_reg_dlist",
        )?;
        let mut reg = Registration {
            agent: self,
            dlist,
            registered: false,
            backend: backend.raw,
        };
        for &(addr, len, dev) in regions {
            // SAFETY: live list; no per-descriptor metadata.
            check(
                unsafe {
                    self.api.nixl_capi_reg_dlist_add_desc(
                        dlist,
                        addr,
                        len,
                        dev,
                        std::ptr::null(),
                        0,
                    )
                },
                "reg_dlist_add_desc",
            )?;
        }
        let args = OptArgs::new(self.api, Some(backend))?;
        // SAFETY: live agent, list and args.
        check(
            unsafe { self.api.nixl_capi_register_mem(self.raw, dlist, args.raw) },
            "register_mem",
        )?;
        reg.registered = true;
        Ok(reg)
    }

    /// This agent's metadata blob (binary: pass it as bytes, never as a
    /// C string).
    pub fn local_metadata(&self) -> Result<Vec<u8>> {
        // SAFETY: a live agent of ours.
        unsafe { local_metadata_of(self.raw) }
    }

    /// Loads a remote agent's metadata; returns the remote agent's name.
    pub fn load_remote_metadata(&self, metadata: &[u8]) -> Result<String> {
        // SAFETY: a live agent of ours.
        unsafe { load_remote_metadata_into(self.raw, metadata) }
    }

    /// Forgets a remote agent (after it restarted or left).
    pub fn invalidate_remote(&self, remote: &str) -> Result<()> {
        // SAFETY: a live agent of ours.
        unsafe { invalidate_remote_of(self.raw, remote) }
    }

    /// Connects to a loaded remote agent now rather than on the first
    /// transfer to it.
    pub fn make_connection(&self, remote: &str) -> Result<()> {
        // SAFETY: a live agent of ours.
        unsafe { make_connection_of(self.raw, remote) }
    }

    /// Whether the remote agent's metadata is loaded.
    pub fn has_remote(&self, remote: &str) -> bool {
        let Ok(c) = cstring(remote, "remote agent name") else {
            return false;
        };
        // SAFETY: live agent; a NULL descriptor list asks about the agent only.
        unsafe {
            self.api
                .nixl_capi_check_remote_md(self.raw, c.as_ptr(), null_mut())
                == 0
        }
    }

    /// Publishes this agent's metadata through NIXL's own exchange (etcd when
    /// `NIXL_ETCD_ENDPOINTS` is set).
    pub fn send_local_metadata(&self) -> Result<()> {
        let args = OptArgs::new(self.api, None)?;
        // SAFETY: live agent and args.
        check(
            unsafe { self.api.nixl_capi_send_local_md(self.raw, args.raw) },
            "send_local_md",
        )
    }

    /// Asks NIXL's own exchange to fetch `remote`'s metadata (asynchronous:
    /// poll [`Agent::has_remote`]).
    pub fn fetch_remote_metadata(&self, remote: &str) -> Result<()> {
        let c = cstring(remote, "remote agent name")?;
        let args = OptArgs::new(self.api, None)?;
        // SAFETY: live agent, args and C string.
        check(
            unsafe {
                self.api
                    .nixl_capi_fetch_remote_md(self.raw, c.as_ptr(), args.raw)
            },
            "fetch_remote_md",
        )
    }

    /// Removes this agent's metadata from NIXL's own exchange.
    pub fn invalidate_local_metadata(&self) -> Result<()> {
        let args = OptArgs::new(self.api, None)?;
        // SAFETY: live agent and args.
        check(
            unsafe { self.api.nixl_capi_invalidate_local_md(self.raw, args.raw) },
            "invalidate_local_md",
        )
    }

    /// Prepares a transfer between local regions and `remote`'s regions
    /// (same count, same lengths), optionally notifying `remote` with
    /// `notify` once it completes.
    #[allow(clippy::too_many_arguments)]
    pub fn transfer<'a>(
        &'a self,
        op: XferOp,
        mem: (MemType, MemType),
        local: &[(usize, usize, u64)],
        remote_agent: &str,
        remote: &[(usize, usize, u64)],
        backend: &Backend,
        notify: Option<&[u8]>,
    ) -> Result<XferReq<'a>> {
        self.transfer_via(op, mem, local, remote_agent, remote, Some(backend), notify)
    }

    /// [`Agent::transfer`], with the backend NIXL chooses when `backend` is
    /// `None`.
    #[allow(clippy::too_many_arguments)]
    fn transfer_via<'a>(
        &'a self,
        op: XferOp,
        mem: (MemType, MemType),
        local: &[(usize, usize, u64)],
        remote_agent: &str,
        remote: &[(usize, usize, u64)],
        backend: Option<&Backend>,
        notify: Option<&[u8]>,
    ) -> Result<XferReq<'a>> {
        let lists = [(mem.0, local), (mem.1, remote)];
        let mut raw_lists = [null_mut(); 2];
        let destroy = |lists: &[raw::nixl_capi_xfer_dlist_t; 2]| {
            for l in lists.iter().filter(|l| !l.is_null()) {
                // SAFETY: created below, destroyed once.
                unsafe { self.api.nixl_capi_destroy_xfer_dlist(*l) };
            }
        };
        for (i, (m, regions)) in lists.iter().enumerate() {
            // SAFETY: valid out pointer.
            let made = check(
                unsafe {
                    self.api
                        .nixl_capi_create_xfer_dlist(m.raw(), &mut raw_lists[i])
                },
                "create_xfer_dlist",
            );
            let added = made.and_then(|_| {
                regions.iter().try_for_each(|&(addr, len, dev)| {
                    // SAFETY: live list.
                    check(
                        unsafe {
                            self.api
                                .nixl_capi_xfer_dlist_add_desc(raw_lists[i], addr, len, dev)
                        },
                        "xfer_dlist_add_desc",
                    )
                })
            });
            if let Err(e) = added {
                destroy(&raw_lists);
                return Err(e);
            }
        }
        let remote_c = cstring(remote_agent, "remote agent name")?;
        let args = OptArgs::new(self.api, backend)?;
        if let Some(msg) = notify {
            args.notify(msg)?;
        }
        let op = match op {
            XferOp::Read => raw::nixl_capi_xfer_op_t_NIXL_CAPI_XFER_OP_READ,
            XferOp::Write => raw::nixl_capi_xfer_op_t_NIXL_CAPI_XFER_OP_WRITE,
        };
        let mut req = null_mut();
        // SAFETY: live agent, lists and args; NIXL copies the lists.
        let made = check(
            unsafe {
                self.api.nixl_capi_create_xfer_req(
                    self.raw,
                    op,
                    raw_lists[0],
                    raw_lists[1],
                    remote_c.as_ptr(),
                    &mut req,
                    args.raw,
                )
            },
            "create_xfer_req",
        );
        destroy(&raw_lists);
        made?;
        Ok(XferReq {
            agent: self,
            raw: req,
        })
    }

    /// Notifications received since the last call.
    pub fn notifications(&self) -> Result<Vec<Notification>> {
        let mut map = null_mut();
        // SAFETY: valid out pointer; map destroyed below.
        check(
            unsafe { self.api.nixl_capi_create_notif_map(&mut map) },
            "create_notif_map",
        )?;
        let mut out = Vec::new();
        let res = (|| -> Result<()> {
            let args = OptArgs::new(self.api, None)?;
            // SAFETY: live agent, map and args; strings and data are copied
            // before the map is destroyed.
            unsafe {
                check(
                    self.api.nixl_capi_get_notifs(self.raw, map, args.raw),
                    "get_notifs",
                )?;
                let mut agents = 0usize;
                check(
                    self.api.nixl_capi_notif_map_size(map, &mut agents),
                    "notif_map_size",
                )?;
                for i in 0..agents {
                    let mut name: *const c_char = std::ptr::null();
                    check(
                        self.api.nixl_capi_notif_map_get_agent_at(map, i, &mut name),
                        "notif_map_get_agent_at",
                    )?;
                    let mut n = 0usize;
                    check(
                        self.api
                            .nixl_capi_notif_map_get_notifs_size(map, name, &mut n),
                        "notif_map_get_notifs_size",
                    )?;
                    let from = CStr::from_ptr(name).to_string_lossy().into_owned();
                    for j in 0..n {
                        let mut data: *const c_void = std::ptr::null();
                        let mut len = 0usize;
                        check(
                            self.api
                                .nixl_capi_notif_map_get_notif(map, name, j, &mut data, &mut len),
                            "notif_map_get_notif",
                        )?;
                        let message = if data.is_null() {
                            Vec::new()
                        } else {
                            std::slice::from_raw_parts(data.cast::<u8>(), len).to_vec()
                        };
                        out.push(Notification {
                            from: from.clone(),
                            message,
                        });
                    }
                }
            }
            Ok(())
        })();
        // SAFETY: created above, destroyed once.
        unsafe { self.api.nixl_capi_destroy_notif_map(map) };
        res.map(|_| out)
    }

    /// Waits until a notification from `from` whose message equals `message`
    /// arrives; other notifications are returned too.
    pub fn wait_notification(
        &self,
        from: Option<&str>,
        message: &[u8],
        timeout: Duration,
    ) -> Result<Vec<Notification>> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let batch = self.notifications()?;
            let hit = batch
                .iter()
                .any(|n| n.message == message && from.is_none_or(|f| f == n.from));
            seen.extend(batch);
            if hit {
                return Ok(seen);
            }
            if Instant::now() >= deadline {
                return Err(Error::new(
                    -3,
                    format!(
                        "no NIXL notification {:?} within {timeout:?}",
                        String::from_utf8_lossy(message)
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Sends a notification to `remote`.
    pub fn notify(&self, remote: &str, message: &[u8], backend: &Backend) -> Result<()> {
        let c = cstring(remote, "remote agent name")?;
        let args = OptArgs::new(self.api, Some(backend))?;
        // SAFETY: live agent and args; the message is copied.
        check(
            unsafe {
                self.api.nixl_capi_gen_notif(
                    self.raw,
                    c.as_ptr(),
                    message.as_ptr().cast(),
                    message.len(),
                    args.raw,
                )
            },
            "gen_notif",
        )
    }
}

/// The metadata blob of an agent created elsewhere (e.g. by a C engine).
///
/// # Safety
/// `agent` is a live `nixl_capi_agent_t` not used concurrently.
pub unsafe fn local_metadata_of(agent: raw::nixl_capi_agent_t) -> Result<Vec<u8>> {
    let api = api()?;
    if agent.is_null() {
        return Err(Error::new(-1, "NIXL agent is NULL"));
    }
    let mut data: *mut c_void = null_mut();
    let mut len = 0usize;
    check(
        api.nixl_capi_get_local_md(agent, &mut data, &mut len),
        "get_local_md",
    )?;
    let out = if data.is_null() {
        Vec::new()
    } else {
        std::slice::from_raw_parts(data.cast::<u8>(), len).to_vec()
    };
    // NIXL malloc()s the blob.
    libc::free(data);
    Ok(out)
}

/// Loads `metadata` into an agent created elsewhere; returns the remote
/// agent's name.
///
/// # Safety
/// `agent` is a live `nixl_capi_agent_t` not used concurrently.
pub unsafe fn load_remote_metadata_into(
    agent: raw::nixl_capi_agent_t,
    metadata: &[u8],
) -> Result<String> {
    let api = api()?;
    if agent.is_null() {
        return Err(Error::new(-1, "NIXL agent is NULL"));
    }
    let mut name: *mut c_char = null_mut();
    check(
        api.nixl_capi_load_remote_md(agent, metadata.as_ptr().cast(), metadata.len(), &mut name),
        "load_remote_md",
    )?;
    if name.is_null() {
        return Err(Error::new(-3, "NIXL load_remote_md returned no agent name"));
    }
    let out = CStr::from_ptr(name).to_string_lossy().into_owned();
    // NIXL strdup()s the name.
    libc::free(name.cast());
    Ok(out)
}

/// Forgets a remote agent in an agent created elsewhere.
///
/// # Safety
/// `agent` is a live `nixl_capi_agent_t` not used concurrently.
pub unsafe fn invalidate_remote_of(agent: raw::nixl_capi_agent_t, remote: &str) -> Result<()> {
    let api = api()?;
    if agent.is_null() {
        return Err(Error::new(-1, "NIXL agent is NULL"));
    }
    let c = cstring(remote, "remote agent name")?;
    check(
        api.nixl_capi_invalidate_remote_md(agent, c.as_ptr()),
        "invalidate_remote_md",
    )
}

/// Connects `agent` to the loaded remote agent `remote` now (NIXL's
/// `makeConnection`), so that the first transfer does not pay for it.
///
/// # Safety
/// `agent` is a live `nixl_capi_agent_t` not used concurrently.
pub unsafe fn make_connection_of(agent: raw::nixl_capi_agent_t, remote: &str) -> Result<()> {
    let api = api()?;
    if agent.is_null() {
        return Err(Error::new(-1, "NIXL agent is NULL"));
    }
    let c = cstring(remote, "remote agent name")?;
    check(
        api.nixl_capi_agent_make_connection(agent, c.as_ptr(), null_mut()),
        "make_connection",
    )
}

/// READs `local.len()` regions of `remote_agent` (loaded already) into
/// `local` in an agent created elsewhere, through the backend NIXL chooses,
/// and waits up to `timeout` for completion.
///
/// # Safety
/// `agent` is a live `nixl_capi_agent_t` not used concurrently; the local
/// regions are registered with it and writable.
pub unsafe fn read_of(
    agent: raw::nixl_capi_agent_t,
    mem: (MemType, MemType),
    local: &[(usize, usize, u64)],
    remote_agent: &str,
    remote: &[(usize, usize, u64)],
    timeout: Duration,
) -> Result<()> {
    let api = api()?;
    if agent.is_null() {
        return Err(Error::new(-1, "NIXL agent is NULL"));
    }
    // Borrowed, not owned: never destroyed here.
    let borrowed = std::mem::ManuallyDrop::new(Agent {
        api,
        raw: agent,
        name: String::new(),
    });
    let req = borrowed.transfer_via(XferOp::Read, mem, local, remote_agent, remote, None, None)?;
    req.run(timeout)
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SAFETY: created by create_agent, destroyed once; registrations and
        // requests borrow the agent, so they are gone already.
        unsafe { self.api.nixl_capi_destroy_agent(self.raw) };
    }
}

/// An initialized backend (e.g. UCX). Owned by its agent inside NIXL; the
/// handle is released on drop.
pub struct Backend {
    api: &'static NixlCapi,
    raw: raw::nixl_capi_backend_t,
}

// SAFETY: a handle used by one thread at a time.
unsafe impl Send for Backend {}

impl Drop for Backend {
    fn drop(&mut self) {
        // SAFETY: created by create_backend, released once.
        unsafe { self.api.nixl_capi_destroy_backend(self.raw) };
    }
}

/// Registered memory; deregistered on drop.
pub struct Registration<'a> {
    agent: &'a Agent,
    dlist: raw::nixl_capi_reg_dlist_t,
    registered: bool,
    backend: raw::nixl_capi_backend_t,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        let api = self.agent.api;
        // SAFETY: the list was registered with this agent and backend.
        unsafe {
            if self.registered {
                let mut args = null_mut();
                if api.nixl_capi_create_opt_args(&mut args) == 0 {
                    api.nixl_capi_opt_args_add_backend(args, self.backend);
                    api.nixl_capi_deregister_mem(self.agent.raw, self.dlist, args);
                    api.nixl_capi_destroy_opt_args(args);
                }
            }
            api.nixl_capi_destroy_reg_dlist(self.dlist);
        }
    }
}

/// A prepared transfer.
pub struct XferReq<'a> {
    agent: &'a Agent,
    raw: raw::nixl_capi_xfer_req_t,
}

impl XferReq<'_> {
    /// Starts the transfer; `true` if it already completed.
    pub fn post(&self) -> Result<bool> {
        // SAFETY: live agent and request.
        let s = unsafe {
            self.agent
                .api
                .nixl_capi_post_xfer_req(self.agent.raw, self.raw, null_mut())
        };
        if s == raw::nixl_capi_status_t_NIXL_CAPI_IN_PROG {
            return Ok(false);
        }
        check(s, "post_xfer_req").map(|_| true)
    }

    /// `true` once complete; an error if the transfer failed.
    pub fn done(&self) -> Result<bool> {
        // SAFETY: live agent and request.
        let s = unsafe {
            self.agent
                .api
                .nixl_capi_get_xfer_status(self.agent.raw, self.raw)
        };
        if s == raw::nixl_capi_status_t_NIXL_CAPI_IN_PROG {
            return Ok(false);
        }
        check(s, "get_xfer_status").map(|_| true)
    }

    /// Posts and polls until complete or `timeout`.
    pub fn run(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut done = self.post()?;
        while !done {
            if Instant::now() >= deadline {
                return Err(Error::new(
                    1,
                    format!("NIXL transfer not complete within {timeout:?}"),
                ));
            }
            std::hint::spin_loop();
            done = self.done()?;
        }
        Ok(())
    }
}

impl Drop for XferReq<'_> {
    fn drop(&mut self) {
        // SAFETY: release the NIXL request, then the wrapper, once each.
        unsafe {
            self.agent
                .api
                .nixl_capi_release_xfer_req(self.agent.raw, self.raw);
            self.agent.api.nixl_capi_destroy_xfer_req(self.raw);
        }
    }
}
