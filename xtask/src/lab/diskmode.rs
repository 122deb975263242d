//! Disk-mode VMs (`lab vm create --disk-mode`, `pxeboot: false`): no PXE and no installer. The
//! disk is a qcow2 copy-on-write overlay of the distro's `rootfs.img`, and QEMU starts the
//! distro's kernel with the rootfs's own initramfs itself (SeaBIOS, no boot loader), its
//! NoCloud seed on the kernel command line: the stack serves `/cloud-init/<name>/` to the VM's
//! own address.
//!
//! The image, kernel and initramfs are hard-linked beside the disk when the VM is created: a
//! later `distro pull` replaces the published files, and must neither change the overlay's
//! backing file under it nor pair it with another kernel.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use pxelab_contract::{DistroManifest, ManifestFile, VmDefinition};
use xshell::cmd;

use super::home::Lab;
use crate::process;

/// What QEMU loads itself for a disk-mode VM.
pub struct DirectBoot {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub append: String,
}

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
    let stack = lab.net()?.subnet.gateway();
    Ok(Some(DirectBoot {
        kernel,
        initrd,
        append: append(vm, &stack.to_string()),
    }))
}

/// `ds=nocloud-net`: cloud-init 22.4 (Debian 12) fetches an HTTP seed only under that name (see
/// the stack's `ipxe.rs`).
fn append(vm: &VmDefinition, stack: &str) -> String {
    format!(
        "root=/dev/vda rw console=ttyS0,115200 ds=nocloud-net;s=http://{stack}/cloud-init/{}/",
        vm.name
    )
}

/// Removes the VM's links (`lab vm rm`).
pub fn remove(lab: &Lab, name: &str) {
    for f in files(lab, name) {
        let _ = fs::remove_file(f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_is_on_the_command_line_under_the_name_cloud_init_22_4_fetches() {
        let vm = VmDefinition::from_json(
            r#"{"name":"d1","arch":"x86_64","distro":"debian-12","mac":"52:54:00:00:00:05"}"#,
        )
        .unwrap();
        assert_eq!(
            append(&vm, "10.77.0.1"),
            "root=/dev/vda rw console=ttyS0,115200 ds=nocloud-net;s=http://10.77.0.1/cloud-init/d1/"
        );
    }
}
