//! A pulled distro in the images directory (`<images>/<distro>/<arch>/`): its manifest, read and
//! checked in one place for every reader (the installer's config, the diskless roots), and
//! [`Catalog`], which keeps what requests ask again and again (a manifest, whether a file is
//! there and its size) until [`crate::watch`] reports a change under the images or initrds
//! directory.

use std::{
    collections::HashMap,
    ffi::OsString,
    fmt, fs, io,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use arc_swap::ArcSwap;
use pxelab_contract::{Arch, DistroManifest};

use crate::watch::{Changes, Watched};

/// Why a distro's manifest cannot be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ManifestError {
    /// The distro is not pulled (yet): the operator must run `distro pull`.
    NotPulled(String),
    /// The manifest exists but is unreadable or wrong: a re-pull fixes it.
    Invalid(String),
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ManifestError::NotPulled(s) | ManifestError::Invalid(s) => f.write_str(s),
        }
    }
}

/// `<dir>/manifest.json` of `distro`/`arch`, parsed and validated: the rootfs entry names a
/// plain file with a sha256, and `kernel_version` is a plain name (it becomes a file name).
pub fn read_manifest(
    dir: &Path,
    distro: &str,
    arch: Arch,
) -> Result<DistroManifest, ManifestError> {
    let path = dir.join("manifest.json");
    // Named as under `/images/`: these messages reach targets, which need no host paths.
    let shown = format!("images/{distro}/{arch}/manifest.json");
    let invalid = |why: String| {
        ManifestError::Invalid(format!(
            "{shown}{why}; re-run `cargo xtask distro pull {distro}`"
        ))
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(ManifestError::NotPulled(format!(
                "distro {distro} ({arch}) is not pulled: {shown} is missing; run `cargo xtask distro pull {distro}`"
            )))
        }
        Err(e) => return Err(invalid(format!(" cannot be read ({e})"))),
    };
    let manifest: DistroManifest =
        serde_json::from_str(&text).map_err(|e| invalid(format!(" is invalid ({e})")))?;
    manifest
        .rootfs
        .check()
        .map_err(|e| invalid(format!(": {e}")))?;
    if !plain_name(&manifest.kernel_version) {
        return Err(invalid(format!(
            ": kernel_version {:?} is not a plain name",
            manifest.kernel_version
        )));
    }
    Ok(manifest)
}

/// What the catalog remembers about one path.
#[derive(Clone)]
enum Known {
    /// A regular file's size, or `None` when there is no regular file.
    File(Option<u64>),
    Manifest(Result<Arc<DistroManifest>, ManifestError>),
}

/// The images and initrds directories as requests see them, cached until they change.
pub struct Catalog {
    images_dir: PathBuf,
    initrds_dir: PathBuf,
    /// Keyed by the path's bytes: hashing a `Path` walks its components, a cost per request.
    known: ArcSwap<HashMap<OsString, Known>>,
    /// Serializes additions (a miss) and invalidations; readers never take it.
    adding: Mutex<()>,
    /// Bumped by every invalidation: a value looked up before one is not kept after it.
    generation: AtomicU64,
}

impl Catalog {
    pub fn new(images_dir: PathBuf, initrds_dir: PathBuf) -> Catalog {
        Catalog {
            images_dir,
            initrds_dir,
            known: ArcSwap::from_pointee(HashMap::new()),
            adding: Mutex::new(()),
            generation: AtomicU64::new(0),
        }
    }

    pub fn images_dir(&self) -> &Path {
        &self.images_dir
    }

    pub fn initrds_dir(&self) -> &Path {
        &self.initrds_dir
    }

    fn lookup(&self, path: &Path, load: impl FnOnce() -> Known) -> Known {
        if let Some(k) = self.known.load().get(path.as_os_str()) {
            return k.clone();
        }
        let generation = self.generation.load(Ordering::SeqCst);
        let known = load();
        let _one = self.adding.lock().unwrap_or_else(|p| p.into_inner());
        if self.generation.load(Ordering::SeqCst) != generation {
            return known;
        }
        let mut map = HashMap::clone(&self.known.load());
        map.insert(path.as_os_str().to_owned(), known.clone());
        self.known.store(Arc::new(map));
        known
    }

