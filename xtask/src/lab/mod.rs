//! `cargo xtask lab …`: the lab — the stack in its own network namespace and QEMU targets on it.
//!
//! `up` is the project's main job: build or reuse every artifact, create the namespace, start
//! the stack, define and boot the targets, follow their timelines, and wait until each one is
//! installed, rebooted from its disk and answering SSH. Every other verb is a piece of that.

pub mod artifacts;
pub mod console;
pub mod diskmode;
pub mod follow;
pub mod home;
pub mod net;
pub mod qemu;
pub mod ssh;
pub mod stack;
pub mod targets;
pub mod vms;

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use pxelab_contract::{Arch, BootMode};

use self::{
    home::{Lab, StackKind, VmFile},
    net::LabNet,
    qemu::{AccelChoice, Firmware},
};
use crate::process::{self, pid};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: LabCommand,
}

#[derive(clap::Subcommand)]
enum LabCommand {
    /// Build or reuse everything, start the stack and N targets, wait until all are installed,
    /// rebooted from disk and reachable over SSH; print a summary. Safe to run again.
    Up(UpArgs),
    /// Show the stack and every VM: state, phase, address.
    Status,
    /// Stop every VM and the stack, delete the namespace, taps and runtime files.
    Down {
        /// Also delete VM definitions, disks, states and logs (distro images and keys stay).
        #[arg(long)]
        purge: bool,
    },
    /// Manage the stack process: status, restart, reload.
    Stack {
        #[command(subcommand)]
        command: StackCommand,
    },
    /// Manage targets one by one.
    Vm {
        #[command(subcommand)]
        command: VmCommand,
    },
}

#[derive(clap::Args, Clone)]
pub struct UpArgs {
    /// How many targets to provision.
    #[arg(long, default_value_t = 1)]
    pub targets: u32,
    /// Distro to install (see `cargo xtask distro list`).
    #[arg(long, default_value = "debian-12")]
    pub distro: String,
    #[arg(long, default_value = "x86_64")]
    pub arch: Arch,
    /// How targets reach iPXE [default: what each target booted with last (a machine keeps its
    /// firmware across `lab down` and `lab up`), else uefi].
    #[arg(long, value_enum)]
    pub firmware: Option<Firmware>,
    #[arg(long, value_enum, default_value = "auto")]
    pub accel: AccelChoice,
    /// The lab subnet (only used when the lab is first created).
    #[arg(long, default_value = home::DEFAULT_SUBNET)]
    pub subnet: String,
    /// Run the stack as a plain process or as the built OCI image under podman
    /// [default: what the lab already runs, else process].
    #[arg(long, value_enum)]
    pub stack: Option<StackKind>,
    /// Give up on a target after this many seconds.
    #[arg(long, default_value_t = 1800)]
    pub timeout: u64,
    /// IPv6 too: the stack serves DHCPv6 on the lab's /64 (router advertisements with the
    /// managed flag, a reservation per VM) and AAAA names, and every VM gets an IPv6 address
    /// (the lab's prefix with its IPv4 host number), also on its installed system. The lab
    /// keeps it (lab.json) until `lab down --purge`.
    #[arg(long)]
    pub ipv6: bool,
}

#[derive(clap::Subcommand)]
enum StackCommand {
    /// Is the stack running and healthy?
    Status,
    /// Stop and start the stack (VMs keep running; installs resume).
    Restart,
    /// Ask the stack to re-read VM definitions now (SIGHUP); with --image, swap in a stack
    /// image instead.
    Reload {
        /// Run the stack from this OCI archive (e.g. a rebuilt build/stack/x86_64/
        /// pxeboot-stack.oci.tar) under podman from now on. VMs keep running; a target in the
        /// middle of its install resumes its download.
        #[arg(long, value_name = "OCI_ARCHIVE")]
        image: Option<PathBuf>,
    },
}

