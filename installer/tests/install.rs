//! The installer binary, run as the initrd runs it, against a sparse disk image on a loop device
//! and a fixture boot server on loopback (config, cloud-init, events, rootfs with fault
//! injection). The fixture rootfs carries a stand-in GRUB image (the installer copies it, never
//! runs it) and a fake `useradd` (busybox) that records its arguments.
//!
//! `sys_*` tests need root, losetup, sfdisk, blkid, mke2fs, mkfs.fat, mtools, ssh-keygen and a
//! static busybox; they run one at a time (loop devices, mounts and /dev/disk are machine-wide).

mod common;

use common::{lab_login, private_network, require_root_and_tools, serial, LAB_KEY, MAC};
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use pxelab_contract::{Artifact, Event, InstallerConfig, Mac, Phase};
use pxelab_tests::cmd::{check, checked, must, output};
use pxelab_tests::{sha256_hex, Behavior, FixtureServer, LoopDisk};

const GIB: u64 = 1 << 30;
const ROOTFS_PATH: &str = "/images/debian-12/x86_64/rootfs.tar.zst";
const EVENTS_PATH: &str = "/events/52-54-00-12-34-56";
const KERNEL: &str = "6.1.0-pxelab-test";

// ---------------------------------------------------------------------------------------------
// Fixture rootfs and server
// ---------------------------------------------------------------------------------------------

/// The host's busybox, which must be static to run inside the fixture root's chroot.
fn static_busybox() -> Vec<u8> {
    let path = Path::new("/bin/busybox");
    let bytes = fs::read(path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}: the fixture rootfs needs a static busybox: apt-get install busybox-static",
            path.display()
        )
    });
    assert!(
        !elf_has_interp(&bytes),
        "/bin/busybox is dynamically linked: apt-get install busybox-static"
    );
    bytes
}

/// True if the 64-bit little-endian ELF has a PT_INTERP program header (is dynamic).
fn elf_has_interp(b: &[u8]) -> bool {
    assert!(
        b.len() > 64 && &b[..4] == b"\x7fELF" && b[4] == 2,
        "not a 64-bit ELF"
    );
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(b[0x20..0x28].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    (0..phnum).any(|i| {
        let at = phoff + i * phentsize;
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap()) == 3
    })
}

/// Stands in for Debian's monolithic grubx64.efi: the installer copies it to the ESP.
fn grub_image() -> Vec<u8> {
    filler(4, 64 << 10)
}

const FAKE_USERADD: &str = r#"#!/bin/sh
# Fake useradd: records its arguments and adds the user as useradd would (uid/gid 1000).
bb=/bin/busybox
echo "useradd $*" >> /var/log/pxelab-fake-useradd.log
echo "$1:x:1000:1000:$3:/home/$1:$5" >> /etc/passwd
echo "$1:x:1000:" >> /etc/group
$bb mkdir -p /home/$1
$bb chown 1000:1000 /home/$1
"#;

struct Rootfs {
    zst: Vec<u8>,
    tar_len: u64,
}

/// Deterministic, moderately compressible bytes (like binaries): words from a small alphabet
/// mixed with noise.
fn filler(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if x.is_multiple_of(3) {
            out.extend_from_slice(&x.to_le_bytes());
        } else {
            out.extend_from_slice(&[b"lib_", b"init", b"main", b"data"][(x % 4) as usize][..]);
        }
    }
    out.truncate(len);
    out
}

fn rootfs() -> &'static Rootfs {
    static ROOTFS: OnceLock<Rootfs> = OnceLock::new();
    ROOTFS.get_or_init(build_rootfs)
}

