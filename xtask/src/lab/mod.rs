//! `cargo xtask lab …`: the lab — the stack in its own network namespace and QEMU targets on it.
//!
//! `up` is the project's main job: build or reuse every artifact, create the namespace, start
//! the stack, define and boot the targets, follow their timelines, and wait until each one is
//! installed, rebooted from its disk and answering SSH. Every other verb is a piece of that.

pub mod artifacts;
pub mod follow;
pub mod home;
pub mod net;
pub mod qemu;
pub mod ssh;
pub mod stack;
pub mod targets;
pub mod vms;

use std::{net::Ipv4Addr, path::PathBuf, time::Duration};

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
    #[arg(long, default_value = "debian")]
    pub distro: String,
    #[arg(long, default_value = "x86_64")]
    pub arch: Arch,
    /// How targets reach iPXE.
    #[arg(long, value_enum, default_value = "uefi")]
    pub firmware: Firmware,
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
    /// Boot a target (network boot first; the stack decides installer or disk).
    Start {
        name: String,
        #[arg(long, value_enum, default_value = "uefi")]
        firmware: Firmware,
        #[arg(long, value_enum, default_value = "auto")]
        accel: AccelChoice,
    },
    /// Power a target off.
    Stop { name: String },
    /// List targets.
    List,
    /// Print a target's serial console log (add --follow to keep reading).
    Console {
        name: String,
        #[arg(long, short)]
        follow: bool,
    },
    /// Print a target's timeline as the stack recorded it.
    Logs { name: String },
    /// SSH into a target (from inside the lab namespace); extra arguments run as a command.
    Ssh {
        name: String,
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
    #[arg(long, default_value = "debian")]
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
    /// Disk size for qemu-img (e.g. 20G); a reprovision keeps it.
    #[arg(long, default_value = targets::DEFAULT_DISK_SIZE)]
    disk_size: String,
}

pub fn run(args: Args) -> Result<()> {
    let mut lab = Lab::open()?;
    match args.command {
        LabCommand::Up(up) => targets::up(lab, &up),
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
            let existing = vms::load_all(&lab.vms_dir())?;
            let vm = vms::plan(&existing, &request, lab.subnet()?, &key)?;
            targets::create_disk(lab, &vm.name, &c.disk_size)?;
            vms::write_new(&lab.vms_dir(), &vm)?;
            println!(
                "defined {} (MAC {}, IP {})",
                vm.name,
                vm.mac,
                vm.ip.map(|i| i.to_string()).unwrap_or_default()
            );
            Ok(())
        }
        VmCommand::Start {
            name,
            firmware,
            accel,
        } => {
            let vm = targets::definition(lab, &name)?;
            let accel = qemu::resolve_accel(accel, vm.arch, &lab.run_dir())?;
            targets::start_vm(lab, &vm, firmware, accel)?;
            println!("{name} started; console: cargo xtask lab vm console {name} --follow");
            Ok(())
        }
        VmCommand::Stop { name } => {
            targets::stop_vm(lab, &name, Duration::from_secs(10))?;
            println!("{name} stopped");
            Ok(())
        }
        VmCommand::List => status(lab),
        VmCommand::Console { name, follow } => {
            let log = lab.vm_file(&name, VmFile::Console);
            if !log.exists() {
                bail!(
                    "no console log for {name:?} at {}: has it been started?",
                    log.display()
                );
            }
            let sh = process::shell()?;
            if follow {
                xshell::cmd!(sh, "tail -n 50 -f {log}").run()?;
            } else {
                xshell::cmd!(sh, "cat {log}").run()?;
            }
            Ok(())
        }
        VmCommand::Logs { name } => {
            let (status, body) = stack::get(lab, &format!("/vms/{name}/timeline"))?;
            if status != 200 {
                bail!("the stack answered {status}: {}", body.trim());
            }
            print!("{body}");
            Ok(())
        }
        VmCommand::Ssh { name, command } => {
            let vm = targets::definition(lab, &name)?;
            let status = ssh::command(lab, &vm, &command)?.status()?;
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
    let states = follow::fetch_status(lab).unwrap_or_default();
    println!(
        "{:<16} {:<18} {:<15} {:<10} {:<8} {:<11} STATE / LAST EVENT",
        "NAME", "MAC", "IP", "DISTRO", "BOOT", "QEMU"
    );
    for vm in vms {
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
        let boot = match vm.boot {
            BootMode::Install => "install",
            BootMode::Nfsroot => "nfsroot",
        };
        let ip = vm.ip.map(|i| i.to_string()).unwrap_or_default();
        println!(
            "{:<16} {:<18} {:<15} {:<10} {:<8} {:<11} {}",
            vm.name, vm.mac, ip, vm.distro, boot, running, state
        );
    }
    Ok(())
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

/// Stops every VM and the stack; how many VMs were running.
fn stop_processes(lab: &Lab) -> Result<usize> {
    let mut stopped = 0;
    for vm in vms::load_all(&lab.vms_dir()).unwrap_or_default() {
        if pid::read(&lab.vm_file(&vm.name, VmFile::Pid)).is_some() {
            stopped += 1;
        }
        targets::stop_vm(lab, &vm.name, Duration::from_secs(5))?;
    }
    // Pid files of VMs whose definition is gone still name processes this lab started.
    for vm in lab.vm_pidfiles() {
        targets::stop_vm(lab, &vm, Duration::from_secs(5))?;
    }
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

/// For throw-away labs (e2e, bench): on Ctrl-C or SIGTERM, take the lab at `home` down
/// (VMs, stack, namespace, files) and exit, so an interrupted run leaves nothing behind. With
/// `keep`, say where the lab is instead and leave it up for inspection.
pub fn down_on_interrupt(home: PathBuf, keep: bool) -> Result<()> {
    ctrlc::set_handler(move || {
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
