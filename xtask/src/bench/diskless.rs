//! Figure 6: diskless boots under QEMU with the real lab (as root, in the bench's throw-away lab
//! home, stack as a process with the host's nfs-ganesha): Debian 13 VMs (`boot: nfsroot`, UEFI
//! with the NIC's iPXE ROM, the lab's default) booting from the stack's NFS export.
//!
//! Each run starts from an empty lab (`lab down --purge` removes the stack's state, exports
//! included) and measures, in order: the stack's first-use unpack of the rootfs into the export
//! (from the moment the first diskless VM is defined until the stack's log says the export is
//! ready, and until nfs-ganesha serves it); one VM started alone, its milestones from the QEMU
//! pid file's mtime (DHCP lease, iPXE script, kernel, the `nfs-root` event the boot script
//! reports, SSH answering with its hostname, as `lab vm start` follows it); then that VM and a
//! second one started together, until both answer SSH. A failed run still records what it
//! reached, and the group records why it stopped.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use pxelab_contract::{Arch, BootMode, VmDefinition};

use super::provision::{accel, all_ssh_ready, qemu_start_ms};
use super::report::{Better, Group, Row};
use super::{log_tail, mib, Ctx};
use crate::lab::{
    follow,
    home::{Lab, StackKind, DEFAULT_SUBNET},
    net, qemu, ssh, stack, targets, vms, UpArgs,
};
use crate::process;

/// What boots diskless here (as in the e2e's diskless part; the provision group installs 12).
const DISTRO: &str = "debian-13";

/// The VMs: the first boots alone, then both together.
const VMS: [&str; 2] = ["diskless-1", "diskless-2"];

/// One milestone of a followed VM, in ms from its QEMU start.
type Milestone = fn(&follow::Row) -> Option<u64>;

/// A diskless boot's milestones on the stack's timeline, in the order a VM passes them.
const MILESTONES: [(&str, Milestone); 4] = [
    ("DHCP lease", |r| r.dhcp),
    ("iPXE script served", |r| r.ipxe),
    ("kernel fetched", |r| r.kernel),
    ("NFS root mounted (nfs-root event)", |r| r.nfs_root),
];

/// How long one boot may take to answer SSH (~130 s under TCG, 2–3 times that on a busy
/// machine), and the unpack to finish.
const BOOT_LIMIT: Duration = Duration::from_secs(1200);
const UNPACK_LIMIT: Duration = Duration::from_secs(900);

/// What the runs measured, each in s.
#[derive(Default)]
struct Samples {
    unpacked: Vec<f64>,
    /// The unpack's own duration as the stack logged it.
    unpack_logged: Vec<f64>,
    served: Vec<f64>,
    milestones: Vec<Vec<f64>>,
    ssh: Vec<f64>,
    pair: Vec<f64>,
    pair_detail: Vec<String>,
}

