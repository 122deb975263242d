//! `distro pull ubuntu` against a fixture mirror on loopback with Ubuntu's layout
//! (`releases/<codename>/release-<serial>/{SHA256SUMS,SHA256SUMS.gpg,<image>}`, the sums signed
//! by a throwaway key that the test's recipe names as its keyring) and a small synthetic cloud
//! image built here: GPT with an ESP, an ext4 root (`mke2fs -d`) and an ext4 `/boot` like noble's,
//! converted to qcow2 with qemu-img. The module is a real (tiny) ELF object with a `.modinfo`
//! section compiled by gcc, so depmod indexes it for real; it ships zstd-compressed as in noble.
//!
//! One test function: the pull reads PXELAB_HOME/PXELAB_CACHE from the environment, which every
//! thread of this binary shares.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use pxelab_contract::Arch;
use pxelab_tests::{sha256_hex, Behavior, FixtureServer, TestKey};
use xtask::distro::{self, modules::list_archive, PullArgs};

const KVER: &str = "6.8.0-31-generic";
const SERIAL: &str = "20240423";
const IMAGE: &str = "noble-server-cloudimg-amd64.img";

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run {cmd:?}: {e} (apt-get install e2fsprogs qemu-utils gcc kmod)")
    });
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `features` adds mke2fs features beyond Debian 12's defaults (newer e2fsprogs, as on the
/// machines that build Ubuntu's images, enable e.g. `orphan_file`).
fn ext4(dir: &Path, label: &str, out: &Path, size: &str, features: &str) {
    run(Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-L", label, "-O", features, "-d"])
        .arg(dir)
        .arg(out)
        .arg(size));
}

