//! Recipes: `recipes/*.toml`, the human-written list of upstream inputs.
//!
//! A recipe names what we want, not what we got: plain URL inputs (URL + sha256 per arch) and
//! Debian package sets (mirror, suites, components, arches, packages, closure rule). `cargo xtask
//! lock` turns each (recipe, set, arch) into concrete pins in `recipes/pxelab.lock`.
//! Files are parsed raw (serde mirrors the file, unknown keys rejected) and then validated into
//! [`Request`]s, one per set and arch, each with a fingerprint of exactly what it asks for: the
//! lock records the fingerprint, so `lock --check` notices any edit without the network.
//!
//! ```toml
//! description = "Tools inside the installer initrd"
//!
//! [[debian]]
//! name = "tools"
//! suites = ["bookworm"]              # searched in order; mirror/components have defaults
//! arches = ["amd64", "arm64"]        # or ["all"] for Architecture: all packages
//! packages = ["busybox-static", "kmod"]
//! arch_packages = { amd64 = ["..."] } # extra packages for one arch
//! closure = "full"                   # Depends + Pre-Depends closure, or "none"
//! follow = ["linux-image-*"]         # optional: only follow dependencies matching these
//!
//! [[url]]
//! name = "firmware"
//! arch.amd64 = { url = "http://…", sha256 = "…", size = 123 }
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use pxelab_debian::DEBIAN_MIRROR;
use serde::{Deserialize, Serialize};

use crate::pin::debian::{Closure, DebianRequest};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRecipe {
    description: String,
    #[serde(default)]
    debian: Vec<RawDebianSet>,
    #[serde(default)]
    url: Vec<RawUrlInput>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDebianSet {
    name: String,
    #[serde(default)]
    mirror: Option<String>,
    suites: Vec<String>,
    #[serde(default)]
    components: Option<Vec<String>>,
    arches: Vec<String>,
    #[serde(default)]
    packages: Vec<String>,
    #[serde(default)]
    arch_packages: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    closure: Option<Closure>,
    #[serde(default)]
    follow: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUrlInput {
    name: String,
    arch: BTreeMap<String, UrlPin>,
}

/// A URL input's pin as written in the recipe.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UrlPin {
    pub url: String,
    pub sha256: String,
    #[serde(default)]
    pub size: Option<u64>,
}

/// The concrete thing a (recipe, set, arch) asks for.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Spec {
    Debian(DebianRequest),
    Url(UrlPin),
}

/// One (recipe, set, arch) to resolve.
#[derive(Clone, Debug)]
pub struct Request {
    /// File stem: `initrd` for `recipes/initrd.toml`.
    pub recipe: String,
    /// The set's (or URL input's) name inside the recipe.
    pub set: String,
    pub arch: String,
    pub spec: Spec,
}

impl Request {
    /// sha256 of the canonical JSON of what this request asks for (recorded in the lock).
    pub fn fingerprint(&self) -> String {
        crate::pin::fingerprint(&serde_json::to_string(&self.spec).expect("recipe specs serialize"))
    }

    /// `initrd/tools/amd64`.
    pub fn id(&self) -> String {
        format!("{}/{}/{}", self.recipe, self.set, self.arch)
    }
}

/// Every request of every `*.toml` directly under `dir` (subdirectories such as `distros/` have
/// their own format and owner), sorted by id.
pub fn load_dir(dir: &Path) -> Result<Vec<Request>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("listing recipes in {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        out.extend(load_file(&f)?);
    }
    let mut seen = std::collections::BTreeSet::new();
    for r in &out {
        if !seen.insert(r.id()) {
            bail!(
                "recipe set {} is defined twice; give each set a unique name",
                r.id()
            );
        }
    }
    out.sort_by_key(|r| r.id());
    Ok(out)
}

/// The requests of one recipe file.
pub fn load_file(path: &Path) -> Result<Vec<Request>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let recipe = path
        .file_stem()
        .and_then(|s| s.to_str())
        .with_context(|| format!("{}: file name is not UTF-8", path.display()))?
        .to_string();
    parse(&recipe, &text).with_context(|| format!("recipe {}", path.display()))
}

