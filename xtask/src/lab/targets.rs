//! Targets: their disks and QEMU processes, and `lab up`, which strings everything together.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    time::{Duration, UNIX_EPOCH},
};

use anyhow::{bail, Context, Result};
use pxelab_contract::{BootMode, VmDefinition, VmState};
use xshell::cmd;

use crate::{
    hostdeps::{HostDep, Probe},
    process::{self, pid},
};

use super::{
    follow,
    home::{Lab, StackKind, VmFile},
    net::{self, tap_name},
    qemu::{self, Accel, Firmware},
    ssh, stack, vms, UpArgs,
};

/// The disk size of a target unless `lab vm create --disk-size` says otherwise (qemu-img's
/// notation).
pub const DEFAULT_DISK_SIZE: &str = "20G";

/// Every target's RAM (a diskless one's writes live in half of it).
pub const MEMORY_MIB: u32 = 2048;

/// Brings the lab up and follows its targets; their milestones (none when there are no targets
/// to follow).
pub fn up(mut lab: Lab, a: &UpArgs) -> Result<Vec<follow::Row>> {
    crate::hostdeps::ensure(&LAB_TOOLS)?;
    if lab.is_created() {
        if a.subnet != super::home::DEFAULT_SUBNET && a.subnet != lab.config.subnet {
            bail!("this lab already uses subnet {}: `cargo xtask lab down --purge` before changing it", lab.config.subnet);
        }
    } else {
        lab.config.subnet = a.subnet.parse::<net::Subnet>()?.to_string();
    }
    if let Some(kind) = a.stack.filter(|k| *k != lab.config.stack) {
        if stack::running(&lab).is_some() {
            bail!(
                "the stack already runs as a {:?}: `cargo xtask lab stack restart` keeps that kind; \
                 `cargo xtask lab down` first to switch to --stack {kind:?}",
                lab.config.stack,
            );
        }
        lab.config.stack = kind;
        // A kind chosen here runs what `build-stack` wrote, not an earlier reload's image.
        lab.config.image = None;
    }
    // The stack learns IPv6 from its flags: a running one is restarted with them.
    let ipv6_added = a.ipv6 && !lab.config.ipv6;
    lab.config.ipv6 |= a.ipv6;
    lab.create_dirs()?;
    lab.save_config()?;
    let mut existing = vms::load_all(&lab.vms_dir())?;
    for vm in &mut existing {
        if vms::assign_ipv6(&lab, vm)? {
            vms::rewrite(&lab.vms_dir(), vm)?;
        }
    }

    let distro = super::artifacts::prepare(&lab, a.arch, &a.distro)?;

    let net = super::ensure_network(&lab)?;
    stack::stack_binary(&lab)?;
    if stack::is_stale(&lab) {
        eprintln!(
            "the stack binary changed since the stack started: restarting it (VMs keep running)"
        );
        stack::stop(&lab)?;
    } else if ipv6_added && stack::running(&lab).is_some() {
        eprintln!("restarting the stack with IPv6 (VMs keep running)");
        stack::stop(&lab)?;
    }
    if stack::start(&lab)? {
        eprintln!(
            "stack started in namespace {} at http://{}/",
            net.ns,
            net.subnet.gateway()
        );
    }
    stack::wait_healthy(&lab, Duration::from_secs(20))?;

    let key = ssh::ensure_key(&lab)?;
    let accel = qemu::resolve_accel(a.accel, a.arch, &lab.run_dir())?;
    let mut chosen = Vec::new();
    for i in 1..=a.targets {
        let name = format!("target-{i}");
        let vm = match existing.iter().find(|v| v.name == name) {
            Some(vm) => vm.clone(),
            None => {
                let vm = define_target(&lab, &key, &name, &distro, a.arch, |vm| {
                    vms::assign_ipv6(&lab, vm).map(drop)
                })?;
                existing.push(vm.clone());
                vm
            }
        };
        chosen.push(vm);
    }
    // The stack watches the VMs directory; a SIGHUP makes the new reservations immediate.
    if let Some(pid) = stack::running(&lab) {
        pid.signal(libc::SIGHUP);
        std::thread::sleep(Duration::from_millis(500));
    }
    let mut started = BTreeMap::new();
    let mut firmwares = BTreeSet::new();
    for vm in &chosen {
        let pidfile = lab.vm_file(&vm.name, VmFile::Pid);
        if pid::read(&pidfile).is_none() {
            let firmware = firmware_for(&lab, &vm.name, a.firmware);
            firmwares.insert(format!("{firmware:?}"));
            start_vm(&lab, vm, firmware, accel)?;
        }
        let since = std::fs::metadata(&pidfile).and_then(|m| m.modified()).ok();
        let ms = since
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_millis() as u64)
            .unwrap_or_else(follow::now_ms);
        started.insert(vm.name.clone(), ms);
    }
    if chosen.is_empty() {
        println!(
            "stack is up at http://{}/ (namespace {}); no targets requested",
            net.subnet.gateway(),
            net.ns
        );
        return Ok(Vec::new());
    }
    eprintln!(
        "following {} target(s) ({:?}, {} firmware); Ctrl-C leaves them running",
        chosen.len(),
        accel,
        if firmwares.is_empty() {
            "running".to_string()
        } else {
            firmwares.into_iter().collect::<Vec<_>>().join("/")
        }
    );
    let rows = follow::wait_all(&lab, &chosen, &started, Duration::from_secs(a.timeout))?;
    follow::print_summary(&rows);
    println!(
        "ssh: cargo xtask lab vm ssh {}   stop: cargo xtask lab down",
        chosen[0].name
    );
    Ok(rows)
}