#[derive(clap::Subcommand)]
enum VmCommand {
    /// Define a target (MAC and IP allocated unless given) and create its blank disk.
    Create(CreateArgs),
    /// Boot a target (network boot first; the stack decides installer or disk) and follow it
    /// until it answers SSH (Ctrl-C leaves it running).
    Start {
        name: String,
        /// How it reaches iPXE [default: what it booted with last, else uefi].
        #[arg(long, value_enum)]
        firmware: Option<Firmware>,
        #[arg(long, value_enum, default_value = "auto")]
        accel: AccelChoice,
        /// Boot the installer's console shell instead of installing (also once installed);
        /// stored in the VM's definition until the next `vm start` without it.
        #[arg(long)]
        installer_shell: bool,
        /// Stay in the installer after installing instead of rebooting into the disk; stored
        /// like --installer-shell.
        #[arg(long)]
        no_reboot: bool,
    },
    /// Shut a target down (`systemctl poweroff` over SSH and the ACPI power button), cutting
    /// its power if it has not powered off within 45 s.
    Stop { name: String },
    /// List targets.
    List,
    /// Attach to a target's serial console (read-write; Ctrl-] detaches).
    Console {
        name: String,
        /// Follow the console's log read-only instead (Ctrl-C stops).
        #[arg(long, short)]
        follow: bool,
        /// Print the console's log so far instead.
        #[arg(long, conflicts_with = "follow")]
        log: bool,
    },
    /// Copy files between the host and a target: `NAME:PATH LOCAL` or `LOCAL NAME:PATH`
    /// (scp inside the lab namespace).
    Copy {
        from: String,
        to: String,
        /// Copy directories recursively.
        #[arg(long, short)]
        recursive: bool,
    },
    /// Print a target's timeline as the stack recorded it.
    Logs { name: String },
    /// SSH into a target (from inside the lab namespace); extra arguments run as a command.
    Ssh {
        name: String,
        /// Connect to the target's IPv6 address (a lab brought up with `--ipv6`).
        #[arg(long)]
        ipv6: bool,
        #[arg(trailing_var_arg = true)]
        command: Vec<String>,
    },
    /// Install again at the next boot: stop it, blank its disk (same size), and have the stack
    /// forget the install (the stack is started if it is not running).
    Reprovision { name: String },
    /// Stop a target and delete its definition, disk and logs.
    Rm { name: String },
}

#[derive(clap::Args)]
struct CreateArgs {
    name: String,
    #[arg(long, default_value = "debian-12")]
    distro: String,
    #[arg(long, default_value = "x86_64")]
    arch: Arch,
    /// MAC address (default: derived from the name).
    #[arg(long)]
    mac: Option<String>,
    /// IPv4 address on the lab subnet (default: the first free one).
    #[arg(long)]
    ip: Option<Ipv4Addr>,
    /// Boot diskless from an NFS root instead of installing.
    #[arg(long)]
    diskless: bool,
    /// No PXE, no installer: boot a copy-on-write overlay of the distro's disk image
    /// (`rootfs.img`) with its own kernel and initramfs, seeded by the stack's NoCloud documents
    /// (`pxeboot: false`).
    #[arg(long, conflicts_with = "diskless")]
    disk_mode: bool,
    /// Disk size for qemu-img (e.g. 20G); a reprovision keeps it.
    #[arg(long, default_value = targets::DEFAULT_DISK_SIZE)]
    disk_size: String,
    /// After installing, reboot through the firmware (network boot, then the disk), as a real
    /// machine's next power cycle does, instead of the installer switching root into the
    /// installed system on the kernel it runs; slower by the firmware's and a kernel's boot.
    #[arg(long, alias = "no-kexec", conflicts_with_all = ["diskless", "disk_mode"])]
    firmware_reboot: bool,
}

pub fn run(args: Args) -> Result<()> {
    let mut lab = Lab::open()?;
    match args.command {
        LabCommand::Up(up) => targets::up(lab, &up).map(drop),
        LabCommand::Status => status(&lab),
        LabCommand::Down { purge } => down(&lab, purge),
        LabCommand::Stack { command } => match command {
            StackCommand::Status => stack_status(&lab),
            StackCommand::Restart => {
                stack::stop(&lab)?;
                stack::start(&lab)?;
                stack::wait_healthy(&lab, Duration::from_secs(20))?;
                println!("stack restarted");
                Ok(())
            }
            StackCommand::Reload { image: Some(image) } => {
                if stack::running(&lab).is_none() {
                    bail!("the stack is not running: `cargo xtask lab up` first");
                }
                stack::reload_image(&mut lab, &image)?;
                println!(
                    "stack now runs {} under podman; VMs untouched",
                    image.display()
                );
                Ok(())
            }
            StackCommand::Reload { image: None } => {
                stack::running(&lab)
                    .context("the stack is not running: `cargo xtask lab up`")?
                    .signal(libc::SIGHUP);
                println!("stack asked to reload VM definitions");
                Ok(())
            }
        },
        LabCommand::Vm { command } => vm_command(&lab, command),
    }
}

