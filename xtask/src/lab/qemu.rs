//! QEMU for lab targets: the command line for each firmware path, the accelerator probe, and
//! starting/stopping a daemonised VM through its pid file and QMP socket.
//!
//! A VM is stopped the way a machine is: ACPI power button first (`system_powerdown`; the lab
//! also asks the guest's OS, see `targets::stop_vms`), and the power cut (QMP `quit`) only when
//! the guest has not powered off within [`POWERDOWN_GRACE`].
//! A power cut right after a first boot loses what the guest wrote seconds before: ext4's
//! delayed allocation left its freshly generated SSH host keys 0 bytes long, and `ssh.service`
//! failed at every boot after.

use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use pxelab_contract::{Arch, Mac};
use xshell::cmd;

use super::net::LabNet;
use crate::process::{self, pid};

/// How a target's firmware reaches iPXE.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Firmware {
    /// OVMF with QEMU's iPXE NIC ROM: straight to HTTP (fastest).
    Uefi,
    /// OVMF without a NIC ROM: firmware PXE → TFTP `ipxe.efi` (the real-hardware path).
    UefiPxe,
    /// SeaBIOS → PXE → TFTP `undionly.kpxe`.
    Bios,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AccelChoice {
    /// KVM if a real tiny boot under KVM works, else TCG (with a warning).
    Auto,
    Kvm,
    Tcg,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

/// Everything that makes one target's QEMU command line.
pub struct Target<'a> {
    pub name: &'a str,
    pub arch: Arch,
    pub mac: Mac,
    pub tap: &'a str,
    pub disk: &'a Path,
    /// UEFI firmware code (shared, read-only) and this VM's private copy of the variable store;
    /// `None` for BIOS.
    pub uefi: Option<(&'a Path, &'a Path)>,
    pub console_log: &'a Path,
    /// The serial console's socket (QEMU listens; a client types into the serial port).
    pub console_socket: &'a Path,
    pub qmp: &'a Path,
    pub pidfile: &'a Path,
    /// A file holding the bytes `f8 03` (see [`sercon_file`]).
    pub sercon: &'a Path,
    pub firmware: Firmware,
    pub accel: Accel,
    pub memory_mib: u32,
    /// A disk-mode VM: QEMU loads its kernel and initramfs (SeaBIOS, no NIC boot).
    pub direct: Option<&'a super::diskmode::DirectBoot>,
}

pub fn binary(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => "qemu-system-x86_64",
        Arch::Aarch64 => "qemu-system-aarch64",
    }
}

/// UEFI firmware code and variable-store template for `arch`, from Debian's ovmf/qemu-efi packages.
pub fn uefi_firmware(arch: Arch) -> Result<(PathBuf, PathBuf)> {
    let (code, vars, package) = match arch {
        Arch::X86_64 => (
            "/usr/share/OVMF/OVMF_CODE_4M.fd",
            "/usr/share/OVMF/OVMF_VARS_4M.fd",
            "ovmf",
        ),
        Arch::Aarch64 => (
            "/usr/share/AAVMF/AAVMF_CODE.fd",
            "/usr/share/AAVMF/AAVMF_VARS.fd",
            "qemu-efi-aarch64",
        ),
    };
    for path in [code, vars] {
        if !Path::new(path).exists() {
            bail!("UEFI firmware {path} not found: apt-get install {package}");
        }
    }
    Ok((code.into(), vars.into()))
}

/// Every target's virtual CPUs.
pub const CPUS: u32 = 2;

