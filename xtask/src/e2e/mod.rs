//! `cargo xtask e2e`: the lab end to end, as root under TCG, in a throw-away lab home.
//!
//! 1. `lab vm create` (the command itself) refuses a bad MAC and a duplicate IP, naming them,
//!    and writes nothing.
//! 2. `lab up --targets 1 --distro debian-12` (UEFI with the NIC's iPXE ROM, stack as a process)
//!    while, in the middle of the rootfs stream, the stack is swapped for its container image
//!    (`lab stack reload --image`): the install still completes (the installer reconnected),
//!    the target switches root into its installed system on the installer's kernel (no second
//!    boot, no fetching the installer again), answers SSH with
//!    the lab key before cloud-init is done, reports its own name as hostname, and cloud-init
//!    then applies the user-data and reports done (`firstboot.rs`). The lab is up with
//!    `--ipv6`: target-1's AAAA name resolves to its IPv6 address and SSH answers there. The lab namespace has no
//!    route out.
//! 3. `lab down` right after that first boot (target-1 shuts down by ACPI, not a power cut)
//!    and `lab up` again: target-1 boots from its disk and answers SSH (over IPv6 too: the lab
//!    kept `--ipv6`); `lab status` says so.
//!    `update-grub` in target-1 and a power cycle through the firmware: it boots its disk again.
//!    `lab vm copy` copies a file to it and back. `lab vm start --installer-shell --no-reboot`
//!    boots its installer's shell (the config says not to reboot, `lab status` says SSH is
//!    down), and a command typed through `lab vm console` answers on the serial console.
//! 4. On that container stack (`firmware.rs`): bios-1, made by `lab vm create --firmware-reboot`,
//!    installs under SeaBIOS (QEMU's iPXE NIC ROM), reboots through the firmware, is sent to its
//!    disk and boots GRUB's i386-pc image into SSH with its own host name; OVMF without NIC ROM
//!    → TFTP ipxe.efi reaches "installer started"; meanwhile (and during 5.) disk-1
//!    (`--disk-mode`) boots an overlay of the distro's `rootfs.img` with its seed disk and
//!    answers SSH (`diskmode.rs`).
//! 5. Two diskless targets boot Debian 13 from one read-only NFS export served by the
//!    container's ganesha (see `diskless.rs`).
//! 6. proxyDHCP on Debian 13 (`proxy.rs`): the stack restarted with `--dhcp proxy` beside a
//!    site DHCP server on the bridge; proxy-1, defined without an address, installs Debian 13,
//!    answers SSH with its own host name on the address the site server leased it, and reports
//!    cloud-init done.
//! 7. `lab down` leaves no namespace, container or process behind (QEMU, stack, dnsmasq,
//!    ganesha).

mod diskless;
mod diskmode;
mod firmware;
mod firstboot;
mod proxy;

