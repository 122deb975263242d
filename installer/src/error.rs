//! The installer's error type and console logging.
//!
//! Every failure ends as one console line and one `failed` event, so an error is just a message
//! that each layer prefixes with what it was doing; the step (phase) is added by `main`.

use std::fmt;

/// A one-line, human-readable failure: what was being done and why it failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(pub String);

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

/// Builds an [`Error`] from a message.
pub fn err(msg: impl Into<String>) -> Error {
    Error(msg.into())
}

/// `.context(|| "mounting /dev/vda2")` turns any displayable error into
/// `mounting /dev/vda2: <cause>`.
pub trait Context<T> {
    fn context<C: fmt::Display>(self, what: impl FnOnce() -> C) -> Result<T>;
}

impl<T, E: fmt::Display> Context<T> for std::result::Result<T, E> {
    fn context<C: fmt::Display>(self, what: impl FnOnce() -> C) -> Result<T> {
        self.map_err(|e| Error(format!("{}: {e}", what())))
    }
}

/// One console line, prefixed so it stands out among kernel messages on a serial console.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {
        eprintln!("pxelab-installer: {}", format_args!($($arg)*))
    };
}

/// `1536 MiB`, `2.5 GiB`: sizes as a person reads them on a console.
pub fn human_bytes(n: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    let mib = n as f64 / MIB;
    if mib >= 1024.0 {
        format!("{:.1} GiB", mib / 1024.0)
    } else if mib >= 1.0 {
        format!("{mib:.1} MiB")
    } else {
        format!("{n} bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_prefixes_the_cause() {
        let r: std::result::Result<(), &str> = Err("No such file");
        assert_eq!(
            r.context(|| "reading /x").unwrap_err().0,
            "reading /x: No such file"
        );
    }

    #[test]
    fn sizes_read_naturally() {
        assert_eq!(human_bytes(512), "512 bytes");
        assert_eq!(human_bytes(3 << 20), "3.0 MiB");
        assert_eq!(human_bytes(20 << 30), "20.0 GiB");
    }
}
