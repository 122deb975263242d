//! `cargo xtask test`: make sure the host tools exist, then run the test tiers.
//!
//! Tiers, in order: `lock` (recipes and lock agree, no network), `lint` (`cargo fmt --check`
//! and `cargo clippy -D warnings` over the whole workspace), `unit` (everything not named
//! `sys_*`, including the tidy test of the project's conventions), `sys` (tests named `sys_*`: they need root, host tools, QEMU or Debian's mirror),
//! `e2e` (`cargo xtask e2e`: the whole lab under QEMU, as root). Each tier prints a header, and
//! a summary line at the end says which failed; every tier runs even if an earlier one failed.

use std::time::Instant;

use anyhow::{bail, Result};
use xshell::{cmd, Shell};

use crate::util::project_root;

const TIERS: [&str; 5] = ["lock", "lint", "unit", "sys", "e2e"];

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Run only this tier: lock, lint, unit, sys or e2e.
    #[arg(long, value_name = "NAME", value_parser = clap::builder::PossibleValuesParser::new(TIERS))]
    pub tier: Option<String>,
}

pub fn run(args: Args) -> Result<()> {
    let tiers: Vec<&str> = match &args.tier {
        Some(t) => vec![TIERS.iter().copied().find(|x| x == t).unwrap_or("unit")],
        None => TIERS.to_vec(),
    };
    // The unit tier needs some host tools too (the Ubuntu fixture test runs mke2fs, qemu-img,
    // gcc and depmod), so every tier but `lock` makes sure of them.
    if tiers.iter().any(|t| !matches!(*t, "lock" | "lint")) {
        crate::hostdeps::ensure(crate::hostdeps::HOST_DEPS)?;
        crate::hostdeps::ensure_kubernetes_validate()?;
    }
    let sh = Shell::new()?;
    sh.change_dir(project_root());
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let mut results = Vec::new();
    for tier in &tiers {
        let started = Instant::now();
        let ok = match *tier {
            "lock" => {
                eprintln!("\n==> tier lock: cargo xtask lock --check");
                let r = crate::lock_cmd::run(crate::lock_cmd::Args {
                    check: true,
                    recipes: None,
                    lock: None,
                });
                if let Err(e) = &r {
                    eprintln!("error: {e:#}");
                }
                r.is_ok()
            }
            "lint" => {
                eprintln!("\n==> tier lint: cargo fmt --check, cargo clippy -D warnings");
                let fmt = cmd!(sh, "{cargo} fmt --all -- --check").run().is_ok();
                let clippy = cmd!(
                    sh,
                    "{cargo} clippy --workspace --all-targets --no-deps -- -D warnings"
                )
                .run()
                .is_ok();
                fmt && clippy
            }
            "unit" => {
                // --no-fail-fast: one failing test binary must not hide the others' results.
                eprintln!("\n==> tier unit: cargo test --workspace --no-fail-fast -- --skip sys_");
                cmd!(sh, "{cargo} test --workspace --no-fail-fast -- --skip sys_")
                    .run()
                    .is_ok()
            }
            "sys" => {
                eprintln!("\n==> tier sys: cargo test --workspace --no-fail-fast sys_");
                cmd!(sh, "{cargo} test --workspace --no-fail-fast sys_")
                    .run()
                    .is_ok()
            }
            _ => {
                eprintln!("\n==> tier e2e: cargo xtask e2e");
                // A separate process: the lab installs signal handlers and namespaces of its own.
                // Through cargo, not current_exe(): the sys tier's `cargo test` may have rebuilt
                // (replaced) this very binary.
                cmd!(sh, "{cargo} xtask e2e").run().is_ok()
            }
        };
        results.push((*tier, ok, started.elapsed().as_secs_f64()));
    }
    let line: Vec<String> = results
        .iter()
        .map(|(t, ok, s)| format!("{t} {} ({s:.0}s)", if *ok { "ok" } else { "FAILED" }))
        .collect();
    eprintln!("\ntest summary: {}", line.join(", "));
    let failed: Vec<&str> = results.iter().filter(|r| !r.1).map(|r| r.0).collect();
    if !failed.is_empty() {
        bail!("tier(s) failed: {}", failed.join(", "));
    }
    Ok(())
}
