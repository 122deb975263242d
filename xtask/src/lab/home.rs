//! The lab home (`PXELAB_HOME`, default `~/.pxelab`), its config, and where everything lives
//! inside it: every path in the lab home is named here, nowhere else.
//!
//! ```text
//! lab.json                 namespace name and subnet, fixed at the first `lab up`; stack kind, IPv6
//! vms/<name>.json          VM definitions (the stack reads them)
//! images/<distro>/<arch>/  distro artifacts (`distro pull`), served as /images/
//! initrds/<arch>/          installer initrd (`build-stack`), served as /initrds/
//! tftp/                    iPXE first stages and boot.ipxe (dnsmasq's TFTP root)
//! state/                   the stack's own: VM states, timelines, dnsmasq files, control.sock
//! disks/<name>.qcow2       target disks, <name>-vars.fd UEFI variable stores, <name>.firmware
//! bin/pxelab-stack         the stack binary the lab runs (copied from `build-stack`)
//! run/                     pid files, QMP and serial console sockets, a rootless lab's netns
//!                          holder (gone after `lab down`)
//! logs/                    stack.log, <name>.console.log
//! ssh/id_ed25519           the lab's key pair (private key mode 0600), known_hosts.<name>
//! ```
//!
//! Unlike the original (whose `PVMLAB_HOME` named the *parent* of `.pvmlab`), `PXELAB_HOME` names
//! the lab home itself, so a test can point it at a temp dir without a hidden subdirectory.
//!
//! This module uses no other part of the lab: the network (`Lab::net`) is `net.rs`'s.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use pxelab_contract::{Arch, CONTROL_SOCKET};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const DEFAULT_SUBNET: &str = "10.77.0.0/24";

/// The directories `lab up` creates (`bin/` is made when the stack binary is copied there).
const DIRS: [&str; 9] = [
    "vms", "images", "initrds", "tftp", "state", "disks", "run", "logs", "ssh",
];

/// What `lab down --purge` deletes: VMs and everything about them (distro images, the stack
/// binary and the lab's key stay).
const PURGED: [&str; 6] = ["vms", "disks", "state", "logs", "initrds", "tftp"];

/// The lab home directory (not created here), absolute.
pub fn lab_home() -> Result<PathBuf> {
    let home = match std::env::var_os("PXELAB_HOME").filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
            Some(home) => PathBuf::from(home).join(".pxelab"),
            None => {
                bail!("neither PXELAB_HOME nor HOME is set: set PXELAB_HOME to the lab's directory")
            }
        },
    };
    std::path::absolute(&home).with_context(|| format!("resolving {}", home.display()))
}

/// `<lab home>/images/<distro>/<arch>`: what the boot handler serves as `/images/<distro>/<arch>/`.
pub fn images_dir(distro: &str, arch: &str) -> Result<PathBuf> {
    Ok(Lab::layout(lab_home()?).images_dir(distro, arch))
}

/// How the lab runs the stack.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StackKind {
    /// The static `pxelab-stack` binary, run directly inside the namespace.
    #[default]
    Process,
    /// The built OCI image, run by podman (runc) with the namespace as its network.
    Container,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LabConfig {
    pub namespace: String,
    pub subnet: String,
    #[serde(default)]
    pub stack: StackKind,
    /// The OCI archive a container stack runs, when `lab stack reload --image` chose one
    /// (otherwise the one `build-stack` wrote).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<PathBuf>,
    /// The stack runs `--dhcp proxy`: another DHCP server on the bridge leases the addresses
    /// (the e2e's proxy part sets it while it runs such a server).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub proxy_dhcp: bool,
    /// `lab up --ipv6`: the stack serves DHCPv6 and AAAA names on the lab's /64 and every VM
    /// gets an IPv6 address ([`super::net::LabNet::vm_ipv6`]). Kept until `lab down --purge`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ipv6: bool,
}

#[derive(Clone)]
pub struct Lab {
    home: PathBuf,
    pub config: LabConfig,
}

/// A VM's files in the lab home.
#[derive(Clone, Copy)]
pub enum VmFile {
    Definition,
    Disk,
    Vars,
    /// The firmware it last booted with (`uefi`, `bios`, `uefi-pxe`; see `targets::firmware_for`).
    Firmware,
    /// The serial console's log (everything the VM printed, and the echo of what was typed).
    Console,
    /// The serial console itself: QEMU listens on this socket (`lab vm console` attaches).
    ConsoleSocket,
    Pid,
    Qmp,
}

