//! Publishing a pull into the lab home: the outputs are written into a sibling temp directory
//! and swapped in with `renameat2(RENAME_EXCHANGE)`, so an interrupted pull leaves the previous
//! artifacts whole, and a directory that already holds exactly these outputs is left alone.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use crate::store::{StepFile, Store};

/// The published directory holds exactly these outputs (by manifest digests and sizes).
pub(super) fn published_matches(dir: &Path, files: &[StepFile]) -> bool {
    let Ok(text) = fs::read(dir.join("manifest.json")) else {
        return false;
    };
    let Some(manifest) = files.iter().find(|f| f.name == "manifest.json") else {
        return false;
    };
    if hex::encode(Sha256::digest(&text)) != manifest.digest {
        return false;
    }
    // The manifest names each file's digest; size and inode time cheaply catch a replaced file.
    files
        .iter()
        .all(|f| fs::metadata(dir.join(&f.name)).is_ok_and(|m| m.len() == f.size))
}

/// Writes the outputs into a sibling temp dir and swaps it in atomically.
pub(super) fn publish(store: &Store, files: &[StepFile], dest: &Path) -> Result<()> {
    let parent = dest.parent().context("images dir has a parent")?;
    fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let leaf = dest
        .file_name()
        .context("images dir has a name")?
        .to_string_lossy()
        .into_owned();
    // Leftovers of interrupted pulls.
    for entry in fs::read_dir(parent)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(&format!(".{leaf}.")) {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
    let staging = tempfile::Builder::new()
        .prefix(&format!(".{leaf}.new-"))
        .tempdir_in(parent)?;
    for f in files {
        store.materialize(&f.digest, &staging.path().join(&f.name))?;
    }
    keep_current_exports(files, dest, staging.path())?;
    fs::File::open(staging.path())?.sync_all()?;
    if dest.exists() {
        exchange(staging.path(), dest)?;
        // `staging` now holds the previous artifacts; dropping it removes them.
    } else {
        let staging = staging.keep();
        fs::rename(&staging, dest).with_context(|| format!("cannot publish {}", dest.display()))?;
    }
    fs::File::open(parent)?.sync_all()?;
    Ok(())
}

/// The stack unpacks a rootfs for diskless targets into `nfsroot-<digest prefix>/` beside it
/// and exports that directory over NFS. An export of the rootfs being published moves into the
/// new directory (a rename: the NFS server's file handles stay valid); exports of other
/// rootfs versions are left in the old directory and go with it.
fn keep_current_exports(files: &[StepFile], dest: &Path, staging: &Path) -> Result<()> {
    let Some(rootfs) = files.iter().find(|f| f.name == "rootfs.tar.zst") else {
        return Ok(());
    };
    let Ok(entries) = fs::read_dir(dest) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let current = name
            .strip_prefix("nfsroot-")
            .is_some_and(|prefix| !prefix.is_empty() && rootfs.digest.starts_with(prefix));
        if current && entry.path().is_dir() {
            fs::rename(entry.path(), staging.join(&name)).with_context(|| {
                format!("cannot keep the diskless export {}", entry.path().display())
            })?;
        }
    }
    Ok(())
}

/// Atomically swaps two directories (Linux `renameat2(RENAME_EXCHANGE)`).
fn exchange(a: &Path, b: &Path) -> Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let ca = CString::new(a.as_os_str().as_bytes())?;
    let cb = CString::new(b.as_os_str().as_bytes())?;
    // SAFETY: both are valid NUL-terminated paths; AT_FDCWD resolves them as given.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot swap {} into place", b.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StepOutputs;

    /// A cached step whose outputs are `files` (name, content).
    fn outputs(store: &Store, files: &[(&str, &[u8])]) -> StepOutputs {
        store
            .step("t", 1)
            .param("c", format!("{files:?}"))
            .run(|out| {
                for (name, content) in files {
                    fs::write(out.join(name), content)?;
                }
                Ok(())
            })
            .unwrap()
    }

    #[test]
    fn publish_swaps_whole_directories() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let step = |content: &[u8]| outputs(&store, &[("a", content), ("manifest.json", content)]);
        let dest = dir.path().join("images/d/x86_64");
        let one = step(b"one");
        assert!(!published_matches(&dest, &one.files));
        publish(&store, &one.files, &dest).unwrap();
        assert!(published_matches(&dest, &one.files));
        let two = step(b"two");
        assert!(!published_matches(&dest, &two.files));
        publish(&store, &two.files, &dest).unwrap();
        assert_eq!(fs::read(dest.join("a")).unwrap(), b"two");
        let leftovers: Vec<_> = fs::read_dir(dest.parent().unwrap())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(
            leftovers,
            [std::ffi::OsString::from("x86_64")],
            "no staging dir left behind"
        );
    }

    #[test]
    fn republishing_keeps_the_export_of_the_same_rootfs_and_drops_stale_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let step = |rootfs: &[u8], modules: &[u8]| {
            outputs(
                &store,
                &[("rootfs.tar.zst", rootfs), ("modules.cpio.zst", modules)],
            )
        };
        let dest = dir.path().join("images/d/x86_64");
        let first = step(b"root v1", b"modules a");
        publish(&store, &first.files, &dest).unwrap();
        let digest = &first.get("rootfs.tar.zst").unwrap().digest;
        let export = dest.join(format!("nfsroot-{}", &digest[..16]));
        fs::create_dir_all(export.join("etc")).unwrap();
        fs::write(export.join("etc/hostname"), "x").unwrap();

        // Another module set, same rootfs: the export stays where the NFS server serves it.
        let second = step(b"root v1", b"modules b");
        publish(&store, &second.files, &dest).unwrap();
        assert_eq!(
            fs::read(dest.join("modules.cpio.zst")).unwrap(),
            b"modules b"
        );
        assert_eq!(
            fs::read_to_string(export.join("etc/hostname")).unwrap(),
            "x"
        );

        // A new rootfs: the old export goes with the old artifacts.
        let third = step(b"root v2", b"modules b");
        publish(&store, &third.files, &dest).unwrap();
        assert!(!export.exists(), "stale export {} kept", export.display());
    }
}
