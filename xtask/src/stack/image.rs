//! What goes into the stack's container image, layer by layer, and how it runs.
//!
//! - layer 1, daemons: `/usr/sbin/dnsmasq` and `/usr/bin/ganesha.nfsd` (with its VFS backend and
//!   libnfsidmap's nsswitch plugin, both loaded with dlopen) from the pinned packages, the shared
//!   libraries they load (found by ELF `DT_NEEDED`, as for the initrd) and `/etc/netconfig`;
//!   nothing else from the packages: no docs, no maintainer scripts.
//! - layer 2, pxelab: the static `pxelab-stack` and `pxelab-installer`, the iPXE set in the TFTP
//!   root and the installer initrd where the boot handler serves it.
//! - layer 3, config: `/etc/passwd` and `/etc/group` (dnsmasq looks its user up), `/etc/mtab`
//!   (ganesha's VFS backend reads the mount table), the data directory skeleton, `/tmp`, `/run`.
//!
//! The supervisor is the entrypoint and PID 1 (it handles SIGTERM itself); everything it needs
//! to know comes from `PXELAB_*` environment variables, so `podman run -e PXELAB_INTERFACE=…
//! -e PXELAB_SERVER_IP=…` is the whole configuration.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::archive::{Archive, Record, Source};
use super::elf::{self, Tree};
use pxelab_contract::Arch;

use super::{oci, IMAGE_REF};

/// Bump when the layout below changes (it is part of the image step's cache key).
pub const LAYOUT_VERSION: u32 = 2;

/// The runtime's data directory inside the image (its `--data-dir`).
pub const DATA_DIR: &str = "/var/lib/pxelab";
pub const DNSMASQ: &str = "/usr/sbin/dnsmasq";
pub const GANESHA: &str = "/usr/bin/ganesha.nfsd";
pub const STACK_BIN: &str = "/usr/bin/pxelab-stack";
pub const INSTALLER_BIN: &str = "/usr/bin/pxelab-installer";

/// Where the stack finds its inputs and keeps its state: mounted from the host.
pub fn volumes() -> Vec<String> {
    ["vms", "images", "state"]
        .iter()
        .map(|d| format!("{DATA_DIR}/{d}"))
        .collect()
}

pub struct Inputs<'a> {
    pub arch: Arch,
    /// The extracted `stack` packages (dnsmasq-base and its dependencies).
    pub tree: &'a Tree,
    pub stack: &'a Path,
    pub installer: &'a Path,
    pub initrd: &'a Path,
    /// TFTP root files: name → path.
    pub tftp: &'a [(String, PathBuf)],
    pub epoch: u64,
}

/// Add what `closure` found in `tree` to `a`, with the packages' permission bits.
pub fn add_closure(a: &mut Archive, tree: &Tree, closure: &elf::Closure) -> Result<()> {
    for f in &closure.files {
        let host = tree.host_path(f);
        let mode = std::fs::metadata(&host)
            .with_context(|| format!("reading {}", host.display()))?
            .permissions()
            .mode();
        a.add(
            f,
            Record::File {
                mode: mode & 0o7777,
                source: Source::File(host),
            },
        )?;
    }
    for (link, target) in &closure.links {
        a.add(
            link,
            Record::Symlink {
                target: target.clone(),
            },
        )?;
    }
    Ok(())
}

fn daemons_layer(i: &Inputs) -> Result<Archive> {
    let multiarch = i.arch.multiarch();
    let mut lib_dirs = elf::library_dirs(multiarch);
    // ganesha's libraries are private: ganesha.nfsd and its backends find them by RUNPATH.
    lib_dirs.push("/usr/lib/ganesha".to_string());
    let programs = [
        DNSMASQ.to_string(),
        GANESHA.to_string(),
        format!("/usr/lib/{multiarch}/ganesha/libfsalvfs.so"),
        format!("/usr/lib/{multiarch}/libnfsidmap/nsswitch.so"),
        "/etc/netconfig".to_string(),
    ];
    let closure = elf::closure(i.tree, &programs, i.arch.elf_machine(), &lib_dirs).context(
        "collecting dnsmasq, nfs-ganesha and their libraries from the pinned stack packages",
    )?;
    let mut a = Archive::new();
    add_closure(&mut a, i.tree, &closure)?;
    Ok(a)
}

