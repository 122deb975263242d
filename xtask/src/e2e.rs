//! `cargo xtask e2e`: the lab end to end, as root under TCG, in a throw-away lab home.
//!
//! 1. `lab vm create` rejects a bad MAC and a duplicate IP and changes nothing.
//! 2. `lab up --targets 1 --distro debian` (UEFI with the NIC's iPXE ROM, stack as a process)
//!    while, in the middle of the rootfs stream, the stack is swapped for its container image
//!    (`lab stack reload --image`): the install still completes (resumed download), the target
//!    reboots from its disk without fetching the installer again, answers SSH with the lab key
//!    and reports its own name as hostname.
//! 3. On that container stack: SeaBIOS (QEMU's iPXE NIC ROM) and OVMF without NIC ROM → TFTP
//!    ipxe.efi each reach "installer started".
//! 4. Two diskless targets boot from one read-only NFS export served by the container's
//!    ganesha (see `e2e_diskless`).
//! 5. `lab down` leaves no namespace, container or process behind (QEMU, stack, dnsmasq,
//!    ganesha).

use std::{
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use pxelab_contract::{Arch, Phase};

use crate::{
    lab::{
        self, follow,
        home::{Lab, StackKind},
        qemu, ssh, stack, targets, vms, UpArgs,
    },
    process::{self, pid},
};

#[derive(clap::Args)]
pub struct Args {
    /// Keep the lab home (and stop nothing) when a step fails, for debugging.
    #[arg(long)]
    keep: bool,
    /// Distro to install.
    #[arg(long, default_value = "debian")]
    distro: String,
    /// Run only one part (while debugging it); the default runs all of them.
    #[arg(long, value_enum)]
    only: Option<Part>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Part {
    Install,
    Firmware,
    Diskless,
}

pub fn run(args: Args) -> Result<()> {
    process::require_root(
        "the end-to-end test",
        "it runs the container stack and diskless targets",
    )?;
    let home = std::env::temp_dir().join(format!("pxelab-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&home)?;
    // SAFETY (edition 2021: set_var is safe): single-threaded at this point.
    std::env::set_var("PXELAB_HOME", &home);
    let guard = Teardown {
        home: home.clone(),
        keep: args.keep,
        armed: true,
    };
    lab::down_on_interrupt(home.clone(), args.keep)?;
    let started = Instant::now();
    let result = scenario(&args.distro, args.only);
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

fn scenario(distro: &str, only: Option<Part>) -> Result<()> {
    let runs = |part: Part| only.is_none_or(|o| o == part);
    step("bad VM definitions are rejected and change nothing");
    rejects_bad_definitions()?;

    let up = UpArgs {
        targets: if runs(Part::Install) { 1 } else { 0 },
        distro: distro.to_string(),
        arch: Arch::X86_64,
        firmware: qemu::Firmware::Uefi,
        accel: qemu::AccelChoice::Auto,
        subnet: lab::home::DEFAULT_SUBNET.into(),
        stack: Some(StackKind::Process),
        timeout: 1500,
    };
    if runs(Part::Install) {
        step("lab up: install target-1 (UEFI); mid-stream the stack is swapped for its container image");
        install_with_restart(&up)?;
    } else {
        step("lab up: the stack only");
        targets::up(Lab::open()?, &up)?;
    }
    let lab = Lab::open()?;
    let distro = crate::distro::canonical_name(distro)?;
    if runs(Part::Firmware) {
        for (name, firmware) in [
            ("bios-1", qemu::Firmware::Bios),
            ("uefipxe-1", qemu::Firmware::UefiPxe),
        ] {
            step(&format!(
                "{name}: {firmware:?} firmware reaches the installer"
            ));
            reaches_installer(&lab, name, &distro, firmware)?;
        }
    }
    if runs(Part::Diskless) {
        step("diskless-1 and diskless-2 boot from one read-only NFS export");
        crate::e2e_diskless::scenario(&lab, &distro)?;
    }
    Ok(())
}

fn install_with_restart(up: &UpArgs) -> Result<()> {
    let restarted = AtomicBool::new(false);
    let done = AtomicBool::new(false);
    std::thread::scope(|s| -> Result<()> {
        let chaos = s.spawn(|| restart_during_stream(&done, &restarted));
        let result = targets::up(Lab::open()?, up);
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
    let timeline = follow::timeline(&lab, "target-1")?;
    let installed = timeline
        .iter()
        .position(|e| e.event.phase == Phase::Installed)
        .context("no `installed` event")?;
    let after = &timeline[installed + 1..];
    ensure!(
        after.iter().any(|e| e.event.phase == Phase::LocalBoot),
        "no local-boot after the install: {after:?}"
    );
    ensure!(
        !after.iter().any(|e| matches!(
            e.event.phase,
            Phase::Ipxe | Phase::Kernel | Phase::Installing
        )),
        "the second boot ran the installer again: {after:?}"
    );
    let hostname = ssh_output(&lab, "target-1", "hostname")?;
    ensure!(
        hostname == "target-1",
        "hostname is {hostname:?}, expected target-1 (cloud-init seed not applied)"
    );
    Ok(())
}

fn step(what: &str) {
    eprintln!("\n==> e2e: {what}");
}

fn rejects_bad_definitions() -> Result<()> {
    let lab = Lab::open()?;
    lab.create_dirs()?;
    let key = ssh::ensure_key(&lab)?;
    let subnet = lab.subnet()?;
    let request = |name: &str, mac: Option<&str>, ip: Option<&str>| vms::VmRequest {
        name: name.into(),
        distro: "debian-12".into(),
        arch: Arch::X86_64,
        mac: mac.map(Into::into),
        ip: ip.map(|i| i.parse().expect("test IPs are valid")),
        boot: pxelab_contract::BootMode::Install,
    };
    let first = vms::plan(
        &[],
        &request("keep-1", None, Some("10.77.0.50")),
        subnet,
        &key,
    )?;
    vms::write_new(&lab.vms_dir(), &first)?;
    let before = snapshot(&lab.vms_dir())?;
    let existing = vms::load_all(&lab.vms_dir())?;
    let bad_mac = vms::plan(
        &existing,
        &request("bad-mac", Some("52:54:00:zz:00:01"), None),
        subnet,
        &key,
    );
    let dup_ip = vms::plan(
        &existing,
        &request("dup-ip", None, Some("10.77.0.50")),
        subnet,
        &key,
    );
    let bad_mac = bad_mac.err().context("a bad MAC was accepted")?.to_string();
    let dup_ip = dup_ip
        .err()
        .context("a duplicate IP was accepted")?
        .to_string();
    ensure!(
        bad_mac.contains("52:54:00:zz:00:01"),
        "the error does not name the bad MAC: {bad_mac}"
    );
    ensure!(
        dup_ip.contains("keep-1"),
        "the error does not name the VM holding the IP: {dup_ip}"
    );
    ensure!(
        snapshot(&lab.vms_dir())? == before,
        "a rejected definition changed the VMs directory"
    );
    targets::remove(&lab, "keep-1")
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
        let Ok(timeline) = follow::timeline(&lab, "target-1") else {
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

fn reaches_installer(lab: &Lab, name: &str, distro: &str, firmware: qemu::Firmware) -> Result<()> {
    let key = ssh::ensure_key(lab)?;
    let existing = vms::load_all(&lab.vms_dir())?;
    let request = vms::VmRequest {
        name: name.into(),
        distro: distro.to_string(),
        arch: Arch::X86_64,
        mac: None,
        ip: None,
        boot: pxelab_contract::BootMode::Install,
    };
    let vm = vms::plan(&existing, &request, lab.subnet()?, &key)?;
    targets::create_disk(lab, name, targets::DEFAULT_DISK_SIZE)?;
    vms::write_new(&lab.vms_dir(), &vm)?;
    std::thread::sleep(Duration::from_secs(3)); // the stack re-reads definitions within 2 s
    let accel = qemu::resolve_accel(qemu::AccelChoice::Auto, Arch::X86_64, &lab.run_dir())?;
    let started = follow::now_ms();
    targets::start_vm(lab, &vm, firmware, accel)?;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let timeline = follow::timeline(lab, name).unwrap_or_default();
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
    targets::stop_vm(lab, name, Duration::from_secs(5))
}

fn ssh_output(lab: &Lab, name: &str, command: &str) -> Result<String> {
    let vm = targets::definition(lab, name)?;
    let out = ssh::command(lab, &vm, &[command.to_string()])?.output()?;
    ensure!(
        out.status.success(),
        "ssh {name} {command} failed: {}",
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
    let nfs = crate::e2e_diskless::nfs_server_pid(&lab);
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