/// Host tools the lab runs, with the Debian package providing each.
pub const LAB_TOOLS: [HostDep; 10] = [
    // The process stack runs the host's dnsmasq (the container image carries its own).
    HostDep {
        probe: Probe::Bin("dnsmasq"),
        package: "dnsmasq-base",
    },
    // A rootless lab holds and enters its namespaces with these.
    HostDep {
        probe: Probe::Bin("unshare"),
        package: "util-linux",
    },
    HostDep {
        probe: Probe::Bin("nsenter"),
        package: "util-linux",
    },
    HostDep {
        probe: Probe::Bin("qemu-system-x86_64"),
        package: "qemu-system-x86",
    },
    HostDep {
        probe: Probe::File("/usr/lib/ipxe/qemu/efi-virtio.rom"),
        package: "ipxe-qemu",
    },
    HostDep {
        probe: Probe::Bin("qemu-img"),
        package: "qemu-utils",
    },
    HostDep {
        probe: Probe::Bin("ip"),
        package: "iproute2",
    },
    HostDep {
        probe: Probe::Bin("ssh"),
        package: "openssh-client",
    },
    HostDep {
        probe: Probe::Bin("ssh-keygen"),
        package: "openssh-client",
    },
    HostDep {
        probe: Probe::File("/usr/share/OVMF/OVMF_CODE_4M.fd"),
        package: "ovmf",
    },
];

/// What a process stack needs to serve diskless targets (the container image carries both).
pub const NFS_TOOLS: [HostDep; 2] = [
    HostDep {
        probe: Probe::Bin("ganesha.nfsd"),
        package: "nfs-ganesha",
    },
    HostDep {
        probe: Probe::File("/usr/lib/x86_64-linux-gnu/ganesha/libfsalvfs.so"),
        package: "nfs-ganesha-vfs",
    },
];

