//! Making the disk boot under BIOS firmware through GRUB's i386-pc images, as `grub-install`
//! and `grub-bios-setup` would, but without them (they probe every device and took most of the
//! 16-27 s the chrooted GRUB tools cost under emulation):
//!
//! - the rootfs's modules (`/usr/lib/grub/i386-pc`, Debian's grub-pc-bin) are copied to
//!   `/boot/grub/i386-pc`, the directory the core image loads them from: a snapshot that keeps
//!   matching that core image when a package upgrade replaces the rootfs's copy;
//! - the rootfs's `grub-mkimage` (run chrooted) makes the core image: `diskboot.img`, then
//!   the kernel with disk, GPT and ext2 drivers and the prefix `(,gpt2)/boot/grub` — the root
//!   partition of the drive the BIOS booted — from which it loads `normal` and the root
//!   filesystem's `/boot/grub/grub.cfg`, the file `update-grub` maintains;
//! - the core image goes into the BIOS boot partition, its first sector's block list naming
//!   the sectors after it; `boot.img` goes into the first 440 bytes of the disk (the
//!   protective MBR's partition table and signature stay), pointing at the core image.
//!
//! Offsets are those of GRUB 2's `boot.S` and `diskboot.S` (stable since 2.00).

use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use crate::cmd;
use crate::error::{err, Context, Result};
use crate::partition::{Extent, ROOT_PARTITION};

const SECTOR: usize = 512;
/// Where the rootfs keeps GRUB's i386-pc images and modules, and where the core image finds
/// its modules on the root filesystem (`$prefix/i386-pc`).
const PLATFORM_DIR: &str = "usr/lib/grub/i386-pc";
const MODULES_DIR: &str = "boot/grub/i386-pc";
/// What the core image needs before it can read `$prefix`: the BIOS disk driver, the
/// partition map and the root filesystem's driver. Everything else loads from `$prefix`.
const CORE_MODULES: [&str; 3] = ["biosdisk", "part_gpt", "ext2"];

// boot.img (boot.S): the disk's own BIOS parameter block lives in [BPB_START, BPB_END); the
// LBA of the core image's first sector; the boot drive (0xff: the one the BIOS passes in DL);
// a jump that trusts DL only for floppies, replaced by two NOPs for a hard disk (some BIOSes
// pass 0x00 when they booted 0x80); the boot code ends where the MBR's disk signature starts.
const BPB_START: usize = 0x03;
const BPB_END: usize = 0x5a;
const KERNEL_SECTOR: usize = 0x5c;
const BOOT_DRIVE: usize = 0x64;
const DRIVE_CHECK: usize = 0x66;
const BOOT_CODE_END: usize = 0x1b8;

// diskboot.img (diskboot.S): block lists grow down from the end of its sector, 12 bytes each
// (start LBA u64, sector count u16, load segment u16); an entry with count 0 ends the list.
const BLOCKLIST_SIZE: usize = 12;
const FIRST_BLOCKLIST: usize = SECTOR - BLOCKLIST_SIZE;
/// The core image is loaded at 0x8000; its sectors after the first go right behind it.
const FIRST_SEGMENT: u16 = 0x0820;
/// The core image must fit below 0x78000 from its link address 0x9000 (grub-bios-setup's limit).
const MAX_CORE_SECTORS: usize = (0x78000 - 0x9000) / SECTOR;

