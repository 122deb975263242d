//! Who may read and change what: the per-boot token on `/config` and `/events`, the machine's
//! own address for its boot and cloud-init documents, status and timelines on the control socket
//! only, and what event messages may carry to an operator's terminal.

mod common;

use std::net::Ipv4Addr;

use common::{raw_from, token_in, write_vm, Stack, MAC};

/// Another host on the lab network, as far as the stack can tell (t1 is 127.0.0.1).
const ROGUE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

fn post_from(s: &Stack, from: Ipv4Addr, target: &str, body: &str) -> common::Reply {
    raw_from(
        from,
        s.addr,
        &format!(
            "POST {target} HTTP/1.1\r\nHost: pxe.test\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
}

fn get_from(s: &Stack, from: Ipv4Addr, target: &str) -> common::Reply {
    raw_from(
        from,
        s.addr,
        &format!("GET {target} HTTP/1.1\r\nHost: pxe.test\r\nConnection: close\r\n\r\n"),
    )
}

/// The issue's reproduction: an unrelated host posts `installed` for a machine that is being
/// installed. It is refused, and the machine is still handed its installer.
#[test]
fn another_host_cannot_set_a_machines_state() {
    let s = Stack::new();
    let token = s.boot();
    for target in [
        format!("/events/{MAC}"),
        format!("/events/{MAC}?token="),
        format!("/events/{MAC}?token={}", "0".repeat(32)),
        format!("/events/{MAC}?token={}", &token[..31]),
    ] {
        let r = post_from(&s, ROGUE, &target, r#"{"phase":"installed"}"#);
        assert_eq!(r.status, 403, "{target}: {}", r.text());
        r.assert_one_line();
        assert!(r.text().contains("token"), "{}", r.text());
        let r = post_from(&s, ROGUE, &target, r#"{"phase":"failed"}"#);
        assert_eq!(r.status, 403, "{target}: {}", r.text());
    }
    assert_eq!(s.state(), "booting");
    assert!(s.ipxe().contains("kernel "), "the machine lost its install");
    assert_eq!(s.phases("t1"), ["ipxe", "ipxe"]);
}

#[test]
fn installed_is_accepted_only_from_installing_with_the_current_token() {
    let s = Stack::new();
    let token = s.boot();
    let r = s.post_event(&token, r#"{"phase":"installed"}"#);
    assert_eq!(r.status, 409, "{}", r.text());
    r.assert_one_line();
    assert!(r.text().contains("booting"), "{}", r.text());
    assert_eq!(
        s.post_event(&token, r#"{"phase":"installing"}"#).status,
        200
    );
    // A new boot replaces the token: the old installer's events no longer count.
    let second = s.boot();
    assert_ne!(second, token);
    assert_eq!(
        s.post_event(&token, r#"{"phase":"installing"}"#).status,
        403
    );
    assert_eq!(
        s.post_event(&second, r#"{"phase":"installing"}"#).status,
        200
    );
    let r = s.post_event(
        &second,
        r#"{"phase":"installed","host_keys":["ssh-ed25519 AAAA"]}"#,
    );
    assert_eq!(
        (r.status, r.json()["state"].as_str()),
        (200, Some("installed"))
    );
    // The installer's retry when that answer was lost is acknowledged the same way, and not
    // recorded again (nor are other host keys taken from it).
    let r = s.post_event(
        &second,
        r#"{"phase":"installed","host_keys":["ssh-ed25519 BBBB"]}"#,
    );
    assert_eq!(
        (r.status, r.json()["state"].as_str()),
        (200, Some("installed")),
        "{}",
        r.text()
    );
    let installed = |s: &Stack| s.phases("t1").iter().filter(|p| *p == "installed").count();
    assert_eq!(installed(&s), 1, "{:?}", s.phases("t1"));
    let timeline = s.control_json("/vms/t1/timeline");
    assert!(
        !timeline.to_string().contains("BBBB"),
        "the repeat's host keys were recorded: {timeline}"
    );
    assert_eq!(
        s.post_event(&token, r#"{"phase":"installed"}"#).status,
        403,
        "an older boot's token still counts for nothing"
    );
    // The installed system reports cloud-init-done with the URL its installer was given, and
    // booting from disk keeps that token valid for that report.
    assert!(s.ipxe().contains("sanboot"));
    let r = s.post_event(&second, r#"{"phase":"cloud-init-done","message":"ok"}"#);
    assert_eq!(
        (r.status, r.json()["state"].as_str()),
        (200, Some("installed"))
    );
    // But the token stays readable in the installed system (its kernel command line): there it
    // neither posts other events nor opens the install config, which it could while installing.
    for phase in ["installing", "failed", "rootfs"] {
        let r = s.post_event(&second, &format!(r#"{{"phase":"{phase}"}}"#));
        assert_eq!(r.status, 409, "{phase}: {}", r.text());
        r.assert_one_line();
        assert!(
            r.text().contains("only reports cloud-init-done")
                && r.text().contains("reprovision t1"),
            "{}",
            r.text()
        );
    }
    let r = s.get(&format!("/config/{}?token={second}", MAC));
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.text().contains("t1 is installed"), "{}", r.text());
    assert_eq!(s.state(), "installed");
    // The control socket (the operator's) still reads it.
    assert_eq!(s.control("GET", &format!("/config/{}", MAC)).status, 200);
    // A reprovision forgets it.
    assert_eq!(s.control("POST", "/vms/t1/reprovision").status, 200);
    assert_eq!(s.post_event(&second, r#"{"phase":"seed"}"#).status, 403);
}

#[test]
fn the_config_needs_the_token_and_hands_it_on_in_its_events_url() {
    let mut s = Stack::new();
    let r = s.get(&format!("/config/{MAC}"));
    assert_eq!(r.status, 403, "{}", r.text());
    r.assert_one_line();
    let token = s.boot();
    // The URL the kernel command line carries, as the installer uses it.
    let script = s.ipxe();
    let token2 = token_in(&script).unwrap();
    assert_ne!(token, token2);
    assert!(
        script.contains(&format!(
            " BOOTIF=01-52-54-00-aa-bb-01 config_url=http://pxe.test/config/{MAC}?token={token2} "
        )),
        "{script}"
    );
    assert_eq!(
        s.get(&format!("/config/{MAC}?token={token}")).status,
        403,
        "an earlier boot's token"
    );
    let c = s.get(&format!("/config/{MAC}?token={token2}")).json();
    assert_eq!(
        c["events_url"],
        format!("http://pxe.test/events/{MAC}?token={token2}")
    );
    // The operator's socket needs no token.
    let r = s.control("GET", &format!("/config/{MAC}"));
    assert_eq!(r.status, 200, "{}", r.text());
    // The token is part of the machine's durable state.
    s.restart();

    assert_eq!(s.get(&format!("/config/{MAC}?token={token2}")).status, 200);
    assert_eq!(s.post_event(&token2, r#"{"phase":"disk"}"#).status, 200);
}

#[test]
fn a_machine_is_handed_its_boot_only_at_its_own_address() {
    let s = Stack::new();
    let r = get_from(&s, ROGUE, &format!("/ipxe?mac={MAC}"));
    r.assert_told_to_wait_because("served only to its address 127.0.0.1, not 127.0.0.2");
    assert_eq!(token_in(&r.text()), None, "{}", r.text());
    assert_eq!(s.state(), "new", "a refused boot is not a boot");
    // A local boot hands nothing out: anyone may see it.
    let token = s.boot();
    s.post_event(&token, r#"{"phase":"installing"}"#);
    s.post_event(&token, r#"{"phase":"installed"}"#);
    let r = get_from(&s, ROGUE, &format!("/ipxe?mac={MAC}"));
    assert!(r.text().contains("sanboot"), "{}", r.text());
}

#[test]
fn status_and_timelines_are_served_only_on_the_control_socket() {
    let s = Stack::new();
    for target in ["/status", "/vms/t1/timeline"] {
        let r = s.get(target);
        assert_eq!(r.status, 404, "{target}: {}", r.text());
        r.assert_one_line();
        let listed = r
            .text()
            .split("endpoints:")
            .nth(1)
            .unwrap_or("")
            .to_string();
        assert!(!listed.contains(target), "{}", r.text());
        assert_eq!(s.control("GET", target).status, 200, "{target}");
    }
    let listed = s.control("GET", "/nope").text();
    assert!(
        listed.contains("/status") && listed.contains("/vms/<name>/timeline"),
        "{listed}"
    );
}

/// A VM without a reserved address gets its documents only at the address of its DHCP lease.
#[test]
fn cloud_init_of_a_vm_without_ip_goes_to_its_lease_only() {
    let s = Stack::new();
    write_vm(s.root(), "t3", "52:54:00:aa:bb:03", None);
    let r = s.get("/cloud-init/t3/user-data");
    assert_eq!(r.status, 403, "{}", r.text());
    r.assert_one_line();
    assert!(r.text().contains("no DHCP lease"), "{}", r.text());
    let leases = &s.context.as_ref().unwrap().leases;
    leases.set(
        "52:54:00:aa:bb:03".parse().unwrap(),
        Ipv4Addr::new(127, 0, 0, 3),
    );
    assert_eq!(s.get("/cloud-init/t3/user-data").status, 403);
    let r = get_from(&s, Ipv4Addr::new(127, 0, 0, 3), "/cloud-init/t3/user-data");
    assert_eq!(r.status, 200, "{}", r.text());
}

/// proxyDHCP: the site's server leases the addresses, so a VM without `ip` is known by the
/// address its last `/ipxe` came from; its config, events and documents go there only.
#[test]
fn with_proxy_dhcp_a_vm_without_ip_is_known_by_the_address_of_its_boot() {
    let mut s = Stack::new();
    write_vm(s.root(), "t1", MAC, None);
    s.reconfigure(|c| c.proxy_dhcp = true);
    let site_leased = Ipv4Addr::new(127, 0, 0, 7);
    assert_eq!(
        get_from(&s, site_leased, "/cloud-init/t1/meta-data").status,
        403,
        "documents before any boot"
    );
    let script = get_from(&s, site_leased, &format!("/ipxe?mac={MAC}")).text();
    let token =
        token_in(&script).unwrap_or_else(|| panic!("no boot from the site's lease: {script}"));
    assert_eq!(
        get_from(&s, site_leased, "/cloud-init/t1/meta-data").status,
        200
    );
    let config = format!("/config/{MAC}?token={token}");
    let events = format!("/events/{MAC}?token={token}");
    assert_eq!(get_from(&s, site_leased, &config).status, 200);
    for r in [
        get_from(&s, ROGUE, "/cloud-init/t1/meta-data"),
        get_from(&s, ROGUE, &config),
        post_from(&s, ROGUE, &events, r#"{"phase":"installing"}"#),
    ] {
        assert_eq!(r.status, 403, "{}", r.text());
        r.assert_one_line();
        assert!(r.text().contains("127.0.0.7"), "{}", r.text());
    }
    assert_eq!(s.state(), "booting");
    let r = post_from(&s, site_leased, &events, r#"{"phase":"installing"}"#);
    assert_eq!(r.status, 200, "{}", r.text());
    // The next boot from another address moves the machine there: the old one loses it.
    let moved = Ipv4Addr::new(127, 0, 0, 8);
    let token = token_in(&get_from(&s, moved, &format!("/ipxe?mac={MAC}")).text()).unwrap();
    assert_eq!(
        get_from(&s, moved, &format!("/config/{MAC}?token={token}")).status,
        200
    );
    assert_eq!(
        get_from(&s, site_leased, &format!("/config/{MAC}?token={token}")).status,
        403
    );
}

/// Terminal escape sequences in messages never come back out, and a flood of long messages
/// keeps the timeline small.
#[test]
fn event_messages_are_cleaned_and_bounded() {
    let s = Stack::new();
    let token = s.boot();
    let evil =
        r#"{"phase":"installing","message":"\u001b]0;pwned\u0007\u001b[2J\u009b1mred\r\nline"}"#;
    assert_eq!(s.post_event(&token, evil).status, 200);
    let status = s.control("GET", "/status").text();
    assert!(
        !status.contains("\\u001b") && !status.contains("\\u0007") && !status.contains("\\u009b"),
        "{status}"
    );
    let last = &s.control_json("/status")["vms"][0]["last_event"]["message"];
    assert_eq!(last, "]0;pwned[2J1mred  line");
    let long = format!(
        r#"{{"phase":"rootfs","message":"{}"}}"#,
        "x".repeat(16 * 1024 - 40)
    );
    for _ in 0..300 {
        assert_eq!(s.post_event(&token, &long).status, 200);
    }
    let timeline = s.control("GET", "/vms/t1/timeline");
    assert!(
        timeline.body.len() < 256 * 1024,
        "timeline of {} bytes",
        timeline.body.len()
    );
    let entries = timeline.json();
    assert_eq!(
        entries[255]["message"].as_str().unwrap().len(),
        pxelab_contract::MAX_MESSAGE
    );
}
