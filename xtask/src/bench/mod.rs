//! `cargo xtask bench`: the numbers that say whether pxelab is fast and small, measured as whole
//! operations and, wherever a peer exists, side by side with that peer in the same run.
//!
//! Six independent figure groups (`--only` picks one): `pipeline` (build-stack cold and warm,
//! distro pull warm, artifact sizes), `http` (boot handler vs nginx under wrk), `provision` (the
//! lab under QEMU, one target and four at once), `install` (the installer on a loop device vs
//! `curl | zstd -d | tar -x`), `storm` (`/ipxe` for thousands of machines vs nginx) and
//! `diskless` (the stack's first-use unpack of a diskless root, one diskless VM and two at once
//! under QEMU). Every timing is the median of several runs with min and max
//! beside it, because these machines are noisy. A group that fails is recorded with its reason
//! and the others still run; a rerun of one group keeps the other groups' last results.
//!
//! Outputs: `bench/results.json` (every sample) and `bench/RESULTS.md` (the table), both
//! written atomically. Everything a run creates (lab, servers, loop devices, mounts, temp dirs)
//! is torn down by Drop guards, also when a figure fails half-way.

mod cpu;
mod diskless;
mod guards;
mod http;
mod install;
mod pipeline;
mod provision;
mod report;
mod storm;
mod wrk;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};

use crate::ui::Ui;
pub use report::{Better, Group, Machine, Peer, Results, Row};

/// Measure pxelab against its peers: medians of several runs, written to bench/.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Fewer and shorter runs (a smoke test of the benchmark, not numbers to publish).
    #[arg(long)]
    pub quick: bool,
    /// Run only this figure group (the others keep their last results in results.json).
    #[arg(long, value_enum)]
    pub only: Option<Figure>,
    /// Where results.json and RESULTS.md go [default: bench/ in the project].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

/// A group of figures, measured together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Figure {
    Pipeline,
    Http,
    Provision,
    Install,
    Storm,
    Diskless,
}

impl Figure {
    pub const ALL: [Figure; 6] = [
        Figure::Pipeline,
        Figure::Http,
        Figure::Provision,
        Figure::Install,
        Figure::Storm,
        Figure::Diskless,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Figure::Pipeline => "pipeline",
            Figure::Http => "http",
            Figure::Provision => "provision",
            Figure::Install => "install",
            Figure::Storm => "storm",
            Figure::Diskless => "diskless",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Figure::Pipeline => "Pipeline: build-stack, distro pull, artifact sizes",
            Figure::Http => "Boot handler vs nginx (loopback, wrk)",
            Figure::Provision => "Provisioning under QEMU (lab up)",
            Figure::Install => "Installer streaming onto a loop device",
            Figure::Storm => "Boot storm: /ipxe for 1,000 and 10,000 machines vs nginx",
            Figure::Diskless => "Diskless boots under QEMU (NFS root)",
        }
    }
}

pub fn run(args: Args) -> Result<()> {
    let out_dir = args
        .out
        .clone()
        .unwrap_or_else(|| crate::util::project_root().join("bench"));
    let figures: Vec<Figure> = match args.only {
        Some(f) => vec![f],
        None => Figure::ALL.to_vec(),
    };
    let mut ctx = Ctx::new(args.quick)?;
    let mut results = Results::load_or_new(&out_dir.join("results.json"));
    for figure in figures {
        ctx.ui
            .println(format!("\n==> bench {}: {}", figure.name(), figure.title()));
        let started = Instant::now();
        let mut group = Group::new(figure.name(), figure.title(), args.quick);
        let outcome = match figure {
            Figure::Pipeline => pipeline::run(&mut ctx, &mut group),
            Figure::Http => http::run(&mut ctx, &mut group),
            Figure::Provision => provision::run(&mut ctx, &mut group),
            Figure::Install => install::run(&mut ctx, &mut group),
            Figure::Storm => storm::run(&mut ctx, &mut group),
            Figure::Diskless => diskless::run(&mut ctx, &mut group),
        };
        group.elapsed_s = started.elapsed().as_secs_f64();
        if let Err(e) = outcome {
            let reason = format!("{e:#}");
            ctx.ui
                .println(format!("bench {}: FAILED: {reason}", figure.name()));
            group.error = Some(reason);
        }
        let machine = Machine::probe(group.facts.get("accel").cloned());
        results.put(group, machine);
        // Saved after every group: a later group that hangs or is interrupted loses nothing.
        results.save(&out_dir)?;
    }
    println!("{}", results.markdown());
    ctx.ui.println(format!(
        "wrote {} and {}",
        out_dir.join("results.json").display(),
        out_dir.join("RESULTS.md").display()
    ));
    Ok(())
}

