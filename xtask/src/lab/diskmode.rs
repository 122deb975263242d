//! Disk-mode VMs (`lab vm create --disk-mode`, `pxeboot: false`): no PXE and no installer. The
//! disk is a qcow2 copy-on-write overlay of the distro's `rootfs.img`, and QEMU starts the
//! distro's kernel with the rootfs's own initramfs itself (SeaBIOS, no boot loader).
//!
//! Its NoCloud seed is a second, read-only disk (vfat labelled `CIDATA`, as pvmlab's seed ISO)
//! holding the documents the stack would serve at `/cloud-init/<name>/`, written anew at every
//! start. cloud-init reads it in its first, local stage, before any network, so seeding does
//! not depend on the VM's lease (with the seed's URL on the kernel command line, a VM without
//! a lease fell back to `DataSourceNone`: no host name, no login).
//!
//! The image, kernel and initramfs are hard-linked beside the disk when the VM is created: a
//! later `distro pull` replaces the published files, and must neither change the overlay's
//! backing file under it nor pair it with another kernel.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use pxelab_contract::{cloudinit, DistroManifest, ManifestFile, VmDefinition};
use xshell::cmd;

use super::home::Lab;
use crate::hostdeps::{self, HostDep};
use crate::process;

/// What QEMU loads itself for a disk-mode VM.
pub struct DirectBoot {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The NoCloud seed disk ([`write_seed`]).
    pub seed: PathBuf,
    pub append: String,
}

/// What writes a seed disk.
const SEED_TOOLS: [HostDep; 2] = [hostdeps::MKFS_FAT, hostdeps::MCOPY];

/// The VM's own links: backing image, kernel, initramfs.
fn files(lab: &Lab, name: &str) -> [PathBuf; 3] {
    let dir = lab.disks_dir();
    [
        dir.join(format!("{name}.base.img")),
        dir.join(format!("{name}.vmlinuz")),
        dir.join(format!("{name}.initrd.img")),
    ]
}

/// Links `vm`'s distro image, kernel and initramfs beside its disk and creates the disk as an
/// overlay of the image, `size` large (qemu-img's notation).
pub fn create(lab: &Lab, vm: &VmDefinition, size: &str) -> Result<()> {
    let images = lab.images_dir(&vm.distro, vm.arch.as_str());
    let path = images.join("manifest.json");
    let pull = format!("`cargo xtask distro pull {} --arch {}`", vm.distro, vm.arch);
    let text = fs::read(&path).with_context(|| {
        format!(
            "{} is not pulled ({} is missing): {pull}",
            vm.distro,
            path.display()
        )
    })?;
    let manifest: DistroManifest = serde_json::from_slice(&text)
        .with_context(|| format!("{} is unreadable: {pull}", path.display()))?;
    let no_image = || {
        format!(
            "{} has no disk image (pulled by an older pxelab): {pull}",
            images.display()
        )
    };
    let sources: [&ManifestFile; 3] = [
        manifest.disk_image.as_ref().with_context(no_image)?,
        manifest.kernel.as_ref().with_context(no_image)?,
        manifest.initramfs.as_ref().with_context(no_image)?,
    ];
    fs::create_dir_all(lab.disks_dir())?;
    let links = files(lab, &vm.name);
    for (file, link) in sources.iter().zip(&links) {
        file.check()
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        link_or_copy(&images.join(&file.file), link)?;
    }
    let (base, disk) = (&links[0], lab.vm_file(&vm.name, super::home::VmFile::Disk));
    if disk.exists() {
        bail!(
            "{} exists: `cargo xtask lab vm rm {}` first",
            disk.display(),
            vm.name
        );
    }
    let sh = process::shell()?;
    process::output(cmd!(
        sh,
        "qemu-img create -q -f qcow2 -b {base} -F raw {disk} {size}"
    ))
    .with_context(|| format!("creating {}", disk.display()))?;
    Ok(())
}

/// A hard link (a copy across filesystems) of `from` at `to`, replacing what is there.
fn link_or_copy(from: &Path, to: &Path) -> Result<()> {
    let _ = fs::remove_file(to);
    if fs::hard_link(from, to).is_err() {
        fs::copy(from, to)
            .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    }
    Ok(())
}

