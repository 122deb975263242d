//! pxelab's stack: the boot handler (HTTP) and the supervisor of dnsmasq and nfs-ganesha, as a
//! library so the `pxelab-stack` binary is only argument parsing and tests can run the real
//! thing in-process.
//!
//! Code map: [`server`] owns sockets and HTTP framing; [`handler`] lists every route and renders
//! replies from [`ipxe`], [`pxelab_contract::cloudinit`], [`files`], [`images`], [`events`] and
//! [`vms`], which keep what they serve in memory, follow changes through [`watch`] and persist
//! states through [`journal`]; [`dnsmasq`] renders dnsmasq's configuration; [`nfsroot`] unpacks
//! distro roots for diskless targets and [`nfs`] configures ganesha to export them; [`child`]
//! runs either as a supervised child; [`supervisor`] wires them together and owns the main
//! loop; [`signals`] turns SIGTERM/SIGINT/SIGHUP into flags that loop polls.
//!
//! Invariant: nothing here writes outside the state directory (the diskless roots of
//! [`nfsroot`] are unpacked into it, by [`pxelab_untar`], which never writes outside its target),
//! except the `<name>.json` files of the VMs directory that the enrollment API
//! (`handler/api.rs`, through [`vms::VmStore::put`]) writes and removes for the operator.

pub mod access;
pub mod child;
pub mod dnsmasq;
pub mod etcd;
pub mod events;
pub mod files;
pub mod handler;
pub mod images;
pub mod ipxe;
pub mod journal;
pub mod nfs;
pub mod nfsroot;
pub mod server;
pub mod signals;
pub mod supervisor;
pub mod vms;
pub mod watch;

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

/// Writes `bytes` to `path` atomically: a temp file in the same directory, renamed over `path`.
/// Readers see the old or the new file, never half of one. A `durable` write also survives a
/// power cut once this returns: the file is fsynced before the rename and the directory (which
/// holds the rename) after it.
pub fn write_atomic(path: &std::path::Path, bytes: &[u8], durable: bool) -> std::io::Result<()> {
    use std::io::Write;
    write_atomic_with(path, durable, |f| f.write_all(bytes))
}

/// [`write_atomic`] of what `fill` writes into the temp file: for a file too large to build in
/// memory first (the journal's snapshot).
pub fn write_atomic_with<T>(
    path: &std::path::Path,
    durable: bool,
    fill: impl FnOnce(&mut std::fs::File) -> std::io::Result<T>,
) -> std::io::Result<T> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.tmp{}-{seq}", std::process::id()));
    let result = (|| -> std::io::Result<T> {
        let mut f = std::fs::File::create(&tmp)?;
        let value = fill(&mut f)?;
        if durable {
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        Ok(value)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    let value = result?;
    if durable {
        sync_dir(dir)?;
    }
    Ok(value)
}

/// fsync of a directory: makes the creations, renames and removals in it durable.
pub fn sync_dir(dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    #[test]
    fn write_atomic_replaces_whole_files_and_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        for (text, durable) in [(&b"first"[..], false), (b"second, longer", true)] {
            super::write_atomic(&path, text, durable).unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), text);
        }
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "{names:?}");
        let missing = dir.path().join("no-such-dir/f");
        assert!(super::write_atomic(&missing, b"x", true).is_err());
    }
}
