//! Figure 3: provisioning under QEMU with the real lab (`lab up`, as root, in the bench's
//! throw-away lab home): milestones from QEMU start for one target (a fresh install per run),
//! the same target booting its installed disk again (`lab down`, `lab up`: what an install
//! costs over a plain boot is the ratio of the two), and the time until two and four targets
//! started together all answer SSH.
//!
//! Milestones come from the stack's timeline of the VM (DHCP lease, iPXE script, kernel fetch,
//! installer running, rootfs streamed, installed, disk boot, cloud-init done), measured from the
//! QEMU pid file's mtime as `lab up` does; "SSH ready" is when `lab up`'s SSH check first
//! succeeded. An install that starts the installed system itself (switch root) has no disk boot
//! through the firmware; the same target defined with `firmware_reboot` (`lab vm create
//! --firmware-reboot`) takes that path, measured beside it. The
//! rootfs stream rate inside the guest (compressed bytes / the installer's rootfs phase) stands
//! next to `zstd -dc | tar -x` of the same tarball on the host into a tmpfs.
//!
//! Under TCG this is slow (measured here: one target SSH-ready after ~13 min on a loaded 2-core
//! machine), so each `lab up` is bounded: 30 min for one target, 60 min for four. A failed run
//! still records the milestones it reached, and the group records why it stopped.

use std::collections::BTreeMap;
use std::time::UNIX_EPOCH;

use anyhow::{Context, Result};
use pxelab_contract::{Arch, Phase, TimelineEntry};
use xshell::cmd;

use super::cpu;
use super::guards::Mount;
use super::report::{Better, Group, Row};
use super::{mib, timed, Ctx, DEBIAN_12};
use crate::lab::{
    follow,
    home::{Lab, StackKind, VmFile},
    qemu, targets, UpArgs,
};
use crate::process;

const HOST_PEER: &str = "zstd -dc | tar -x on the host (tmpfs)";

/// Milestones in the order a target passes them: (label, phase).
const MILESTONES: [(&str, Phase); 8] = [
    ("DHCP lease", Phase::Dhcp),
    ("iPXE script served", Phase::Ipxe),
    ("kernel fetched", Phase::Kernel),
    ("installer running", Phase::Installing),
    ("rootfs streamed", Phase::Rootfs),
    ("installed", Phase::Installed),
    ("booting from disk (firmware reboot)", Phase::LocalBoot),
    ("cloud-init done", Phase::CloudInitDone),
];

