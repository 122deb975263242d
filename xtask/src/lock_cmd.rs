//! `cargo xtask lock`: resolve `recipes/*.toml` into `recipes/pxelab.lock` (network), or
//! `--check` it and every distro lock in `recipes/distros/` against their recipes (no network).

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::{bail, Result};

use crate::lock::Lock;
use crate::recipe;
use crate::ui::Ui;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Verify that the lock matches the recipes, without network; exit non-zero if not.
    #[arg(long)]
    pub check: bool,
    /// Recipes directory.
    #[arg(long, value_name = "DIR")]
    pub recipes: Option<PathBuf>,
    /// Lock file to write or check.
    #[arg(long, value_name = "FILE")]
    pub lock: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    let dir = args
        .recipes
        .unwrap_or_else(|| crate::util::project_root().join("recipes"));
    let path = args.lock.unwrap_or_else(|| dir.join("pxelab.lock"));
    let requests = recipe::load_dir(&dir)?;
    if args.check {
        let lock = Lock::load(&path)?;
        let mut problems = lock.check(&requests);
        // The distro locks sit beside the project's, one per distro recipe.
        let distros = dir.join("distros");
        let mut unlocked = Vec::new();
        if distros.is_dir() {
            let (p, u) = crate::distro::lock::check_locks(&distros)?;
            problems.extend(p);
            unlocked = u;
        }
        if !problems.is_empty() {
            bail!(
                "{} does not match the recipes in {}:\n  {}\nrun `cargo xtask lock` to update it",
                path.display(),
                dir.display(),
                problems.join("\n  ")
            );
        }
        eprintln!(
            "{} matches the recipes: {} sets, {} pinned files; distro locks match their recipes",
            path.display(),
            lock.sets.len(),
            lock.inputs.len()
        );
        for name in unlocked {
            eprintln!("{name}: no lock yet (written by its first `cargo xtask distro pull`)");
        }
        return Ok(());
    }
    let ui = Ui::new();
    let old = Lock::load(&path).ok();
    let lock = Lock::resolve(&requests, &ui)?;
    let problems = lock.check(&requests);
    if !problems.is_empty() {
        bail!(
            "resolution produced an inconsistent lock (a bug):\n  {}",
            problems.join("\n  ")
        );
    }
    let pins = |l: &Lock| -> BTreeSet<(String, String)> {
        l.inputs
            .iter()
            .map(|i| (i.label(), i.pin.sha256.clone()))
            .collect()
    };
    let (added, removed) = match &old {
        Some(old) => {
            let (a, b) = (pins(old), pins(&lock));
            (b.difference(&a).count(), a.difference(&b).count())
        }
        None => (lock.inputs.len(), 0),
    };
    lock.save(&path)?;
    let bytes: u64 = lock.inputs.iter().map(|i| i.pin.size).sum();
    eprintln!(
        "wrote {}: {} sets, {} pinned files ({}); {added} new or changed pins, {removed} dropped",
        path.display(),
        lock.sets.len(),
        lock.inputs.len(),
        crate::util::human_bytes(bytes)
    );
    Ok(())
}
