//! `cargo xtask build-stack`: every artifact of the PXE stack, each through the action cache.
//!
//! ```text
//! runtime/ ──► static pxelab-stack ───────────────────────────────┐
//! installer/ ─► static pxelab-installer ─► initrd-<arch>.img ─────┤
//! initrd/ (init, manifest) + initrd .debs ─┘                      ├─► pxeboot-stack.oci.tar
//! ipxe .deb ─► ipxe.efi snponly.efi undionly.kpxe ipxe-arm64.efi ─┤   pxeboot-stack.docker.tar
//!              + boot.ipxe                                        │
//! dnsmasq-base .debs ─────────────────────────────────────────────┘
//! ```
//!
//! Each arrow is one store step keyed by the digests of its inputs, so a rerun with nothing
//! changed does no work, and a change to the installer rebuilds only installer → initrd →
//! image. Outputs are copied to `build/stack/<arch>/` with a `manifest.json` (size and sha256
//! of each), and a table says what was cached and what was built.
//!
//! Every timestamp inside the outputs is SOURCE_DATE_EPOCH: from the environment if set, else
//! the newest file date inside the pinned packages, so it moves only when the lock does.

pub mod archive;
pub mod binaries;
pub mod elf;
pub mod image;
pub mod initrd;
pub mod ipxe;
pub mod oci;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::lock::{Lock, LockedInput};
use crate::store::{StepOutputs, Store};
use crate::ui::Ui;
use crate::util::{human_bytes, project_root};
use pxelab_contract::Arch;

pub use archive::Compression;

/// The initrd may not exceed this, compressed: it is fetched over HTTP by iPXE at every install.
pub const INITRD_BUDGET: u64 = 8 * 1024 * 1024;

/// Image reference written into both archives.
pub const IMAGE_REF: &str = "pxelab/pxeboot-stack:latest";

/// Build every artifact of the PXE stack (static binaries, installer initrd, iPXE set,
/// container image) into build/stack/<arch>/.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Architecture of the stack and its initrd.
    #[arg(long, default_value = "x86_64")]
    pub arch: Arch,
    /// Compression of the installer initrd.
    #[arg(long = "compress", value_enum, default_value = "zstd")]
    pub compression: Compression,
    /// Output directory [default: build/stack/<arch>]
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Do not download: fail if a pinned input is missing from the store.
    #[arg(long)]
    pub offline: bool,
    /// The workspace to build from [default: this checkout]. Tests point it at a copy.
    #[arg(long = "workspace-root", hide = true, value_name = "DIR")]
    pub root: Option<PathBuf>,
}

/// How one artifact came about.
#[derive(Clone, Debug)]
pub struct Built {
    pub name: String,
    pub size: u64,
    pub sha256: String,
    pub cached: bool,
    pub time: Duration,
}

/// What [`build`] produced.
#[derive(Clone, Debug)]
pub struct Report {
    pub out_dir: PathBuf,
    pub artifacts: Vec<Built>,
    /// `sha256:<hex>` of the image manifest.
    pub image_digest: String,
    pub source_date_epoch: u64,
    /// False when the output directory already held exactly these outputs.
    pub copied: bool,
}

impl Report {
    pub fn all_cached(&self) -> bool {
        self.artifacts.iter().all(|a| a.cached)
    }
}

pub fn run(args: Args) -> Result<()> {
    let started = Instant::now();
    let store = Store::open_default()?;
    let ui = Ui::new();
    let report = build(&store, &args, &ui)?;
    println!("{:<28} {:>10}  {:<6} {:>8}", "artifact", "size", "", "time");
    for a in &report.artifacts {
        println!(
            "{:<28} {:>10}  {:<6} {:>7.2}s",
            a.name,
            human_bytes(a.size),
            if a.cached { "cached" } else { "built" },
            a.time.as_secs_f64()
        );
    }
    println!("image {IMAGE_REF} {}", report.image_digest);
    let what = if report.all_cached() && !report.copied {
        "nothing to do: every artifact is cached and up to date in"
    } else if report.all_cached() {
        "every artifact was cached; copied to"
    } else {
        "done:"
    };
    println!(
        "{what} {} ({:.2}s)",
        report.out_dir.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The pinned packages of one recipe for `arch` (`all` for arch-independent recipes).
fn pins<'l>(lock: &'l Lock, recipe: &str, arch: &str) -> Result<Vec<&'l LockedInput>> {
    let mut v = lock.select(recipe, arch)?;
    v.sort_by(|a, b| a.pin.name.cmp(&b.pin.name));
    Ok(v)
}