/// Writes the BIOS boot code for the root filesystem mounted at `root` onto `disk`, the core
/// image into `bios` (the BIOS boot partition). Returns what it did, or why it did nothing.
pub fn install(root: &Path, disk: &Path, logical_sector: u64, bios: Extent) -> Result<String> {
    let platform = root.join(PLATFORM_DIR);
    let Ok(boot) = fs::read(platform.join("boot.img")) else {
        return Ok(format!(
            "no BIOS boot code (the rootfs has no /{PLATFORM_DIR}: Debian package grub-pc-bin)"
        ));
    };
    if logical_sector != SECTOR as u64 {
        return Ok(format!(
            "no BIOS boot code ({logical_sector}-byte sectors; GRUB's BIOS boot sector reads 512)"
        ));
    }
    let copied = copy_modules(&platform, &root.join(MODULES_DIR))?;
    let core_path = format!("/{MODULES_DIR}/core.img");
    let prefix = format!("(,gpt{ROOT_PARTITION})/boot/grub");
    let images = format!("/{PLATFORM_DIR}");
    let mut args = vec![
        "-O", "i386-pc", "-d", &images, "-p", &prefix, "-o", &core_path,
    ];
    args.extend(CORE_MODULES);
    cmd::chroot_run(root, "/usr/bin/grub-mkimage", &args)?;
    let core = fs::read(root.join(&core_path[1..])).context(|| format!("reading {core_path}"))?;
    let lba = bios.start / SECTOR as u64;
    let core = place_core(core, lba, bios.size)?;
    write_disk(disk, lba, &core, &boot)?;
    Ok(format!(
        "BIOS GRUB core image ({} sectors) at LBA {lba}, {copied} modules in /{MODULES_DIR}",
        core.len() / SECTOR
    ))
}

/// Copies the modules and their lists (`command.lst` lets `normal` load commands on first
/// use); returns how many modules.
fn copy_modules(from: &Path, to: &Path) -> Result<usize> {
    fs::create_dir_all(to).context(|| format!("creating {}", to.display()))?;
    let entries = fs::read_dir(from).context(|| format!("listing {}", from.display()))?;
    let mut modules = 0;
    for entry in entries {
        let entry = entry.context(|| format!("listing {}", from.display()))?;
        let name = entry.file_name();
        let is = |ext: &str| Path::new(&name).extension().is_some_and(|e| e == ext);
        if !(is("mod") || is("lst")) {
            continue;
        }
        modules += usize::from(is("mod"));
        fs::copy(entry.path(), to.join(&name))
            .context(|| format!("copying {} to {}", entry.path().display(), to.display()))?;
    }
    Ok(modules)
}

/// The core image padded to whole sectors, its first block list naming the sectors after the
/// first at `lba + 1` (the BIOS boot partition starts at `lba`), as grub-bios-setup embeds it.
pub fn place_core(mut core: Vec<u8>, lba: u64, room: u64) -> Result<Vec<u8>> {
    if core.len() < 2 * SECTOR {
        return Err(err(format!(
            "grub-mkimage wrote a {}-byte core image; an i386-pc one is at least two sectors",
            core.len()
        )));
    }
    core.resize(core.len().div_ceil(SECTOR) * SECTOR, 0);
    let sectors = core.len() / SECTOR;
    if sectors > MAX_CORE_SECTORS || core.len() as u64 > room {
        return Err(err(format!(
            "GRUB's core image is {sectors} sectors; the BIOS boot partition holds {} and BIOS memory {MAX_CORE_SECTORS}",
            room / SECTOR as u64
        )));
    }
    let rest = u16::try_from(sectors - 1).map_err(|_| err("core image too large"))?;
    let first = &mut core[FIRST_BLOCKLIST..SECTOR];
    first[..8].copy_from_slice(&(lba + 1).to_le_bytes());
    first[8..10].copy_from_slice(&rest.to_le_bytes());
    first[10..12].copy_from_slice(&FIRST_SEGMENT.to_le_bytes());
    core[FIRST_BLOCKLIST - BLOCKLIST_SIZE..FIRST_BLOCKLIST].fill(0);
    Ok(core)
}

/// The disk's first sector with GRUB's boot code: `boot.img` pointed at the core image at
/// `core_lba`, the disk's BPB bytes and everything from the disk signature on left as they were.
pub fn boot_sector(mut mbr: [u8; SECTOR], boot: &[u8], core_lba: u64) -> Result<[u8; SECTOR]> {
    if boot.len() != SECTOR || boot[SECTOR - 2..] != [0x55, 0xaa] {
        return Err(err(format!(
            "/{PLATFORM_DIR}/boot.img is not a 512-byte boot sector"
        )));
    }
    mbr[..BPB_START].copy_from_slice(&boot[..BPB_START]);
    mbr[BPB_END..BOOT_CODE_END].copy_from_slice(&boot[BPB_END..BOOT_CODE_END]);
    mbr[KERNEL_SECTOR..KERNEL_SECTOR + 8].copy_from_slice(&core_lba.to_le_bytes());
    mbr[BOOT_DRIVE] = 0xff;
    mbr[DRIVE_CHECK..DRIVE_CHECK + 2].copy_from_slice(&[0x90, 0x90]);
    Ok(mbr)
}

