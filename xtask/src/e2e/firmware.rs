//! The e2e's firmware part: a BIOS target that installs and reboots through SeaBIOS into its
//! disk (the path a real machine takes, and the only one where the installer does not start the
//! installed system itself), and OVMF without the NIC's iPXE ROM chain-loading `ipxe.efi` over
//! TFTP as far as the installer.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use pxelab_contract::{Arch, Phase, VmDefinition};

use crate::lab::{follow, home::Lab, qemu, ssh, stack, targets};

/// Defines a disk VM `name` installing `distro` (`edit` adjusts the definition before it is
/// written), gives it a blank disk and starts it once the stack has its reservation; the
/// definition and when QEMU started (Unix ms).
pub(super) fn create_and_start(
    lab: &Lab,
    name: &str,
    distro: &str,
    firmware: qemu::Firmware,
    edit: impl FnOnce(&mut VmDefinition),
) -> Result<(VmDefinition, u64)> {
    let key = ssh::ensure_key(lab)?;
    let vm = targets::define_target(lab, &key, name, distro, Arch::X86_64, |vm| {
        edit(vm);
        Ok(())
    })?;
    std::thread::sleep(Duration::from_secs(3)); // the stack re-reads definitions within 2 s
    let accel = qemu::resolve_accel(qemu::AccelChoice::Auto, Arch::X86_64, &lab.run_dir())?;
    let started = follow::now_ms();
    targets::start_vm(lab, &vm, firmware, accel)?;
    Ok((vm, started))
}

pub(super) fn reaches_installer(
    lab: &Lab,
    name: &str,
    distro: &str,
    firmware: qemu::Firmware,
) -> Result<()> {
    let (_, started) = create_and_start(lab, name, distro, firmware, |_| ())?;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let timeline = stack::timeline(lab, name).unwrap_or_default();
        if let Some(e) = timeline
            .iter()
            .find(|e| e.event.phase == Phase::Installing && e.at_ms >= started)
        {
            eprintln!(
                "e2e: {name} reached the installer after {:.1}s",
                (e.at_ms - started) as f64 / 1000.0
            );
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "{name} did not reach the installer within 300 s\n{}",
                follow::console_tail(lab, name)
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    targets::stop_vm(lab, name).map(drop)
}

/// `lab vm create bios-1 --firmware-reboot`, started under SeaBIOS: the installer reports that
/// it reboots (not switch root), the firmware network-boots again and the stack sends it to its disk,
/// GRUB's i386-pc boot the installer wrote starts the system, and it answers SSH with its own
/// host name after cloud-init applied the seed.
pub(super) fn installs_and_reboots_through_bios(lab: &Lab, distro: &str) -> Result<()> {
    const NAME: &str = "bios-1";
    super::xtask_ok(&[
        "lab",
        "vm",
        "create",
        NAME,
        "--distro",
        distro,
        "--firmware-reboot",
    ])?;
    let vm = targets::definition(lab, NAME)?;
    ensure!(
        vm.firmware_reboot,
        "`lab vm create --firmware-reboot` did not store firmware_reboot: {vm:?}"
    );
    std::thread::sleep(Duration::from_secs(3)); // the stack re-reads definitions within 2 s
    let accel = qemu::resolve_accel(qemu::AccelChoice::Auto, Arch::X86_64, &lab.run_dir())?;
    let started = follow::now_ms();
    targets::start_vm(lab, &vm, qemu::Firmware::Bios, accel)?;
    let at = BTreeMap::from([(NAME.to_string(), started)]);
    let rows = follow::wait_all(
        lab,
        std::slice::from_ref(&vm),
        &at,
        Duration::from_secs(1200),
    )?;
    follow::print_summary(&rows);
    let row = &rows[0];
    let timeline = stack::timeline(lab, NAME)?;
    let installed = timeline
        .iter()
        .rposition(|e| e.event.phase == Phase::Installed && e.at_ms >= started)
        .context("no `installed` event from bios-1's install")?;
    let message = &timeline[installed].event.message;
    ensure!(
        message.ends_with("next: reboot"),
        "bios-1's installer did not reboot through the firmware: {message:?}"
    );
    ensure!(
        timeline[installed..]
            .iter()
            .any(|e| e.event.phase == Phase::LocalBoot),
        "bios-1 never network-booted again to be sent to its disk: {:?}",
        &timeline[installed..]
    );
    ensure!(
        row.direct.is_none() && row.local_boot.is_some() && row.ssh.is_some(),
        "bios-1's milestones do not show a firmware reboot into SSH: local boot {:?}, SSH {:?}",
        row.local_boot,
        row.ssh
    );
    let hostname = super::ssh_output(lab, NAME, "hostname")?;
    ensure!(
        hostname == NAME,
        "bios-1's host name is {hostname:?}: its cloud-init seed was not applied"
    );
    eprintln!(
        "e2e: bios-1 installed at {:.1}s, booted its disk through SeaBIOS at {:.1}s, SSH at {:.1}s",
        row.installed.unwrap_or_default() as f64 / 1000.0,
        row.local_boot.unwrap_or_default() as f64 / 1000.0,
        row.ssh.unwrap_or_default() as f64 / 1000.0
    );
    targets::stop_vm(lab, NAME).map(drop)
}
