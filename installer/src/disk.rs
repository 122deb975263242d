//! Choosing the target disk and refusing one that is too small or in use, before any write.
//!
//! Size rule: the disk must hold 1 MiB (GPT + alignment) + the 1 MiB BIOS boot partition + the
//! ESP + the root need + 1 MiB (backup GPT), where the root need is `max(4 GiB, 4 × compressed
//! rootfs size)`. The config only knows the compressed size; Debian rootfs tarballs measured
//! here compress 3–3.8× with zstd (see FIELD-NOTES), so 4× covers the unpacked tree, and 4 GiB
//! leaves room to install packages.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use pxelab_contract::ESP_SIZE_MIB;

use crate::error::{err, human_bytes, Context, Result};

pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;
/// Room for GRUB's i386-pc core image: what grub-install asks for, far above the ~30 KiB ours
/// takes.
pub const BIOS_BOOT_SIZE: u64 = MIB;

/// Bytes the root filesystem needs for a rootfs tarball of `compressed` bytes.
pub fn root_need(compressed: u64) -> u64 {
    (4 * GIB).max(compressed.saturating_mul(4))
}

/// Smallest disk the installer accepts for a rootfs tarball of `compressed` bytes.
pub fn required_bytes(compressed: u64) -> u64 {
    MIB + BIOS_BOOT_SIZE + ESP_SIZE_MIB * MIB + root_need(compressed) + MIB
}

/// A whole-disk block device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    pub path: PathBuf,
    /// The kernel's name (`vda`, `nvme0n1`, `loop3`): the key into /sys/class/block.
    pub name: String,
    pub size: u64,
    pub logical_sector: u64,
}

impl Disk {
    /// Opens `path` (following /dev/disk/by-* symlinks) and checks it is a whole disk.
    pub fn open(path: &Path) -> Result<Disk> {
        let real = fs::canonicalize(path).context(|| format!("disk {}", path.display()))?;
        let meta = fs::metadata(&real).context(|| format!("disk {}", real.display()))?;
        if !meta.file_type().is_block_device() {
            return Err(err(format!("{} is not a block device", path.display())));
        }
        let (major, minor) = (libc::major(meta.rdev()), libc::minor(meta.rdev()));
        let sys = fs::canonicalize(format!("/sys/dev/block/{major}:{minor}"))
            .context(|| format!("finding {} in /sys/dev/block", real.display()))?;
        if sys.join("partition").exists() {
            return Err(err(format!(
                "{} is a partition; name the whole disk (e.g. /dev/vda)",
                path.display()
            )));
        }
        let name = sys
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| err(format!("no kernel name for {}", real.display())))?
            .to_string();
        let file = fs::File::open(&real).context(|| format!("opening {}", real.display()))?;
        let size =
            sys::size_bytes(&file).context(|| format!("reading the size of {}", real.display()))?;
        let logical_sector = sys::logical_sector(&file)
            .context(|| format!("reading the sector size of {}", real.display()))?;
        Ok(Disk {
            path: real,
            name,
            size,
            logical_sector,
        })
    }

    /// Refuses a disk that cannot hold the install.
    pub fn check_size(&self, compressed: u64) -> Result<()> {
        let need = required_bytes(compressed);
        if self.size < need {
            return Err(err(format!(
                "disk {} is {} but the install needs at least {} (1 MiB BIOS boot + {} MiB ESP + root of max(4 GiB, 4 × {} rootfs tarball)); attach a larger disk",
                self.path.display(),
                human_bytes(self.size),
                human_bytes(need),
                ESP_SIZE_MIB,
                human_bytes(compressed)
            )));
        }
        Ok(())
    }

    /// Refuses a disk that is mounted, used as swap, or held by device-mapper/RAID, either
    /// itself or through one of its partitions.
    pub fn check_unused(&self) -> Result<()> {
        let sys = PathBuf::from("/sys/class/block").join(&self.name);
        let mut devs = vec![(
            self.name.clone(),
            read_trim(&sys.join("dev")).unwrap_or_default(),
        )];
        for part in partitions(&self.name) {
            devs.push((
                part.clone(),
                read_trim(&sys.join(&part).join("dev")).unwrap_or_default(),
            ));
        }
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let swaps = fs::read_to_string("/proc/swaps").unwrap_or_default();
        for (name, dev) in &devs {
            let mounted = mountinfo
                .lines()
                .find(|l| l.split(' ').nth(2) == Some(dev.as_str()));
            if let Some(line) = mounted {
                let at = line.split(' ').nth(4).unwrap_or("?");
                return Err(err(format!(
                    "/dev/{name} is mounted at {at}; refusing to overwrite {}",
                    self.path.display()
                )));
            }
            if swaps
                .lines()
                .any(|l| l.split_whitespace().next() == Some(&format!("/dev/{name}")))
            {
                return Err(err(format!(
                    "/dev/{name} is in use as swap; refusing to overwrite {}",
                    self.path.display()
                )));
            }
            let holders = sys_dir(&self.name, name).join("holders");
            if fs::read_dir(holders)
                .map(|mut d| d.next().is_some())
                .unwrap_or(false)
            {
                return Err(err(format!(
                    "/dev/{name} is held by device-mapper or RAID; refusing to overwrite it"
                )));
            }
        }
        Ok(())
    }
}

