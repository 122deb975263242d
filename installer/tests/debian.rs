//! The installer with the real Debian 12 rootfs (what `cargo xtask distro pull debian-12` builds)
//! on a loop disk, then what the installed system will do itself: its `update-grub` (a kernel
//! upgrade runs it) must still write a config that boots the root by UUID with modules the
//! ESP's GRUB image has built in, and its sshd must accept the host keys the installer wrote.
//! The same disk boots under SeaBIOS (QEMU, no network) through GRUB's i386-pc boot code, before
//! and after the target's own `update-grub` (the e2e boots that layout under OVMF).
//!
//! Needs root, everything `install.rs` needs, QEMU for the boot, and the pulled rootfs (the test
//! pulls it into a temporary lab home; the content store makes that a copy once it was built).

mod common;

use common::{lab_login, private_network, require_root_and_tools, serial, MAC};
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pxelab_contract::{Artifact, Event, InstallerConfig, Phase};
use pxelab_tests::cmd::{check, checked, failure, must, output, require};
use pxelab_tests::{sha256_hex, Behavior, FixtureServer, LoopDisk};

const GIB: u64 = 1 << 30;

/// Where `distro pull debian-12` published into `home`.
fn pull_debian(home: &Path) -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    check(
        Command::new(cargo)
            .args(["xtask", "distro", "pull", "debian-12"])
            .current_dir(&workspace)
            .env("PXELAB_HOME", home),
    );
    home.join("images/debian-12/x86_64")
}

/// What the installer is given: the tarball, and with `image` the block image too (which it
/// then installs instead).
struct Payload {
    rootfs: Vec<u8>,
    image: Option<Vec<u8>>,
}

impl Payload {
    fn pulled(home: &Path, image: bool) -> Payload {
        let dir = pull_debian(home);
        Payload {
            rootfs: fs::read(dir.join("rootfs.tar.zst")).expect("the pulled rootfs"),
            image: image.then(|| fs::read(dir.join("rootfs.img.zst")).expect("the pulled image")),
        }
    }
}

/// The names of the modules built into a GRUB EFI image (each module is an ELF object whose
/// `.modname` section holds its name).
fn grub_image_modules(image: &[u8]) -> Vec<String> {
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap()) as usize;
    let mut names = Vec::new();
    let mut at = 0;
    while let Some(found) = image[at..]
        .windows(7)
        .position(|w| w == b"\x7fELF\x02\x01\x01")
    {
        let elf = &image[at + found..];
        at += found + 1;
        let (shoff, shentsize, shnum, shstrndx) = (
            u64_at(elf, 0x28),
            u16_at(elf, 0x3a),
            u16_at(elf, 0x3c),
            u16_at(elf, 0x3e),
        );
        if shentsize != 64 || shnum > 256 || shoff + shnum * 64 > elf.len() {
            continue;
        }
        let section = |i: usize| {
            let h = &elf[shoff + i * 64..];
            let name = u32::from_le_bytes(h[..4].try_into().unwrap()) as usize;
            (name, u64_at(h, 0x18), u64_at(h, 0x20))
        };
        let strtab = section(shstrndx).1;
        for i in 0..shnum {
            let (name, off, size) = section(i);
            if elf.get(strtab + name..strtab + name + 9) == Some(b".modname\0".as_slice()) {
                let text = &elf[off..off + size];
                let text = text.split(|b| *b == 0).next().unwrap_or_default();
                names.push(String::from_utf8_lossy(text).into_owned());
            }
        }
    }
    names
}

