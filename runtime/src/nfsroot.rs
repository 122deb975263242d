//! Diskless roots: each pulled distro's `rootfs.tar.zst` unpacked once into
//! `<images>/<distro>/<arch>/nfsroot-<sha256 prefix>/` for ganesha to export read-only, and the
//! small initramfs addition (`/nfsroot/overlay.cpio`) that mounts it.
//!
//! Unpacking takes seconds to minutes, so it runs in a background thread and [`NfsRoots::get`]
//! answers `Preparing` meanwhile (the handler then tells iPXE to retry). It is atomic — a hidden
//! `.nfsroot-<prefix>.partial-<pid>` directory renamed into place at the end — and verified: the
//! archive's sha256 is computed while streaming and must match the manifest, else the partial
//! tree is deleted. The directory name carries the digest, so a re-pulled distro gets a new
//! export and an unchanged one is never unpacked twice (also across restarts).
//!
//! An export becomes bootable once the supervisor has ganesha serving it ([`NfsRoots::set_served`]).

use std::{
    collections::BTreeMap,
    fs,
    io::{self, Read},
    path::{Component, Path, PathBuf},
    sync::{Arc, Mutex},
    time::Instant,
};

use pxelab_contract::Arch;
use sha2::{Digest, Sha256};

use crate::{images::Catalog, log, nfs::Export};

/// Hex digits of the rootfs sha256 in the export's directory name.
pub const DIGEST_PREFIX: usize = 16;

/// The initramfs-tools boot script (`boot=pxelab`).
pub const BOOT_SCRIPT: &str = include_str!("nfsroot-boot.sh");
/// Where the script lands in the initramfs; `boot=pxelab` makes init source it.
pub const BOOT_SCRIPT_PATH: &str = "scripts/pxelab";

