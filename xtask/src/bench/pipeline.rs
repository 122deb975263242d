//! Figure 1: the pipeline. `build-stack` cold (an empty store holding only the downloaded
//! inputs, as right after `cargo xtask fetch`) and warm (nothing to do), `distro pull debian`
//! warm, and the sizes of what we ship.
//!
//! Cold runs use a fresh store per run, seeded with copies of the locked input blobs from the
//! user's store (inserted and hashed before the clock starts), so downloads are not measured
//! and the user's store is never touched. Cargo's own target directory stays warm: the cold
//! figure measures the pipeline (initrd, iPXE set, image), not rustc.

use anyhow::{ensure, Context, Result};

use super::report::{Better, Group, Row};
use super::{mib, pull_args, stack_args, timed, Ctx, DEBIAN_12};
use crate::distro::modules::ModuleSet;
use crate::fetch::Fetcher;
use crate::lock::Lock;
use crate::store::Store;

pub fn run(ctx: &mut Ctx, group: &mut Group) -> Result<()> {
    let cold_runs = ctx.runs(3, 1);
    let warm_runs = ctx.runs(5, 2);
    let root = crate::util::project_root();
    let arch = pxelab_contract::Arch::X86_64;
    let lock = Lock::load(&root.join("recipes/pxelab.lock"))?;
    let mut inputs = Vec::new();
    for (recipe, a) in [
        ("initrd", arch.debian()),
        ("stack", arch.debian()),
        ("ipxe", "all"),
    ] {
        inputs.extend(lock.select(recipe, a)?);
    }
    let user_store = Store::open_default()?;
    let fetches: Vec<_> = inputs.iter().map(|i| i.to_fetch()).collect();
    Fetcher::new(&user_store, ctx.ui.clone())?
        .fetch_all(&fetches)
        .context("downloading the locked inputs first")?;

    let dir = ctx.scratch("pipeline")?;
    let out = dir.join("out");
    let mut cold = Vec::new();
    let mut cargo_secs = Vec::new();
    let mut last = None;
    for i in 0..cold_runs {
        let store_dir = dir.join(format!("store-{i}"));
        let store = Store::open(&store_dir)?;
        for f in &fetches {
            let tmp = store.tmp_dir().join(format!("seed-{}", f.sha256));
            std::fs::copy(user_store.blob_path(&f.sha256), &tmp)
                .with_context(|| format!("copying {} into the cold store", f.label))?;
            store.insert_file(&tmp, Some(&f.sha256))?;
        }
        let _ = std::fs::remove_dir_all(&out);
        ctx.ui.println(format!(
            "bench pipeline: build-stack cold, run {}/{cold_runs}",
            i + 1
        ));
        let (report, secs) =
            timed(|| crate::stack::build(&store, &stack_args(Some(out.clone())), &ctx.ui))?;
        ensure!(
            !report.all_cached(),
            "the cold build found every artifact cached in an empty store"
        );
        cold.push(secs);
        // The static-binary steps run cargo: its share shows when another build made it compile.
        let cargo: f64 = report
            .artifacts
            .iter()
            .filter(|a| a.name == "pxelab-stack" || a.name == "pxelab-installer")
            .map(|a| a.time.as_secs_f64())
            .sum();
        cargo_secs.push(cargo);
        if let Some((old_dir, _)) = last.replace((store_dir, report)) {
            let _ = std::fs::remove_dir_all(old_dir);
        }
    }
    group.push(
        &ctx.ui,
        Row::new(
            "build-stack cold (empty store, inputs downloaded)",
            "s",
            Better::Lower,
            cold,
        )
        .note(format!(
            "{} locked inputs; cargo target dir warm; of which cargo (static binaries) {:.1} s median",
            fetches.len(),
            super::report::stats(&cargo_secs).0.unwrap_or(0.0)
        )),
    );
    let (store_dir, report) = last.context("no cold run")?;

    let store = Store::open(&store_dir)?;
    let mut warm = Vec::new();
    let mut rebuilt = 0;
    for _ in 0..warm_runs {
        let (r, secs) =
            timed(|| crate::stack::build(&store, &stack_args(Some(out.clone())), &ctx.ui))?;
        if !r.all_cached() || r.copied {
            rebuilt += 1;
        }
        warm.push(secs);
    }
    let mut row = Row::new(
        "build-stack warm (nothing changed)",
        "s",
        Better::Lower,
        warm,
    );
    if rebuilt > 0 {
        row = row.note(format!(
            "{rebuilt} run(s) rebuilt or copied something: not a no-op"
        ));
    }
    group.push(&ctx.ui, row);

    for (name, label) in [
        ("initrd-x86_64.img", "installer initrd (zstd)"),
        ("pxelab-installer", "installer binary (static)"),
        ("pxelab-stack", "boot handler binary (static)"),
        ("pxeboot-stack.oci.tar", "container image (OCI archive)"),
    ] {
        let a = report
            .artifacts
            .iter()
            .find(|a| a.name == name)
            .with_context(|| format!("build-stack made no {name}"))?;
        group.push(
            &ctx.ui,
            Row::single(format!("size: {label}"), "MiB", mib(a.size))
                .note(format!("{} bytes", a.size)),
        );
    }
    drop(store);
    let _ = std::fs::remove_dir_all(&store_dir);

    distro(ctx, group, warm_runs)
}

