//! Distro recipes: `recipes/distros/<name>.toml`, parsed raw and then validated.
//!
//! A recipe says where a distro comes from (Ubuntu's cloud image, or a Debian package set) and
//! what to make of it per architecture. The pins (URLs, sizes, digests) are not here: they live
//! in `recipes/pxelab.lock`, so a recipe changes only when a human changes intent.
//! The family name (`ubuntu`, `debian`) is an alias of that family's newest version.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use pxelab_contract::Arch;
use serde::Deserialize;

use super::modules::ModuleSet;

/// One validated recipe.
#[derive(Clone, Debug)]
pub struct Recipe {
    /// `debian-12`, `ubuntu-24.04`: the file stem, and the directory name under `images/`.
    pub name: String,
    pub version: String,
    /// The default module set (`--modules` overrides it).
    pub modules: ModuleSet,
    pub source: Source,
    pub arches: BTreeMap<Arch, ArchRecipe>,
}

#[derive(Clone, Debug)]
pub enum Source {
    Ubuntu(UbuntuSource),
    Debian(DebianSource),
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UbuntuSource {
    /// `noble`.
    pub codename: String,
    /// The release serial directory, e.g. `20250115` for `release-20250115/`.
    pub serial: String,
    /// Default mirror base; `--mirror` / `PXELAB_UBUNTU_MIRROR` override it.
    pub mirror: String,
    /// The keyring that signs the release's `SHA256SUMS`, for a mirror that signs its own
    /// releases; default: Ubuntu's cloud-image key, from the package `recipes/pxelab.lock` pins.
    #[serde(default)]
    pub keyring: Option<PathBuf>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DebianSource {
    /// The suite mmdebstrap builds (`bookworm`): also the `Suite`/`Codename` of the local repo.
    pub suite: String,
    /// Suites the pinned closure may draw from (e.g. `bookworm-security` for the kernel).
    pub suites: Vec<String>,
    pub components: Vec<String>,
    /// Packages for every architecture; the closure adds their dependencies.
    pub packages: Vec<String>,
    /// mtimes in the rootfs are clamped to this (the release's date), unless SOURCE_DATE_EPOCH
    /// is set.
    pub source_date_epoch: u64,
    /// Lines of `/etc/apt/sources.list` in the finished rootfs (the build's local repo must not
    /// leak into the image).
    pub sources_list: Vec<String>,
}

/// What a recipe says for one architecture.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchRecipe {
    /// Ubuntu: the image file name in the release directory.
    #[serde(default)]
    pub image: Option<String>,
    /// Debian: extra packages for this architecture (kernel, GRUB).
    #[serde(default)]
    pub packages: Vec<String>,
    /// Debian: the kernel (meta)package; its `linux-image-<kver>` dependency gives vmlinuz and
    /// the modules, so both come from one package version.
    #[serde(default)]
    pub kernel: Option<String>,
    /// The `grub-install --target` for this architecture (`x86_64-efi`, `arm64-efi`).
    pub grub_target: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRecipe {
    family: String,
    version: String,
    #[serde(default = "default_modules")]
    modules: String,
    ubuntu: Option<UbuntuSource>,
    debian: Option<DebianSource>,
    arch: BTreeMap<String, ArchRecipe>,
}

fn default_modules() -> String {
    "installer".into()
}

impl Recipe {
    pub fn family(&self) -> &'static str {
        match self.source {
            Source::Ubuntu(_) => "ubuntu",
            Source::Debian(_) => "debian",
        }
    }

    /// The recipe for `arch`, or an error naming the arches it has.
    pub fn arch(&self, arch: Arch) -> Result<&ArchRecipe> {
        self.arches.get(&arch).with_context(|| {
            let known: Vec<&str> = self.arches.keys().map(|a| a.as_str()).collect();
            format!(
                "distro {} has no recipe for architecture {arch}: known are {}",
                self.name,
                known.join(", ")
            )
        })
    }

    pub fn parse(name: &str, text: &str) -> Result<Recipe> {
        let raw: RawRecipe =
            toml::from_str(text).with_context(|| format!("recipe {name} is not valid"))?;
        let modules = raw
            .modules
            .parse()
            .with_context(|| format!("recipe {name}: bad `modules`"))?;
        let source = match (raw.family.as_str(), raw.ubuntu, raw.debian) {
            ("ubuntu", Some(u), None) => Source::Ubuntu(u),
            ("debian", None, Some(d)) => Source::Debian(d),
            (family, _, _) => bail!(
                "recipe {name}: family {family:?} needs exactly one matching [{family}] table \
                 (families: ubuntu, debian)"
            ),
        };
        let mut arches = BTreeMap::new();
        for (key, a) in raw.arch {
            let arch: Arch = key
                .parse()
                .map_err(|e: String| anyhow::anyhow!("recipe {name}: {e}"))?;
            match &source {
                Source::Ubuntu(_) if a.image.is_none() => {
                    bail!("recipe {name}: [arch.{key}] needs `image` (the .img file name)")
                }
                Source::Debian(_) if a.kernel.is_none() => {
                    bail!("recipe {name}: [arch.{key}] needs `kernel` (the kernel package)")
                }
                _ => {}
            }
            arches.insert(arch, a);
        }
        if arches.is_empty() {
            bail!("recipe {name}: no [arch.*] table");
        }
        Ok(Recipe {
            name: name.to_string(),
            version: raw.version,
            modules,
            source,
            arches,
        })
    }
}

/// Every recipe in a directory (normally `recipes/distros/`), sorted by name.
pub fn load_all(dir: &Path) -> Result<Vec<Recipe>> {
    let mut recipes = Vec::new();
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read recipes in {}", dir.display()))?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    paths.sort();
    for path in paths {
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_string();
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        recipes.push(Recipe::parse(&name, &text).with_context(|| path.display().to_string())?);
    }
    Ok(recipes)
}

/// Finds a recipe by name or family alias (`debian` → the newest `debian-*`).
pub fn find<'a>(recipes: &'a [Recipe], name: &str) -> Result<&'a Recipe> {
    if let Some(r) = recipes.iter().find(|r| r.name == name) {
        return Ok(r);
    }
    let newest = recipes
        .iter()
        .filter(|r| r.family() == name)
        .max_by(|a, b| version_cmp(&a.version, &b.version));
    match newest {
        Some(r) => Ok(r),
        None => {
            let mut known: Vec<String> = recipes.iter().map(|r| r.name.clone()).collect();
            let mut families: Vec<&str> = recipes.iter().map(|r| r.family()).collect();
            families.dedup();
            known.extend(families.iter().map(|f| f.to_string()));
            known.sort();
            known.dedup();
            bail!("unknown distro {name:?}: known are {}", known.join(", "))
        }
    }
}