/// Builds the cloud image (qcow2) and returns (its bytes, the kernel bytes).
fn build_image(work: &Path) -> (Vec<u8>, Vec<u8>) {
    let root = work.join("root");
    let moddir = root.join(format!("usr/lib/modules/{KVER}/kernel/drivers/net"));
    fs::create_dir_all(&moddir).unwrap();
    fs::create_dir_all(root.join("usr/sbin")).unwrap();
    fs::create_dir_all(root.join("usr/bin")).unwrap();
    fs::create_dir_all(root.join("boot/efi")).unwrap();
    fs::create_dir_all(root.join("etc")).unwrap();
    std::os::unix::fs::symlink("usr/lib", root.join("lib")).unwrap();
    fs::write(root.join("usr/sbin/grub-install"), b"#!/bin/sh\n").unwrap();
    fs::write(root.join("usr/sbin/update-grub"), b"#!/bin/sh\n").unwrap();
    fs::write(root.join("usr/bin/cloud-init"), b"#!/usr/bin/python3\n").unwrap();
    fs::write(root.join("usr/bin/perl"), b"perl binary").unwrap();
    fs::hard_link(root.join("usr/bin/perl"), root.join("usr/bin/perl5.38.2")).unwrap();
    fs::write(root.join("etc/hostname"), b"ubuntu\n").unwrap();

    let src = work.join("virtio_net.c");
    fs::write(
        &src,
        "static const char m[] __attribute__((used, section(\".modinfo\"))) =\n\
         \"license=GPL\\0alias=virtio:d00000001v*\\0depends=\\0name=virtio_net\\0\";\n",
    )
    .unwrap();
    let obj = work.join("virtio_net.ko");
    run(Command::new("gcc").arg("-c").arg("-o").arg(&obj).arg(&src));
    let ko = fs::read(&obj).unwrap();
    fs::write(
        moddir.join("virtio_net.ko.zst"),
        zstd::encode_all(&ko[..], 3).unwrap(),
    )
    .unwrap();
    fs::write(
        root.join(format!("usr/lib/modules/{KVER}/modules.order")),
        "kernel/drivers/net/virtio_net.ko\n",
    )
    .unwrap();
    fs::write(
        root.join(format!("usr/lib/modules/{KVER}/modules.builtin")),
        "",
    )
    .unwrap();

    // noble keeps /boot on its own partition (16): the kernel lives there, not in the root fs.
    let boot = work.join("boot");
    fs::create_dir_all(&boot).unwrap();
    let kernel: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    fs::write(boot.join(format!("vmlinuz-{KVER}")), &kernel).unwrap();
    fs::write(boot.join(format!("initrd.img-{KVER}")), b"initrd").unwrap();
    std::os::unix::fs::symlink(format!("vmlinuz-{KVER}"), boot.join("vmlinuz")).unwrap();

    ext4(
        &root,
        "cloudimg-rootfs",
        &work.join("root.ext4"),
        "16M",
        "orphan_file,metadata_csum_seed",
    );
    ext4(&boot, "BOOT", &work.join("boot.ext4"), "8M", "^orphan_file");

    let raw = work.join("disk.raw");
    let file = fs::File::create(&raw).unwrap();
    file.set_len(40 << 20).unwrap();
    drop(file);
    let mut dev = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&raw)
        .unwrap();
    gpt::mbr::ProtectiveMBR::with_lb_size(((40 << 20) / 512 - 1) as u32)
        .overwrite_lba0(&mut dev)
        .unwrap();
    let mut disk = gpt::GptConfig::new()
        .writable(true)
        .create_from_device(dev, None)
        .unwrap();
    let rootp = disk
        .add_partition(
            "cloudimg-rootfs",
            16 << 20,
            gpt::partition_types::LINUX_ROOT_X64,
            0,
            None,
        )
        .unwrap();
    let espp = disk
        .add_partition("UEFI", 4 << 20, gpt::partition_types::EFI, 0, None)
        .unwrap();
    let bootp = disk
        .add_partition(
            "BOOT",
            8 << 20,
            gpt::partition_types::FREEDESK_BOOT,
            0,
            None,
        )
        .unwrap();
    assert_ne!(espp, 0);
    let parts = disk.partitions().clone();
    disk.write().unwrap();
    let dev = fs::OpenOptions::new().write(true).open(&raw).unwrap();
    for (n, img) in [(rootp, "root.ext4"), (bootp, "boot.ext4")] {
        let bytes = fs::read(work.join(img)).unwrap();
        dev.write_all_at(&bytes, parts[&n].first_lba * 512).unwrap();
    }
    dev.sync_all().unwrap();
    let qcow = work.join(IMAGE);
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow));
    (fs::read(&qcow).unwrap(), kernel)
}

/// The shipped Ubuntu recipe, for our serial and trusting `keyring`.
fn recipes(dir: &Path, keyring: &Path) {
    fs::create_dir_all(dir).unwrap();
    let shipped = fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../recipes/distros/ubuntu-24.04.toml"),
    )
    .unwrap();
    let ours = shipped
        .lines()
        .map(|l| {
            if l.starts_with("serial = ") {
                format!("serial = \"{SERIAL}\"\nkeyring = \"{}\"", keyring.display())
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    fs::write(dir.join("ubuntu-24.04.toml"), ours).unwrap();
}

fn pull(args: &PullArgs, cache: &Path) -> anyhow::Result<distro::PullReport> {
    std::env::set_var("PXELAB_CACHE", cache);
    distro::pull(args, &xtask::ui::Ui::plain())
}

fn tar_entries(path: &Path) -> Vec<(String, tar::EntryType, String)> {
    let bytes = zstd::decode_all(&fs::read(path).unwrap()[..]).unwrap();
    let mut archive = tar::Archive::new(&bytes[..]);
    archive
        .entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let link = e
                .link_name()
                .unwrap()
                .map(|l| l.to_string_lossy().into_owned())
                .unwrap_or_default();
            (
                e.path().unwrap().to_string_lossy().into_owned(),
                e.header().entry_type(),
                link,
            )
        })
        .collect()
}