/// Creates `name`'s blank disk of `size` (qemu-img's notation or bytes) unless it exists.
/// Defines install target `name` as `lab up` does: MAC and address allocated, a blank disk of
/// [`DEFAULT_DISK_SIZE`]; `edit` changes the definition before it is written.
pub fn define_target(
    lab: &Lab,
    key: &str,
    name: &str,
    distro: &str,
    arch: pxelab_contract::Arch,
    edit: impl FnOnce(&mut VmDefinition) -> Result<()>,
) -> Result<VmDefinition> {
    let request = vms::VmRequest {
        name: name.into(),
        distro: distro.into(),
        arch,
        mac: None,
        ip: None,
        boot: BootMode::Install,
    };
    vms::define(&lab.vms_dir(), &request, lab.subnet()?, key, |vm| {
        edit(vm)?;
        create_disk(lab, name, DEFAULT_DISK_SIZE)
    })
}

pub fn create_disk(lab: &Lab, name: &str, size: &str) -> Result<()> {
    let disk = lab.vm_file(name, VmFile::Disk);
    if disk.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(lab.disks_dir())?;
    let sh = process::shell()?;
    cmd!(sh, "qemu-img create -q -f qcow2 {disk} {size}")
        .quiet()
        .run()
        .with_context(|| format!("creating {}", disk.display()))
}

/// Replaces `name`'s disk with a blank one of the size it had (the default size if it had
/// none).
pub fn blank_disk(lab: &Lab, name: &str) -> Result<()> {
    let disk = lab.vm_file(name, VmFile::Disk);
    let size = match disk.exists() {
        true => virtual_size(&disk)?.to_string(),
        false => DEFAULT_DISK_SIZE.to_string(),
    };
    std::fs::remove_file(&disk)
        .or_else(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Ok(()),
            _ => Err(e),
        })
        .with_context(|| format!("removing {}", disk.display()))?;
    create_disk(lab, name, &size)
}

/// The size a disk image shows its VM, in bytes.
fn virtual_size(disk: &Path) -> Result<u64> {
    let sh = process::shell()?;
    let info = process::read(cmd!(sh, "qemu-img info --output=json {disk}"))?;
    let info: serde_json::Value = serde_json::from_str(&info)
        .with_context(|| format!("parsing `qemu-img info` of {}", disk.display()))?;
    info["virtual-size"].as_u64().with_context(|| {
        format!(
            "`qemu-img info` names no virtual size for {}",
            disk.display()
        )
    })
}

/// How long `lab vm start` follows a target (`lab up --timeout`'s default).
pub const FOLLOW_TIMEOUT: Duration = Duration::from_secs(1800);

/// Stores the debug switches of `lab vm start` in `name`'s definition, where the stack reads
/// them at the VM's next network boot: each start sets them to what it was given, so a start
/// without them boots normally again. The file is rewritten only when they change.
pub fn set_switches(
    lab: &Lab,
    name: &str,
    installer_shell: bool,
    no_reboot: bool,
) -> Result<VmDefinition> {
    let mut vm = definition(lab, name)?;
    if vm.boot == BootMode::Nfsroot && (installer_shell || no_reboot) {
        bail!("{name} boots diskless and never runs the installer: --installer-shell and --no-reboot are for VMs that install");
    }
    if (vm.installer_shell, vm.no_reboot) != (installer_shell, no_reboot) {
        vm.installer_shell = installer_shell;
        vm.no_reboot = no_reboot;
        vms::rewrite(&lab.vms_dir(), &vm)?;
        // The stack also notices the change by itself, within a second or two.
        if let Some(pid) = stack::running(lab) {
            pid.signal(libc::SIGHUP);
        }
    }
    Ok(vm)
}

pub fn definition(lab: &Lab, name: &str) -> Result<VmDefinition> {
    vms::load_all(&lab.vms_dir())?
        .into_iter()
        .find(|v| v.name == name)
        .with_context(|| {
            format!("no VM named {name:?}: `cargo xtask lab vm list` shows the defined ones")
        })
}