/// The command line (without the binary) for a daemonised target.
pub fn args(t: &Target) -> Result<Vec<String>> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    push(&["-name", t.name]);
    match t.arch {
        Arch::X86_64 => push(&["-machine", "q35"]),
        Arch::Aarch64 => push(&["-machine", "virt"]),
    }
    match t.accel {
        Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
        Accel::Tcg => push(&["-accel", "tcg", "-cpu", "max"]),
    }
    let (mem, cpus) = (t.memory_mib.to_string(), CPUS.to_string());
    push(&["-m", &mem, "-smp", &cpus]);
    if let Some(d) = t.direct {
        push(&["-kernel", &d.kernel.display().to_string()]);
        push(&["-initrd", &d.initrd.display().to_string()]);
        push(&["-append", &d.append]);
    }
    match (t.firmware, t.uefi) {
        _ if t.direct.is_some() => {}
        (Firmware::Bios, _) if t.arch != Arch::X86_64 => {
            bail!("--firmware bios exists only for x86_64 targets")
        }
        (Firmware::Bios, _) => {}
        (_, Some((code, vars))) => {
            push(&[
                "-drive",
                &format!("if=pflash,format=raw,readonly=on,file={}", code.display()),
            ]);
            push(&[
                "-drive",
                &format!("if=pflash,format=raw,file={}", vars.display()),
            ]);
            // Without this OVMF tries IPv6 PXE and HTTP boot before the disk: an installed
            // target took 172 s instead of 25 s to reach its disk.
            push(&["-fw_cfg", "name=opt/org.tianocore/IPv6Support,string=no"]);
            if t.firmware == Firmware::Uefi {
                // The NIC's iPXE ROM boots on its own; OVMF's IPv4 stack would add its own PXE
                // (TFTP `ipxe.efi`, a second iPXE asking the stack again) and HTTP boot between
                // the ROM's "boot from disk" and the disk.
                push(&["-fw_cfg", "name=opt/org.tianocore/IPv4Support,string=no"]);
            }
        }
        (_, None) => bail!("UEFI firmware paths missing for {}", t.name),
    }
    // The NIC boots first on every power-on: the boot handler decides (installer, or "boot from
    // disk" once installed), which is what makes boot-once work without touching the firmware.
    let rom = if t.firmware == Firmware::UefiPxe {
        ",romfile="
    } else {
        ""
    };
    push(&[
        "-netdev",
        &format!("tap,id=net0,ifname={},script=no,downscript=no", t.tap),
    ]);
    push(&[
        "-device",
        &format!("virtio-net-pci,netdev=net0,mac={},bootindex=1{rom}", t.mac),
    ]);
    push(&[
        "-drive",
        &format!("file={},if=none,id=disk0,format=qcow2", t.disk.display()),
    ]);
    push(&["-device", "virtio-blk-pci,drive=disk0,bootindex=2"]);
    if let Some(d) = t.direct {
        // After the disk, so the disk stays /dev/vda.
        push(&[
            "-drive",
            &format!("file={},if=virtio,format=raw,readonly=on", d.seed.display()),
        ]);
    }
    push(&["-display", "none", "-vga", "none"]);
    if t.arch == Arch::X86_64 {
        push(&[
            "-fw_cfg",
            &format!("name=etc/sercon-port,file={}", t.sercon.display()),
        ]);
    }
    push(&[
        "-chardev",
        &console_chardev(t.console_socket, t.console_log),
    ]);
    push(&["-serial", "chardev:console"]);
    push(&[
        "-qmp",
        &format!("unix:{},server=on,wait=off", t.qmp.display()),
    ]);
    push(&["-pidfile", &t.pidfile.display().to_string(), "-daemonize"]);
    Ok(a)
}

/// The serial port's backend, id `console`: a socket that `lab vm console` attaches to (one
/// client at a time), and a log of everything the port prints, with or without a client
/// (measured: QEMU 7.2 writes the log while nobody is attached and after a client left).
pub fn console_chardev(socket: &Path, log: &Path) -> String {
    format!(
        "socket,id=console,path={},server=on,wait=off,logfile={},logappend=on",
        socket.display(),
        log.display()
    )
}

/// SeaBIOS and iPXE print to the serial port only when told its I/O port (0x3f8) this way.
pub fn sercon_file(dir: &Path) -> Result<PathBuf> {
    let path = dir.join("sercon-port");
    if !path.exists() {
        crate::store::write_atomic(&path, &[0xf8, 0x03])?;
    }
    Ok(path)
}

/// Picks the accelerator. KVM is trusted only after a real tiny boot under it prints on the
/// serial port: some hosts expose a `/dev/kvm` that cannot run a guest (FIELD-NOTES).
pub fn resolve_accel(choice: AccelChoice, arch: Arch, scratch: &Path) -> Result<Accel> {
    let native = cfg!(target_arch = "x86_64") && arch == Arch::X86_64
        || cfg!(target_arch = "aarch64") && arch == Arch::Aarch64;
    match choice {
        AccelChoice::Tcg => Ok(Accel::Tcg),
        AccelChoice::Kvm if !native => bail!("--accel kvm needs a {arch} host; use --accel tcg"),
        AccelChoice::Kvm => Ok(Accel::Kvm),
        AccelChoice::Auto if native && arch == Arch::X86_64 && kvm_boots(scratch) => Ok(Accel::Kvm),
        AccelChoice::Auto => {
            eprintln!(
                "warning: KVM is not usable here: running targets under TCG emulation (slower)"
            );
            Ok(Accel::Tcg)
        }
    }
}

