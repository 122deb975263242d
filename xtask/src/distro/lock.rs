//! The distro locks, `recipes/distros/<name>.lock`: each arch's [`Pin`]s and the fingerprint of
//! the recipe they were resolved from; `cargo xtask distro lock` (re)writes them, and
//! [`check_locks`] is the distro half of `cargo xtask lock --check`.
//!
//! Resolution uses the network: a Debian recipe's closure through [`pin::debian::resolve`] (with
//! the release's required packages as base), an Ubuntu recipe's image through the release's
//! `SHA256SUMS`, once its signature checks out. Besides `distro lock`, only [`pins_for`]
//! resolves: a pull of an arch that its lock lacks, or that was pinned from another version of
//! the recipe, pins it first.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use pxelab_contract::Arch;
use pxelab_debian::DEBIAN_MIRROR;
use serde::{Deserialize, Serialize};
use sha2::Digest;

use super::recipe::{self, Recipe, Source, UbuntuSource};
use super::ubuntu;
use crate::fetch::Fetcher;
use crate::pin::debian::{Closure, DebianRequest};
use crate::pin::{self, DebFacts, Drift, Mirror, Pin, Unit};
use crate::store::Store;
use crate::ui::Ui;

/// `recipes/distros/<name>.lock`: pins per architecture.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DistroLock {
    #[serde(default)]
    pub arch: BTreeMap<String, ArchLock>,
}

/// One architecture's pins.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "ArchRows", into = "ArchRows")]
pub struct ArchLock {
    /// [`fingerprint`] of the recipe when the pins were resolved: a different one means the
    /// recipe asks for something else now and the pins must be resolved again.
    pub fingerprint: String,
    /// Plain files (an Ubuntu image, its SHA256SUMS and their signature) or Debian packages.
    pub pins: Vec<Pin>,
}

/// An `[arch.<name>]` table as the file spells it: plain files and `.deb`s in their own arrays.
#[derive(Clone, Serialize, Deserialize)]
struct ArchRows {
    fingerprint: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    file: Vec<FileRow>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    deb: Vec<DebRow>,
}

#[derive(Clone, Serialize, Deserialize)]
struct FileRow {
    name: String,
    url: String,
    size: u64,
    sha256: String,
}

#[derive(Clone, Serialize, Deserialize)]
struct DebRow {
    package: String,
    version: String,
    arch: String,
    suite: String,
    filename: String,
    url: String,
    size: u64,
    sha256: String,
    priority: String,
}

impl From<ArchRows> for ArchLock {
    fn from(rows: ArchRows) -> ArchLock {
        let files = rows.file.into_iter().map(|f| Pin {
            name: f.name,
            url: f.url,
            size: f.size,
            sha256: f.sha256,
            deb: None,
        });
        let debs = rows.deb.into_iter().map(|d| Pin {
            name: d.package,
            url: d.url,
            size: d.size,
            sha256: d.sha256,
            deb: Some(DebFacts {
                version: d.version,
                arch: d.arch,
                suite: d.suite,
                filename: d.filename,
                priority: Some(d.priority),
            }),
        });
        ArchLock {
            fingerprint: rows.fingerprint,
            pins: files.chain(debs).collect(),
        }
    }
}

impl From<ArchLock> for ArchRows {
    fn from(lock: ArchLock) -> ArchRows {
        let mut rows = ArchRows {
            fingerprint: lock.fingerprint,
            file: Vec::new(),
            deb: Vec::new(),
        };
        for p in lock.pins {
            match p.deb {
                None => rows.file.push(FileRow {
                    name: p.name,
                    url: p.url,
                    size: p.size,
                    sha256: p.sha256,
                }),
                Some(d) => rows.deb.push(DebRow {
                    package: p.name,
                    version: d.version,
                    arch: d.arch,
                    suite: d.suite,
                    filename: d.filename,
                    url: p.url,
                    size: p.size,
                    sha256: p.sha256,
                    // A rootfs closure is always resolved with its base, which records it.
                    priority: d.priority.unwrap_or_else(|| "optional".into()),
                }),
            }
        }
        rows
    }
}