/// What a diskless boot of `<distro>/<arch>` can get right now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RootStatus {
    /// Unpacked and exported: boot.
    Ready(Ready),
    /// Being unpacked, or unpacked but ganesha is not serving it yet: retry shortly.
    Preparing(String),
    /// The distro is not pulled (or its manifest is unusable): the operator must act.
    Missing(String),
    /// Unpacking failed (e.g. digest mismatch); retried only when the manifest changes.
    Failed(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ready {
    pub export: Export,
    /// `uname -r` of the distro kernel: its initramfs is `boot/initrd.img-<this>` in the export.
    pub kernel_version: String,
}

#[derive(Clone, Debug)]
enum Job {
    Running,
    Done(PathBuf),
    Failed(String),
}

/// The diskless roots of one images directory; shared by the handler and the supervisor.
pub struct NfsRoots {
    /// The images directory, whose manifests it reads (cached).
    catalog: Arc<Catalog>,
    /// Unpack jobs by destination directory (one per rootfs digest).
    jobs: Mutex<BTreeMap<PathBuf, Job>>,
    /// Exports ganesha serves right now, by `(distro, arch)`.
    served: Mutex<Vec<Export>>,
    /// Why the NFS server cannot run (missing binary, crash loop); `None` when it can.
    server_error: Mutex<Option<String>>,
}

impl NfsRoots {
    pub fn new(catalog: Arc<Catalog>) -> Arc<NfsRoots> {
        Arc::new(NfsRoots {
            catalog,
            jobs: Mutex::new(BTreeMap::new()),
            served: Mutex::new(Vec::new()),
            server_error: Mutex::new(None),
        })
    }

    pub fn images_dir(&self) -> &Path {
        self.catalog.images_dir()
    }

    /// The state of `<distro>/<arch>`'s root, starting its unpack in the background if needed.
    pub fn get(self: &Arc<Self>, distro: &str, arch: Arch) -> RootStatus {
        let (export, kernel_version) = match self.unpacked(distro, arch) {
            Ok(found) => found,
            Err(status) => return status,
        };
        if let Some(e) = self
            .server_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            return RootStatus::Failed(e);
        }
        let served = self.served.lock().unwrap_or_else(|p| p.into_inner());
        if served.contains(&export) {
            RootStatus::Ready(Ready {
                export,
                kernel_version,
            })
        } else {
            RootStatus::Preparing(format!(
                "the NFS server is starting to export {}",
                export.path.display()
            ))
        }
    }

    /// The unpacked export of `<distro>/<arch>` (whether served or not), or why there is none.
    pub fn unpacked(
        self: &Arc<Self>,
        distro: &str,
        arch: Arch,
    ) -> Result<(Export, String), RootStatus> {
        let dir = self.images_dir().join(distro).join(arch.as_str());
        let manifest = self
            .catalog
            .manifest(distro, arch)
            .map_err(|e| RootStatus::Missing(e.to_string()))?;
        let archive = dir.join(&manifest.rootfs.file);
        let dest = dir.join(format!(
            "nfsroot-{}",
            &manifest.rootfs.sha256[..DIGEST_PREFIX]
        ));
        let export = Export {
            distro: distro.to_string(),
            arch,
            path: dest.clone(),
        };
        if dest.is_dir() {
            return Ok((export, manifest.kernel_version.clone()));
        }
        if !archive.is_file() {
            return Err(RootStatus::Missing(format!(
                "{} is missing; run `cargo xtask distro pull {distro}`",
                archive.display()
            )));
        }
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        match jobs.get(&dest) {
            Some(Job::Done(path)) if path.is_dir() => {
                return Ok((export, manifest.kernel_version.clone()))
            }
            Some(Job::Failed(e)) => return Err(RootStatus::Failed(e.clone())),
            Some(Job::Running) => {
                return Err(RootStatus::Preparing(format!(
                    "unpacking {} into {}",
                    archive.display(),
                    dest.display()
                )))
            }
            _ => {}
        }
        jobs.insert(dest.clone(), Job::Running);
        drop(jobs);
        let me = Arc::clone(self);
        let (sha, size) = (manifest.rootfs.sha256.clone(), manifest.rootfs.size);
        let spawned = std::thread::Builder::new()
            .name("nfsroot-unpack".into())
            .spawn({
                let dest = dest.clone();
                let archive = archive.clone();
                move || {
                    let started = Instant::now();
                    log!(
                        "unpacking {} for diskless boots into {}",
                        archive.display(),
                        dest.display()
                    );
                    let job = match unpack_rootfs(&archive, &sha, size, &dest) {
                        Ok(()) => {
                            log!(
                                "{} ready ({:.1} s)",
                                dest.display(),
                                started.elapsed().as_secs_f64()
                            );
                            Job::Done(dest.clone())
                        }
                        Err(e) => {
                            log!("{e}");
                            Job::Failed(e)
                        }
                    };
                    me.jobs
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(dest, job);
                }
            });
        if let Err(e) = spawned {
            let msg = format!("cannot start a thread to unpack {}: {e}", archive.display());
            self.jobs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(dest, Job::Failed(msg.clone()));
            return Err(RootStatus::Failed(msg));
        }
        Err(RootStatus::Preparing(format!(
            "unpacking {} into {}",
            archive.display(),
            dest.display()
        )))
    }

    /// Called by the supervisor whenever the set ganesha serves changes.
    pub fn set_served(&self, exports: Vec<Export>) {
        *self.served.lock().unwrap_or_else(|p| p.into_inner()) = exports;
    }

    pub fn set_server_error(&self, error: Option<String>) {
        *self.server_error.lock().unwrap_or_else(|p| p.into_inner()) = error;
    }
}

