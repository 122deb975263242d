//! What the boot handler tells the installer (`InstallerConfig`, `ConfigReply`) and what a
//! distro pull publishes for it to install (`DistroManifest`).

use serde::{Deserialize, Serialize};

use crate::Mac;

/// Size of the EFI system partition the installer creates.
pub const ESP_SIZE_MIB: u64 = 512;

/// The name the NoCloud network-config gives a target's NIC (matched by MAC), so every network
/// renderer agrees on it; the installer names it so too for the first boot's early SSH.
pub const NIC_NAME: &str = "lan0";

/// How much of the disk image each zstd frame of `rootfs.img.zst` holds (the last one less),
/// each frame saying its content size. Independent frames let the installer decompress on
/// every CPU at once; a stream not cut this way still installs, decompressed on one thread.
pub const DISK_IMAGE_FRAME: usize = 16 << 20;

/// A file the installer downloads, pinned by digest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    pub url: String,
    /// Lowercase hex sha256 of the bytes served at `url`.
    pub sha256: String,
    /// Size in bytes of the bytes served at `url`.
    pub size: u64,
}

/// What the boot handler tells the installer at `GET /config/<mac>`.
///
/// Every URL is absolute and built from the address the installer used to reach the handler,
/// so the installer never guesses a server address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstallerConfig {
    pub name: String,
    pub mac: Mac,
    pub hostname: String,
    pub distro: String,
    /// The root filesystem tarball (`rootfs.tar.zst` or `.tar.gz`).
    pub rootfs: Artifact,
    /// The same tree as a zstd-compressed ext4 image (`rootfs.img.zst`). When present the
    /// installer writes it onto the root partition instead of making a filesystem and unpacking
    /// `rootfs` (in an emulated guest, creating files is what costs), then gives it the
    /// install's own UUID and grows it to the partition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_image: Option<Artifact>,
    /// Base URL of the NoCloud documents, ending in `/` (`…/cloud-init/<name>/`).
    pub cloud_init_url: String,
    /// Where to `POST` [`crate::Event`]s.
    pub events_url: String,
    /// The disk to install to; when absent the installer picks one and logs which.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    /// Reboot after a successful install (else stay up, e.g. for debugging).
    pub reboot: bool,
    /// With `reboot`: start the installed system without the firmware and the boot loader (the
    /// installer's `/init` switches root into it, on the running kernel when that is the
    /// installed one; else a firmware reboot). Absent: a firmware reboot. Stacks before the
    /// switch root called it `kexec`.
    #[serde(default, alias = "kexec", skip_serializing_if = "std::ops::Not::not")]
    pub direct_start: bool,
    /// The login the cloud-init user-data creates, set up by the installer too, so SSH works
    /// from the first boot's start instead of after cloud-init's user module.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub login: Option<Login>,
    /// The reprovision nonce: present only between an operator's reprovision of the VM and its
    /// next `installed`. The installer wipes a disk that carries anything (a partition table, a
    /// filesystem, an earlier install) only when it is present; a blank disk needs none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wipe: Option<String>,
}

/// A user account as the NoCloud user-data declares it (cloud-init applies it again later and
/// finds it in place).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Login {
    /// A POSIX user name (lowercase letters, digits, `-`, `_`; not starting with `-`).
    pub user: String,
    pub gecos: String,
    pub shell: String,
    /// A sudoers rule for the user (`ALL=(ALL) NOPASSWD:ALL`), or none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sudo: Option<String>,
    /// OpenSSH public keys for `~/.ssh/authorized_keys`, one per entry.
    #[serde(default)]
    pub ssh_authorized_keys: Vec<String>,
}

/// The body of `GET /config/<mac>`: the [`InstallerConfig`] plus the keys the original pvmlab
/// handler served (`arch`, `rootfs_url`, `kernel_url`, `kmods_url`, `reboot_on_success`), kept
/// so tools written against the original keep working. Deserializing the same JSON as an
/// [`InstallerConfig`] ignores the extra keys.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigReply {
    #[serde(flatten)]
    pub config: InstallerConfig,
    pub arch: crate::Arch,
    pub rootfs_url: String,
    pub kernel_url: String,
    pub kmods_url: String,
    pub reboot_on_success: bool,
}