pub fn run(ctx: &mut Ctx, group: &mut Group) -> Result<()> {
    process::require_root(
        "benchmarking provisioning",
        "its host-side peer unpacks onto a tmpfs it mounts",
    )?;
    crate::hostdeps::ensure(&targets::LAB_TOOLS)?;
    ctx.stack_dir()?;
    let pulled = ctx.distro(DEBIAN_12)?;
    let rootfs_path = pulled.dir.join(&pulled.manifest.contract.rootfs.file);
    let rootfs_size = pulled.manifest.contract.rootfs.size;
    let dir = ctx.scratch("provision")?;
    let runs = ctx.runs(3, 1);

    let (_, choice, accel_name) = accel(&dir)?;
    group.fact("accel", accel_name);
    group.fact("firmware", "UEFI (OVMF) with the NIC's iPXE ROM");
    group.fact("rootfs", format!("{:.0} MiB zstd", mib(rootfs_size)));

    let mut host = Vec::new();
    for i in 0..runs {
        let at = dir.join(format!("tar-{i}"));
        let _tmpfs = Mount::new("tmpfs", &at, &["-t", "tmpfs", "-o", "size=4g"])?;
        let sh = process::shell()?;
        let script = r#"zstd -dc "$1" | tar -x -C "$2""#;
        let ((), secs) = timed(|| {
            process::output(cmd!(
                sh,
                "bash -o pipefail -c {script} bench {rootfs_path} {at}"
            ))
            .context(HOST_PEER)?;
            Ok(())
        })?;
        host.push(mib(rootfs_size) / secs);
    }

    let home = ctx.lab_home();
    let lab_guard = ctx.lab()?;
    let up = |targets: u32, timeout: u64| UpArgs {
        targets,
        distro: DEBIAN_12.into(),
        arch: Arch::X86_64,
        firmware: Some(qemu::Firmware::Uefi),
        accel: choice,
        subnet: crate::lab::home::DEFAULT_SUBNET.into(),
        stack: Some(StackKind::Process),
        timeout,
        ipv6: false,
    };

    let mut marks: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    let mut ssh = Vec::new();
    let mut plain = Vec::new();
    let mut stream = Vec::new();
    let mut failure = None;
    let mut firmware_marks: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    let mut firmware_ssh = Vec::new();
    let (mut cpu_1, mut cores_1) = (Vec::new(), Vec::new());
    for i in 0..runs {
        ctx.ui.println(format!(
            "bench provision: 1 target, run {}/{runs} ({accel_name})",
            i + 1
        ));
        // A failed run still counts the milestones it reached.
        match one_target(&up(1, 1800)) {
            Ok((m, err)) => {
                for (k, v) in m.milestones.iter().enumerate() {
                    if let Some(v) = v {
                        marks.entry(k).or_default().push(*v);
                    }
                }
                ssh.extend(m.ssh);
                stream.extend(m.rootfs_rate);
                if let (Some(cpu), Some(ssh)) = (m.cpu, m.ssh) {
                    cpu_1.push(cpu);
                    cores_1.push(cpu / ssh);
                }
                failure = err.map(|e| e.context(format!("1 target, run {}", i + 1)));
            }
            Err(e) => failure = Some(e.context(format!("1 target, run {}", i + 1))),
        }
        if failure.is_none() {
            match plain_boot(&home, &up(1, 1800)) {
                Ok(secs) => plain.push(secs),
                Err(e) => failure = Some(e.context(format!("plain boot, run {}", i + 1))),
            }
        }
        lab_guard.down()?;
        if failure.is_some() {
            break;
        }
        ctx.ui.println(format!(
            "bench provision: 1 target rebooting through the firmware (--firmware-reboot), run {}/{runs}",
            i + 1
        ));
        let (m, err) = through_the_firmware(&up(1, 1800))
            .map_err(|e| e.context(format!("--firmware-reboot, run {}", i + 1)))?;
        for (k, v) in m.milestones.iter().enumerate() {
            if let Some(v) = v {
                firmware_marks.entry(k).or_default().push(*v);
            }
        }
        firmware_ssh.extend(m.ssh);
        lab_guard.down()?;
        if let Some(e) = err {
            failure = Some(e.context(format!("--firmware-reboot, run {}", i + 1)));
            break;
        }
    }
    let done = marks.get(&0).map_or(0, Vec::len).max(ssh.len());
    for (k, (label, phase)) in MILESTONES.iter().enumerate() {
        let v = marks.remove(&k).unwrap_or_default();
        let mut row = Row::new(
            format!("1 target: {label}"),
            "s from QEMU start",
            Better::Lower,
            v,
        );
        if row.samples.len() < done {
            let missing = done - row.samples.len();
            row = row.note(format!(
                "no `{phase}` event in {missing} of {done} timelines"
            ));
        }
        group.push(&ctx.ui, row);
    }
    group.push(
        &ctx.ui,
        Row::new(
            "1 target: SSH ready (blank disk: install, then its first boot)",
            "s from QEMU start",
            Better::Lower,
            ssh,
        )
        .peer("the installed target booting its disk again", plain)
        .note("the ratio is what an install costs over a plain boot (goal: at most 1.5x)"),
    );
    // The path through the firmware: the milestones where it differs, and SSH.
    for (k, (label, _)) in MILESTONES.iter().enumerate().skip(5).take(2) {
        let v = firmware_marks.remove(&k).unwrap_or_default();
        let row = Row::new(
            format!("1 target, --firmware-reboot: {label}"),
            "s from QEMU start",
            Better::Lower,
            v,
        );
        group.push(&ctx.ui, row);
    }
    group.push(
        &ctx.ui,
        Row::new(
            "1 target, --firmware-reboot: SSH ready (install, firmware reboot, GRUB, first boot)",
            "s from QEMU start",
            Better::Lower,
            firmware_ssh,
        )
        .note("what starting the installed system directly (the default) saves: compare with the SSH ready row above"),
    );
    group.push(
        &ctx.ui,
        cpu_row("1 target: QEMU CPU time until SSH ready", cpu_1),
    );
    group.push(
        &ctx.ui,
        cores_row("1 target: host cores busy until SSH ready", cores_1),
    );
    group.push(
        &ctx.ui,
        Row::new(
            "rootfs stream rate in the guest (compressed bytes)",
            "MiB/s",
            Better::Higher,
            stream,
        )
        .peer(HOST_PEER, host)
        .note(format!(
            "guest under {accel_name}, host native; the installer also checks sha256"
        )),
    );
    let row = |n: u32, samples: Vec<f64>| {
        Row::new(
            format!("{n} targets at once: all SSH-ready"),
            "s from first QEMU start",
            Better::Lower,
            samples,
        )
    };
    if let Some(e) = failure {
        for n in [2, 4] {
            let skipped = row(n, vec![])
                .note("not run: the single-target install failed (see the error above)");
            group.push(&ctx.ui, skipped);
        }
        return Err(e);
    }

    for n in [2, 4] {
        ctx.ui.println(format!(
            "bench provision: {n} targets at once ({accel_name})"
        ));
        let many = many_targets(&up(n, 3600))?;
        lab_guard.down()?;
        let measured =
            row(n, vec![many.all]).note(format!("SSH ready at {}", many.per_vm.join(", ")));
        group.push(&ctx.ui, measured);
        group.push(
            &ctx.ui,
            cpu_row(
                &format!("{n} targets at once: QEMU CPU time per target until its SSH ready"),
                many.cpu_per_target,
            ),
        );
        group.push(
            &ctx.ui,
            cores_row(
                &format!("{n} targets at once: host cores busy until all SSH-ready"),
                many.cores.into_iter().collect(),
            ),
        );
    }
    Ok(())
}