/// Boots a 512-byte boot sector that writes "OK" to COM1 and halts, under KVM, for at most 10 s.
///
/// The CPU must also offer hardware virtualisation (vmx/svm): a paravirtual `/dev/kvm` without
/// it runs that boot sector fine and then hangs in real firmware (measured: OVMF never printed).
fn kvm_boots(scratch: &Path) -> bool {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw_virt = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if !hw_virt
        || std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_err()
    {
        return false;
    }
    let mut sector = vec![
        0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xb0, b'O', 0xee, // mov al, 'O'; out dx, al
        0xb0, b'K', 0xee, // mov al, 'K'; out dx, al
        0xfa, 0xf4, 0xeb, 0xfd, // cli; hlt; jmp back to hlt
    ];
    sector.resize(510, 0);
    sector.extend([0x55, 0xaa]);
    let image = scratch.join("kvm-probe.img");
    if std::fs::write(&image, &sector).is_err() {
        return false;
    }
    let Ok(sh) = process::shell() else {
        return false;
    };
    let qemu = binary(Arch::X86_64);
    let drive = format!("file={},format=raw,if=ide", image.display());
    let child = process::command(cmd!(
        sh,
        "{qemu} -accel kvm -display none -vga none -serial stdio -monitor none -no-reboot -drive {drive}"
    ))
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn();
    let Ok(mut child) = child else { return false };
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 256];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            if seen.windows(2).any(|w| w == b"OK") {
                let _ = tx.send(());
                break;
            }
        }
    });
    let ok = rx.recv_timeout(Duration::from_secs(10)).is_ok();
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&image);
    ok
}

/// Starts the daemonised QEMU of `t` inside the lab network; returns once QEMU runs (it
/// reports a bad command line, a missing tap or firmware before it detaches).
pub fn start(net: &LabNet, t: &Target) -> Result<pid::Pid> {
    let sh = process::shell()?;
    let args = args(t)?;
    process::output(net.command(&sh, binary(t.arch))?.args(args))
        .with_context(|| format!("QEMU for {} failed to start", t.name))?;
    pid::adopt(t.pidfile)
}

/// How long a guest may take to power off after it was asked to before its power is cut. An
/// installed Debian target under TCG powered off 18.5 s after `systemctl poweroff` (on 2 cores
/// under a load of 9, cloud-init still at work); this leaves room for a slower machine.
pub const POWERDOWN_GRACE: Duration = Duration::from_secs(45);

/// How a target is stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// ACPI shutdown, and the power cut after [`POWERDOWN_GRACE`].
    Shutdown,
    /// The power cut right away: nothing on the VM's disk needs its shutdown.
    PowerCut,
}

/// What stopping a target did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stopped {
    NotRunning,
    /// The guest shut down and powered off.
    ShutDown,
    /// The power was cut, as asked.
    PowerCut,
    /// The guest did not power off within the grace period: the power was cut.
    PowerCutAfterGrace,
}

/// One target to stop: its pid file and QMP socket, and how.
#[derive(Clone, Debug)]
pub struct StopRequest {
    pub pidfile: PathBuf,
    pub qmp: PathBuf,
    pub how: Stop,
}

/// Stops targets all at once: every shutdown is requested first, so they share one `grace`
/// period ([`POWERDOWN_GRACE`] but in tests). Waits for the processes themselves, not their pid files (QEMU removes those before
/// it has finished exiting). Removes the pid files and QMP sockets.
pub fn stop_all(requests: &[StopRequest], grace: Duration) -> Result<Vec<Stopped>> {
    let running: Vec<Option<pid::Pid>> = requests.iter().map(|r| pid::read(&r.pidfile)).collect();
    // A guest whose QMP socket does not answer cannot be asked to shut down either.
    let asked: Vec<bool> = requests
        .iter()
        .zip(&running)
        .map(|(r, pid)| {
            pid.is_some()
                && r.how == Stop::Shutdown
                && qmp_command(&r.qmp, "system_powerdown").is_ok()
        })
        .collect();
    let deadline = Instant::now() + grace;
    let mut outcomes = Vec::new();
    for ((r, pid), asked) in requests.iter().zip(running).zip(asked) {
        let outcome = match pid {
            None => Stopped::NotRunning,
            Some(pid)
                if asked && pid.wait_gone(deadline.saturating_duration_since(Instant::now())) =>
            {
                Stopped::ShutDown
            }
            Some(pid) => {
                let _ = qmp_command(&r.qmp, "quit");
                if !pid.wait_gone(Duration::from_secs(5)) {
                    pid.kill().context("stopping QEMU")?;
                }
                if r.how == Stop::Shutdown {
                    Stopped::PowerCutAfterGrace
                } else {
                    Stopped::PowerCut
                }
            }
        };
        let _ = std::fs::remove_file(&r.pidfile);
        let _ = std::fs::remove_file(&r.qmp);
        outcomes.push(outcome);
    }
    Ok(outcomes)
}

