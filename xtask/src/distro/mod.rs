//! `cargo xtask distro list|pull|lock`: per-distro boot artifacts in the lab home.
//!
//! A pull produces, under `<lab home>/images/<distro>/<arch>/`, `vmlinuz`, `modules.cpio.zst`,
//! `rootfs.tar.zst`, its ext4 image `rootfs.img` with the rootfs's own `initrd.img` (`diskimg`)
//! and `manifest.json` (the contract's `DistroManifest` plus facts for the installer). The jobs, one module each: `lock` (the distro locks: pins per arch, resolved and
//! checked), `pull` (the build steps through the action cache, then the manifest), `publish`
//! (the atomic swap into the lab home), `list`. The source-specific steps, each key beside the
//! body it keys, live in `debian` and `ubuntu`.
//!
//! Pins live in `recipes/distros/<name>.lock` (written by `distro lock`, or by the first pull of
//! an arch that has none); the recipes themselves hold intent only.

pub mod debian;
pub mod diskimg;
mod emulation;
mod ext4script;
mod list;
pub mod lock;
pub mod modules;
mod publish;
mod pull;
pub mod recipe;
pub mod rootfs;
pub mod ubuntu;

use std::path::{Path, PathBuf};

use anyhow::Result;
use pxelab_contract::Arch;
use serde::Serialize;

use crate::fetch::Fetcher;
use crate::store::Store;
use crate::ui::Ui;
use modules::ModuleSet;
use recipe::{ArchRecipe, Recipe};

pub use pull::{pull, PullArgs, PullManifest, PullReport, Row};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// List the distro recipes, their architectures and what is pulled.
    List(list::ListArgs),
    /// Build a distro's kernel, modules archive and root filesystem into the lab home.
    Pull(PullArgs),
    /// Resolve a distro's pins (image digests or the Debian package closure) into its lock.
    Lock(lock::LockArgs),
}

fn parse_arch(s: &str) -> Result<Arch, String> {
    s.parse()
}

pub fn run(args: Args) -> Result<()> {
    match args.command {
        Command::List(a) => list::run(&a),
        Command::Pull(a) => pull(&a, &Ui::new()).map(|_| ()),
        Command::Lock(a) => lock::run(&a, &Ui::new()),
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

/// What the build steps of one pull share.
struct Job<'a> {
    store: &'a Store,
    fetcher: &'a Fetcher<'a>,
    recipe: &'a Recipe,
    arch: Arch,
    arch_recipe: &'a ArchRecipe,
    modules: ModuleSet,
    /// SOURCE_DATE_EPOCH of every output.
    epoch: u64,
    /// `--mirror`: where an Ubuntu recipe's pinned files are fetched from instead.
    mirror: Option<&'a str>,
    ui: &'a Ui,
}

impl Job<'_> {
    /// `debian-12/<file>`: how a download of this pull is labelled.
    fn label(&self, file: &str) -> String {
        format!("{}/{file}", self.recipe.name)
    }

    /// The command that pins this distro again.
    fn relock(&self) -> String {
        format!("cargo xtask distro lock {}", self.recipe.name)
    }
}

/// The side record of a rootfs step: [`rootfs::RootfsInfo`] and [`rootfs::Facts`].
const ROOTFS_JSON: &str = "rootfs.json";
/// The side record of a kernel step: [`modules::ModulesInfo`].
const KERNEL_JSON: &str = "kernel.json";

fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    std::fs::write(path, serde_json::to_vec_pretty(value)?)?;
    Ok(())
}
