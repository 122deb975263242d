//! The enrollment API (`/api/machines`): the operator token it requires, definitions written
//! whole and seen by the very next boot request, and refusals that leave the directory as it was.

mod common;

use std::{collections::BTreeMap, net::Ipv4Addr};

use common::{Reply, Stack, KEY};

const TOKEN: &str = "0123456789abcdef-operator";
const MAC2: &str = "52:54:00:aa:bb:02";

fn bearer() -> [(&'static str, String); 1] {
    [("Authorization", format!("Bearer {TOKEN}"))]
}

fn api(s: &Stack, method: &str, target: &str, body: &str) -> Reply {
    let [(name, value)] = bearer();
    s.send_with(method, target, &[(name, &value)], body.as_bytes())
}

/// A valid definition of `name`, as a lab user would send it.
fn definition(name: &str, mac: &str, ip: &str) -> serde_json::Value {
    serde_json::json!({
        "name": name, "arch": "x86_64", "distro": "debian-12", "mac": mac, "ip": ip,
        "ssh_key": KEY, "pxeboot": true,
    })
}

/// Every file of the VMs directory with its content.
fn vms_dir(s: &Stack) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(s.root().join("vms"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

/// `/ipxe` for `mac`, asked from `from` (the machine's own address).
fn ipxe_from(s: &Stack, from: Ipv4Addr, mac: &str) -> Reply {
    common::raw_from(
        from,
        s.addr,
        &format!("GET /ipxe?mac={mac} HTTP/1.1\r\nHost: pxe.test\r\nConnection: close\r\n\r\n"),
    )
}

#[test]
fn the_api_needs_the_operator_token() {
    let s = Stack::with_api_token(TOKEN);
    let r = s.get("/api/machines");
    assert_eq!(r.status, 401, "{}", r.text());
    r.assert_one_line();
    assert!(r.text().contains("Authorization: Bearer"), "{}", r.text());
    assert_eq!(r.header("WWW-Authenticate"), Some("Bearer"));
    for wrong in [
        "Bearer 0123456789abcdef-operatoR",
        "Bearer 0123456789abcdef-operato",
        "Basic 0123456789abcdef-operator",
        TOKEN,
    ] {
        let r = s.send_with("GET", "/api/machines", &[("Authorization", wrong)], b"");
        assert_eq!(r.status, 401, "{wrong}: {}", r.text());
    }
    let body = definition("t2", MAC2, "127.0.0.2").to_string();
    let before = vms_dir(&s);
    let r = s.send("PUT", "/api/machines/t2", body.as_bytes());
    assert_eq!(r.status, 401, "{}", r.text());
    let r = s.send("DELETE", "/api/machines/t1", b"");
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(
        vms_dir(&s),
        before,
        "a refused request changed the directory"
    );

    // The control socket is the stack's user's only: it needs no token.
    let r = s.control("GET", "/api/machines");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()[0]["name"], "t1");
}

#[test]
fn without_a_token_file_there_is_no_api() {
    let s = Stack::new();
    let [(name, value)] = bearer();
    for r in [
        s.get("/api/machines"),
        s.send_with("GET", "/api/machines", &[(name, &value)], b""),
        s.control("GET", "/api/machines"),
        s.send("DELETE", "/api/machines/t1", b""),
    ] {
        assert_eq!(r.status, 404, "{}", r.text());
        r.assert_one_line();
        assert!(
            r.text().contains("API is off") && r.text().contains("--api-token-file"),
            "{}",
            r.text()
        );
    }
    assert!(s.root().join("vms/t1.json").exists());
}

#[test]
fn get_lists_the_machines() {
    let s = Stack::with_api_token(TOKEN);
    let r = api(&s, "GET", "/api/machines", "");
    assert_eq!(r.status, 200, "{}", r.text());
    let list = r.json();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["name"], "t1");
    assert_eq!(list[0]["mac"], common::MAC);
    assert_eq!(list[0]["ip"], "127.0.0.1");
    // A file dropped into the directory is listed as well.
    common::write_vm(s.root(), "t3", "52:54:00:aa:bb:03", Some("10.0.0.3"));
    let names: Vec<String> = api(&s, "GET", "/api/machines", "")
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["t1", "t3"]);
    let r = api(&s, "GET", "/api/machines/t3", "");
    assert_eq!(
        (r.status, r.json()["mac"].as_str()),
        (200, Some("52:54:00:aa:bb:03"))
    );
    assert_eq!(api(&s, "GET", "/api/machines/nope", "").status, 404);
    let r = api(&s, "POST", "/api/machines", "");
    assert_eq!((r.status, r.header("Allow")), (405, Some("GET, HEAD")));
    let r = api(&s, "GET", "/api/nope", "");
    assert_eq!(r.status, 404);
    assert!(r.text().contains("/api/machines"), "{}", r.text());
}