/// Sends one QMP command (after the mandatory capabilities handshake).
pub fn qmp_command(socket: &Path, command: &str) -> Result<()> {
    let mut s = UnixStream::connect(socket)
        .with_context(|| format!("connecting to QMP socket {}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut greeting = [0u8; 4096];
    let _ = s.read(&mut greeting)?;
    s.write_all(br#"{"execute":"qmp_capabilities"}"#)?;
    let _ = s.read(&mut greeting)?;
    s.write_all(format!(r#"{{"execute":"{command}"}}"#).as_bytes())?;
    let _ = s.read(&mut greeting);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target<'a>(firmware: Firmware, p: &'a Path) -> Target<'a> {
        Target {
            name: "t1",
            arch: Arch::X86_64,
            mac: "0a:00:00:00:00:01".parse().unwrap(),
            tap: "pxt0",
            disk: p,
            uefi: (firmware != Firmware::Bios).then_some((Path::new("/fw/CODE.fd"), p)),
            console_log: p,
            console_socket: p,
            qmp: p,
            pidfile: p,
            sercon: p,
            firmware,
            accel: Accel::Tcg,
            memory_mib: 1024,
            direct: None,
        }
    }

    /// A stand-in for a running QEMU: a process recorded in a pid file, and a QMP socket that
    /// records each command and ends the process on those listed in `obeys`.
    struct FakeQemu {
        sleeper: crate::process::pid::tests::Sleeper,
        commands: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
        request: StopRequest,
    }

    impl FakeQemu {
        fn start(dir: &Path, name: &str, how: Stop, obeys: &'static [&'static str]) -> FakeQemu {
            use std::os::unix::net::UnixListener;
            let sleeper = crate::process::pid::tests::Sleeper::spawn();
            let request = StopRequest {
                pidfile: dir.join(format!("{name}.pid")),
                qmp: dir.join(format!("{name}.qmp")),
                how,
            };
            pid::write(&request.pidfile, pid::Pid::of(sleeper.0.id()).unwrap()).unwrap();
            let listener = UnixListener::bind(&request.qmp).unwrap();
            let commands = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
            let seen = commands.clone();
            let target = sleeper.0.id() as i32;
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    let Ok(mut conn) = conn else { return };
                    let _ = conn.write_all(br#"{"QMP": {}}"#);
                    let mut buf = [0u8; 512];
                    // The capabilities handshake, then one command.
                    for _ in 0..2 {
                        let Ok(n) = conn.read(&mut buf) else { break };
                        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                        let _ = conn.write_all(br#"{"return": {}}"#);
                        let Some(command) = text.split('"').nth(3) else {
                            continue;
                        };
                        if command == "qmp_capabilities" {
                            continue;
                        }
                        seen.lock().unwrap().push(command.to_string());
                        if obeys.contains(&command) {
                            // SAFETY: kill(2) of the test's own child.
                            unsafe { libc::kill(target, libc::SIGKILL) };
                        }
                    }
                }
            });
            FakeQemu {
                sleeper,
                commands,
                request,
            }
        }

        fn commands(&self) -> Vec<String> {
            self.commands.lock().unwrap().clone()
        }
    }

    #[test]
    fn a_stop_asks_the_guest_to_power_off_before_cutting_its_power() {
        let dir = tempfile::tempdir().unwrap();
        let grace = Duration::from_secs(2);
        // Installed guests: one powers off when asked, one ignores the request. A guest in
        // the installer gets the power cut at once.
        let mut obedient = FakeQemu::start(
            dir.path(),
            "a",
            Stop::Shutdown,
            &["system_powerdown", "quit"],
        );
        let mut deaf = FakeQemu::start(dir.path(), "b", Stop::Shutdown, &["quit"]);
        let mut installer = FakeQemu::start(dir.path(), "c", Stop::PowerCut, &["quit"]);
        let gone = FakeQemu::start(dir.path(), "d", Stop::Shutdown, &[]);
        std::fs::remove_file(&gone.request.pidfile).unwrap();
        let started = Instant::now();
        let outcomes = stop_all(
            &[
                obedient.request.clone(),
                deaf.request.clone(),
                installer.request.clone(),
                gone.request.clone(),
            ],
            grace,
        )
        .unwrap();
        assert_eq!(
            outcomes,
            [
                Stopped::ShutDown,
                Stopped::PowerCutAfterGrace,
                Stopped::PowerCut,
                Stopped::NotRunning
            ]
        );
        assert!(
            started.elapsed() < grace + Duration::from_secs(3),
            "the shutdowns did not share one grace period: {:?}",
            started.elapsed()
        );
        assert_eq!(obedient.commands(), ["system_powerdown"]);
        assert_eq!(deaf.commands(), ["system_powerdown", "quit"]);
        assert_eq!(installer.commands(), ["quit"]);
        for fake in [&mut obedient, &mut deaf, &mut installer] {
            assert!(!fake.sleeper.alive());
            assert!(!fake.request.pidfile.exists() && !fake.request.qmp.exists());
        }
    }

    #[test]
    fn the_console_is_a_socket_that_also_logs() {
        let p = Path::new("/x");
        let line = args(&target(Firmware::Uefi, p)).unwrap().join(" ");
        assert!(
            line.contains("-chardev socket,id=console,path=/x,server=on,wait=off,logfile=/x,logappend=on -serial chardev:console"),
            "{line}"
        );
    }

    #[test]
    fn firmware_paths_shape_the_command_line() {
        let p = Path::new("/x");
        let bios = args(&target(Firmware::Bios, p)).unwrap().join(" ");
        assert!(!bios.contains("pflash"), "{bios}");
        assert!(
            bios.contains("mac=0a:00:00:00:00:01,bootindex=1 "),
            "{bios}"
        );
        assert!(bios.contains("-accel tcg -cpu max"));
        let pxe = args(&target(Firmware::UefiPxe, p)).unwrap().join(" ");
        assert!(pxe.contains("bootindex=1,romfile= "), "{pxe}");
        assert!(pxe.contains("readonly=on,file=/fw/CODE.fd"));
        assert!(
            pxe.contains("IPv6Support,string=no"),
            "OVMF must not try IPv6 boot first"
        );
        assert!(
            !pxe.contains("IPv4Support"),
            "without a NIC ROM, OVMF's own PXE is the network boot: {pxe}"
        );
        let uefi = args(&target(Firmware::Uefi, p)).unwrap().join(" ");
        assert!(uefi.contains("bootindex=1 "), "the NIC ROM stays: {uefi}");
        assert!(
            uefi.contains("IPv4Support,string=no"),
            "with the ROM, OVMF's own PXE and HTTP boot only delay the disk: {uefi}"
        );
        let direct = super::super::diskmode::DirectBoot {
            kernel: "/d/k".into(),
            initrd: "/d/i".into(),
            seed: "/d/seed.img".into(),
            append: "root=/dev/vda ds=nocloud".into(),
        };
        let disk_mode = args(&Target {
            direct: Some(&direct),
            ..target(Firmware::Uefi, p)
        })
        .unwrap();
        let line = disk_mode.join(" ");
        assert!(
            line.contains("-kernel /d/k -initrd /d/i -append root=/dev/vda")
                && !line.contains("pflash"),
            "a disk-mode VM boots its kernel under SeaBIOS: {line}"
        );
        assert!(disk_mode.contains(&direct.append), "one argument: {line}");
        let (disk, seed) = (
            line.find("drive=disk0").unwrap(),
            line.find("file=/d/seed.img,if=virtio,format=raw,readonly=on"),
        );
        assert!(
            seed.is_some_and(|seed| seed > disk),
            "the read-only seed disk comes after the disk (/dev/vda): {line}"
        );
        let arm = Target {
            arch: Arch::Aarch64,
            ..target(Firmware::Bios, p)
        };
        assert!(args(&arm)
            .unwrap_err()
            .to_string()
            .contains("only for x86_64"));
    }
}