/// Writes the core image, then the boot sector that points at it, and flushes both.
fn write_disk(disk: &Path, lba: u64, core: &[u8], boot: &[u8]) -> Result<()> {
    let what = || format!("writing GRUB's BIOS boot code to {}", disk.display());
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(disk)
        .context(what)?;
    f.seek(SeekFrom::Start(lba * SECTOR as u64))
        .and_then(|_| f.write_all(core))
        .and_then(|()| f.sync_data())
        .context(what)?;
    let mut mbr = [0u8; SECTOR];
    f.seek(SeekFrom::Start(0))
        .and_then(|_| f.read_exact(&mut mbr))
        .context(what)?;
    let mbr = boot_sector(mbr, boot, lba)?;
    f.seek(SeekFrom::Start(0))
        .and_then(|_| f.write_all(&mbr))
        .and_then(|()| f.sync_data())
        .context(what)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_core_image_lists_its_sectors_after_the_first() {
        let mut core = vec![0xaa; 3 * SECTOR + 7];
        core[FIRST_BLOCKLIST - BLOCKLIST_SIZE..SECTOR].fill(1);
        let placed = place_core(core, 2048, 2048 * 512).unwrap();
        assert_eq!(placed.len(), 4 * SECTOR);
        assert!(placed[3 * SECTOR + 7..].iter().all(|b| *b == 0));
        let entry = &placed[FIRST_BLOCKLIST..SECTOR];
        assert_eq!(u64::from_le_bytes(entry[..8].try_into().unwrap()), 2049);
        assert_eq!(u16::from_le_bytes([entry[8], entry[9]]), 3);
        assert_eq!(u16::from_le_bytes([entry[10], entry[11]]), 0x820);
        let terminator = &placed[FIRST_BLOCKLIST - BLOCKLIST_SIZE..FIRST_BLOCKLIST];
        assert!(terminator.iter().all(|b| *b == 0));
        assert!(placed[..FIRST_BLOCKLIST - BLOCKLIST_SIZE]
            .iter()
            .all(|b| *b == 0xaa));

        let e = place_core(vec![0; 4 * SECTOR], 2048, 3 * 512)
            .unwrap_err()
            .0;
        assert!(e.contains("holds 3"), "{e}");
        let e = place_core(vec![0; 100], 2048, 1 << 20).unwrap_err().0;
        assert!(e.contains("at least two sectors"), "{e}");
    }

    #[test]
    fn the_boot_sector_keeps_the_bpb_and_partition_table() {
        let mut boot = [0x11u8; SECTOR];
        boot[SECTOR - 2..].copy_from_slice(&[0x55, 0xaa]);
        let mut mbr = [0u8; SECTOR];
        mbr[BPB_START..BPB_END].fill(0x22);
        mbr[BOOT_CODE_END..].fill(0x33);
        let out = boot_sector(mbr, &boot, 0x0102_0304_0506).unwrap();
        assert!(out[..BPB_START].iter().all(|b| *b == 0x11));
        assert!(out[BPB_START..BPB_END].iter().all(|b| *b == 0x22));
        assert_eq!(
            out[KERNEL_SECTOR..KERNEL_SECTOR + 8],
            0x0102_0304_0506u64.to_le_bytes()
        );
        assert_eq!(out[BOOT_DRIVE], 0xff);
        assert_eq!(out[DRIVE_CHECK..DRIVE_CHECK + 2], [0x90, 0x90]);
        assert!(out[DRIVE_CHECK + 2..BOOT_CODE_END]
            .iter()
            .all(|b| *b == 0x11));
        assert!(out[BOOT_CODE_END..].iter().all(|b| *b == 0x33));
        let e = boot_sector(mbr, &[0; SECTOR], 1).unwrap_err().0;
        assert!(e.contains("not a 512-byte boot sector"), "{e}");
    }
}
