//! A pulled distro in the images directory (`<images>/<distro>/<arch>/`): its manifest, read and
//! checked in one place for every reader (the installer's config, the diskless roots).

use std::{fmt, io, path::Path};

use pxelab_contract::{Arch, DistroManifest};

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
    let invalid = |why: String| {
        ManifestError::Invalid(format!(
            "{}{why}; re-run `cargo xtask distro pull {distro}`",
            path.display()
        ))
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(ManifestError::NotPulled(format!(
                "distro {distro} ({arch}) is not pulled: {} is missing; run `cargo xtask distro pull {distro}`",
                path.display()
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
