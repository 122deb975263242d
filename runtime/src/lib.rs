//! pxelab's stack: the boot handler (HTTP) and the supervisor of dnsmasq and nfs-ganesha, as a
//! library so the `pxelab-stack` binary is only argument parsing and tests can run the real
//! thing in-process.
//!
//! Code map: [`server`] owns sockets and HTTP framing; [`handler`] lists every route and renders
//! replies from [`ipxe`], [`cloudinit`], [`files`], [`events`] and [`vms`]; [`dnsmasq`] renders
//! dnsmasq's configuration and runs it as a child; [`nfsroot`] unpacks distro roots for diskless
//! targets and [`nfs`] runs ganesha to export them; [`supervisor`] wires them together and owns
//! the main loop; [`signals`] turns SIGTERM/SIGINT/SIGHUP into flags that loop polls.
//!
//! Invariant: nothing here writes outside the state directory, except the diskless roots
//! ([`nfsroot`]), which are unpacked next to the distro archive they come from.

pub mod cloudinit;
pub mod dnsmasq;
pub mod events;
pub mod files;
pub mod handler;
pub mod ipxe;
pub mod nfs;
pub mod nfsroot;
pub mod server;
pub mod signals;
pub mod supervisor;
pub mod vms;

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One log line on stderr, prefixed so it stands out in a container's or lab's combined log.
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => {
        eprintln!("pxelab-stack: {}", format_args!($($arg)*))
    };
}

/// Writes `bytes` to `path` atomically: a temp file in the same directory, fsync'd (when
/// `durable`), then renamed over `path`. Readers see the old or the new file, never half of one.
pub fn write_atomic(path: &std::path::Path, bytes: &[u8], durable: bool) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.tmp{}-{seq}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        if durable {
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
