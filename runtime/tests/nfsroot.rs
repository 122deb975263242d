//! Diskless boots through the handler, in-process: the rootfs is unpacked (for real, from a
//! small tar.zst made here) in the background while `/ipxe` says "retry", then the diskless
//! script and the files it names are served. ganesha is not run here (see `sys_nfs.rs`): the
//! test marks the export as served the way the supervisor does once ganesha listens.

mod common;

use std::{
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use common::{rootfs_tar_zst, sha256_of, Stack, KVER, MAC};
use pxelab_contract::Arch;
use pxelab_runtime::{
    images::Catalog,
    nfsroot::{self, NfsRoots, RootStatus},
};

/// A stack whose distro `debian-12` has a real rootfs, a diskless VM on MAC [`MAC`], and the
/// handler served with `roots` (so the test can play the supervisor's part).
fn diskless_stack(rootfs: &[u8], manifest_sha: Option<&str>) -> (Stack, Arc<NfsRoots>) {
    let mut s = Stack::new();
    let img = s.root().join("images/debian-12/x86_64");
    std::fs::write(img.join("rootfs.tar.zst"), rootfs).unwrap();
    let sha = manifest_sha
        .map(str::to_string)
        .unwrap_or_else(|| sha256_of(rootfs));
    let manifest = serde_json::json!({
        "rootfs": {"file": "rootfs.tar.zst", "sha256": sha, "size": rootfs.len()},
        "kernel_version": KVER
    });
    std::fs::write(img.join("manifest.json"), manifest.to_string()).unwrap();
    let vm = s.root().join("vms/t1.json");
    let mut def: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&vm).unwrap()).unwrap();
    def["boot"] = "nfsroot".into();
    std::fs::write(&vm, def.to_string()).unwrap();

    let s_root = s.root().to_path_buf();
    let mut roots = None;
    s.reconfigure(|context| {
        let made = NfsRoots::new(context.catalog.clone(), s_root.join("state/nfsroot"));
        context.nfs = Some(made.clone());
        roots = Some(made);
    });
    (s, roots.expect("reconfigured"))
}

/// Waits until the background unpack has finished one way or the other.
fn wait_unpacked(roots: &Arc<NfsRoots>) -> Result<std::path::PathBuf, RootStatus> {
    let t = Instant::now();
    loop {
        match roots.unpacked("debian-12", Arch::X86_64) {
            Ok((export, kver)) => {
                assert_eq!(kver, KVER);
                return Ok(export.path);
            }
            Err(RootStatus::Preparing(_)) if t.elapsed() < Duration::from_secs(20) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(other) => return Err(other),
        }
    }
}

fn hidden_leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect()
}