/// Name → digest of pinned inputs, for a step's key.
fn digests(pins: &[&LockedInput]) -> BTreeMap<String, String> {
    pins.iter()
        .map(|p| (p.pin.name.clone(), p.pin.sha256.clone()))
        .collect()
}

/// The pinned files in the store (downloaded unless `offline`), in order.
fn fetch_pins(store: &Store, pins: &[&LockedInput], offline: bool) -> Result<Vec<PathBuf>> {
    let items: Vec<_> = pins.iter().map(|p| p.to_fetch()).collect();
    crate::fetch::ensure_all(store, &items, offline)
}

/// Extract `debs` into one directory (for the image: dnsmasq's closure is looked up across
/// all of them; Debian forbids two packages shipping one file, so nothing is overwritten).
pub fn extract_debs(
    store: &Store,
    debs: &[&LockedInput],
    offline: bool,
    into: &Path,
) -> Result<()> {
    let paths = fetch_pins(store, debs, offline)?;
    for (pin, path) in debs.iter().zip(paths) {
        let deb =
            pxelab_debian::Deb::open(&path).with_context(|| format!("opening {}", pin.label()))?;
        deb.extract_to(into)
            .with_context(|| format!("extracting {}", pin.label()))?;
    }
    Ok(())
}

/// Extract each of `debs` into its own directory under `into` (the initrd manifest names the
/// package each file comes from).
pub fn extract_each(
    store: &Store,
    debs: &[&LockedInput],
    offline: bool,
    into: &Path,
) -> Result<initrd::Packages> {
    let paths = fetch_pins(store, debs, offline)?;
    let mut trees = BTreeMap::new();
    for (pin, path) in debs.iter().zip(paths) {
        let name = pin.pin.name.clone();
        let dir = into.join(&name);
        let deb =
            pxelab_debian::Deb::open(&path).with_context(|| format!("opening {}", pin.label()))?;
        deb.extract_to(&dir)
            .with_context(|| format!("extracting {}", pin.label()))?;
        trees.insert(name, elf::Tree::new(dir));
    }
    Ok(initrd::Packages { trees })
}

/// Run one step and time it.
fn timed<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<(T, Duration)> {
    let t = Instant::now();
    let v = f().with_context(|| format!("building {what}"))?;
    Ok((v, t.elapsed()))
}

/// SOURCE_DATE_EPOCH from the environment, or the newest file date in `debs` (cached as a step).
pub fn source_date_epoch(store: &Store, debs: &[&LockedInput], offline: bool) -> Result<u64> {
    if let Ok(v) = std::env::var("SOURCE_DATE_EPOCH") {
        return v
            .trim()
            .parse()
            .with_context(|| format!("SOURCE_DATE_EPOCH={v:?} is not a number of seconds"));
    }
    let mut step = store.step("stack-epoch", 2);
    for pin in debs {
        // Labels, not names: two recipes may pin the same package.
        step = step.input(&pin.label(), &pin.pin.sha256);
    }
    let out = step.run(|dir| {
        let mut newest = 0u64;
        let paths = fetch_pins(store, debs, offline)?;
        for (pin, path) in debs.iter().zip(paths) {
            newest = newest
                .max(newest_mtime(&path).with_context(|| format!("reading {}", pin.label()))?);
        }
        std::fs::write(dir.join("epoch"), newest.to_string())?;
        Ok(())
    })?;
    let text = std::fs::read_to_string(&out.get("epoch")?.path)?;
    text.trim()
        .parse()
        .context("the cached SOURCE_DATE_EPOCH is not a number")
}

