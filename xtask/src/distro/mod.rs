//! `cargo xtask distro list|pull|lock`: per-distro boot artifacts in the lab home.
//!
//! A pull produces, under `<lab home>/images/<distro>/<arch>/`, `vmlinuz`, `modules.cpio.zst`,
//! `rootfs.tar.zst` and `manifest.json` (the contract's [`DistroManifest`] plus facts for the
//! installer). The whole build is one action-cache step keyed by the recipe, the pins and the
//! options, so a warm re-pull only compares digests. Publishing swaps a fully written directory in
//! with `renameat2(RENAME_EXCHANGE)`: an interrupted pull leaves the previous artifacts whole.
//!
//! Pins live in `recipes/distros/<name>.lock` (written by `distro lock`, or by the first pull of
//! an arch that has none); the recipes themselves hold intent only.

pub mod debian;
mod emulation;
pub mod modules;
pub mod recipe;
pub mod rootfs;
mod tools;
pub mod ubuntu;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use pxelab_contract::{Arch, DistroManifest, ManifestFile};
use serde::{Deserialize, Serialize};

use crate::fetch::{Fetch, Fetcher};
use crate::store::{write_atomic, StepFile, StepOutputs, Store};
use crate::ui::Ui;
use crate::util::human_bytes;
use modules::ModuleSet;
use recipe::{Recipe, Source};

/// Bump when the build changes what it makes from the same inputs.
const STEP_VERSION: u32 = 2;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// List the distro recipes, their architectures and what is pulled.
    List(ListArgs),
    /// Build a distro's kernel, modules archive and root filesystem into the lab home.
    Pull(PullArgs),
    /// Resolve a distro's pins (image digests or the Debian package closure) into its lock.
    Lock(LockArgs),
}

#[derive(clap::Args, Clone, Debug)]
pub struct ListArgs {
    /// Directory of distro recipes (default: recipes/distros in the project).
    #[arg(long, env = "PXELAB_DISTRO_RECIPES", hide = true)]
    pub recipes: Option<PathBuf>,
}

#[derive(clap::Args, Clone, Debug)]
pub struct PullArgs {
    /// Recipe name (`debian-12`, `ubuntu-24.04`) or family alias (`debian`, `ubuntu`).
    pub name: String,
    /// x86_64 or aarch64.
    #[arg(long, default_value = "x86_64", value_parser = parse_arch)]
    pub arch: Arch,
    /// Module set of modules.cpio.zst: `installer` or `all` (default: the recipe's).
    #[arg(long)]
    pub modules: Option<ModuleSet>,
    /// Base URL replacing the recipe's Ubuntu mirror (same layout as cloud-images.ubuntu.com).
    #[arg(long, env = "PXELAB_UBUNTU_MIRROR")]
    pub mirror: Option<String>,
    /// Directory of distro recipes and locks (default: recipes/distros in the project).
    #[arg(long, env = "PXELAB_DISTRO_RECIPES", hide = true)]
    pub recipes: Option<PathBuf>,
}

#[derive(clap::Args, Clone, Debug)]
pub struct LockArgs {
    pub name: String,
    /// Architectures to (re)pin; all of the recipe's when absent.
    #[arg(long, value_parser = parse_arch)]
    pub arch: Vec<Arch>,
    #[arg(long, env = "PXELAB_UBUNTU_MIRROR")]
    pub mirror: Option<String>,
    #[arg(long, env = "PXELAB_DISTRO_RECIPES", hide = true)]
    pub recipes: Option<PathBuf>,
}

fn parse_arch(s: &str) -> Result<Arch, String> {
    s.parse()
}

pub fn run(args: Args) -> Result<()> {
    match args.command {
        Command::List(a) => list(&a),
        Command::Pull(a) => pull(&a, &Ui::new()).map(|_| ()),
        Command::Lock(a) => lock(&a, &Ui::new()),
    }
}

/// The recipe name for `name`, resolving family aliases (`debian` → `debian-12`).
pub fn canonical_name(name: &str) -> Result<String> {
    let recipes = recipe::load_all(&recipes_dir(&None))?;
    Ok(recipe::find(&recipes, name)?.name.clone())
}

