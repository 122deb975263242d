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
    server::ServerOptions,
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

    s.stop();
    let mut context = Stack::context(s.root(), true);
    let roots = NfsRoots::new(context.catalog.clone());
    context.nfs = Some(roots.clone());
    s.serve(
        context,
        ServerOptions {
            access_log: false,
            ..ServerOptions::default()
        },
    );
    (s, roots)
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
            .join("images/debian-12/x86_64")
            .join(format!("nfsroot-{}", &sha[..nfsroot::DIGEST_PREFIX]))
    );
    assert!(hidden_leftovers(export.parent().unwrap()).is_empty());
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
        "kernel http://pxe.test/images/debian-12/x86_64/vmlinuz console=ttyS0,115200 boot=pxelab ip=dhcp BOOTIF=01-52-54-00-aa-bb-01 nfsroot=127.0.0.1:/pxelab/debian-12/x86_64 rw",
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
    let again = NfsRoots::new(Arc::new(Catalog::new(
        s.root().join("images"),
        s.root().join("initrds"),
    )));
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
    let dir = s.root().join("images/debian-12/x86_64");
    assert!(!dir.join(format!("nfsroot-{}", &wrong[..16])).exists());
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
            r.assert_told_to_wait_because("/nonexistent/ganesha.nfsd not found");
            r.assert_told_to_wait_because("apt-get install nfs-ganesha nfs-ganesha-vfs");
            break;
        }
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(r.text().contains("\nsleep 5\n"), "{}", r.text());
        assert!(t.elapsed() < Duration::from_secs(20), "still {}", r.text());
        std::thread::sleep(Duration::from_millis(100));
    }
}