fn build_rootfs() -> Rootfs {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: &str,
                   kind: tar::EntryType,
                   mode: u32,
                   owner: (u64, u64),
                   body: &[u8],
                   link: Option<&str>| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        if matches!(kind, tar::EntryType::Char | tar::EntryType::Block) {
            // dev/null is 1:3; the block device gets 7:200.
            let (major, minor) = if kind == tar::EntryType::Char {
                (1, 3)
            } else {
                (7, 200)
            };
            h.set_device_major(major).expect("device major");
            h.set_device_minor(minor).expect("device minor");
        }
        h.set_mode(mode);
        h.set_uid(owner.0);
        h.set_gid(owner.1);
        h.set_mtime(1_700_000_000);
        h.set_size(body.len() as u64);
        match link {
            Some(target) => b.append_link(&mut h, path, target).expect("tar link"),
            None => b.append_data(&mut h, path, body).expect("tar entry"),
        }
    };
    use tar::EntryType::{Block, Char, Directory as Dir, Link, Regular as File, Symlink};
    for (dir, mode) in [
        ("bin", 0o755),
        ("boot", 0o755),
        ("dev", 0o755),
        ("etc", 0o755),
        ("etc/default", 0o755),
        ("home", 0o755),
        ("home/user", 0o750),
        ("proc", 0o555),
        ("root", 0o700),
        ("sys", 0o555),
        ("tmp", 0o1777),
        ("usr", 0o755),
        ("usr/bin", 0o755),
        ("usr/sbin", 0o755),
        ("usr/share", 0o755),
        ("usr/lib", 0o755),
        ("usr/lib/grub", 0o755),
        ("usr/lib/grub/x86_64-efi", 0o755),
        ("usr/lib/grub/x86_64-efi/monolithic", 0o755),
        ("var", 0o755),
        ("var/log", 0o755),
    ] {
        let owner = if dir == "home/user" {
            (1000, 1000)
        } else {
            (0, 0)
        };
        add(dir, Dir, mode, owner, b"", None);
    }
    add("bin/busybox", File, 0o755, (0, 0), &static_busybox(), None);
    add("bin/sh", Symlink, 0o777, (0, 0), b"", Some("busybox"));
    add("bin/su-helper", File, 0o4755, (0, 0), b"#!/bin/sh\n", None);
    add(
        "usr/lib/grub/x86_64-efi/monolithic/grubx64.efi",
        File,
        0o644,
        (0, 0),
        &grub_image(),
        None,
    );
    add(
        "usr/sbin/useradd",
        File,
        0o755,
        (0, 0),
        FAKE_USERADD.as_bytes(),
        None,
    );
    // Only their presence matters: the first-boot units name them.
    add("usr/sbin/sshd", File, 0o755, (0, 0), b"", None);
    add("bin/ip", File, 0o755, (0, 0), b"", None);
    add(
        "etc/passwd",
        File,
        0o644,
        (0, 0),
        b"root:x:0:0:root:/root:/bin/bash\n",
        None,
    );
    add(
        &format!("boot/vmlinuz-{KERNEL}"),
        File,
        0o644,
        (0, 0),
        &filler(1, 300_000),
        None,
    );
    add(
        &format!("boot/initrd.img-{KERNEL}"),
        File,
        0o644,
        (0, 0),
        &filler(2, 200_000),
        None,
    );
    add(
        "etc/default/grub",
        File,
        0o644,
        (0, 0),
        b"GRUB_TIMEOUT=5\nGRUB_CMDLINE_LINUX_DEFAULT=\"quiet\"\nGRUB_CMDLINE_LINUX=\"\"\n",
        None,
    );
    add(
        "etc/os-release",
        File,
        0o644,
        (0, 0),
        b"PRETTY_NAME=\"Fixture\"\nID=fixture\n",
        None,
    );
    add(
        "etc/hostname",
        File,
        0o644,
        (0, 0),
        b"mmdebstrap-host\n",
        None,
    );
    add(
        "etc/shadow",
        File,
        0o640,
        (0, 42),
        b"root:*:19000:0:99999:7:::\n",
        None,
    );
    add(
        "etc/localtime",
        Symlink,
        0o777,
        (0, 0),
        b"",
        Some("/usr/share/zoneinfo/Etc/UTC"),
    );
    add(
        "home/user/notes.txt",
        File,
        0o600,
        (1000, 1000),
        b"private\n",
        None,
    );
    add(
        "usr/bin/tool",
        File,
        0o755,
        (0, 0),
        &filler(3, 100_000),
        None,
    );
    add(
        "usr/bin/tool-hardlink",
        Link,
        0o755,
        (0, 0),
        b"",
        Some("usr/bin/tool"),
    );
    add("dev/null", Char, 0o666, (0, 0), b"", None);
    add("dev/loop-fixture", Block, 0o660, (0, 6), b"", None);
    // Bulk, so the stream takes long enough to cut, resume and measure (~96 MiB of tar).
    for i in 0..384u64 {
        add(
            &format!("usr/share/blob-{i:03}"),
            File,
            0o644,
            (0, 0),
            &filler(100 + i, 256 << 10),
            None,
        );
    }
    let tar = b.into_inner().expect("tar");
    let tar_len = tar.len() as u64;
    let zst = zstd::encode_all(&tar[..], 3).expect("zstd");
    Rootfs { zst, tar_len }
}

