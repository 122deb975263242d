//! The content-addressed store: blobs by sha256 plus an action cache of build steps.
//!
//! Layout under the store root (`$PXELAB_CACHE`, else `$XDG_CACHE_HOME/pxelab`, else
//! `~/.cache/pxelab`):
//!
//! ```text
//! lock                      store-wide lock: shared for normal runs, exclusive for `cache gc`
//! blobs/sha256/ab/abcd…     immutable (0444) content, named by its sha256
//! verified/ab/abcd…         "size ino ctime" recorded when the blob was last hashed
//! actions/ab/<key>.json     one build step's outputs (names → digests)
//! locks/<name>.lock         per-digest / per-step locks so two runs never do the same work twice
//! tmp/                      partial downloads (`<sha256>.part`, resumable) and step scratch dirs
//! ```
//!
//! This module holds the blobs; the action cache is `step.rs`, pruning to the roots `gc.rs`.
//!
//! Nothing becomes a blob before it is complete: content is written under `tmp/`, fsynced,
//! hashed and renamed into place. Every use of a blob compares its inode against the record
//! written when it was last hashed (size, inode number, ctime: any write, chmod or replacement
//! changes the ctime) and hashes it again on a difference, so checking costs one `stat`. A corrupt blob is reported and removed;
//! callers then re-fetch or rebuild it.

mod gc;
mod step;

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

pub use gc::{gc, GcReport, Roots};
pub use step::{ActionRecord, OutputFile, Step, StepFile, StepOutputs};

/// A lower-case hex sha256.
pub type Sha256Hex = String;

/// An open store. Holds the store-wide lock (shared) for its lifetime.
pub struct Store {
    root: PathBuf,
    _lock: File,
}

/// What [`Store::check`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum BlobState {
    Missing,
    Good,
    /// Was present with the wrong content; it has been removed.
    Corrupt {
        actual: Sha256Hex,
    },
}

impl Store {
    /// The store root from the environment (see the module doc).
    pub fn default_root() -> Result<PathBuf> {
        if let Some(p) = std::env::var_os("PXELAB_CACHE").filter(|p| !p.is_empty()) {
            return Ok(PathBuf::from(p));
        }
        if let Some(p) = std::env::var_os("XDG_CACHE_HOME").filter(|p| !p.is_empty()) {
            return Ok(PathBuf::from(p).join("pxelab"));
        }
        match std::env::var_os("HOME").filter(|p| !p.is_empty()) {
            Some(home) => Ok(PathBuf::from(home).join(".cache/pxelab")),
            None => bail!("cannot place the store: set PXELAB_CACHE (or XDG_CACHE_HOME or HOME)"),
        }
    }

    /// Open the store at [`Store::default_root`].
    pub fn open_default() -> Result<Store> {
        Store::open(&Store::default_root()?)
    }

    /// Open (creating if needed) the store at `root`, holding the store-wide lock shared.
    pub fn open(root: &Path) -> Result<Store> {
        Store::open_mode(root, false)
    }

    /// Open with the store-wide lock held exclusively (for `cache gc`): waits for other runs.
    pub fn open_exclusive(root: &Path) -> Result<Store> {
        Store::open_mode(root, true)
    }