/// The firmware `name` boots with: `chosen`, else the one it booted with last (a machine keeps
/// its firmware: a target installed under SeaBIOS must not come back under OVMF after `lab
/// down` and `lab up`), else UEFI.
pub fn firmware_for(lab: &Lab, name: &str, chosen: Option<Firmware>) -> Firmware {
    chosen
        .or_else(|| {
            let text = std::fs::read_to_string(lab.vm_file(name, VmFile::Firmware)).ok()?;
            clap::ValueEnum::from_str(text.trim(), false).ok()
        })
        .unwrap_or(Firmware::Uefi)
}

/// `firmware` as `--firmware` spells it.
fn firmware_name(firmware: Firmware) -> String {
    clap::ValueEnum::to_possible_value(&firmware)
        .map(|v| v.get_name().to_string())
        .unwrap_or_default()
}

/// Starts QEMU for `vm` inside the lab namespace (daemonised; pid file, QMP socket, console log).
pub fn start_vm(lab: &Lab, vm: &VmDefinition, firmware: Firmware, accel: Accel) -> Result<()> {
    if vm.boot == BootMode::Nfsroot {
        process::require_root(&format!("diskless {}", vm.name), net::NO_ROOTLESS_NFS)?;
        if lab.config.stack == StackKind::Process {
            crate::hostdeps::ensure(&NFS_TOOLS)?;
        }
    }
    let net = lab.net()?;
    if !net.exists() {
        bail!("the lab network does not exist: run `cargo xtask lab up` first");
    }
    let tap = tap_name(&vm.name);
    net.add_tap(&tap)?;
    let direct = super::diskmode::direct_boot(lab, vm)?;
    let disk = lab.vm_file(&vm.name, VmFile::Disk);
    if direct.is_some() && !disk.exists() {
        bail!(
            "{} is missing: `cargo xtask lab vm rm {}` and create it again",
            disk.display(),
            vm.name
        );
    }
    if direct.is_some() {
        super::diskmode::write_seed(lab, vm)?;
    }
    if !disk.exists() {
        create_disk(lab, &vm.name, DEFAULT_DISK_SIZE)?;
    }
    let vars = lab.vm_file(&vm.name, VmFile::Vars);
    let code = if firmware == Firmware::Bios || direct.is_some() {
        None
    } else {
        let (code, template) = qemu::uefi_firmware(vm.arch)?;
        if !vars.exists() {
            std::fs::copy(&template, &vars)
                .with_context(|| format!("copying {} to {}", template.display(), vars.display()))?;
        }
        Some(code)
    };
    let sercon = qemu::sercon_file(&lab.run_dir())?;
    let (pid, qmp, console, console_socket) = (
        lab.vm_file(&vm.name, VmFile::Pid),
        lab.vm_file(&vm.name, VmFile::Qmp),
        lab.vm_file(&vm.name, VmFile::Console),
        lab.vm_file(&vm.name, VmFile::ConsoleSocket),
    );
    let target = qemu::Target {
        name: &vm.name,
        arch: vm.arch,
        mac: vm.mac,
        tap: &tap,
        disk: &disk,
        uefi: code.as_deref().map(|c| (c, vars.as_path())),
        console_log: &console,
        console_socket: &console_socket,
        qmp: &qmp,
        pidfile: &pid,
        sercon: &sercon,
        firmware,
        accel,
        memory_mib: MEMORY_MIB,
        direct: direct.as_ref(),
    };
    let _starting = super::may_start()?;
    qemu::start(&net, &target)?;
    if direct.is_none() {
        let remembered = lab.vm_file(&vm.name, VmFile::Firmware);
        crate::store::write_atomic(&remembered, firmware_name(firmware).as_bytes())?;
    }
    Ok(())
}