/// Mounts for a chroot into the installed root, as the running system has them: proc, sys,
/// and a /dev holding the root partition and the `/dev/disk/by-uuid` link udev would make.
fn prepare_chroot(root: &Path, partition: &str, uuid: &str) {
    let name = partition.trim_start_matches("/dev/");
    let dev = fs::read_to_string(format!("/sys/class/block/{name}/dev")).unwrap();
    let (major, minor) = dev.trim().split_once(':').unwrap();
    check(
        Command::new("mount")
            .args(["-t", "proc", "proc"])
            .arg(root.join("proc")),
    );
    check(
        Command::new("mount")
            .args(["--bind", "/sys"])
            .arg(root.join("sys")),
    );
    check(
        Command::new("mount")
            .args(["-t", "tmpfs", "dev"])
            .arg(root.join("dev")),
    );
    let d = root.join("dev");
    for (node, kind, maj, min) in [
        ("null", "c", "1", "3"),
        ("zero", "c", "1", "5"),
        ("urandom", "c", "1", "9"),
        (name, "b", major, minor),
    ] {
        check(
            Command::new("mknod")
                .arg(d.join(node))
                .args([kind, maj, min]),
        );
    }
    fs::create_dir_all(d.join("disk/by-uuid")).unwrap();
    std::os::unix::fs::symlink(format!("../../{name}"), d.join("disk/by-uuid").join(uuid)).unwrap();
}

