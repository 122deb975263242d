//! `cargo xtask fetch`: put every input `recipes/pxelab.lock` pins into the store (the engine is
//! [`crate::fetch`]), or with `--offline` list exactly what is missing.

use std::path::PathBuf;

use anyhow::{bail, Result};

use crate::fetch::{offline_report, Fetch, Fetcher};
use crate::lock::Lock;
use crate::store::Store;
use crate::ui::Ui;
use crate::util::human_bytes;

/// `cargo xtask fetch`: put every locked input into the store.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Use the store only: download nothing, list exactly what is missing, fail if anything is.
    #[arg(long)]
    pub offline: bool,
    /// Only inputs of this recipe (e.g. `initrd`).
    #[arg(long)]
    pub recipe: Option<String>,
    /// Only inputs for this arch (e.g. `amd64`).
    #[arg(long)]
    pub arch: Option<String>,
    /// Lock file to read (default: recipes/pxelab.lock).
    #[arg(long, value_name = "FILE")]
    pub lock: Option<PathBuf>,
    /// Parallel downloads.
    #[arg(long, short = 'j', default_value_t = 4)]
    pub jobs: usize,
}

pub fn run(args: Args) -> Result<()> {
    let lock_path = args.lock.unwrap_or_else(Lock::default_path);
    let lock = Lock::load(&lock_path)?;
    // Several recipes pin the same file (libc6 is in most closures): count and fetch it once.
    let mut seen = std::collections::HashSet::new();
    let items: Vec<Fetch> = lock
        .inputs
        .iter()
        .filter(|i| args.recipe.as_ref().is_none_or(|r| &i.recipe == r))
        .filter(|i| args.arch.as_ref().is_none_or(|a| &i.arch == a))
        .map(|i| i.to_fetch())
        .filter(|f| seen.insert(f.sha256.clone()))
        .collect();
    if items.is_empty() {
        bail!(
            "no locked inputs match the given --recipe/--arch in {}",
            lock_path.display()
        );
    }
    let store = Store::open_default()?;
    let ui = Ui::new();
    let mut fetcher = Fetcher::new(&store, ui.clone())?;
    fetcher.jobs = args.jobs.max(1);
    if args.offline {
        let missing = fetcher.missing(&items)?;
        if !missing.is_empty() {
            bail!("{}", offline_report(&missing));
        }
        ui.println(format!(
            "offline: all {} locked files are in the store at {}",
            items.len(),
            store.root().display()
        ));
        return Ok(());
    }
    let s = fetcher.fetch_all(&items)?;
    let secs = s.elapsed.as_secs_f64();
    if s.downloaded.is_empty() {
        ui.println(format!(
            "all {} locked files are already in the store ({}); nothing needed downloading ({secs:.2}s)",
            s.present,
            store.root().display()
        ));
    } else {
        let bytes: u64 = s.downloaded.iter().map(|(_, n)| n).sum();
        ui.println(format!(
            "downloaded {} files ({}) in {secs:.1}s; {} were already in the store",
            s.downloaded.len(),
            human_bytes(bytes),
            s.present
        ));
    }
    Ok(())
}
