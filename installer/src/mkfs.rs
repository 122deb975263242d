//! Creating the two filesystems with the initrd's mke2fs and mkfs.fat, with identifiers we
//! choose up front so fstab and GRUB can name them without probing.

use std::process::Command;

use crate::cmd;
use crate::error::{err, Context, Result};

pub const ROOT_LABEL: &str = "pxelab-root";
pub const ESP_LABEL: &str = "ESP";

/// The identifiers of a fresh install's filesystems.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsIds {
    /// ext4 UUID, lowercase `xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx`.
    pub root_uuid: String,
    /// FAT volume id as blkid and fstab spell it: `ABCD-1234`.
    pub esp_uuid: String,
    esp_volume_id: u32,
}

impl FsIds {
    pub fn random() -> Result<FsIds> {
        let mut b = [0u8; 20];
        getrandom(&mut b)?;
        let esp_volume_id = u32::from_be_bytes([b[16], b[17], b[18], b[19]]);
        Ok(FsIds::from_bytes(
            b[..16].try_into().unwrap_or([0; 16]),
            esp_volume_id,
        ))
    }

    fn from_bytes(mut u: [u8; 16], esp_volume_id: u32) -> FsIds {
        u[6] = (u[6] & 0x0f) | 0x40; // version 4
        u[8] = (u[8] & 0x3f) | 0x80; // RFC 4122 variant
        let h = hex::encode(u);
        let root_uuid = format!(
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        );
        let esp_uuid = format!("{:04X}-{:04X}", esp_volume_id >> 16, esp_volume_id & 0xffff);
        FsIds {
            root_uuid,
            esp_uuid,
            esp_volume_id,
        }
    }
}

pub fn getrandom(buf: &mut [u8]) -> Result<()> {
    // SAFETY: writes at most buf.len() bytes into buf.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n != buf.len() as isize {
        return Err(err(format!(
            "getrandom: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// ext4 without the two features e2fsprogs 1.47 enables by default that older tools refuse:
/// `orphan_file` (e2fsck < 1.47, e.g. Ubuntu 22.04's, will not check the fs at boot) and
/// `metadata_csum_seed` (GRUB < 2.12 cannot read it). Inode tables are zeroed lazily by the
/// kernel after the first mount, which keeps mkfs fast on large disks.
pub fn ext4(device: &std::path::Path, ids: &FsIds) -> Result<()> {
    cmd::run(
        Command::new("mke2fs")
            .args([
                "-t",
                "ext4",
                "-F",
                "-q",
                "-U",
                &ids.root_uuid,
                "-L",
                ROOT_LABEL,
            ])
            .args([
                "-O",
                "^orphan_file,^metadata_csum_seed",
                "-E",
                "lazy_itable_init=1,nodiscard",
            ])
            .arg(device),
        None,
        "the initrd needs mke2fs from e2fsprogs",
    )
    .context(|| format!("creating ext4 on {}", device.display()))?;
    Ok(())
}

/// FAT32, as the UEFI spec requires for an ESP.
pub fn esp(device: &std::path::Path, ids: &FsIds) -> Result<()> {
    cmd::run(
        Command::new("mkfs.fat")
            .args([
                "-F",
                "32",
                "-n",
                ESP_LABEL,
                "-i",
                &format!("{:08X}", ids.esp_volume_id),
            ])
            .arg(device),
        None,
        "the initrd needs mkfs.fat from dosfstools",
    )
    .context(|| format!("creating FAT32 on {}", device.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_the_forms_blkid_prints() {
        let ids = FsIds::from_bytes([0xff; 16], 0x1234abcd);
        assert_eq!(ids.root_uuid, "ffffffff-ffff-4fff-bfff-ffffffffffff");
        assert_eq!(ids.esp_uuid, "1234-ABCD");
        let a = FsIds::random().unwrap();
        let b = FsIds::random().unwrap();
        assert_ne!(a.root_uuid, b.root_uuid);
        assert_eq!(a.root_uuid.len(), 36);
        assert_eq!(&a.root_uuid[14..15], "4");
    }
}
