//! `cargo xtask`: parses the command line and dispatches to one module per command.
//! Everything real lives in the library (`lib.rs`).

use std::process::ExitCode;

use clap::Parser;

/// Registers commands. One line per command: `"name" => Variant(module): "one-line description",`
/// where `xtask::module` exposes `Args` (clap::Args) and `run(Args) -> anyhow::Result<()>`.
macro_rules! commands {
    ($($name:literal => $variant:ident($module:ident): $about:literal,)*) => {
        #[derive(clap::Subcommand)]
        enum Command {
            $( #[doc = $about] #[command(name = $name)] $variant(xtask::$module::Args), )*
        }

        fn dispatch(command: Command) -> anyhow::Result<()> {
            match command {
                $( Command::$variant(args) => xtask::$module::run(args), )*
            }
        }
    };
}

commands! {
    "lock" => Lock(lock_cmd): "Resolve recipes/*.toml into recipes/pxelab.lock (network), or --check it (offline)",
    "fetch" => Fetch(fetch_cmd): "Download every locked input into the store (verified, resumable); --offline lists what is missing",
    "cache" => Cache(cache_cmd): "Inspect the content-addressed store: du, verify, gc",
    "build-stack" => BuildStack(stack): "Build the PXE stack: static binaries, installer initrd, iPXE set, OCI/docker image",
    "distro" => Distro(distro): "Pull a distro's kernel, modules archive and rootfs into the lab home (list, pull, lock)",
    "lab" => Lab(lab): "The lab: `up` provisions targets end to end; status, down, stack, vm",
    "e2e" => E2e(e2e): "End-to-end test of the lab as root under QEMU (part of `cargo xtask test`)",
    "test" => Test(testrun): "Install missing host packages, then run the test tiers (lock, unit, sys, e2e)",
    "bench" => Bench(bench): "Measure build, boot handler, provisioning and installer against their peers; writes bench/",
}

/// pxelab's pipeline and lab.
#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    version,
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        // `cargo xtask cache du | head -1` is not an error.
        Err(err) if is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
