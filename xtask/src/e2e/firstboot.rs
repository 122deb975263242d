//! The fast first boot as `cargo xtask e2e` checks it on target-1 (issue 15): the installer
//! resumed its rootfs stream across the stack swap, switched root into the installed system on
//! its own running kernel (no firmware boot, no second kernel boot), without checking the file
//! system it had just made, SSH answered before cloud-init finished, and
//! cloud-init then applied the user-data and reported `cloud-init-done` without errors. Then
//! what a kernel upgrade does: `update-grub` inside the target and a power cycle through the
//! firmware, after which the disk boots again. The lab runs with `--ipv6`: the installed
//! system took its reserved IPv6 address from DHCPv6 and answers SSH there, at the address its
//! AAAA name resolves to.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use pxelab_contract::{Phase, TimelineEntry};

use super::ssh_output;
use crate::lab::{follow, home::Lab, ssh, stack, targets};

const VM: &str = "target-1";

/// `vm`'s first `cloud-init-done` among `events`, which must report no errors.
pub fn cloud_init_done<'a>(vm: &str, events: &'a [TimelineEntry]) -> Result<&'a TimelineEntry> {
    let done = events
        .iter()
        .find(|e| e.event.phase == Phase::CloudInitDone)
        .with_context(|| format!("{vm} never reported cloud-init-done"))?;
    ensure!(
        done.event.message.ends_with("; no errors"),
        "cloud-init on {vm} reported errors: {:?}",
        done.event.message
    );
    Ok(done)
}