/// Parse and validate one recipe's text.
pub fn parse(recipe: &str, text: &str) -> Result<Vec<Request>> {
    let raw: RawRecipe = toml::from_str(text)?;
    if raw.description.trim().is_empty() {
        bail!("`description` is empty: say what the inputs are for");
    }
    let mut out = Vec::new();
    for set in raw.debian {
        check_name(&set.name)?;
        if set.suites.is_empty() {
            bail!("debian set {:?}: `suites` is empty", set.name);
        }
        if set.arches.is_empty() {
            bail!("debian set {:?}: `arches` is empty", set.name);
        }
        for a in set.arch_packages.keys() {
            if !set.arches.contains(a) {
                bail!(
                    "debian set {:?}: arch_packages names {a:?}, which is not in `arches`",
                    set.name
                );
            }
        }
        for arch in &set.arches {
            check_arch(arch)?;
            let mut packages = set.packages.clone();
            packages.extend(set.arch_packages.get(arch).cloned().unwrap_or_default());
            if packages.is_empty() {
                bail!("debian set {:?}: no packages for {arch}", set.name);
            }
            out.push(Request {
                recipe: recipe.to_string(),
                set: set.name.clone(),
                arch: arch.clone(),
                spec: Spec::Debian(DebianRequest {
                    mirror: set
                        .mirror
                        .clone()
                        .unwrap_or_else(|| DEBIAN_MIRROR.to_string()),
                    suites: set.suites.clone(),
                    components: set
                        .components
                        .clone()
                        .unwrap_or_else(|| vec!["main".to_string()]),
                    arch: arch.clone(),
                    packages,
                    closure: set.closure.unwrap_or(Closure::Full),
                    follow: set.follow.clone(),
                }),
            });
        }
    }
    for input in raw.url {
        check_name(&input.name)?;
        if input.arch.is_empty() {
            bail!("url input {:?}: no `arch.<name>` entries", input.name);
        }
        for (arch, pin) in input.arch {
            check_arch(&arch)?;
            crate::store::validate_digest(&pin.sha256)
                .with_context(|| format!("url input {:?} ({arch}): bad sha256", input.name))?;
            if !(pin.url.starts_with("http://") || pin.url.starts_with("https://")) {
                bail!(
                    "url input {:?} ({arch}): {:?} is not an http(s) URL",
                    input.name,
                    pin.url
                );
            }
            out.push(Request {
                recipe: recipe.to_string(),
                set: input.name.clone(),
                arch,
                spec: Spec::Url(pin),
            });
        }
    }
    if out.is_empty() {
        bail!("the recipe names no inputs (add [[debian]] or [[url]] entries)");
    }
    Ok(out)
}

fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        bail!("set name {name:?} must be non-empty and use only letters, digits, '-', '_', '.'");
    }
    Ok(())
}

fn check_arch(arch: &str) -> Result<()> {
    const KNOWN: [&str; 4] = ["amd64", "arm64", "all", "any"];
    if !KNOWN.contains(&arch) {
        bail!(
            "arch {arch:?} is not one of {} (Debian names)",
            KNOWN.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sets_per_arch() {
        let reqs = parse(
            "k",
            r#"
description = "kernels"
[[debian]]
name = "kernel"
suites = ["bookworm"]
arches = ["amd64", "arm64"]
arch_packages = { amd64 = ["linux-image-cloud-amd64"], arm64 = ["linux-image-arm64"] }
follow = ["linux-image-*"]
"#,
        )
        .unwrap();
        assert_eq!(reqs.len(), 2);
        let Spec::Debian(d) = &reqs[1].spec else {
            panic!()
        };
        assert_eq!(d.packages, ["linux-image-arm64"]);
        assert_eq!(d.components, ["main"]);
        assert_ne!(reqs[0].fingerprint(), reqs[1].fingerprint());
        assert!(parse("k", "description = \"x\"\n[[debian]]\nname=\"a\"\nsuites=[\"s\"]\narches=[\"x86\"]\npackages=[\"p\"]").is_err());
        assert!(parse("k", "description = \"x\"\nbogus = 1").is_err());
    }
}