/// What one single-target run measured.
struct Marks {
    milestones: Vec<Option<f64>>,
    /// `None` when `lab up` failed.
    ssh: Option<f64>,
    rootfs_rate: Option<f64>,
    /// CPU seconds its QEMU had used when SSH answered.
    cpu: Option<f64>,
}

/// One fresh install; also when `lab up` fails, the milestones reached before (and the error).
fn one_target(up: &UpArgs) -> Result<(Marks, Option<anyhow::Error>)> {
    let lab = Lab::open()?;
    let sampler = cpu::start(&lab);
    let result = targets::up(Lab::open()?, up);
    let cpu_series = sampler.finish();
    let (start, timeline) = match qemu_start_ms(&lab, "target-1") {
        Ok(start) => (start, crate::lab::stack::timeline(&lab, "target-1")?),
        Err(e) => return Err(result.err().unwrap_or(e)),
    };
    let (milestones, rootfs_rate) = milestones(&timeline, start);
    let (ssh, err) = match result {
        Ok(rows) => (ssh_secs(&rows, "target-1"), None),
        Err(e) => (None, Some(e)),
    };
    let cpu = ssh.and_then(|s| cpu_series.at("target-1", start + (s * 1000.0) as u64));
    let marks = Marks {
        milestones,
        ssh,
        rootfs_rate,
        cpu,
    };
    Ok((marks, err))
}

/// One fresh install of a target defined with `firmware_reboot` before `lab up` finds it: the
/// installer reboots through the firmware, which is told to boot the disk.
fn through_the_firmware(up: &UpArgs) -> Result<(Marks, Option<anyhow::Error>)> {
    let lab = Lab::open()?;
    lab.create_dirs()?;
    let key = crate::lab::ssh::ensure_key(&lab)?;
    targets::define_target(&lab, &key, "target-1", &up.distro, up.arch, |vm| {
        vm.firmware_reboot = true;
        Ok(())
    })?;
    one_target(up)
}

/// `lab down` (the target shuts down, its disk stays) and `lab up`: seconds from the target's
/// QEMU start to SSH ready, booting its installed disk.
fn plain_boot(home: &std::path::Path, up: &UpArgs) -> Result<f64> {
    crate::lab::down(&Lab::at(home.to_path_buf())?, false)?;
    let rows = targets::up(Lab::open()?, up)?;
    ssh_secs(&rows, "target-1").context("`lab up` returned without target-1's SSH time")
}