/// Compares dotted versions numerically (`24.04` < `24.10`, `9` < `12`).
fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let parts = |s: &str| -> Vec<u64> { s.split('.').map(|p| p.parse().unwrap_or(0)).collect() };
    parts(a).cmp(&parts(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipes() -> Vec<Recipe> {
        load_all(&crate::util::project_root().join("recipes/distros")).unwrap()
    }

    #[test]
    fn shipped_recipes_parse_and_cover_both_arches() {
        let all = recipes();
        let names: Vec<&str> = all.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["debian-12", "debian-13", "ubuntu-24.04"]);
        for r in &all {
            assert!(
                r.arch(Arch::X86_64).is_ok() && r.arch(Arch::Aarch64).is_ok(),
                "{}",
                r.name
            );
        }
    }

    #[test]
    fn family_alias_picks_newest_and_unknown_lists_known() {
        let mut all = recipes();
        let mut old = all[0].clone();
        old.name = "debian-9".into();
        old.version = "9".into();
        all.push(old);
        assert_eq!(find(&all, "debian").unwrap().name, "debian-13");
        assert_eq!(find(&all, "debian-12").unwrap().name, "debian-12");
        assert_eq!(find(&all, "ubuntu").unwrap().name, "ubuntu-24.04");
        let err = find(&all, "fedora").unwrap_err().to_string();
        assert!(err.contains("unknown distro \"fedora\""), "{err}");
        assert!(
            err.contains("debian-12") && err.contains("ubuntu-24.04"),
            "{err}"
        );
    }

    #[test]
    fn bad_recipes_are_rejected_with_the_reason() {
        let err = Recipe::parse("x", "family = \"fedora\"\nversion = \"1\"\n[arch]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("family \"fedora\""), "{err}");
        let text = "family = \"ubuntu\"\nversion = \"1\"\n[ubuntu]\ncodename = \"n\"\nserial = \"1\"\n\
                    mirror = \"http://m\"\n[arch.riscv64]\nimage = \"a.img\"\ngrub_target = \"x\"\n";
        let err = format!("{:#}", Recipe::parse("x", text).unwrap_err());
        assert!(err.contains("unknown architecture \"riscv64\""), "{err}");
    }
}
