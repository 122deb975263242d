//! Every route, status and header of the boot handler, over loopback.

mod common;

use common::{write_vm, Stack, KEY, MAC};
use pxelab_runtime::server::ServerOptions;

#[test]
fn healthz_and_unknown_routes() {
    let s = Stack::new();
    let r = s.get("/healthz");
    assert_eq!((r.status, r.text().as_str()), (200, "ok\n"));
    let r = s.get("/nope");
    assert_eq!(r.status, 404);
    r.assert_one_line();
    assert!(
        r.text().contains("/ipxe?mac="),
        "404 should list the endpoints: {}",
        r.text()
    );
    let r = s.get("/");
    assert_eq!(r.status, 404);
}

#[test]
fn wrong_method_is_405_with_allow() {
    let s = Stack::new();
    for (method, target, allow) in [
        ("POST", "/ipxe?mac=52:54:00:aa:bb:01", "GET, HEAD"),
        ("DELETE", "/healthz", "GET, HEAD"),
        ("PUT", "/images/debian-12/x86_64/vmlinuz", "GET, HEAD"),
        ("GET", "/events/52:54:00:aa:bb:01", "POST"),
    ] {
        let r = s.send(method, target, b"");
        assert_eq!(r.status, 405, "{method} {target}");
        assert_eq!(r.header("Allow"), Some(allow));
        r.assert_one_line();
    }
}

#[test]
fn ipxe_install_script_for_a_new_vm() {
    let s = Stack::new();
    // HEAD shows the script's size without counting as a boot.
    let head = s.raw(&format!(
        "HEAD /ipxe?mac={MAC} HTTP/1.1\r\nHost: pxe.test\r\nConnection: close\r\n\r\n"
    ));
    assert_eq!(head.status, 200);
    assert!(
        head.body.is_empty()
            && head
                .header("Content-Length")
                .unwrap()
                .parse::<usize>()
                .unwrap()
                > 100
    );
    assert_eq!(s.control_json("/status")["vms"][0]["state"], "new");
    let r = s.get("/ipxe?mac=52-54-00-AA-BB-01");
    assert_eq!(r.status, 200, "{}", r.text());
    let t = r.text();
    assert!(t.starts_with("#!ipxe\n"));
    // URLs use the Host the client used.
    let token = common::token_in(&t).expect("a boot token");
    assert!(t.contains(&format!("kernel http://pxe.test/images/debian-12/x86_64/vmlinuz console=ttyS0,115200 panic=10 BOOTIF=01-52-54-00-aa-bb-01 config_url=http://pxe.test/config/52:54:00:aa:bb:01?token={token} initrd=initrd.img initrd=modules.cpio.zst")), "{t}");
    assert!(
        t.contains("initrd --name initrd.img http://pxe.test/initrds/x86_64/initrd.img"),
        "{t}"
    );
    assert!(t.contains("initrd --name modules.cpio.zst http://pxe.test/images/debian-12/x86_64/modules.cpio.zst"), "{t}");
    assert!(t.contains("\nboot "), "{t}");
    // The boot was recorded.
    let status = s.control_json("/status");
    assert_eq!(status["vms"][0]["state"], "booting");
    assert_eq!(status["vms"][0]["last_event"]["phase"], "ipxe");
}

#[test]
fn ipxe_aarch64_uses_the_pl011_console() {
    let s = Stack::new();
    let vm = s.root().join("vms/t1.json");
    let text = std::fs::read_to_string(&vm)
        .unwrap()
        .replace("x86_64", "aarch64");
    std::fs::write(&vm, text).unwrap();
    for d in ["images/debian-12/aarch64", "initrds/aarch64"] {
        std::fs::create_dir_all(s.root().join(d)).unwrap();
    }
    for f in [
        "images/debian-12/aarch64/vmlinuz",
        "images/debian-12/aarch64/modules.cpio.zst",
        "initrds/aarch64/initrd.img",
    ] {
        std::fs::write(s.root().join(f), b"x").unwrap();
    }
    let t = s.ipxe();
    assert!(t.contains("console=ttyAMA0,115200"), "{t}");
    assert!(t.contains("/initrds/aarch64/initrd.img"), "{t}");
}

