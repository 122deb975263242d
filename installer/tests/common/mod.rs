//! Host-command helpers and the loop-device disk shared by the installer's test files.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};

/// The MAC of the test VM (its NIC in [`in_private_network`]).
pub const MAC: &str = "52:54:00:12:34:56";
pub const LAB_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIK0wmN/Cr3JXqmLW7u+g9pTh+wyqDHpSQEIQczXkVx9q lab";

/// The login the stack's user-data declares, as the config hands it to the installer.
pub fn lab_login() -> pxelab_contract::Login {
    pxelab_contract::Login {
        user: "pxelab".into(),
        gecos: "pxelab lab user".into(),
        shell: "/bin/bash".into(),
        sudo: Some("ALL=(ALL) NOPASSWD:ALL".into()),
        ssh_authorized_keys: vec![LAB_KEY.into()],
    }
}

/// Fails the test unless `tool` is on PATH, naming the package that provides it.
pub fn require(tool: &str, package: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success());
    assert!(
        found.unwrap_or(false),
        "{tool} not found: apt-get install {package}"
    );
}

/// Runs a host command; on failure panics with everything needed to see why.
pub fn sh(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Loop devices, mounts and /dev/disk are machine-wide: one such test at a time per binary.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A sparse disk image attached to a loop device (with partition scanning). Drop unmounts
/// anything still mounted under its directory and detaches the device, also after a failure.
pub struct LoopDisk {
    pub dir: tempfile::TempDir,
    pub image: PathBuf,
    pub dev: String,
}

impl LoopDisk {
    pub fn new(size: u64) -> LoopDisk {
        let dir = tempfile::Builder::new()
            .prefix("pxelab-installer-test")
            .tempdir()
            .expect("tempdir");
        let image = dir.path().join("disk.img");
        fs::File::create(&image)
            .and_then(|f| f.set_len(size))
            .expect("sparse disk image");
        let dev = sh(Command::new("losetup")
            .args(["--find", "--show", "--partscan"])
            .arg(&image))
        .trim()
        .to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        LoopDisk { dir, image, dev }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn partition(&self, n: u32) -> String {
        format!("{}p{n}", self.dev)
    }

    /// Mounts partition `n` read-only at a fresh directory (unmounted by Drop).
    pub fn mount_ro(&self, n: u32, name: &str) -> PathBuf {
        let at = self.path(name);
        fs::create_dir_all(&at).expect("mount point");
        let out = Command::new("mount")
            .args(["-o", "ro"])
            .arg(self.partition(n))
            .arg(&at)
            .output()
            .expect("mount");
        if !out.status.success() {
            let diag = sh(Command::new("sh").args(["-c", "losetup -a; grep -E 'loop|pxelab' /proc/self/mountinfo; ls -l /sys/block/loop*/loop*/holders; dmesg | tail -5"]));
            panic!(
                "mount {} failed: {}\n{diag}",
                self.partition(n),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        at
    }
}

pub fn mounts_under(dir: &Path) -> Vec<String> {
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
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// Runs `body` on a thread of its own in a network namespace of its own (gone with the thread),
/// where a veth carries the config's MAC and an address, as the initrd's NIC does after DHCP.
/// The fixture server and the installer started by `body` live there too.
pub fn in_private_network(body: impl FnOnce() + Send) {
    std::thread::scope(|scope| {
        let thread = scope.spawn(|| {
            // SAFETY: unshare has no memory-safety preconditions; it moves only this thread.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(
                rc,
                0,
                "unshare(CLONE_NEWNET): {}",
                std::io::Error::last_os_error()
            );
            for args in [
                "link set lo up",
                &format!("link add eth0 address {MAC} type veth peer name eth0p"),
                "address add 10.99.7.10/24 dev eth0",
                "link set eth0 up",
                "link set eth0p up",
            ] {
                sh(Command::new("ip").args(args.split(' ')));
            }
            body();
        });
        if let Err(panic) = thread.join() {
            std::panic::resume_unwind(panic);
        }
    });
}

/// Root and the host tools the loop-disk tests run.
pub fn require_root_and_tools() {
    // SAFETY: geteuid cannot fail.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "sys_ installer tests need root (loop devices, mkfs, mount)"
    );
    for (tool, package) in [
        ("losetup", "util-linux"),
        ("blkid", "util-linux"),
        ("sfdisk", "fdisk"),
        ("mke2fs", "e2fsprogs"),
        ("mkfs.fat", "dosfstools"),
        ("tar", "tar"),
        ("zstd", "zstd"),
        ("mtype", "mtools"),
        ("ssh-keygen", "openssh-client"),
        ("ip", "iproute2"),
        ("chroot", "coreutils"),
        ("unshare", "util-linux"),
    ] {
        require(tool, package);
    }
}