/// A boot server for one VM: config, cloud-init documents, rootfs, events.
struct Lab {
    server: FixtureServer,
    disk: LoopDisk,
}

fn lab(disk_size: u64, rootfs_behavior: Behavior) -> Lab {
    let server = FixtureServer::start();
    let disk = LoopDisk::new(disk_size);
    let r = rootfs();
    server.serve(ROOTFS_PATH, r.zst.clone(), rootfs_behavior);
    server.serve(
        "/cloud-init/t1/meta-data",
        "instance-id: t1\nlocal-hostname: pxelab-t1\n",
        Behavior::Normal,
    );
    server.serve(
        "/cloud-init/t1/user-data",
        "#cloud-config\nssh_authorized_keys: []\n",
        Behavior::Normal,
    );
    server.serve(
        "/cloud-init/t1/network-config",
        "version: 2\nethernets: {}\n",
        Behavior::Normal,
    );
    let config = InstallerConfig {
        name: "t1".into(),
        mac: MAC.parse::<Mac>().expect("mac"),
        hostname: "pxelab-t1".into(),
        distro: "debian-12".into(),
        rootfs: Artifact {
            url: server.url(ROOTFS_PATH),
            sha256: sha256_hex(&r.zst),
            size: r.zst.len() as u64,
        },
        disk_image: None,
        cloud_init_url: server.url("/cloud-init/t1/"),
        events_url: server.url(EVENTS_PATH),
        disk: Some(disk.dev().to_string()),
        reboot: false,
        direct_start: true,
        login: Some(lab_login()),
        wipe: None,
    };
    server.serve(
        "/config/52-54-00-12-34-56",
        serde_json::to_vec(&config).expect("config json"),
        Behavior::Normal,
    );
    Lab { server, disk }
}

struct Run {
    out: Output,
    stderr: String,
    elapsed: Duration,
}

fn run_installer(args: &[String]) -> Run {
    let start = Instant::now();
    let out = output(Command::new(env!("CARGO_BIN_EXE_pxelab-installer")).args(args));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!(
        "--- installer stderr ({}) ---\n{stderr}--- end ---",
        out.status
    );
    Run {
        out,
        stderr,
        elapsed: start.elapsed(),
    }
}

impl Lab {
    fn install(&self) -> Run {
        run_installer(&[
            format!(
                "config_url={}",
                self.server.url("/config/52-54-00-12-34-56")
            ),
            format!("pxelab.target={}", self.disk.path("target").display()),
            "pxelab.retries=3".into(),
            "pxelab.backoff_ms=20".into(),
        ])
    }

    fn events(&self) -> Vec<Event> {
        self.server
            .requests()
            .iter()
            .filter(|r| r.method == "POST")
            .map(|r| {
                assert_eq!(r.path, EVENTS_PATH);
                serde_json::from_slice(&r.body).expect("event JSON")
            })
            .collect()
    }

    /// Everything the installer mounted is gone, and it left no /dev/disk links behind.
    fn assert_clean(&self, had_dev_disk: bool) {
        assert_eq!(
            self.disk.mounts(),
            Vec::<String>::new(),
            "installer left mounts behind"
        );
        if !had_dev_disk {
            assert!(
                !Path::new("/dev/disk").exists(),
                "installer left /dev/disk behind"
            );
        }
    }
}

fn blkid(dev: &str) -> std::collections::HashMap<String, String> {
    must(&["blkid", "-p", "-o", "export", dev])
        .lines()
        .filter_map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect()
}

