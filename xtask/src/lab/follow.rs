//! Following targets from the stack's timelines: live progress (one line per VM), the wait for
//! "installed, rebooted from disk, answering SSH", and the summary table.

use std::{
    collections::BTreeMap,
    io::IsTerminal,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use pxelab_contract::{Phase, StackStatus, TimelineEntry, VmDefinition, VmState, VmStatus};

use super::{
    home::{Lab, VmFile},
    ssh, stack,
};
use crate::process::pid;

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The stack's `GET /status`: every valid VM's state and every definition file it rejects.
pub fn fetch_status(lab: &Lab) -> Result<StackStatus> {
    let (code, body) = stack::get(lab, "/status")?;
    if code != 200 {
        bail!("GET /status answered {code}: {}", body.trim());
    }
    serde_json::from_str(&body).context("parsing /status")
}

/// "installing: rootfs 120.0 MiB/170.0 MiB" — a VM's state and last event in one phrase.
pub fn describe(s: &VmStatus) -> String {
    let state = format!("{:?}", s.state).to_lowercase();
    match &s.last_event {
        Some(e) => format!("{state}: {}", phase_line(&e.event)),
        None => state,
    }
}

fn phase_line(e: &pxelab_contract::Event) -> String {
    let mut line = e.phase.to_string();
    if let (Some(done), Some(total)) = (e.bytes_done, e.bytes_total) {
        line += &format!(
            " {}/{}",
            crate::util::human_bytes(done),
            crate::util::human_bytes(total)
        );
    }
    if !e.message.is_empty() {
        line += &format!(" ({})", e.message);
    }
    line
}

/// Milestones of one target, in ms since its QEMU started.
#[derive(Clone, Debug, Default)]
pub struct Row {
    pub name: String,
    pub ip: String,
    pub mac: String,
    pub distro: String,
    /// First DHCP lease (from dnsmasq's log).
    pub dhcp: Option<u64>,
    /// First `/ipxe` answer: iPXE running.
    pub ipxe: Option<u64>,
    /// The installer kernel fetched.
    pub kernel: Option<u64>,
    /// Installer reported in: kernel and initrd loaded and booted.
    pub installer: Option<u64>,
    pub installed: Option<u64>,
    /// The stack told the rebooted VM to boot its disk.
    pub local_boot: Option<u64>,
    /// A diskless VM mounted its root.
    pub nfs_root: Option<u64>,
    pub ssh: Option<u64>,
    /// The target reported cloud-init done.
    pub cloud_init: Option<u64>,
    /// How the installer started the installed system without a firmware reboot: `switch
    /// root` (on the running kernel); None when it rebooted (or has not finished).
    pub direct: Option<&'static str>,
    /// A disk-mode VM: its own system from the first instruction, no events, SSH is all.
    pub disk_mode: bool,
}

impl Row {
    /// The VM runs its own system (from its disk, started directly by the installer, or its NFS
    /// root): SSH is next.
    fn booted(&self) -> bool {
        self.local_boot.is_some() && (self.installed.is_some() || self.installer.is_none())
            || self.direct.is_some() && self.installed.is_some()
            || self.nfs_root.is_some()
            || self.disk_mode
    }

    /// SSH answers, and an installed system has also reported cloud-init done (the installer
    /// put the reporter there; a diskless root has none, so SSH is its last milestone).
    fn done(&self) -> bool {
        self.ssh.is_some()
            && (self.cloud_init.is_some() || self.nfs_root.is_some() || self.disk_mode)
    }

    /// Takes this boot's milestones (events at or after `started_ms`, Unix ms) from `timeline`.
    pub fn absorb(&mut self, started_ms: u64, timeline: &[TimelineEntry]) {
        let rel = |e: &TimelineEntry| e.at_ms.saturating_sub(started_ms);
        // Only this boot's events count: a reused VM's older history is before `started_ms`.
        let recent = timeline.iter().filter(|e| e.at_ms >= started_ms);
        for e in recent {
            match e.event.phase {
                Phase::Dhcp => {
                    self.dhcp.get_or_insert(rel(e));
                }
                Phase::Ipxe => {
                    self.ipxe.get_or_insert(rel(e));
                }
                Phase::Kernel => {
                    self.kernel.get_or_insert(rel(e));
                }
                Phase::Installing => {
                    self.installer.get_or_insert(rel(e));
                }
                Phase::Installed => {
                    self.installed.get_or_insert(rel(e));
                    // The installer's message says what it does next (main.rs of the installer).
                    self.direct = e
                        .event
                        .message
                        .contains("next: switch root")
                        .then_some("switch root");
                }
                Phase::CloudInitDone => {
                    self.cloud_init.get_or_insert(rel(e));
                }
                Phase::LocalBoot if self.installed.is_some() || self.installer.is_none() => {
                    self.local_boot.get_or_insert(rel(e));
                }
                Phase::NfsRoot => {
                    self.nfs_root.get_or_insert(rel(e));
                }
                _ => {}
            }
        }
    }
}

/// Waits until every VM is installed, rebooted from its disk and answers SSH with `hostname`
/// equal to its name; shows progress meanwhile. `started` maps VM name → QEMU start (Unix ms).
pub fn wait_all(
    lab: &Lab,
    vms: &[VmDefinition],
    started: &BTreeMap<String, u64>,
    timeout: Duration,
) -> Result<Vec<Row>> {
    let tty = std::io::stderr().is_terminal();
    let multi = MultiProgress::with_draw_target(if tty {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    let style = ProgressStyle::with_template("{prefix:12!} {elapsed:>4} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner());
    let mut rows: Vec<Row> = vms
        .iter()
        .map(|vm| Row {
            name: vm.name.clone(),
            ip: vm.ip.map(|i| i.to_string()).unwrap_or_default(),
            mac: vm.mac.to_string(),
            distro: vm.distro.clone(),
            disk_mode: super::diskmode::direct_boot(lab, vm).is_ok_and(|d| d.is_some()),
            ..Row::default()
        })
        .collect();
    let bars: Vec<ProgressBar> = vms
        .iter()
        .map(|vm| {
            let bar = multi.add(ProgressBar::new_spinner());
            bar.set_style(style.clone());
            bar.set_prefix(vm.name.clone());
            bar.enable_steady_tick(Duration::from_millis(250));
            bar
        })
        .collect();
    let deadline = Instant::now() + timeout;
    // Only what the consoles print from now on tells about this boot.
    let console_start: BTreeMap<String, u64> = vms
        .iter()
        .map(|vm| {
            let len = std::fs::metadata(lab.vm_file(&vm.name, VmFile::Console))
                .map(|m| m.len())
                .unwrap_or(0);
            (vm.name.clone(), len)
        })
        .collect();
    let mut booted_at: BTreeMap<String, Instant> = BTreeMap::new();
    let mut last_line: BTreeMap<String, String> = BTreeMap::new();
    let mut probes = SshProbes::default();
    loop {
        let stack_status = fetch_status(lab).unwrap_or_default();
        let mut pending = 0;
        for ((vm, row), bar) in vms.iter().zip(rows.iter_mut()).zip(&bars) {
            if row.done() {
                continue;
            }
            pending += 1;
            let start = started[&vm.name];
            if let Ok(tl) = stack::timeline(lab, &vm.name) {
                row.absorb(start, &tl);
            }
            // The stack ignores a file it rejects: no lease, no boot, nothing to wait for.
            let file = format!("{}.json", vm.name);
            if let Some(bad) = stack_status.invalid.iter().find(|i| i.file == file) {
                bail!(
                    "the stack rejects {}'s definition (vms/{file}): {}",
                    vm.name,
                    bad.error
                );
            }
            let status = stack_status.vms.iter().find(|s| s.name == vm.name);
            // A failure recorded before this boot (e.g. the last `lab up`) is history, not news.
            let failed_now = |s: &&VmStatus| {
                s.state == VmState::Failed
                    && s.last_event.as_ref().is_some_and(|e| e.at_ms >= start)
            };
            if let Some(s) = status.filter(failed_now) {
                bail!(
                    "{} failed: {}\n{}",
                    vm.name,
                    describe(s),
                    console_tail(lab, &vm.name)
                );
            }
            if pid::read(&lab.vm_file(&vm.name, VmFile::Pid)).is_none() {
                bail!(
                    "QEMU of {} is not running any more\n{}",
                    vm.name,
                    console_tail(lab, &vm.name)
                );
            }
            let line = if row.booted() {
                let booted = *booted_at
                    .entry(vm.name.clone())
                    .or_insert_with(Instant::now);
                let console = console_since(lab, &vm.name, console_start[&vm.name]);
                let over = row
                    .ssh
                    .is_none()
                    .then(|| ssh_wait_over(vm, booted.elapsed(), &console));
                if let Some(Some((why, fix))) = over {
                    bail!("{}: {why}\n{}\n{fix}", vm.name, console_tail(lab, &vm.name));
                }
                if row.ssh.is_none() {
                    probes.start(lab, vm);
                    if let Some((at_ms, host)) = probes.answer(&vm.name) {
                        if host != vm.guest_hostname() {
                            bail!("{} answers SSH but its hostname is {host:?}: cloud-init did not apply the seed", vm.name);
                        }
                        row.ssh = Some(at_ms.saturating_sub(start));
                    }
                }
                if row.done() {
                    done_message(row).to_string()
                } else if row.ssh.is_some() {
                    "SSH ready, waiting for cloud-init".to_string()
                } else if row.nfs_root.is_some() {
                    "NFS root mounted, waiting for SSH".to_string()
                } else if row.disk_mode {
                    "booting its disk image, waiting for SSH".to_string()
                } else if let (Some(how), None) = (row.direct, row.local_boot) {
                    format!("started the installed system ({how}), waiting for SSH")
                } else {
                    "booted from disk, waiting for SSH".to_string()
                }
            } else {
                status
                    .map(describe)
                    .unwrap_or_else(|| "waiting for DHCP/iPXE".into())
            };
            if last_line.get(&vm.name) != Some(&line) {
                if !tty {
                    eprintln!(
                        "{:<12} {:>6.1}s {line}",
                        vm.name,
                        now_ms().saturating_sub(start) as f64 / 1000.0
                    );
                }
                bar.set_message(line.clone());
                last_line.insert(vm.name.clone(), line);
            }
            if row.done() {
                bar.finish_with_message(done_message(row));
            }
        }
        if pending == 0 || rows.iter().all(Row::done) {
            return Ok(rows);
        }
        if Instant::now() > deadline {
            let late: Vec<_> = rows
                .iter()
                .filter(|r| !r.done())
                .map(|r| r.name.clone())
                .collect();
            let detail: Vec<String> = late
                .iter()
                .map(|n| format!("{n}: {}", last_line.get(n).cloned().unwrap_or_default()))
                .collect();
            bail!(
                "timed out after {timeout:?} waiting for {}\n{}\n{}",
                late.join(", "),
                detail.join("\n"),
                late.iter()
                    .map(|n| console_tail(lab, n))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(1000));
    }
}

/// SSH attempts toward booted VMs, one thread each, retried every half second until one
/// succeeds. Polled every 3 s from the follow loop, SSH was reported up to 4.5 s after the
/// target's sshd listened (measured); and a connect to an address that is not up yet waits
/// for ARP, which held up every other VM's progress line too.
#[derive(Default)]
struct SshProbes {
    stop: Arc<AtomicBool>,
    answers: BTreeMap<String, mpsc::Receiver<(u64, String)>>,
}

impl SshProbes {
    /// Starts probing `vm` unless that has started: the answer is its host name and when.
    fn start(&mut self, lab: &Lab, vm: &VmDefinition) {
        if self.answers.contains_key(&vm.name) {
            return;
        }
        let (tx, rx) = mpsc::channel();
        self.answers.insert(vm.name.clone(), rx);
        let (lab, vm, stop) = (lab.clone(), vm.clone(), self.stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let answer = ssh::command(&lab, &vm, &["hostname".to_string()])
                    .and_then(|c| ssh::output_within(c, Duration::from_secs(20)));
                if let Some(out) = answer.ok().filter(|o| o.status.success()) {
                    let host = String::from_utf8_lossy(&out.stdout).trim().to_string();
                    let _ = tx.send((now_ms(), host));
                    return;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        });
    }

    fn answer(&self, name: &str) -> Option<(u64, String)> {
        self.answers.get(name)?.try_recv().ok()
    }
}

impl Drop for SshProbes {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// How long a VM that has booted its own system may take to answer SSH: a first boot from
/// disk took 46 s under TCG here and a diskless one ~130 s, two to three times as long on a
/// busy machine.
pub const SSH_WAIT: Duration = Duration::from_secs(600);

/// Why waiting for SSH on `vm`, which booted its system `waited` ago, is over, and what to do
/// about it, if it is: the console (what it printed since the wait began) shows its kernel
/// panicking or sshd failing to start, or the wait passed [`SSH_WAIT`].
fn ssh_wait_over(vm: &VmDefinition, waited: Duration, console: &str) -> Option<(String, String)> {
    let name = &vm.name;
    let restart = format!("`cargo xtask lab vm stop {name} && cargo xtask lab vm start {name}`");
    let attach = format!("`cargo xtask lab vm console {name}` attaches to its console");
    let ssh_fix = match vm.boot {
        pxelab_contract::BootMode::Nfsroot => {
            format!("{attach}; a diskless VM starts afresh at every boot: {restart}")
        }
        pxelab_contract::BootMode::Install => format!(
            "{attach}; if its disk lost its SSH host keys (e.g. to a power cut right after the first boot), install it again: `cargo xtask lab vm reprovision {name} && cargo xtask lab vm start {name}`"
        ),
    };
    let line = |found: &str| {
        found
            .trim()
            .trim_start_matches("[FAILED]")
            .trim()
            .to_string()
    };
    if let Some(panic) = console
        .lines()
        .find(|l| l.contains("Kernel panic - not syncing"))
    {
        let why = format!("its kernel panicked (console: {:?})", line(panic));
        return Some((why, format!("start it again: {restart}")));
    }
    let failed = console.lines().find(|l| {
        l.contains("Failed to start")
            && (l.contains("ssh.service") || l.contains("OpenBSD Secure Shell"))
    });
    if let Some(failed) = failed {
        let why = format!(
            "its SSH server failed to start (console: {:?})",
            line(failed)
        );
        return Some((why, ssh_fix));
    }
    (waited > SSH_WAIT).then(|| {
        let why = format!(
            "booted {} s ago but SSH does not answer (the lab gives it {} s)",
            waited.as_secs(),
            SSH_WAIT.as_secs()
        );
        (why, ssh_fix)
    })
}

/// What `name`'s console printed after its first `from` bytes (lossy UTF-8).
fn console_since(lab: &Lab, name: &str, from: u64) -> String {
    let bytes = std::fs::read(lab.vm_file(name, VmFile::Console)).unwrap_or_default();
    let from = usize::try_from(from).unwrap_or(usize::MAX).min(bytes.len());
    String::from_utf8_lossy(&bytes[from..]).into_owned()
}

/// The last lines of a VM's serial console, for error reports.
pub fn console_tail(lab: &Lab, name: &str) -> String {
    let path = lab.vm_file(name, VmFile::Console);
    let text = std::fs::read(&path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(25)..].join("\n");
    format!(
        "--- last console lines of {name} ({}) ---\n{tail}",
        path.display()
    )
}

/// The summary table; times are seconds since the VM's QEMU started (SSH = total).
pub fn print_summary(rows: &[Row]) {
    let s = |v: Option<u64>| {
        v.map(|ms| format!("{:.1}s", ms as f64 / 1000.0))
            .unwrap_or_else(|| "-".into())
    };
    println!(
        "{:<12} {:<15} {:<18} {:<10} {:>7} {:>7} {:>7} {:>10} {:>10} {:>11} {:>8} {:>10}",
        "VM",
        "IP",
        "MAC",
        "DISTRO",
        "DHCP",
        "IPXE",
        "KERNEL",
        "INSTALLER",
        "INSTALLED",
        "DISK BOOT",
        "SSH",
        "CLOUD-INIT"
    );
    for r in rows {
        println!(
            "{:<12} {:<15} {:<18} {:<10} {:>7} {:>7} {:>7} {:>10} {:>10} {:>11} {:>8} {:>10}",
            r.name,
            r.ip,
            r.mac,
            r.distro,
            s(r.dhcp),
            s(r.ipxe),
            s(r.kernel),
            s(r.installer),
            s(r.installed),
            if let Some(how) = r.direct {
                how.to_string()
            } else {
                s(r.local_boot)
            },
            s(r.ssh),
            s(r.cloud_init)
        );
    }
}

/// What a finished target's line says: cloud-init's report is part of being done where the
/// target sends one (an installed disk), not where it cannot (a diskless root).
fn done_message(row: &Row) -> &'static str {
    if row.cloud_init.is_some() {
        "SSH ready, cloud-init done"
    } else {
        "SSH ready"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ssh_wait_ends_when_the_console_says_why_or_after_its_bound() {
        let vm = VmDefinition::from_json(
            r#"{"name":"t-1","arch":"x86_64","distro":"debian-12","mac":"0a:00:00:00:00:01","pxeboot":true}"#,
        )
        .unwrap();
        let quiet = "[  OK  ] Reached target Multi-User System.\r\n";
        assert_eq!(ssh_wait_over(&vm, Duration::from_secs(30), quiet), None);
        let (why, fix) = ssh_wait_over(&vm, SSH_WAIT + Duration::from_secs(1), quiet).unwrap();
        assert!(why.contains("SSH does not answer"), "{why}");
        assert!(
            fix.contains("lab vm reprovision t-1 && cargo xtask lab vm start t-1"),
            "{fix}"
        );
        // What systemd prints when the host keys are empty files (seen after a power cut).
        let failed = "[FAILED] Failed to start ssh.service - OpenBSD Secure Shell server.\r\n";
        let (why, _) = ssh_wait_over(&vm, Duration::from_secs(5), failed).unwrap();
        assert!(
            why.contains("failed to start") && why.contains("Failed to start ssh.service"),
            "{why}"
        );
        // Seen under TCG on a loaded machine: the kernel's timer check fails at boot.
        let panic = "[    0.056000] Kernel panic - not syncing: IO-APIC + timer doesn't work!\r\n";
        let (why, fix) = ssh_wait_over(&vm, Duration::from_secs(5), panic).unwrap();
        assert!(
            why.contains("kernel panicked") && why.contains("IO-APIC"),
            "{why}"
        );
        assert!(
            fix.contains("lab vm stop t-1 && cargo xtask lab vm start t-1"),
            "{fix}"
        );
        let diskless = VmDefinition {
            boot: pxelab_contract::BootMode::Nfsroot,
            ..vm
        };
        let (_, fix) = ssh_wait_over(&diskless, SSH_WAIT * 2, quiet).unwrap();
        assert!(
            fix.contains("lab vm stop t-1 && cargo xtask lab vm start t-1"),
            "{fix}"
        );
    }

    /// The installer's `installed` message says how it starts the installed system; a row that
    /// read it waits for SSH without a firmware boot, and its DISK BOOT column says which way.
    #[test]
    fn the_installed_message_says_how_the_system_starts() {
        let installed = |next: &str| TimelineEntry {
            at_ms: 5_000,
            event: pxelab_contract::Event {
                phase: Phase::Installed,
                message: format!("installed in 9.0 s (final sync and unmount 0.1 s); next: {next}"),
                ..Default::default()
            },
        };
        for (next, direct) in [
            (
                "switch root into 6.1.0-57-cloud-amd64 (the running kernel)",
                Some("switch root"),
            ),
            ("reboot", None),
            (
                "reboot (the installed kernel 6.1.0-58-cloud-amd64 is not the running 6.1.0-57-cloud-amd64)",
                None,
            ),
        ] {
            let mut row = Row::default();
            row.absorb(1_000, &[installed(next)]);
            assert_eq!(row.direct, direct, "{next}");
            assert_eq!(row.installed, Some(4_000));
            assert_eq!(row.booted(), direct.is_some(), "{next}");
        }
    }
}