fn sys_dir(disk: &str, name: &str) -> PathBuf {
    let base = PathBuf::from("/sys/class/block").join(disk);
    if disk == name {
        base
    } else {
        base.join(name)
    }
}

/// Kernel names of `disk`'s partitions, by partition number.
pub fn partitions(disk: &str) -> Vec<String> {
    let mut parts: Vec<(u32, String)> = fs::read_dir(PathBuf::from("/sys/class/block").join(disk))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let n: u32 = read_trim(&e.path().join("partition"))?.parse().ok()?;
            Some((n, e.file_name().to_string_lossy().into_owned()))
        })
        .collect();
    parts.sort();
    parts.into_iter().map(|(_, name)| name).collect()
}

pub fn read_trim(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

/// The disk to use: the config's, else the only candidate of the best kind in `sys_block`
/// (normally /sys/block). Two or more of the best kind are refused: guessing would wipe a disk
/// the operator may need. Returns the device path and a note for the log saying why.
pub fn choose(configured: Option<&str>, sys_block: &Path) -> Result<(PathBuf, String)> {
    if let Some(path) = configured {
        return Ok((PathBuf::from(path), "named by the config".into()));
    }
    let found = candidates(sys_block);
    let Some((name, kind)) = found.first() else {
        return Err(err(format!(
            "no disk found: no non-removable virtio, NVMe or SATA/SCSI disk in {}; attach one or name it in the VM definition (\"disk\")",
            sys_block.display()
        )));
    };
    let same: Vec<String> = found
        .iter()
        .filter(|(_, k)| k == kind)
        .map(|(n, _)| format!("/dev/{n}"))
        .collect();
    if same.len() > 1 {
        return Err(err(format!(
            "{} {kind} disks ({}) and none named; name the one to install to in the VM definition (\"disk\": \"{}\")",
            same.len(),
            same.join(", "),
            same[0]
        )));
    }
    let others = found.len() - 1;
    Ok((
        PathBuf::from("/dev").join(name),
        format!("the only non-removable {kind} disk ({others} of other kinds)"),
    ))
}

/// One run of a kernel disk name: letters compare shorter first (`vdb` < `vdaa`, the order the
/// kernel names them in), digits by value (`nvme1n1` < `nvme10n1`).
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Run {
    Digits(u64),
    Letters(usize, String),
}

/// `name` as runs, so that sorting these sorts disks in the order they were named.
fn natural_key(name: &str) -> Vec<Run> {
    let mut runs = Vec::new();
    let mut rest = name;
    while let Some(first) = rest.chars().next() {
        let digit = first.is_ascii_digit();
        let end = rest
            .find(|c: char| c.is_ascii_digit() != digit)
            .unwrap_or(rest.len());
        let (run, tail) = rest.split_at(end);
        runs.push(if digit {
            Run::Digits(run.parse().unwrap_or(u64::MAX))
        } else {
            Run::Letters(run.len(), run.to_string())
        });
        rest = tail;
    }
    runs
}

/// Non-removable, writable, non-empty, non-USB disks, best kind first (virtio, NVMe, SATA/SCSI,
/// Xen), then in the kernel's naming order (`nvme1n1` before `nvme10n1`, `sdz` before `sdaa`).
pub fn candidates(sys_block: &Path) -> Vec<(String, &'static str)> {
    let kind_of = |name: &str| -> Option<(u8, &'static str)> {
        if name.starts_with("vd") {
            Some((0, "virtio"))
        } else if name.starts_with("nvme") {
            Some((1, "NVMe"))
        } else if name.starts_with("sd") {
            Some((2, "SATA/SCSI"))
        } else if name.starts_with("xvd") {
            Some((3, "Xen"))
        } else {
            None
        }
    };
    let mut found: Vec<(u8, Vec<Run>, String, &'static str)> = Vec::new();
    for entry in fs::read_dir(sys_block).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((rank, kind)) = kind_of(&name) else {
            continue;
        };
        let dir = entry.path();
        let attr = |a: &str| read_trim(&dir.join(a)).unwrap_or_default();
        let usable = attr("removable") == "0"
            && attr("ro") != "1"
            && attr("hidden") != "1"
            && attr("size").parse::<u64>().unwrap_or(0) > 0;
        let via_usb = fs::read_link(&dir)
            .map(|t| t.to_string_lossy().contains("/usb"))
            .unwrap_or(false);
        if usable && !via_usb {
            found.push((rank, natural_key(&name), name, kind));
        }
    }
    found.sort();
    found
        .into_iter()
        .map(|(_, _, name, kind)| (name, kind))
        .collect()
}

/// Block-device ioctls (numbers from linux/fs.h, stable ABI).
pub mod sys {
    use std::fs::File;
    use std::io;
    use std::os::fd::AsRawFd;

    const BLKSSZGET: libc::c_ulong = 0x1268;
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

    pub fn size_bytes(f: &File) -> io::Result<u64> {
        let mut size: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer.
        let rc = unsafe { libc::ioctl(f.as_raw_fd(), BLKGETSIZE64 as _, &mut size as *mut u64) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(size)
    }

    pub fn logical_sector(f: &File) -> io::Result<u64> {
        let mut sector: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one int through the pointer.
        let rc = unsafe {
            libc::ioctl(
                f.as_raw_fd(),
                BLKSSZGET as _,
                &mut sector as *mut libc::c_int,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(u64::try_from(sector).unwrap_or(512).max(512))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_disk(root: &Path, name: &str, removable: &str, size: &str) {
        let d = root.join(name);
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("removable"), removable).unwrap();
        fs::write(d.join("size"), size).unwrap();
        fs::write(d.join("ro"), "0\n").unwrap();
    }

    #[test]
    fn picks_the_only_fixed_disk_of_the_best_kind() {
        let t = tempfile::tempdir().unwrap();
        fake_disk(t.path(), "sda", "0\n", "100\n");
        fake_disk(t.path(), "sr0", "1\n", "100\n");
        fake_disk(t.path(), "loop0", "0\n", "100\n");
        fake_disk(t.path(), "vdb", "0\n", "100\n");
        fake_disk(t.path(), "vda", "0\n", "0\n");
        fake_disk(t.path(), "nvme0n1", "0\n", "100\n");
        fake_disk(t.path(), "sdb", "1\n", "100\n");
        let names: Vec<String> = candidates(t.path()).into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            ["vdb", "nvme0n1", "sda"],
            "empty vda, removable sdb, loop and cdrom skipped"
        );
        let (path, why) = choose(None, t.path()).unwrap();
        assert_eq!(path, PathBuf::from("/dev/vdb"));
        assert!(why.contains("virtio"), "{why}");
        assert_eq!(
            choose(Some("/dev/sdz"), t.path()).unwrap().0,
            PathBuf::from("/dev/sdz")
        );
    }

    #[test]
    fn candidates_come_in_the_kernels_naming_order() {
        let t = tempfile::tempdir().unwrap();
        for name in ["nvme10n1", "nvme2n1", "nvme1n1", "nvme1n10", "nvme1n2"] {
            fake_disk(t.path(), name, "0\n", "100\n");
        }
        for name in ["sdaa", "sdb", "sdz", "vdaa", "vdb"] {
            fake_disk(t.path(), name, "0\n", "100\n");
        }
        let names: Vec<String> = candidates(t.path()).into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "vdb", "vdaa", "nvme1n1", "nvme1n2", "nvme1n10", "nvme2n1", "nvme10n1", "sdb",
                "sdz", "sdaa"
            ]
        );
    }

    #[test]
    fn two_disks_of_the_best_kind_and_none_named_is_refused() {
        let t = tempfile::tempdir().unwrap();
        fake_disk(t.path(), "nvme10n1", "0\n", "100\n");
        fake_disk(t.path(), "nvme1n1", "0\n", "100\n");
        fake_disk(t.path(), "sda", "0\n", "100\n");
        let e = choose(None, t.path()).unwrap_err().0;
        assert_eq!(
            e,
            "2 NVMe disks (/dev/nvme1n1, /dev/nvme10n1) and none named; name the one to install to in the VM definition (\"disk\": \"/dev/nvme1n1\")"
        );
        assert_eq!(
            choose(Some("/dev/nvme10n1"), t.path()).unwrap().0,
            PathBuf::from("/dev/nvme10n1"),
            "naming one settles it"
        );
    }

    #[test]
    fn no_disk_is_a_clear_error() {
        let t = tempfile::tempdir().unwrap();
        fake_disk(t.path(), "sr0", "1\n", "100\n");
        assert!(choose(None, t.path())
            .unwrap_err()
            .0
            .starts_with("no disk found"));
    }

    #[test]
    fn size_rule() {
        assert_eq!(root_need(100 * MIB), 4 * GIB);
        assert_eq!(root_need(2 * GIB), 8 * GIB);
        assert_eq!(required_bytes(100 * MIB), 515 * MIB + 4 * GIB);
        let disk = Disk {
            path: "/dev/vda".into(),
            name: "vda".into(),
            size: 4 * GIB,
            logical_sector: 512,
        };
        let e = disk.check_size(100 * MIB).unwrap_err().0;
        assert!(
            e.contains("disk /dev/vda is 4.0 GiB but the install needs at least 4.5 GiB"),
            "{e}"
        );
        assert!(e.contains("attach a larger disk"), "{e}");
        let big = Disk {
            size: 5 * GIB,
            ..disk
        };
        assert!(big.check_size(100 * MIB).is_ok());
    }
}