fn vm_command(lab: &Lab, command: VmCommand) -> Result<()> {
    match command {
        VmCommand::Create(c) => {
            if c.diskless {
                process::require_root("a diskless target", net::NO_ROOTLESS_NFS)?;
            }
            lab.create_dirs()?;
            let key = ssh::ensure_key(lab)?;
            let request = vms::VmRequest {
                name: c.name,
                // The stack finds images by recipe name (`debian-12`), not by alias (`debian`).
                distro: crate::distro::canonical_name(&c.distro)?,
                arch: c.arch,
                mac: c.mac,
                ip: c.ip,
                boot: if c.diskless {
                    BootMode::Nfsroot
                } else {
                    BootMode::Install
                },
            };
            let vm = vms::define(&lab.vms_dir(), &request, lab.subnet()?, &key, |vm| {
                vms::assign_ipv6(lab, vm)?;
                vm.firmware_reboot = c.firmware_reboot;
                if c.disk_mode {
                    vm.pxeboot = false;
                    diskmode::create(lab, vm, &c.disk_size)
                } else {
                    targets::create_disk(lab, &vm.name, &c.disk_size)
                }
            })?;
            println!(
                "defined {} (MAC {}, IP {}{})",
                vm.name,
                vm.mac,
                vm.ip.map(|i| i.to_string()).unwrap_or_default(),
                vm.ipv6.map(|i| format!(", IPv6 {i}")).unwrap_or_default()
            );
            Ok(())
        }
        VmCommand::Start {
            name,
            firmware,
            accel,
            installer_shell,
            no_reboot,
        } => {
            if pid::read(&lab.vm_file(&name, VmFile::Pid)).is_some() {
                bail!("{name} is already running: `cargo xtask lab vm stop {name}` first");
            }
            let vm = targets::set_switches(lab, &name, installer_shell, no_reboot)?;
            let accel = qemu::resolve_accel(accel, vm.arch, &lab.run_dir())?;
            let started = follow::now_ms();
            let firmware = targets::firmware_for(lab, &name, firmware);
            targets::start_vm(lab, &vm, firmware, accel)?;
            if installer_shell || no_reboot {
                println!("{name} started; its console: cargo xtask lab vm console {name}");
                return Ok(());
            }
            eprintln!("following {name}; Ctrl-C leaves it running");
            let started = [(name.clone(), started)].into_iter().collect();
            let rows = follow::wait_all(lab, &[vm], &started, targets::FOLLOW_TIMEOUT)?;
            follow::print_summary(&rows);
            Ok(())
        }
        VmCommand::Stop { name } => {
            match targets::stop_vm(lab, &name)? {
                qemu::Stopped::NotRunning => println!("{name} was not running"),
                _ => println!("{name} stopped"),
            }
            Ok(())
        }
        VmCommand::List => status(lab),
        VmCommand::Console { name, follow, log } => {
            let path = lab.vm_file(&name, VmFile::Console);
            if !(follow || log) {
                return console::attach(lab, &name);
            }
            if !path.exists() {
                bail!(
                    "no console log for {name:?} at {}: has it been started?",
                    path.display()
                );
            }
            let sh = process::shell()?;
            if follow {
                xshell::cmd!(sh, "tail -n 50 -f {path}").run()?;
            } else {
                xshell::cmd!(sh, "cat {path}").run()?;
            }
            Ok(())
        }
        VmCommand::Copy {
            from,
            to,
            recursive,
        } => {
            let (from, to) = (ssh::CopyEnd::parse(&from)?, ssh::CopyEnd::parse(&to)?);
            let vm = targets::definition(lab, ssh::copy_vm(&from, &to)?)?;
            let status = ssh::copy(lab, &vm, &from, &to, recursive)?.status()?;
            std::process::exit(status.code().unwrap_or(1));
        }
        VmCommand::Logs { name } => {
            let (status, body) = stack::get(lab, &format!("/vms/{name}/timeline"))?;
            if status != 200 {
                bail!("the stack answered {status}: {}", body.trim());
            }
            print!("{body}");
            Ok(())
        }
        VmCommand::Ssh {
            name,
            ipv6,
            command,
        } => {
            let vm = targets::definition(lab, &name)?;
            let status = ssh::command_over(lab, &vm, ipv6, &command)?.status()?;
            std::process::exit(status.code().unwrap_or(1));
        }
        VmCommand::Reprovision { name } => targets::reprovision(lab, &name),
        VmCommand::Rm { name } => targets::remove(lab, &name),
    }
}

