//! GPT layout (1 MiB BIOS boot partition, 512 MiB ESP, ext4 root; MiB-aligned), written with
//! the initrd's `sfdisk`, and making the kernel see the new partitions.
//!
//! The ESP and root keep numbers 1 and 2 (fstab, GRUB's `gpt2`, the tests name them so); the
//! BIOS boot partition, which holds GRUB's i386-pc core image, is entry 3 though it lies first:
//! one layout boots under UEFI and BIOS alike.
//!
//! After writing the table we ask the kernel to re-read it (BLKRRPART). Some block drivers
//! accept that and change nothing (loop devices on recent kernels do exactly this), so if the
//! partitions do not show up in sysfs with the expected geometry we add them one by one with
//! BLKPG, like `partx -u`. Without udev, devtmpfs creates the nodes; we mknod them if it did not.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use pxelab_contract::ESP_SIZE_MIB;

use crate::cmd;
use crate::disk::{partitions, read_trim, Disk, BIOS_BOOT_SIZE, MIB};
use crate::error::{err, Context, Result};

pub const ESP_TYPE: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
pub const LINUX_FS_TYPE: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";
pub const BIOS_BOOT_TYPE: &str = "21686148-6449-6E6F-744E-656564454649";
/// The root filesystem's GPT entry number, as GRUB names it (`gpt2`).
pub const ROOT_PARTITION: u32 = 2;

/// A byte range on the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub start: u64,
    pub size: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub esp: Extent,
    pub root: Extent,
    pub bios: Extent,
}

impl Layout {
    /// The partitions in GPT entry order (1, 2, 3).
    fn entries(&self) -> [Extent; 3] {
        [self.esp, self.root, self.bios]
    }
}

/// BIOS boot at 1 MiB, the ESP after it, root from its end to the last whole MiB that leaves
/// ≥ 1 MiB for the backup GPT.
pub fn layout(disk_size: u64) -> Layout {
    let bios = Extent {
        start: MIB,
        size: BIOS_BOOT_SIZE,
    };
    let esp = Extent {
        start: bios.start + bios.size,
        size: ESP_SIZE_MIB * MIB,
    };
    let root_start = esp.start + esp.size;
    let end = (disk_size.saturating_sub(MIB) / MIB * MIB).max(root_start);
    Layout {
        esp,
        root: Extent {
            start: root_start,
            size: end - root_start,
        },
        bios,
    }
}

/// The sfdisk input for `layout`, in units of the disk's logical sector.
pub fn sfdisk_script(layout: &Layout, sector: u64) -> String {
    let s = |bytes: u64| bytes / sector;
    format!(
        "label: gpt\nunit: sectors\n\
         start={}, size={}, type={ESP_TYPE}, name=\"EFI system partition\"\n\
         start={}, size={}, type={LINUX_FS_TYPE}, name=\"root\"\n\
         start={}, size={}, type={BIOS_BOOT_TYPE}, name=\"BIOS boot partition\"\n",
        s(layout.esp.start),
        s(layout.esp.size),
        s(layout.root.start),
        s(layout.root.size),
        s(layout.bios.start),
        s(layout.bios.size)
    )
}

/// Writes the GPT (wiping old signatures) and returns the partition device paths (ESP, root)
/// once the kernel knows them.
pub fn partition(disk: &Disk, layout: &Layout) -> Result<[PathBuf; 2]> {
    let script = sfdisk_script(layout, disk.logical_sector);
    // --no-reread/--no-tell-kernel: we checked the disk is unused and tell the kernel ourselves.
    cmd::run(
        Command::new("sfdisk")
            .args([
                "--quiet",
                "--wipe",
                "always",
                "--no-reread",
                "--no-tell-kernel",
            ])
            .arg(&disk.path),
        Some(script.as_bytes()),
        "the initrd needs sfdisk from the fdisk package",
    )
    .context(|| format!("writing the partition table to {}", disk.path.display()))?;
    tell_kernel(disk, layout)?;
    let names = partitions(&disk.name);
    let [esp, root] = [1usize, 2].map(|n| names.get(n - 1).cloned());
    let (Some(esp), Some(root)) = (esp, root) else {
        return Err(err(format!(
            "the kernel does not show the new partitions of {}",
            disk.path.display()
        )));
    };
    Ok([
        device_node(&disk.name, &esp)?,
        device_node(&disk.name, &root)?,
    ])
}

