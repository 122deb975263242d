//! The e2e's second real distro (issue 18): on the running lab, a disk VM `trixie-1` with
//! Debian 13 is installed like target-1 and must answer SSH with its own host name, run trixie,
//! and report cloud-init done without errors; then it is stopped. Its cost is printed.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::{ensure, Result};
use pxelab_contract::Arch;

use super::ssh_output;
use crate::lab::{artifacts, follow, home::Lab, qemu, stack, targets};

const VM: &str = "trixie-1";
const DISTRO: &str = "debian-13";

pub fn scenario(lab: &Lab) -> Result<()> {
    let took = Instant::now();
    let distro = artifacts::prepare(lab, Arch::X86_64, DISTRO)?;
    let pulled = took.elapsed();
    let (vm, started) = super::create_and_start(lab, VM, &distro, qemu::Firmware::Uefi, true)?;
    let rows = follow::wait_all(
        lab,
        std::slice::from_ref(&vm),
        &BTreeMap::from([(VM.to_string(), started)]),
        Duration::from_secs(1500),
    )?;
    follow::print_summary(&rows);
    let seen = ssh_output(
        lab,
        VM,
        ". /etc/os-release; echo \"$(hostname) $VERSION_CODENAME\"; cloud-init status || true",
    )?;
    ensure!(
        seen.lines().next() == Some("trixie-1 trixie"),
        "trixie-1 should answer as host trixie-1 running Debian trixie; it said {seen:?}"
    );
    ensure!(
        seen.contains("status: done"),
        "cloud-init is not done on trixie-1: {seen:?}"
    );
    super::firstboot::cloud_init_done(VM, &stack::timeline(lab, VM)?)?;
    targets::stop_vm(lab, VM)?;
    eprintln!(
        "e2e: trixie-1 (Debian 13) installed, answered SSH and finished cloud-init in {:.0}s \
         ({:.0}s of it getting the artifacts)",
        took.elapsed().as_secs_f64(),
        pulled.as_secs_f64()
    );
    Ok(())
}