impl Lab {
    /// The lab at `PXELAB_HOME`, with its saved config, or a default one (nothing is created).
    pub fn open() -> Result<Lab> {
        Lab::at(lab_home()?)
    }

    pub fn at(home: PathBuf) -> Result<Lab> {
        let home =
            std::path::absolute(&home).with_context(|| format!("resolving {}", home.display()))?;
        let mut lab = Lab::layout(home);
        let path = lab.config_file();
        if let Ok(text) = std::fs::read_to_string(&path) {
            lab.config = serde_json::from_str(&text)
                .with_context(|| format!("{} is damaged: fix or delete it", path.display()))?;
        }
        Ok(lab)
    }

    /// The layout at `home` with a default config.
    fn layout(home: PathBuf) -> Lab {
        let config = LabConfig {
            namespace: default_namespace(&home),
            subnet: DEFAULT_SUBNET.into(),
            stack: Default::default(),
            image: None,
            proxy_dhcp: false,
            ipv6: false,
        };
        Lab { home, config }
    }

    pub fn save_config(&self) -> Result<()> {
        std::fs::create_dir_all(&self.home)
            .with_context(|| format!("creating {}", self.home.display()))?;
        let text = serde_json::to_string_pretty(&self.config)? + "\n";
        crate::store::write_atomic(&self.config_file(), text.as_bytes())
    }

    /// Whether `lab up` has created this lab (its config is saved).
    pub fn is_created(&self) -> bool {
        self.config_file().exists()
    }

    pub fn home(&self) -> &Path {
        &self.home
    }