pub fn run(ctx: &mut Ctx, group: &mut Group) -> Result<()> {
    process::require_root("benchmarking diskless boots", net::NO_ROOTLESS_NFS)?;
    crate::hostdeps::ensure(&targets::LAB_TOOLS)?;
    crate::hostdeps::ensure(&targets::NFS_TOOLS)?;
    ctx.stack_dir()?;
    let rootfs = ctx.distro(DISTRO)?.manifest.contract.rootfs.size;
    let dir = ctx.scratch("diskless")?;
    let runs = ctx.runs(3, 1);
    let (accel, choice, accel_name) = accel(&dir)?;
    group.fact("accel", accel_name);
    group.fact("firmware", "UEFI (OVMF) with the NIC's iPXE ROM");
    group.fact(
        "distro",
        format!("{DISTRO} diskless (NFS root under a tmpfs overlay)"),
    );
    group.fact("stack", "process (the host's nfs-ganesha, VFS backend)");
    group.fact(
        "vm",
        format!("{} MiB, {} vCPUs", targets::MEMORY_MIB, qemu::CPUS),
    );
    group.fact("rootfs", format!("{:.0} MiB zstd", mib(rootfs)));

    let lab_guard = ctx.lab()?;
    // The stack alone: the VMs are defined and started below, one at a time.
    let up = UpArgs {
        targets: 0,
        distro: DISTRO.into(),
        arch: Arch::X86_64,
        firmware: Some(qemu::Firmware::Uefi),
        accel: choice,
        subnet: DEFAULT_SUBNET.into(),
        stack: Some(StackKind::Process),
        timeout: BOOT_LIMIT.as_secs(),
        ipv6: false,
    };
    let mut s = Samples {
        milestones: vec![Vec::new(); MILESTONES.len()],
        ..Samples::default()
    };
    let mut failure = None;
    for i in 0..runs {
        ctx.ui.println(format!(
            "bench diskless: run {}/{runs} ({accel_name})",
            i + 1
        ));
        let outcome = one_run(&up, accel, &mut s);
        // A fresh lab home for the next run: its first diskless VM unpacks the rootfs again.
        let down = lab_guard.down();
        if let Err(e) = outcome.and(down) {
            failure = Some(e.context(format!("run {}", i + 1)));
            break;
        }
    }

    let from_def = "s from the VM's definition";
    let logged: Vec<String> = s.unpack_logged.iter().map(|v| format!("{v:.1}")).collect();
    let mut unpacked = Row::new(
        "first use: rootfs unpacked into the NFS export",
        from_def,
        Better::Lower,
        s.unpacked,
    );
    if !logged.is_empty() {
        unpacked = unpacked.note(format!(
            "the stack's log: the unpack itself took {} s",
            logged.join(", ")
        ));
    }
    let rows = [
        unpacked,
        Row::new(
            "first use: export served by nfs-ganesha",
            from_def,
            Better::Lower,
            s.served,
        ),
    ];
    for row in rows {
        group.push(&ctx.ui, row);
    }
    let done = s.milestones[0].len().max(s.ssh.len());
    for ((label, _), v) in MILESTONES.iter().zip(s.milestones) {
        let mut row = Row::new(
            format!("1 VM: {label}"),
            "s from QEMU start",
            Better::Lower,
            v,
        );
        if row.samples.len() < done {
            let missing = done - row.samples.len();
            row = row.note(format!("not reached in {missing} of {done} boots"));
        }
        group.push(&ctx.ui, row);
    }
    let ssh = Row::new(
        "1 VM: SSH answering",
        "s from QEMU start",
        Better::Lower,
        s.ssh,
    )
    .note("the installed-disk boot of Debian 12 is in the provision group");
    group.push(&ctx.ui, ssh);
    let mut pair = Row::new(
        "2 VMs at once: both answering SSH",
        "s from first QEMU start",
        Better::Lower,
        s.pair,
    );
    if !s.pair_detail.is_empty() {
        pair = pair.note(format!("SSH answering at {}", s.pair_detail.join("; ")));
    }
    group.push(&ctx.ui, pair);
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// One run in an empty lab: the stack, the unpack, one VM alone, then two at once. Pushes
/// every figure as soon as it is measured.
fn one_run(up: &UpArgs, accel: qemu::Accel, s: &mut Samples) -> Result<()> {
    targets::up(Lab::open()?, up)?;
    let lab = Lab::open()?;
    // Before the definition is written: `define` waits a moment for the stack after it.
    let defined = Instant::now();
    let first = define(&lab, VMS[0])?;
    let export = export_ready(&lab, defined)?;
    s.unpacked.push(export.unpacked);
    s.unpack_logged.push(export.logged);
    s.served.push(export.served);

    let started = start(&lab, std::slice::from_ref(&first), accel)?;
    let waited = follow::wait_all(&lab, std::slice::from_ref(&first), &started, BOOT_LIMIT);
    // What the timeline shows counts also when the wait failed.
    let mut reached = follow::Row::default();
    if let Ok(timeline) = stack::timeline(&lab, &first.name) {
        reached.absorb(started[&first.name], &timeline);
    }
    for ((_, field), v) in MILESTONES.iter().zip(&mut s.milestones) {
        v.extend(field(&reached).map(|ms| ms as f64 / 1000.0));
    }
    let ssh = waited?[0].ssh.context("no SSH time for the VM")?;
    s.ssh.push(ssh as f64 / 1000.0);
    targets::stop_vm(&lab, &first.name)?;

    let both = [first, define(&lab, VMS[1])?];
    let started = start(&lab, &both, accel)?;
    let rows = follow::wait_all(&lab, &both, &started, BOOT_LIMIT)?;
    let (all, per_vm) = all_ssh_ready(&lab, &rows)?;
    s.pair.push(all);
    s.pair_detail.push(per_vm.join(", "));
    Ok(())
}

/// Defines diskless VM `name` (unless it is) and has the stack read it at once.
fn define(lab: &Lab, name: &str) -> Result<VmDefinition> {
    let existing = vms::load_all(&lab.vms_dir())?;
    if let Some(vm) = existing.iter().find(|v| v.name == name) {
        return Ok(vm.clone());
    }
    let request = vms::VmRequest {
        name: name.into(),
        distro: DISTRO.into(),
        arch: Arch::X86_64,
        mac: None,
        ip: None,
        boot: BootMode::Nfsroot,
    };
    let key = ssh::ensure_key(lab)?;
    let vm = vms::define(&lab.vms_dir(), &request, lab.subnet()?, &key, |_| Ok(()))?;
    // The stack also rescans by itself; the signal makes the reservation (and unpack) immediate.
    stack::running(lab)
        .context("the stack is not running")?
        .signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(500));
    Ok(vm)
}

