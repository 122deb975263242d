//! The files the installer writes into the new root: the cloud-init NoCloud seed, `/etc/fstab`
//! by UUID and `/etc/hostname`. Each is written to a temp file, fsynced and renamed (and the
//! directory fsynced), so a crash or power cut never leaves half a file or an empty one.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::error::{err, Context, Result};
use crate::http::{GetError, Http};
use crate::mkfs::FsIds;
use crate::say;

pub const SEED_DIR: &str = "var/lib/cloud/seed/nocloud-net";

/// The NoCloud documents: (name, required, mode). user-data and vendor-data may hold secrets.
const DOCS: [(&str, bool, u32); 4] = [
    ("meta-data", true, 0o644),
    ("user-data", true, 0o600),
    ("network-config", false, 0o644),
    ("vendor-data", false, 0o600),
];

/// The seed documents, fetched before the disk is touched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seed {
    docs: Vec<(&'static str, Vec<u8>, u32)>,
}

impl Seed {
    /// Fetches the documents under `base` (ending in `/`). meta-data and user-data must exist;
    /// network-config and vendor-data are skipped on 404.
    pub fn fetch(http: &Http, base: &str) -> Result<Seed> {
        let mut docs = Vec::new();
        for (name, required, mode) in DOCS {
            match http.get_small(&format!("{base}{name}")) {
                Ok(body) => docs.push((name, body, mode)),
                Err(GetError::NotFound(url)) if !required => {
                    say!("cloud-init: no {name} at {url}; skipping it")
                }
                Err(e) => return Err(err(format!("fetching the cloud-init {name}: {e}"))),
            }
        }
        Ok(Seed { docs })
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.docs.iter().map(|(n, _, _)| *n).collect()
    }

    pub fn write(&self, root: &Path) -> Result<()> {
        let dir = root.join(SEED_DIR);
        fs::create_dir_all(&dir).context(|| format!("creating {}", dir.display()))?;
        for (name, body, mode) in &self.docs {
            write_atomic(&dir.join(name), body, *mode)?;
        }
        Ok(())
    }
}

pub fn fstab(ids: &FsIds) -> String {
    format!(
        "# Written by pxelab-installer. Filesystems by UUID: device names change between boots.\n\
         UUID={}\t/\text4\terrors=remount-ro\t0\t1\n\
         UUID={}\t/boot/efi\tvfat\tumask=0077\t0\t2\n",
        ids.root_uuid, ids.esp_uuid
    )
}

pub fn write_fstab(root: &Path, ids: &FsIds) -> Result<()> {
    write_atomic(&root.join("etc/fstab"), fstab(ids).as_bytes(), 0o644)
}

pub fn write_hostname(root: &Path, hostname: &str) -> Result<()> {
    write_atomic(
        &root.join("etc/hostname"),
        format!("{hostname}\n").as_bytes(),
        0o644,
    )
}

/// Writes `path` via a temp file in the same directory (fsync, chmod, rename, fsync of the
/// directory), owned by root. Replaces a symlink at `path` rather than writing through it: a
/// symlink in the new root points into the new root, not into the initrd.
pub fn write_atomic(path: &Path, body: &[u8], mode: u32) -> Result<()> {
    write_owned(path, body, mode, (0, 0))
}

/// [`write_atomic`] for a file owned by `(uid, gid)`.
pub fn write_owned(path: &Path, body: &[u8], mode: u32, (uid, gid): (u32, u32)) -> Result<()> {
    write_with(path, body, |f| {
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        std::os::unix::fs::fchown(f, Some(uid), Some(gid)).or_else(|e| {
            // Only root can chown; the unit tests run the writer as any user.
            if e.raw_os_error() == Some(libc::EPERM) {
                Ok(())
            } else {
                Err(e)
            }
        })
    })
}

/// Writes `path` via a temp file in the same directory, which `prepare` gets before it is
/// synced and renamed into place; then syncs the directory.
pub fn write_with(
    path: &Path,
    body: &[u8],
    prepare: impl FnOnce(&File) -> std::io::Result<()>,
) -> Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| err(format!("{} has no parent directory", path.display())))?;
    fs::create_dir_all(dir).context(|| format!("creating {}", dir.display()))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.pxelab-tmp"));
    let result = (|| -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(body)?;
        prepare(&f)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::Backoff;
    use pxelab_tests::{Behavior, FixtureServer};

    #[test]
    fn fetches_required_and_optional_documents() {
        let server = FixtureServer::start();
        server.serve("/ci/t1/meta-data", "instance-id: t1\n", Behavior::Normal);
        server.serve("/ci/t1/user-data", "#cloud-config\n", Behavior::Normal);
        server.serve("/ci/t1/network-config", "version: 2\n", Behavior::Normal);
        let http = Http::new(0, Backoff::DEFAULT);
        let seed = Seed::fetch(&http, &server.url("/ci/t1/")).unwrap();
        assert_eq!(seed.names(), ["meta-data", "user-data", "network-config"]);

        let t = tempfile::tempdir().unwrap();
        seed.write(t.path()).unwrap();
        let dir = t.path().join(SEED_DIR);
        assert_eq!(
            fs::read_to_string(dir.join("user-data")).unwrap(),
            "#cloud-config\n"
        );
        assert_eq!(
            fs::metadata(dir.join("user-data"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        assert_eq!(
            fs::metadata(dir.join("meta-data"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o644
        );
        assert!(fs::read_dir(&dir).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with('.')));

        let missing = Seed::fetch(&http, &server.url("/ci/nobody/"))
            .unwrap_err()
            .0;
        assert!(
            missing.starts_with("fetching the cloud-init meta-data:") && missing.contains("404"),
            "{missing}"
        );
    }

    #[test]
    fn fstab_names_both_filesystems_by_uuid() {
        let ids = FsIds::random().unwrap();
        let text = fstab(&ids);
        assert!(text.contains(&format!("UUID={}\t/\text4", ids.root_uuid)));
        assert!(text.contains(&format!("UUID={}\t/boot/efi\tvfat", ids.esp_uuid)));
        assert!(!text.contains("/dev/"));
    }

    #[test]
    fn atomic_write_replaces_a_symlink_instead_of_following_it() {
        let t = tempfile::tempdir().unwrap();
        let outside = t.path().join("outside");
        fs::write(&outside, "keep").unwrap();
        std::os::unix::fs::symlink(&outside, t.path().join("etc-hostname")).unwrap();
        write_atomic(&t.path().join("etc-hostname"), b"t1\n", 0o644).unwrap();
        assert_eq!(fs::read_to_string(&outside).unwrap(), "keep");
        assert_eq!(
            fs::read_to_string(t.path().join("etc-hostname")).unwrap(),
            "t1\n"
        );
    }
}