fn mode(p: &Path) -> u32 {
    fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn sys_install_to_a_loop_disk_end_to_end() {
    let _serial = serial();
    require_root_and_tools();
    private_network().within(install_to_a_loop_disk_end_to_end);
}

fn install_to_a_loop_disk_end_to_end() {
    let had_dev_disk = Path::new("/dev/disk").exists();
    let lab = lab(6 * GIB, Behavior::Normal);
    let run = lab.install();
    assert!(run.out.status.success(), "installer failed: {}", run.stderr);
    assert!(
        run.stderr
            .lines()
            .last()
            .unwrap_or("")
            .contains("reboot disabled by the config"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("SUCCESS: pxelab-t1 installed in"),
        "{}",
        run.stderr
    );
    lab.assert_clean(had_dev_disk);

    // Partition table: GPT, a 1 MiB BIOS boot partition at 1 MiB (entry 3), the 512 MiB ESP
    // after it, Linux root after that.
    let table: serde_json::Value =
        serde_json::from_str(&must(&["sfdisk", "--json", lab.disk.dev()])).expect("sfdisk --json");
    let pt = &table["partitiontable"];
    assert_eq!(pt["label"], "gpt");
    let parts = pt["partitions"].as_array().expect("partitions");
    assert_eq!(parts.len(), 3, "{table}");
    assert_eq!(parts[0]["start"], 4096);
    assert_eq!(parts[0]["size"], 1_048_576);
    assert_eq!(parts[0]["type"], "C12A7328-F81F-11D2-BA4B-00A0C93EC93B");
    assert_eq!(parts[1]["start"], 1_052_672);
    assert_eq!(parts[1]["type"], "0FC63DAF-8483-4772-8E79-3D69D8477DE4");
    assert_eq!(parts[2]["start"], 2048);
    assert_eq!(parts[2]["size"], 2048);
    assert_eq!(parts[2]["type"], "21686148-6449-6E6F-744E-656564454649");
    // The fixture rootfs has no i386-pc GRUB: the disk boots under UEFI only, and says so.
    assert!(
        run.stderr
            .contains("no BIOS boot code (the rootfs has no /usr/lib/grub/i386-pc"),
        "{}",
        run.stderr
    );
    let root_end = parts[1]["start"].as_u64().unwrap() + parts[1]["size"].as_u64().unwrap();
    assert!(
        root_end * 512 > 6 * GIB - 2 * (1 << 20),
        "root spans the disk: {table}"
    );

    // Filesystems.
    let esp = blkid(&lab.disk.partition(1));
    let root = blkid(&lab.disk.partition(2));
    assert_eq!(esp["TYPE"], "vfat", "{esp:?}");
    assert_eq!(esp["LABEL"], "ESP");
    assert_eq!(root["TYPE"], "ext4", "{root:?}");
    assert_eq!(root["LABEL"], "pxelab-root");
    let (root_uuid, esp_uuid) = (root["UUID"].clone(), esp["UUID"].clone());
    let features = must(&["dumpe2fs", "-h", &lab.disk.partition(2)]);
    assert!(
        !features.contains("orphan_file") && !features.contains("metadata_csum_seed"),
        "{features}"
    );

    // The extracted tree, byte for byte where it matters.
    let m = lab.disk.mount_ro(2, "check-root");
    assert_eq!(mode(&m.join("tmp")), 0o1777);
    assert_eq!(mode(&m.join("root")), 0o700);
    assert_eq!(mode(&m.join("bin/su-helper")), 0o4755);
    let notes = fs::metadata(m.join("home/user/notes.txt")).unwrap();
    assert_eq!(
        (
            notes.uid(),
            notes.gid(),
            mode(&m.join("home/user/notes.txt"))
        ),
        (1000, 1000, 0o600)
    );
    let home = fs::metadata(m.join("home/user")).unwrap();
    assert_eq!(
        (home.uid(), home.gid(), home.mtime()),
        (1000, 1000, 1_700_000_000)
    );
    assert_eq!(fs::metadata(m.join("etc/shadow")).unwrap().gid(), 42);
    assert_eq!(
        fs::read_link(m.join("etc/localtime")).unwrap(),
        Path::new("/usr/share/zoneinfo/Etc/UTC")
    );
    assert_eq!(
        fs::read_link(m.join("bin/sh")).unwrap(),
        Path::new("busybox")
    );
    let tool = fs::metadata(m.join("usr/bin/tool")).unwrap();
    assert_eq!(
        tool.ino(),
        fs::metadata(m.join("usr/bin/tool-hardlink")).unwrap().ino(),
        "hardlink kept"
    );
    assert_eq!(tool.nlink(), 2);
    assert_eq!(
        fs::read(m.join("usr/share/blob-383")).unwrap(),
        filler(100 + 383, 256 << 10)
    );
    let null = fs::symlink_metadata(m.join("dev/null")).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_char_device(
        &null.file_type()
    ));
    assert_eq!(null.rdev(), libc::makedev(1, 3));
    let blk = fs::symlink_metadata(m.join("dev/loop-fixture")).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_block_device(
        &blk.file_type()
    ));
    assert_eq!((blk.gid(), blk.rdev()), (6, libc::makedev(7, 200)));

    // Seed, fstab, hostname.
    let seed = m.join("var/lib/cloud/seed/nocloud-net");
    assert_eq!(
        fs::read_to_string(seed.join("meta-data")).unwrap(),
        "instance-id: t1\nlocal-hostname: pxelab-t1\n"
    );
    assert_eq!(
        fs::read_to_string(seed.join("user-data")).unwrap(),
        "#cloud-config\nssh_authorized_keys: []\n"
    );
    assert_eq!(
        fs::read_to_string(seed.join("network-config")).unwrap(),
        "version: 2\nethernets: {}\n"
    );
    assert_eq!(mode(&seed.join("user-data")), 0o600);
    assert!(
        !seed.join("vendor-data").exists(),
        "vendor-data is optional and the server has none"
    );
    let fstab = fs::read_to_string(m.join("etc/fstab")).unwrap();
    assert!(
        fstab.contains(&format!("UUID={root_uuid}\t/\text4")),
        "{fstab}"
    );
    assert!(
        fstab.contains(&format!("UUID={esp_uuid}\t/boot/efi\tvfat")),
        "{fstab}"
    );
    assert_eq!(
        fs::read_to_string(m.join("etc/hostname")).unwrap(),
        "pxelab-t1\n"
    );

    // Boot files: GRUB's image at the removable path, its config chaining the root's config,
    // which boots the kernel by UUID with update-grub's settings.
    assert_eq!(
        esp_bytes(&lab, "::/EFI/BOOT/BOOTX64.EFI"),
        grub_image(),
        "the rootfs's monolithic GRUB, unchanged"
    );
    let esp_cfg = esp_file(&lab, "::/EFI/BOOT/grub.cfg");
    assert_eq!(
        esp_file(&lab, "::/EFI/fixture/grub.cfg"),
        esp_cfg,
        "the same config where the image's prefix points (/EFI/<os-release ID>)"
    );
    assert!(
        esp_cfg.contains(&format!(
            "search --no-floppy --fs-uuid --set=root {root_uuid}\n"
        )) && esp_cfg.contains("set prefix=($root)/boot/grub\nconfigfile $prefix/grub.cfg\n"),
        "{esp_cfg}"
    );
    let cfg = fs::read_to_string(m.join("boot/grub/grub.cfg")).unwrap();
    assert!(
        cfg.contains(&format!(
            "\tlinux\t/boot/vmlinuz-{KERNEL} root=UUID={root_uuid} ro console=tty0 console=ttyS0,115200n8 quiet\n"
        )) && cfg.contains(&format!("\tinitrd\t/boot/initrd.img-{KERNEL}\n")),
        "{cfg}"
    );
    assert!(cfg.contains("set timeout=1\n"), "{cfg}");
    let defaults = fs::read_to_string(m.join("etc/default/grub.d/90-pxelab.cfg")).unwrap();
    assert!(
        defaults.contains("GRUB_DISABLE_LINUX_UUID=false\n") && defaults.contains("ttyS0"),
        "{defaults}"
    );
    must(&["fsck.fat", "-n", &lab.disk.partition(1)]);

    // Host keys: on the disk, loadable by OpenSSH, and the same ones `installed` reported.
    let installed = lab.events().pop().unwrap();
    assert_eq!(installed.phase, Phase::Installed);
    assert_eq!(installed.host_keys.len(), 2, "{installed:?}");
    for (name, reported) in ["ed25519", "ecdsa"].iter().zip(&installed.host_keys) {
        let key = m.join(format!("etc/ssh/ssh_host_{name}_key"));
        assert_eq!(mode(&key), 0o600);
        let public = check(Command::new("ssh-keygen").arg("-y").arg("-f").arg(&key));
        assert_eq!(
            public.trim(),
            format!("{reported} root@pxelab-t1"),
            "{name}"
        );
        let pub_file = fs::read_to_string(key.with_extension("pub")).unwrap();
        assert_eq!(pub_file, format!("{reported} root@pxelab-t1\n"));
    }

    // The login, ready before cloud-init: useradd as cloud-init calls it, keys, sudo.
    let useradd = fs::read_to_string(m.join("var/log/pxelab-fake-useradd.log")).unwrap();
    assert_eq!(
        useradd,
        "useradd pxelab --comment pxelab lab user --shell /bin/bash -m\n"
    );
    let keys = m.join("home/pxelab/.ssh/authorized_keys");
    assert_eq!(fs::read_to_string(&keys).unwrap(), format!("{LAB_KEY}\n"));
    let owner = |p: &Path| {
        let md = fs::metadata(p).unwrap();
        (md.uid(), md.gid())
    };
    assert_eq!((owner(&keys), mode(&keys)), ((1000, 1000), 0o600));
    let ssh_dir = m.join("home/pxelab/.ssh");
    assert_eq!((owner(&ssh_dir), mode(&ssh_dir)), ((1000, 1000), 0o700));
    let sudoers = m.join("etc/sudoers.d/90-pxelab-login");
    assert_eq!(mode(&sudoers), 0o440);
    assert!(fs::read_to_string(&sudoers)
        .unwrap()
        .ends_with("\npxelab ALL=(ALL) NOPASSWD:ALL\n"));

    // First boot: SSH on the address the installer was leased, the NIC named as cloud-init
    // names it, and a report when cloud-init is done.
    let units = m.join("etc/systemd/system");
    let early = fs::read_to_string(units.join("pxelab-early-ssh.service")).unwrap();
    assert!(
        early.contains(&format!(
            "ExecStartPre=/bin/sh /usr/local/lib/pxelab/early-ssh-net {MAC} 10.99.7.10/24\n"
        )) && early.contains("ExecStart=/usr/local/sbin/pxelab-early-sshd -D "),
        "{early}"
    );
    assert!(units
        .join("multi-user.target.wants/pxelab-early-ssh.service")
        .is_symlink());
    assert!(units.join("ssh.service.d/pxelab-early-ssh.conf").is_file());
    let link = fs::read_to_string(m.join("etc/systemd/network/10-pxelab-lan0.link")).unwrap();
    assert!(link.contains(&format!("MACAddress={MAC}\n")), "{link}");
    let done = fs::read_to_string(units.join("pxelab-cloud-init-done.service")).unwrap();
    assert!(done.contains(&lab.server.url(EVENTS_PATH)), "{done}");
    // The unit's network step, run here as at boot (NIC down, not yet renamed), with a sysfs
    // of this network namespace.
    must(&["ip", "link", "set", "eth0", "down"]);
    let script = m.join("usr/local/lib/pxelab/early-ssh-net");
    check(
        Command::new("unshare")
            .args(["-m", "sh", "-c"])
            .arg(format!(
                "mount -t sysfs sysfs /sys && sh {} {MAC} 10.99.7.11/24",
                script.display()
            )),
    );
    let lan0 = must(&["ip", "-o", "address", "show", "dev", "lan0"]);
    assert!(lan0.contains("inet 10.99.7.11/24"), "{lan0}");
    let link = must(&["ip", "-o", "link", "show", "dev", "lan0"]);
    assert!(
        link.contains(&format!("link/ether {MAC}")) && link.contains(",UP"),
        "{link}"
    );

    // Events: every phase in order, progress during the stream, durations add up.
    let events = lab.events();
    let phases: Vec<Phase> = events
        .iter()
        .filter(|e| e.bytes_done.is_none())
        .map(|e| e.phase)
        .collect();
    use Phase::*;
    assert_eq!(
        phases,
        [Installing, Disk, Partition, Mkfs, Rootfs, Seed, Bootloader, Installed]
    );
    let progress: Vec<&Event> = events.iter().filter(|e| e.bytes_done.is_some()).collect();
    let size = rootfs().zst.len() as u64;
    assert!(!progress.is_empty());
    assert!(progress
        .iter()
        .all(|e| e.phase == Rootfs && e.bytes_total == Some(size)));
    assert_eq!(progress.last().unwrap().bytes_done, Some(size));
    let first_progress = events.iter().position(|e| e.bytes_done.is_some()).unwrap();
    let rootfs_done = events
        .iter()
        .position(|e| e.phase == Rootfs && e.duration_ms.is_some())
        .unwrap();
    assert!(events[first_progress - 1].phase == Mkfs && first_progress < rootfs_done);
    let installed = events.last().unwrap();
    let total = installed.duration_ms.unwrap();
    let sum: u64 = events[..events.len() - 1]
        .iter()
        .filter_map(|e| e.duration_ms)
        .sum();
    let cleanup_ms = parse_cleanup_ms(&installed.message);
    assert!(sum <= total, "phases {sum} ms > total {total} ms");
    let gap = total - sum;
    assert!(
        gap.abs_diff(cleanup_ms) < 300,
        "total {total} ms = phases {sum} ms + cleanup {cleanup_ms} ms + {gap} unexplained"
    );
    assert!(Duration::from_millis(total) <= run.elapsed);

    report_throughput(&lab, &events, m);
}