/// Makes the kernel's view of the partitions match `layout`.
fn tell_kernel(disk: &Disk, layout: &Layout) -> Result<()> {
    let file = File::open(&disk.path).context(|| format!("opening {}", disk.path.display()))?;
    let reread = sys::reread(&file);
    // Drivers that honour BLKRRPART have updated sysfs when it returns; a short wait covers
    // slow ones before we fall back to BLKPG.
    if wait_until(Duration::from_millis(500), || {
        matches_layout(&disk.name, layout)
    }) {
        return Ok(());
    }
    // BLKRRPART did nothing (or failed with EBUSY): replace the kernel's partitions one by one.
    for name in partitions(&disk.name) {
        let n: i32 = read_trim(&sys_part(&disk.name, &name).join("partition"))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        sys::del_partition(&file, n)
            .context(|| format!("removing stale partition {name} from the kernel's view"))?;
    }
    for (n, extent) in (1..).zip(layout.entries()) {
        sys::add_partition(&file, n, extent.start, extent.size).context(|| {
            format!(
                "telling the kernel about partition {n} of {}",
                disk.path.display()
            )
        })?;
    }
    if wait_until(Duration::from_secs(5), || {
        matches_layout(&disk.name, layout)
    }) {
        return Ok(());
    }
    Err(err(format!(
        "the kernel did not pick up the new partitions of {} (re-read: {})",
        disk.path.display(),
        reread
            .map(|_| "ok".to_string())
            .unwrap_or_else(|e| e.to_string())
    )))
}

fn sys_part(disk: &str, part: &str) -> PathBuf {
    PathBuf::from("/sys/class/block").join(disk).join(part)
}

/// sysfs lists exactly the layout's partitions with their start and size (in 512-byte units).
fn matches_layout(disk: &str, layout: &Layout) -> bool {
    let names = partitions(disk);
    names.len() == layout.entries().len()
        && names.iter().zip(layout.entries()).all(|(name, extent)| {
            let dir = sys_part(disk, name);
            let num = |f: &str| read_trim(&dir.join(f)).and_then(|s| s.parse::<u64>().ok());
            num("start") == Some(extent.start / 512) && num("size") == Some(extent.size / 512)
        })
}

/// `/dev/<part>`, waiting for devtmpfs to create it and creating it ourselves if it does not.
fn device_node(disk: &str, part: &str) -> Result<PathBuf> {
    let node = Path::new("/dev").join(part);
    if wait_until(Duration::from_secs(3), || node.exists()) {
        return Ok(node);
    }
    let dev = read_trim(&sys_part(disk, part).join("dev"))
        .ok_or_else(|| err(format!("no {part} in sysfs")))?;
    let (major, minor) = dev
        .split_once(':')
        .and_then(|(a, b)| Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?)))
        .ok_or_else(|| err(format!("bad device number {dev:?} for {part}")))?;
    sys::mknod_block(&node, major, minor).context(|| format!("creating {}", node.display()))?;
    Ok(node)
}

