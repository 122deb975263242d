//! Diskless roots: the `rootfs.tar.zst` of each distro a diskless VM boots, unpacked once into
//! `<state>/nfsroot/<distro>/<arch>/<sha256 prefix>/` for ganesha to export read-only, and the
//! small initramfs addition (`/nfsroot/overlay.cpio`) that mounts it.
//!
//! `<state>/nfsroot` is mode 0700: the exports hold the distro's setuid binaries and root-only
//! files (its `/etc/shadow`), which no host user may reach, and nothing under it is served over
//! HTTP but the one initramfs a diskless boot fetches. The unpack itself ([`pxelab_untar`]) never
//! writes outside the export, whatever the archive holds.
//!
//! Unpacking takes seconds to minutes, so it runs in a background thread and [`NfsRoots::get`]
//! answers `Preparing` meanwhile (the handler then tells iPXE to retry). It is atomic — a hidden
//! `.<prefix>.partial-<pid>` directory renamed into place at the end — and verified: the
//! archive's sha256 is computed while streaming and must match the manifest, else the partial
//! tree is deleted. The directory name carries the digest, so a re-pulled distro gets a new
//! export (the older ones of that distro are then deleted) and an unchanged one is never
//! unpacked twice (also across restarts). Messages name the distro, never a host path: they
//! reach the target's console.
//!
//! An export becomes bootable once the supervisor has ganesha serving it ([`NfsRoots::set_served`]).

use std::{
    collections::BTreeMap,
    fs,
    io::{self, Read},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Instant,
};

use pxelab_contract::Arch;
use sha2::{Digest, Sha256};

use crate::{images::Catalog, log, nfs::Export};
use pxelab_untar as untar;

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
    /// Where the exports are unpacked (`<state>/nfsroot`, mode 0700).
    exports_dir: PathBuf,
    /// Unpack jobs by destination directory (one per rootfs digest).
    jobs: Mutex<BTreeMap<PathBuf, Job>>,
    /// Exports ganesha serves right now, by `(distro, arch)`.
    served: Mutex<Vec<Export>>,
    /// Why the NFS server cannot run (missing binary, crash loop); `None` when it can.
    server_error: Mutex<Option<String>>,
}