/// The newest mtime among the regular files of a `.deb`'s data archive. Directories do not
/// count: extracting a file into one sets its mtime to the time of extraction.
fn newest_mtime(deb: &Path) -> Result<u64> {
    let t = tempfile::tempdir()?;
    let d = pxelab_debian::Deb::open(deb)?;
    d.extract_to(t.path())?;
    let mut newest = 0;
    walk_files(t.path(), &mut |m| newest = newest.max(m))?;
    Ok(newest)
}

fn walk_files(dir: &Path, f: &mut impl FnMut(u64)) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let m = e.path().symlink_metadata()?;
        if m.is_dir() {
            walk_files(&e.path(), f)?;
        } else if m.is_file() {
            f(u64::try_from(m.mtime()).unwrap_or(0));
        }
    }
    Ok(())
}

/// Build everything for `args.arch` and copy it to the output directory.
pub fn build(store: &Store, args: &Args, ui: &Ui) -> Result<Report> {
    let root = args.root.clone().unwrap_or_else(project_root);
    let arch = args.arch;
    let out_dir = args
        .out
        .clone()
        .unwrap_or_else(|| root.join("build/stack").join(arch.as_str()));
    binaries::check_target(arch)?;
    let lock = Lock::load(&root.join("recipes/pxelab.lock"))?;
    let initrd_debs = pins(&lock, "initrd", arch.debian())?;
    let stack_debs = pins(&lock, "stack", arch.debian())?;
    let ipxe_debs = pins(&lock, "ipxe", "all")?;
    let mut all_debs: Vec<&LockedInput> = Vec::new();
    all_debs.extend(&initrd_debs);
    all_debs.extend(&stack_debs);
    all_debs.extend(&ipxe_debs);
    let epoch = source_date_epoch(store, &all_debs, args.offline)?;
    let mut artifacts = Vec::new();
    let mut record = |name: &str, out: &StepOutputs, file: &str, time: Duration| -> Result<()> {
        let f = out.get(file)?;
        artifacts.push(Built {
            name: name.to_string(),
            size: f.size,
            sha256: f.digest.clone(),
            cached: out.cached,
            time,
        });
        Ok(())
    };

    // 1. Static binaries.
    let rustc = binaries::rustc_version()?;
    // Another checkout (a test's copy) gets its own directory: cargo does not re-link a fresh
    // binary, so a shared one could hand us the other checkout's build.
    let target_dir = if args.root.as_ref().is_none_or(|r| *r == project_root()) {
        cargo_target_dir(&root).join("stack")
    } else {
        cargo_target_dir(&project_root()).join(format!(
            "stack-{}",
            &oci::sha256_hex(root.to_string_lossy().as_bytes())[..12]
        ))
    };
    let mut bins = BTreeMap::new();
    for bin in [binaries::STACK, binaries::INSTALLER] {
        let (out, t) = timed(bin.bin, || {
            let src = binaries::source_digest(&root, bin)?;
            store
                .step("stack-static-bin", 1)
                .input("sources", &src)
                .param("package", bin.package)
                .param("bin", bin.bin)
                .param("target", arch.rust_target())
                .param("rustflags", binaries::rustflags())
                .param("rustc", &rustc)
                .run(|dir| {
                    ui.println(format!(
                        "building {} (static, {})",
                        bin.bin,
                        arch.rust_target()
                    ));
                    binaries::build(&root, bin, arch, &target_dir, &dir.join(bin.bin))
                })
        })?;
        record(bin.bin, &out, bin.bin, t)?;
        bins.insert(bin.bin, out);
    }
    let installer = bins[binaries::INSTALLER.bin]
        .get(binaries::INSTALLER.bin)?
        .clone();
    let stack_bin = bins[binaries::STACK.bin].get(binaries::STACK.bin)?.clone();

    // 2. Installer initrd.
    let initrd_name = format!("initrd-{}.img", arch.as_str());
    let spec = initrd::Spec::load(&root.join("initrd"))?;
    let (initrd_out, t) = timed(&initrd_name, || {
        let mut step = store
            .step("stack-initrd", 1)
            .input("installer", &installer.digest)
            .param("spec", spec.digest())
            .param("arch", arch.as_str())
            .param("compression", args.compression.name())
            .param("source_date_epoch", epoch);
        for (name, d) in digests(&initrd_debs) {
            step = step.input(&format!("deb:{name}"), &d);
        }
        step.run(|dir| {
            ui.println(format!(
                "building {initrd_name} ({})",
                args.compression.name()
            ));
            let tmp = tempfile::tempdir()?;
            let pkgs = extract_each(store, &initrd_debs, args.offline, tmp.path())?;
            let binaries = initrd::Built::from([(
                binaries::INSTALLER.package.to_string(),
                installer.path.clone(),
            )]);
            let built = initrd::build(&spec, &pkgs, &binaries, arch, args.compression, epoch)?;
            ui.println(built.report());
            if built.compressed.len() as u64 > INITRD_BUDGET {
                bail!(
                    "{initrd_name} is {} compressed, over the {} budget; the largest files:\n{}",
                    human_bytes(built.compressed.len() as u64),
                    human_bytes(INITRD_BUDGET),
                    built.top(10)
                );
            }
            std::fs::write(dir.join(&initrd_name), &built.compressed)?;
            Ok(())
        })
    })?;
    record(&initrd_name, &initrd_out, &initrd_name, t)?;
    let initrd_file = initrd_out.get(&initrd_name)?.clone();

    // 3. iPXE set.
    let chain = ipxe::chain_script();
    let (ipxe_out, t) = timed("ipxe", || {
        let mut step = store
            .step("stack-ipxe", 1)
            .param("chain", oci::sha256_hex(chain.as_bytes()));
        for (name, d) in digests(&ipxe_debs) {
            step = step.input(&format!("deb:{name}"), &d);
        }
        step.run(|dir| {
            let paths = fetch_pins(store, &ipxe_debs, args.offline)?;
            let pin = ipxe_debs.iter().position(|p| p.pin.name == "ipxe").context("the ipxe recipe pins no `ipxe` package")?;
            let deb = pxelab_debian::Deb::open(&paths[pin])?;
            let tree = tempfile::tempdir()?;
            deb.extract_to(tree.path())?;
            let tree = elf::Tree::new(tree.path());
            for (name, member) in ipxe::BINARIES {
                let r = tree.resolve(member)?.with_context(|| {
                    format!("the pinned ipxe package has no {member}: pin a trixie (or newer) ipxe in recipes/ipxe.toml")
                })?;
                std::fs::copy(tree.host_path(&r.file), dir.join(name))?;
            }
            std::fs::write(dir.join(ipxe::CHAIN_SCRIPT), &chain)?;
            Ok(())
        })
    })?;
    for f in &ipxe_out.files {
        record(&format!("tftp/{}", f.name), &ipxe_out, &f.name, t)?;
    }

    // 4. Container image.
    let (image_out, t) = timed("image", || {
        let mut step = store
            .step("stack-image", 1)
            .input("pxelab-stack", &stack_bin.digest)
            .input("pxelab-installer", &installer.digest)
            .input("initrd", &initrd_file.digest)
            .param("arch", arch.as_str())
            .param("layout", image::LAYOUT_VERSION)
            .param("source_date_epoch", epoch);
        for f in &ipxe_out.files {
            step = step.input(&format!("tftp:{}", f.name), &f.digest);
        }
        for (name, d) in digests(&stack_debs) {
            step = step.input(&format!("deb:{name}"), &d);
        }
        step.run(|dir| {
            ui.println("writing the container image (OCI and docker archives)");
            let tree = tempfile::tempdir()?;
            extract_debs(store, &stack_debs, args.offline, tree.path())?;
            let tftp: Vec<(String, PathBuf)> = ipxe_out
                .files
                .iter()
                .map(|f| (f.name.clone(), f.path.clone()))
                .collect();
            let img = image::build(&image::Inputs {
                arch,
                tree: &elf::Tree::new(tree.path()),
                stack: &stack_bin.path,
                installer: &installer.path,
                initrd: &initrd_file.path,
                tftp: &tftp,
                epoch,
            })?;
            std::fs::write(dir.join("pxeboot-stack.oci.tar"), img.oci_archive()?)?;
            std::fs::write(dir.join("pxeboot-stack.docker.tar"), img.docker_archive()?)?;
            std::fs::write(
                dir.join("image-digest"),
                format!("sha256:{}\n", img.manifest_digest),
            )?;
            Ok(())
        })
    })?;
    for name in ["pxeboot-stack.oci.tar", "pxeboot-stack.docker.tar"] {
        record(name, &image_out, name, t)?;
    }
    let image_digest = std::fs::read_to_string(&image_out.get("image-digest")?.path)?
        .trim()
        .to_string();

    // 5. The output directory.
    let mut files: Vec<(String, &crate::store::StepFile)> = Vec::new();
    for (bin, out) in &bins {
        files.push((bin.to_string(), out.get(bin)?));
    }
    files.push((initrd_name.clone(), initrd_out.get(&initrd_name)?));
    for f in &ipxe_out.files {
        files.push((format!("tftp/{}", f.name), f));
    }
    for name in ["pxeboot-stack.oci.tar", "pxeboot-stack.docker.tar"] {
        files.push((name.to_string(), image_out.get(name)?));
    }
    let copied = publish(store, &out_dir, &files, arch, epoch, &image_digest)?;
    Ok(Report {
        out_dir,
        artifacts,
        image_digest,
        source_date_epoch: epoch,
        copied,
    })
}

