//! The diskless part of `cargo xtask e2e` (issue 9): two targets with `boot: nfsroot` boot the
//! same distro export from the stack's NFS server at the same time, one under SeaBIOS and one
//! under OVMF (the lab's default firmware), both through QEMU's iPXE NIC ROM.
//!
//! Checked on each VM, and between them in both directions: it reaches SSH with its own
//! hostname (cloud-init's NoCloud seed applied) and its kernel was started by the firmware it
//! was given; `/` is an overlay (tmpfs over the read-only NFS root); a file it writes is not
//! visible on the other; writing the NFS root itself is refused; the other VM's name resolves
//! (the resolver comes from the initramfs's lease); `systemctl stop networking`, the first
//! step of every shutdown, leaves the root alone. Then `diskless-1` reboots and comes back (a
//! new boot id, over NFS again) without the files it wrote before. The timelines show DHCP →
//! iPXE → kernel → DHCP (initramfs) → NFS root; and the export on the stack side is
//! byte-for-byte unchanged afterwards.
//!
//! Call [`scenario`] with the lab up (stack running); it leaves the two VMs stopped but
//! defined. After `lab down`, [`nfs_server_pid`] (read before) must name no live process.

use std::{
    collections::BTreeMap,
    io::Read,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use pxelab_contract::{Arch, BootMode, Phase, VmDefinition};
use sha2::{Digest, Sha256};

use crate::{
    lab::{
        follow,
        home::{Lab, VmFile},
        qemu, ssh, targets, vms,
    },
    process::pid,
};

/// What the e2e boots diskless: the install part installs Debian 12 (the lab's default) and this
/// part boots Debian 13, so every e2e run boots both releases (the proxy part installs 13 too).
pub const DISTRO: &str = "debian-13";

/// The diskless VMs this scenario defines and the firmware each boots with. UEFI is what
/// `lab vm start` uses unless told otherwise; one UEFI VM instead of a third VM keeps the
/// e2e's time (both boot at once).
pub const VMS: [(&str, qemu::Firmware); 2] = [
    ("diskless-1", qemu::Firmware::Bios),
    ("diskless-2", qemu::Firmware::Uefi),
];

/// Boots [`VMS`] diskless from `distro` (a pulled distro, e.g. `debian-12`) and checks them.
pub fn scenario(lab: &Lab, distro: &str) -> Result<()> {
    let key = ssh::ensure_key(lab)?;
    let mut defined = Vec::new();
    for (name, _) in VMS {
        let request = vms::VmRequest {
            name: name.into(),
            distro: distro.into(),
            arch: Arch::X86_64,
            mac: None,
            ip: None,
            boot: BootMode::Nfsroot,
        };
        let vm = vms::define(&lab.vms_dir(), &request, lab.subnet()?, &key, |_| Ok(()))?;
        defined.push(vm);
    }
    // The stack re-reads definitions within a second and starts unpacking the export.
    std::thread::sleep(Duration::from_secs(2));
    let accel = qemu::resolve_accel(qemu::AccelChoice::Auto, Arch::X86_64, &lab.run_dir())?;
    let mut started = BTreeMap::new();
    for (vm, (_, firmware)) in defined.iter().zip(VMS) {
        started.insert(vm.name.clone(), follow::now_ms());
        targets::start_vm(lab, vm, firmware, accel)?;
    }
    let result = checks(lab, distro, &defined, &started);
    for vm in &defined {
        let stopped = targets::stop_vm(lab, &vm.name);
        if result.is_ok() {
            stopped?;
        }
    }
    result
}

fn checks(
    lab: &Lab,
    distro: &str,
    defined: &[VmDefinition],
    started: &BTreeMap<String, u64>,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(900);
    for (vm, (_, firmware)) in defined.iter().zip(VMS) {
        wait_ssh(lab, vm, started[&vm.name], deadline)?;
        // The kernel's view of how it was started, so a wrong QEMU command line cannot pass.
        let booted = ssh_output(
            lab,
            vm,
            "if [ -d /sys/firmware/efi ]; then echo uefi; else echo bios; fi",
        )?;
        let expected = if firmware == qemu::Firmware::Bios {
            "bios"
        } else {
            "uefi"
        };
        ensure!(
            booted == expected,
            "{} was started with {firmware:?} firmware but its kernel booted from {booted}",
            vm.name
        );
    }
    // Taken once both root filesystems are mounted; every write below goes to a tmpfs.
    let export = export_dir(lab, distro)?;
    let before = tree_digest(&export)?;

    for vm in defined {
        super::firstboot::caches_were_not_rebuilt(
            lab,
            &vm.name,
            &[
                "ldconfig.service",
                "systemd-journal-catalog-update.service",
                "systemd-sysusers.service",
            ],
        )?;
        let fstype = ssh_output(lab, vm, "findmnt -n -o FSTYPE /")?;
        ensure!(
            fstype == "overlay",
            "/ of {} is {fstype:?}, expected the tmpfs overlay",
            vm.name
        );
        let seen = ssh_output(
            lab,
            vm,
            &format!(
                "echo written-on-{name} | sudo tee {marker} {ROOT_MARKER} >/dev/null && cat {marker}",
                name = vm.name,
                marker = marker(vm)
            ),
        )?;
        ensure!(
            seen == format!("written-on-{}", vm.name),
            "{} cannot read back its own write: {seen:?}",
            vm.name
        );
        // The NFS layer itself is read-only, also for root.
        let direct = ssh_output(
            lab,
            vm,
            "sudo touch /run/pxelab/lower/pxelab-e2e 2>/dev/null && echo writable || echo refused",
        )?;
        ensure!(
            direct == "refused",
            "root on {} could write the NFS root directly",
            vm.name
        );
    }
    for (me, other) in [(&defined[0], &defined[1]), (&defined[1], &defined[0])] {
        let seen = ssh_output(
            lab,
            other,
            &format!("sudo cat {} 2>/dev/null || echo absent", marker(me)),
        )?;
        ensure!(
            seen == "absent",
            "a file written on {} is visible on {}: {seen:?}",
            me.name,
            other.name
        );
        // No DHCP client manages the root's NIC (cloud-init's networking is off), so the
        // resolver comes from the initramfs's lease: the other VM's name resolves through the
        // stack's DNS.
        let resolved = ssh_output(lab, me, &format!("getent hosts {}", other.name))?;
        let ip = other.ip.map(|i| i.to_string()).unwrap_or_default();
        ensure!(
            !ip.is_empty() && resolved.split_whitespace().next() == Some(ip.as_str()),
            "{} resolves {} to {resolved:?}, expected {ip} (resolv.conf from the initramfs's lease)",
            me.name,
            other.name
        );
    }
    // What every shutdown does first. When ifupdown managed the NIC, this flushed the address
    // under the NFS root and the VM hung ("nfs: server … not responding").
    for vm in defined {
        let alive = ssh::output_within(
            ssh::command(
                lab,
                vm,
                &["sudo systemctl stop networking.service && cat /etc/hostname".to_string()],
            )?,
            Duration::from_secs(90),
        )?;
        let alive = String::from_utf8_lossy(&alive.stdout).trim().to_string();
        ensure!(
            alive == vm.guest_hostname(),
            "{} after `systemctl stop networking`: {alive:?}\n{}",
            vm.name,
            follow::console_tail(lab, &vm.name)
        );
    }
    nothing_survives_a_reboot(lab, &defined[0])?;

    for vm in defined {
        let timeline = crate::lab::stack::timeline(lab, &vm.name)?;
        let entries: Vec<_> = timeline
            .iter()
            .filter(|e| e.at_ms >= started[&vm.name])
            .collect();
        let since: Vec<Phase> = entries.iter().map(|e| e.event.phase).collect();
        let first = |phase: Phase| entries.iter().find(|e| e.event.phase == phase);
        let order = [Phase::Ipxe, Phase::Kernel, Phase::NfsRoot];
        let mut at = 0;
        for phase in &since {
            if at < order.len() && *phase == order[at] {
                at += 1;
            }
        }
        ensure!(
            at == order.len(),
            "timeline of {} lacks ipxe → kernel → nfs-root: {since:?}",
            vm.name
        );
        // Two leases before the root: iPXE's and the initramfs's. The stack records a lease
        // when it next reads dnsmasq's log (every 100 ms), and under OVMF iPXE asks for its
        // script within that time, so iPXE's lease may be written just after the `ipxe` event.
        let (Some(ipxe), Some(root), Some(lease)) = (
            first(Phase::Ipxe),
            first(Phase::NfsRoot),
            first(Phase::Dhcp),
        ) else {
            bail!("timeline of {} has no dhcp event: {since:?}", vm.name);
        };
        ensure!(
            lease.at_ms <= ipxe.at_ms + 1000,
            "timeline of {}: the first lease came {} ms after iPXE asked for its script: {since:?}",
            vm.name,
            lease.at_ms.saturating_sub(ipxe.at_ms)
        );
        let leases = entries
            .iter()
            .filter(|e| e.event.phase == Phase::Dhcp && e.at_ms < root.at_ms)
            .count();
        ensure!(
            leases >= 2,
            "timeline of {} has {leases} lease(s) before nfs-root, expected iPXE's and the initramfs's: {since:?}",
            vm.name
        );
        ensure!(
            !since
                .iter()
                .any(|p| matches!(p, Phase::Installing | Phase::LocalBoot)),
            "{} went through the installer or its disk: {since:?}",
            vm.name
        );
    }

    let after = tree_digest(&export)?;
    ensure!(
        before == after,
        "the export {} changed while diskless VMs ran",
        export.display()
    );
    Ok(())
}

/// Waits for the NFS root on the timeline, then for SSH answering with the VM's hostname.
fn wait_ssh(lab: &Lab, vm: &VmDefinition, start_ms: u64, deadline: Instant) -> Result<()> {
    let mut mounted = false;
    loop {
        if pid::read(&lab.vm_file(&vm.name, VmFile::Pid)).is_none() {
            bail!(
                "QEMU of {} is not running any more\n{}",
                vm.name,
                follow::console_tail(lab, &vm.name)
            );
        }
        if !mounted {
            let timeline = crate::lab::stack::timeline(lab, &vm.name).unwrap_or_default();
            if let Some(e) = timeline
                .iter()
                .find(|e| e.event.phase == Phase::NfsRoot && e.at_ms >= start_ms)
            {
                eprintln!(
                    "e2e: {} mounted its NFS root after {:.1}s",
                    vm.name,
                    (e.at_ms - start_ms) as f64 / 1000.0
                );
                mounted = true;
            }
        } else {
            // No host keys on the console yet (cloud-init still running) is "not yet", not an error.
            let answered = ssh::command(lab, vm, &["hostname".to_string()])
                .and_then(|c| ssh::output_within(c, Duration::from_secs(30)));
            if let Some(out) = answered.ok().filter(|out| out.status.success()) {
                let host = String::from_utf8_lossy(&out.stdout).trim().to_string();
                ensure!(
                    host == vm.guest_hostname(),
                    "{} answers SSH as {host:?}: cloud-init did not apply the seed",
                    vm.name
                );
                eprintln!(
                    "e2e: {} answers SSH after {:.1}s",
                    vm.name,
                    follow::now_ms().saturating_sub(start_ms) as f64 / 1000.0
                );
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            let what = if mounted { "SSH" } else { "an nfs-root event" };
            bail!(
                "{} did not reach {what} in time\n{}\n{}",
                vm.name,
                boot_story(lab, &vm.name),
                follow::console_tail(lab, &vm.name)
            );
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// What the stack recorded for `name` and what the diskless boot script said on the console:
/// when the nfs-root event is missing, these tell a lost report from a boot that never got there.
fn boot_story(lab: &Lab, name: &str) -> String {
    let timeline = match crate::lab::stack::timeline(lab, name) {
        Ok(entries) => entries
            .iter()
            .map(|e| {
                format!(
                    "  {:>8} ms  {}: {}",
                    e.at_ms, e.event.phase, e.event.message
                )
            })
            .collect::<Vec<_>>()
            .join("\n"),
        Err(e) => format!("  (cannot read it: {e:#})"),
    };
    let console = std::fs::read(lab.vm_file(name, VmFile::Console)).unwrap_or_default();
    let said: Vec<String> = String::from_utf8_lossy(&console)
        .lines()
        .filter(|l| l.contains("pxelab:"))
        .map(|l| format!("  {l}"))
        .collect();
    format!(
        "--- timeline of {name} on the stack ---\n{timeline}\n--- the diskless boot script's console lines ---\n{}",
        said.join("\n")
    )
}

/// Where each VM writes a file that no other VM and no later boot may see (and a second one
/// in root's home, [`ROOT_MARKER`]).
fn marker(vm: &VmDefinition) -> String {
    format!("/etc/pxelab-e2e-{}", vm.name)
}

const ROOT_MARKER: &str = "/root/e2e-marker";

/// Reboots `vm` (which wrote its markers) and checks that it came back as a new boot, over
/// NFS again, without them: nothing persists across reboots.
fn nothing_survives_a_reboot(lab: &Lab, vm: &VmDefinition) -> Result<()> {
    let boot_id = "cat /proc/sys/kernel/random/boot_id";
    let before = ssh_output(lab, vm, boot_id)?;
    let rebooted = follow::now_ms();
    // The connection may drop with the VM: whether it rebooted is seen from outside.
    let _ = ssh::output_within(
        ssh::command(lab, vm, &["sudo systemctl --no-block reboot".to_string()])?,
        Duration::from_secs(30),
    );
    eprintln!("e2e: {} rebooting", vm.name);
    wait_ssh(lab, vm, rebooted, Instant::now() + Duration::from_secs(900))?;
    let after = ssh_output(lab, vm, boot_id)?;
    ensure!(
        before != after,
        "{} answers with the same boot id: it did not reboot",
        vm.name
    );
    let left = ssh_output(
        lab,
        vm,
        &format!(
            "for f in {} {ROOT_MARKER}; do sudo test -e $f && echo $f; done; true",
            marker(vm)
        ),
    )?;
    ensure!(
        left.is_empty(),
        "{} still has what it wrote before its reboot: {left}",
        vm.name
    );
    Ok(())
}

/// Runs `command` on `vm` and gives up after 120 s (see [`ssh::output_within`]).
fn ssh_output(lab: &Lab, vm: &VmDefinition, command: &str) -> Result<String> {
    super::ssh_output(lab, &vm.name, command)
}

/// The unpacked export the stack serves for `distro`
/// (`<state>/nfsroot/<distro>/x86_64/<sha256 prefix>/`, next to no partial unpack).
pub fn export_dir(lab: &Lab, distro: &str) -> Result<PathBuf> {
    let dir = lab
        .state_dir()
        .join("nfsroot")
        .join(distro)
        .join(Arch::X86_64.as_str());
    let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .is_some_and(|n| !n.to_string_lossy().starts_with('.'))
        })
        .collect();
    found.sort();
    ensure!(
        found.len() == 1,
        "expected one export in {}, found {found:?}",
        dir.display()
    );
    Ok(found.remove(0))
}

/// A digest of a whole tree: every path with its type, mode, owner, size, mtime, link target
/// and content.
fn tree_digest(root: &Path) -> Result<String> {
    let mut hasher = Sha256::new();
    let mut stack = vec![root.to_path_buf()];
    let mut paths = Vec::new();
    while let Some(dir) = stack.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?
        {
            let path = entry?.path();
            if path.symlink_metadata()?.is_dir() {
                stack.push(path.clone());
            }
            paths.push(path);
        }
    }
    paths.sort();
    let mut buf = vec![0u8; 1 << 16];
    for path in paths {
        let meta = path.symlink_metadata()?;
        let rel = path.strip_prefix(root).unwrap_or(&path);
        hasher.update(format!(
            "{}\0{:o}\0{}:{}\0{}\0{}\0",
            rel.display(),
            meta.mode(),
            meta.uid(),
            meta.gid(),
            meta.len(),
            meta.mtime()
        ));
        if meta.file_type().is_symlink() {
            hasher.update(std::fs::read_link(&path)?.to_string_lossy().as_bytes());
        } else if meta.is_file() {
            let mut f = std::fs::File::open(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
            }
        }
    }
    Ok(hex::encode(hasher.finalize()))
}

/// ganesha's process while the stack runs it (read it before `lab down`, check it is gone
/// after).
pub fn nfs_server_pid(lab: &Lab) -> Option<pid::Pid> {
    let pid: u32 = std::fs::read_to_string(lab.nfs_server_pidfile())
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    (comm.trim() == "ganesha.nfsd")
        .then(|| pid::Pid::of(pid).ok())
        .flatten()
}