fn stack_status(lab: &Lab) -> Result<()> {
    match stack::running(lab).map(|pid| pid.id()) {
        None => println!("stack: not running"),
        Some(pid) => match stack::get(lab, "/healthz") {
            Ok((200, _)) => println!(
                "stack: running (pid {pid}), healthy, http://{}/",
                lab.net()?.subnet.gateway()
            ),
            Ok((code, body)) => println!(
                "stack: running (pid {pid}), unhealthy: HTTP {code} {}",
                body.trim()
            ),
            Err(e) => println!("stack: running (pid {pid}), not answering: {e:#}"),
        },
    }
    Ok(())
}

fn status(lab: &Lab) -> Result<()> {
    stack_status(lab)?;
    let vms = vms::load_all(&lab.vms_dir())?;
    if vms.is_empty() {
        println!("no VMs defined: `cargo xtask lab up` or `cargo xtask lab vm create <name>`");
        return Ok(());
    }
    let states = follow::fetch_status(lab).unwrap_or_default().vms;
    let ssh = ssh_probes(lab, &vms, &states);
    // The IPV6 column only in a lab where some VM has an IPv6 address (`lab up --ipv6`).
    let v6: Vec<String> = vms
        .iter()
        .map(|vm| vm.ipv6.map_or("-".into(), |i| i.to_string()))
        .collect();
    let v6_width = if vms.iter().any(|vm| vm.ipv6.is_some()) {
        v6.iter().map(String::len).max().unwrap_or(0).max(4) + 1
    } else {
        0
    };
    let v6_cell = |text: &str| {
        if v6_width == 0 {
            String::new()
        } else {
            format!("{text:<v6_width$}")
        }
    };
    println!(
        "{:<16} {:<7} {:<18} {:<15} {}{:<10} {:<8} {:<11} {:<5} STATE / LAST EVENT",
        "NAME",
        "ARCH",
        "MAC",
        "IP",
        v6_cell("IPV6"),
        "DISTRO",
        "BOOT",
        "QEMU",
        "SSH"
    );
    for ((vm, ssh), v6) in vms.iter().zip(&ssh).zip(&v6) {
        let running = if pid::read(&lab.vm_file(&vm.name, VmFile::Pid)).is_some() {
            "running"
        } else {
            "stopped"
        };
        let state = states
            .iter()
            .find(|s| s.name == vm.name)
            .map(follow::describe)
            .unwrap_or_else(|| "-".into());
        let boot = match (vm.boot, vm.pxeboot) {
            (BootMode::Nfsroot, _) => "nfsroot",
            (BootMode::Install, true) => "install",
            (BootMode::Install, false) => "disk",
        };
        let ip = vm.ip.map(|i| i.to_string()).unwrap_or_default();
        let ssh = match ssh {
            None => "-",
            Some(Ok(())) => "up",
            Some(Err(_)) => "down",
        };
        println!(
            "{:<16} {:<7} {:<18} {:<15} {}{:<10} {:<8} {:<11} {:<5} {}",
            vm.name,
            vm.arch.as_str(),
            vm.mac,
            ip,
            v6_cell(v6),
            vm.distro,
            boot,
            running,
            ssh,
            state
        );
    }
    for (vm, ssh) in vms.iter().zip(&ssh) {
        if let Some(Err(why)) = ssh {
            println!(
                "{}: SSH is down ({why}); `cargo xtask lab vm console {} --log` shows its console",
                vm.name, vm.name
            );
        }
    }
    Ok(())
}

