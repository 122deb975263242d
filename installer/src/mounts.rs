//! Mounts that are undone in reverse order, on success and on every failure path.
//!
//! [`Mounts`] is a stack: `unmount_all` syncs, then unmounts newest first, retrying a busy
//! target briefly; dropping the stack does the same, so an early return never leaves the target
//! disk mounted (and the ESP never stays mounted under a vanished root).
//!
//! A kernel without vfat (e.g. a minimal host kernel running the tests) cannot mount the ESP; if
//! `fusefat` is on the PATH the ESP is then mounted through it (in the foreground, as our child,
//! so unmounting waits until it has written everything). The initrd's kernel has vfat.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::partition::wait_until;

use crate::error::{err, Context, Result};
use crate::say;

#[derive(Debug)]
enum Kind {
    Filesystem,
    /// A FUSE filesystem served by this child process.
    Fuse(Child),
}

#[derive(Default)]
pub struct Mounts {
    stack: Vec<(PathBuf, Kind)>,
}

fn cstr(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| err(format!("path {} contains NUL", p.display())))
}

impl Mounts {
    pub fn new() -> Mounts {
        Mounts::default()
    }

    /// Mounts filesystem `fstype` from `source` on `target` (created if missing).
    pub fn mount(&mut self, source: &Path, target: &Path, fstype: &str, data: &str) -> Result<()> {
        fs::create_dir_all(target)
            .context(|| format!("creating mount point {}", target.display()))?;
        let (src, tgt) = (cstr(source)?, cstr(target)?);
        let fstype_c = CString::new(fstype).map_err(|_| err("bad fstype"))?;
        let data_c = CString::new(data).map_err(|_| err("bad mount data"))?;
        // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                tgt.as_ptr(),
                fstype_c.as_ptr(),
                0,
                data_c.as_ptr().cast(),
            )
        };
        if rc != 0 {
            let e = io::Error::last_os_error();
            if fstype == "vfat" && e.raw_os_error() == Some(libc::ENODEV) {
                return self.mount_fusefat(source, target);
            }
            return Err(err(format!(
                "mounting {} ({fstype}) on {}: {e}",
                source.display(),
                target.display()
            )));
        }
        self.stack.push((target.to_path_buf(), Kind::Filesystem));
        Ok(())
    }

    fn mount_fusefat(&mut self, source: &Path, target: &Path) -> Result<()> {
        say!(
            "the kernel has no vfat; mounting {} with fusefat",
            source.display()
        );
        let child = Command::new("fusefat")
            .args(["-f", "-o", "rw+"])
            .arg(source)
            .arg(target)
            // It prints debug chatter on stderr.
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                err(format!(
                    "mounting {}: the kernel has no vfat (load the vfat module) and fusefat is unavailable: {e}",
                    source.display()
                ))
            })?;
        let stack_entry = (target.to_path_buf(), Kind::Fuse(child));
        let mounted = wait_until(Duration::from_secs(5), || is_mount_point(target));
        self.stack.push(stack_entry);
        if !mounted {
            return Err(err(format!(
                "fusefat did not mount {} on {}",
                source.display(),
                target.display()
            )));
        }
        Ok(())
    }

    /// Syncs, then unmounts everything, newest first; reports the first failure.
    pub fn unmount_all(&mut self) -> Result<()> {
        // SAFETY: sync has no preconditions.
        unsafe { libc::sync() };
        let mut first_error = None;
        while !self.stack.is_empty() {
            let Some((target, kind)) = self.stack.pop() else {
                break;
            };
            if let Err(e) = unmount(&target, kind) {
                say!("{e}");
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        let _ = self.unmount_all();
    }
}

/// Unmounts, retrying while busy (a chrooted helper may still be exiting). A filesystem that
/// stays busy is an error, because its data may not be on disk.
fn unmount(target: &Path, kind: Kind) -> Result<()> {
    let tgt = cstr(target)?;
    if let Kind::Fuse(mut child) = kind {
        // SAFETY: valid NUL-terminated path.
        let rc = unsafe { libc::umount2(tgt.as_ptr(), 0) };
        let e = io::Error::last_os_error();
        if rc != 0 {
            let _ = child.kill();
        }
        let _ = child.wait();
        return if rc == 0 {
            Ok(())
        } else {
            Err(err(format!("unmounting {}: {e}", target.display())))
        };
    }
    for _ in 0..30 {
        // SAFETY: valid NUL-terminated path.
        if unsafe { libc::umount2(tgt.as_ptr(), 0) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EBUSY) {
            return Err(err(format!("unmounting {}: {e}", target.display())));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // SAFETY: valid NUL-terminated path.
    let detached = unsafe { libc::umount2(tgt.as_ptr(), libc::MNT_DETACH) } == 0;
    Err(err(format!(
        "unmounting {}: still busy after 3 s (detached lazily: {detached})",
        target.display()
    )))
}

/// True if `path` is listed as a mount point in /proc/self/mountinfo.
fn is_mount_point(path: &Path) -> bool {
    let want = path.to_string_lossy();
    fs::read_to_string("/proc/self/mountinfo")
        .map(|info| info.lines().any(|l| l.split(' ').nth(4) == Some(&*want)))
        .unwrap_or(false)
}