/// When `lab up`'s SSH check first succeeded for `name`, in s from its QEMU start.
fn ssh_secs(rows: &[follow::Row], name: &str) -> Option<f64> {
    let row = rows.iter().find(|r| r.name == name)?;
    Some(row.ssh? as f64 / 1000.0)
}

/// CPU seconds a target's QEMU used (all its vCPU and I/O threads) until it answered SSH.
fn cpu_row(figure: &str, samples: Vec<f64>) -> Row {
    Row::new(figure, "CPU-s", Better::Lower, samples)
        .note("user + system time of the QEMU process, from /proc")
}

/// QEMU CPU seconds over wall seconds: how many of the host's cores emulation kept busy.
fn cores_row(figure: &str, samples: Vec<f64>) -> Row {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    Row::new(figure, "cores", Better::Higher, samples).note(format!(
        "QEMU CPU-s / s from the first QEMU start; the host has {cores}: at {cores}, the targets \
         are as fast as the cores can emulate them"
    ))
}

/// What `up.targets` targets started together took.
struct Many {
    /// Seconds from the first QEMU start until the last answered SSH.
    all: f64,
    /// When each answered ("target-1 95 s").
    per_vm: Vec<String>,
    /// Each target's QEMU CPU seconds until it answered SSH.
    cpu_per_target: Vec<f64>,
    /// All QEMUs' CPU seconds when the last answered, over `all`.
    cores: Option<f64>,
}

fn many_targets(up: &UpArgs) -> Result<Many> {
    let lab = Lab::open()?;
    let sampler = cpu::start(&lab);
    let rows = targets::up(Lab::open()?, up);
    let series = sampler.finish();
    let ready = ready_times(&lab, &rows?)?;
    let (all, per_vm) = spread(&ready);
    let last = ready.iter().map(|r| r.2).max().unwrap_or_default();
    let cpu_per_target = ready
        .iter()
        .filter_map(|(vm, _, at)| series.at(vm, *at))
        .collect();
    let total: Option<f64> = ready.iter().map(|(vm, _, _)| series.at(vm, last)).sum();
    let cores = total.filter(|_| all > 0.0).map(|cpu| cpu / all);
    Ok(Many {
        all,
        per_vm,
        cpu_per_target,
        cores,
    })
}

/// Seconds from the first QEMU start of `rows`' VMs until the last answered SSH, and when each
/// did ("target-1 95 s").
pub(super) fn all_ssh_ready(lab: &Lab, rows: &[follow::Row]) -> Result<(f64, Vec<String>)> {
    Ok(spread(&ready_times(lab, rows)?))
}

/// (name, QEMU start, SSH answered) in Unix ms for each of `rows`.
fn ready_times(lab: &Lab, rows: &[follow::Row]) -> Result<Vec<(String, u64, u64)>> {
    let mut ready = Vec::new();
    for row in rows {
        let start = qemu_start_ms(lab, &row.name)?;
        let ssh = row
            .ssh
            .with_context(|| format!("no SSH time for {}", row.name))?;
        ready.push((row.name.clone(), start, start + ssh));
    }
    Ok(ready)
}

/// (name, started, ready) in Unix ms → seconds from the first start to the last ready, and
/// each one's ready time from that first start.
fn spread(ready: &[(String, u64, u64)]) -> (f64, Vec<String>) {
    let first = ready.iter().map(|r| r.1).min().unwrap_or(0);
    let last = ready.iter().map(|r| r.2).max().unwrap_or(first);
    let per_vm = ready
        .iter()
        .map(|(name, _, at)| format!("{name} {:.0} s", at.saturating_sub(first) as f64 / 1000.0))
        .collect();
    (last.saturating_sub(first) as f64 / 1000.0, per_vm)
}

/// The accelerator QEMU gets here (KVM when usable), as `lab up` is told it, and its name.
pub(super) fn accel(
    scratch: &std::path::Path,
) -> Result<(qemu::Accel, qemu::AccelChoice, &'static str)> {
    Ok(
        match qemu::resolve_accel(qemu::AccelChoice::Auto, Arch::X86_64, scratch)? {
            qemu::Accel::Kvm => (qemu::Accel::Kvm, qemu::AccelChoice::Kvm, "kvm"),
            qemu::Accel::Tcg => (qemu::Accel::Tcg, qemu::AccelChoice::Tcg, "tcg"),
        },
    )
}