#[test]
fn put_writes_the_definition_and_the_next_boot_request_sees_it() {
    let s = Stack::with_api_token(TOKEN);
    // Written with its keys out of order and no trailing newline: stored in canonical form.
    let body = r#"{"pxeboot":true,"mac":"52-54-00-AA-BB-02","name":"t2","arch":"x86_64","distro":"debian-12","ip":"127.0.0.2","ssh_key":"KEY"}"#
        .replace("KEY", KEY);
    let r = api(&s, "PUT", "/api/machines/t2", &body);
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.header("Location"), Some("/api/machines/t2"));
    assert_eq!(r.json()["mac"], MAC2);
    let file = s.root().join("vms/t2.json");
    let stored = std::fs::read_to_string(&file).unwrap();
    let canonical = pxelab_contract::VmDefinition::from_json(&body)
        .unwrap()
        .to_json();
    assert_eq!(stored, canonical);
    let files: Vec<String> = vms_dir(&s).into_keys().collect();
    assert_eq!(files, ["t1.json", "t2.json"], "temp files left behind");

    // At once, without waiting for any rescan: its install script.
    let r = ipxe_from(&s, Ipv4Addr::new(127, 0, 0, 2), MAC2);
    assert_eq!(r.status, 200, "{}", r.text());
    let t = r.text();
    assert!(
        t.contains("kernel http://pxe.test/images/debian-12/x86_64/vmlinuz")
            && t.contains("BOOTIF=01-52-54-00-aa-bb-02")
            && t.contains(&format!("config_url=http://pxe.test/config/{MAC2}?token=")),
        "{t}"
    );

    // The same name again replaces it (200), here with a new address.
    let moved = definition("t2", MAC2, "127.0.0.3").to_string();
    let r = api(&s, "PUT", "/api/machines/t2", &moved);
    assert_eq!(r.status, 200, "{}", r.text());
    let listed = api(&s, "GET", "/api/machines", "").json();
    assert_eq!(listed[1]["ip"], "127.0.0.3", "{listed}");
    let r = ipxe_from(&s, Ipv4Addr::new(127, 0, 0, 3), MAC2);
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn invalid_definitions_are_refused_with_the_reason_and_nothing_written() {
    let s = Stack::with_api_token(TOKEN);
    let good = definition("t2", MAC2, "127.0.0.2");
    let with = |key: &str, value: serde_json::Value| {
        let mut vm = good.clone();
        vm[key] = value;
        vm.to_string()
    };
    let cases = [
        (
            "not JSON",
            "{\"name\": \"t2\",".to_string(),
            400,
            "not a VM definition",
        ),
        (
            "bad MAC",
            with("mac", "52:54:00:zz:bb:02".into()),
            400,
            "52:54:00:zz:bb:02",
        ),
        (
            "bad distro",
            with("distro", "../etc".into()),
            400,
            "invalid distro",
        ),
        (
            "name mismatch",
            with("name", "t9".into()),
            400,
            "/api/machines/t9",
        ),
        (
            "MAC of t1",
            with("mac", common::MAC.into()),
            409,
            "is already used by VM t1",
        ),
        (
            "IP of t1",
            with("ip", "127.0.0.1".into()),
            409,
            "IP 127.0.0.1 is already used by VM t1",
        ),
        (
            "bad ipv6",
            with("ipv6", "ff02::1".into()),
            400,
            "invalid ipv6 ff02::1",
        ),
    ];
    let before = vms_dir(&s);
    for (what, body, status, reason) in cases {
        let r = api(&s, "PUT", "/api/machines/t2", &body);
        assert_eq!(r.status, status, "{what}: {}", r.text());
        r.assert_one_line();
        assert!(r.text().contains(reason), "{what}: {}", r.text());
        assert!(
            r.text().contains("nothing was written"),
            "{what}: {}",
            r.text()
        );
        assert_eq!(vms_dir(&s), before, "{what}: the directory changed");
    }
    // The path's name is checked as the body's is: no file outside the directory.
    let r = api(&s, "PUT", "/api/machines/..", &good.to_string());
    assert!((400..500).contains(&r.status), "{}", r.text());
    assert_eq!(vms_dir(&s), before);
    // t1 may keep its own MAC and IP when it is redefined.
    let mut t1 = definition("t1", common::MAC, "127.0.0.1");
    t1["ipv6"] = "fd00::5".into();
    assert_eq!(
        api(&s, "PUT", "/api/machines/t1", &t1.to_string()).status,
        200
    );
    // An IPv6 address is one VM's too.
    let r = api(
        &s,
        "PUT",
        "/api/machines/t2",
        &with("ipv6", "fd00::5".into()),
    );
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(
        r.text().contains("IP fd00::5 is already used by VM t1"),
        "{}",
        r.text()
    );
}