/// Hashes every byte read through it.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Unpacks the zstd tarball `archive` into `dest` atomically, checking its sha256 and size
/// while streaming. Ownership, modes (incl. setuid), mtimes, hard and symbolic links and
/// extended attributes are kept; device nodes are created when allowed (inside a user
/// namespace they cannot be, and need not be: the booted system mounts devtmpfs on /dev).
pub fn unpack_rootfs(archive: &Path, sha256: &str, size: u64, dest: &Path) -> Result<(), String> {
    let parent = dest
        .parent()
        .ok_or_else(|| format!("{} has no parent directory", dest.display()))?;
    let name = dest
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| format!("{} is not a usable directory name", dest.display()))?;
    // Leftovers of an interrupted unpack (any process) are useless: start clean.
    if let Ok(entries) = fs::read_dir(parent) {
        for e in entries.flatten() {
            let n = e.file_name();
            if n.to_string_lossy()
                .starts_with(&format!(".{name}.partial-"))
            {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
    let partial = parent.join(format!(".{name}.partial-{}", std::process::id()));
    let result = unpack_into(archive, sha256, size, &partial).and_then(|()| {
        fs::rename(&partial, dest).map_err(|e| {
            format!(
                "cannot rename {} to {}: {e}",
                partial.display(),
                dest.display()
            )
        })
    });
    if result.is_err() {
        let _ = fs::remove_dir_all(&partial);
    }
    result
}

fn unpack_into(archive: &Path, sha256: &str, size: u64, dir: &Path) -> Result<(), String> {
    let bad = |e: io::Error| {
        format!(
            "cannot unpack {} into {}: {e}",
            archive.display(),
            dir.display()
        )
    };
    let file =
        fs::File::open(archive).map_err(|e| format!("cannot open {}: {e}", archive.display()))?;
    fs::create_dir(dir).map_err(bad)?;
    let hashing = HashingReader {
        inner: file,
        hasher: Sha256::new(),
        bytes: 0,
    };
    let decoder = zstd::Decoder::new(hashing).map_err(bad)?;
    let mut tar = tar::Archive::new(decoder);
    tar.set_preserve_permissions(true);
    // Only root can give files away; an unprivileged unpack (tests) keeps its own uid.
    // SAFETY: geteuid has no preconditions.
    tar.set_preserve_ownerships(unsafe { libc::geteuid() } == 0);
    tar.set_preserve_mtime(true);
    tar.set_unpack_xattrs(true);
    tar.set_overwrite(true);
    // Directories last, deepest first: their modes and mtimes are applied after their content.
    let mut directories = Vec::new();
    let mut skipped_devices = 0u32;
    for entry in tar.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let kind = entry.header().entry_type();
        if kind.is_dir() {
            directories.push(entry);
        } else if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
            if !make_node(&entry, dir).map_err(bad)? {
                skipped_devices += 1;
            }
        } else {
            entry.unpack_in(dir).map_err(bad)?;
        }
    }
    directories.sort_by(|a, b| b.path_bytes().cmp(&a.path_bytes()));
    for mut d in directories {
        d.unpack_in(dir).map_err(bad)?;
    }
    let mut rest = tar.into_inner().finish();
    io::copy(&mut rest, &mut io::sink()).map_err(bad)?;
    let hashing = rest.into_inner();
    let got = hex::encode(hashing.hasher.finalize());
    if got != sha256 || hashing.bytes != size {
        return Err(format!(
            "{} has sha256 {got} and {} bytes but its manifest says {sha256} and {size}: the file is damaged or was replaced; re-run `cargo xtask distro pull`",
            archive.display(),
            hashing.bytes
        ));
    }
    if skipped_devices > 0 {
        log!(
            "{} device nodes of {} not created (no permission); devtmpfs provides them at boot",
            skipped_devices,
            archive.display()
        );
    }
    Ok(())
}

/// mknod for a device or FIFO entry; false when not permitted (user namespace).
fn make_node<R: Read>(entry: &tar::Entry<'_, R>, dir: &Path) -> io::Result<bool> {
    use std::os::unix::ffi::OsStrExt;
    let rel = entry.path()?.into_owned();
    if rel
        .components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("device entry {} leaves the archive root", rel.display()),
        ));
    }
    let path = dir.join(&rel);
    if let Some(p) = path.parent() {
        fs::create_dir_all(p)?;
    }
    let h = entry.header();
    let kind = h.entry_type();
    let file_type = if kind.is_character_special() {
        libc::S_IFCHR
    } else if kind.is_block_special() {
        libc::S_IFBLK
    } else {
        libc::S_IFIFO
    };
    let mode = h.mode()? & 0o7777;
    let dev = libc::makedev(
        h.device_major()?.unwrap_or(0),
        h.device_minor()?.unwrap_or(0),
    );
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let _ = fs::remove_file(&path);
    // SAFETY: mknod/lchown with a valid NUL-terminated path.
    unsafe {
        if libc::mknod(c.as_ptr(), file_type | mode, dev) != 0 {
            let e = io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::EPERM) {
                Ok(false)
            } else {
                Err(e)
            };
        }
        let uid = h.uid()? as libc::uid_t;
        let gid = h.gid()? as libc::gid_t;
        if libc::geteuid() == 0 && libc::lchown(c.as_ptr(), uid, gid) != 0 {
            return Err(io::Error::last_os_error());
        }
        // mknod's mode went through the umask (and chown may clear setuid bits): set it now.
        if libc::chmod(c.as_ptr(), mode) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(true)
}