/// How long `lab status` gives a VM to answer SSH.
const SSH_PROBE: Duration = Duration::from_secs(15);

/// Whether each running VM that should answer SSH (installed, diskless or booting its own
/// disk) does; `None` for the others. Probed from inside the namespace, all at once.
fn ssh_probes(
    lab: &Lab,
    vms: &[pxelab_contract::VmDefinition],
    states: &[pxelab_contract::VmStatus],
) -> Vec<Option<std::result::Result<(), String>>> {
    std::thread::scope(|scope| {
        let probes: Vec<_> = vms
            .iter()
            .map(|vm| {
                let state = states.iter().find(|s| s.name == vm.name).map(|s| s.state);
                let expected = pid::read(&lab.vm_file(&vm.name, VmFile::Pid)).is_some()
                    && (vm.boot == BootMode::Nfsroot
                        || !vm.pxeboot
                        || state == Some(pxelab_contract::VmState::Installed));
                expected.then(|| scope.spawn(|| ssh::probe(lab, vm, SSH_PROBE)))
            })
            .collect();
        probes
            .into_iter()
            .map(|p| {
                p.map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err("the SSH probe panicked".into()))
                })
            })
            .collect()
    })
}

/// Stops everything this lab started and removes the namespace; disks stay unless `purge`.
pub fn down(lab: &Lab, purge: bool) -> Result<()> {
    let stopped = stop_processes(lab)?;
    let net = lab.net()?;
    net.destroy()?;
    let _ = std::fs::remove_dir_all(lab.run_dir());
    if purge {
        lab.purge()?;
    }
    println!(
        "lab down: {stopped} VM(s) stopped, stack stopped, namespace {} removed{}",
        net.ns,
        if purge { ", VMs and disks purged" } else { "" }
    );
    Ok(())
}

/// Stops every VM (all at once, see [`targets::stop_vms`]) and the stack; how many VMs were
/// running.
fn stop_processes(lab: &Lab) -> Result<usize> {
    let mut names: Vec<String> = vms::load_all(&lab.vms_dir())
        .unwrap_or_default()
        .into_iter()
        .map(|vm| vm.name)
        .collect();
    // Pid files of VMs whose definition is gone still name processes this lab started.
    for name in lab.vm_pidfiles() {
        if !names.contains(&name) {
            names.push(name);
        }
    }
    let stopped = targets::stop_vms(lab, &names)?
        .into_iter()
        .filter(|s| *s != qemu::Stopped::NotRunning)
        .count();
    stack::stop(lab)?;
    Ok(stopped)
}

/// The lab network, created if needed. Without it (a first `lab up`, or a reboot took it), no
/// process of this lab can work: what a pid file still names is stopped, and `run/` starts empty.
pub fn ensure_network(lab: &Lab) -> Result<LabNet> {
    let net = lab.net()?;
    forget_run_without(lab, &net)?;
    net.create()?;
    Ok(net)
}

/// Empties `run/` unless `net` exists.
fn forget_run_without(lab: &Lab, net: &LabNet) -> Result<()> {
    if net.exists() {
        return Ok(());
    }
    stop_processes(lab)?;
    let run = lab.run_dir();
    if run.exists() {
        std::fs::remove_dir_all(&run).with_context(|| format!("clearing {}", run.display()))?;
    }
    std::fs::create_dir_all(&run).with_context(|| format!("creating {}", run.display()))
}

/// The stack, started (with its network) unless it runs, and healthy.
pub fn ensure_stack(lab: &Lab) -> Result<()> {
    if stack::running(lab).is_none() {
        lab.create_dirs()?;
        ensure_network(lab)?;
        stack::start(lab)?;
    }
    stack::wait_healthy(lab, Duration::from_secs(20))
}

/// Set by the interrupt handler of a throw-away lab (under the lock) before it takes the lab
/// down. Starting QEMU or the stack holds the lock ([`may_start`]) and is refused once it is
/// set: the main thread runs on while the handler works, and must not start anything behind
/// its back.
static TAKEN_DOWN: Mutex<bool> = Mutex::new(false);