    fn open_mode(root: &Path, exclusive: bool) -> Result<Store> {
        for dir in ["blobs/sha256", "verified", "actions", "locks", "tmp"] {
            let d = root.join(dir);
            fs::create_dir_all(&d)
                .with_context(|| format!("creating store directory {}", d.display()))?;
        }
        let lock_path = root.join("lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("opening {}", lock_path.display()))?;
        let acquired = if exclusive {
            lock.try_lock().is_ok()
        } else {
            lock.try_lock_shared().is_ok()
        };
        if !acquired {
            eprintln!(
                "waiting for another pxelab run to release the store at {}",
                root.display()
            );
            if exclusive {
                lock.lock()
            } else {
                lock.lock_shared()
            }
            .with_context(|| format!("locking {}", lock_path.display()))?;
        }
        Ok(Store {
            root: root.to_path_buf(),
            _lock: lock,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the blob `digest` lives (whether or not it exists).
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        self.root
            .join("blobs/sha256")
            .join(&digest[..2.min(digest.len())])
            .join(digest)
    }

    fn verified_path(&self, digest: &str) -> PathBuf {
        self.root
            .join("verified")
            .join(&digest[..2.min(digest.len())])
            .join(digest)
    }

    /// Scratch space on the store's filesystem (so renames into `blobs/` are atomic).
    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Take the named per-item lock (blocking); released when the returned file is dropped.
    /// `what` is shown if we have to wait.
    pub fn lock_item(&self, name: &str, what: &str) -> Result<File> {
        let path = self.root.join("locks").join(format!("{name}.lock"));
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        if f.try_lock().is_err() {
            eprintln!("waiting for another pxelab run working on {what}");
            f.lock()
                .with_context(|| format!("locking {}", path.display()))?;
        }
        Ok(f)
    }

    /// Is `digest` present with the right content? Hashes only when the recorded verification
    /// does not match the file any more (or none exists); a corrupt blob is reported on stderr
    /// and removed, so the caller can fetch or build it again.
    pub fn check(&self, digest: &str) -> Result<BlobState> {
        validate_digest(digest)?;
        let path = self.blob_path(digest);
        let meta = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BlobState::Missing),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        if fs::read_to_string(self.verified_path(digest))
            .ok()
            .as_deref()
            == Some(&stamp(&meta))
        {
            return Ok(BlobState::Good);
        }
        let actual = hash_file(&path)?;
        if actual == digest {
            self.record_verified(digest)?;
            return Ok(BlobState::Good);
        }
        eprintln!(
            "warning: store blob {} is corrupt (content hashes to {actual}); removing it so it is fetched or built again",
            path.display()
        );
        remove_blob_files(&path, &self.verified_path(digest))?;
        Ok(BlobState::Corrupt { actual })
    }

    /// Like [`Store::check`] but hashes unconditionally (for `cache verify`).
    pub fn check_full(&self, digest: &str) -> Result<BlobState> {
        let _ = fs::remove_file(self.verified_path(digest));
        self.check(digest)
    }

    /// True if the blob is present and good (see [`Store::check`]).
    pub fn has(&self, digest: &str) -> Result<bool> {
        Ok(self.check(digest)? == BlobState::Good)
    }

    fn record_verified(&self, digest: &str) -> Result<()> {
        let meta = fs::metadata(self.blob_path(digest))?;
        write_atomic(&self.verified_path(digest), stamp(&meta).as_bytes())
    }

    /// Publish a complete file from `src` (on the store's filesystem, normally under `tmp/`) as a
    /// blob. `expected` is checked if given. The source is consumed (renamed or removed).
    /// Returns the digest.
    pub fn insert_file(&self, src: &Path, expected: Option<&str>) -> Result<Sha256Hex> {
        let digest = hash_file(src)?;
        if let Some(exp) = expected {
            if exp != digest {
                let _ = fs::remove_file(src);
                bail!(
                    "{}: sha256 mismatch: expected {exp}, got {digest}",
                    src.display()
                );
            }
        }
        self.publish(src, &digest)?;
        Ok(digest)
    }

    /// Move a file already known to hash to `digest` into place (fsync, 0444, rename).
    pub(crate) fn publish(&self, src: &Path, digest: &str) -> Result<()> {
        let dest = self.blob_path(digest);
        if self.has(digest)? {
            let _ = fs::remove_file(src);
            return Ok(());
        }
        let f = File::open(src).with_context(|| format!("opening {}", src.display()))?;
        f.sync_all()
            .with_context(|| format!("fsync {}", src.display()))?;
        drop(f);
        fs::set_permissions(src, fs::Permissions::from_mode(0o444))?;
        let parent = dest.parent().expect("blob paths have a parent");
        fs::create_dir_all(parent)?;
        fs::rename(src, &dest)
            .with_context(|| format!("moving {} into the store", src.display()))?;
        sync_dir(parent)?;
        self.record_verified(digest)
    }

    /// Insert bytes as a blob.
    pub fn insert_bytes(&self, bytes: &[u8]) -> Result<Sha256Hex> {
        let mut tmp = tempfile::Builder::new()
            .prefix("insert-")
            .tempfile_in(self.tmp_dir())?;
        tmp.write_all(bytes)?;
        let (_, path) = tmp.keep()?;
        self.insert_file(&path, None)
    }

    /// Read a blob (checked first).
    pub fn read(&self, digest: &str) -> Result<Vec<u8>> {
        if !self.has(digest)? {
            bail!(
                "blob {digest} is not in the store at {}",
                self.root.display()
            );
        }
        fs::read(self.blob_path(digest)).with_context(|| format!("reading blob {digest}"))
    }

    /// Copy blob `digest` to `dest` atomically (temp file in dest's directory + rename), mode 0644.
    /// A copy, not a hard link, so editing the result can never corrupt the store; on
    /// filesystems with reflinks (`copy_file_range`) it costs no data copy, and holes stay holes
    /// (a disk image is mostly free space).
    pub fn materialize(&self, digest: &str, dest: &Path) -> Result<()> {
        if !self.has(digest)? {
            bail!(
                "blob {digest} is not in the store at {} (run `cargo xtask fetch`)",
                self.root.display()
            );
        }
        let dir = dest
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let tmp = tempfile::Builder::new()
            .prefix(".materialize-")
            .tempfile_in(dir)?;
        copy_sparse(&self.blob_path(digest), tmp.as_file())
            .with_context(|| format!("copying blob {digest} to {}", dest.display()))?;
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o644))?;
        tmp.as_file().sync_all()?;
        tmp.persist(dest)
            .with_context(|| format!("writing {}", dest.display()))?;
        Ok(())
    }