impl DistroLock {
    pub fn path(dir: &Path, recipe: &Recipe) -> PathBuf {
        dir.join(format!("{}.lock", recipe.name))
    }

    /// The lock at `path`; an empty one if there is no file yet.
    pub fn load(path: &Path) -> Result<DistroLock> {
        match fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text)
                .with_context(|| format!("{} is not a valid distro lock", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(DistroLock::default()),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let text = format!(
            "# Generated by `cargo xtask distro lock`: do not edit by hand.\n{}",
            toml::to_string(self).context("cannot serialize the distro lock")?
        );
        crate::store::write_atomic(path, text.as_bytes())
    }
}

/// What the pins of one arch depend on: the recipe fields that choose upstream files (not
/// comments, module sets or GRUB targets).
pub fn fingerprint(recipe: &Recipe, arch: Arch) -> Result<String> {
    let a = recipe.arch(arch)?;
    let what = match &recipe.source {
        // The sums' signature joined the pins: a lock from before it lacks one and re-pins.
        Source::Ubuntu(u) => format!(
            "ubuntu {} {} {} {:?} +{}",
            u.codename,
            u.serial,
            u.mirror,
            a.image,
            ubuntu::SUMS_SIGNATURE
        ),
        Source::Debian(d) => format!(
            "debian {} {:?} {:?} {:?} {:?} {:?}",
            d.suite, d.suites, d.components, d.packages, a.packages, a.kernel
        ),
    };
    Ok(pin::fingerprint(&format!("{arch} {what}")))
}

/// Resolves the pins of one recipe arch (network). `mirror` replaces an Ubuntu recipe's mirror
/// for the downloads; the pins keep the recipe's URLs.
fn resolve(recipe: &Recipe, arch: Arch, mirror: Option<&str>, ui: &Ui) -> Result<ArchLock> {
    let arch_recipe = recipe.arch(arch)?;
    let pins = match &recipe.source {
        Source::Ubuntu(u) => {
            let image = arch_recipe.image.as_deref().expect("validated");
            resolve_ubuntu(u, image, mirror, ui)?
        }
        Source::Debian(d) => {
            ui.println(format!(
                "resolving the Debian {} package set for {arch}",
                d.suite
            ));
            let request = DebianRequest {
                mirror: DEBIAN_MIRROR.to_string(),
                suites: d.suites.clone(),
                components: d.components.clone(),
                arch: arch.debian().to_string(),
                packages: d
                    .packages
                    .iter()
                    .chain(&arch_recipe.packages)
                    .cloned()
                    .collect(),
                closure: Closure::Full,
                follow: Vec::new(),
            };
            pin::debian::resolve(&request, Some(&d.suite))?
        }
    };
    Ok(ArchLock {
        fingerprint: fingerprint(recipe, arch)?,
        pins,
    })
}

/// The release's `SHA256SUMS` and `SHA256SUMS.gpg` (pinned as downloaded, once the signature
/// checks out) and the image with the digest the sums list.
fn resolve_ubuntu(
    u: &UbuntuSource,
    image: &str,
    mirror: Option<&str>,
    ui: &Ui,
) -> Result<Vec<Pin>> {
    let mirror = mirror.map(|m| Mirror::new(&u.mirror, m));
    let pinned_dir = format!(
        "{}/releases/{}/release-{}",
        u.mirror.trim_end_matches('/'),
        u.codename,
        u.serial
    );
    let client = reqwest::blocking::Client::new();
    let get = |name: &str| -> Result<(Pin, Vec<u8>)> {
        let pinned = format!("{pinned_dir}/{name}");
        let url = Mirror::rebase(mirror.as_ref(), &pinned);
        let resp = client
            .get(&url)
            .send()
            .with_context(|| format!("cannot reach {url}"))?;
        if !resp.status().is_success() {
            bail!(
                "{url} answered {}: the release serial {} may be gone upstream",
                resp.status(),
                u.serial
            );
        }
        let bytes = resp
            .bytes()
            .with_context(|| format!("reading {url}"))?
            .to_vec();
        let pin = Pin {
            name: name.into(),
            url: pinned,
            size: bytes.len() as u64,
            sha256: hex::encode(sha2::Sha256::digest(&bytes)),
            deb: None,
        };
        Ok((pin, bytes))
    };
    let (sums_pin, sums) = get(ubuntu::SUMS)?;
    let (signature_pin, signature) = get(ubuntu::SUMS_SIGNATURE)?;
    let store = Store::open_default()?;
    let keyring = ubuntu::Keyring::of(u)?.path(&store, &Fetcher::new(&store, ui.clone())?)?;
    let sums_url = Mirror::rebase(mirror.as_ref(), &sums_pin.url);
    let signature = store.blob_path(&store.insert_bytes(&signature)?);
    ubuntu::verify_sums(&sums, &signature, &keyring, &sums_url)?;
    let digest = ubuntu::listed_digest(&String::from_utf8_lossy(&sums), image)
        .with_context(|| format!("{sums_url} does not list {image}"))?;
    let image_url = format!("{pinned_dir}/{image}");
    let size = pin::remote_size(&Mirror::rebase(mirror.as_ref(), &image_url))?;
    Ok(vec![
        sums_pin,
        signature_pin,
        Pin {
            name: image.into(),
            url: image_url,
            size,
            sha256: digest,
            deb: None,
        },
    ])
}

/// The pins of `recipe` for `arch` from its lock in `dir`. When the lock lacks the arch, or
/// pinned it from another version of the recipe, they are resolved (network) and written to
/// the lock first: the one way a pull decides versions.
pub fn pins_for(
    dir: &Path,
    recipe: &Recipe,
    arch: Arch,
    mirror: Option<&str>,
    ui: &Ui,
) -> Result<Vec<Pin>> {
    let path = DistroLock::path(dir, recipe);
    let mut lock = DistroLock::load(&path)?;
    let stale = match lock.arch.get(arch.as_str()) {
        Some(p) if p.fingerprint == fingerprint(recipe, arch)? => return Ok(p.pins.clone()),
        Some(_) => "the recipe changed since it was locked",
        None => "not locked yet",
    };
    ui.println(format!(
        "{} {arch}: {stale} — resolving pins into {}",
        recipe.name,
        path.display()
    ));
    let pins = resolve(recipe, arch, mirror, ui)?;
    lock.arch.insert(arch.to_string(), pins.clone());
    lock.save(&path)?;
    Ok(pins.pins)
}

/// `lock --check` for distros, without network: every arch a lock pins was pinned from the
/// recipe as it reads now, and the lock pins no arch the recipe lacks. Returns the problems and
/// the recipes that have no lock yet (Ubuntu's is written at the first pull: its image digest
/// comes from the release's SHA256SUMS).
pub fn check_locks(dir: &Path) -> Result<(Vec<String>, Vec<String>)> {
    let mut problems = Vec::new();
    let mut unlocked = Vec::new();
    for recipe in recipe::load_all(dir)? {
        let path = DistroLock::path(dir, &recipe);
        if !path.exists() {
            unlocked.push(recipe.name.clone());
            continue;
        }
        let lock = DistroLock::load(&path)?;
        let wanted = recipe
            .arches
            .keys()
            .map(|a| {
                Ok(Unit {
                    id: a.to_string(),
                    fingerprint: fingerprint(&recipe, *a)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let locked: Vec<Unit> = lock
            .arch
            .iter()
            .map(|(a, pins)| Unit {
                id: a.clone(),
                fingerprint: pins.fingerprint.clone(),
            })
            .collect();
        for d in pin::drift(&wanted, &locked) {
            let fix = match &d {
                Drift::Unpinned(a) | Drift::Stale(a) => {
                    format!(": run `cargo xtask distro lock {} --arch {a}`", recipe.name)
                }
                Drift::Orphan(_) => String::new(),
            };
            problems.push(format!("{}: {d}{fix}", path.display()));
        }
    }
    Ok((problems, unlocked))
}

#[derive(clap::Args, Clone, Debug)]
pub struct LockArgs {
    pub name: String,
    /// Architectures to (re)pin; all of the recipe's when absent.
    #[arg(long, value_parser = super::parse_arch)]
    pub arch: Vec<Arch>,
    #[arg(long, env = "PXELAB_UBUNTU_MIRROR")]
    pub mirror: Option<String>,
    #[arg(long, env = "PXELAB_DISTRO_RECIPES", hide = true)]
    pub recipes: Option<PathBuf>,
}

/// `cargo xtask distro lock`.
pub fn run(args: &LockArgs, ui: &Ui) -> Result<()> {
    let dir = super::recipes_dir(&args.recipes);
    let recipes = recipe::load_all(&dir)?;
    let recipe = recipe::find(&recipes, &args.name)?;
    let arches: Vec<Arch> = if args.arch.is_empty() {
        recipe.arches.keys().copied().collect()
    } else {
        args.arch.clone()
    };
    let path = DistroLock::path(&dir, recipe);
    let mut lock = DistroLock::load(&path)?;
    for arch in arches {
        let pins = resolve(recipe, arch, args.mirror.as_deref(), ui)?;
        ui.println(format!(
            "{} {arch}: {} pinned file(s)",
            recipe.name,
            pins.pins.len()
        ));
        lock.arch.insert(arch.to_string(), pins);
    }
    lock.save(&path)?;
    ui.println(format!("wrote {}", path.display()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy_projects(dir: &Path) {
        let projects = crate::util::project_root().join("recipes/distros");
        for name in ["debian-12.toml", "debian-12.lock", "ubuntu-24.04.toml"] {
            fs::copy(projects.join(name), dir.join(name)).unwrap();
        }
    }

    #[test]
    fn the_committed_lock_reads_and_writes_back_byte_for_byte() {
        let path = crate::util::project_root().join("recipes/distros/debian-12.lock");
        let lock = DistroLock::load(&path).unwrap();
        let pins = &lock.arch["x86_64"].pins;
        assert!(pins
            .iter()
            .all(|p| p.deb.as_ref().is_some_and(|d| d.priority.is_some())));
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join("debian-12.lock");
        lock.save(&copy).unwrap();
        assert_eq!(fs::read(&copy).unwrap(), fs::read(&path).unwrap());
    }

    #[test]
    fn lock_check_flags_an_edited_recipe_and_a_missing_arch() {
        let dir = tempfile::tempdir().unwrap();
        copy_projects(dir.path());
        let (problems, unlocked) = check_locks(dir.path()).unwrap();
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(unlocked, ["ubuntu-24.04"]);

        let recipe = dir.path().join("debian-12.toml");
        let text = fs::read_to_string(&recipe).unwrap();
        fs::write(&recipe, text.replace("\"sudo\", ", "")).unwrap();
        let (problems, _) = check_locks(dir.path()).unwrap();
        assert_eq!(problems.len(), 2, "both arches are stale: {problems:?}");
        assert!(
            problems[1].contains("aarch64: the recipe changed")
                && problems[1].contains("run `cargo xtask distro lock debian-12 --arch aarch64`"),
            "{problems:?}"
        );

        fs::write(&recipe, text).unwrap();
        let lock_file = dir.path().join("debian-12.lock");
        let mut lock = DistroLock::load(&lock_file).unwrap();
        let aarch64 = lock.arch.remove("aarch64").unwrap();
        lock.arch.insert("riscv64".into(), aarch64);
        lock.save(&lock_file).unwrap();
        let (problems, _) = check_locks(dir.path()).unwrap();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].contains("aarch64: in the recipes but not in the lock"),
            "{problems:?}"
        );
        assert!(
            problems[1].contains("riscv64: in the lock but no recipe names it"),
            "{problems:?}"
        );
    }
}