pub fn wait_until(limit: Duration, mut ok: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if ok() {
            return true;
        }
        if start.elapsed() >= limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Partition ioctls (linux/fs.h, linux/blkpg.h; stable ABI).
mod sys {
    use std::ffi::CString;
    use std::fs::File;
    use std::io;
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    use std::path::Path;

    const BLKRRPART: libc::c_ulong = 0x125f;
    const BLKPG: libc::c_ulong = 0x1269;
    const BLKPG_ADD_PARTITION: libc::c_int = 1;
    const BLKPG_DEL_PARTITION: libc::c_int = 2;

    #[repr(C)]
    struct BlkpgPartition {
        start: libc::c_longlong,
        length: libc::c_longlong,
        pno: libc::c_int,
        devname: [libc::c_char; 64],
        volname: [libc::c_char; 64],
    }

    #[repr(C)]
    struct BlkpgIoctlArg {
        op: libc::c_int,
        flags: libc::c_int,
        datalen: libc::c_int,
        data: *mut libc::c_void,
    }

    fn check(rc: libc::c_int) -> io::Result<()> {
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    pub fn reread(f: &File) -> io::Result<()> {
        // SAFETY: BLKRRPART takes no argument.
        check(unsafe { libc::ioctl(f.as_raw_fd(), BLKRRPART as _) })
    }

    fn blkpg(f: &File, op: libc::c_int, pno: i32, start: u64, length: u64) -> io::Result<()> {
        let mut part = BlkpgPartition {
            start: start as libc::c_longlong,
            length: length as libc::c_longlong,
            pno,
            devname: [0; 64],
            volname: [0; 64],
        };
        let mut arg = BlkpgIoctlArg {
            op,
            flags: 0,
            datalen: std::mem::size_of::<BlkpgPartition>() as libc::c_int,
            data: &mut part as *mut BlkpgPartition as *mut libc::c_void,
        };
        // SAFETY: both structs match the kernel's layout and outlive the call.
        check(unsafe { libc::ioctl(f.as_raw_fd(), BLKPG as _, &mut arg as *mut BlkpgIoctlArg) })
    }

    pub fn add_partition(f: &File, pno: i32, start: u64, length: u64) -> io::Result<()> {
        blkpg(f, BLKPG_ADD_PARTITION, pno, start, length)
    }

    pub fn del_partition(f: &File, pno: i32) -> io::Result<()> {
        blkpg(f, BLKPG_DEL_PARTITION, pno, 0, 0)
    }

    pub fn mknod_block(path: &Path, major: u32, minor: u32) -> io::Result<()> {
        let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
        // SAFETY: c is a valid NUL-terminated path.
        check(unsafe {
            libc::mknod(
                c.as_ptr(),
                libc::S_IFBLK | 0o600,
                libc::makedev(major, minor),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::GIB;

    #[test]
    fn layout_is_aligned_and_leaves_room_for_the_backup_gpt() {
        let l = layout(10 * GIB + 12345);
        assert_eq!(
            l.bios,
            Extent {
                start: MIB,
                size: MIB
            }
        );
        assert_eq!(
            l.esp,
            Extent {
                start: 2 * MIB,
                size: 512 * MIB
            }
        );
        assert_eq!(l.root.start, 514 * MIB);
        assert_eq!(l.root.start + l.root.size, 10 * GIB - MIB);
        assert_eq!(l.root.size % MIB, 0);
    }

    #[test]
    fn script_is_in_sectors() {
        let s = sfdisk_script(&layout(2 * GIB), 512);
        assert!(s.starts_with("label: gpt\nunit: sectors\n"), "{s}");
        assert!(
            s.contains(&format!("start=4096, size=1048576, type={ESP_TYPE}")),
            "{s}"
        );
        assert!(
            s.contains(&format!(
                "start=1052672, size=3139584, type={LINUX_FS_TYPE}"
            )),
            "{s}"
        );
        assert!(
            s.ends_with(&format!(
                "start=2048, size=2048, type={BIOS_BOOT_TYPE}, name=\"BIOS boot partition\"\n"
            )),
            "{s}"
        );
        let s4k = sfdisk_script(&layout(2 * GIB), 4096);
        assert!(s4k.contains("start=512, size=131072,"), "{s4k}");
    }
}
