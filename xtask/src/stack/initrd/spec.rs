//! `initrd/manifest.toml` as written (its format is documented at the top of that file), and
//! [`Spec`]: the manifest checked, with the bytes of every `[[extra]]` file it names and the
//! digest that keys the initrd step.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// `initrd/manifest.toml` as written.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub busybox: Option<Busybox>,
    #[serde(default, rename = "file")]
    pub files: Vec<PackageFile>,
    #[serde(default, rename = "extra")]
    pub extras: Vec<Extra>,
    #[serde(default, rename = "binary")]
    pub binaries: Vec<Binary>,
    #[serde(default, rename = "dir")]
    pub dirs: Vec<Dir>,
    #[serde(default, rename = "node")]
    pub nodes: Vec<Node>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Busybox {
    pub binary: String,
    #[serde(default)]
    pub links: Vec<String>,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PackageFile {
    pub package: String,
    pub path: String,
    pub dest: String,
    pub arch: Option<String>,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Extra {
    pub src: String,
    pub dest: String,
    pub mode: String,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Binary {
    pub package: String,
    pub bin: String,
    pub dest: String,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Dir {
    pub path: String,
    pub mode: String,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Node {
    pub path: String,
    pub kind: String,
    pub major: u32,
    pub minor: u32,
    pub mode: String,
}

pub(super) fn octal(what: &str, m: &str) -> Result<u32> {
    u32::from_str_radix(m, 8)
        .with_context(|| format!("{what}: mode {m:?} is not octal (write e.g. \"0755\")"))
}

/// `initrd/`: the parsed manifest and the bytes of every `[[extra]]` file.
#[derive(Clone, Debug)]
pub struct Spec {
    pub dir: PathBuf,
    pub manifest: Manifest,
    manifest_text: String,
    pub(super) extras: BTreeMap<String, Vec<u8>>,
}

impl Spec {
    /// Read and check `dir/manifest.toml` and the files it names from `dir`.
    pub fn load(dir: &Path) -> Result<Spec> {
        let path = dir.join("manifest.toml");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let manifest: Manifest =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let mut extras = BTreeMap::new();
        for e in &manifest.extras {
            if e.src.starts_with('/') || e.src.split('/').any(|c| c == "..") {
                bail!(
                    "{}: [[extra]] src {:?} must be a path inside initrd/",
                    path.display(),
                    e.src
                );
            }
            let p = dir.join(&e.src);
            extras.insert(
                e.src.clone(),
                std::fs::read(&p).with_context(|| {
                    format!(
                        "reading {} (an [[extra]] of {})",
                        p.display(),
                        path.display()
                    )
                })?,
            );
            octal(
                &format!("{}: [[extra]] {}", path.display(), e.dest),
                &e.mode,
            )?;
        }
        for d in &manifest.dirs {
            octal(&format!("{}: [[dir]] {}", path.display(), d.path), &d.mode)?;
        }
        for n in &manifest.nodes {
            octal(&format!("{}: [[node]] {}", path.display(), n.path), &n.mode)?;
            if n.kind != "char" && n.kind != "block" {
                bail!(
                    "{}: [[node]] {}: kind {:?} must be \"char\" or \"block\"",
                    path.display(),
                    n.path,
                    n.kind
                );
            }
        }
        for f in &manifest.files {
            if let Some(a) = &f.arch {
                if a != "x86_64" && a != "aarch64" {
                    bail!(
                        "{}: [[file]] {}: arch {a:?} must be x86_64 or aarch64",
                        path.display(),
                        f.dest
                    );
                }
            }
        }
        Ok(Spec {
            dir: dir.to_path_buf(),
            manifest,
            manifest_text: text,
            extras,
        })
    }

    /// Part of the initrd step's key: changes whenever the manifest or an `[[extra]]` file does.
    pub fn digest(&self) -> String {
        let mut v = Vec::new();
        v.extend((self.manifest_text.len() as u64).to_le_bytes());
        v.extend(self.manifest_text.as_bytes());
        for (src, data) in &self.extras {
            v.extend((src.len() as u64).to_le_bytes());
            v.extend(src.as_bytes());
            v.extend((data.len() as u64).to_le_bytes());
            v.extend(data);
        }
        crate::stack::oci::sha256_hex(&v)
    }

    /// The `[[file]]` packages, for checking them against the lock.
    pub fn packages(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self
            .manifest
            .files
            .iter()
            .map(|f| f.package.as_str())
            .collect();
        v.sort();
        v.dedup();
        v
    }
}
