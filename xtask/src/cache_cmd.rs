//! `cargo xtask cache du|verify|gc`: report, check and prune the store.
//!
//! gc's roots ([`roots`]): the pins of `recipes/pxelab.lock`, the outputs named by this
//! checkout's `build/stack/<arch>/manifest.json` (what `build-stack` last copied there) and by
//! the lab home's `images/<distro>/<arch>/manifest.json` (what `distro pull` published). The
//! store keeps those and the action records that produced them (see [`crate::store::gc`]), so
//! `build-stack` or `distro pull` right after a gc is still a cache hit. gc takes the store lock
//! exclusively, so it waits until running builds finish.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use pxelab_contract::DistroManifest;
use serde::Deserialize;

use crate::lock::Lock;
use crate::store::{gc, BlobState, Roots, Store};
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
    /// Delete blobs and action records that neither the lock nor the published build outputs
    /// (build/stack, the lab home's images) reach; report bytes freed.
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
            let roots = roots(&lock, &crate::util::project_root(), &lab_images()?)?;
            let store = Store::open_exclusive(&Store::default_root()?)?;
            let r = gc(&store, &roots, dry_run)?;
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
    let tmp = crate::util::dir_size(&store.tmp_dir());
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

/// `<lab home>/images`, where `distro pull` publishes (read only here).
fn lab_images() -> Result<PathBuf> {
    Ok(crate::lab::home::Lab::open()?.images_root())
}

/// gc's roots: the pins of `lock`, the outputs of every `<workspace>/build/stack/<arch>/
/// manifest.json` and of every `<images>/<distro>/<arch>/manifest.json`. A directory that does
/// not exist adds nothing; a manifest that cannot be read is an error (gc would otherwise drop
/// what it names).
pub fn roots(lock: &Lock, workspace: &Path, images: &Path) -> Result<Roots> {
    #[derive(Deserialize)]
    struct StackManifest {
        outputs: Vec<StackOutput>,
    }
    #[derive(Deserialize)]
    struct StackOutput {
        sha256: String,
    }
    let mut roots = Roots {
        pinned: lock.inputs.iter().map(|i| i.pin.sha256.clone()).collect(),
        ..Roots::default()
    };
    for path in manifests(&workspace.join("build/stack"), 1)? {
        let m: StackManifest = read_json(&path)?;
        roots
            .published
            .extend(m.outputs.into_iter().map(|o| o.sha256));
    }
    for path in manifests(images, 2)? {
        let m: DistroManifest = read_json(&path)?;
        roots.published.extend(m.files().map(|f| f.sha256.clone()));
    }
    Ok(roots)
}

/// Every `manifest.json` exactly `depth` directories below `dir`, sorted.
fn manifests(dir: &Path, depth: usize) -> Result<BTreeSet<PathBuf>> {
    let mut dirs = BTreeSet::from([dir.to_path_buf()]);
    for _ in 0..depth {
        let mut next = BTreeSet::new();
        for d in dirs {
            let Ok(entries) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in entries {
                let e = e.with_context(|| format!("listing {}", d.display()))?;
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    next.insert(e.path());
                }
            }
        }
        dirs = next;
    }
    Ok(dirs
        .into_iter()
        .map(|d| d.join("manifest.json"))
        .filter(|m| m.is_file())
        .collect())
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&text).with_context(|| {
        format!(
            "{} is not a manifest gc can read: delete it (and its directory) or rebuild it",
            path.display()
        )
    })
}