/// target-1's AAAA name, asked of the stack's DNS inside the lab namespace, is its IPv6
/// address (the lab's prefix with its IPv4 host number), and SSH to that address reaches the
/// installed system, which holds it on its NIC. Bounded: the address comes from DHCPv6 when
/// ifupdown brings the NIC up, which may follow the early SSH on IPv4.
pub fn ssh_over_ipv6(lab: &Lab) -> Result<()> {
    let took = Instant::now();
    ensure!(lab.config.ipv6, "the lab lost its IPv6 setting (lab.json)");
    let vm = targets::definition(lab, VM)?;
    let net = lab.net()?;
    let ip = vm.ip.context("target-1 has no IPv4 address")?;
    let want = net.vm_ipv6(ip);
    ensure!(
        vm.ipv6 == Some(want),
        "target-1's definition has IPv6 {:?}, expected {want}",
        vm.ipv6
    );
    let sh = crate::process::shell()?;
    let name = format!("{VM}.pxelab.local");
    let gateway = net.subnet.gateway().to_string();
    let lookup = net
        .command(&sh, "busybox")?
        .args(["nslookup", "-type=aaaa", &name, &gateway])
        .quiet()
        .ignore_status()
        .output()?;
    let answer = String::from_utf8_lossy(&lookup.stdout);
    let resolved: Vec<&str> = answer
        .lines()
        .skip_while(|l| !l.starts_with("Name:"))
        .filter_map(|l| l.strip_prefix("Address:").map(str::trim))
        .collect();
    ensure!(
        resolved == [want.to_string()],
        "AAAA {name} from the stack is {resolved:?}, expected [{want}]: {answer}"
    );
    let command = ["ip -6 -o addr show dev lan0 scope global".to_string()];
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let attempt = ssh::output_within(
            ssh::command_over(lab, &vm, true, &command)?,
            Duration::from_secs(30),
        );
        let (ok, said) = match attempt {
            Ok(out) => {
                let text = String::from_utf8_lossy(&out.stdout).to_string();
                let ok = out.status.success() && text.contains(&format!("inet6 {want}/"));
                (ok, text + &String::from_utf8_lossy(&out.stderr))
            }
            Err(e) => (false, format!("{e:#}")),
        };
        if ok {
            break;
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "no SSH to target-1 over IPv6 at {want} within 120 s: {said}{}",
                follow::console_tail(lab, VM)
            );
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    eprintln!(
        "e2e: target-1 answers SSH over IPv6 at {want} ({name}), checked in {:.1}s",
        took.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Checks target-1's first install, right after the `lab up` that installed it.
pub fn checks(lab: &Lab) -> Result<()> {
    let timeline = stack::timeline(lab, VM)?;
    let installed = timeline
        .iter()
        .rposition(|e| e.event.phase == Phase::Installed)
        .context("no `installed` event")?;
    resumed_across_the_swap(&timeline[..installed])?;
    let after = &timeline[installed + 1..];
    // The installer's message says what it does next (see the installer's main.rs).
    let message = &timeline[installed].event.message;
    ensure!(
        message.contains("next: switch root"),
        "the installer did not switch root into the installed system (the lab's default; its \
         kernel is the installer's): {message:?}"
    );
    ensure!(
        !after
            .iter()
            .any(|e| matches!(e.event.phase, Phase::Ipxe | Phase::LocalBoot)),
        "target-1 went through the firmware after its install although it switched root: {after:?}"
    );
    ensure!(
        !fsck_root_ran(lab)?,
        "target-1's first boot checked the file system the installer had just made"
    );
    // Debian 12's systemd has no ldconfig or catalog units; diskless.rs checks Debian 13's.
    caches_were_not_rebuilt(lab, VM, &["systemd-sysusers.service"])?;
    let done = cloud_init_done(VM, after)?;
    eprintln!("e2e: cloud-init on target-1: {}", done.event.message);
    // SSH is not gated on cloud-init: the early sshd was up before cloud-final finished. The
    // journal, since the early unit is unloaded once Debian's ssh.service took over.
    //
    // A unit that starts before journald does (the early sshd waits for nothing) has its
    // "Started" line only in the kernel log journald imports later, without the unit's fields,
    // so `-u` may not find it (seen once in CI): then the whole boot's journal is searched for
    // the line naming the unit or its description.
    let seconds = |unit: &str, what: &str| -> Result<f64> {
        let line = ssh_output(
            lab,
            VM,
            &format!(
                "sudo journalctl -b -o short-monotonic -u {unit} | grep -m1 '{what}' || \
                 sudo journalctl -b -o short-monotonic | grep -m1 -E '{what} ({unit}|{EARLY_SSH_DESCRIPTION})' || true"
            ),
        )?;
        line.strip_prefix('[')
            .and_then(|l| l.split_once(']'))
            .and_then(|(t, _)| t.trim().parse().ok())
            .with_context(|| format!("no {what:?} line for {unit} in target-1's journal: {line:?}"))
    };
    let ssh = seconds("pxelab-early-ssh.service", "Started")?;
    let final_stage = seconds("cloud-final.service", "Finished")?;
    ensure!(
        ssh < final_stage,
        "early SSH started at {ssh} s, cloud-final finished at {final_stage} s: SSH waited for cloud-init"
    );
    eprintln!(
        "e2e: SSH was up {:.1} s before cloud-init finished ({ssh:.1} s and {final_stage:.1} s after boot)",
        final_stage - ssh
    );
    // `manage_etc_hosts` is the user-data's, applied by cloud-init and by nothing else.
    let hosts = ssh_output(
        lab,
        VM,
        "grep -c '^127.0.1.1 .*target-1' /etc/hosts || true",
    )?;
    ensure!(
        hosts == "1",
        "cloud-init did not apply the user-data's manage_etc_hosts (/etc/hosts has {hosts} lines for target-1)"
    );
    // The stack's user-data is valid cloud-config for the target's own cloud-init (an invalid
    // key is only a WARNING in its log, so `cloud-init-done` would not show it), and its
    // locale was set without locale-gen.
    let schema = ssh_output(
        lab,
        VM,
        "sudo cloud-init schema --system 2>&1; echo status=$?",
    )?;
    ensure!(
        schema.ends_with("status=0"),
        "target-1's cloud-init finds the stack's user-data invalid: {schema}"
    );
    let locale = ssh_output(
        lab,
        VM,
        "grep -x 'LANG=C.UTF-8' /etc/default/locale || true",
    )?;
    ensure!(
        locale == "LANG=C.UTF-8",
        "cloud-init did not set the user-data's locale C.UTF-8 in /etc/default/locale"
    );
    Ok(())
}

/// systemd on `name` evaluated and skipped the first-boot rebuild of the caches the rootfs
/// already holds (`/etc/.updated` and `/var/.updated` from the rootfs build): without the
/// stamps these units run on every first boot. `units` are the ones this release has. (sudo:
/// the image runs no D-Bus, and only root reaches systemd over its private socket.)
pub fn caches_were_not_rebuilt(lab: &Lab, name: &str, units: &[&str]) -> Result<()> {
    for unit in units {
        let shown = ssh_output(
            lab,
            name,
            &format!(
                "sudo systemctl show -p ConditionResult -p ConditionTimestampMonotonic {unit}"
            ),
        )?;
        let evaluated = shown
            .lines()
            .any(|l| l.starts_with("ConditionTimestampMonotonic=") && !l.ends_with("=0"));
        ensure!(
            evaluated && shown.lines().any(|l| l == "ConditionResult=no"),
            "{name} ran {unit} on its first boot (the rootfs's update stamps were not current): {shown}"
        );
    }
    Ok(())
}

/// The early sshd unit's description (the installer's `firstboot.rs`), as systemd logs it.
const EARLY_SSH_DESCRIPTION: &str = "OpenSSH server until cloud-init has run";

/// Whether systemd checked target-1's root file system this boot. The first boot after the
/// switch root starts on a read-write root, for which systemd-fsck-root does not run.
fn fsck_root_ran(lab: &Lab) -> Result<bool> {
    let shown = ssh_output(
        lab,
        VM,
        "sudo systemctl show -p ExecMainStartTimestampMonotonic systemd-fsck-root.service",
    )?;
    let started = shown
        .trim()
        .strip_prefix("ExecMainStartTimestampMonotonic=")
        .and_then(|v| v.parse::<u64>().ok())
        .with_context(|| format!("systemctl show said {shown:?}"))?;
    Ok(started != 0)
}

/// Whether target-1's running kernel was told to skip the file system check: a boot through
/// GRUB must not be (the first boot, switched into, skips it only because its root is rw).
fn skips_the_fs_check(lab: &Lab) -> Result<bool> {
    let cmdline = ssh_output(lab, VM, "cat /proc/cmdline")?;
    Ok(cmdline.split_whitespace().any(|w| w == "fsck.mode=skip"))
}

/// The installer's rootfs stream was cut by the stack swap and resumed: its summary
/// ("…, N reconnects) at …") counts at least one reconnect.
fn resumed_across_the_swap(before_installed: &[TimelineEntry]) -> Result<()> {
    let rootfs = before_installed
        .iter()
        .rev()
        .find(|e| e.event.phase == Phase::Rootfs && e.event.duration_ms.is_some())
        .context("no finished rootfs step before `installed`")?;
    let message = &rootfs.event.message;
    let reconnects: u32 = message
        .split_once(" reconnects")
        .and_then(|(head, _)| head.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no reconnect count in the rootfs summary {message:?}"))?;
    ensure!(
        reconnects >= 1,
        "the stack was swapped mid-stream but the installer never reconnected: {message:?}"
    );
    eprintln!("e2e: the rootfs stream resumed after {reconnects} reconnect(s)");
    Ok(())
}

/// What a kernel upgrade in the target does: `update-grub` rewrites `/boot/grub/grub.cfg`, and
/// the next boot, through the firmware and the stack's local-boot answer, must come up again.
pub fn update_grub_and_reboot(lab: &Lab) -> Result<()> {
    let boot_id = || ssh_output(lab, VM, "cat /proc/sys/kernel/random/boot_id");
    let before = boot_id()?;
    let out = ssh_output(lab, VM, "sudo update-grub 2>&1")?;
    ensure!(
        out.contains("Found linux image"),
        "update-grub in target-1 found no kernel:\n{out}"
    );
    let cfg = ssh_output(lab, VM, "head -5 /boot/grub/grub.cfg")?;
    ensure!(
        cfg.contains("generated by grub-mkconfig"),
        "/boot/grub/grub.cfg is not update-grub's:\n{cfg}"
    );
    let asked = follow::now_ms();
    // A power cycle (ACPI shutdown, then a fresh QEMU), not a reboot inside the guest: under
    // TCG, OVMF spends 40-90 s after a guest-initiated reset decompressing itself into RAM
    // the guest had used (measured: its LZMA copy loop ran at ~0.2 MB/s, where a cold start
    // takes no time there), and once hung for 600 s; the warm reboot took 265 s of a CI run. Both boots take the same path from the firmware on: the stack's
    // local-boot answer, then GRUB with update-grub's config.
    super::xtask_ok(&["lab", "vm", "stop", VM])?;
    super::xtask_ok(&["lab", "vm", "start", VM])?;
    let deadline = Instant::now() + Duration::from_secs(360);
    while !boot_id().is_ok_and(|now| now != before) {
        ensure!(
            Instant::now() < deadline,
            "target-1 did not answer SSH within 360 s of a power cycle after update-grub\n{}",
            follow::console_tail(lab, VM)
        );
        std::thread::sleep(Duration::from_secs(3));
    }
    let timeline = stack::timeline(lab, VM)?;
    ensure!(
        timeline
            .iter()
            .any(|e| e.at_ms >= asked && e.event.phase == Phase::LocalBoot),
        "target-1's reboot did not go through the firmware and the stack's local-boot answer"
    );
    let hostname = ssh_output(lab, VM, "hostname")?;
    ensure!(hostname == VM, "hostname is {hostname:?} after the reboot");
    ensure!(
        !skips_the_fs_check(lab)?,
        "target-1's boot through GRUB was told to skip the file system check"
    );
    eprintln!(
        "e2e: update-grub, power cycle, SSH again after {:.1} s",
        follow::now_ms().saturating_sub(asked) as f64 / 1000.0
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pxelab_contract::Event;

    fn rootfs_done(message: &str) -> TimelineEntry {
        TimelineEntry {
            at_ms: 1,
            event: Event {
                phase: Phase::Rootfs,
                message: message.into(),
                duration_ms: Some(40_000),
                ..Event::default()
            },
        }
    }

    /// The check fails when the claim is false: an install that never reconnected (the summary
    /// of a real run without a swap) does not pass as resumed.
    #[test]
    fn a_stream_that_never_reconnected_is_not_a_resume() {
        let quiet = "18549 entries, 483.9 MiB unpacked from 142.8 MiB (sha256 verified in 2.4 s of hashing, 0 reconnects) at 3.0 MiB/s";
        let err = resumed_across_the_swap(&[rootfs_done(quiet)]).unwrap_err();
        assert!(err.to_string().contains("never reconnected"), "{err}");
        let resumed = quiet.replace("0 reconnects", "2 reconnects");
        resumed_across_the_swap(&[rootfs_done(&resumed)]).unwrap();
        assert!(resumed_across_the_swap(&[rootfs_done("no summary")]).is_err());
    }
}