/// A file on the ESP, read with mtools (the test host's kernel may have no vfat).
fn esp_file(lab: &Lab, path: &str) -> String {
    String::from_utf8(esp_bytes(lab, path)).expect("UTF-8")
}

fn esp_bytes(lab: &Lab, path: &str) -> Vec<u8> {
    checked(Command::new("mcopy").args(["-n", "-i", &lab.disk.partition(1), path, "-"])).stdout
}

fn parse_cleanup_ms(message: &str) -> u64 {
    let secs = message
        .split("final sync and unmount ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no cleanup time in {message:?}"));
    (secs * 1000.0) as u64
}

/// Prints the streaming install rate next to `zstd -dc | tar -x` of the same tarball onto a
/// fresh ext4 on the same loop partition (for the report; no timing asserts).
fn report_throughput(lab: &Lab, events: &[Event], checked_root: PathBuf) {
    let r = rootfs();
    let rootfs_ms = events
        .iter()
        .find(|e| e.phase == Phase::Rootfs && e.duration_ms.is_some())
        .unwrap()
        .duration_ms
        .unwrap();
    check(Command::new("umount").arg(&checked_root));
    let part = lab.disk.partition(2);
    must(&[
        "mke2fs",
        "-t",
        "ext4",
        "-F",
        "-q",
        "-E",
        "lazy_itable_init=1,nodiscard",
        &part,
    ]);
    let at = lab.disk.path("tar-x");
    fs::create_dir_all(&at).unwrap();
    check(Command::new("mount").arg(&part).arg(&at));
    let tarball = lab.disk.path("rootfs.tar.zst");
    fs::File::create(&tarball)
        .and_then(|mut f| f.write_all(&r.zst))
        .unwrap();
    let t = Instant::now();
    check(
        Command::new("tar")
            .args(["--zstd", "-xpf"])
            .arg(&tarball)
            .arg("-C")
            .arg(&at),
    );
    let tar_ms = t.elapsed().as_millis().max(1) as u64;
    check(Command::new("umount").arg(&at));
    let mib = |bytes: u64, ms: u64| bytes as f64 / 1048576.0 / (ms as f64 / 1000.0);
    eprintln!(
        "THROUGHPUT streaming install (HTTP+sha256+zstd+tar, loopback → loop ext4): {rootfs_ms} ms, {:.1} MiB/s compressed, {:.1} MiB/s unpacked",
        mib(r.zst.len() as u64, rootfs_ms),
        mib(r.tar_len, rootfs_ms)
    );
    eprintln!(
        "THROUGHPUT tar --zstd -xpf of the same {:.1} MiB tarball onto the same ext4: {tar_ms} ms, {:.1} MiB/s compressed, {:.1} MiB/s unpacked",
        r.zst.len() as f64 / 1048576.0,
        mib(r.zst.len() as u64, tar_ms),
        mib(r.tar_len, tar_ms)
    );
}

