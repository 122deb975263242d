//! The installer run for real against a loop disk that already holds a partition table: refused
//! before any write without the operator's reprovision nonce, wiped (and marked with this
//! install's id) with it, and retried over its own unfinished install without one.
//!
//! `sys_*`: needs root, losetup, sfdisk, mke2fs and mkfs.fat (the loop device and the
//! partitioning are real).

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::process::Command;

use pxelab_contract::{Artifact, Event, InstallerConfig, Mac, Phase};
use pxelab_tests::cmd::{require, require_root};
use pxelab_tests::{Behavior, FixtureServer, LoopDisk};

const MAC: &str = "52:54:00:12:34:57";
const EVENTS: &str = "/events/52-54-00-12-34-57";

/// A boot server for `t1` on `disk` whose rootfs is missing: the install gets as far as the
/// rootfs download at most.
fn server(disk: &str, wipe: Option<&str>) -> FixtureServer {
    let server = FixtureServer::start();
    for (doc, body) in [
        ("meta-data", "instance-id: t1\n"),
        ("user-data", "#cloud-config\n"),
        ("network-config", "version: 2\nethernets: {}\n"),
    ] {
        server.serve(&format!("/cloud-init/t1/{doc}"), body, Behavior::Normal);
    }
    let config = InstallerConfig {
        name: "t1".into(),
        mac: MAC.parse::<Mac>().expect("mac"),
        hostname: "t1".into(),
        distro: "debian-12".into(),
        rootfs: Artifact {
            url: server.url("/missing/rootfs.tar.zst"),
            sha256: "0".repeat(64),
            size: 1 << 20,
        },
        disk_image: None,
        cloud_init_url: server.url("/cloud-init/t1/"),
        events_url: server.url(EVENTS),
        disk: Some(disk.to_string()),
        reboot: false,
        direct_start: false,
        login: None,
        wipe: wipe.map(str::to_string),
    };
    server.serve(
        "/config/t1",
        serde_json::to_vec(&config).expect("config json"),
        Behavior::Normal,
    );
    server
}

fn install(server: &FixtureServer, disk: &LoopDisk) -> (Option<i32>, String, Vec<Event>) {
    let out = Command::new(env!("CARGO_BIN_EXE_pxelab-installer"))
        .arg(format!("config_url={}", server.url("/config/t1")))
        .arg(format!("pxelab.target={}", disk.path("target").display()))
        .args(["pxelab.retries=0", "pxelab.backoff_ms=10"])
        .output()
        .expect("run pxelab-installer");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("--- installer stderr ---\n{stderr}--- end ---");
    let last = stderr.lines().last().unwrap_or("").to_string();
    let events = server
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && r.path == EVENTS)
        .map(|r| serde_json::from_slice(&r.body).expect("event JSON"))
        .collect();
    (out.status.code(), last, events)
}

fn head(dev: &str) -> Vec<u8> {
    let mut bytes = Vec::new();
    File::open(dev)
        .and_then(|f| f.take(1 << 20).read_to_end(&mut bytes))
        .expect("reading the disk");
    bytes
}

#[test]
fn sys_a_used_disk_is_wiped_only_with_the_reprovision_nonce() {
    require_root("a loop disk");
    for (tool, package) in [
        ("losetup", "mount"),
        ("sfdisk", "fdisk"),
        ("mke2fs", "e2fsprogs"),
        ("mkfs.fat", "dosfstools"),
    ] {
        require(tool, package);
    }
    let disk = LoopDisk::new(6 << 30);
    // A protective MBR and a GPT header, written through the device the installer reads.
    {
        let dev = OpenOptions::new().write(true).open(disk.dev()).unwrap();
        dev.write_all_at(&[0x55, 0xaa], 510).unwrap();
        dev.write_all_at(b"EFI PART", 512).unwrap();
        dev.sync_all().unwrap();
    }
    let before = head(disk.dev());

    let (code, last, events) = install(&server(disk.dev(), None), &disk);
    assert_eq!(code, Some(1), "{last}");
    let refusal = format!(
        "disk: {} is not blank: it carries a GPT partition table; refusing to wipe it without the operator's word: run `cargo xtask lab vm reprovision t1` (or clear the disk), then boot t1 again",
        disk.dev()
    );
    assert_eq!(last, format!("pxelab-installer: FAILED at step {refusal}"));
    let failed = events.last().expect("a failed event");
    assert_eq!(
        (failed.phase, failed.message.as_str()),
        (Phase::Failed, refusal.as_str())
    );
    assert!(
        head(disk.dev()) == before,
        "the refused disk was written to"
    );

    let (code, last, _) = install(&server(disk.dev(), Some("nonce")), &disk);
    assert_eq!(code, Some(1), "{last}");
    assert!(
        last.contains("FAILED at step rootfs:"),
        "with the nonce the install goes past the disk: {last}"
    );
    let id = &head(disk.dev())[512 << 10..(512 << 10) + 4096];
    let line = String::from_utf8_lossy(id);
    assert!(
        line.starts_with(&format!(
            r#"pxelab-install {{"vm":"t1","mac":"{MAC}","at":"20"#
        )),
        "{line}"
    );

    // The disk carries this machine's unfinished install: retrying needs no nonce.
    let (code, last, _) = install(&server(disk.dev(), None), &disk);
    assert_eq!(code, Some(1), "{last}");
    assert!(last.contains("FAILED at step rootfs:"), "{last}");
}