#[test]
fn delete_removes_the_machine() {
    let s = Stack::with_api_token(TOKEN);
    let body = definition("t2", MAC2, "127.0.0.2").to_string();
    assert_eq!(api(&s, "PUT", "/api/machines/t2", &body).status, 201);
    let r = api(&s, "DELETE", "/api/machines/t2", "");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["name"], "t2");
    assert!(!s.root().join("vms/t2.json").exists());
    let r = ipxe_from(&s, Ipv4Addr::new(127, 0, 0, 2), MAC2);
    assert_eq!(r.status, 404, "{}", r.text());
    let r = api(&s, "DELETE", "/api/machines/t2", "");
    assert_eq!(r.status, 404, "{}", r.text());
    r.assert_one_line();
    assert!(r.text().contains("no VM named \"t2\""), "{}", r.text());
    let names = api(&s, "GET", "/api/machines", "").json();
    assert_eq!(names.as_array().unwrap().len(), 1, "{names}");
}

/// Machines enrolled at the same moment with the same MAC: exactly one is written.
#[test]
fn concurrent_puts_of_one_mac_enroll_exactly_one_machine() {
    let s = Stack::with_api_token(TOKEN);
    let addr = s.addr;
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..8)
            .map(|i| {
                scope.spawn(move || {
                    let name = format!("c{i}");
                    let body = definition(&name, MAC2, &format!("10.0.1.{}", i + 1)).to_string();
                    let request = format!(
                        "PUT /api/machines/{name} HTTP/1.1\r\nHost: pxe.test\r\nConnection: close\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    common::raw_bytes(addr, request.as_bytes()).status
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    assert_eq!(
        statuses.iter().filter(|s| **s == 201).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 409).count(),
        7,
        "{statuses:?}"
    );
    let files: Vec<String> = vms_dir(&s).into_keys().collect();
    assert_eq!(files.len(), 2, "{files:?}");
    let listed = api(&s, "GET", "/api/machines", "").json();
    assert_eq!(listed.as_array().unwrap().len(), 2, "{listed}");
}
