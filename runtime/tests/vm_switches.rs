//! What the boot handler makes of a VM definition's boot switches: the debug switches that
//! `lab vm start --installer-shell / --no-reboot` store, and a VM file written the way the
//! original pvmlab writes it (no `pxeboot` key for a disk-mode VM).

mod common;

use common::{Stack, KEY, MAC};

/// Rewrites `t1.json` through `edit` on its JSON value.
fn edit_t1(s: &Stack, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = s.root().join("vms/t1.json");
    let mut vm: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut vm);
    std::fs::write(&path, serde_json::to_string_pretty(&vm).unwrap()).unwrap();
}

#[test]
fn installer_shell_boots_the_installer_in_shell_mode_even_once_installed() {
    let s = Stack::new();
    let plain = s.ipxe();
    assert!(!plain.contains("pxelab.mode=shell"), "{plain}");
    let token = s.boot();
    s.post_event(&token, r#"{"phase":"installing"}"#);
    s.post_event(&token, r#"{"phase":"installed"}"#);
    assert!(s.ipxe().contains("sanboot"));

    edit_t1(&s, |vm| vm["installer_shell"] = true.into());
    let t = s.ipxe();
    let token = common::token_in(&t).unwrap_or_else(|| panic!("no boot token in {t}"));
    assert!(
        t.contains(&format!(
            "config_url=http://pxe.test/config/52:54:00:aa:bb:01?token={token} pxelab.mode=shell initrd=initrd.img"
        )),
        "{t}"
    );
    assert_eq!(
        s.state(),
        "installed",
        "a shell boot does not reset the install"
    );

    edit_t1(&s, |vm| {
        vm.as_object_mut().unwrap().remove("installer_shell");
    });
    assert!(s.ipxe().contains("sanboot"));
}

#[test]
fn no_reboot_reaches_the_installer_config() {
    let s = Stack::new();
    let config = || {
        let token = s.boot();
        s.get(&format!("/config/{MAC}?token={token}")).json()
    };
    assert_eq!(config()["reboot"], true);
    edit_t1(&s, |vm| vm["no_reboot"] = true.into());
    assert_eq!(config()["reboot"], false);
    assert_eq!(config()["reboot_on_success"], false);
}

#[test]
fn firmware_reboot_reaches_the_installer_config() {
    let s = Stack::new();
    let config = || {
        let token = s.boot();
        s.get(&format!("/config/{MAC}?token={token}")).json()
    };
    assert_eq!(
        config()["direct_start"],
        true,
        "starting the installed system directly is the default"
    );
    edit_t1(&s, |vm| vm["firmware_reboot"] = true.into());
    let config = config();
    // Absent is false (older installers read it so too): a firmware reboot.
    assert!(
        config.get("direct_start").is_none(),
        "direct_start still set: {config}"
    );
    assert_eq!(
        config["reboot"], true,
        "with a firmware reboot the installer still reboots"
    );
}

/// pvmlab's `vm create` without `--pxeboot` (a disk-mode VM booting its cloud image) writes no
/// `pxeboot` key. Installing over it would wipe the VM: the stack sends it to its disk.
#[test]
fn an_upstream_disk_mode_vm_boots_its_disk() {
    let s = Stack::new();
    let upstream = format!(
        r#"{{
  "name": "t1",
  "role": "target",
  "arch": "x86_64",
  "ip": "127.0.0.1",
  "subnet": "127.0.0.0/8",
  "mac": "{MAC}",
  "distro": "debian-12",
  "ssh_key": "{KEY}\n",
  "kernel": "vmlinuz",
  "initrd": "initrd.img"
}}
"#
    );
    std::fs::write(s.root().join("vms/t1.json"), upstream).unwrap();
    let r = s.get(&format!("/ipxe?mac={MAC}"));
    assert_eq!(r.status, 200, "{}", r.text());
    let t = r.text();
    assert!(
        t.contains("booting from the local disk") && t.contains("exit 1"),
        "{t}"
    );
    assert!(!t.contains("kernel "), "the installer was offered: {t}");
    let timeline = s.control_json("/vms/t1/timeline");
    assert_eq!(timeline[0]["phase"], "local-boot", "{timeline}");
    assert!(
        timeline[0]["message"]
            .as_str()
            .unwrap()
            .contains("pxeboot is false"),
        "{timeline}"
    );
}
