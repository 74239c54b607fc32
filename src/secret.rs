//! Secrets (passwords, key material) in a wrapper that never prints them:
//! `Debug` shows `Secret(<redacted>)`, there is no `Display`, and the bytes
//! are overwritten when the value is dropped.

use std::fmt;
use std::path::Path;

/// A secret byte string. Read it with [`Secret::expose`] only where it is
/// handed to etcd or to a MAC, never into a message.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Secret {
        Secret(bytes.into())
    }

    /// The secret bytes.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// The secret as text (etcd's password is a string), or None when it is
    /// not UTF-8.
    pub fn expose_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.0).ok()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Reads a secret file: its bytes, less one trailing newline ("\n" or
    /// "\r\n"), so `echo "$PASSWORD" > file` works. `what` names the setting
    /// in the error (never the content).
    pub fn read_file(path: &Path, what: &str) -> Result<Secret, String> {
        let mut bytes = std::fs::read(path)
            .map_err(|e| format!("cannot read {what}={}: {e}", path.display()))?;
        if bytes.last() == Some(&b'\n') {
            bytes.pop();
            if bytes.last() == Some(&b'\r') {
                bytes.pop();
            }
        }
        if bytes.is_empty() {
            return Err(format!("{what}={} is empty", path.display()));
        }
        Ok(Secret(bytes))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        for b in self.0.iter_mut() {
            // SAFETY: a valid, aligned &mut u8; volatile so the zeroing is
            // not optimized away as a dead store.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_secret() {
        let s = Secret::new("hunter2-password");
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
        assert_eq!(format!("{:?}", Some(s.clone())), "Some(Secret(<redacted>))");
        assert_eq!(s.expose(), b"hunter2-password");
    }

    #[test]
    fn files_lose_one_trailing_newline_and_errors_name_only_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, "s3cret\r\n").unwrap();
        assert_eq!(Secret::read_file(&p, "X").unwrap().expose(), b"s3cret");
        std::fs::write(&p, "s3cret\n\n").unwrap();
        assert_eq!(Secret::read_file(&p, "X").unwrap().expose(), b"s3cret\n");
        std::fs::write(&p, "\n").unwrap();
        let e = Secret::read_file(&p, "X").unwrap_err();
        assert!(e.contains("is empty"), "{e}");
        let e = Secret::read_file(&dir.path().join("none"), "X").unwrap_err();
        assert!(e.starts_with("cannot read X="), "{e}");
    }
}