fn pxelab_layer(i: &Inputs) -> Result<Archive> {
    let mut a = Archive::new();
    let exe = |p: &Path| Record::File {
        mode: 0o755,
        source: Source::File(p.to_path_buf()),
    };
    a.add(STACK_BIN, exe(i.stack))?;
    a.add(INSTALLER_BIN, exe(i.installer))?;
    for (name, path) in i.tftp {
        a.add(
            &format!("{DATA_DIR}/tftp/{name}"),
            Record::File {
                mode: 0o644,
                source: Source::File(path.clone()),
            },
        )?;
    }
    a.add(
        &format!("{DATA_DIR}/initrds/{}/initrd.img", i.arch.as_str()),
        Record::File {
            mode: 0o644,
            source: Source::File(i.initrd.to_path_buf()),
        },
    )?;
    Ok(a)
}

fn config_layer() -> Result<Archive> {
    let mut a = Archive::new();
    let text = |s: &str| Record::File {
        mode: 0o644,
        source: Source::Bytes(s.as_bytes().to_vec()),
    };
    a.add(
        "/etc/passwd",
        text("root:x:0:0:root:/root:/usr/sbin/nologin\ndnsmasq:x:100:65534:dnsmasq:/nonexistent:/usr/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"),
    )?;
    a.add("/etc/group", text("root:x:0:\nnogroup:x:65534:\n"))?;
    a.add(
        "/etc/mtab",
        Record::Symlink {
            target: "../proc/self/mounts".to_string(),
        },
    )?;
    for d in ["vms", "images", "state"] {
        a.add(&format!("{DATA_DIR}/{d}"), Record::Dir { mode: 0o755 })?;
    }
    a.add("/root", Record::Dir { mode: 0o700 })?;
    a.add("/tmp", Record::Dir { mode: 0o1777 })?;
    a.add("/run", Record::Dir { mode: 0o755 })?;
    Ok(a)
}

/// How the image runs: the supervisor as PID 1, configured through the environment.
pub fn run_config() -> oci::RunConfig {
    oci::RunConfig {
        entrypoint: vec![STACK_BIN.to_string()],
        cmd: Vec::new(),
        env: vec![
            "PATH=/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
            format!("PXELAB_DATA_DIR={DATA_DIR}"),
            format!("PXELAB_DNSMASQ={DNSMASQ}"),
        ],
        exposed_ports: ["53/tcp", "53/udp", "67/udp", "69/udp", "80/tcp", "2049/tcp"]
            .map(String::from)
            .to_vec(),
        volumes: volumes(),
        working_dir: "/".to_string(),
        stop_signal: "SIGTERM".to_string(),
        labels: [
            ("org.opencontainers.image.title", "pxeboot-stack"),
            (
                "org.opencontainers.image.description",
                "pxelab PXE stack: boot handler, dnsmasq (DHCP, TFTP, DNS) and nfs-ganesha (NFS roots)",
            ),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
    }
}

/// The image: three layers and the run configuration.
pub fn build(i: &Inputs) -> Result<oci::Image> {
    let mtime = i.epoch;
    let layers = vec![
        oci::LayerInput {
            tar: daemons_layer(i)?.to_tar(mtime)?,
            created_by: "pxelab: dnsmasq, nfs-ganesha and their libraries (Debian)".into(),
        },
        oci::LayerInput {
            tar: pxelab_layer(i)?.to_tar(mtime)?,
            created_by: "pxelab: static binaries, iPXE set, installer initrd".into(),
        },
        oci::LayerInput {
            tar: config_layer()?.to_tar(mtime)?,
            created_by: "pxelab: default configuration".into(),
        },
    ];
    oci::build(layers, &run_config(), i.arch.debian(), i.epoch, IMAGE_REF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_config_names_the_supervisor_ports_and_volumes() {
        let c = run_config();
        assert_eq!(c.entrypoint, ["/usr/bin/pxelab-stack"]);
        for p in ["67/udp", "69/udp", "80/tcp"] {
            assert!(c.exposed_ports.iter().any(|x| x == p), "{p}");
        }
        assert_eq!(
            c.volumes,
            [
                "/var/lib/pxelab/vms",
                "/var/lib/pxelab/images",
                "/var/lib/pxelab/state"
            ]
        );
        assert!(c
            .env
            .contains(&"PXELAB_DNSMASQ=/usr/sbin/dnsmasq".to_string()));
        let cfg = config_layer().unwrap();
        assert!(cfg.get("/etc/passwd").is_some());
        assert_eq!(cfg.get("/tmp"), Some(&Record::Dir { mode: 0o1777 }));
    }
}
