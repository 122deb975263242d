//! `distro pull debian-12` for real (x86_64): Debian's mirror, the pinned closure of
//! recipes/distros/debian-12.lock, mmdebstrap, the disk image (mounted to compare it with the
//! tarball). Needs root,
//! network access to deb.debian.org and the packages mmdebstrap, kmod.
//!
//! One test function: the pull reads PXELAB_HOME/PXELAB_CACHE from the environment.

#[path = "common/tree.rs"]
mod tree;

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Instant;

use pxelab_contract::Arch;
use pxelab_tests::cmd::{require, require_root};
use pxelab_tests::LoopDisk;
use xtask::distro::{self, lock::DistroLock, modules::list_archive, PullArgs};
use xtask::store::Store;

/// Small files' contents, every path and the regular files' paths of a rootfs.tar.zst, read as
/// a stream.
fn scan(path: &Path) -> (Vec<String>, BTreeMap<String, Vec<u8>>, Vec<String>) {
    let wanted = [
        "etc/hostname",
        "etc/resolv.conf",
        "etc/apt/sources.list",
        "etc/dpkg/dpkg.cfg.d/99mmdebstrap",
    ];
    let decoder = zstd::stream::read::Decoder::new(fs::File::open(path).unwrap()).unwrap();
    let mut archive = tar::Archive::new(decoder);
    let mut paths = Vec::new();
    let mut contents = BTreeMap::new();
    let mut files = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let p = entry
            .path()
            .unwrap()
            .to_string_lossy()
            .trim_start_matches("./")
            .to_string();
        let cloudinit_pyc = p
            .starts_with("usr/lib/python3/dist-packages/cloudinit/__pycache__/__init__.")
            && p.ends_with(".pyc");
        if wanted.contains(&p.as_str()) || cloudinit_pyc {
            let mut buf = Vec::new();
            entry.read_to_end(&mut buf).unwrap();
            contents.insert(p.clone(), buf);
        }
        if entry.header().entry_type().is_file() {
            files.push(p.clone());
        }
        paths.push(p);
    }
    (paths, contents, files)
}

fn pull(cache: &Path) -> distro::PullReport {
    std::env::set_var("PXELAB_CACHE", cache);
    let args = PullArgs {
        name: "debian-12".into(),
        arch: Arch::X86_64,
        modules: None,
        mirror: None,
        recipes: None,
    };
    distro::pull(&args, &xtask::ui::Ui::plain())
        .unwrap_or_else(|e| panic!("distro pull debian failed: {e:#}"))
}

