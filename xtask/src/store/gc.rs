//! Pruning the store to what its roots reach (`cargo xtask cache gc`).
//!
//! Roots are of two kinds. *Pinned* digests are upstream inputs (the lock's pins): a record is
//! live when every input it was keyed on is kept, and then its outputs are kept, to a fixed
//! point, so a chain of steps survives as long as it leads back to the pins. *Published* digests
//! are outputs someone uses (the files of a build directory or of the lab home): the records
//! that produced them are live, and so are the records that produced those records' inputs, so
//! the next build that asks for them is a cache hit all the way down. Inputs that no live record
//! produced (a hash of source files, a `.deb` of a distro's closure) are not kept for that.
//! Everything else goes: blobs of old pins, outputs of steps whose inputs changed, stale `.part`
//! downloads, scratch dirs and per-item lock files.

use std::collections::BTreeSet;

use anyhow::Result;

use super::Store;
use crate::util::dir_size;

/// What [`gc`] keeps, with the records that lead to it.
#[derive(Clone, Debug, Default)]
pub struct Roots {
    /// Upstream inputs (the lock's pins).
    pub pinned: BTreeSet<String>,
    /// Outputs that are in use (build directories, published lab artifacts).
    pub published: BTreeSet<String>,
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

/// Prunes `store` to what `roots` reach (see the module doc). Needs the exclusive store lock.
pub fn gc(store: &Store, roots: &Roots, dry_run: bool) -> Result<GcReport> {
    let actions = store.list_actions()?;
    let mut keep: BTreeSet<String> = roots.pinned.union(&roots.published).cloned().collect();
    // Digests whose producing records must stay.
    let mut wanted: BTreeSet<String> = roots.published.clone();
    let mut live = vec![false; actions.len()];
    loop {
        let mut changed = false;
        for (i, (_, rec)) in actions.iter().enumerate() {
            let built_from_kept = rec.inputs.values().all(|d| keep.contains(d));
            let produces_wanted = rec.outputs.iter().any(|o| wanted.contains(&o.sha256));
            if !live[i] && (built_from_kept || produces_wanted) {
                live[i] = true;
                changed = true;
                keep.extend(rec.outputs.iter().map(|o| o.sha256.clone()));
                wanted.extend(rec.inputs.values().cloned());
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