use std::{
    io::{Read, Write},
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use pxelab_contract::{Arch, Phase};
use sha2::Digest;

use crate::{
    lab::{
        self, follow,
        home::{Lab, StackKind, VmFile},
        qemu, ssh, stack, targets, UpArgs,
    },
    process::{self, pid},
};

#[derive(clap::Args)]
pub struct Args {
    /// Keep the lab home (and stop nothing) when a step fails, for debugging.
    #[arg(long)]
    keep: bool,
    /// Distro to install.
    #[arg(long, default_value = "debian-12")]
    distro: String,
    /// Run only these parts (repeatable, while debugging); the default runs all of them.
    #[arg(long, value_enum)]
    only: Vec<Part>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Part {
    /// `lab vm create`'s refusals only (no stack, no VM).
    Definitions,
    Install,
    Firmware,
    Diskless,
    /// A VM booting a copy-on-write overlay of the distro's disk image (`--disk-mode`).
    DiskMode,
    /// A Debian 13 target without an address of ours installed beside a site DHCP server
    /// (proxyDHCP).
    Proxy,
}

pub fn run(args: Args) -> Result<()> {
    process::require_root(
        "the end-to-end test",
        "it runs the container stack and diskless targets",
    )?;
    // Made atomically, 0700, with a random suffix: a predictable name in the shared temp dir
    // could be made first by another user. The pid in the name lets a test find it.
    let home = tempfile::Builder::new()
        .prefix(&format!("pxelab-e2e-{}-", std::process::id()))
        .tempdir()
        .context("making the e2e's lab home in the temp dir")?
        .keep();
    // SAFETY (edition 2021: set_var is safe): single-threaded at this point.
    std::env::set_var("PXELAB_HOME", &home);
    let guard = Teardown {
        home: home.clone(),
        keep: args.keep,
        armed: true,
    };
    lab::down_on_interrupt(home.clone(), args.keep)?;
    let started = Instant::now();
    let result = scenario(&args.distro, &args.only);
    match &result {
        Ok(()) => eprintln!("e2e: passed in {:.0}s", started.elapsed().as_secs_f64()),
        Err(e) => eprintln!(
            "e2e: FAILED after {:.0}s: {e:#}",
            started.elapsed().as_secs_f64()
        ),
    }
    let clean = guard.finish(result.is_ok());
    result.and(clean)
}

fn scenario(distro: &str, only: &[Part]) -> Result<()> {
    let runs = |part: Part| only.is_empty() || only.contains(&part);
    step("`lab vm create` refuses bad definitions and changes nothing");
    rejects_bad_definitions()?;
    if only == [Part::Definitions] {
        return Ok(());
    }

    let up = UpArgs {
        targets: if runs(Part::Install) { 1 } else { 0 },
        distro: distro.to_string(),
        arch: Arch::X86_64,
        firmware: Some(qemu::Firmware::Uefi),
        accel: qemu::AccelChoice::Auto,
        subnet: lab::home::DEFAULT_SUBNET.into(),
        stack: Some(StackKind::Process),
        timeout: 1500,
        // The installed target's SSH over IPv6 is checked after its first boot.
        ipv6: runs(Part::Install),
    };
    if runs(Part::Install) {
        step("lab up: install target-1 (UEFI); mid-stream the stack is swapped for its container image");
        install_with_restart(&up)?;
    } else {
        step("lab up: the stack only");
        targets::up(Lab::open()?, &up)?;
    }
    let lab = Lab::open()?;
    if let Some(route) = lab.net()?.route_out()? {
        bail!("the lab namespace has a route out of the lab: {route}");
    }
    if runs(Part::Install) {
        step("lab down right after target-1's first boot, lab up: it boots from its disk and answers SSH");
        down_and_up_keeps_ssh(&up)?;
        step("update-grub inside target-1, then a power cycle through the firmware: it boots its disk again");
        firstboot::update_grub_and_reboot(&lab)?;
        step("lab vm copy: a file to target-1 and back");
        copies_both_ways(&lab)?;
        step("lab vm start --installer-shell --no-reboot: a command typed into target-1's serial console");
        types_into_the_installer_shell(&lab)?;
    }
    let distro = crate::distro::canonical_name(distro)?;
    std::thread::scope(|s| -> Result<()> {
        let disk = runs(Part::DiskMode).then(|| {
            step("disk-1 (--disk-mode) boots its overlay of the distro's image: SSH, no PXE");
            s.spawn(|| diskmode::scenario(&lab, &distro))
        });
        if runs(Part::Firmware) {
            step("bios-1 (--firmware-reboot) under SeaBIOS installs, reboots through the firmware into GRUB's i386-pc boot and answers SSH");
            firmware::installs_and_reboots_through_bios(&lab, &distro)?;
            step("uefipxe-1: OVMF without NIC ROM reaches the installer through TFTP ipxe.efi");
            firmware::reaches_installer(&lab, "uefipxe-1", &distro, qemu::Firmware::UefiPxe)?;
        }
        if runs(Part::Diskless) {
            step("diskless-1 and diskless-2 boot Debian 13 from one read-only NFS export");
            let diskless = lab::artifacts::prepare(&lab, Arch::X86_64, diskless::DISTRO)?;
            diskless::scenario(&lab, &diskless)?;
        }
        match disk.map(|h| h.join()) {
            Some(Err(_)) => bail!("the disk-mode part panicked"),
            Some(Ok(r)) => r,
            None => Ok(()),
        }
    })?;
    if runs(Part::Proxy) {
        step("proxy-1: the stack in proxyDHCP mode beside a site DHCP server; Debian 13 installs, answers SSH on the site's lease and finishes cloud-init");
        proxy::scenario()?;
    }
    Ok(())
}

fn install_with_restart(up: &UpArgs) -> Result<()> {
    let restarted = AtomicBool::new(false);
    let done = AtomicBool::new(false);
    std::thread::scope(|s| -> Result<()> {
        let chaos = s.spawn(|| restart_during_stream(&done, &restarted));
        let result = targets::up(Lab::open()?, up).map(drop);
        done.store(true, Ordering::SeqCst);
        chaos
            .join()
            .map_err(|_| anyhow::anyhow!("the restart thread panicked"))??;
        result
    })?;
    ensure!(
        restarted.load(Ordering::SeqCst),
        "the stack was never restarted during the rootfs stream: the fault was not injected"
    );
    let lab = Lab::open()?;
    ensure!(
        lab.config.stack == StackKind::Container,
        "after `reload --image` the lab should run a container stack, not {:?}",
        lab.config.stack
    );
    let hostname = ssh_output(&lab, "target-1", "hostname")?;
    ensure!(
        hostname == "target-1",
        "hostname is {hostname:?}, expected target-1 (cloud-init seed not applied)"
    );
    firstboot::checks(&lab)?;
    firstboot::ssh_over_ipv6(&lab)
}

fn step(what: &str) {
    eprintln!("\n==> e2e: {what}");
}

/// `lab vm create` as a user runs it: a good VM is written, a bad MAC and a duplicate IP are
/// refused with errors naming them, and a refusal writes nothing (definitions or disks).
fn rejects_bad_definitions() -> Result<()> {
    let lab = Lab::open()?;
    xtask_ok(&[
        "lab",
        "vm",
        "create",
        "keep-1",
        "--ip",
        "10.77.0.50",
        "--disk-size",
        "1G",
    ])?;
    ensure!(
        lab.vm_file("keep-1", VmFile::Definition).exists()
            && lab.vm_file("keep-1", VmFile::Disk).exists(),
        "`lab vm create keep-1` wrote no definition or disk"
    );
    let before = (snapshot(&lab.vms_dir())?, snapshot(&lab.disks_dir())?);
    for (args, names) in [
        (
            ["bad-mac", "--mac", "52:54:00:zz:00:01"],
            "52:54:00:zz:00:01",
        ),
        (["dup-ip", "--ip", "10.77.0.50"], "keep-1"),
    ] {
        let out = xtask(&[&["lab", "vm", "create"][..], &args[..]].concat())?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success(),
            "`lab vm create {}` was accepted",
            args.join(" ")
        );
        ensure!(
            err.contains(names),
            "the refusal of `lab vm create {}` does not name {names}: {err}",
            args.join(" ")
        );
    }
    ensure!(
        (snapshot(&lab.vms_dir())?, snapshot(&lab.disks_dir())?) == before,
        "a refused `lab vm create` changed the VMs or disks directory"
    );
    xtask_ok(&["lab", "vm", "rm", "keep-1"])?;
    Ok(())
}

/// Runs this binary as a user runs `cargo xtask …`, on the e2e's lab home (`PXELAB_HOME` is
/// inherited); what it printed, whatever its status.
fn xtask(args: &[&str]) -> Result<std::process::Output> {
    let exe = std::env::current_exe().context("finding the xtask binary")?;
    let sh = process::shell()?;
    process::command(xshell::cmd!(sh, "{exe} {args...}"))
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("running xtask {}", args.join(" ")))
}

