//! Status codes (stable numbers, part of the C ABI) and the crate's error type.

use std::fmt;

/// Defines [`Status`] and everything derived from it from one table:
/// variant = number, C name (after `NIXL_ETCD_`), short text.
macro_rules! statuses {
    ($( $(#[$doc:meta])* $name:ident = $num:literal, $c:literal, $text:literal; )*) => {
        /// Result of every C call. The numbers are part of the ABI: never
        /// renumber, only append.
        #[repr(i32)]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Status {
            $( $(#[$doc])* $name = $num, )*
        }

        impl Status {
            /// Every status, in ABI order (0, -1, -2, ...).
            pub const ALL: &'static [Status] = &[$(Status::$name),*];

            /// A short, static description of the status.
            pub const fn as_str(self) -> &'static str {
                match self { $(Status::$name => $text,)* }
            }

            /// The same text NUL-terminated, for C.
            pub const fn as_cstr(self) -> &'static std::ffi::CStr {
                let bytes = match self { $(Status::$name => concat!($text, "\0").as_bytes(),)* };
                match std::ffi::CStr::from_bytes_with_nul(bytes) {
                    Ok(c) => c,
                    Err(_) => panic!("a status text holds a NUL"),
                }
            }

            /// The name of the C constant, e.g. `NIXL_ETCD_ERR_NOT_FOUND`.
            pub const fn c_name(self) -> &'static str {
                match self { $(Status::$name => concat!("NIXL_ETCD_", $c),)* }
            }
        }
    };
}

statuses! {
    Ok = 0, "OK", "ok";
    /// A NULL pointer, bad UTF-8, an invalid id, option or environment value.
    ErrInvalidArgument = -1, "ERR_INVALID_ARGUMENT", "invalid argument";
    /// etcd could not be reached.
    ErrConnection = -2, "ERR_CONNECTION", "etcd connection failed";
    /// No record for the engine and rank.
    ErrNotFound = -3, "ERR_NOT_FOUND", "not found";
    /// The call did not finish within its timeout.
    ErrTimeout = -4, "ERR_TIMEOUT", "timeout";
    /// The metadata is larger than what can be stored.
    ErrTooLarge = -5, "ERR_TOO_LARGE", "too large";
    /// The client was closed (or belongs to the parent of a forked process).
    ErrClosed = -6, "ERR_CLOSED", "client closed";
    /// A bug: a caught panic or an unexpected state.
    ErrInternal = -7, "ERR_INTERNAL", "internal error";
    /// A record in etcd could not be read (bad JSON, unknown format, wrong engine).
    ErrBadRecord = -8, "ERR_BAD_RECORD", "unreadable record";
    /// A NIXL call failed, or NIXL could not be loaded (feature `nixl`).
    ErrNixl = -9, "ERR_NIXL", "NIXL error";
    /// etcd refused the credentials, or the user's roles do not allow the
    /// operation on the key.
    ErrPermission = -10, "ERR_PERMISSION", "permission denied";
    /// Records are signed here (`VLLM_NIXL_ETCD_HMAC_KEY_FILE`) and a record
    /// in etcd has no signature, or one that does not verify.
    ErrBadSignature = -11, "ERR_BAD_SIGNATURE", "bad record signature";
}

impl Status {
    pub fn from_i32(v: i32) -> Option<Status> {
        Self::ALL.iter().copied().find(|s| *s as i32 == v)
    }
}

/// An error: a status plus a message that says what happened and what to check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub status: Status,
    pub message: String,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn new(status: Status, message: impl Into<String>) -> Self {
        Error {
            status,
            message: message.into(),
        }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(Status::ErrInvalidArgument, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(Status::ErrInternal, message)
    }
    pub fn closed() -> Self {
        Self::new(
            Status::ErrClosed,
            "the nixl-etcd client is closed; open a new one with nixl_etcd_open",
        )
    }
    /// A record refused because its signature is missing or wrong.
    pub fn bad_signature(key: &str, why: impl fmt::Display) -> Self {
        Self::new(
            Status::ErrBadSignature,
            format!("record at key {key} refused: {why}"),
        )
    }

    pub fn bad_record(key: &str, why: impl fmt::Display) -> Self {
        Self::new(
            Status::ErrBadRecord,
            format!(
                "record at key {key} is unreadable: {why}; check that every writer under this \
                 namespace runs a compatible nixl-etcd"
            ),
        )
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_numbers_are_stable() {
        assert_eq!(Status::Ok as i32, 0);
        assert_eq!(Status::ErrInvalidArgument as i32, -1);
        assert_eq!(Status::ErrConnection as i32, -2);
        assert_eq!(Status::ErrNotFound as i32, -3);
        assert_eq!(Status::ErrTimeout as i32, -4);
        assert_eq!(Status::ErrTooLarge as i32, -5);
        assert_eq!(Status::ErrClosed as i32, -6);
        assert_eq!(Status::ErrInternal as i32, -7);
        assert_eq!(Status::ErrBadRecord as i32, -8);
        assert_eq!(Status::ErrNixl as i32, -9);
        assert_eq!(Status::ErrPermission as i32, -10);
        assert_eq!(Status::ErrBadSignature as i32, -11);
    }

    #[test]
    fn every_status_round_trips_and_has_matching_texts() {
        for v in -11..=0 {
            let s = Status::from_i32(v).expect("known status");
            assert_eq!(s as i32, v);
            assert_eq!(s.as_cstr().to_str().unwrap(), s.as_str());
        }
        assert_eq!(Status::from_i32(1), None);
        assert_eq!(Status::from_i32(-12), None);
    }
}