    /// Creates every directory of the layout.
    pub fn create_dirs(&self) -> Result<()> {
        for d in DIRS {
            let dir = self.home.join(d);
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        Ok(())
    }

    /// Deletes what `lab down --purge` deletes.
    pub fn purge(&self) -> Result<()> {
        for d in PURGED {
            let dir = self.home.join(d);
            if dir.exists() {
                std::fs::remove_dir_all(&dir)
                    .with_context(|| format!("removing {}", dir.display()))?;
            }
        }
        let _ = std::fs::remove_file(self.config_file());
        Ok(())
    }

    fn config_file(&self) -> PathBuf {
        self.home.join("lab.json")
    }

    pub fn vms_dir(&self) -> PathBuf {
        self.home.join("vms")
    }

    /// `images/<distro>/<arch>/`, where `distro pull` puts a distro's artifacts.
    pub fn images_dir(&self, distro: &str, arch: &str) -> PathBuf {
        self.home.join("images").join(distro).join(arch)
    }

    /// The root the stack serves as `/images/` (its `--images-dir`).
    pub fn images_root(&self) -> PathBuf {
        self.home.join("images")
    }

    /// The installer initrd the stack serves as `/initrds/<arch>/initrd.img`.
    pub fn initrd(&self, arch: Arch) -> PathBuf {
        self.home
            .join("initrds")
            .join(arch.as_str())
            .join("initrd.img")
    }

    /// dnsmasq's TFTP root.
    pub fn tftp_dir(&self) -> PathBuf {
        self.home.join("tftp")
    }

    /// The stack's own directory: the lab reads nothing in it but through the stack's API, and
    /// writes nothing in it.
    pub fn state_dir(&self) -> PathBuf {
        self.home.join("state")
    }

    /// The stack's control socket (its HTTP API on a Unix socket, mode 0600).
    pub fn control_socket(&self) -> PathBuf {
        self.state_dir().join(CONTROL_SOCKET)
    }

    /// nfs-ganesha's pid file while the stack runs it (only the e2e looks at it).
    pub fn nfs_server_pidfile(&self) -> PathBuf {
        self.state_dir().join("nfs").join("ganesha.pid")
    }

    /// Where a directory of the stack image's data dir (one of its declared volumes, such as
    /// `/var/lib/pxelab/vms`) is in the lab home: the lab home is that data dir's layout.
    pub fn volume_source(&self, volume: &Path) -> Result<PathBuf> {
        let name = volume
            .file_name()
            .with_context(|| format!("volume {} has no name", volume.display()))?;
        Ok(self.home.join(name))
    }

    pub fn disks_dir(&self) -> PathBuf {
        self.home.join("disks")
    }

    /// The stack binary the lab runs (a copy of what `build-stack` built).
    pub fn stack_binary(&self) -> PathBuf {
        self.home.join("bin").join("pxelab-stack")
    }

    /// Pid files, QMP sockets and scratch files of running processes.
    pub fn run_dir(&self) -> PathBuf {
        self.home.join("run")
    }

    pub fn stack_pidfile(&self) -> PathBuf {
        self.run_dir().join("stack.pid")
    }

    /// The pid file of the process holding a rootless lab's namespaces.
    pub fn netns_holder_pidfile(&self) -> PathBuf {
        self.run_dir().join("netns.pid")
    }

    /// The VM names of the pid files in `run/` (also of VMs whose definition is gone).
    pub fn vm_pidfiles(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.run_dir()) else {
            return Vec::new();
        };
        let holders = [self.stack_pidfile(), self.netns_holder_pidfile()];
        let mut names: Vec<String> = entries
            .flatten()
            .filter(|e| !holders.contains(&e.path()))
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_suffix(".pid").map(str::to_string)
            })
            .collect();
        names.sort();
        names
    }

    /// Every pid file in `run/`.
    pub fn pidfiles(&self) -> Vec<PathBuf> {
        let mut files = vec![self.stack_pidfile(), self.netns_holder_pidfile()];
        files.extend(
            self.vm_pidfiles()
                .iter()
                .map(|vm| self.vm_file(vm, VmFile::Pid)),
        );
        files.retain(|f| f.exists());
        files
    }

    pub fn logs_dir(&self) -> PathBuf {
        self.home.join("logs")
    }

    pub fn stack_log(&self) -> PathBuf {
        self.logs_dir().join("stack.log")
    }

    pub fn ssh_dir(&self) -> PathBuf {
        self.home.join("ssh")
    }

    /// The lab's private key (the public one is next to it, `.pub`).
    pub fn ssh_key(&self) -> PathBuf {
        self.ssh_dir().join("id_ed25519")
    }

    /// The host keys SSH trusts for `vm` (taken from its console).
    pub fn known_hosts(&self, vm: &str) -> PathBuf {
        self.ssh_dir().join(format!("known_hosts.{vm}"))
    }

    pub fn vm_file(&self, vm: &str, kind: VmFile) -> PathBuf {
        match kind {
            VmFile::Definition => self.vms_dir().join(format!("{vm}.json")),
            VmFile::Disk => self.disks_dir().join(format!("{vm}.qcow2")),
            VmFile::Vars => self.disks_dir().join(format!("{vm}-vars.fd")),
            VmFile::Firmware => self.disks_dir().join(format!("{vm}.firmware")),
            VmFile::Console => self.logs_dir().join(format!("{vm}.console.log")),
            VmFile::Pid => self.run_dir().join(format!("{vm}.pid")),
            VmFile::Qmp => self.run_dir().join(format!("{vm}.qmp")),
            VmFile::ConsoleSocket => self.run_dir().join(format!("{vm}.console")),
        }
    }
}

/// One namespace per lab home, so two labs (e.g. a test's and a user's) never share one.
fn default_namespace(home: &Path) -> String {
    format!(
        "pxelab-{}",
        &hex::encode(Sha256::digest(home.as_os_str().as_encoded_bytes()))[..8]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_fit_kernel_limits_and_differ_per_home() {
        let a = Lab::at("/tmp/lab-a".into()).unwrap();
        let b = Lab::at("/tmp/lab-b".into()).unwrap();
        assert_ne!(a.config.namespace, b.config.namespace);
        assert!(a.config.namespace.len() <= 15);
    }

    #[test]
    fn vm_pid_files_are_told_from_the_labs_own() {
        let dir = tempfile::tempdir().unwrap();
        let lab = Lab::at(dir.path().to_path_buf()).unwrap();
        lab.create_dirs().unwrap();
        for f in [
            lab.stack_pidfile(),
            lab.netns_holder_pidfile(),
            lab.vm_file("gone-1", VmFile::Pid),
            lab.vm_file("gone-1", VmFile::Qmp),
        ] {
            std::fs::write(f, "1\n").unwrap();
        }
        assert_eq!(lab.vm_pidfiles(), vec!["gone-1"]);
        assert_eq!(lab.pidfiles().len(), 3);
    }
}