    /// The size of the regular file at `path` (symlinks followed), `None` when there is none.
    pub fn file_size(&self, path: &Path) -> Option<u64> {
        let known = self.lookup(path, || {
            Known::File(
                fs::metadata(path)
                    .ok()
                    .filter(|m| m.is_file())
                    .map(|m| m.len()),
            )
        });
        match known {
            Known::File(size) => size,
            Known::Manifest(_) => None,
        }
    }

    /// [`Catalog::file_size`] of `root` joined with `parts`, the path built in a buffer the
    /// thread reuses: a boot storm checks three files per `/ipxe`, and building each path
    /// anew cost a twentieth of it.
    pub fn file_size_at(&self, root: &Path, parts: &[&str]) -> Option<u64> {
        thread_local! {
            static PATH: std::cell::RefCell<PathBuf> = const { std::cell::RefCell::new(PathBuf::new()) };
        }
        PATH.with(|path| {
            let mut path = path.borrow_mut();
            path.clear();
            path.push(root);
            for part in parts {
                path.push(part);
            }
            self.file_size(&path)
        })
    }

    /// [`read_manifest`] of `<images>/<distro>/<arch>`, remembered.
    pub fn manifest(&self, distro: &str, arch: Arch) -> Result<Arc<DistroManifest>, ManifestError> {
        let dir = self.images_dir.join(distro).join(arch.as_str());
        let key = dir.join("manifest.json");
        let known = self.lookup(&key, || {
            Known::Manifest(read_manifest(&dir, distro, arch).map(Arc::new))
        });
        match known {
            Known::Manifest(m) => m,
            Known::File(_) => read_manifest(&dir, distro, arch).map(Arc::new),
        }
    }
}

impl Watched for Catalog {
    /// The roots, each distro and each architecture below them: where pulls and builds publish.
    fn dirs(&self) -> Vec<PathBuf> {
        let mut dirs = Vec::new();
        for (root, depth) in [(&self.images_dir, 2), (&self.initrds_dir, 1)] {
            let mut level = vec![root.clone()];
            for _ in 0..=depth {
                let mut next = Vec::new();
                for d in &level {
                    if let Ok(entries) = fs::read_dir(d) {
                        next.extend(
                            entries
                                .flatten()
                                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                                .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                                .map(|e| e.path()),
                        );
                    }
                }
                dirs.append(&mut level);
                level = next;
            }
        }
        dirs.retain(|d| d.is_dir());
        dirs
    }

    /// Any change forgets everything: changes are rare (a pull, a build) and reloading is cheap.
    fn changed(&self, _: Changes<'_>) {
        let _one = self.adding.lock().unwrap_or_else(|p| p.into_inner());
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.known.store(Arc::new(HashMap::new()));
    }
}

fn plain_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-+~".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_are_checked_before_use() {
        let dir = tempfile::tempdir().unwrap();
        let read = || read_manifest(dir.path(), "debian-12", Arch::X86_64);
        assert!(
            matches!(read(), Err(ManifestError::NotPulled(m)) if m.contains("distro pull debian-12"))
        );
        let write = |kver: &str| {
            let json = serde_json::json!({
                "rootfs": {"file": "rootfs.tar.zst", "sha256": "ab".repeat(32), "size": 1},
                "kernel_version": kver,
            });
            std::fs::write(dir.path().join("manifest.json"), json.to_string()).unwrap();
        };
        write("6.1.0-9-cloud-amd64");
        assert_eq!(read().unwrap().kernel_version, "6.1.0-9-cloud-amd64");
        write("../../etc");
        assert!(matches!(read(), Err(ManifestError::Invalid(m)) if m.contains("not a plain name")));
        std::fs::write(dir.path().join("manifest.json"), "{").unwrap();
        assert!(matches!(read(), Err(ManifestError::Invalid(m)) if m.contains("is invalid")));
    }
}
