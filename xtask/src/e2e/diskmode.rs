//! The e2e's disk-mode VM: `lab vm create disk-1 --disk-mode` (the command itself), then
//! `lab vm start`'s path: QEMU boots the distro's kernel and initramfs on a qcow2 overlay of its
//! `rootfs.img`, with no PXE and no installer. It answers SSH with its own host name (the
//! NoCloud seed disk applied), its root is the whole `/dev/vda`, cloud-init finishes and grew the
//! filesystem to the disk, the stack saw no network boot from it, and `lab vm rm` leaves no
//! link behind.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use pxelab_contract::{Arch, Phase};

use crate::lab::{diskmode, follow, home::Lab, qemu, stack, targets};

const NAME: &str = "disk-1";

pub fn scenario(lab: &Lab, distro: &str) -> Result<()> {
    super::xtask_ok(&[
        "lab",
        "vm",
        "create",
        NAME,
        "--disk-mode",
        "--distro",
        distro,
    ])?;
    let vm = targets::definition(lab, NAME)?;
    ensure!(
        !vm.pxeboot,
        "a disk-mode VM was defined with pxeboot: {vm:?}"
    );
    ensure!(
        diskmode::direct_boot(lab, &vm)?.is_some(),
        "`lab vm create --disk-mode` linked no kernel for {NAME}"
    );
    // The stack re-reads definitions within 2 s: the DHCP reservation must be there first.
    std::thread::sleep(Duration::from_secs(3));
    let accel = qemu::resolve_accel(qemu::AccelChoice::Auto, Arch::X86_64, &lab.run_dir())?;
    let started = follow::now_ms();
    targets::start_vm(lab, &vm, qemu::Firmware::Uefi, accel)?;
    let result = checks(lab, &vm, started);
    // `rm` cuts the power: the disk goes too, nothing on it needs a shutdown.
    let removed = super::xtask_ok(&["lab", "vm", "rm", NAME]);
    result?;
    removed?;
    let left: Vec<_> = std::fs::read_dir(lab.disks_dir())?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!("{NAME}.")))
        .collect();
    ensure!(left.is_empty(), "`lab vm rm {NAME}` left {left:?}");
    Ok(())
}

fn checks(lab: &Lab, vm: &pxelab_contract::VmDefinition, started: u64) -> Result<()> {
    let at = BTreeMap::from([(NAME.to_string(), started)]);
    let rows = follow::wait_all(lab, std::slice::from_ref(vm), &at, Duration::from_secs(900))?;
    let ssh_ms = rows[0].ssh.context("wait_all returned before SSH")?;
    eprintln!(
        "e2e: {NAME} (disk mode) answered SSH {:.1}s after QEMU started",
        ssh_ms as f64 / 1000.0
    );
    let hostname = super::ssh_output(lab, NAME, "hostname")?;
    ensure!(
        hostname == NAME,
        "{NAME}'s host name is {hostname:?}: its seed disk was not applied"
    );
    let root = super::ssh_output(lab, NAME, "findmnt -no SOURCE /")?;
    ensure!(
        root == "/dev/vda",
        "{NAME}'s root is {root:?}, not /dev/vda"
    );
    let status = super::ssh_output(lab, NAME, "cloud-init status --wait || true")?;
    ensure!(
        status.contains("status: done"),
        "cloud-init did not finish on {NAME}: {status}"
    );
    // cloud-init's resizefs grew the image's filesystem to the 20G overlay.
    let size: u64 = super::ssh_output(lab, NAME, "df --output=size -B1 / | tail -n 1")?
        .trim()
        .parse()
        .context("df's size of /")?;
    ensure!(
        size > 10 << 30,
        "{NAME}'s root filesystem is {size} bytes: cloud-init did not grow it"
    );
    let timeline = stack::timeline(lab, NAME).unwrap_or_default();
    let netboot: Vec<_> = timeline
        .iter()
        .filter(|e| e.at_ms >= started && matches!(e.event.phase, Phase::Ipxe | Phase::Installing))
        .collect();
    ensure!(netboot.is_empty(), "{NAME} network-booted: {netboot:?}");
    Ok(())
}