/// When QEMU started: its pid file's mtime (what `lab up` measures from too).
pub(super) fn qemu_start_ms(lab: &Lab, vm: &str) -> Result<u64> {
    let pidfile = lab.vm_file(vm, VmFile::Pid);
    let t = std::fs::metadata(&pidfile)
        .and_then(|m| m.modified())
        .with_context(|| format!("reading {}", pidfile.display()))?;
    Ok(t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0))
}

/// Seconds from `start` to the first event of each milestone (the end of the rootfs phase for
/// "rootfs streamed", the disk boot after the install), and the guest's rootfs rate in MiB/s.
fn milestones(timeline: &[TimelineEntry], start: u64) -> (Vec<Option<f64>>, Option<f64>) {
    let recent: Vec<&TimelineEntry> = timeline.iter().filter(|e| e.at_ms >= start).collect();
    let secs = |e: &TimelineEntry| e.at_ms.saturating_sub(start) as f64 / 1000.0;
    let installed_at = recent
        .iter()
        .find(|e| e.event.phase == Phase::Installed)
        .map(|e| e.at_ms);
    let rootfs_done = recent
        .iter()
        .find(|e| e.event.phase == Phase::Rootfs && e.event.duration_ms.is_some());
    let marks = MILESTONES
        .iter()
        .map(|(_, phase)| match phase {
            Phase::Rootfs => rootfs_done.map(|e| secs(e)),
            Phase::LocalBoot => recent
                .iter()
                .find(|e| {
                    e.event.phase == Phase::LocalBoot && installed_at.is_some_and(|t| e.at_ms >= t)
                })
                .map(|e| secs(e)),
            p => recent.iter().find(|e| e.event.phase == *p).map(|e| secs(e)),
        })
        .collect();
    // The phase's closing event carries its duration; the byte count is on the progress events.
    let bytes = recent
        .iter()
        .filter(|e| e.event.phase == Phase::Rootfs)
        .filter_map(|e| e.event.bytes_total)
        .max();
    let rate = rootfs_done.and_then(|e| {
        let ms = e.event.duration_ms.filter(|ms| *ms > 0)?;
        Some(mib(bytes?) / (ms as f64 / 1000.0))
    });
    (marks, rate)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pxelab_contract::Event;

    fn at(ms: u64, phase: Phase, duration_ms: Option<u64>, bytes: Option<u64>) -> TimelineEntry {
        TimelineEntry {
            at_ms: ms,
            event: Event {
                phase,
                duration_ms,
                bytes_total: bytes,
                ..Event::default()
            },
        }
    }

    #[test]
    fn milestones_are_relative_to_qemu_start_and_ignore_older_history() {
        let tl = vec![
            at(500, Phase::Ipxe, None, None),
            at(1_000, Phase::LocalBoot, None, None),
            at(12_000, Phase::Dhcp, None, None),
            at(13_000, Phase::Ipxe, None, None),
            at(13_500, Phase::Kernel, None, None),
            at(20_000, Phase::Installing, None, None),
            at(25_000, Phase::Rootfs, None, Some(100 << 20)),
            at(30_000, Phase::Rootfs, Some(10_000), None),
            at(40_000, Phase::Installed, Some(20_000), None),
            at(55_000, Phase::LocalBoot, None, None),
            at(70_000, Phase::CloudInitDone, None, None),
        ];
        let (m, rate) = milestones(&tl, 10_000);
        assert_eq!(
            m,
            vec![
                Some(2.0),
                Some(3.0),
                Some(3.5),
                Some(10.0),
                Some(20.0),
                Some(30.0),
                Some(45.0),
                Some(60.0)
            ]
        );
        assert_eq!(rate, Some(10.0));
    }

    #[test]
    fn all_ready_counts_from_the_first_start_to_the_last_answer() {
        let ready = [
            ("t-1".to_string(), 10_000, 100_000),
            ("t-2".to_string(), 11_000, 130_400),
        ];
        let (all, per_vm) = spread(&ready);
        assert_eq!(all, 120.4);
        assert_eq!(per_vm, ["t-1 90 s", "t-2 120 s"]);
    }
}