/// Stops the named targets at once, each the way its disk needs (see [`stop_kind`]): a VM to
/// shut down is asked both through SSH and by the ACPI power button. What happened to each.
pub fn stop_vms(lab: &Lab, names: &[String]) -> Result<Vec<qemu::Stopped>> {
    let definitions = vms::load_all(&lab.vms_dir()).unwrap_or_default();
    let states = follow::fetch_status(lab).ok().map(|s| s.vms);
    let mut asked = Vec::new();
    let requests: Vec<qemu::StopRequest> = names
        .iter()
        .map(|name| {
            let vm = definitions.iter().find(|v| &v.name == name);
            let state = states
                .as_ref()
                .and_then(|s| s.iter().find(|s| &s.name == name))
                .map(|s| s.state);
            let request = stop_request(lab, name, stop_kind(vm, state));
            if let Some(vm) = vm.filter(|_| request.how == qemu::Stop::Shutdown) {
                asked.extend(poweroff_over_ssh(lab, vm, &request.pidfile));
            }
            request
        })
        .collect();
    let outcomes = qemu::stop_all(&requests, qemu::POWERDOWN_GRACE);
    for mut ssh in asked {
        let _ = ssh.kill();
        let _ = ssh.wait();
    }
    let outcomes = outcomes?;
    for (name, outcome) in names.iter().zip(&outcomes) {
        let _ = std::fs::remove_file(lab.vm_file(name, VmFile::ConsoleSocket));
        if *outcome == qemu::Stopped::PowerCutAfterGrace {
            eprintln!(
                "warning: {name} did not power off within {} s of the shutdown request: its power was cut",
                qemu::POWERDOWN_GRACE.as_secs()
            );
        }
    }
    Ok(outcomes)
}

/// Asks a running `vm` to power off through SSH, as its operator would (`sudo systemctl
/// poweroff`); the ssh process, still running or not. QEMU's ACPI power button is not enough:
/// the pulled Debian has no D-Bus, so no systemd-logind, and nothing in it handles the button
/// (measured: a target ignored `system_powerdown` for 30 s, and powered off 18.5 s after this
/// under a load of 9 on 2 cores). A VM whose SSH does not answer gets the button and then the
/// power cut.
fn poweroff_over_ssh(lab: &Lab, vm: &VmDefinition, pidfile: &Path) -> Option<std::process::Child> {
    pid::read(pidfile)?;
    let command = ["sudo".to_string(), "systemctl".into(), "poweroff".into()];
    ssh::command(lab, vm, &command)
        .ok()?
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()
}

/// Stops one target (see [`stop_vms`]).
pub fn stop_vm(lab: &Lab, name: &str) -> Result<qemu::Stopped> {
    Ok(stop_vms(lab, &[name.to_string()])?[0])
}

/// Cuts `name`'s power (if it runs): for a VM whose disk is about to be blanked or deleted.
fn power_off(lab: &Lab, name: &str) -> Result<()> {
    qemu::stop_all(
        &[stop_request(lab, name, qemu::Stop::PowerCut)],
        Duration::ZERO,
    )?;
    let _ = std::fs::remove_file(lab.vm_file(name, VmFile::ConsoleSocket));
    Ok(())
}

fn stop_request(lab: &Lab, name: &str, how: qemu::Stop) -> qemu::StopRequest {
    qemu::StopRequest {
        pidfile: lab.vm_file(name, VmFile::Pid),
        qmp: lab.vm_file(name, VmFile::Qmp),
        how,
    }
}

/// How a target must be stopped so that nothing on its disk is lost: an ACPI shutdown,
/// unless no disk of it holds anything a shutdown would save — a diskless VM (its writes live
/// in RAM), or one running the installer's shell or waiting to be (re)installed (`new`,
/// `booting`, `installing`, `failed`: its next boot installs again). When the definition or
/// the stack's state is unknown, the shutdown is the safe choice.
fn stop_kind(vm: Option<&VmDefinition>, state: Option<VmState>) -> qemu::Stop {
    let Some(vm) = vm else {
        return qemu::Stop::Shutdown;
    };
    let installing = vm.pxeboot && state.is_some_and(|s| s != VmState::Installed);
    if vm.boot == BootMode::Nfsroot || vm.installer_shell || installing {
        qemu::Stop::PowerCut
    } else {
        qemu::Stop::Shutdown
    }
}

