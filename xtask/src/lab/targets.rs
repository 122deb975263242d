//! Targets: their disks, keys and QEMU processes, and `lab up`, which strings everything
//! together.

use std::{
    collections::BTreeMap,
    process::Command,
    time::{Duration, UNIX_EPOCH},
};

use anyhow::{bail, Context, Result};
use pxelab_contract::{BootMode, VmDefinition};
use xshell::{cmd, Shell};

use crate::hostdeps::{HostDep, Probe};

use super::{
    follow,
    home::{tap_name, Lab, VmFile},
    net,
    qemu::{self, Accel, Firmware},
    stack, vms, UpArgs,
};

pub fn up(mut lab: Lab, a: &UpArgs) -> Result<()> {
    crate::hostdeps::ensure(&LAB_TOOLS)?;
    if lab.home.join("lab.json").exists() {
        if a.subnet != super::home::DEFAULT_SUBNET && a.subnet != lab.config.subnet {
            bail!("this lab already uses subnet {}: `cargo xtask lab down --purge` before changing it", lab.config.subnet);
        }
    } else {
        lab.config.subnet = a.subnet.parse::<net::Subnet>()?.to_string();
    }
    if let Some(kind) = a.stack.filter(|k| *k != lab.config.stack) {
        if qemu::running_pid(&lab.stack_pidfile()).is_some() {
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
    lab.create_dirs()?;
    lab.save_config()?;

    let distro = super::artifacts::prepare(&lab, a.arch, &a.distro)?;

    let net = lab.net()?;
    net.create()?;
    stack::stack_binary(&lab)?;
    if stack::is_stale(&lab) {
        eprintln!(
            "the stack binary changed since the stack started: restarting it (VMs keep running)"
        );
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

    let key = ensure_ssh_key(&lab)?;
    let accel = qemu::resolve_accel(a.accel, a.arch, &lab.dir("run"))?;
    let mut existing = vms::load_all(&lab.dir("vms"))?;
    let mut chosen = Vec::new();
    for i in 1..=a.targets {
        let name = format!("target-{i}");
        let vm = match existing.iter().find(|v| v.name == name) {
            Some(vm) => vm.clone(),
            None => {
                let request = vms::VmRequest {
                    name: name.clone(),
                    distro: distro.clone(),
                    arch: a.arch,
                    mac: None,
                    ip: None,
                    boot: BootMode::Install,
                };
                let vm = vms::plan(&existing, &request, lab.subnet()?, &key)?;
                create_disk(&lab, &name, "20G")?;
                vms::write_new(&lab.dir("vms"), &vm)?;
                existing.push(vm.clone());
                vm
            }
        };
        chosen.push(vm);
    }
    // The stack watches the VMs directory; a SIGHUP makes the new reservations immediate.
    if let Some(pid) = qemu::running_pid(&lab.stack_pidfile()) {
        // SAFETY: signalling the stack this lab started.
        unsafe { libc::kill(pid, libc::SIGHUP) };
        std::thread::sleep(Duration::from_millis(500));
    }
    let mut started = BTreeMap::new();
    for vm in &chosen {
        let pidfile = lab.vm_file(&vm.name, VmFile::Pid);
        if qemu::running_pid(&pidfile).is_none() {
            start_vm(&lab, vm, a.firmware, accel)?;
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
        return Ok(());
    }
    eprintln!(
        "following {} target(s) ({:?}, {:?} firmware); Ctrl-C leaves them running",
        chosen.len(),
        accel,
        a.firmware
    );
    let rows = follow::wait_all(&lab, &chosen, &started, Duration::from_secs(a.timeout))?;
    follow::print_summary(&rows);
    println!(
        "ssh: cargo xtask lab vm ssh {}   stop: cargo xtask lab down",
        chosen[0].name
    );
    Ok(())
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
const NFS_TOOLS: [HostDep; 2] = [
    HostDep {
        probe: Probe::Bin("ganesha.nfsd"),
        package: "nfs-ganesha",
    },
    HostDep {
        probe: Probe::File("/usr/lib/x86_64-linux-gnu/ganesha/libfsalvfs.so"),
        package: "nfs-ganesha-vfs",
    },
];

/// The lab's SSH public key, generating the pair on first use (private key mode 0600).
pub fn ensure_ssh_key(lab: &Lab) -> Result<String> {
    let key = lab.ssh_key();
    let public = key.with_extension("pub");
    if !key.exists() || !public.exists() {
        std::fs::create_dir_all(lab.dir("ssh"))?;
        let _ = std::fs::remove_file(&key);
        let _ = std::fs::remove_file(&public);
        let sh = Shell::new()?;
        cmd!(sh, "ssh-keygen -q -t ed25519 -N '' -C pxelab-lab -f {key}")
            .quiet()
            .run()
            .context("generating the lab SSH key")?;
    }
    std::fs::read_to_string(&public).with_context(|| format!("reading {}", public.display()))
}

pub fn create_disk(lab: &Lab, name: &str, size: &str) -> Result<()> {
    let disk = lab.vm_file(name, VmFile::Disk);
    if disk.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(lab.dir("disks"))?;
    let sh = Shell::new()?;
    cmd!(sh, "qemu-img create -q -f qcow2 {disk} {size}")
        .quiet()
        .run()
        .with_context(|| format!("creating {}", disk.display()))
}

pub fn definition(lab: &Lab, name: &str) -> Result<VmDefinition> {
    vms::load_all(&lab.dir("vms"))?
        .into_iter()
        .find(|v| v.name == name)
        .with_context(|| {
            format!("no VM named {name:?}: `cargo xtask lab vm list` shows the defined ones")
        })
}

/// Starts QEMU for `vm` inside the lab namespace (daemonised; pid file, QMP socket, console log).
pub fn start_vm(lab: &Lab, vm: &VmDefinition, firmware: Firmware, accel: Accel) -> Result<()> {
    if vm.boot == BootMode::Nfsroot {
        net::require_root(&format!("diskless {}", vm.name), net::NO_ROOTLESS_NFS)?;
        if lab.config.stack == stack::StackKind::Process {
            crate::hostdeps::ensure(&NFS_TOOLS)?;
        }
    }
    let net = lab.net()?;
    if !net.exists() {
        bail!("the lab network does not exist: run `cargo xtask lab up` first");
    }
    let tap = tap_name(&vm.name);
    net.add_tap(&tap)?;
    let disk = lab.vm_file(&vm.name, VmFile::Disk);
    if !disk.exists() {
        create_disk(lab, &vm.name, "20G")?;
    }
    let vars = lab.vm_file(&vm.name, VmFile::Vars);
    let code = if firmware == Firmware::Bios {
        None
    } else {
        let (code, template) = qemu::uefi_firmware(vm.arch)?;
        if !vars.exists() {
            std::fs::copy(&template, &vars)
                .with_context(|| format!("copying {} to {}", template.display(), vars.display()))?;
        }
        Some(code)
    };
    let sercon = qemu::sercon_file(&lab.dir("run"))?;
    let (pid, qmp, console) = (
        lab.vm_file(&vm.name, VmFile::Pid),
        lab.vm_file(&vm.name, VmFile::Qmp),
        lab.vm_file(&vm.name, VmFile::Console),
    );
    let target = qemu::Target {
        name: &vm.name,
        arch: vm.arch,
        mac: vm.mac,
        tap: &tap,
        disk: &disk,
        uefi: code.as_deref().map(|c| (c, vars.as_path())),
        console_log: &console,
        qmp: &qmp,
        pidfile: &pid,
        sercon: &sercon,
        firmware,
        accel,
        memory_mib: 2048,
    };
    let args = qemu::args(&target)?;
    let out = net
        .command(qemu::binary(vm.arch))?
        .args(&args)
        .output()
        .with_context(|| format!("running {}", qemu::binary(vm.arch)))?;
    if !out.status.success() {
        bail!(
            "QEMU for {} failed to start: {}",
            vm.name,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// An `ssh` to the VM run inside the lab namespace, with the lab key. The VM's host keys are
/// not trusted on first use: they are taken from its serial console, where cloud-init prints
/// them once it has generated them (the last such block counts, so a reboot or a diskless VM,
/// which gets new keys every boot, is handled). Until that block appears, there is nothing to
/// connect to.
pub fn ssh(lab: &Lab, vm: &VmDefinition, command: &[String]) -> Result<Command> {
    let net = lab.net()?;
    let ip = vm
        .ip
        .with_context(|| format!("{} has no IP address", vm.name))?;
    let console = std::fs::read(lab.vm_file(&vm.name, VmFile::Console)).unwrap_or_default();
    let keys = console_host_keys(&String::from_utf8_lossy(&console));
    if keys.is_empty() {
        bail!(
            "{} has not printed its SSH host keys on its console yet (cloud-init does that when it is done)",
            vm.name
        );
    }
    let known: String = keys.iter().map(|k| format!("{ip} {k}\n")).collect();
    let known_hosts = lab.dir("ssh").join(format!("known_hosts.{}", vm.name));
    crate::store::write_atomic(&known_hosts, known.as_bytes())?;
    let mut c = net.command("ssh")?;
    c.arg("-i")
        .arg(lab.ssh_key())
        .args([
            "-o",
            "LogLevel=ERROR",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=5",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
        ])
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
        .arg(format!("pxelab@{ip}"))
        .args(command);
    Ok(c)
}

/// The host public keys (`<type> <base64>`) of the last `BEGIN SSH HOST KEY KEYS` block that
/// cloud-init printed on the console.
fn console_host_keys(console: &str) -> Vec<String> {
    let Some(start) = console.rfind("-----BEGIN SSH HOST KEY KEYS-----") else {
        return Vec::new();
    };
    let block = &console[start..];
    let Some(end) = block.find("-----END SSH HOST KEY KEYS-----") else {
        return Vec::new();
    };
    block[..end]
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let (kind, key) = (words.next()?, words.next()?);
            let plausible = (kind.starts_with("ssh-") || kind.starts_with("ecdsa-"))
                && key
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b));
            plausible.then(|| format!("{kind} {key}"))
        })
        .collect()
}

/// Forget the install: the next boot runs the installer again on a blank disk.
pub fn reprovision(lab: &Lab, name: &str) -> Result<()> {
    let vm = definition(lab, name)?;
    qemu::stop(
        &lab.vm_file(name, VmFile::Pid),
        &lab.vm_file(name, VmFile::Qmp),
        Duration::from_secs(10),
    )?;
    let _ = std::fs::remove_file(lab.vm_file(name, VmFile::Disk));
    create_disk(lab, name, "20G")?;
    // The stack keeps `installed` in its state file; removing it makes /ipxe answer "install".
    let _ = std::fs::remove_file(lab.dir("state").join(format!("{name}.state")));
    forget_host_key(lab, &vm)?;
    println!("{name}: disk blanked and install state cleared; `cargo xtask lab vm start {name}` installs it again");
    Ok(())
}

pub fn remove(lab: &Lab, name: &str) -> Result<()> {
    let vm = definition(lab, name)?;
    qemu::stop(
        &lab.vm_file(name, VmFile::Pid),
        &lab.vm_file(name, VmFile::Qmp),
        Duration::from_secs(10),
    )?;
    for kind in [
        VmFile::Definition,
        VmFile::Disk,
        VmFile::Vars,
        VmFile::Console,
    ] {
        let _ = std::fs::remove_file(lab.vm_file(name, kind));
    }
    for suffix in ["state", "timeline.jsonl"] {
        let _ = std::fs::remove_file(lab.dir("state").join(format!("{name}.{suffix}")));
    }
    forget_host_key(lab, &vm)?;
    println!("{name} removed");
    Ok(())
}

fn forget_host_key(lab: &Lab, vm: &VmDefinition) -> Result<()> {
    let _ = std::fs::remove_file(lab.dir("ssh").join(format!("known_hosts.{}", vm.name)));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::console_host_keys;

    #[test]
    fn host_keys_come_from_the_last_console_block() {
        let console = "\
-----BEGIN SSH HOST KEY KEYS-----\r
ssh-ed25519 AAAAold root@t\r
-----END SSH HOST KEY KEYS-----\r
[  12.0] reboot\r
-----BEGIN SSH HOST KEY KEYS-----\r
ecdsa-sha2-nistp256 AAAAE2Vj= root@t\r
ssh-ed25519 AAAAC3Nz root@t\r
garbage line\r
-----END SSH HOST KEY KEYS-----\r
";
        assert_eq!(
            console_host_keys(console),
            vec!["ecdsa-sha2-nistp256 AAAAE2Vj=", "ssh-ed25519 AAAAC3Nz"]
        );
        assert!(
            console_host_keys("-----BEGIN SSH HOST KEY KEYS-----\nssh-ed25519 AAAA").is_empty()
        );
        assert!(console_host_keys("nothing here").is_empty());
    }
}