/// `distro pull debian` warm, and the modules archive of both sets.
fn distro(ctx: &mut Ctx, group: &mut Group, runs: usize) -> Result<()> {
    let first = ctx.distro(DEBIAN_12)?;
    let mut warm = Vec::new();
    let mut not_noop = 0;
    for _ in 0..runs {
        let (r, secs) = timed(|| crate::distro::pull(&pull_args(DEBIAN_12, None), &ctx.ui))?;
        if !(r.cached && r.up_to_date) {
            not_noop += 1;
        }
        warm.push(secs);
    }
    let mut row = Row::new(
        "distro pull debian warm (nothing changed)",
        "s",
        Better::Lower,
        warm,
    );
    if not_noop > 0 {
        row = row.note(format!(
            "{not_noop} run(s) rebuilt or republished something"
        ));
    }
    group.push(&ctx.ui, row);
    let m = &first.manifest;
    group.fact(
        "distro",
        format!("{} kernel {}", m.distro, m.contract.kernel_version),
    );
    group.push(
        &ctx.ui,
        Row::single(
            "size: Debian rootfs (rootfs.tar.zst)",
            "MiB",
            mib(m.contract.rootfs.size),
        )
        .note(format!(
            "{} MiB uncompressed",
            mib(m.rootfs_uncompressed_size).round()
        )),
    );
    let default_set: ModuleSet = m.modules_set.parse()?;
    let other = match default_set {
        ModuleSet::All => ModuleSet::Installer,
        ModuleSet::Installer => ModuleSet::All,
    };
    let mut sets = vec![(
        default_set,
        m.contract.modules.as_ref().map(|f| f.size),
        m.modules_count,
    )];
    // The other set is built (or taken from the cache) for its size, then the default republished.
    let pulled = crate::distro::pull(&pull_args(DEBIAN_12, Some(other)), &ctx.ui);
    let restored = crate::distro::pull(&pull_args(DEBIAN_12, None), &ctx.ui);
    let o = pulled
        .with_context(|| format!("distro pull debian --modules {other}"))?
        .manifest;
    sets.push((
        other,
        o.contract.modules.as_ref().map(|f| f.size),
        o.modules_count,
    ));
    restored?;
    sets.sort_by_key(|(s, _, _)| s.to_string());
    for (set, size, count) in sets {
        let size = size.context("the distro manifest names no modules archive")?;
        group.push(
            &ctx.ui,
            Row::single(
                format!("size: modules archive, set `{set}`"),
                "MiB",
                mib(size),
            )
            .note(format!(
                "{count} modules{}",
                if set == default_set {
                    ", the recipe's default"
                } else {
                    ""
                }
            )),
        );
    }
    Ok(())
}