#[test]
fn sys_install_resumes_a_connection_cut_at_40_percent() {
    let _serial = serial();
    require_root_and_tools();
    let had_dev_disk = Path::new("/dev/disk").exists();
    let cut = rootfs().zst.len() as u64 * 2 / 5;
    let lab = lab(6 * GIB, Behavior::CutOnceAfter(cut));
    let run = lab.install();
    assert!(run.out.status.success(), "installer failed: {}", run.stderr);
    lab.assert_clean(had_dev_disk);
    let gets: Vec<Option<String>> = lab
        .server
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path == ROOTFS_PATH)
        .map(|r| r.header("range").map(str::to_string))
        .collect();
    assert_eq!(
        gets,
        vec![None, Some(format!("bytes={cut}-"))],
        "one resume from the consumed offset"
    );
    assert!(run.stderr.contains("1 reconnects"), "{}", run.stderr);
    let events = lab.events();
    assert_eq!(events.last().unwrap().phase, Phase::Installed);
    let m = lab.disk.mount_ro(2, "check-root");
    assert_eq!(
        fs::read(m.join("usr/share/blob-200")).unwrap(),
        filler(300, 256 << 10)
    );
    assert!(m.join("boot/grub/grub.cfg").exists());
}

#[test]
fn sys_install_with_corrupt_rootfs_fails_without_a_boot_loader() {
    let _serial = serial();
    require_root_and_tools();
    let had_dev_disk = Path::new("/dev/disk").exists();
    let lab = lab(6 * GIB, Behavior::Corrupt);
    let run = lab.install();
    assert_eq!(run.out.status.code(), Some(1), "{}", run.stderr);
    let last = run.stderr.lines().last().unwrap_or("");
    assert!(
        last.starts_with("pxelab-installer: FAILED at step rootfs: sha256 mismatch"),
        "{last}"
    );
    lab.assert_clean(had_dev_disk);
    let events = lab.events();
    let failed = events.last().unwrap();
    assert_eq!(failed.phase, Phase::Failed);
    assert!(
        failed.message.starts_with("rootfs: sha256 mismatch"),
        "{}",
        failed.message
    );
    assert!(!events.iter().any(|e| matches!(
        e.phase,
        Phase::Rootfs | Phase::Seed | Phase::Bootloader
    ) && e.duration_ms.is_some()));
    // Nothing bootable: no GRUB config, no host keys, nothing on the ESP.
    let m = lab.disk.mount_ro(2, "check-root");
    assert!(!m.join("boot/grub/grub.cfg").exists());
    assert!(!m.join("etc/ssh/ssh_host_ed25519_key").exists());
    let listing = must(&["mdir", "-b", "-i", &lab.disk.partition(1), "::/"]);
    assert_eq!(listing.trim(), "", "the ESP stays empty");
}