/// [`xtask`], which must succeed; its stdout.
fn xtask_ok(args: &[&str]) -> Result<String> {
    let out = xtask(args)?;
    ensure!(
        out.status.success(),
        "`cargo xtask {}` failed ({}):\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn snapshot(dir: &std::path::Path) -> Result<Vec<(PathBuf, Vec<u8>)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let bytes = std::fs::read(&path)?;
        out.push((path, bytes));
    }
    out.sort();
    Ok(out)
}

/// Once target-1 has streamed some of its rootfs, replaces the stack process with the stack's
/// container image (`lab stack reload --image`): a restart, and the switch to container mode
/// that the rest of the e2e (firmware, diskless) then runs on.
fn restart_during_stream(done: &AtomicBool, restarted: &AtomicBool) -> Result<()> {
    while !done.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(500));
        let Ok(lab) = Lab::open() else { continue };
        let Ok(timeline) = stack::timeline(&lab, "target-1") else {
            continue;
        };
        let streaming = timeline
            .iter()
            .rev()
            .find(|e| e.event.phase == Phase::Rootfs && e.event.duration_ms.is_none());
        let Some(progress) = streaming else { continue };
        let (Some(done_bytes), Some(total)) =
            (progress.event.bytes_done, progress.event.bytes_total)
        else {
            continue;
        };
        if done_bytes * 10 >= total && done_bytes * 10 < total * 8 {
            eprintln!(
                "e2e: swapping the stack for its container image at {}/{} rootfs bytes",
                done_bytes, total
            );
            let mut lab = lab;
            let image = lab::stack_build_dir(Arch::X86_64).join("pxeboot-stack.oci.tar");
            stack::reload_image(&mut lab, &image)?;
            restarted.store(true, Ordering::SeqCst);
            return Ok(());
        }
    }
    Ok(())
}

