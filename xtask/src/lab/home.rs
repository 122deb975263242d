//! The lab home (`PXELAB_HOME`, default `~/.pxelab`) and where everything lives inside it.
//!
//! ```text
//! lab.json                 namespace name and subnet, fixed at the first `lab up`
//! vms/<name>.json          VM definitions (the stack reads them)
//! images/<distro>/<arch>/  distro artifacts (`distro pull`), served as /images/
//! initrds/<arch>/          installer initrd (`build-stack`), served as /initrds/
//! tftp/                    iPXE first stages and boot.ipxe (dnsmasq's TFTP root)
//! state/                   the stack's VM states, timelines, dnsmasq files, control.sock
//! disks/<name>.qcow2       target disks, and <name>-vars.fd UEFI variable stores
//! bin/pxelab-stack         the stack binary the lab runs (copied from `build-stack`)
//! run/                     pid files, QMP sockets, a rootless lab's netns holder (gone after `lab down`)
//! logs/                    stack.log, <name>.console.log
//! ssh/id_ed25519           the lab's key pair (private key mode 0600)
//! ```

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::net::{LabNet, Subnet};

pub const DEFAULT_SUBNET: &str = "10.77.0.0/24";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LabConfig {
    pub namespace: String,
    pub subnet: String,
    #[serde(default)]
    pub stack: super::stack::StackKind,
    /// The OCI archive a container stack runs, when `lab stack reload --image` chose one
    /// (otherwise the one `build-stack` wrote).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<PathBuf>,
}

pub struct Lab {
    pub home: PathBuf,
    pub config: LabConfig,
}

impl Lab {
    /// The lab at `PXELAB_HOME`, with its saved config, or a default one (nothing is created).
    pub fn open() -> Result<Lab> {
        Lab::at(crate::labhome::lab_home()?)
    }

    pub fn at(home: PathBuf) -> Result<Lab> {
        let path = home.join("lab.json");
        let config = match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text)
                .with_context(|| format!("{} is damaged: fix or delete it", path.display()))?,
            Err(_) => LabConfig {
                namespace: default_namespace(&home),
                subnet: DEFAULT_SUBNET.into(),
                stack: Default::default(),
                image: None,
            },
        };
        Ok(Lab { home, config })
    }

    pub fn save_config(&self) -> Result<()> {
        std::fs::create_dir_all(&self.home)
            .with_context(|| format!("creating {}", self.home.display()))?;
        let text = serde_json::to_string_pretty(&self.config)? + "\n";
        crate::store::write_atomic(&self.home.join("lab.json"), text.as_bytes())
    }

    pub fn net(&self) -> Result<LabNet> {
        Ok(LabNet::new(
            self.config.namespace.clone(),
            self.subnet()?,
            self.dir("run").join("netns.pid"),
        ))
    }

    pub fn subnet(&self) -> Result<Subnet> {
        self.config.subnet.parse()
    }

    pub fn dir(&self, name: &str) -> PathBuf {
        self.home.join(name)
    }

    /// Creates every directory of the layout.
    pub fn create_dirs(&self) -> Result<()> {
        for d in [
            "vms", "images", "initrds", "tftp", "state", "disks", "run", "logs", "ssh",
        ] {
            let dir = self.dir(d);
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        Ok(())
    }

    pub fn vm_file(&self, vm: &str, kind: VmFile) -> PathBuf {
        match kind {
            VmFile::Definition => self.dir("vms").join(format!("{vm}.json")),
            VmFile::Disk => self.dir("disks").join(format!("{vm}.qcow2")),
            VmFile::Vars => self.dir("disks").join(format!("{vm}-vars.fd")),
            VmFile::Console => self.dir("logs").join(format!("{vm}.console.log")),
            VmFile::Pid => self.dir("run").join(format!("{vm}.pid")),
            VmFile::Qmp => self.dir("run").join(format!("{vm}.qmp")),
        }
    }

    pub fn ssh_key(&self) -> PathBuf {
        self.dir("ssh").join("id_ed25519")
    }

    pub fn stack_pidfile(&self) -> PathBuf {
        self.dir("run").join("stack.pid")
    }
}

#[derive(Clone, Copy)]
pub enum VmFile {
    Definition,
    Disk,
    Vars,
    Console,
    Pid,
    Qmp,
}

/// Tap names are at most 15 bytes; derived from the VM name so they are stable and unique.
pub fn tap_name(vm: &str) -> String {
    format!("pxt{}", &hex::encode(Sha256::digest(vm.as_bytes()))[..10])
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
    fn names_fit_kernel_limits_and_differ_per_home() {
        assert!(tap_name("a-very-long-vm-name-indeed").len() <= 15);
        assert_ne!(tap_name("a"), tap_name("b"));
        let a = Lab::at("/tmp/lab-a".into()).unwrap();
        let b = Lab::at("/tmp/lab-b".into()).unwrap();
        assert_ne!(a.config.namespace, b.config.namespace);
        assert!(a.config.namespace.len() <= 15);
    }
}