/// How QEMU boots `vm` when it is a disk-mode VM (`pxeboot` false and its files linked); `None`
/// for every other VM.
pub fn direct_boot(lab: &Lab, vm: &VmDefinition) -> Result<Option<DirectBoot>> {
    let [_, kernel, initrd] = files(lab, &vm.name);
    if vm.pxeboot || !kernel.exists() {
        return Ok(None);
    }
    Ok(Some(DirectBoot {
        kernel,
        initrd,
        seed: seed_path(lab, &vm.name),
        append: APPEND.to_string(),
    }))
}

/// The seed disk is `/dev/vdb`, found by its label: `ds=nocloud` only tells cloud-init which
/// source to look for.
const APPEND: &str = "root=/dev/vda rw console=ttyS0,115200 panic=10 ds=nocloud";

fn seed_path(lab: &Lab, name: &str) -> PathBuf {
    lab.disks_dir().join(format!("{name}.seed.img"))
}

/// Writes `vm`'s seed disk: the stack's documents for it (its domain is the default one; DHCPv6
/// when the lab serves it), on a 1 MiB vfat labelled `CIDATA`. Built beside and renamed into
/// place, so a VM never boots a half-written seed.
pub fn write_seed(lab: &Lab, vm: &VmDefinition) -> Result<PathBuf> {
    hostdeps::ensure(&SEED_TOOLS)?;
    let seed = seed_path(lab, &vm.name);
    let staging = lab.run_dir().join(format!("seed-{}", vm.name));
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(&staging)?;
    fs::create_dir_all(lab.disks_dir())?;
    let written = (|| -> Result<()> {
        let dhcpv6 = lab.config.ipv6 && !lab.config.proxy_dhcp;
        let mut docs = Vec::new();
        for doc in cloudinit::DOCUMENTS {
            let text = cloudinit::document(vm, doc, cloudinit::DEFAULT_DOMAIN, dhcpv6)
                .with_context(|| format!("no cloud-init document {doc}"))?;
            let path = staging.join(doc);
            fs::write(&path, text)?;
            docs.push(path);
        }
        let image = staging.join("seed.img");
        let sh = process::shell()?;
        // `--invariant`: no clock or random volume id in the filesystem.
        process::output(cmd!(sh, "mkfs.fat -C -n CIDATA --invariant {image} 1024"))?;
        process::output(cmd!(sh, "mcopy -i {image} {docs...} ::"))?;
        fs::rename(&image, &seed)?;
        Ok(())
    })();
    let _ = fs::remove_dir_all(&staging);
    written.with_context(|| format!("writing {}'s seed disk {}", vm.name, seed.display()))?;
    Ok(seed)
}

/// Removes the VM's links and seed disk (`lab vm rm`).
pub fn remove(lab: &Lab, name: &str) {
    for f in files(lab, name) {
        let _ = fs::remove_file(f);
    }
    let _ = fs::remove_file(seed_path(lab, name));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What cloud-init's NoCloud looks for before the network: a filesystem labelled CIDATA
    /// holding the stack's documents, each byte for byte; a second start replaces it.
    #[test]
    fn sys_the_seed_disk_holds_the_stacks_documents_under_the_label_cloud_init_reads() {
        let dir = tempfile::tempdir().unwrap();
        let lab = Lab::at(dir.path().to_path_buf()).unwrap();
        let vm = VmDefinition::from_json(
            r#"{"name":"d1","arch":"x86_64","distro":"debian-12","mac":"52:54:00:00:00:05",
                "hostname":"first"}"#,
        )
        .unwrap();
        let sh = xshell::Shell::new().unwrap();
        let seed = write_seed(&lab, &vm).unwrap();
        let label = cmd!(sh, "blkid -p -o value -s LABEL {seed}")
            .read()
            .unwrap();
        assert_eq!(label, "CIDATA");
        for doc in cloudinit::DOCUMENTS {
            let inside = cmd!(sh, "mtype -i {seed} ::{doc}").read().unwrap();
            let served = cloudinit::document(&vm, doc, cloudinit::DEFAULT_DOMAIN, false).unwrap();
            assert_eq!(inside.trim_end(), served.trim_end(), "{doc}");
        }
        let renamed = VmDefinition {
            hostname: Some("second".into()),
            ..vm
        };
        write_seed(&lab, &renamed).unwrap();
        let meta = cmd!(sh, "mtype -i {seed} ::meta-data").read().unwrap();
        assert!(meta.contains("\"second\""), "{meta}");
        assert!(
            !lab.run_dir().join("seed-d1").exists(),
            "the staging directory is left"
        );
        remove(&lab, "d1");
        assert!(!seed.exists(), "`lab vm rm` leaves the seed disk");
    }
}