#[test]
fn ipxe_errors() {
    let s = Stack::new();
    let r = s.get("/ipxe");
    assert_eq!(r.status, 400);
    r.assert_one_line();
    for bad in [
        "/ipxe?mac=",
        "/ipxe?mac=52:54:00:aa:bb",
        "/ipxe?mac=zz:54:00:aa:bb:01",
        "/ipxe?mac=52:54:00:aa:bb:01:02",
        "/ipxe?mac=%00",
    ] {
        let r = s.get(bad);
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
        r.assert_one_line();
    }
    let r = s.get("/ipxe?mac=52:54:00:00:00:99");
    assert_eq!(r.status, 404);
    let t = r.text();
    assert!(
        t.starts_with("#!ipxe\necho ") && t.contains("52:54:00:00:00:99") && t.contains("\nexit"),
        "{t}"
    );
}

#[test]
fn ipxe_says_when_the_distro_is_not_pulled() {
    let s = Stack::new();
    std::fs::remove_file(s.root().join("images/debian-12/x86_64/modules.cpio.zst")).unwrap();
    let r = s.get(&format!("/ipxe?mac={MAC}"));
    r.assert_told_to_wait_because("run `cargo xtask distro pull debian-12`");
    std::fs::remove_file(s.root().join("initrds/x86_64/initrd.img")).unwrap();
    std::fs::write(
        s.root().join("images/debian-12/x86_64/modules.cpio.zst"),
        b"m",
    )
    .unwrap();
    let r = s.get(&format!("/ipxe?mac={MAC}"));
    r.assert_told_to_wait_because("run `cargo xtask build-stack`");
    // Replies name what is missing as the operator knows it, never a host path.
    let host = s.root().to_str().unwrap();
    assert!(!r.text().contains(host), "{}", r.text());
    std::fs::write(s.root().join("initrds/x86_64/initrd.img"), b"i").unwrap();
    let token = s.boot();
    std::fs::remove_file(s.root().join("images/debian-12/x86_64/manifest.json")).unwrap();
    std::fs::remove_file(s.root().join("images/debian-12/x86_64/vmlinuz")).unwrap();
    for target in [
        format!("/config/{MAC}?token={token}"),
        format!("/ipxe?mac={MAC}"),
    ] {
        let r = s.get(&target);
        assert!(
            r.text().contains("images/debian-12/x86_64/"),
            "{}",
            r.text()
        );
        assert!(!r.text().contains(host), "{target}: {}", r.text());
    }
}

/// Boot once: the installer until an `installed` event, the local disk after it, also after a
/// restart of the stack.
#[test]
fn boot_once_flow() {
    let mut s = Stack::new();
    let token = s.boot();
    for (phase, state) in [
        ("installing", "installing"),
        ("rootfs", "installing"),
        ("installed", "installed"),
    ] {
        let r = s.post_event(&token, &format!(r#"{{"phase":"{phase}","message":"m"}}"#));
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["state"], state);
    }
    let local = s.get(&format!("/ipxe?mac={MAC}"));
    assert_eq!(local.status, 200);
    let t = local.text();
    assert!(
        !t.contains("kernel "),
        "installed VM got the installer again: {t}"
    );
    assert!(
        t.contains("sanboot --no-describe --drive 0x80") && t.contains("exit 1"),
        "{t}"
    );

    s.restart();
    let t = s.ipxe();
    assert!(t.contains("sanboot"), "state lost across a restart: {t}");

    let timeline = s.control_json("/vms/t1/timeline");
    let phases: Vec<&str> = timeline
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["phase"].as_str().unwrap())
        .collect();
    assert_eq!(
        phases,
        [
            "ipxe",
            "installing",
            "rootfs",
            "installed",
            "local-boot",
            "local-boot"
        ]
    );
    assert!(timeline[0]["at_ms"].as_u64().unwrap() > 1_600_000_000_000);
}

