//! `cargo xtask cache du|verify|gc`: report, check and prune the store.
//!
//! gc keeps exactly: blobs pinned by `recipes/pxelab.lock`, and for every action record whose
//! input digests are all kept, that record and its outputs. It iterates to a fixed point, so a
//! step built from another step's output survives as long as the chain leads back to the lock.
//! Everything else is deleted: blobs of old pins, outputs of steps whose inputs changed, records
//! of steps keyed on digests that are not in the store (e.g. a hash of source files: such a step
//! is simply rebuilt on its next use), stale `.part` downloads, scratch dirs and per-item lock
//! files. gc takes the store lock exclusively, so it waits until running builds finish.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Result};

use crate::lock::Lock;
use crate::store::{BlobState, Store};
use crate::util::human_bytes;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Show the store's location and size (blobs, action records, partial downloads).
    Du,
    /// Hash every blob and report (and remove) corrupt ones.
    Verify,
    /// Delete blobs and action records not reachable from the lock; report bytes freed.
    Gc {
        /// Lock file whose pins are kept (default: recipes/pxelab.lock).
        #[arg(long, value_name = "FILE")]
        lock: Option<PathBuf>,
        /// Only report what would be deleted.
        #[arg(long)]
        dry_run: bool,
    },
}

pub fn run(args: Args) -> Result<()> {
    match args.command {
        Command::Du => du(&Store::open_default()?),
        Command::Verify => verify(&Store::open_default()?),
        Command::Gc { lock, dry_run } => {
            let lock = Lock::load(&lock.unwrap_or_else(Lock::default_path))?;
            let store = Store::open_exclusive(&Store::default_root()?)?;
            let r = gc(&store, &lock, dry_run)?;
            let verb = if dry_run { "would free" } else { "freed" };
            eprintln!(
                "gc: kept {} blobs and {} action records; {verb} {} ({} blobs, {} records, {} temp files)",
                r.kept_blobs,
                r.kept_actions,
                human_bytes(r.freed_bytes),
                r.removed_blobs,
                r.removed_actions,
                r.removed_tmp
            );
            Ok(())
        }
    }
}

fn du(store: &Store) -> Result<()> {
    let blobs = store.list_blobs()?;
    let bytes: u64 = blobs.iter().map(|(_, n)| n).sum();
    let actions = store.list_actions()?;
    let tmp = dir_size(&store.tmp_dir());
    let mut out = std::io::stdout().lock();
    writeln!(out, "store:   {}", store.root().display())?;
    writeln!(out, "blobs:   {} ({})", blobs.len(), human_bytes(bytes))?;
    writeln!(out, "actions: {}", actions.len())?;
    writeln!(
        out,
        "tmp:     {} (partial downloads, scratch)",
        human_bytes(tmp)
    )?;
    Ok(())
}

fn verify(store: &Store) -> Result<()> {
    let blobs = store.list_blobs()?;
    let mut bad = Vec::new();
    for (digest, _) in &blobs {
        if let BlobState::Corrupt { actual } = store.check_full(digest)? {
            bad.push(format!("{digest} (content hashes to {actual}; removed)"));
        }
    }
    if !bad.is_empty() {
        bail!(
            "{} of {} blobs were corrupt:\n  {}\nrun `cargo xtask fetch` (and rebuild) to restore them",
            bad.len(),
            blobs.len(),
            bad.join("\n  ")
        );
    }
    writeln!(
        std::io::stdout(),
        "verified {} blobs: all good",
        blobs.len()
    )?;
    Ok(())
}

/// What [`gc`] did (or would do).
#[derive(Debug, Default)]
pub struct GcReport {
    pub kept_blobs: usize,
    pub kept_actions: usize,
    pub removed_blobs: usize,
    pub removed_actions: usize,
    pub removed_tmp: usize,
    pub freed_bytes: u64,
}

/// Prune `store` to what `lock` reaches (see the module doc). Needs the exclusive store lock.
pub fn gc(store: &Store, lock: &Lock, dry_run: bool) -> Result<GcReport> {
    let mut keep: BTreeSet<String> = lock.inputs.iter().map(|i| i.pin.sha256.clone()).collect();
    let actions = store.list_actions()?;
    let mut live = vec![false; actions.len()];
    loop {
        let mut changed = false;
        for (i, (_, rec)) in actions.iter().enumerate() {
            if !live[i] && rec.inputs.values().all(|d| keep.contains(d)) {
                live[i] = true;
                changed = true;
                keep.extend(rec.outputs.iter().map(|o| o.sha256.clone()));
            }
        }
        if !changed {
            break;
        }
    }
    let mut r = GcReport::default();
    for (digest, size) in store.list_blobs()? {
        if keep.contains(&digest) {
            r.kept_blobs += 1;
        } else {
            r.removed_blobs += 1;
            r.freed_bytes += size;
            if !dry_run {
                store.remove_blob(&digest)?;
            }
        }
    }
    for ((path, _), live) in actions.iter().zip(&live) {
        if *live {
            r.kept_actions += 1;
        } else {
            r.removed_actions += 1;
            if !dry_run {
                std::fs::remove_file(path)?;
            }
        }
    }
    // Nobody else holds the store now, so partial downloads, scratch dirs and per-item lock
    // files are leftovers.
    if !dry_run {
        for entry in std::fs::read_dir(store.root().join("locks"))? {
            std::fs::remove_file(entry?.path())?;
        }
    }
    for entry in std::fs::read_dir(store.tmp_dir())? {
        let path = entry?.path();
        r.removed_tmp += 1;
        r.freed_bytes += dir_size(&path);
        if !dry_run {
            if path.is_dir() {
                std::fs::remove_dir_all(&path)?;
            } else {
                std::fs::remove_file(&path)?;
            }
        }
    }
    Ok(r)
}

fn dir_size(path: &std::path::Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if !meta.is_dir() {
        return meta.len();
    }
    std::fs::read_dir(path)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| dir_size(&e.path())).sum())
        .unwrap_or(0)
}
