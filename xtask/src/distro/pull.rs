//! `cargo xtask distro pull`: the recipe's pins (from its lock), the build steps through the
//! action cache (`ubuntu::step`, or `debian::rootfs_step` + `debian::kernel_step`, then
//! `diskimg::step` on the rootfs), the manifest, then publishing into the lab home and a table
//! of what was cached.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use pxelab_contract::{Arch, DistroManifest, ManifestFile};
use serde::{Deserialize, Serialize};

use super::modules::{self, ModuleSet};
use super::recipe::{self, Recipe, Source};
use super::{debian, diskimg, rootfs, ubuntu, Job, KERNEL_JSON, ROOTFS_JSON};
use crate::fetch::Fetcher;
use crate::store::{StepFile, StepOutputs, Store};
use crate::ui::Ui;
use crate::util::human_bytes;

#[derive(clap::Args, Clone, Debug)]
pub struct PullArgs {
    /// Recipe name (`debian-12`, `ubuntu-24.04`) or family alias (`debian`, `ubuntu`).
    pub name: String,
    /// x86_64 or aarch64.
    #[arg(long, default_value = "x86_64", value_parser = super::parse_arch)]
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
    let dir = super::recipes_dir(&args.recipes);
    let recipes = recipe::load_all(&dir)?;
    let recipe = recipe::find(&recipes, &args.name)?;
    let arch = args.arch;
    let job_modules = args.modules.unwrap_or(recipe.modules);
    let epoch = source_date_epoch(recipe)?;
    let pins = super::lock::pins_for(&dir, recipe, arch, args.mirror.as_deref(), ui)?;

    let store = Store::open_default()?;
    let fetcher = Fetcher::new(&store, ui.clone())?;
    let job = Job {
        store: &store,
        fetcher: &fetcher,
        recipe,
        arch,
        arch_recipe: recipe.arch(arch)?,
        modules: job_modules,
        epoch,
        mirror: args.mirror.as_deref(),
        ui,
    };
    let mut built = match &recipe.source {
        Source::Ubuntu(u) => Built::from_steps(&store, &[&ubuntu::step(&job, u, &pins)?])?,
        Source::Debian(d) => {
            let rootfs = debian::rootfs_step(&job, d, &pins)?;
            let kernel = debian::kernel_step(&job, &pins)?;
            Built::from_steps(&store, &[&rootfs, &kernel])?
        }
    };
    let initrd = format!("boot/initrd.img-{}", built.modules.kernel_version);
    let disk = diskimg::step(
        &store,
        built.step_file("rootfs.tar.zst")?,
        built.facts.has(&initrd).then_some(initrd.as_str()),
        epoch,
    )?;
    built.add(&disk);
    let manifest = manifest_for(&job, &built)?;
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
    let up_to_date = super::publish::published_matches(&images, &files);
    if !up_to_date {
        super::publish::publish(&store, &files, &images)?;
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

    /// The outputs of a step that runs on what the first steps made.
    fn add(&mut self, step: &StepOutputs) {
        for f in &step.files {
            self.cached.insert(f.name.clone(), step.cached);
            self.files.push(f.clone());
        }
        self.all_cached &= step.cached;
    }

    fn step_file(&self, name: &str) -> Result<&StepFile> {
        self.files
            .iter()
            .find(|f| f.name == name)
            .with_context(|| format!("the build made no {name}"))
    }

    fn file(&self, name: &str) -> Result<ManifestFile> {
        let f = self.step_file(name)?;
        Ok(ManifestFile {
            file: name.into(),
            sha256: f.digest.clone(),
            size: f.size,
        })
    }
}

fn manifest_for(job: &Job, built: &Built) -> Result<PullManifest> {
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
            disk_image: Some(built.file(diskimg::IMAGE)?),
            disk_image_zst: Some(built.file(diskimg::IMAGE_ZST)?),
            initramfs: built.file(diskimg::INITRD).ok(),
        },
        distro: job.recipe.name.clone(),
        arch: job.arch,
        rootfs_uncompressed_size: built.rootfs.uncompressed_size,
        modules_set: job.modules.to_string(),
        modules_count: built.modules.count,
        grub_install: true,
        update_grub: facts.has("usr/sbin/update-grub"),
        grub_target: job.arch_recipe.grub_target.clone(),
        initrd: facts.has(&initrd).then(|| format!("/{initrd}")),
        kernel_path: format!("/boot/vmlinuz-{kernel_version}"),
        cloud_init: facts.has("usr/bin/cloud-init"),
        source_date_epoch: job.epoch,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_map_to_their_day() {
        assert_eq!(serial_epoch("20250115").unwrap(), 1_736_899_200);
        assert_eq!(serial_epoch("20240423.1").unwrap(), 1_713_830_400);
        assert!(serial_epoch("current").is_err());
    }
}