/// `/nfsroot/overlay.cpio`: the boot script as a zstd-compressed newc archive, loaded after the
/// distro's initramfs (the kernel unpacks initramfs archives in order, later files win).
///
/// Compressed on purpose: the kernel accepts an uncompressed archive only at a 4-byte aligned
/// offset, and the EFI stub concatenates initrds without padding — after Debian's 15,311,749-byte
/// initramfs the uncompressed archive was skipped under OVMF (`/scripts/pxelab` missing). A
/// compressed archive may start anywhere. Byte-for-byte reproducible: fixed mtime, owner 0:0.
pub fn overlay_cpio() -> Vec<u8> {
    let archive = overlay_newc();
    // Compressing a small in-memory buffer cannot fail; an empty body would fail the boot loudly.
    zstd::bulk::compress(&archive, 19).unwrap_or_default()
}

fn overlay_newc() -> Vec<u8> {
    let script = BOOT_SCRIPT.as_bytes();
    let entries = [
        (
            cpio::NewcBuilder::new("scripts")
                .mode(0o040755)
                .nlink(2)
                .mtime(0),
            &[][..],
        ),
        (
            cpio::NewcBuilder::new(BOOT_SCRIPT_PATH)
                .mode(0o100644)
                .nlink(1)
                .mtime(0),
            script,
        ),
    ];
    let inputs = entries
        .into_iter()
        .map(|(builder, bytes)| (builder.uid(0).gid(0), io::Cursor::new(bytes)));
    // Writing into a Vec cannot fail.
    cpio::write_cpio(inputs, Vec::new()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_cpio_holds_the_script_and_is_reproducible() {
        let compressed = overlay_cpio();
        assert_eq!(compressed, overlay_cpio());
        assert_eq!(
            &compressed[..4],
            &[0x28, 0xb5, 0x2f, 0xfd],
            "zstd frame magic"
        );
        let a = zstd::stream::decode_all(&compressed[..]).unwrap();
        let reader = cpio::NewcReader::new(io::Cursor::new(&a)).unwrap();
        assert_eq!(reader.entry().name(), "scripts");
        assert_eq!(reader.entry().mode() & 0o170000, 0o040000);
        let next = reader.finish().unwrap();
        let mut reader = cpio::NewcReader::new(next).unwrap();
        assert_eq!(reader.entry().name(), BOOT_SCRIPT_PATH);
        assert_eq!((reader.entry().uid(), reader.entry().gid()), (0, 0));
        let mut text = String::new();
        reader.read_to_string(&mut text).unwrap();
        assert_eq!(text, BOOT_SCRIPT);
        let next = reader.finish().unwrap();
        assert!(cpio::NewcReader::new(next).unwrap().entry().is_trailer());
    }

    #[test]
    fn boot_script_is_valid_sh_and_mounts_nfs4_read_only_under_a_tmpfs_overlay() {
        let out = std::process::Command::new("sh")
            .args(["-n", "-c", BOOT_SCRIPT])
            .output()
            .expect("sh (any POSIX shell) is needed to check the boot script's syntax");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The properties diskless boots rely on, so an edit cannot drop one unnoticed.
        for needle in [
            "mount -t nfs4 -o \"ro,",
            // Boot time: no GETATTR per open() on a root that cannot change.
            "nocto,actimeo=",
            // No DHCP client runs in the system, so the resolver comes from the initramfs.
            "echo \"nameserver $ns\"",
            "mount -t tmpfs",
            "mount -t overlay -o \"lowerdir=${lower},upperdir=${rw}/upper,workdir=${rw}/work\"",
            "configure_networking",
            "mountroot()",
        ] {
            assert!(BOOT_SCRIPT.contains(needle), "{needle}");
        }
    }
}