/// `images/<distro>/<arch>/manifest.json`, written by `cargo xtask distro pull` and read by the
/// boot handler to fill [`InstallerConfig::rootfs`]. Unknown keys are ignored, so distro pull
/// may record more than this.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DistroManifest {
    /// The root filesystem tarball, next to the manifest.
    pub rootfs: ManifestFile,
    /// `uname -r` of the kernel in `vmlinuz` and `modules.cpio.zst`.
    pub kernel_version: String,
    /// The kernel image next to the manifest (the boot handler serves `vmlinuz` when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<ManifestFile>,
    /// The kernel-modules archive next to the manifest (`modules.cpio.zst` when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modules: Option<ManifestFile>,
    /// The root filesystem as a raw ext4 image next to the manifest (`rootfs.img`): the same
    /// tree as `rootfs`, built reproducibly; disk-mode VMs boot copy-on-write overlays of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_image: Option<ManifestFile>,
    /// `disk_image` compressed with zstd (`rootfs.img.zst`), in frames of
    /// [`DISK_IMAGE_FRAME`]: what the installer streams.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_image_zst: Option<ManifestFile>,
    /// The root filesystem's own initramfs for `kernel_version` (`initrd.img`), for booting
    /// `disk_image` straight from its kernel, without a boot loader.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<ManifestFile>,
}

impl DistroManifest {
    /// Every file the manifest names (what the pipeline's cache must keep).
    pub fn files(&self) -> impl Iterator<Item = &ManifestFile> {
        [
            Some(&self.rootfs),
            self.kernel.as_ref(),
            self.modules.as_ref(),
            self.disk_image.as_ref(),
            self.disk_image_zst.as_ref(),
            self.initramfs.as_ref(),
        ]
        .into_iter()
        .flatten()
    }
}

/// A file in a distro's image directory, pinned by digest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestFile {
    /// A plain file name in the same directory as the manifest (no `/`).
    pub file: String,
    /// Lowercase hex sha256 of the file.
    pub sha256: String,
    pub size: u64,
}

impl ManifestFile {
    /// Checks that `file` cannot name anything outside the manifest's directory and that
    /// `sha256` looks like a digest; returns a one-line reason otherwise.
    pub fn check(&self) -> Result<(), String> {
        let name_ok = !self.file.is_empty()
            && !self.file.starts_with('.')
            && self
                .file
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-+".contains(&b));
        if !name_ok {
            return Err(format!(
                "file name {:?} is not a plain file name",
                self.file
            ));
        }
        let digest_ok = self.sha256.len() == 64
            && self
                .sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !digest_ok {
            return Err(format!(
                "sha256 {:?} of {} is not 64 lowercase hex digits",
                self.sha256, self.file
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config from a stack without reprovision nonces reads as "no wipe", and a config
    /// without one does not mention it (installers that predate it see the same JSON).
    #[test]
    fn the_wipe_nonce_is_optional_and_left_out_when_absent() {
        let text = r#"{"name":"t1","mac":"52:54:00:00:00:01","hostname":"t1","distro":"debian-12",
            "rootfs":{"url":"http://s/r","sha256":"00","size":1},"cloud_init_url":"http://s/c/",
            "events_url":"http://s/e","reboot":true}"#;
        let mut c: InstallerConfig = serde_json::from_str(text).unwrap();
        assert_eq!(c.wipe, None);
        assert!(!serde_json::to_string(&c).unwrap().contains("wipe"));
        c.wipe = Some("ab".into());
        let back: InstallerConfig =
            serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back.wipe.as_deref(), Some("ab"));
    }

    #[test]
    fn manifest_reads_the_documented_keys_and_ignores_others() {
        let text = r#"{"rootfs":{"file":"rootfs.tar.zst","sha256":"00000000000000000000000000000000000000000000000000000000000000aa","size":7},
                       "kernel_version":"6.1.0-1-cloud-amd64","something_else":true}"#;
        let m: DistroManifest = serde_json::from_str(text).unwrap();
        assert_eq!(m.rootfs.size, 7);
        assert!(m.rootfs.check().is_ok());
        let bad = ManifestFile {
            file: "../x".into(),
            ..m.rootfs.clone()
        };
        assert!(bad.check().is_err());
        let bad = ManifestFile {
            sha256: "AA".into(),
            ..m.rootfs
        };
        assert!(bad.check().is_err());
    }
}