/// Install again at the next boot: the VM stopped, a blank disk of the same size, and the
/// stack told to forget the install (started first if it is not running).
pub fn reprovision(lab: &Lab, name: &str) -> Result<()> {
    let vm = definition(lab, name)?;
    if super::diskmode::direct_boot(lab, &vm)?.is_some() {
        bail!("{name} is a disk-mode VM and is never installed: `cargo xtask lab vm rm {name}` and create it again for a fresh disk");
    }
    // The disk is blanked next: nothing on it needs a shutdown.
    power_off(lab, name)?;
    blank_disk(lab, name)?;
    super::ensure_stack(lab)?;
    stack::reprovision(lab, &vm.name)?;
    ssh::forget_host_key(lab, &vm.name);
    println!("{name}: disk blanked and install state cleared; `cargo xtask lab vm start {name}` installs it again");
    Ok(())
}

/// Stops a target and deletes its definition, disk and logs. The stack's records of it (state,
/// timeline) are the stack's: a running stack is asked to forget the install, so a VM defined
/// again under this name installs afresh.
pub fn remove(lab: &Lab, name: &str) -> Result<()> {
    let vm = definition(lab, name)?;
    power_off(lab, name)?;
    if stack::running(lab).is_some() {
        stack::reprovision(lab, &vm.name)?;
    }
    for kind in [
        VmFile::Definition,
        VmFile::Disk,
        VmFile::Vars,
        VmFile::Firmware,
        VmFile::Console,
    ] {
        let _ = std::fs::remove_file(lab.vm_file(name, kind));
    }
    super::diskmode::remove(lab, name);
    ssh::forget_host_key(lab, &vm.name);
    println!("{name} removed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A target keeps the firmware it booted with: `lab up` without `--firmware` after `lab
    /// down` starts a SeaBIOS target under SeaBIOS again.
    #[test]
    fn a_target_boots_with_the_firmware_it_had_unless_told_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        let lab = Lab::at(dir.path().to_path_buf()).unwrap();
        assert_eq!(firmware_for(&lab, "t-1", None), Firmware::Uefi);
        std::fs::create_dir_all(lab.disks_dir()).unwrap();
        for firmware in [Firmware::Bios, Firmware::UefiPxe, Firmware::Uefi] {
            let remembered = lab.vm_file("t-1", VmFile::Firmware);
            std::fs::write(&remembered, firmware_name(firmware)).unwrap();
            assert_eq!(firmware_for(&lab, "t-1", None), firmware);
            assert_eq!(
                firmware_for(&lab, "t-1", Some(Firmware::Bios)),
                Firmware::Bios,
                "--firmware wins"
            );
        }
        std::fs::write(lab.vm_file("t-1", VmFile::Firmware), "floppy").unwrap();
        assert_eq!(firmware_for(&lab, "t-1", None), Firmware::Uefi);
    }

    /// A target `name` as `lab vm create` plans it.
    fn planned(name: &str) -> VmDefinition {
        let key =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIK0wmN/Cr3JXqmLW7u+g9pTh+wyqDHpSQEIQczXkVx9q lab";
        let request = vms::VmRequest {
            name: name.into(),
            distro: "debian-12".into(),
            arch: pxelab_contract::Arch::X86_64,
            mac: None,
            ip: None,
            boot: BootMode::Install,
        };
        vms::plan(&[], &request, "10.77.0.0/24".parse().unwrap(), key).unwrap()
    }

    #[test]
    fn start_switches_are_stored_until_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let lab = Lab::at(dir.path().to_path_buf()).unwrap();
        let vm = planned("t-1");
        vms::write_new(&lab.vms_dir(), &vm).unwrap();
        let file = lab.vm_file("t-1", VmFile::Definition);
        let original = std::fs::read(&file).unwrap();

        let shell = set_switches(&lab, "t-1", true, false).unwrap();
        assert!(shell.installer_shell && !shell.no_reboot);
        assert_eq!(definition(&lab, "t-1").unwrap(), shell, "not stored");
        set_switches(&lab, "t-1", false, true).unwrap();
        let stored = definition(&lab, "t-1").unwrap();
        assert!(!stored.installer_shell && stored.no_reboot);
        set_switches(&lab, "t-1", false, false).unwrap();
        assert_eq!(
            std::fs::read(&file).unwrap(),
            original,
            "a plain start restores the file"
        );

        let diskless = VmDefinition {
            name: "d-1".into(),
            boot: BootMode::Nfsroot,
            ..vm
        };
        vms::write_new(&lab.vms_dir(), &diskless).unwrap();
        let err = set_switches(&lab, "d-1", true, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("diskless"), "{err}");
    }

    #[test]
    fn only_a_disk_worth_keeping_gets_a_shutdown() {
        let vm = planned("t-1");
        use qemu::Stop::{PowerCut, Shutdown};
        let kind = |vm: &VmDefinition, state| stop_kind(Some(vm), state);
        assert_eq!(kind(&vm, Some(VmState::Installed)), Shutdown);
        assert_eq!(kind(&vm, None), Shutdown, "the stack cannot tell");
        assert_eq!(stop_kind(None, Some(VmState::Installing)), Shutdown);
        for state in [
            VmState::New,
            VmState::Booting,
            VmState::Installing,
            VmState::Failed,
        ] {
            assert_eq!(kind(&vm, Some(state)), PowerCut, "{state:?}");
        }
        let shell = VmDefinition {
            installer_shell: true,
            ..vm.clone()
        };
        assert_eq!(kind(&shell, Some(VmState::Installed)), PowerCut);
        let diskless = VmDefinition {
            boot: BootMode::Nfsroot,
            ..vm.clone()
        };
        assert_eq!(kind(&diskless, None), PowerCut);
        // A disk-mode VM (pvmlab's, no PXE) boots its own system whatever the stack's state.
        let disk_mode = VmDefinition {
            pxeboot: false,
            ..vm
        };
        assert_eq!(kind(&disk_mode, Some(VmState::New)), Shutdown);
    }

    /// A reprovisioned disk is blank and keeps the size its VM was created with.
    #[test]
    fn sys_lab_blank_disk_keeps_its_size() {
        for tool in ["qemu-img", "qemu-io"] {
            assert!(
                crate::hostdeps::find_bin(tool).is_some(),
                "{tool} not found: apt-get install qemu-utils"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let lab = Lab::at(dir.path().to_path_buf()).unwrap();
        create_disk(&lab, "t-1", "64M").unwrap();
        let disk = lab.vm_file("t-1", VmFile::Disk);
        let sh = xshell::Shell::new().unwrap();
        let written = |disk: &Path| {
            cmd!(sh, "qemu-io -f qcow2 -c 'read -P 0xab 0 1M' {disk}")
                .quiet()
                .ignore_stdout()
                .ignore_stderr()
                .run()
                .is_ok()
        };
        cmd!(sh, "qemu-io -f qcow2 -c 'write -P 0xab 0 1M' {disk}")
            .quiet()
            .ignore_stdout()
            .run()
            .unwrap();
        assert!(written(&disk));
        blank_disk(&lab, "t-1").unwrap();
        assert_eq!(virtual_size(&disk).unwrap(), 64 << 20);
        assert!(!written(&disk), "the disk still holds what was written");
        std::fs::remove_file(&disk).unwrap();
        blank_disk(&lab, "t-1").unwrap();
        assert_eq!(virtual_size(&disk).unwrap(), 20 << 30, "the default size");
    }
}