impl NfsRoots {
    /// Roots of the distros in `catalog`, unpacked under `exports_dir` (created mode 0700 when
    /// the first one is needed).
    pub fn new(catalog: Arc<Catalog>, exports_dir: PathBuf) -> Arc<NfsRoots> {
        Arc::new(NfsRoots {
            catalog,
            exports_dir,
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
                "the NFS server is starting to export {distro} ({arch})"
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
        let shown = format!("images/{distro}/{arch}/{}", manifest.rootfs.file);
        let dest = self
            .exports_dir
            .join(distro)
            .join(arch.as_str())
            .join(&manifest.rootfs.sha256[..DIGEST_PREFIX]);
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
                "{shown} is missing; run `cargo xtask distro pull {distro}`"
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
                    "unpacking the rootfs of {distro} ({arch})"
                )))
            }
            _ => {}
        }
        jobs.insert(dest.clone(), Job::Running);
        drop(jobs);
        let me = Arc::clone(self);
        let (sha, size) = (manifest.rootfs.sha256.clone(), manifest.rootfs.size);
        let private = self.exports_dir.clone();
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
                    let unpacked = make_private(&private)
                        .map_err(|e| format!("cannot create {}: {e}", private.display()))
                        .and_then(|()| unpack_rootfs(&archive, &sha, size, &dest));
                    let job = match unpacked {
                        Ok(()) => {
                            log!(
                                "{} ready ({:.1} s)",
                                dest.display(),
                                started.elapsed().as_secs_f64()
                            );
                            remove_other_versions(&dest);
                            Job::Done(dest.clone())
                        }
                        Err(e) => {
                            log!(
                                "unpacking {} into {} failed: {e}",
                                archive.display(),
                                dest.display()
                            );
                            Job::Failed(format!("unpacking {shown} failed: {e}"))
                        }
                    };
                    me.jobs
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(dest, job);
                }
            });
        if let Err(e) = spawned {
            let msg =
                format!("cannot start a thread to unpack the rootfs of {distro} ({arch}): {e}");
            self.jobs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(dest, Job::Failed(msg.clone()));
            return Err(RootStatus::Failed(msg));
        }
        Err(RootStatus::Preparing(format!(
            "unpacking the rootfs of {distro} ({arch})"
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
/// while streaming, with [`untar::unpack`]: ownership, modes (incl. setuid), mtimes, links and
/// extended attributes are kept; device nodes are created when allowed (inside a user
/// namespace they cannot be, and need not be: the booted system mounts devtmpfs on /dev).
/// Errors are one line without host paths (they reach the target's console).
pub fn unpack_rootfs(archive: &Path, sha256: &str, size: u64, dest: &Path) -> Result<(), String> {
    let (Some(parent), Some(name)) = (dest.parent(), dest.file_name().and_then(|n| n.to_str()))
    else {
        return Err("the export directory has no usable name".into());
    };
    fs::create_dir_all(parent).map_err(|e| format!("cannot create the export's parent: {e}"))?;
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
        fs::rename(&partial, dest)
            .map_err(|e| format!("cannot rename the unpacked tree into place: {e}"))
    });
    if result.is_err() {
        let _ = fs::remove_dir_all(&partial);
    }
    result
}

fn unpack_into(archive: &Path, sha256: &str, size: u64, dir: &Path) -> Result<(), String> {
    let bad = |e: io::Error| format!("cannot unpack the archive: {e}");
    let file = fs::File::open(archive).map_err(|e| format!("cannot open the archive: {e}"))?;
    fs::create_dir(dir).map_err(bad)?;
    let mut hashing = HashingReader {
        inner: file,
        hasher: Sha256::new(),
        bytes: 0,
    };
    let mut decoder = zstd::Decoder::new(&mut hashing).map_err(bad)?;
    // Only root can give files away; an unprivileged unpack (tests) keeps its own uid.
    // SAFETY: geteuid has no preconditions.
    let owners = unsafe { libc::geteuid() } == 0;
    let summary = untar::unpack(&mut decoder, dir, owners).map_err(bad)?;
    // The tar's end may come before the compressed stream's: hash every byte of the file.
    io::copy(&mut decoder, &mut io::sink()).map_err(bad)?;
    drop(decoder);
    io::copy(&mut hashing, &mut io::sink()).map_err(bad)?;
    let got = hex::encode(hashing.hasher.finalize());
    if got != sha256 || hashing.bytes != size {
        return Err(format!(
            "the archive has sha256 {got} and {} bytes but its manifest says {sha256} and {size}: the file is damaged or was replaced; re-run `cargo xtask distro pull`",
            hashing.bytes
        ));
    }
    if summary.skipped_devices > 0 {
        log!(
            "{} device nodes of {} not created (no permission); devtmpfs provides them at boot",
            summary.skipped_devices,
            archive.display()
        );
    }
    Ok(())
}

/// Creates `dir` (the exports' parent) with mode 0700, or makes an existing one 0700.
fn make_private(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
}

/// Deletes the other exports of the same distro and arch (earlier rootfs versions), now that
/// `current` replaces them.
fn remove_other_versions(current: &Path) {
    let (Some(parent), Some(name)) = (current.parent(), current.file_name()) else {
        return;
    };
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name() != name && e.file_type().is_ok_and(|t| t.is_dir()) {
            match fs::remove_dir_all(e.path()) {
                Ok(()) => log!("removed the older export {}", e.path().display()),
                Err(err) => log!(
                    "cannot remove the older export {}: {err}",
                    e.path().display()
                ),
            }
        }
    }
}

/// Stacks before exports moved to the state directory unpacked them next to the distro's files,
/// where `/images/` served them: they are deleted at start.
pub fn remove_legacy_exports(images_dir: &Path) {
    let dirs = fs::read_dir(images_dir).into_iter().flatten().flatten();
    for distro in dirs {
        for arch in fs::read_dir(distro.path()).into_iter().flatten().flatten() {
            for e in fs::read_dir(arch.path()).into_iter().flatten().flatten() {
                let is_export = e.file_name().to_string_lossy().starts_with("nfsroot-")
                    && e.file_type().is_ok_and(|t| t.is_dir());
                if is_export {
                    match fs::remove_dir_all(e.path()) {
                        Ok(()) => log!(
                            "removed {} (diskless exports live in the state directory now)",
                            e.path().display()
                        ),
                        Err(err) => log!("cannot remove {}: {err}", e.path().display()),
                    }
                }
            }
        }
    }
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
