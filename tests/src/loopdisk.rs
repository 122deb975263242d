//! A sparse disk image on a loop device for tests that partition, format and mount: on drop it
//! unmounts whatever is still mounted below its directory, detaches the device and waits until
//! the kernel has really let go of it, so a failing test leaves no device or mount behind.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::cmd::{check, command, failure, output};

pub struct LoopDisk {
    dir: tempfile::TempDir,
    image: PathBuf,
    dev: String,
}

impl LoopDisk {
    /// A `size`-byte sparse image attached with partition scanning.
    pub fn new(size: u64) -> LoopDisk {
        let dir = tempfile::Builder::new()
            .prefix("pxelab-loopdisk")
            .tempdir()
            .expect("a temp dir for the disk image");
        let image = dir.path().join("disk.img");
        fs::File::create(&image)
            .and_then(|f| f.set_len(size))
            .expect("a sparse disk image");
        let mut attach = command(&["losetup", "--find", "--show", "--partscan"]);
        attach.arg(&image);
        let dev = check(&mut attach).trim().to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        LoopDisk { dir, image, dev }
    }

    /// `/dev/loopN`.
    pub fn dev(&self) -> &str {
        &self.dev
    }

    pub fn image(&self) -> &Path {
        &self.image
    }

    /// A path in the disk's scratch directory (unmounted and removed on drop).
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// `/dev/loopNpK`, once the kernel has created it. Some kernels' loop driver ignores the
    /// re-read that partitioning tools ask for (the installer falls back to BLKPG for the same
    /// reason): `partx --update` tells the kernel about the partitions one by one.
    pub fn partition(&self, n: u32) -> String {
        let path = format!("{}p{n}", self.dev);
        if !Path::new(&path).exists() {
            check(&mut command(&["partx", "--update", &self.dev]));
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while !Path::new(&path).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        path
    }

    /// Mount points still at or below the disk's scratch directory, deepest first.
    pub fn mounts(&self) -> Vec<String> {
        mounts_under(self.dir.path())
    }

    /// Mounts partition `n` read-only at `path(name)` (unmounted on drop).
    pub fn mount_ro(&self, n: u32, name: &str) -> PathBuf {
        self.mount_device_ro(&self.partition(n), name)
    }

    /// Mounts the filesystem that fills the whole disk (no partition table) read-only at
    /// `path(name)` (unmounted on drop).
    pub fn mount_whole_ro(&self, name: &str) -> PathBuf {
        self.mount_device_ro(&self.dev, name)
    }

    fn mount_device_ro(&self, device: &str, name: &str) -> PathBuf {
        let at = self.path(name);
        fs::create_dir_all(&at).expect("a mount point");
        let mut mount = command(&["mount", "-o", "ro", device]);
        mount.arg(&at);
        let out = output(&mut mount);
        if !out.status.success() {
            let state = output(&mut command(&[
                "sh",
                "-c",
                "losetup -a; grep -E 'loop|pxelab' /proc/self/mountinfo; \
                 ls -l /sys/block/loop*/loop*/holders; dmesg | tail -5",
            ]));
            panic!(
                "{}\n--- loop devices and mounts ---\n{}",
                failure(&mount, &out),
                String::from_utf8_lossy(&state.stdout)
            );
        }
        at
    }
}

/// Mount points at or below `dir`, deepest first.
fn mounts_under(dir: &Path) -> Vec<String> {
    let prefix = dir.to_string_lossy().into_owned();
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<String> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(&prefix))
        .map(str::to_string)
        .collect();
    found.sort_by_key(|m| std::cmp::Reverse(m.len()));
    found
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        for m in mounts_under(self.dir.path()) {
            let _ = command(&["umount", "-l", &m]).status();
        }
        let _ = command(&["losetup", "-d", &self.dev]).status();
        // `losetup -d` on a device something still holds only marks it for autoclear.
        let name = self.dev.trim_start_matches("/dev/");
        let backing = format!("/sys/block/{name}/loop/backing_file");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Path::new(&backing).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmd::{require, require_root};

    #[test]
    fn sys_a_dropped_disk_leaves_no_device_or_mount() {
        require_root("attaching loop devices");
        require("mke2fs", "e2fsprogs");
        let (dev, dir);
        {
            let disk = LoopDisk::new(64 << 20);
            check(
                command(&["sfdisk", "--quiet", disk.dev()]).stdin(
                    fs::File::open({
                        let script = disk.path("layout");
                        fs::write(&script, "label: gpt\n,\n").unwrap();
                        script
                    })
                    .unwrap(),
                ),
            );
            check(&mut command(&["mke2fs", "-q", "-F", &disk.partition(1)]));
            let at = disk.mount_ro(1, "root");
            assert!(at.join("lost+found").is_dir());
            dev = disk.dev().to_string();
            dir = disk.path("");
        }
        assert!(
            mounts_under(&dir).is_empty(),
            "mounts left under {}",
            dir.display()
        );
        let listed = output(&mut command(&["losetup", "-a"]));
        assert!(
            !String::from_utf8_lossy(&listed.stdout).contains(&format!("{dev}:")),
            "{dev} still attached"
        );
    }
}