/// Installs t1: the installer is handed out, then `installed` is reported.
fn install(s: &common::Stack) {
    let token = s.boot();
    s.post_event(&token, r#"{"phase":"installing"}"#);
    let r = s.post_event(&token, r#"{"phase":"installed"}"#);
    assert_eq!(r.json()["state"], "installed");
    assert!(s.ipxe().contains("sanboot"));
}

#[test]
fn reprovision_on_the_control_socket_installs_again() {
    let mut s = Stack::new();
    install(&s);
    let r = s.control("POST", "/vms/t1/reprovision");
    assert_eq!(r.status, 200, "{}", r.text());
    let status: pxelab_contract::VmStatus = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(
        (status.name.as_str(), status.mac.to_string()),
        ("t1", MAC.to_string())
    );
    assert_eq!(status.state, pxelab_contract::VmState::New);
    let last = status.last_event.expect("the reset is the last event");
    assert_eq!(last.event.phase, pxelab_contract::Phase::Reprovision);
    assert_eq!(status.since_ms, Some(last.at_ms));
    assert_eq!(s.control_json("/status")["vms"][0]["state"], "new");
    // The reset outlives a restart, and the next boot is an install.
    s.restart();
    let t = s.ipxe();
    assert!(t.contains("kernel ") && !t.contains("sanboot"), "{t}");
    assert_eq!(
        s.phases("t1"),
        [
            "ipxe",
            "installing",
            "installed",
            "local-boot",
            "reprovision",
            "ipxe"
        ]
    );
}

/// The reprovision nonce lets the installer wipe a used disk: in `/config` from the operator's
/// reprovision until `installed` (a restart in between included), never before or after.
#[test]
fn config_carries_a_wipe_nonce_only_between_reprovision_and_installed() {
    let mut s = Stack::new();
    let wipe = |s: &common::Stack, token: &str| {
        let r = s.get(&format!("/config/{MAC}?token={token}"));
        assert_eq!(r.status, 200, "{}", r.text());
        r.json().get("wipe").cloned()
    };
    let token = s.boot();
    assert_eq!(wipe(&s, &token), None, "a first install gets none");
    s.post_event(&token, r#"{"phase":"installing"}"#);
    s.post_event(&token, r#"{"phase":"installed"}"#);

    s.control("POST", "/vms/t1/reprovision");
    let token = s.boot();
    let first = wipe(&s, &token).expect("a nonce after the reprovision");
    let first = first.as_str().unwrap().to_string();
    assert_eq!(first.len(), 32, "{first}");
    s.post_event(&token, r#"{"phase":"installing"}"#);
    s.post_event(&token, r#"{"phase":"failed","message":"disk: x"}"#);
    s.restart();
    let token = s.boot();
    assert_eq!(
        wipe(&s, &token).and_then(|w| w.as_str().map(str::to_string)),
        Some(first.clone()),
        "kept across a failed install and a restart"
    );
    s.post_event(&token, r#"{"phase":"installing"}"#);
    s.post_event(&token, r#"{"phase":"installed"}"#);
    s.control("POST", "/vms/t1/reprovision");
    let second = wipe(&s, &s.boot()).expect("a new nonce for a new reprovision");
    assert_ne!(second.as_str(), Some(first.as_str()));

    // Installed: the next install (the operator asked none) may not wipe.
    let token = s.boot();
    s.post_event(&token, r#"{"phase":"installing"}"#);
    s.post_event(&token, r#"{"phase":"installed"}"#);
    // Over the network the token no longer opens the config; the operator's socket shows it.
    let installed_wipe = |s: &common::Stack| {
        let r = s.control("GET", &format!("/config/{MAC}"));
        assert_eq!(r.status, 200, "{}", r.text());
        r.json().get("wipe").cloned()
    };
    assert_eq!(installed_wipe(&s), None);
    s.restart();
    assert_eq!(installed_wipe(&s), None, "still none after a restart");
}

#[test]
fn reprovision_is_not_served_over_the_network() {
    let s = Stack::new();
    install(&s);
    let r = s.send("POST", "/vms/t1/reprovision", b"");
    assert_eq!(r.status, 404, "{}", r.text());
    r.assert_one_line();
    assert!(!r.text().contains("reprovision,"), "{}", r.text());
    // Nor through the events a machine may post.
    let r = s.send(
        "POST",
        &format!("/events/{MAC}"),
        br#"{"phase":"reprovision"}"#,
    );
    assert_eq!(r.status, 400, "{}", r.text());
    r.assert_one_line();
    assert!(
        s.ipxe().contains("sanboot"),
        "a network client reset an installed VM"
    );
}

#[test]
fn reprovision_of_an_unknown_vm_is_404() {
    let s = Stack::new();
    let r = s.control("POST", "/vms/nobody/reprovision");
    assert_eq!(r.status, 404);
    r.assert_one_line();
    assert!(r.text().contains("nobody"), "{}", r.text());
    let r = s.control("GET", "/vms/t1/reprovision");
    assert_eq!((r.status, r.header("Allow")), (405, Some("POST")));
    // The control socket lists its own route among the endpoints.
    assert!(s
        .control("GET", "/nope")
        .text()
        .contains("/vms/<name>/reprovision"));
    assert_eq!(s.control_json("/vms/t1/timeline"), serde_json::json!([]));
}

#[test]
fn failed_install_boots_the_installer_again() {
    let s = Stack::new();
    let token = s.boot();
    let r = s.post_event(&token, r#"{"phase":"failed","message":"disk too small"}"#);
    assert_eq!(r.json()["state"], "failed");
    assert!(s.ipxe().contains("kernel "));
    assert_eq!(s.control_json("/status")["vms"][0]["state"], "booting");
}

#[test]
fn pxeboot_false_always_boots_locally() {
    let s = Stack::new();
    let vm = s.root().join("vms/t1.json");
    let text = std::fs::read_to_string(&vm)
        .unwrap()
        .replace("\"pxeboot\": true", "\"pxeboot\": false");
    std::fs::write(&vm, text).unwrap();
    assert!(s.ipxe().contains("sanboot"));
}

#[test]
fn boot_ipxe_chains_with_the_mac() {
    let s = Stack::new();
    let r = s.get("/boot.ipxe");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "#!ipxe\nchain http://pxe.test/ipxe?mac=${mac}\n");
}

#[test]
fn host_header_is_validated() {
    let s = Stack::new();
    let ask = |host: &str| {
        s.raw(&format!(
            "GET /boot.ipxe HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        ))
        .text()
    };
    assert!(ask("10.1.2.3:8080").contains("http://10.1.2.3:8080/ipxe"));
    assert!(ask("[fd00::1]:80").contains("http://[fd00::1]:80/ipxe"));
    // Anything else falls back to the advertised address (10.0.0.1 in tests).
    for evil in ["evil.test/x", "a b", "x\"; shell", "-x", "evil.test#"] {
        let t = ask(evil);
        assert!(t.contains("chain http://10.0.0.1/ipxe"), "{evil}: {t}");
    }
    let t = s.raw("GET /boot.ipxe HTTP/1.0\r\n\r\n").text();
    assert!(t.contains("chain http://10.0.0.1/ipxe"), "{t}");
}

#[test]
fn config_for_a_known_vm() {
    let s = Stack::new();
    let token = s.boot();
    let r = s.get(&format!("/config/{}?token={token}", MAC.to_uppercase()));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("Content-Type"), Some("application/json"));
    let c = r.json();
    assert_eq!(c["name"], "t1");
    assert_eq!(c["hostname"], "t1");
    assert_eq!(c["mac"], MAC);
    assert_eq!(
        c["rootfs"]["url"],
        "http://pxe.test/images/debian-12/x86_64/rootfs.tar.zst"
    );
    assert_eq!(c["rootfs"]["sha256"], common::sha256_of(b"ROOTFS-TARBALL"));
    assert_eq!(c["rootfs"]["size"], 14);
    assert_eq!(c["cloud_init_url"], "http://pxe.test/cloud-init/t1/");
    assert_eq!(
        c["events_url"],
        format!("http://pxe.test/events/{MAC}?token={token}")
    );
    assert_eq!(c["reboot"], true);
    // The original's keys.
    assert_eq!(c["arch"], "x86_64");
    assert_eq!(c["rootfs_url"], c["rootfs"]["url"]);
    assert_eq!(
        c["kernel_url"],
        "http://pxe.test/images/debian-12/x86_64/vmlinuz"
    );
    assert_eq!(
        c["kmods_url"],
        "http://pxe.test/images/debian-12/x86_64/modules.cpio.zst"
    );
    assert_eq!(c["reboot_on_success"], true);
    // It is the contract type.
    let typed: pxelab_contract::InstallerConfig = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(typed.rootfs.size, 14);

    std::fs::write(s.root().join("vms/t1.noreboot"), b"").unwrap();
    let c = s.get(&format!("/config/{MAC}?token={token}")).json();
    assert_eq!(
        (c["reboot"].as_bool(), c["reboot_on_success"].as_bool()),
        (Some(false), Some(false))
    );
    assert!(c.get("disk_image").is_none(), "no image was pulled: {c}");

    // A pull that built the block image: the installer is told to write it instead.
    let img = s.root().join("images/debian-12/x86_64");
    let image = b"EXT4-IMAGE-ZSTD";
    std::fs::write(img.join("rootfs.img.zst"), image).unwrap();
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(img.join("manifest.json")).unwrap()).unwrap();
    manifest["disk_image_zst"] = serde_json::json!(
        {"file": "rootfs.img.zst", "sha256": common::sha256_of(image), "size": image.len()}
    );
    std::fs::write(img.join("manifest.json"), manifest.to_string()).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let c = loop {
        let c = s.get(&format!("/config/{MAC}?token={token}")).json();
        if c.get("disk_image").is_some() || std::time::Instant::now() > deadline {
            break c;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(
        c["disk_image"],
        serde_json::json!({
            "url": "http://pxe.test/images/debian-12/x86_64/rootfs.img.zst",
            "sha256": common::sha256_of(image),
            "size": image.len(),
        })
    );
    assert_eq!(
        c["rootfs_url"], c["rootfs"]["url"],
        "the tarball stays named"
    );
}

#[test]
fn config_errors() {
    let s = Stack::new();
    let r = s.get("/config/not-a-mac");
    assert_eq!(r.status, 400);
    r.assert_one_line();
    let r = s.get("/config/52:54:00:00:00:99");
    assert_eq!(r.status, 404);
    r.assert_one_line();
    let config = format!("/config/{MAC}?token={}", s.boot());
    let manifest = s.root().join("images/debian-12/x86_64/manifest.json");
    let good = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&manifest, good.replace("\"size\":14", "\"size\":15")).unwrap();
    let r = s.get(&config);
    assert_eq!(r.status, 500);
    assert!(
        r.text().contains("14 bytes but the manifest says 15"),
        "{}",
        r.text()
    );
    std::fs::write(&manifest, "{").unwrap();
    assert_eq!(s.get(&config).status, 500);
    std::fs::remove_file(&manifest).unwrap();
    let r = s.get(&config);
    assert_eq!(r.status, 503);
    r.assert_one_line();
    assert!(r.text().contains("not pulled"), "{}", r.text());
}

#[test]
fn cloud_init_documents() {
    let s = Stack::new();
    for doc in ["meta-data", "user-data", "network-config", "vendor-data"] {
        let r = s.get(&format!("/cloud-init/t1/{doc}"));
        assert_eq!(r.status, 200, "{doc}");
        assert_eq!(r.header("Content-Type"), Some("text/yaml; charset=utf-8"));
    }
    let user = s.get("/cloud-init/t1/user-data").text();
    assert!(user.starts_with("#cloud-config\n"));
    assert!(
        user.contains(KEY)
            && user.contains("ssh_pwauth: false")
            && !user.replace("lock_passwd: true", "").contains("passw"),
        "{user}"
    );
    assert!(s
        .get("/cloud-init/t1/meta-data")
        .text()
        .contains("local-hostname: \"t1\""));
    assert!(s
        .get("/cloud-init/t1/network-config")
        .text()
        .contains(&format!("macaddress: \"{MAC}\"")));
    let r = s.get("/cloud-init/t1/passwords");
    assert_eq!(r.status, 404);
    r.assert_one_line();
    assert_eq!(s.get("/cloud-init/nobody/user-data").status, 404);
    assert_eq!(s.get("/cloud-init/t1").status, 404);
}

#[test]
fn cloud_init_only_for_the_reserved_ip() {
    let mut s = Stack::new();
    write_vm(s.root(), "t2", "52:54:00:aa:bb:02", Some("10.9.9.9"));
    write_vm(s.root(), "t3", "52:54:00:aa:bb:03", None);
    let r = s.get("/cloud-init/t2/user-data");
    assert_eq!(r.status, 403);
    r.assert_one_line();
    assert!(
        r.text().contains("10.9.9.9") && r.text().contains("--no-ip-check"),
        "{}",
        r.text()
    );
    // No reservation and no lease: nothing tells its requests apart from another host's.
    assert_eq!(s.get("/cloud-init/t3/user-data").status, 403);
    s.start(
        ServerOptions {
            access_log: false,
            ..ServerOptions::default()
        },
        false,
    );
    assert_eq!(s.get("/cloud-init/t2/user-data").status, 200);
    assert_eq!(s.get("/cloud-init/t3/user-data").status, 200);
}

#[test]
fn files_with_length_range_and_head() {
    let s = Stack::new();
    let path = "/images/debian-12/x86_64/vmlinuz";
    let r = s.get(path);
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"KERNEL-IMAGE-0123456789");
    assert_eq!(r.header("Content-Length"), Some("23"));
    assert_eq!(r.header("Accept-Ranges"), Some("bytes"));

    let range = |spec: &str| {
        s.raw(&format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nRange: {spec}\r\nConnection: close\r\n\r\n"
        ))
    };
    let r = range("bytes=7-11");
    assert_eq!(r.status, 206);
    assert_eq!(r.body, b"IMAGE");
    assert_eq!(r.header("Content-Range"), Some("bytes 7-11/23"));
    assert_eq!(r.header("Content-Length"), Some("5"));
    let r = range("bytes=13-");
    assert_eq!(
        (r.status, r.body.as_slice()),
        (206, b"0123456789".as_slice())
    );
    let r = range("bytes=-4");
    assert_eq!((r.status, r.body.as_slice()), (206, b"6789".as_slice()));
    let r = range("bytes=23-");
    assert_eq!(r.status, 416);
    assert_eq!(r.header("Content-Range"), Some("bytes */23"));
    r.assert_one_line();
    let r = range("bytes=0-1,4-5");
    assert_eq!((r.status, r.body.len()), (200, 23));

    let r = s.raw(&format!(
        "HEAD {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    ));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("Content-Length"), Some("23"));
    assert!(r.body.is_empty());
    let r = s.raw(&format!(
        "HEAD {path} HTTP/1.1\r\nHost: x\r\nRange: bytes=0-3\r\nConnection: close\r\n\r\n"
    ));
    assert_eq!((r.status, r.header("Content-Length")), (206, Some("4")));
    assert!(r.body.is_empty());

    let r = s.get("/initrds/x86_64/initrd.img");
    assert_eq!(
        (r.status, r.body.as_slice()),
        (200, b"INSTALLER-INITRD".as_slice())
    );
    assert_eq!(s.get("/initrds/x86_64/missing").status, 404);
    assert_eq!(
        s.get("/images/debian-12").status,
        404,
        "directories are not served"
    );
}

#[test]
fn files_stay_inside_their_roots() {
    let s = Stack::new();
    let secret = s.root().join("state/secret");
    std::fs::write(&secret, b"TOP-SECRET").unwrap();
    std::os::unix::fs::symlink(&secret, s.root().join("images/debian-12/x86_64/link-out")).unwrap();
    std::os::unix::fs::symlink(s.root().join("state"), s.root().join("initrds/dir-out")).unwrap();
    std::os::unix::fs::symlink("vmlinuz", s.root().join("images/debian-12/x86_64/link-in"))
        .unwrap();
    std::fs::write(s.root().join("images/.hidden"), b"h").unwrap();
    for target in [
        "/images/../state/secret",
        "/images/%2e%2e/state/secret",
        "/images/%2E%2E/state/secret",
        "/images/.%2e/state/secret",
        "/images/debian-12%2f..%2f..%2fstate%2fsecret",
        "/images/..%5cstate%5csecret",
        "/images/..\\state\\secret",
        "/images/debian-12/x86_64/link-out",
        "/initrds/dir-out/secret",
        "/images/%00",
        "/images//state/secret",
        "/images/.hidden",
        "/initrds/%252e%252e/state/secret",
    ] {
        let r = s.get(target);
        assert!(
            matches!(r.status, 400 | 404),
            "{target}: {} {}",
            r.status,
            r.text()
        );
        assert!(!r.text().contains("TOP-SECRET"), "{target} leaked the file");
        r.assert_one_line();
    }
    // A symlink that stays inside the root is fine.
    assert_eq!(s.get("/images/debian-12/x86_64/link-in").status, 200);
}

#[test]
fn events_are_validated() {
    let s = Stack::new();
    let events = format!("/events/{MAC}?token={}", s.boot());
    let r = s.send("POST", "/events/bogus", br#"{"phase":"rootfs"}"#);
    assert_eq!(r.status, 400);
    r.assert_one_line();
    let r = s.send(
        "POST",
        "/events/52:54:00:00:00:99",
        br#"{"phase":"rootfs"}"#,
    );
    assert_eq!(r.status, 404);
    for body in [
        &b"not json"[..],
        br#"{"phase":"bogus"}"#,
        br#"{"message":"no phase"}"#,
        b"",
        br#"{"phase":"rootfs","bytes_done":-1}"#,
    ] {
        let r = s.send("POST", &events, body);
        assert_eq!(r.status, 400, "{:?}", String::from_utf8_lossy(body));
        r.assert_one_line();
    }
    let big = vec![b' '; 16 * 1024 + 1];
    let r = s.send("POST", &events, &big);
    assert_eq!(r.status, 413);
    r.assert_one_line();
    // Chunked bodies are refused with a reason, not misread.
    let r = s.raw(&format!("POST {events} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"));
    assert_eq!(r.status, 411);
    // Nothing above reached the timeline (only the boot that handed out the token).
    assert_eq!(s.phases("t1"), ["ipxe"]);

    let r = s.send(
        "POST",
        &events,
        br#"{"phase":"rootfs","bytes_done":10,"bytes_total":100,"elapsed_ms":5}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let timeline: Vec<pxelab_contract::TimelineEntry> =
        serde_json::from_slice(&s.control("GET", "/vms/t1/timeline").body).unwrap();
    let [_, entry] = timeline.as_slice() else {
        panic!("{timeline:?}")
    };
    assert_eq!(
        (entry.event.bytes_done, entry.event.bytes_total),
        (Some(10), Some(100))
    );
}

#[test]
fn expect_continue_is_honoured() {
    let s = Stack::new();
    let body = br#"{"phase":"installing"}"#;
    let token = s.boot();
    let mut stream = std::net::TcpStream::connect(s.addr).unwrap();
    use std::io::{Read, Write};
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    write!(stream, "POST /events/{MAC}?token={token} HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len()).unwrap();
    let mut first = [0u8; 25];
    stream.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"HTTP/1.1 100 Continue\r\n\r\n");
    stream.write_all(body).unwrap();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).unwrap();
    assert_eq!(common::parse_reply(&rest).unwrap().status, 200);
}

#[test]
fn status_lists_vms_and_invalid_files() {
    let s = Stack::new();
    write_vm(s.root(), "t2", "52:54:00:aa:bb:02", Some("10.9.9.9"));
    std::fs::write(s.root().join("vms/broken.json"), b"{").unwrap();
    write_vm(s.root(), "u-dup", MAC, None);
    let misnamed = write_vm(s.root(), "x1", "52:54:00:aa:bb:05", None);
    std::fs::rename(misnamed, s.root().join("vms/other.json")).unwrap();
    let r = s.control("GET", "/status");
    assert_eq!(r.status, 200);
    let st: pxelab_contract::StackStatus = serde_json::from_slice(&r.body).unwrap();
    let names: Vec<&str> = st.vms.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["t1", "t2"]);
    assert_eq!(st.vms[1].ip, Some("10.9.9.9".parse().unwrap()));
    assert_eq!(st.vms[1].state, pxelab_contract::VmState::New);
    let bad: Vec<(&str, &str)> = st
        .invalid
        .iter()
        .map(|i| (i.file.as_str(), i.error.as_str()))
        .collect();
    assert_eq!(bad.len(), 3, "{bad:?}");
    assert_eq!(bad[0].0, "broken.json");
    assert_eq!(bad[2].0, "u-dup.json");
    assert!(
        bad[2]
            .1
            .contains("MAC 52:54:00:aa:bb:01 is already used by t1.json"),
        "{bad:?}"
    );
    assert_eq!(bad[1].0, "other.json");
    assert!(bad[1].1.contains("must be named x1.json"), "{bad:?}");
}

#[test]
fn vm_changes_apply_without_restart() {
    let s = Stack::new();
    assert_eq!(s.get("/ipxe?mac=52:54:00:aa:bb:07").status, 404);
    write_vm(s.root(), "t7", "52:54:00:aa:bb:07", None);
    assert_eq!(s.get("/ipxe?mac=52:54:00:aa:bb:07").status, 200);
    std::fs::remove_file(s.root().join("vms/t7.json")).unwrap();
    assert_eq!(s.get("/ipxe?mac=52:54:00:aa:bb:07").status, 404);
}

#[test]
fn timeline_of_unknown_vm_is_404() {
    let s = Stack::new();
    assert_eq!(s.control("GET", "/vms/nobody/timeline").status, 404);
    assert_eq!(s.control_json("/vms/t1/timeline"), serde_json::json!([]));
}

#[test]
fn keep_alive_serves_several_requests_on_one_connection() {
    let s = Stack::new();
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(s.addr).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut all = Vec::new();
    stream.read_to_end(&mut all).unwrap();
    let text = String::from_utf8_lossy(&all);
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 2, "{text}");
}

#[test]
fn kernel_fetch_from_the_vms_address_is_on_the_timeline() {
    let s = Stack::new();
    let kernel = "/images/debian-12/x86_64/vmlinuz";
    let head = s.raw(&format!(
        "HEAD {kernel} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    ));
    assert_eq!(head.status, 200);
    assert_eq!(
        s.get("/images/debian-12/x86_64/modules.cpio.zst").status,
        200
    );
    assert_eq!(
        s.control_json("/vms/t1/timeline"),
        serde_json::json!([]),
        "only a GET of the kernel counts"
    );
    assert_eq!(s.get(kernel).status, 200);
    let timeline = s.control_json("/vms/t1/timeline");
    assert_eq!(timeline.as_array().unwrap().len(), 1, "{timeline}");
    assert_eq!(timeline[0]["phase"], "kernel");
    // An observation: the state does not move.
    assert_eq!(s.control_json("/status")["vms"][0]["state"], "new");
}

/// Among a thousand definitions, a file replaced by rename (how tools write) and a removed
/// file are live for the very next request.
#[test]
fn vm_edits_apply_at_once_among_a_thousand() {
    let s = Stack::new();
    for i in 0..1000 {
        write_vm(
            s.root(),
            &format!("m{i}"),
            &format!("52:54:00:10:{:02x}:{:02x}", i / 256, i % 256),
            None,
        );
    }
    assert_eq!(s.get("/ipxe?mac=52:54:00:10:03:e7").status, 200, "m999");
    let tmp = s.root().join("vms/.m5.json.tmp");
    std::fs::write(
        &tmp,
        r#"{"name":"m5","arch":"x86_64","distro":"debian-12","mac":"52:54:00:20:00:05"}"#,
    )
    .unwrap();
    std::fs::rename(&tmp, s.root().join("vms/m5.json")).unwrap();
    assert_eq!(s.get("/ipxe?mac=52:54:00:20:00:05").status, 200);
    assert_eq!(s.get("/ipxe?mac=52:54:00:10:00:05").status, 404);
    std::fs::remove_file(s.root().join("vms/m5.json")).unwrap();
    assert_eq!(s.get("/ipxe?mac=52:54:00:20:00:05").status, 404);
    assert_eq!(
        s.control_json("/status")["vms"].as_array().unwrap().len(),
        1000
    );
}
