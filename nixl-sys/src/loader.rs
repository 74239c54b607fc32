//! Finding and loading `libnixl_capi.so`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::raw::NixlCapi;

/// A failed NIXL call, or NIXL not being available.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// The `nixl_capi_status_t` (0 when NIXL could not be loaded).
    pub status: i32,
    pub message: String,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn new(status: i32, message: impl Into<String>) -> Self {
        Error {
            status,
            message: message.into(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

const LIB_NAME: &str = "libnixl_capi.so";
/// Where the PyPI wheels `nixl-cu12` / `nixl-cu13` put their libraries,
/// relative to site-packages.
const WHEEL_DIRS: &[&str] = &[".nixl_cu12.mesonpy.libs", ".nixl_cu13.mesonpy.libs"];

static LOADED: OnceLock<std::result::Result<(NixlCapi, PathBuf), String>> = OnceLock::new();

/// The NIXL C API, loaded on first use from (in order) `NIXL_CAPI_LIB` (the
/// file, or a directory holding it), the dynamic loader's search path, or the
/// site-packages of `python3` (or `$NIXL_PYTHON`) holding the `nixl-cu12` /
/// `nixl-cu13` wheel.
pub fn api() -> Result<&'static NixlCapi> {
    LOADED
        .get_or_init(load)
        .as_ref()
        .map(|(api, _)| api)
        .map_err(|e| Error::new(0, e.clone()))
}

/// The path the library was loaded from, once [`api`] succeeded.
pub fn library_path() -> Option<&'static Path> {
    LOADED
        .get()
        .and_then(|r| r.as_ref().ok())
        .map(|(_, p)| p.as_path())
}

fn load() -> std::result::Result<(NixlCapi, PathBuf), String> {
    let mut tried = Vec::new();
    for candidate in candidates() {
        // SAFETY: loading NIXL runs its initializers; that is what we want.
        match unsafe { NixlCapi::new(&candidate) } {
            Ok(api) => {
                // SAFETY: a plain function without arguments.
                if unsafe { api.nixl_capi_is_stub() } {
                    tried.push(format!(
                        "{} (a stub build without NIXL)",
                        candidate.display()
                    ));
                    continue;
                }
                return Ok((api, candidate));
            }
            Err(e) => tried.push(format!("{}: {e}", candidate.display())),
        }
    }
    Err(format!(
        "NIXL's C API library ({LIB_NAME}) could not be loaded; set NIXL_CAPI_LIB to its path, or \
         install NIXL (pip install --no-deps nixl==1.5.1 nixl-cu12==1.5.1). Tried: {}",
        tried.join("; ")
    ))
}

fn candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(p) = std::env::var_os("NIXL_CAPI_LIB").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        out.push(if p.is_dir() { p.join(LIB_NAME) } else { p });
    }
    // A bare name: the dynamic loader searches LD_LIBRARY_PATH and its cache.
    out.push(PathBuf::from(LIB_NAME));
    for dir in python_site_dirs() {
        for wheel in WHEEL_DIRS {
            let lib = dir.join(wheel).join(LIB_NAME);
            if lib.exists() {
                out.push(lib);
            }
        }
    }
    out
}

/// site-packages directories of the Python that has (or would have) NIXL.
fn python_site_dirs() -> Vec<PathBuf> {
    let python = std::env::var("NIXL_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = "import site, sys\n\
                  dirs = list(getattr(site, 'getsitepackages', lambda: [])())\n\
                  dirs.append(site.getusersitepackages())\n\
                  print('\\n'.join(dirs + sys.path))";
    std::process::Command::new(python)
        .args(["-c", script])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(PathBuf::from)
                .collect()
        })
        .unwrap_or_default()
}