fn chroot(root: &Path, args: &[&str]) -> String {
    check(
        Command::new("chroot")
            .arg(root)
            .args(args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("LC_ALL", "C"),
    )
}

#[test]
fn sys_debian_install_survives_update_grub_and_sshd_loads_its_keys() {
    let _serial = serial();
    require_root_and_tools();
    let home = tempfile::tempdir().unwrap();
    let payload = Payload::pulled(home.path(), true);
    private_network().within(|| install_and_check(payload));
}

/// Runs the installer onto `disk` with the real rootfs and returns its final event.
fn install(payload: Payload, disk: &LoopDisk) -> Event {
    let server = FixtureServer::start();
    let rootfs_path = "/images/debian-12/x86_64/rootfs.tar.zst";
    let image_path = "/images/debian-12/x86_64/rootfs.img.zst";
    let Payload { rootfs, image } = payload;
    let config = InstallerConfig {
        name: "deb-1".into(),
        mac: MAC.parse().unwrap(),
        hostname: "deb-1".into(),
        distro: "debian-12".into(),
        rootfs: Artifact {
            url: server.url(rootfs_path),
            sha256: sha256_hex(&rootfs),
            size: rootfs.len() as u64,
        },
        disk_image: image.as_ref().map(|image| Artifact {
            url: server.url(image_path),
            sha256: sha256_hex(image),
            size: image.len() as u64,
        }),
        cloud_init_url: server.url("/cloud-init/deb-1/"),
        events_url: server.url("/events/deb-1"),
        disk: Some(disk.dev().to_string()),
        reboot: false,
        direct_start: true,
        login: Some(lab_login()),
        wipe: None,
    };
    server.serve(rootfs_path, rootfs, Behavior::Normal);
    if let Some(image) = image {
        server.serve(image_path, image, Behavior::Normal);
    }
    server.serve(
        "/cloud-init/deb-1/meta-data",
        "instance-id: deb-1\n",
        Behavior::Normal,
    );
    server.serve(
        "/cloud-init/deb-1/user-data",
        "#cloud-config\n",
        Behavior::Normal,
    );
    server.serve(
        "/config/deb-1",
        serde_json::to_vec(&config).unwrap(),
        Behavior::Normal,
    );
    let out = output(
        Command::new(env!("CARGO_BIN_EXE_pxelab-installer"))
            .arg(format!("config_url={}", server.url("/config/deb-1")))
            .arg(format!("pxelab.target={}", disk.path("target").display())),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "installer failed:\n{stderr}");
    eprintln!("{stderr}");
    let installed: Event = server
        .requests()
        .iter()
        .rev()
        .find(|r| r.method == "POST")
        .map(|r| serde_json::from_slice(&r.body).unwrap())
        .unwrap();
    assert_eq!(installed.phase, Phase::Installed);
    installed
}

fn install_and_check(payload: Payload) {
    let disk = LoopDisk::new(6 * GIB);
    // Old data where the root filesystem's metadata goes: the image's runs of zeros must be
    // zeroed on the disk, not skipped (the first MiB stays blank, so no wipe is needed).
    let stale = fs::OpenOptions::new()
        .write(true)
        .open(disk.image())
        .unwrap();
    stale
        .write_all_at(&vec![0xaa; 64 << 20], 516 << 20)
        .unwrap();
    drop(stale);
    let installed = install(payload, &disk);
    let fsck = output(Command::new("e2fsck").args(["-fn", &disk.partition(2)]));
    assert!(
        fsck.status.success(),
        "the installed root filesystem is not clean:\n{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    let fields = blkid_fields(&disk.partition(2));
    assert_eq!(fields.get("LABEL").map(String::as_str), Some("pxelab-root"));
    let blocks = must(&["dumpe2fs", "-h", &disk.partition(2)]);
    let count: u64 = blocks
        .lines()
        .find_map(|l| l.strip_prefix("Block count:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("dumpe2fs's block count");
    assert!(
        count * 4096 > 5 * GIB,
        "the image was not grown to its 5.5 GiB partition: {count} blocks"
    );
    let root = disk.path("root");
    fs::create_dir_all(&root).unwrap();
    check(Command::new("mount").arg(disk.partition(2)).arg(&root));
    let uuid = must(&["blkid", "-s", "UUID", "-o", "value", &disk.partition(2)]);
    let uuid = uuid.trim();
    let esp_cfg = must(&["mtype", "-i", &disk.partition(1), "::/EFI/debian/grub.cfg"]);
    let image = checked(Command::new("mcopy").args([
        "-n",
        "-i",
        &disk.partition(1),
        "::/EFI/BOOT/BOOTX64.EFI",
        "-",
    ]))
    .stdout;
    assert_eq!(
        image,
        fs::read(root.join("usr/lib/grub/x86_64-efi/monolithic/grubx64.efi")).unwrap()
    );
    let built_in = grub_image_modules(&image);
    assert!(
        built_in.len() > 50 && built_in.iter().any(|m| m == "ext2"),
        "{built_in:?}"
    );

    // What a kernel upgrade runs in the target.
    prepare_chroot(&root, &disk.partition(2), uuid);
    let ours = fs::read_to_string(root.join("boot/grub/grub.cfg")).unwrap();
    chroot(&root, &["update-grub"]);
    let cfg = fs::read_to_string(root.join("boot/grub/grub.cfg")).unwrap();
    assert_ne!(cfg, ours, "update-grub rewrote the config");
    let linux: Vec<&str> = cfg
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("linux"))
        .collect();
    assert!(!linux.is_empty(), "{cfg}");
    for line in &linux {
        assert!(
            line.contains(&format!("root=UUID={uuid} ro"))
                && line.contains("console=ttyS0,115200n8"),
            "{line}"
        );
    }
    assert!(cfg.contains("set timeout=1\n"), "{cfg}");
    // Its kernel line is the one the installer wrote word for word.
    let first = linux[0]
        .split_whitespace()
        .skip(2)
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        ours.contains(&first),
        "update-grub: {first}\ninstaller:\n{ours}"
    );
    // GRUB has no module directory to load from (only the ESP image's built-in ones), and an
    // error inside the boot entry stops it for 10 s at "Press any key to continue": every
    // module the default entry loads must be built in — load_video's all_video branch
    // (GRUB >= 2.02) included, the Xen-only line excluded.
    let default_entry = cfg
        .split("\nmenuentry ")
        .nth(1)
        .and_then(|e| e.split("\n}").next())
        .unwrap();
    assert!(default_entry.contains("\tload_video\n"), "{default_entry}");
    let loaded = default_entry
        .lines()
        .filter(|l| !l.contains("xxen"))
        .filter_map(|l| l.trim().strip_prefix("insmod "))
        .chain(["all_video"]);
    for module in loaded {
        assert!(
            built_in.iter().any(|m| m == module),
            "insmod {module} is not built into the image"
        );
    }
    // The ESP config at the image's built-in prefix (/EFI/debian) still finds that file.
    assert!(
        esp_cfg.contains(&format!("--set=root {uuid}\n"))
            && esp_cfg.contains("configfile $prefix/grub.cfg"),
        "{esp_cfg}"
    );

    // sshd loads the installer's keys and config (what the early unit and ssh.service run).
    fs::create_dir_all(root.join("run/sshd")).unwrap();
    chroot(&root, &["/usr/sbin/sshd", "-t"]);
    chroot(&root, &["/usr/local/sbin/pxelab-early-sshd", "-t"]);
    assert!(root.join("etc/pam.d/pxelab-early-sshd").is_file());
    let fingerprints = chroot(
        &root,
        &[
            "ssh-keygen",
            "-l",
            "-f",
            "/etc/ssh/ssh_host_ed25519_key.pub",
        ],
    );
    assert!(
        fingerprints.contains("root@deb-1 (ED25519)"),
        "{fingerprints}"
    );
    assert!(installed.host_keys[0].starts_with("ssh-ed25519 "));
    // The real useradd made the login as cloud-init would.
    let passwd = fs::read_to_string(root.join("etc/passwd")).unwrap();
    assert!(
        passwd.contains("pxelab:x:1000:1000:pxelab lab user:/home/pxelab:/bin/bash\n"),
        "{passwd}"
    );
    assert!(
        root.join("home/pxelab/.bashrc").is_file(),
        "home made from /etc/skel"
    );
    // The units are ones systemd accepts.
    let mut verify = Command::new("chroot");
    verify.arg(&root).args([
        "systemd-analyze",
        "verify",
        "/etc/systemd/system/pxelab-early-ssh.service",
        "/etc/systemd/system/pxelab-cloud-init-done.service",
    ]);
    let out = output(&mut verify);
    assert!(
        out.status.success() && out.stderr.trim_ascii().is_empty(),
        "{}",
        failure(&verify, &out)
    );
}

#[test]
fn sys_debian_disk_boots_under_seabios_before_and_after_update_grub() {
    let _serial = serial();
    require_root_and_tools();
    require("qemu-system-x86_64", "qemu-system-x86");
    let home = tempfile::tempdir().unwrap();
    // The tarball path (a distro pulled before images existed, or without one).
    let payload = Payload::pulled(home.path(), false);
    let disk = LoopDisk::new(6 * GIB);
    private_network().within(|| install(payload, &disk));
    let uuid = must(&["blkid", "-s", "UUID", "-o", "value", &disk.partition(2)]);

    // The installer's own /boot/grub/grub.cfg: its one entry is named after the kernel.
    let log = boot(&disk, "bios-first");
    assert!(
        log.contains("Booting `Linux 6."),
        "the installer's menu entry:\n{log}"
    );

    // What a kernel upgrade runs in the target; its menu has Debian's entries.
    let root = disk.path("root");
    fs::create_dir_all(&root).unwrap();
    flush(&disk);
    check(Command::new("mount").arg(disk.partition(2)).arg(&root));
    prepare_chroot(&root, &disk.partition(2), uuid.trim());
    chroot(&root, &["update-grub"]);
    let cfg = fs::read_to_string(root.join("boot/grub/grub.cfg")).unwrap();
    assert!(cfg.contains("menuentry 'Debian GNU/Linux'"), "{cfg}");
    check(Command::new("umount").arg("-R").arg(&root));
    flush(&disk);
    let log = boot(&disk, "bios-after-update-grub");
    assert!(
        log.contains("Booting `Debian GNU/Linux'"),
        "update-grub's menu entry:\n{log}"
    );
    // The same layout under OVMF (the ESP's GRUB image, the same grub.cfg) is the e2e's: its
    // target-1 boots its disk through the firmware before and after its own update-grub.
}

/// Writes back and drops the host's buffers of the disk and its root partition: the guest
/// reads and writes the whole disk around them.
/// `blkid -o export`'s fields of `dev`.
fn blkid_fields(dev: &str) -> std::collections::HashMap<String, String> {
    must(&["blkid", "-o", "export", dev])
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn flush(disk: &LoopDisk) {
    check(&mut Command::new("sync"));
    for dev in [disk.dev().to_string(), disk.partition(2)] {
        check(Command::new("blockdev").args(["--flushbufs", &dev]));
    }
}

/// `log` without terminal control sequences: SeaBIOS's serial console renders the screen with
/// cursor moves, which can split a line of GRUB's ("Boot\x1b[01;06H\x1b[01;07Hing `Debian…").
fn plain(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\x1b' {
            out.push(c);
        } else if chars.next_if_eq(&'[').is_some() {
            // A CSI sequence: parameters and intermediates up to one final byte in @..~.
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        } else {
            chars.next();
        }
    }
    out
}

#[test]
fn seabios_console_text_reads_without_its_cursor_moves() {
    // As SeaBIOS's serial console sent it in a CI run.
    let raw = "\x1bc\x1b[?7l\x1b[2J\x1b[0mSeaBIOS\n\x1b[01;01H\x1b[2J\x1b[2J  Boot\x1b[01;06H\x1b[01;07Hing `Debian GNU/Linux'\n";
    assert_eq!(plain(raw), "SeaBIOS\n  Booting `Debian GNU/Linux'\n");
}

/// A QEMU process killed (and reaped) when dropped.
struct Vm(Child);

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Boots the disk under SeaBIOS (TCG, no NIC) until the installed system's first cloud-init stage (a unit of
/// the installed root's systemd) reports on the console, and returns the serial log up to it
/// as plain text:
/// firmware and GRUB (through SeaBIOS's serial console), then the (quiet) kernel and
/// userspace. GRUB's i386-pc boot code prints "GRUB loading.".
fn boot(disk: &LoopDisk, name: &str) -> String {
    let dir = disk.path(&format!("qemu-{name}"));
    fs::create_dir_all(&dir).unwrap();
    let sercon = dir.join("sercon-port");
    fs::write(&sercon, [0xf8, 0x03]).unwrap();
    let serial = dir.join("serial.log");
    let stderr = dir.join("qemu.stderr");
    let start = Instant::now();
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-accel", "tcg", "-cpu", "max", "-m", "1024"])
        .args(["-nic", "none", "-display", "none", "-vga", "none"])
        .args(["-monitor", "none", "-no-reboot", "-fw_cfg"])
        .arg(format!("name=etc/sercon-port,file={}", sercon.display()))
        .arg("-drive")
        // O_DIRECT: what the guest writes is on the loop device when the host mounts it.
        .arg(format!(
            "file={},format=raw,if=virtio,cache=none",
            disk.dev()
        ))
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&stderr).unwrap());
    let mut vm = Vm(qemu.spawn().expect("starting qemu-system-x86_64"));
    let limit = Duration::from_secs(480);
    loop {
        let log = String::from_utf8_lossy(&fs::read(&serial).unwrap_or_default()).into_owned();
        if let Some(up) = log.find("running 'init-local'") {
            eprintln!(
                "{name} boot: cloud-init on the installed root after {:.1} s",
                start.elapsed().as_secs_f64()
            );
            assert!(
                log.find("GRUB loading.").is_some_and(|g| g < up),
                "GRUB's BIOS boot code did not run:\n{log}"
            );
            return plain(&log[..up]);
        }
        if let Some(status) = vm.0.try_wait().unwrap() {
            let stderr = fs::read_to_string(&stderr).unwrap_or_default();
            panic!("QEMU exited ({status}) before the system came up: {stderr}\n{log}");
        }
        assert!(
            start.elapsed() < limit,
            "{name} boot: no cloud-init within {limit:?}:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}