#[test]
fn sys_debian_pull_builds_a_bootable_rootfs_reproducibly() {
    require("mmdebstrap", "mmdebstrap");
    require("depmod", "kmod");
    require_root("mounting the disk image on a loop device");
    for tool in ["mke2fs", "debugfs", "e2fsck"] {
        require(tool, "e2fsprogs");
    }
    let work = tempfile::tempdir().unwrap();
    // The first store is world-readable (as under /tmp), so apt's sandbox user can read it.
    fs::set_permissions(work.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let home = work.path().join("home");
    std::env::set_var("PXELAB_HOME", &home);
    std::env::remove_var("SOURCE_DATE_EPOCH");

    let t = Instant::now();
    let first = pull(&work.path().join("cache1"));
    eprintln!("cold pull: {:.1} s", t.elapsed().as_secs_f64());
    assert!(!first.cached);
    let out = home.join("images/debian-12/x86_64");
    let m = &first.manifest;
    let kver = &m.contract.kernel_version;
    assert!(kver.ends_with("-cloud-amd64"), "{kver}");
    assert_eq!(m.contract.files().count(), 6, "{m:?}");
    for f in m.contract.files() {
        let bytes = fs::read(out.join(&f.file)).unwrap();
        assert_eq!(bytes.len() as u64, f.size, "{}", f.file);
        assert_eq!(pxelab_tests::sha256_hex(&bytes), f.sha256, "{}", f.file);
    }
    assert!(m.grub_install && m.update_grub && m.cloud_init, "{m:?}");
    assert_eq!(
        m.initrd.as_deref(),
        Some(format!("/boot/initrd.img-{kver}").as_str())
    );

    // The disk image holds exactly the rootfs's tree, as the kernel reads it.
    let image = out.join(&m.contract.disk_image.as_ref().unwrap().file);
    let disk = LoopDisk::new(fs::metadata(&image).unwrap().len());
    fs::copy(&image, disk.image()).unwrap();
    let root = disk.mount_whole_ro("root");
    let in_tar = tree::from_tar(&out.join("rootfs.tar.zst"));
    tree::assert_same(&in_tar, &tree::from_dir(&root));
    drop(disk);
    assert_eq!(
        m.contract.initramfs.as_ref().unwrap().sha256,
        in_tar[&format!("boot/initrd.img-{kver}")].what,
        "initrd.img is not the rootfs's initramfs"
    );

    let names = list_archive(&out.join("modules.cpio.zst")).unwrap();
    let base = format!("lib/modules/{kver}");
    assert!(
        names.contains(&format!("{base}/kernel/drivers/net/virtio_net.ko")),
        "virtio_net.ko missing"
    );
    assert!(
        names.contains(&format!("{base}/modules.dep"))
            && names.contains(&format!("{base}/modules.dep.bin"))
    );
    assert!(!names
        .iter()
        .any(|n| n.ends_with(".ko.xz") || n.ends_with(".ko.zst")));

    let (paths, contents, files) = scan(&out.join("rootfs.tar.zst"));
    for p in [
        "usr/sbin/grub-install",
        "usr/sbin/update-grub",
        "usr/bin/cloud-init",
        &format!("boot/vmlinuz-{kver}"),
    ] {
        assert!(paths.iter().any(|x| x == p), "{p} is not in the rootfs");
    }
    assert!(
        !paths.iter().any(|p| p.starts_with("etc/ssh/ssh_host_")),
        "SSH host keys must not ship"
    );
    // Docs, man and info pages and translations are left out (licences and locale.alias stay),
    // and dpkg in the target is told to leave them out of later installs too.
    let left_in: Vec<&String> = files
        .iter()
        .filter(|p| {
            let excluded = ["usr/share/man/", "usr/share/info/", "usr/share/locale/"]
                .iter()
                .any(|d| p.starts_with(d));
            let doc = p.starts_with("usr/share/doc/") && !p.ends_with("/copyright");
            // install-info's index of no pages is made by a trigger, not unpacked by dpkg.
            let kept = ["usr/share/locale/locale.alias", "usr/share/info/dir"];
            (excluded || doc) && !kept.contains(&p.as_str())
        })
        .collect();
    assert!(left_in.is_empty(), "excluded files shipped: {left_in:?}");
    for p in [
        "usr/share/doc/openssh-client/copyright",
        "usr/share/locale/locale.alias",
        "usr/lib/locale/C.utf8/LC_CTYPE",
    ] {
        assert!(paths.iter().any(|x| x == p), "{p} is not in the rootfs");
    }
    let excludes = String::from_utf8_lossy(&contents["etc/dpkg/dpkg.cfg.d/99mmdebstrap"]);
    for line in [
        "path-exclude=/usr/share/doc/*",
        "path-include=/usr/share/doc/*/copyright",
        "path-exclude=/usr/share/man/*",
    ] {
        assert!(
            excludes.lines().any(|l| l == line),
            "{line} not in {excludes}"
        );
    }
    assert_eq!(contents["etc/hostname"], b"localhost\n");
    // Unchecked-hash .pyc (PEP 552 flags = 1): an import does not read the source too.
    let (_, pyc) = contents
        .iter()
        .find(|(p, _)| p.ends_with(".pyc"))
        .expect("cloud-init's __init__ .pyc is in the rootfs");
    assert_eq!(pyc[4..8], [1, 0, 0, 0], "pyc flags");
    assert!(contents["etc/resolv.conf"].is_empty());
    let sources = String::from_utf8_lossy(&contents["etc/apt/sources.list"]).into_owned();
    assert!(
        sources.contains("deb http://deb.debian.org/debian bookworm main")
            && !sources.contains("copy:"),
        "{sources}"
    );

    // Warm: everything from the action cache, nothing rewritten.
    let t = Instant::now();
    let warm = pull(&work.path().join("cache1"));
    let warm_secs = t.elapsed().as_secs_f64();
    eprintln!("warm pull: {warm_secs:.3} s");
    assert!(warm.cached && warm.up_to_date && warm_secs < 2.0);

    // Second build from an empty store (sharing only the downloaded .debs): identical bytes.
    let lock: DistroLock = toml::from_str(
        &fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../recipes/distros/debian-12.lock"),
        )
        .unwrap(),
    )
    .unwrap();
    // The second store lies in a private directory, like `~/.cache/pxelab` under a 0700 home:
    // mmdebstrap then runs apt unsandboxed, which must not change a byte.
    let private = work.path().join("private");
    fs::create_dir(&private).unwrap();
    fs::set_permissions(&private, fs::Permissions::from_mode(0o700)).unwrap();
    let cache2 = private.join("cache2");
    let first_store = Store::open(&work.path().join("cache1")).unwrap();
    let second_store = Store::open(&cache2).unwrap();
    for deb in &lock.arch["x86_64"].pins {
        second_store
            .insert_bytes(&first_store.read(&deb.sha256).unwrap())
            .unwrap();
    }
    drop((first_store, second_store));
    fs::remove_dir_all(&home).unwrap();
    let t = Instant::now();
    let second = pull(&cache2);
    eprintln!(
        "second cold build (debs present): {:.1} s",
        t.elapsed().as_secs_f64()
    );
    assert!(!second.cached);
    assert_eq!(
        second.manifest.contract.rootfs, m.contract.rootfs,
        "rootfs.tar.zst differs between builds"
    );
    assert_eq!(
        second.manifest.contract.disk_image, m.contract.disk_image,
        "rootfs.img differs between builds"
    );
    assert_eq!(second.manifest, *m);
}