/// The power-cut regression of issue 16: stopping VMs was a power cut, and `lab down` seconds
/// after a first boot left the target's SSH host keys 0 bytes long (its SSH never came back).
fn down_and_up_keeps_ssh(up: &UpArgs) -> Result<()> {
    let took = Instant::now();
    let out = xtask(&["lab", "down"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "`lab down` failed: {err}");
    ensure!(
        !err.contains("power was cut"),
        "target-1 did not shut down when asked: {err}"
    );
    eprintln!(
        "e2e: lab down (target-1 shut down by ACPI) took {:.1}s",
        took.elapsed().as_secs_f64()
    );
    // The stack kind the lab has now (the container, since the reload) stays, and so do IPv6
    // and target-1's firmware without their flags.
    let again = UpArgs {
        stack: None,
        ipv6: false,
        firmware: None,
        ..up.clone()
    };
    targets::up(Lab::open()?, &again)?;
    let lab = Lab::open()?;
    let hostname = ssh_output(&lab, "target-1", "hostname")?;
    ensure!(
        hostname == "target-1",
        "hostname is {hostname:?} after lab up"
    );
    ensure!(
        status_ssh("target-1")? == "up",
        "`lab status` does not say target-1's SSH is up"
    );
    firstboot::ssh_over_ipv6(&lab)
}

/// The SSH column of `lab status` for `name`.
fn status_ssh(name: &str) -> Result<String> {
    let table = xtask_ok(&["lab", "status"])?;
    let header = table
        .lines()
        .find(|l| l.starts_with("NAME "))
        .with_context(|| format!("`lab status` printed no VM table:\n{table}"))?;
    let column = header
        .split_whitespace()
        .position(|c| c == "SSH")
        .with_context(|| format!("`lab status` has no SSH column:\n{table}"))?;
    table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(column))
        .map(str::to_string)
        .with_context(|| format!("`lab status` has no row for {name}:\n{table}"))
}