fn recipes_dir(dir: &Option<PathBuf>) -> PathBuf {
    dir.clone()
        .unwrap_or_else(|| crate::util::project_root().join("recipes/distros"))
}

// ---------------------------------------------------------------------------------------------
// Pins

/// A file pinned by URL, size and digest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilePin {
    pub name: String,
    pub url: String,
    pub size: u64,
    pub sha256: String,
}

/// `recipes/distros/<name>.lock`: pins per architecture.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DistroLock {
    #[serde(default)]
    pub arch: BTreeMap<String, ArchLock>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchLock {
    /// [`pin_fingerprint`] of the recipe when the pins were resolved: a different one means the
    /// recipe asks for something else now and the pins must be resolved again.
    pub fingerprint: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub file: Vec<FilePin>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deb: Vec<debian::LockedDeb>,
}

fn lock_path(dir: &Path, recipe: &Recipe) -> PathBuf {
    dir.join(format!("{}.lock", recipe.name))
}

fn load_lock(path: &Path) -> Result<DistroLock> {
    match fs::read_to_string(path) {
        Ok(text) => toml::from_str(&text)
            .with_context(|| format!("{} is not a valid distro lock", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(DistroLock::default()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

fn save_lock(path: &Path, lock: &DistroLock) -> Result<()> {
    let text = format!(
        "# Generated by `cargo xtask distro lock`: do not edit by hand.\n{}",
        toml::to_string(lock).context("cannot serialize the distro lock")?
    );
    write_atomic(path, text.as_bytes())
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Resolves the pins of one recipe arch (network).
fn resolve_arch(recipe: &Recipe, arch: Arch, mirror: Option<&str>, ui: &Ui) -> Result<ArchLock> {
    let arch_recipe = recipe.arch(arch)?;
    let mut pins = ArchLock {
        fingerprint: pin_fingerprint(recipe, arch)?,
        ..Default::default()
    };
    match &recipe.source {
        Source::Ubuntu(u) => {
            let image = arch_recipe.image.as_deref().expect("validated");
            let base = mirror.unwrap_or(&u.mirror).trim_end_matches('/');
            let dir = format!("{base}/releases/{}/release-{}", u.codename, u.serial);
            let client = reqwest::blocking::Client::new();
            let get = |url: &str| -> Result<reqwest::blocking::Response> {
                let resp = client
                    .get(url)
                    .send()
                    .with_context(|| format!("cannot reach {url}"))?;
                if !resp.status().is_success() {
                    bail!(
                        "{url} answered {}: the release serial {} may be gone upstream",
                        resp.status(),
                        u.serial
                    );
                }
                Ok(resp)
            };
            let sums = get(&format!("{dir}/SHA256SUMS"))?.bytes()?;
            let text = String::from_utf8_lossy(&sums);
            let digest = text
                .lines()
                .find_map(|l| {
                    let (d, n) = l.split_once(char::is_whitespace)?;
                    (n.trim().trim_start_matches('*') == image).then(|| d.to_ascii_lowercase())
                })
                .with_context(|| format!("{dir}/SHA256SUMS does not list {image}"))?;
            let head = client.head(format!("{dir}/{image}")).send()?;
            let size = head
                .headers()
                .get(reqwest::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse().ok())
                .with_context(|| format!("{dir}/{image} has no Content-Length"))?;
            // Pins keep the recipe's mirror: `--mirror` is a pull-time override, not a new source.
            let pinned_dir = format!(
                "{}/releases/{}/release-{}",
                u.mirror.trim_end_matches('/'),
                u.codename,
                u.serial
            );
            pins.file.push(FilePin {
                name: "SHA256SUMS".into(),
                url: format!("{pinned_dir}/SHA256SUMS"),
                size: sums.len() as u64,
                sha256: sha256_hex(&sums),
            });
            pins.file.push(FilePin {
                name: image.into(),
                url: format!("{pinned_dir}/{image}"),
                size,
                sha256: digest,
            });
        }
        Source::Debian(d) => pins.deb = debian::resolve(d, arch_recipe, arch, ui)?,
    }
    Ok(pins)
}

/// What the pins of one arch depend on: the recipe fields that choose upstream files (not
/// comments, module sets or GRUB targets).
fn pin_fingerprint(recipe: &Recipe, arch: Arch) -> Result<String> {
    let a = recipe.arch(arch)?;
    let what = match &recipe.source {
        Source::Ubuntu(u) => format!(
            "ubuntu {} {} {} {:?}",
            u.codename, u.serial, u.mirror, a.image
        ),
        Source::Debian(d) => format!(
            "debian {} {:?} {:?} {:?} {:?} {:?}",
            d.suite, d.suites, d.components, d.packages, a.packages, a.kernel
        ),
    };
    Ok(sha256_hex(format!("{arch} {what}").as_bytes()))
}

/// `lock --check` for distros, without network: every arch a lock pins was pinned from the
/// recipe as it reads now, and the lock pins no arch the recipe lacks. Returns the problems and
/// the recipes that have no lock yet (Ubuntu's is written at the first pull: its image digest
/// comes from the release's SHA256SUMS).
pub fn check_locks(dir: &Path) -> Result<(Vec<String>, Vec<String>)> {
    let mut problems = Vec::new();
    let mut unlocked = Vec::new();
    for recipe in recipe::load_all(dir)? {
        let path = lock_path(dir, &recipe);
        if !path.exists() {
            unlocked.push(recipe.name.clone());
            continue;
        }
        let lock = load_lock(&path)?;
        for arch in recipe.arches.keys() {
            match lock.arch.get(arch.as_str()) {
                None => problems.push(format!(
                    "{}: {arch} is not pinned: run `cargo xtask distro lock {} --arch {arch}`",
                    path.display(),
                    recipe.name
                )),
                Some(pins) if pins.fingerprint != pin_fingerprint(&recipe, *arch)? => {
                    problems.push(format!(
                        "{}: {arch} was pinned from another version of the recipe: run `cargo xtask distro lock {} --arch {arch}`",
                        path.display(),
                        recipe.name
                    ))
                }
                Some(_) => {}
            }
        }
        for arch in lock.arch.keys() {
            if !recipe.arches.keys().any(|a| a.as_str() == arch) {
                problems.push(format!(
                    "{}: pins {arch}, which the recipe no longer has",
                    path.display()
                ));
            }
        }
    }
    Ok((problems, unlocked))
}

fn lock(args: &LockArgs, ui: &Ui) -> Result<()> {
    let dir = recipes_dir(&args.recipes);
    let recipes = recipe::load_all(&dir)?;
    let recipe = recipe::find(&recipes, &args.name)?;
    let arches: Vec<Arch> = if args.arch.is_empty() {
        recipe.arches.keys().copied().collect()
    } else {
        args.arch.clone()
    };
    let path = lock_path(&dir, recipe);
    let mut lock = load_lock(&path)?;
    for arch in arches {
        let pins = resolve_arch(recipe, arch, args.mirror.as_deref(), ui)?;
        ui.println(format!(
            "{} {arch}: {} pinned file(s)",
            recipe.name,
            pins.file.len() + pins.deb.len()
        ));
        lock.arch.insert(arch.to_string(), pins);
    }
    save_lock(&path, &lock)?;
    ui.println(format!("wrote {}", path.display()));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Pull

/// The extra facts the manifest records beside the contract's keys.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullManifest {
    #[serde(flatten)]
    pub contract: DistroManifest,
    pub distro: String,
    pub arch: Arch,
    /// Size of the uncompressed rootfs tarball.
    pub rootfs_uncompressed_size: u64,
    pub modules_set: String,
    pub modules_count: usize,
    /// `/usr/sbin/grub-install` and `update-grub` are in the rootfs.
    pub grub_install: bool,
    pub update_grub: bool,
    /// `grub-install --target` for this architecture.
    pub grub_target: String,
    /// Path of the kernel's initramfs in the rootfs (e.g. `/boot/initrd.img-<kver>`), if any.
    pub initrd: Option<String>,
    /// Path of the kernel in the rootfs.
    pub kernel_path: String,
    pub cloud_init: bool,
    pub source_date_epoch: u64,
}

/// One row of the final table.
#[derive(Clone, Debug)]
pub struct Row {
    pub file: String,
    pub size: u64,
    pub cached: bool,
}

/// What a pull did.
#[derive(Clone, Debug)]
pub struct PullReport {
    pub dir: PathBuf,
    pub manifest: PullManifest,
    /// The build step came from the action cache.
    pub cached: bool,
    /// The published files already matched: nothing was written.
    pub up_to_date: bool,
    pub rows: Vec<Row>,
}

/// SOURCE_DATE_EPOCH for a recipe: the environment's, else the recipe's (Ubuntu: the serial's
/// date; Debian: `source_date_epoch` in the recipe). Never the clock: it is part of every key.
fn source_date_epoch(recipe: &Recipe) -> Result<u64> {
    if let Ok(v) = std::env::var("SOURCE_DATE_EPOCH") {
        return v
            .trim()
            .parse()
            .with_context(|| format!("SOURCE_DATE_EPOCH={v:?} is not a Unix time"));
    }
    match &recipe.source {
        Source::Ubuntu(u) => serial_epoch(&u.serial),
        Source::Debian(d) => Ok(d.source_date_epoch),
    }
}

/// `20250115` (or `20250115.1`) → that day, 00:00 UTC.
fn serial_epoch(serial: &str) -> Result<u64> {
    let date = serial.split('.').next().unwrap_or(serial);
    let bad = || format!("Ubuntu serial {serial:?} does not start with a YYYYMMDD date");
    if date.len() != 8 {
        bail!(bad());
    }
    let y: i64 = date[..4].parse().with_context(bad)?;
    let m: i64 = date[4..6].parse().with_context(bad)?;
    let d: i64 = date[6..].parse().with_context(bad)?;
    // Days from civil (Howard Hinnant).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Ok(((era * 146_097 + doe - 719_468) * 86_400) as u64)
}

/// `cargo xtask distro pull`: returns what it did (tests assert on it).
pub fn pull(args: &PullArgs, ui: &Ui) -> Result<PullReport> {
    let started = Instant::now();
    let dir = recipes_dir(&args.recipes);
    let recipes = recipe::load_all(&dir)?;
    let recipe = recipe::find(&recipes, &args.name)?;
    let arch = args.arch;
    let arch_recipe = recipe.arch(arch)?;
    let set = args.modules.unwrap_or(recipe.modules);
    let epoch = source_date_epoch(recipe)?;

    let lock_file = lock_path(&dir, recipe);
    let mut lock = load_lock(&lock_file)?;
    let fingerprint = pin_fingerprint(recipe, arch)?;
    let pins = match lock.arch.get(arch.as_str()) {
        Some(p) if p.fingerprint == fingerprint => p.clone(),
        stale => {
            ui.println(format!(
                "{} {arch}: {} — resolving pins into {}",
                recipe.name,
                if stale.is_some() {
                    "the recipe changed since it was locked"
                } else {
                    "not locked yet"
                },
                lock_file.display()
            ));
            let p = resolve_arch(recipe, arch, args.mirror.as_deref(), ui)?;
            lock.arch.insert(arch.to_string(), p.clone());
            save_lock(&lock_file, &lock)?;
            p
        }
    };

    let store = Store::open_default()?;
    let fetcher = Fetcher::new(&store, ui.clone())?;
    let built = match &recipe.source {
        Source::Ubuntu(u) => {
            let mut step = store
                .step("distro-ubuntu", STEP_VERSION)
                .param("arch", arch)
                .param("modules", set)
                .param("source_date_epoch", epoch);
            for f in &pins.file {
                step = step.input(&f.name, &f.sha256);
            }
            let image_name = arch_recipe.image.as_deref().expect("validated");
            let outputs = step.run(|out| {
                // Before any download: a missing tool should not cost a 600 MB fetch first.
                crate::hostdeps::ensure(&crate::hostdeps::UBUNTU_PULL)?;
                let fetches: Vec<Fetch> = pins
                    .file
                    .iter()
                    .map(|f| Fetch {
                        label: format!("{}/{}", recipe.name, f.name),
                        url: mirror_url(&f.url, &u.mirror, args.mirror.as_deref()),
                        sha256: f.sha256.clone(),
                        size: Some(f.size),
                        gone_hint: Some(format!(
                            "Ubuntu deletes old release serials: pick a current serial in the recipe and run `cargo xtask distro lock {}`",
                            recipe.name
                        )),
                    })
                    .collect();
                fetcher.fetch_all(&fetches)?;
                let sums_pin = pins.file.iter().find(|f| f.name == "SHA256SUMS").context("the lock has no SHA256SUMS pin")?;
                let image_pin = pins
                    .file
                    .iter()
                    .find(|f| f.name == image_name)
                    .with_context(|| format!("the lock has no pin for {image_name}"))?;
                let sums = store.read(&sums_pin.sha256)?;
                ubuntu::check_sums(&String::from_utf8_lossy(&sums), image_name, &image_pin.sha256)?;
                let scratch = out.parent().context("step output dir has a parent")?;
                let x = ubuntu::extract(&store.blob_path(&image_pin.sha256), arch, set, epoch, scratch, out, ui)?;
                write_json(&out.join(ROOTFS_JSON), &(x.rootfs, x.facts))?;
                write_json(&out.join(KERNEL_JSON), &x.modules)
            })?;
            Built::from_steps(&store, &[&outputs])?
        }
        Source::Debian(d) => {
            let fetches: Vec<Fetch> = pins
                .deb
                .iter()
                .map(|p| Fetch {
                    label: format!("{}/{}", recipe.name, p.pin.package),
                    url: crate::lock::debian_url(&p.pin.url).0,
                    sha256: p.pin.sha256.clone(),
                    size: Some(p.pin.size),
                    gone_hint: Some(format!(
                        "{} {} is no longer on the mirror: run `cargo xtask distro lock {}` to re-pin (or point \
                         PXELAB_DEBIAN_MIRROR at a snapshot of Debian)",
                        p.pin.package, p.pin.version, recipe.name
                    )),
                })
                .collect();
            let debs: Vec<(debian::LockedDeb, PathBuf)> = pins
                .deb
                .iter()
                .map(|d| (d.clone(), store.blob_path(&d.pin.sha256)))
                .collect();
            // The key asks mmdebstrap for its version, so tools come first (installed when root,
            // with qemu-user for a foreign arch in the same apt run).
            let mut tools = crate::hostdeps::DEBIAN_PULL.to_vec();
            if emulation::is_foreign(arch) {
                tools.extend(crate::hostdeps::emulation_deps(arch));
            }
            crate::hostdeps::ensure(&tools)?;
            // The rootfs does not depend on the module set: two steps, so `--modules` is cheap.
            let mut step = store
                .step("distro-debian-rootfs", debian::ROOTFS_STEP_VERSION)
                .param("arch", arch)
                .param("suite", &d.suite)
                .param("sources_list", d.sources_list.join("\n"))
                .param("source_date_epoch", epoch)
                .param("mmdebstrap", tool_version("mmdebstrap")?);
            for p in &pins.deb {
                step = step.input(&format!("deb:{}", p.pin.package), &p.pin.sha256);
            }
            let rootfs_out = step.run(|out| {
                // mmdebstrap runs the rootfs's own maintainer scripts.
                if emulation::is_foreign(arch) {
                    emulation::ensure(arch, ui)?;
                }
                fetcher.fetch_all(&fetches)?;
                let scratch = out.parent().context("step output dir has a parent")?;
                let r = debian::build_rootfs(&debs, d, arch, epoch, scratch, out, ui)?;
                write_json(&out.join(ROOTFS_JSON), &r)
            })?;
            let kernel = debian::kernel_package(&debs, arch_recipe)?;
            let kernel_out = store
                .step("distro-kernel-modules", STEP_VERSION)
                .input("kernel.deb", &kernel.0.pin.sha256)
                .param("arch", arch)
                .param("modules", set)
                .param("source_date_epoch", epoch)
                .run(|out| {
                    let f = Fetch {
                        label: format!("{}/{}", recipe.name, kernel.0.pin.package),
                        ..fetches
                            .iter()
                            .find(|f| f.sha256 == kernel.0.pin.sha256)
                            .expect("the kernel is one of the pinned debs")
                            .clone()
                    };
                    crate::fetch::ensure(&fetcher, &f)?;
                    let scratch = out.parent().context("step output dir has a parent")?;
                    let m = debian::build_kernel(&kernel.1, arch, set, epoch, scratch, out)?;
                    write_json(&out.join(KERNEL_JSON), &m)
                })?;
            Built::from_steps(&store, &[&rootfs_out, &kernel_out])?
        }
    };
    let manifest = manifest_for(recipe, arch, arch_recipe, set, epoch, &built)?;
    let mut text = serde_json::to_string_pretty(&manifest)?;
    text.push('\n');
    let digest = store.insert_bytes(text.as_bytes())?;
    let mut files: Vec<StepFile> = built.files.clone();
    files.push(StepFile {
        name: "manifest.json".into(),
        path: store.blob_path(&digest),
        digest,
        size: text.len() as u64,
        mode: 0o644,
    });
    files.sort_by(|a, b| a.name.cmp(&b.name));

    let images = crate::lab::home::images_dir(&recipe.name, arch.as_str())?;
    let up_to_date = published_matches(&images, &files);
    if !up_to_date {
        publish(&store, &files, &images)?;
    }
    let rows: Vec<Row> = files
        .iter()
        .map(|f| Row {
            file: f.name.clone(),
            size: f.size,
            cached: built
                .cached
                .get(&f.name)
                .copied()
                .unwrap_or(built.all_cached),
        })
        .collect();
    print_table(ui, &rows);
    let what = if up_to_date && built.all_cached {
        "up to date"
    } else {
        "published"
    };
    ui.println(format!(
        "{} {arch}: {what} in {} ({:.1} s)",
        recipe.name,
        images.display(),
        started.elapsed().as_secs_f64()
    ));
    Ok(PullReport {
        dir: images,
        manifest,
        cached: built.all_cached,
        up_to_date,
        rows,
    })
}

const ROOTFS_JSON: &str = "rootfs.json";
const KERNEL_JSON: &str = "kernel.json";

/// The published artifacts of one or more steps, and what their side records say.
struct Built {
    /// Artifacts only (the steps' JSON records are not published).
    files: Vec<StepFile>,
    cached: BTreeMap<String, bool>,
    all_cached: bool,
    rootfs: rootfs::RootfsInfo,
    facts: rootfs::Facts,
    modules: modules::ModulesInfo,
}

impl Built {
    fn from_steps(store: &Store, steps: &[&StepOutputs]) -> Result<Built> {
        let mut files = Vec::new();
        let mut cached = BTreeMap::new();
        let mut rootfs = None;
        let mut modules = None;
        for s in steps {
            for f in &s.files {
                match f.name.as_str() {
                    ROOTFS_JSON => rootfs = Some(serde_json::from_slice(&store.read(&f.digest)?)?),
                    KERNEL_JSON => modules = Some(serde_json::from_slice(&store.read(&f.digest)?)?),
                    _ => {
                        cached.insert(f.name.clone(), s.cached);
                        files.push(f.clone());
                    }
                }
            }
        }
        let (rootfs, facts): (rootfs::RootfsInfo, rootfs::Facts) =
            rootfs.context("no rootfs record in the cache")?;
        Ok(Built {
            files,
            cached,
            all_cached: steps.iter().all(|s| s.cached),
            rootfs,
            facts,
            modules: modules.context("no kernel record in the cache")?,
        })
    }

    fn file(&self, name: &str) -> Result<ManifestFile> {
        let f = self
            .files
            .iter()
            .find(|f| f.name == name)
            .with_context(|| format!("the build made no {name}"))?;
        Ok(ManifestFile {
            file: name.into(),
            sha256: f.digest.clone(),
            size: f.size,
        })
    }
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    fs::write(path, serde_json::to_vec_pretty(value)?)?;
    Ok(())
}

/// `mmdebstrap --version`: part of the rootfs key, since another version may build other bytes.
fn tool_version(tool: &str) -> Result<String> {
    let path = tools::require(tool, tool)?;
    let out = std::process::Command::new(&path)
        .arg("--version")
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A pinned URL on the recipe's mirror, moved to `--mirror` when given.
fn mirror_url(url: &str, recipe_mirror: &str, mirror: Option<&str>) -> String {
    match mirror {
        Some(m) => match url.strip_prefix(recipe_mirror.trim_end_matches('/')) {
            Some(rest) => format!("{}{rest}", m.trim_end_matches('/')),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

fn manifest_for(
    recipe: &Recipe,
    arch: Arch,
    arch_recipe: &recipe::ArchRecipe,
    set: ModuleSet,
    epoch: u64,
    built: &Built,
) -> Result<PullManifest> {
    let kernel_version = &built.modules.kernel_version;
    let facts = &built.facts;
    if !facts.has(&format!("boot/vmlinuz-{kernel_version}")) {
        bail!("the rootfs has no /boot/vmlinuz-{kernel_version}: its kernel differs from vmlinuz (re-lock the distro)");
    }
    if !facts.has("usr/sbin/grub-install") {
        bail!("the rootfs has no /usr/sbin/grub-install: the installer could not make the disk bootable");
    }
    let initrd = format!("boot/initrd.img-{kernel_version}");
    Ok(PullManifest {
        contract: DistroManifest {
            rootfs: built.file("rootfs.tar.zst")?,
            kernel_version: kernel_version.to_string(),
            kernel: Some(built.file("vmlinuz")?),
            modules: Some(built.file("modules.cpio.zst")?),
        },
        distro: recipe.name.clone(),
        arch,
        rootfs_uncompressed_size: built.rootfs.uncompressed_size,
        modules_set: set.to_string(),
        modules_count: built.modules.count,
        grub_install: true,
        update_grub: facts.has("usr/sbin/update-grub"),
        grub_target: arch_recipe.grub_target.clone(),
        initrd: facts.has(&initrd).then(|| format!("/{initrd}")),
        kernel_path: format!("/boot/vmlinuz-{kernel_version}"),
        cloud_init: facts.has("usr/bin/cloud-init"),
        source_date_epoch: epoch,
    })
}

/// The published directory holds exactly these outputs (by manifest digests and sizes).
fn published_matches(dir: &Path, files: &[StepFile]) -> bool {
    let Ok(text) = fs::read(dir.join("manifest.json")) else {
        return false;
    };
    let Some(manifest) = files.iter().find(|f| f.name == "manifest.json") else {
        return false;
    };
    if sha256_hex(&text) != manifest.digest {
        return false;
    }
    // The manifest names each file's digest; size and inode time cheaply catch a replaced file.
    files
        .iter()
        .all(|f| fs::metadata(dir.join(&f.name)).is_ok_and(|m| m.len() == f.size))
}

/// Writes the outputs into a sibling temp dir and swaps it in atomically.
fn publish(store: &Store, files: &[StepFile], dest: &Path) -> Result<()> {
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

fn print_table(ui: &Ui, rows: &[Row]) {
    ui.println(format!("{:<20} {:>12}  {}", "artifact", "size", "cached"));
    for r in rows {
        ui.println(format!(
            "{:<20} {:>12}  {}",
            r.file,
            human_bytes(r.size),
            if r.cached { "yes" } else { "no" }
        ));
    }
}

// ---------------------------------------------------------------------------------------------
// List

fn list(args: &ListArgs) -> Result<()> {
    let recipes = recipe::load_all(&recipes_dir(&args.recipes))?;
    let mut families: BTreeMap<&str, &Recipe> = BTreeMap::new();
    for r in &recipes {
        let newest = recipe::find(&recipes, r.family())?;
        families.insert(r.family(), newest);
    }
    println!(
        "{:<16} {:<10} {:<8} {:>10} {:>10} {:>10}  aliases",
        "distro", "arch", "pulled", "rootfs", "kernel", "modules"
    );
    for r in &recipes {
        let aliases: Vec<&str> = families
            .iter()
            .filter(|(_, n)| n.name == r.name)
            .map(|(f, _)| *f)
            .collect();
        for arch in r.arches.keys() {
            let dir = crate::lab::home::images_dir(&r.name, arch.as_str())?;
            let manifest: Option<DistroManifest> = fs::read(dir.join("manifest.json"))
                .ok()
                .and_then(|t| serde_json::from_slice(&t).ok());
            let size = |f: Option<&ManifestFile>| {
                f.map(|f| human_bytes(f.size)).unwrap_or_else(|| "-".into())
            };
            match &manifest {
                Some(m) => println!(
                    "{:<16} {:<10} {:<8} {:>10} {:>10} {:>10}  {}",
                    r.name,
                    arch.as_str(),
                    "yes",
                    size(Some(&m.rootfs)),
                    size(m.kernel.as_ref()),
                    size(m.modules.as_ref()),
                    aliases.join(",")
                ),
                None => println!(
                    "{:<16} {:<10} {:<8} {:>10} {:>10} {:>10}  {}",
                    r.name,
                    arch.as_str(),
                    "no",
                    "-",
                    "-",
                    "-",
                    aliases.join(",")
                ),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_check_flags_an_edited_recipe_and_a_missing_arch() {
        let dir = tempfile::tempdir().unwrap();
        let projects = crate::util::project_root().join("recipes/distros");
        for name in ["debian-12.toml", "debian-12.lock", "ubuntu-24.04.toml"] {
            fs::copy(projects.join(name), dir.path().join(name)).unwrap();
        }
        let (problems, unlocked) = check_locks(dir.path()).unwrap();
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(unlocked, ["ubuntu-24.04"]);

        let recipe = dir.path().join("debian-12.toml");
        let text = fs::read_to_string(&recipe).unwrap();
        fs::write(&recipe, text.replace("\"sudo\", ", "")).unwrap();
        let (problems, _) = check_locks(dir.path()).unwrap();
        assert_eq!(problems.len(), 2, "both arches are stale: {problems:?}");
        assert!(
            problems[0].contains("cargo xtask distro lock debian-12"),
            "{problems:?}"
        );

        fs::write(&recipe, text).unwrap();
        let lock_file = dir.path().join("debian-12.lock");
        let mut lock = load_lock(&lock_file).unwrap();
        lock.arch.remove("aarch64");
        save_lock(&lock_file, &lock).unwrap();
        let (problems, _) = check_locks(dir.path()).unwrap();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].contains("aarch64 is not pinned"),
            "{problems:?}"
        );
    }

    #[test]
    fn serials_map_to_their_day() {
        assert_eq!(serial_epoch("20250115").unwrap(), 1_736_899_200);
        assert_eq!(serial_epoch("20240423.1").unwrap(), 1_713_830_400);
        assert!(serial_epoch("current").is_err());
    }

    #[test]
    fn mirror_override_keeps_the_release_path() {
        let url = "https://cloud-images.ubuntu.com/releases/noble/release-1/SHA256SUMS";
        assert_eq!(
            mirror_url(
                url,
                "https://cloud-images.ubuntu.com",
                Some("http://127.0.0.1:9/u/")
            ),
            "http://127.0.0.1:9/u/releases/noble/release-1/SHA256SUMS"
        );
        assert_eq!(
            mirror_url(url, "https://cloud-images.ubuntu.com", None),
            url
        );
    }

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