fn cargo_target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
}

/// Copy outputs to `out_dir` and write `manifest.json`, unless the directory already holds
/// exactly these outputs (same manifest, every file the recorded size and not touched since).
/// Returns whether anything was copied.
fn publish(
    store: &Store,
    out_dir: &Path,
    files: &[(String, &crate::store::StepFile)],
    arch: Arch,
    epoch: u64,
    image_digest: &str,
) -> Result<bool> {
    let outputs: Vec<serde_json::Value> = files
        .iter()
        .map(|(name, f)| serde_json::json!({"name": name, "size": f.size, "sha256": f.digest}))
        .collect();
    let manifest = oci::canonical_json(&serde_json::json!({
        "arch": arch.as_str(),
        "image": IMAGE_REF,
        "image_digest": image_digest,
        "source_date_epoch": epoch,
        "outputs": outputs,
    }));
    let manifest_path = out_dir.join("manifest.json");
    if up_to_date(&manifest_path, &manifest, out_dir, files) {
        return Ok(false);
    }
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    // The manifest goes first: a crash halfway leaves a directory that no longer matches it.
    let _ = std::fs::remove_file(&manifest_path);
    for (name, f) in files {
        let dest = out_dir.join(name);
        store.materialize(&f.digest, &dest)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(f.mode & 0o777))?;
    }
    let mut text = manifest;
    text.push(b'\n');
    crate::store::write_atomic(&manifest_path, &text)?;
    Ok(true)
}

fn up_to_date(
    manifest_path: &Path,
    manifest: &[u8],
    out_dir: &Path,
    files: &[(String, &crate::store::StepFile)],
) -> bool {
    let Ok(old) = std::fs::read(manifest_path) else {
        return false;
    };
    if old.strip_suffix(b"\n") != Some(manifest) {
        return false;
    }
    let Ok(stamp) = std::fs::metadata(manifest_path).and_then(|m| m.modified()) else {
        return false;
    };
    files.iter().all(|(name, f)| {
        std::fs::metadata(out_dir.join(name)).is_ok_and(|m| {
            m.is_file() && m.len() == f.size && m.modified().is_ok_and(|t| t <= stamp)
        })
    })
}