/// Held while a process of the lab is started; an error once an interrupt took the lab down.
pub fn may_start() -> Result<MutexGuard<'static, bool>> {
    let guard = TAKEN_DOWN.lock().unwrap_or_else(|e| e.into_inner());
    if *guard {
        bail!("interrupted: the lab is being taken down");
    }
    Ok(guard)
}

/// For throw-away labs (e2e, bench): on Ctrl-C or SIGTERM, take the lab at `home` down
/// (VMs, stack, namespace, files) and exit, so an interrupted run leaves nothing behind. With
/// `keep`, say where the lab is instead and leave it up for inspection.
pub fn down_on_interrupt(home: PathBuf, keep: bool) -> Result<()> {
    ctrlc::set_handler(move || {
        // Held until `exit`: nothing starts after this.
        let mut taken_down = TAKEN_DOWN.lock().unwrap_or_else(|e| e.into_inner());
        *taken_down = true;
        if keep {
            eprintln!(
                "\ninterrupted: lab kept at {} (`PXELAB_HOME={} cargo xtask lab down --purge` when done)",
                home.display(),
                home.display()
            );
        } else {
            eprintln!("\ninterrupted: taking the lab at {} down", home.display());
            match Lab::at(home.clone()).and_then(|lab| down(&lab, true)) {
                Ok(()) => remove_while_written(&home),
                Err(e) => eprintln!("lab down failed: {e:#}"),
            }
        }
        std::process::exit(130);
    })
    .context("installing the Ctrl-C handler")
}

/// Removes `dir` while the interrupted main thread, which runs on until `exit`, may still be
/// creating files in it (a removal that meets a new file fails with "directory not empty").
fn remove_while_written(dir: &std::path::Path) {
    for _ in 0..50 {
        match std::fs::remove_dir_all(dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                std::thread::sleep(Duration::from_millis(20))
            }
            _ => return,
        }
    }
}

/// Where build outputs for `arch` are (the repository's `build/stack/<arch>/`).
pub fn stack_build_dir(arch: Arch) -> PathBuf {
    crate::util::project_root()
        .join("build")
        .join("stack")
        .join(arch.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::pid::tests::Sleeper as Unrelated;

    /// A lab whose pid files are stale (as after a reboot): they name `pid`, which now belongs
    /// to an unrelated process. Both the old format (a pid alone) and a pid with another start
    /// time.
    fn lab_with_stale_pid_files(pid: u32) -> (tempfile::TempDir, Lab) {
        let dir = tempfile::tempdir().unwrap();
        let lab = Lab::at(dir.path().join("lab")).unwrap();
        lab.create_dirs().unwrap();
        lab.save_config().unwrap();
        let bare = format!("{pid}\n");
        let other_start = format!("{pid} 1\n");
        std::fs::write(lab.stack_pidfile(), &bare).unwrap();
        std::fs::write(lab.vm_file("target-1", VmFile::Pid), &bare).unwrap();
        std::fs::write(lab.vm_file("target-2", VmFile::Pid), &other_start).unwrap();
        std::fs::write(lab.netns_holder_pidfile(), &other_start).unwrap();
        (dir, lab)
    }

    #[test]
    fn lab_down_never_signals_what_a_stale_pid_file_names() {
        let mut unrelated = Unrelated::spawn();
        let (_dir, lab) = lab_with_stale_pid_files(unrelated.0.id());
        down(&lab, false).unwrap();
        assert!(unrelated.alive(), "lab down killed an unrelated process");
        assert!(!lab.run_dir().exists());
    }

    #[test]
    fn run_is_cleared_when_the_namespace_is_gone() {
        let mut unrelated = Unrelated::spawn();
        let (_dir, lab) = lab_with_stale_pid_files(unrelated.0.id());
        std::fs::write(lab.vm_file("target-1", VmFile::Qmp), "").unwrap();
        let net = lab.net().unwrap();
        assert!(!net.exists());
        forget_run_without(&lab, &net).unwrap();
        assert!(
            unrelated.alive(),
            "clearing run/ killed an unrelated process"
        );
        let left: Vec<_> = std::fs::read_dir(lab.run_dir()).unwrap().collect();
        assert!(left.is_empty(), "left in run/: {left:?}");
    }
}