/// Starts `vms` one right after the other; each one's QEMU start (Unix ms) by name.
fn start(
    lab: &Lab,
    vms: &[VmDefinition],
    accel: qemu::Accel,
) -> Result<std::collections::BTreeMap<String, u64>> {
    let mut started = std::collections::BTreeMap::new();
    for vm in vms {
        targets::start_vm(lab, vm, qemu::Firmware::Uefi, accel)?;
    }
    for vm in vms {
        started.insert(vm.name.clone(), qemu_start_ms(lab, &vm.name)?);
    }
    Ok(started)
}

/// When the first use's export was ready, in s after the VM's definition.
struct ExportTimes {
    unpacked: f64,
    /// What the stack logged as the unpack's duration.
    logged: f64,
    served: f64,
}

/// Follows the stack's log until nfs-ganesha serves the freshly unpacked export.
fn export_ready(lab: &Lab, defined: Instant) -> Result<ExportTimes> {
    let log = lab.stack_log();
    let mut unpacked = None;
    loop {
        let text = std::fs::read(&log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .with_context(|| format!("reading {}", log.display()))?;
        let seen = export_progress(&text);
        if let Some(failed) = seen.failed {
            bail!("the stack could not unpack the rootfs: {failed}");
        }
        if let Some(logged) = seen.unpacked {
            let at = *unpacked.get_or_insert(defined.elapsed().as_secs_f64());
            if seen.served {
                let served = defined.elapsed().as_secs_f64();
                return Ok(ExportTimes {
                    unpacked: at,
                    logged,
                    served,
                });
            }
        }
        if stack::running(lab).is_none() {
            bail!("the stack exited:\n{}", log_tail(&log, 20));
        }
        if defined.elapsed() > UNPACK_LIMIT {
            bail!(
                "the export of {DISTRO} was not served {} s after the first diskless VM was defined; the stack's log ends:\n{}",
                UNPACK_LIMIT.as_secs(),
                log_tail(&log, 20)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What the stack's log says about the diskless export so far.
#[derive(Debug, Default, PartialEq)]
struct ExportProgress {
    /// The unpack is done: its duration in s as the stack logged it.
    unpacked: Option<f64>,
    /// nfs-ganesha accepted connections after the unpack.
    served: bool,
    /// The unpack failed: the stack's line.
    failed: Option<String>,
}

/// Reads the lines of `runtime/src/nfsroot.rs` and `supervisor.rs` ("<export> ready (12.3 s)",
/// "nfs-ganesha is serving on port …", "unpacking … failed: …") in the stack's log.
fn export_progress(log: &str) -> ExportProgress {
    let mut seen = ExportProgress::default();
    for line in log.lines() {
        let Some(line) = line.strip_prefix("pxelab-stack: ") else {
            continue;
        };
        if line.starts_with("unpacking ") && line.contains(" failed: ") {
            seen.failed = Some(line.to_string());
        } else if line.contains("/nfsroot/") && seen.unpacked.is_none() {
            let secs = line
                .split_once(" ready (")
                .and_then(|(_, rest)| rest.strip_suffix(" s)"))
                .and_then(|n| n.parse().ok());
            seen.unpacked = secs;
        } else if seen.unpacked.is_some() && line.starts_with("nfs-ganesha is serving") {
            seen.served = true;
        }
    }
    seen
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_progress_follows_the_stacks_log() {
        let start = "pxelab-stack: listening on 10.77.0.1:80\n\
            pxelab-stack: unpacking /h/images/debian-13/x86_64/rootfs.tar.zst for diskless boots into /h/state/nfsroot/debian-13/x86_64/0123abcd\n";
        assert_eq!(export_progress(start), ExportProgress::default());

        let unpacked = format!(
            "{start}pxelab-stack: /h/state/nfsroot/debian-13/x86_64/0123abcd ready (41.7 s)\n"
        );
        let seen = export_progress(&unpacked);
        assert_eq!((seen.unpacked, seen.served), (Some(41.7), false));

        let served = format!(
            "{unpacked}pxelab-stack: nfs-ganesha started (pid 7, exports /debian-13/x86_64, config c, log l)\n\
             pxelab-stack: nfs-ganesha is serving on port 2049\n"
        );
        assert_eq!(
            export_progress(&served),
            ExportProgress {
                unpacked: Some(41.7),
                served: true,
                failed: None
            }
        );
    }

    #[test]
    fn a_server_before_the_unpack_or_a_failed_unpack_is_not_ready() {
        let early = "pxelab-stack: nfs-ganesha is serving on port 2049\n";
        assert!(!export_progress(early).served);
        let failed = "pxelab-stack: unpacking /h/images/debian-13/x86_64/rootfs.tar.zst into /h/state/nfsroot/debian-13/x86_64/0123abcd failed: cannot unpack the archive: No space left on device\n";
        let seen = export_progress(failed);
        assert_eq!(seen.unpacked, None);
        assert!(seen.failed.unwrap().contains("No space left"));
    }
}