#[test]
fn sys_ubuntu_pull_from_fixture_mirror_verifies_and_rejects_tampering() {
    let work = tempfile::tempdir().unwrap();
    let (image, kernel) = build_image(work.path());
    let sums = format!(
        "{} *{IMAGE}\n{} *noble-server-cloudimg-arm64.img\n",
        sha256_hex(&image),
        "0".repeat(64)
    );
    let key = TestKey::generate();
    let server = FixtureServer::start();
    let dir = format!("releases/noble/release-{SERIAL}");
    server.serve(&format!("{dir}/SHA256SUMS"), sums.clone(), Behavior::Normal);
    let signature = key.detach_sign(sums.as_bytes());
    server.serve(
        &format!("{dir}/SHA256SUMS.gpg"),
        signature.clone(),
        Behavior::Normal,
    );
    server.serve(&format!("{dir}/{IMAGE}"), image.clone(), Behavior::Normal);

    let home = work.path().join("home");
    std::env::set_var("PXELAB_HOME", &home);
    std::env::remove_var("SOURCE_DATE_EPOCH");
    let recipe_dir = work.path().join("recipes");
    recipes(&recipe_dir, key.keyring());
    let args = PullArgs {
        name: "ubuntu".into(),
        arch: Arch::X86_64,
        modules: None,
        mirror: Some(server.url("/")),
        recipes: Some(recipe_dir.clone()),
    };

    // Cold pull: locks the pins (from the mirror's SHA256SUMS), fetches, extracts, publishes.
    let report = pull(&args, &work.path().join("cache1")).expect("cold pull");
    assert!(!report.cached);
    let out = home.join("images/ubuntu-24.04/x86_64");
    assert_eq!(report.dir, out);
    let lock = fs::read_to_string(recipe_dir.join("ubuntu-24.04.lock")).unwrap();
    assert!(
        lock.contains(&sha256_hex(&image)),
        "the image is pinned in the lock:\n{lock}"
    );
    assert!(
        lock.contains(&sha256_hex(&signature)),
        "so is the sums' signature:\n{lock}"
    );
    assert!(
        lock.contains("https://cloud-images.ubuntu.com/releases/noble/release-20240423/"),
        "{lock}"
    );

    let m = &report.manifest;
    assert_eq!(m.contract.kernel_version, KVER);
    for f in [
        Some(&m.contract.rootfs),
        m.contract.kernel.as_ref(),
        m.contract.modules.as_ref(),
    ] {
        let f = f.unwrap();
        let bytes = fs::read(out.join(&f.file)).unwrap();
        assert_eq!(
            (sha256_hex(&bytes), bytes.len() as u64),
            (f.sha256.clone(), f.size),
            "{}",
            f.file
        );
    }
    assert_eq!(fs::read(out.join("vmlinuz")).unwrap(), kernel);
    assert!(m.grub_install && m.update_grub && m.cloud_init);
    assert_eq!(
        m.initrd.as_deref(),
        Some(format!("/boot/initrd.img-{KVER}").as_str())
    );
    assert_eq!(m.grub_target, "x86_64-efi");
    let on_disk: distro::PullManifest =
        serde_json::from_slice(&fs::read(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(&on_disk, m);

    let names = list_archive(&out.join("modules.cpio.zst")).unwrap();
    let base = format!("lib/modules/{KVER}");
    assert!(
        names.contains(&format!("{base}/kernel/drivers/net/virtio_net.ko")),
        "{names:?}"
    );
    assert!(
        names.contains(&format!("{base}/modules.dep"))
            && names.contains(&format!("{base}/modules.alias")),
        "{names:?}"
    );

    let entries = tar_entries(&out.join("rootfs.tar.zst"));
    let find = |p: &str| {
        entries
            .iter()
            .find(|e| e.0.trim_end_matches('/') == p)
            .unwrap_or_else(|| panic!("{p} not in rootfs: {entries:?}"))
    };
    assert_eq!(find("usr/sbin/grub-install").1, tar::EntryType::Regular);
    assert_eq!(
        find(&format!("boot/vmlinuz-{KVER}")).1,
        tar::EntryType::Regular,
        "/boot comes from the boot partition"
    );
    assert_eq!(find("lib").2, "usr/lib", "symlinks kept");
    assert_eq!(
        find("usr/bin/perl5.38.2").1,
        tar::EntryType::Link,
        "hard links kept"
    );
    assert!(!entries.iter().any(|e| e.0.starts_with("boot/lost+found")));
    let paths: Vec<&String> = entries.iter().map(|e| &e.0).collect();
    let mut sorted = paths.clone();
    sorted.sort_by_key(|p| {
        p.trim_end_matches('/')
            .split('/')
            .map(String::from)
            .collect::<Vec<_>>()
    });
    assert_eq!(paths, sorted, "entries are sorted");

    // Warm: nothing changed → from the cache, nothing rewritten, fast.
    let t = Instant::now();
    let warm = pull(&args, &work.path().join("cache1")).expect("warm pull");
    assert!(warm.cached && warm.up_to_date);
    assert!(
        t.elapsed().as_secs_f64() < 2.0,
        "warm pull took {:?}",
        t.elapsed()
    );

    // Same image from an empty store: bit-identical artifacts.
    let again = pull(&args, &work.path().join("cache2")).expect("pull into a fresh store");
    assert!(!again.cached);
    assert_eq!(again.manifest, *m);

    // A tampered image is rejected; the published artifacts stay as they were.
    let mut evil = image.clone();
    let at = evil.len() / 2;
    evil[at] ^= 0xff;
    server.serve(&format!("{dir}/{IMAGE}"), evil, Behavior::Normal);
    let err = format!(
        "{:#}",
        pull(&args, &work.path().join("cache3")).unwrap_err()
    );
    assert!(err.contains("sha256"), "{err}");
    assert_eq!(fs::read(out.join("vmlinuz")).unwrap(), kernel);
    server.serve(&format!("{dir}/{IMAGE}"), image.clone(), Behavior::Normal);

    // A tampered SHA256SUMS is rejected too.
    let evil_sums = sums.replace(&sha256_hex(&image)[..8], "00000000");
    server.serve(
        &format!("{dir}/SHA256SUMS"),
        evil_sums.clone(),
        Behavior::Normal,
    );
    let err = format!(
        "{:#}",
        pull(&args, &work.path().join("cache4")).unwrap_err()
    );
    assert!(
        err.contains("SHA256SUMS") && err.contains("sha256"),
        "{err}"
    );
    assert_no_staging(&home);
    let mut buf = Vec::new();
    fs::File::open(out.join("manifest.json"))
        .unwrap()
        .read_to_end(&mut buf)
        .unwrap();
    assert_eq!(
        serde_json::from_slice::<distro::PullManifest>(&buf).unwrap(),
        *m
    );
    // The killed pulls below must have a release they can finish from.
    server.serve(&format!("{dir}/SHA256SUMS"), sums.clone(), Behavior::Normal);

    // Killed pulls (SIGKILL or Ctrl-C's SIGINT, at growing delays, each switching the module
    // set so that a finished pull replaces the artifacts): whatever moment the kill hits, the
    // published directory is one whole, verified set — the old one or the new one.
    // Their system temp dir is their own, to see that a kill leaves nothing there: what a killed
    // pull leaves belongs in the store's tmp, which `gc` empties.
    let kill_tmp = work.path().join("tmp-kill");
    fs::create_dir(&kill_tmp).unwrap();
    let mut finished = 0;
    for (i, delay_ms) in [30u64, 100, 250, 500, 800, 1200, 1800, 2500, 4000]
        .into_iter()
        .enumerate()
    {
        let modules = if i % 2 == 0 { "all" } else { "installer" };
        let mut child = Command::new(env!("CARGO_BIN_EXE_xtask"))
            .args(["distro", "pull", "ubuntu", "--modules", modules, "--mirror"])
            .arg(server.url("/"))
            .arg("--recipes")
            .arg(&recipe_dir)
            .env("PXELAB_HOME", &home)
            .env("PXELAB_CACHE", work.path().join(format!("cache-kill-{i}")))
            .env("TMPDIR", &kill_tmp)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let signal = if i % 2 == 0 {
            libc::SIGKILL
        } else {
            libc::SIGINT
        };
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, signal) };
        if child.wait().unwrap().success() {
            finished += 1;
        }
        assert_whole(&out, &format!("after a kill at {delay_ms} ms"));
    }
    assert!(
        finished < 9,
        "no pull was ever interrupted: the test injected no fault"
    );
    let in_tmp: Vec<_> = fs::read_dir(&kill_tmp)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(in_tmp.is_empty(), "killed pulls left {in_tmp:?} in TMPDIR");
    // A pull after the kills finishes and leaves no staging directory behind.
    let after = pull(&args, &work.path().join("cache1")).expect("pull after the kills");
    assert_eq!(after.manifest, *m);
    assert_whole(&out, "after the final pull");
    assert_no_staging(&home);

    // Pinning needs Ubuntu's signature on the sums: a signature by another key, or sums that
    // are not what was signed, are refused and no lock is written.
    let lock_file = recipe_dir.join("ubuntu-24.04.lock");
    fs::remove_file(&lock_file).unwrap();
    let stranger = TestKey::generate();
    let sums_path = format!("{dir}/SHA256SUMS");
    let signature_path = format!("{dir}/SHA256SUMS.gpg");
    for (what, served_sums, served_signature) in [
        (
            "a foreign key",
            sums.clone(),
            stranger.detach_sign(sums.as_bytes()),
        ),
        ("tampered sums", evil_sums.clone(), signature.clone()),
    ] {
        server.serve(&sums_path, served_sums, Behavior::Normal);
        server.serve(&signature_path, served_signature, Behavior::Normal);
        let err = format!(
            "{:#}",
            pull(&args, &work.path().join("cache-sig")).expect_err(what)
        );
        assert!(
            err.contains("SHA256SUMS is not signed by the release's key")
                && err.contains("no good signature"),
            "{what}: {err}"
        );
        assert!(!lock_file.exists(), "{what}: nothing pinned");
    }
    // The pins are checked again at every build: a lock whose sums the recipe's keyring did not
    // sign (here: the recipe now trusts another key) builds nothing.
    server.serve(&sums_path, sums.clone(), Behavior::Normal);
    server.serve(&signature_path, signature, Behavior::Normal);
    pull(&args, &work.path().join("cache1")).expect("re-pinned from the signed release");
    recipes(&recipe_dir, stranger.keyring());
    let err = format!(
        "{:#}",
        pull(&args, &work.path().join("cache1")).unwrap_err()
    );
    assert!(err.contains("no good signature"), "{err}");
    assert_whole(&out, "after a refused build");
    std::io::stderr().flush().unwrap();
}

/// The distro's images directory holds the published arch and no staging directory.
fn assert_no_staging(home: &Path) {
    let left: Vec<_> = fs::read_dir(home.join("images/ubuntu-24.04"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        left,
        [std::ffi::OsString::from("x86_64")],
        "staging dirs left behind"
    );
}

/// `dir` holds exactly the files its manifest names, each with the manifest's digest and size.
fn assert_whole(dir: &Path, when: &str) {
    let manifest: distro::PullManifest =
        serde_json::from_slice(&fs::read(dir.join("manifest.json")).unwrap())
            .unwrap_or_else(|e| panic!("{when}: manifest.json unreadable: {e}"));
    let c = &manifest.contract;
    let mut expected = vec!["manifest.json".to_string()];
    for f in c.files() {
        let bytes = fs::read(dir.join(&f.file)).unwrap();
        assert_eq!(
            (sha256_hex(&bytes), bytes.len() as u64),
            (f.sha256.clone(), f.size),
            "{when}: {} does not match its manifest",
            f.file
        );
        expected.push(f.file.clone());
    }
    let mut present: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    present.sort();
    expected.sort();
    assert_eq!(
        present,
        expected,
        "{when}: stray files in {}",
        dir.display()
    );
}