#[test]
fn sys_install_refuses_a_small_disk_before_writing() {
    let _serial = serial();
    require_root_and_tools();
    let lab = lab(2 * GIB, Behavior::Normal);
    // Recognisable bytes at the start (where the GPT would go) and the end (backup GPT).
    let pattern = filler(7, 1 << 20);
    {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .open(lab.disk.image())
            .unwrap();
        f.write_all(&pattern).unwrap();
        std::io::Seek::seek(&mut f, std::io::SeekFrom::End(-(1 << 20))).unwrap();
        f.write_all(&pattern).unwrap();
        f.sync_all().unwrap();
    }
    let before = file_sha256(lab.disk.image());
    let run = lab.install();
    assert_eq!(run.out.status.code(), Some(1), "{}", run.stderr);
    let last = run.stderr.lines().last().unwrap_or("");
    assert!(
        last.contains("FAILED at step disk:") && last.contains("attach a larger disk"),
        "{last}"
    );
    assert!(
        last.contains("is 2.0 GiB but the install needs at least 4.5 GiB"),
        "{last}"
    );
    assert_eq!(
        file_sha256(lab.disk.image()),
        before,
        "the disk image changed"
    );
    let events = lab.events();
    let phases: Vec<Phase> = events.iter().map(|e| e.phase).collect();
    assert_eq!(phases, [Phase::Installing, Phase::Failed]);
    assert!(
        events[1].message.starts_with("disk: "),
        "{}",
        events[1].message
    );
    assert_eq!(
        lab.server.hits(ROOTFS_PATH),
        0,
        "no download for a disk that cannot take it"
    );
}