/// `lab vm copy` in both directions, a relative local path included; the bytes arrive intact.
fn copies_both_ways(lab: &Lab) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let content: Vec<u8> = (0..64 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(dir.path().join("to-vm.bin"), &content)?;
    let (sh, exe) = (process::shell()?, std::env::current_exe()?);
    let out = process::command(xshell::cmd!(
        sh,
        "{exe} lab vm copy to-vm.bin target-1:/tmp/e2e-copy.bin"
    ))
    // A path relative to where the user stands.
    .current_dir(dir.path())
    .stdin(std::process::Stdio::null())
    .output()?;
    ensure!(
        out.status.success(),
        "`lab vm copy to-vm.bin target-1:/tmp/e2e-copy.bin` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let digest = hex::encode(sha2::Sha256::digest(&content));
    let remote = ssh_output(lab, "target-1", "sha256sum /tmp/e2e-copy.bin")?;
    ensure!(
        remote.starts_with(&digest),
        "the copy on target-1 differs: {remote} (sent {digest})"
    );
    let back = dir.path().join("from-vm.bin");
    let back_arg = back.display().to_string();
    xtask_ok(&["lab", "vm", "copy", "target-1:/tmp/e2e-copy.bin", &back_arg])?;
    ensure!(
        std::fs::read(&back)? == content,
        "the file copied back from target-1 differs"
    );
    Ok(())
}

/// `lab vm start --installer-shell --no-reboot`: the stack serves the installer's debug shell
/// (and a config that says not to reboot), and `lab vm console` types a command into it and
/// reads its output back; `lab status` says the VM's SSH is down meanwhile.
fn types_into_the_installer_shell(lab: &Lab) -> Result<()> {
    let took = Instant::now();
    xtask_ok(&["lab", "vm", "stop", "target-1"])?;
    eprintln!(
        "e2e: lab vm stop target-1 (ACPI shutdown) took {:.1}s",
        took.elapsed().as_secs_f64()
    );
    let log = lab.vm_file("target-1", VmFile::Console);
    let offset = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
    xtask_ok(&[
        "lab",
        "vm",
        "start",
        "target-1",
        "--installer-shell",
        "--no-reboot",
    ])?;
    let vm = targets::definition(lab, "target-1")?;
    ensure!(
        vm.installer_shell && vm.no_reboot,
        "the switches are not in target-1's definition"
    );
    let (code, config) = stack::get(lab, &format!("/config/{}", vm.mac))?;
    let config: serde_json::Value = serde_json::from_str(&config)
        .with_context(|| format!("GET /config answered {code}: {config}"))?;
    ensure!(
        config["reboot"] == false,
        "the installer config still says reboot: {config}"
    );
    wait_console(
        lab,
        "target-1",
        offset,
        "console shell;",
        Duration::from_secs(300),
    )?;
    ensure!(
        status_ssh("target-1")? == "down",
        "`lab status` does not say that target-1's SSH is down"
    );

    let (sh, exe) = (process::shell()?, std::env::current_exe()?);
    let mut console = process::command(xshell::cmd!(sh, "{exe} lab vm console target-1"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("starting `lab vm console target-1`")?;
    let mut keys = console.stdin.take().context("piped stdin")?;
    let screen = console.stdout.take().context("piped stdout")?;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = seen.clone();
    std::thread::spawn(move || {
        let mut screen = screen;
        let mut buf = [0u8; 1024];
        while let Ok(n) = screen.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend_from_slice(&buf[..n]);
        }
    });
    // The echo of the typed line shows `$((6*7))`; only the shell's output has 42.
    keys.write_all(b"echo typed-$((6*7))-back\r")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text =
            String::from_utf8_lossy(&seen.lock().unwrap_or_else(|e| e.into_inner())).into_owned();
        if text.contains("typed-42-back") {
            break;
        }
        if Instant::now() > deadline {
            let _ = console.kill();
            bail!("the installer shell's output never came back through `lab vm console`; seen: {text:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    keys.write_all(&[lab::console::DETACH])?;
    let out = console.wait_with_output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success() && err.contains("Ctrl-] detaches"),
        "`lab vm console` did not detach cleanly ({}): {err}",
        out.status
    );
    let logged = std::fs::read(&log)?;
    ensure!(
        String::from_utf8_lossy(&logged[offset as usize..]).contains("typed-42-back"),
        "the console log stopped while the console was attached"
    );
    ensure!(
        pid::read(&lab.vm_file("target-1", VmFile::Pid)).is_some(),
        "detaching from the console stopped target-1"
    );
    targets::stop_vm(lab, "target-1")?;
    Ok(())
}

/// Waits until `name`'s console printed `text` after its first `offset` bytes.
fn wait_console(lab: &Lab, name: &str, offset: u64, text: &str, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let log = std::fs::read(lab.vm_file(name, VmFile::Console)).unwrap_or_default();
        let start = (offset as usize).min(log.len());
        if String::from_utf8_lossy(&log[start..]).contains(text) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{name}'s console did not show {text:?} within {} s\n{}",
                limit.as_secs(),
                follow::console_tail(lab, name)
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// `command`'s output on `name`, run over SSH from inside the lab namespace; bounded, so a
/// target that lost its root or network fails the step with its console instead of hanging.
fn ssh_output(lab: &Lab, name: &str, command: &str) -> Result<String> {
    let vm = targets::definition(lab, name)?;
    let out = ssh::output_within(
        ssh::command(lab, &vm, &[command.to_string()])?,
        Duration::from_secs(120),
    )
    .with_context(|| follow::console_tail(lab, name))?;
    ensure!(
        out.status.success(),
        "ssh {name} {command:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Brings the lab down and checks that nothing is left, even when a step failed.
struct Teardown {
    home: PathBuf,
    keep: bool,
    armed: bool,
}

impl Teardown {
    fn finish(mut self, passed: bool) -> Result<()> {
        self.armed = false;
        if self.keep && !passed {
            eprintln!("e2e: lab kept at {} (namespace still up): `PXELAB_HOME={} cargo xtask lab down --purge` when done", self.home.display(), self.home.display());
            return Ok(());
        }
        teardown(&self.home)
    }
}

impl Drop for Teardown {
    fn drop(&mut self) {
        if self.armed {
            let _ = teardown(&self.home);
        }
    }
}

fn teardown(home: &std::path::Path) -> Result<()> {
    let lab = Lab::at(home.to_path_buf())?;
    let pids: Vec<pid::Pid> = lab.pidfiles().iter().filter_map(|f| pid::read(f)).collect();
    let ns = lab.config.namespace.clone();
    let nfs = diskless::nfs_server_pid(&lab);
    let container = stack::container_name(&lab);
    lab::down(&lab, true)?;
    let sh = process::shell()?;
    let exists = xshell::cmd!(sh, "podman container exists {container}")
        .quiet()
        .ignore_stdout()
        .ignore_stderr()
        .run();
    ensure!(
        exists.is_err(),
        "container {container} still exists after lab down"
    );
    ensure!(
        !PathBuf::from("/run/netns").join(&ns).exists(),
        "namespace {ns} still exists after lab down"
    );
    for pid in pids.into_iter().chain(nfs) {
        ensure!(
            !pid.is_running(),
            "process {} still runs after lab down",
            pid.id()
        );
    }
    std::fs::remove_dir_all(home).with_context(|| format!("removing {}", home.display()))
}