    /// Every blob digest present in the store (unchecked).
    pub fn list_blobs(&self) -> Result<Vec<(Sha256Hex, u64)>> {
        let mut out = Vec::new();
        let base = self.root.join("blobs/sha256");
        for shard in read_dir_sorted(&base)? {
            for f in read_dir_sorted(&shard)? {
                let name = f
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default()
                    .to_string();
                if validate_digest(&name).is_ok() {
                    out.push((name, fs::symlink_metadata(&f)?.len()));
                }
            }
        }
        Ok(out)
    }

    /// Remove a blob and its verification record (for `cache gc`; needs the exclusive lock).
    pub fn remove_blob(&self, digest: &str) -> Result<()> {
        remove_blob_files(&self.blob_path(digest), &self.verified_path(digest))
    }
}

pub(crate) fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v = Vec::new();
    match fs::read_dir(dir) {
        Ok(rd) => {
            for e in rd {
                v.push(e?.path());
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    }
    v.sort();
    Ok(v)
}

/// What must stay equal for a recorded verification to hold: size, inode, ctime.
fn stamp(meta: &fs::Metadata) -> String {
    format!(
        "{} {} {} {}",
        meta.len(),
        meta.ino(),
        meta.ctime(),
        meta.ctime_nsec()
    )
}

fn remove_blob_files(blob: &Path, verified: &Path) -> Result<()> {
    let _ = fs::remove_file(verified);
    match fs::remove_file(blob) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", blob.display())),
    }
}

/// Reject anything that is not 64 lower-case hex digits (it would become a path).
pub fn validate_digest(digest: &str) -> Result<()> {
    if digest.len() == 64
        && digest
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(())
    } else {
        bail!("{digest:?} is not a sha256 (64 lower-case hex digits)")
    }
}

/// sha256 of a file's content.
pub fn hash_file(path: &Path) -> Result<Sha256Hex> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Write `bytes` to `path` (mode 0644) via a temp file in the same directory, fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir)?;
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(0o644))?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Copies `src` into the empty file `dst` range by range of data (`SEEK_DATA`/`SEEK_HOLE`), so
/// the copy keeps the source's holes.
fn copy_sparse(src: &Path, dst: &File) -> Result<()> {
    use std::os::fd::AsRawFd;
    let from = File::open(src).with_context(|| format!("opening {}", src.display()))?;
    let len = from.metadata()?.len();
    let (fd_in, fd_out) = (from.as_raw_fd(), dst.as_raw_fd());
    let mut pos: i64 = 0;
    while (pos as u64) < len {
        // SAFETY: lseek on a descriptor we own; errors are returned, not UB.
        let data = unsafe { libc::lseek(fd_in, pos, libc::SEEK_DATA) };
        if data < 0 {
            // ENXIO: only a hole is left.
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd_in, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error()).context("SEEK_HOLE");
        }
        let (mut off_in, mut off_out) = (data, data);
        while off_in < hole {
            // SAFETY: both descriptors are open; the offsets are ours to advance.
            let n = unsafe {
                libc::copy_file_range(
                    fd_in,
                    &mut off_in,
                    fd_out,
                    &mut off_out,
                    (hole - off_in) as usize,
                    0,
                )
            };
            if n <= 0 {
                return Err(std::io::Error::last_os_error()).context("copy_file_range ended early");
            }
        }
        pos = hole;
    }
    dst.set_len(len)?;
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("fsync {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_check_materialize() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let d = store.insert_bytes(b"hello").unwrap();
        assert_eq!(
            d,
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert!(store
            .blob_path(&d)
            .ends_with(format!("blobs/sha256/2c/{d}")));
        assert_eq!(store.check(&d).unwrap(), BlobState::Good);
        let out = dir.path().join("x/y.txt");
        store.materialize(&d, &out).unwrap();
        assert_eq!(fs::read(&out).unwrap(), b"hello");
        assert!(validate_digest("../../etc/passwd").is_err());
    }

    #[test]
    fn materialized_copies_keep_holes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let src = dir.path().join("sparse");
        let f = File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        let mut f = std::io::BufWriter::new(f);
        use std::io::Seek;
        f.seek(std::io::SeekFrom::Start(1 << 20)).unwrap();
        f.write_all(b"data in the middle").unwrap();
        drop(f);
        let bytes = fs::read(&src).unwrap();
        let d = store.insert_file(&src, None).unwrap();
        let out = dir.path().join("copy");
        store.materialize(&d, &out).unwrap();
        assert!(fs::read(&out).unwrap() == bytes);
        let allocated = fs::metadata(&out).unwrap().blocks() * 512;
        assert!(allocated < 1 << 20, "{allocated} bytes allocated");
    }

    #[test]
    fn corrupt_blob_detected_in_a_new_run() {
        let dir = tempfile::tempdir().unwrap();
        let d = Store::open(dir.path())
            .unwrap()
            .insert_bytes(b"hello")
            .unwrap();
        let p = Store::open(dir.path()).unwrap().blob_path(&d);
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(&p, b"jello").unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert!(matches!(
            store.check(&d).unwrap(),
            BlobState::Corrupt { .. }
        ));
        assert!(!p.exists());
        assert_eq!(store.check(&d).unwrap(), BlobState::Missing);
    }
}