fn file_sha256(path: &Path) -> String {
    use sha2::Digest;
    let mut f = fs::File::open(path).unwrap();
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex::encode(h.finalize())
}

/// No root needed: it fails before touching any disk.
#[test]
fn unreachable_server_fails_clearly_after_bounded_retries() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}/config/52-54-00-12-34-56");
    let run = run_installer(&[
        format!("config_url={url}"),
        "pxelab.retries=2".into(),
        "pxelab.backoff_ms=10".into(),
    ]);
    assert_eq!(run.out.status.code(), Some(1));
    let last = run.stderr.lines().last().unwrap_or("");
    assert!(
        last.starts_with(
            "pxelab-installer: FAILED at step installing: fetching the installer config: GET"
        ),
        "{last}"
    );
    assert!(
        last.contains(&url) && last.contains("gave up after 3 attempts"),
        "{last}"
    );
    assert_eq!(
        run.stderr.matches("retrying in").count(),
        2,
        "{}",
        run.stderr
    );
    assert!(
        run.elapsed < Duration::from_secs(10),
        "took {:?}",
        run.elapsed
    );
}

#[test]
fn bad_command_line_is_a_usage_error() {
    let run = run_installer(&["pxelab.retries=2".into()]);
    assert_eq!(run.out.status.code(), Some(2));
    assert!(
        run.stderr.contains("no config_url= given"),
        "{}",
        run.stderr
    );
}