/// What the figure groups share: run counts, progress output, scratch space, and the artifacts
/// several groups need (built or pulled once per bench run).
pub struct Ctx {
    pub quick: bool,
    pub ui: Ui,
    /// Removed at the end of the run; every figure works below it.
    scratch: tempfile::TempDir,
    stack_dir: Option<PathBuf>,
    /// Distros pulled in this run, by recipe name.
    distros: BTreeMap<String, crate::distro::PullReport>,
    /// Ctrl-C takes the bench's lab down (one handler per process, installed once).
    lab_down_on_interrupt: bool,
}

impl Ctx {
    fn new(quick: bool) -> Result<Ctx> {
        let scratch = tempfile::Builder::new()
            .prefix("pxelab-bench-")
            .tempdir()
            .context("creating the bench's scratch directory")?;
        // Every lab-home user (distro pull, lab up) works in a throw-away home: the bench never
        // touches the user's lab. SAFETY (edition 2021: set_var is safe): single-threaded here.
        std::env::set_var("PXELAB_HOME", scratch.path().join("home"));
        Ok(Ctx {
            quick,
            ui: Ui::new(),
            scratch,
            stack_dir: None,
            distros: BTreeMap::new(),
            lab_down_on_interrupt: false,
        })
    }

    /// `full` runs normally, `quick` with `--quick`.
    pub fn runs(&self, full: usize, quick: usize) -> usize {
        if self.quick {
            quick
        } else {
            full
        }
    }

    /// A fresh directory for one figure's files (inside the run's scratch directory).
    pub fn scratch(&self, name: &str) -> Result<PathBuf> {
        let dir = self.scratch.path().join(name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(dir)
    }

    /// The lab home the bench uses (`PXELAB_HOME` for this process).
    pub fn lab_home(&self) -> PathBuf {
        self.scratch.path().join("home")
    }

    /// The bench's lab, taken down (and purged) when the guard drops or on Ctrl-C.
    pub fn lab(&mut self) -> Result<guards::LabGuard> {
        let home = self.lab_home();
        if !self.lab_down_on_interrupt {
            crate::lab::down_on_interrupt(home.clone(), false)?;
            self.lab_down_on_interrupt = true;
        }
        Ok(guards::LabGuard(home))
    }

    /// `build-stack` for x86_64 in the user's store (a no-op when it is up to date); returns
    /// its output directory (`build/stack/x86_64`, where the lab looks too).
    pub fn stack_dir(&mut self) -> Result<PathBuf> {
        if let Some(dir) = &self.stack_dir {
            return Ok(dir.clone());
        }
        let store = crate::store::Store::open_default()?;
        let report = crate::stack::build(&store, &stack_args(None), &self.ui)
            .context("cargo xtask build-stack (the bench needs its binaries)")?;
        self.stack_dir = Some(report.out_dir.clone());
        Ok(report.out_dir)
    }

    /// `distro pull <name>` into the bench's lab home (built on the first call if the store
    /// does not have it yet).
    pub fn distro(&mut self, name: &str) -> Result<crate::distro::PullReport> {
        if let Some(r) = self.distros.get(name) {
            return Ok(r.clone());
        }
        let r = crate::distro::pull(&pull_args(name, None), &self.ui)
            .with_context(|| format!("cargo xtask distro pull {name}"))?;
        self.distros.insert(name.to_string(), r.clone());
        Ok(r)
    }
}

/// `build-stack` for x86_64 with the default compression, into `out` (default: build/stack).
fn stack_args(out: Option<PathBuf>) -> crate::stack::Args {
    crate::stack::Args {
        arch: pxelab_contract::Arch::X86_64,
        compression: crate::stack::Compression::Zstd,
        out,
        offline: false,
        root: None,
    }
}

/// The distro the groups install and stream unless they say otherwise (the lab's default).
pub const DEBIAN_12: &str = "debian-12";

fn pull_args(
    name: &str,
    modules: Option<crate::distro::modules::ModuleSet>,
) -> crate::distro::PullArgs {
    crate::distro::PullArgs {
        name: name.into(),
        arch: pxelab_contract::Arch::X86_64,
        modules,
        mirror: None,
        recipes: None,
    }
}

/// Runs `f` and returns its value with the wall time in seconds.
pub fn timed<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, f64)> {
    let t = Instant::now();
    let v = f()?;
    Ok((v, t.elapsed().as_secs_f64()))
}

/// `n` bytes as MiB.
pub fn mib(n: u64) -> f64 {
    n as f64 / (1024.0 * 1024.0)
}

/// A free TCP port on 127.0.0.1 (released before returning; servers bind it right after).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free loopback port")?;
    Ok(l.local_addr()?.port())
}

/// The last `n` lines of a log file, for error messages.
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