#[test]
fn diskless_boot_waits_for_the_export_then_boots_from_it() {
    let rootfs = rootfs_tar_zst();
    let (s, roots) = diskless_stack(&rootfs, None);

    // First /ipxe: the unpack starts in the background and iPXE is told to come back.
    let r = s.get(&format!("/ipxe?mac={MAC}"));
    assert_eq!(r.status, 200, "{}", r.text());
    let text = r.text();
    assert!(text.starts_with("#!ipxe\n"), "{text}");
    assert!(text.contains("\nsleep 5\n"), "{text}");
    assert!(
        text.contains(&format!(
            "\nchain --replace --autofree http://pxe.test/ipxe?mac={MAC}\n"
        )),
        "{text}"
    );
    // Retries are not boots: nothing on the timeline yet.
    assert_eq!(s.control_json("/vms/t1/timeline"), serde_json::json!([]));

    let export = wait_unpacked(&roots).expect("unpack failed");
    let sha = sha256_of(&rootfs);
    assert_eq!(
        export,
        s.root()
            .join("state/nfsroot/debian-12/x86_64")
            .join(&sha[..nfsroot::DIGEST_PREFIX])
    );
    assert!(hidden_leftovers(export.parent().unwrap()).is_empty());
    // No host user reaches the export's setuid binaries or root-only files.
    let private = std::fs::metadata(s.root().join("state/nfsroot")).unwrap();
    assert_eq!(private.permissions().mode() & 0o777, 0o700);
    // Ownership, modes (setuid, a 0700 directory), links as in the archive.
    let meta = |p: &str| std::fs::symlink_metadata(export.join(p)).unwrap();
    assert_eq!(meta("usr/bin/sudo").permissions().mode() & 0o7777, 0o4755);
    assert_eq!(meta("root").permissions().mode() & 0o7777, 0o700);
    assert_eq!(meta("etc/shadow").permissions().mode() & 0o7777, 0o640);
    assert_eq!(meta("usr/bin/sudoedit").ino(), meta("usr/bin/sudo").ino());
    assert_eq!(
        std::fs::read_link(export.join("bin")).unwrap(),
        Path::new("usr/bin")
    );
    assert_eq!(meta("etc/hostname").mtime(), 1_686_355_200);

    // Unpacked but not yet exported by ganesha: still "retry".
    let r = s.get(&format!("/ipxe?mac={MAC}"));
    assert!(r.text().contains("\nsleep 5\n"), "{}", r.text());

    // What the supervisor does once ganesha listens with the export in its config.
    let (exp, _) = roots.unpacked("debian-12", Arch::X86_64).unwrap();
    roots.set_served(vec![exp]);
    let r = s.get(&format!("/ipxe?mac={MAC}"));
    assert_eq!(r.status, 200);
    let text = r.text();
    for needle in [
        "kernel http://pxe.test/images/debian-12/x86_64/vmlinuz console=ttyS0,115200 panic=10 boot=pxelab ip=dhcp BOOTIF=01-52-54-00-aa-bb-01 nfsroot=127.0.0.1:/pxelab/debian-12/x86_64 rw",
        "ds=nocloud-net;s=http://pxe.test/cloud-init/t1/",
        // cloud-init must not run a DHCP client on the NIC that carries the root.
        " network-config=disabled ",
        "initrd --name initrd.img http://pxe.test/nfsroot/debian-12/x86_64/initrd.img",
        "initrd --name pxelab-nfsroot.cpio http://pxe.test/nfsroot/overlay.cpio",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
    let timeline = s.control_json("/vms/t1/timeline");
    assert_eq!(timeline[0]["phase"], "ipxe", "{timeline}");
    assert_eq!(s.control_json("/status")["vms"][0]["state"], "booting");

    // The files that script names.
    let r = s.get("/nfsroot/debian-12/x86_64/initrd.img");
    assert_eq!(
        (r.status, r.body.as_slice()),
        (200, &b"DISTRO-INITRAMFS"[..])
    );
    let r = s.get("/nfsroot/overlay.cpio");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, nfsroot::overlay_cpio());
    assert!(s.get("/nfsroot/debian-12/riscv/initrd.img").status == 404);
    assert!(s.get("/nfsroot/ubuntu-24.04/x86_64/initrd.img").status == 404);

    // The initramfs reports the mounted root with the boot's token; the VM stays "booting"
    // (nothing to install).
    let events = format!("pxelab.events=http://pxe.test/events/{MAC}?token=");
    assert!(text.contains(&events), "{text}");
    let token = common::token_in(&text).unwrap();
    let r = s.post_event(&token, r#"{"phase":"nfs-root","message":"root mounted"}"#);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(s.control_json("/status")["vms"][0]["state"], "booting");
    // A restart of the stack finds the export and does not unpack again.
    let again = NfsRoots::new(
        Arc::new(Catalog::new(
            s.root().join("images"),
            s.root().join("initrds"),
        )),
        s.root().join("state/nfsroot"),
    );
    assert_eq!(
        again.unpacked("debian-12", Arch::X86_64).unwrap().0.path,
        export
    );
}

#[test]
fn a_damaged_rootfs_is_refused_and_leaves_nothing_behind() {
    let rootfs = rootfs_tar_zst();
    let wrong = "ab".repeat(32);
    let (s, roots) = diskless_stack(&rootfs, Some(&wrong));
    let r = s.get(&format!("/ipxe?mac={MAC}"));
    assert!(r.text().contains("\nsleep 5\n"), "{}", r.text());
    match wait_unpacked(&roots) {
        Err(RootStatus::Failed(why)) => {
            assert!(why.contains(&wrong) && why.contains("distro pull"), "{why}")
        }
        other => panic!("expected a digest failure, got {other:?}"),
    }
    let dir = s.root().join("state/nfsroot/debian-12/x86_64");
    assert!(!dir.join(&wrong[..16]).exists());
    assert!(
        hidden_leftovers(&dir).is_empty(),
        "{:?}",
        hidden_leftovers(&dir)
    );
    let r = s.get(&format!("/ipxe?mac={MAC}"));
    r.assert_told_to_wait_because("distro pull");
}

#[test]
fn diskless_vm_of_an_unpulled_distro_waits_and_says_why() {
    let rootfs = rootfs_tar_zst();
    let (s, _roots) = diskless_stack(&rootfs, None);
    std::fs::remove_file(s.root().join("images/debian-12/x86_64/manifest.json")).unwrap();
    let r = s.get(&format!("/ipxe?mac={MAC}"));
    r.assert_told_to_wait_because("run `cargo xtask distro pull debian-12`");
}

/// The stack binary with a diskless VM but no ganesha: the boot console says what to install,
/// not only "not ready yet".
#[test]
fn diskless_vm_without_ganesha_is_told_what_to_install() {
    use std::io::{BufRead, BufReader};
    let rootfs = rootfs_tar_zst();
    let (s, _roots) = diskless_stack(&rootfs, None);
    let root = s.root().to_path_buf();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pxelab-stack"))
        .arg("--data-dir")
        .arg(&root)
        .args(["--no-dnsmasq", "--listen", "127.0.0.1:0"])
        .args(["--server-ip", "127.0.0.1/8"])
        .args(["--ganesha", "/nonexistent/ganesha.nfsd"])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _running = Kill(child);
    let mut lines = BufReader::new(stderr).lines();
    let addr: std::net::SocketAddr = loop {
        let line = lines.next().expect("stack exited").unwrap();
        if let Some(rest) = line.strip_prefix("pxelab-stack: listening on http://") {
            break rest.split(' ').next().unwrap().parse().unwrap();
        }
    };
    let t = Instant::now();
    loop {
        let r = common::raw_bytes(
            addr,
            format!("GET /ipxe?mac={MAC} HTTP/1.1\r\nHost: pxe.test\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        );
        if r.text().contains("\nsleep 10\n") {
            r.assert_told_to_wait_because(": ganesha.nfsd not found");
            assert!(!r.text().contains("/nonexistent"), "{}", r.text());
            r.assert_told_to_wait_because("apt-get install nfs-ganesha nfs-ganesha-vfs");
            break;
        }
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(r.text().contains("\nsleep 5\n"), "{}", r.text());
        assert!(t.elapsed() < Duration::from_secs(20), "still {}", r.text());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A tar.zst of `entries` (path, type, link target), each made as GNU tar makes it.
fn tar_zst(entries: &[(&str, tar::EntryType, Option<&str>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, kind, link) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(*kind);
        h.set_mode(if kind.is_dir() { 0o755 } else { 0o4755 });
        h.set_size(0);
        h.set_mtime(1_686_355_200);
        h.set_uid(0);
        h.set_gid(0);
        if let Some(l) = link {
            h.set_link_name(l).unwrap();
        }
        // Raw bytes: the tar crate refuses to write `..`, and this archive is the attacker's.
        let name = &mut h.as_old_mut().name;
        name.fill(0);
        name[..path.len()].copy_from_slice(path.as_bytes());
        if *kind == tar::EntryType::Fifo {
            // GNU tar leaves the device fields of a FIFO blank, not octal zeros.
            let gnu = h.as_gnu_mut().unwrap();
            gnu.dev_major = [0; 8];
            gnu.dev_minor = [0; 8];
        }
        h.set_cksum();
        b.append(&h, &[][..]).unwrap();
    }
    zstd::encode_all(&b.into_inner().unwrap()[..], 3).unwrap()
}

fn unpack(archive: &[u8], dest: &Path) -> Result<(), String> {
    let file = dest.with_extension("tar.zst");
    std::fs::write(&file, archive).unwrap();
    nfsroot::unpack_rootfs(&file, &sha256_of(archive), archive.len() as u64, dest)
}

/// The issue's reproduction: a symbolic link the archive makes, then entries through it. Nothing
/// is created outside the export, and the unpack fails saying which entry.
#[test]
fn entries_through_a_symlink_the_archive_made_stay_inside() {
    use tar::EntryType::*;
    let dir = tempfile::tempdir().unwrap();
    let outside = dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let target = outside.to_str().unwrap();
    for (what, entries) in [
        (
            "fifo",
            vec![
                ("escape", Symlink, Some(target)),
                ("escape/fifo", Fifo, None),
            ],
        ),
        (
            "file",
            vec![
                ("escape", Symlink, Some(target)),
                ("escape/sub/file", Regular, None),
            ],
        ),
        ("dotdot", vec![("../outside/file", Regular, None)]),
        (
            "hardlink",
            vec![
                ("escape", Symlink, Some(target)),
                ("copy", Link, Some("escape/x")),
            ],
        ),
    ] {
        std::fs::write(outside.join("x"), b"x").unwrap();
        let dest = dir.path().join(format!("export-{what}"));
        let result = unpack(&tar_zst(&entries), &dest);
        let why = result.expect_err(what);
        assert!(why.contains("entry"), "{what}: {why}");
        assert!(!why.contains(dir.path().to_str().unwrap()), "{what}: {why}");
        let mut left: Vec<_> = std::fs::read_dir(&outside)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        left.sort();
        assert_eq!(left, ["x"], "{what} wrote outside the export");
        assert!(!dest.exists(), "{what}: a failed unpack left {dest:?}");
    }
}

/// FIFOs as GNU tar writes them (blank device fields) unpack; symlinks inside are kept as links.
#[test]
fn gnu_fifos_and_inner_symlinks_unpack() {
    use std::os::unix::fs::FileTypeExt;
    use tar::EntryType::*;
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("export");
    let archive = tar_zst(&[
        ("./", Directory, None),
        ("run/", Directory, None),
        ("run/initctl", Fifo, None),
        ("usr/bin/", Directory, None),
        ("usr/bin/tool", Regular, None),
        ("bin", Symlink, Some("usr/bin")),
        ("abs", Symlink, Some("/etc/shadow")),
    ]);
    unpack(&archive, &dest).unwrap();
    let meta = std::fs::symlink_metadata(dest.join("run/initctl")).unwrap();
    assert!(meta.file_type().is_fifo());
    assert_eq!(
        std::fs::read_link(dest.join("abs")).unwrap(),
        Path::new("/etc/shadow")
    );
    let tool = std::fs::metadata(dest.join("usr/bin/tool")).unwrap();
    assert_eq!(tool.permissions().mode() & 0o7777, 0o4755);
    assert_eq!(
        std::fs::metadata(&dest).unwrap().permissions().mode() & 0o777,
        0o755
    );
}

/// Only what a defined diskless VM boots is unpacked; the export is never under `/images/`.
#[test]
fn only_distros_of_diskless_vms_are_unpacked_and_none_is_served_as_files() {
    let rootfs = rootfs_tar_zst();
    let (s, roots) = diskless_stack(&rootfs, None);
    let vm = s.root().join("vms/t1.json");
    let text = std::fs::read_to_string(&vm)
        .unwrap()
        .replace("nfsroot", "install");
    std::fs::write(&vm, text).unwrap();
    let r = s.get("/nfsroot/debian-12/x86_64/initrd.img");
    assert_eq!(r.status, 404, "{}", r.text());
    r.assert_one_line();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !s.root().join("state/nfsroot").exists(),
        "an initrd request for a distro no diskless VM boots started an unpack"
    );
    // Put it back: the export is made, and `/images/` does not reach into it.
    std::fs::write(
        &vm,
        std::fs::read_to_string(&vm)
            .unwrap()
            .replace("\"install\"", "\"nfsroot\""),
    )
    .unwrap();
    s.get(&format!("/ipxe?mac={MAC}"));
    let export = wait_unpacked(&roots).expect("unpack failed");
    assert!(export.join("etc/shadow").exists());
    for target in [
        "/images/debian-12/x86_64/etc/shadow".to_string(),
        format!(
            "/images/debian-12/x86_64/nfsroot-{}/etc/shadow",
            export.file_name().unwrap().to_string_lossy()
        ),
    ] {
        let r = s.get(&target);
        assert_eq!(r.status, 404, "{target}: {}", r.text());
    }
}
