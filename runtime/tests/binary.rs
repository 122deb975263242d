//! The `pxelab-stack` binary as a user runs it: help, startup errors, serving, SIGTERM.

mod common;

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pxelab-stack"));
    // The user's environment must not leak into what is tested.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("PXELAB_") {
            c.env_remove(k);
        }
    }
    c
}

/// The HTTP handler alone on a free loopback port, serving `dir`, with the enrollment API's
/// token file `dir/api-token` written first with `text` and `mode`.
fn with_token_file(dir: &Path, text: &str, mode: u32) -> Command {
    let token = dir.join("api-token");
    std::fs::write(&token, text).unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(mode)).unwrap();
    let mut c = bin();
    c.arg("--data-dir").arg(dir);
    c.args([
        "--no-dnsmasq",
        "--listen",
        "127.0.0.1:0",
        "--api-token-file",
    ]);
    c.arg(&token);
    c
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn help_explains_how_to_run_it() {
    let out = bin().arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "--vms-dir",
        "--images-dir",
        "--initrds-dir",
        "--state-dir",
        "--tftp-dir",
        "--listen",
        "--interface",
        "--server-ip",
        "--no-dnsmasq",
        "--no-ip-check",
        "--api-token-file",
        "/api/machines",
        "PXELAB_VMS_DIR",
        "Examples:",
        "/ipxe?mac=",
        "SIGTERM",
        "rootfs.tar.zst",
    ] {
        assert!(help.contains(needle), "--help lacks {needle}:\n{help}");
    }
}

#[test]
fn startup_errors_are_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&[&str], &str); 6] = [
        (
            &["--no-dnsmasq", "--listen", "127.0.0.1:0"],
            "VMs directory",
        ),
        // Never every address unless asked.
        (&["--no-dnsmasq"], "pass --server-ip"),
        (&["--listen", "127.0.0.1:0"], "--interface"),
        (
            &["--interface", "x", "--listen", "127.0.0.1:0"],
            "--server-ip",
        ),
        (
            &[
                "--interface",
                "x",
                "--server-ip",
                "10.0.0.1/99",
                "--listen",
                "127.0.0.1:0",
            ],
            "invalid --server-ip",
        ),
        (
            &["--no-dnsmasq", "--listen", "127.0.0.1:0", "--store", "etcd:/h:2379"],
            "invalid --store \"etcd:/h:2379\": unknown scheme; expected `files` or etcd://host:port",
        ),
    ];
    for (args, needle) in cases {
        let out = bin()
            .arg("--data-dir")
            .arg(dir.path())
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().last().unwrap_or("");
        assert!(
            last.starts_with("pxelab-stack: error: ") && last.contains(needle),
            "{args:?}: {err}"
        );
    }
}

/// The operator token file is checked before anything starts: a stack must never serve the
/// enrollment API with a token every local user can read, or with none.
#[test]
fn api_token_file_must_be_private_and_hold_a_token() {
    let dir = tempfile::tempdir().unwrap();
    for (text, mode, needle) in [
        ("s3cret\n", 0o644, "readable by every user"),
        ("\n", 0o600, "is empty"),
    ] {
        let out = with_token_file(dir.path(), text, mode).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{needle}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.starts_with("pxelab-stack: error: --api-token-file ") && err.contains(needle),
            "{err}"
        );
    }
}

/// Serves over HTTP from flags and environment alike, and stops within 2 s of SIGTERM.
#[test]
fn serves_and_stops_on_sigterm() {
    let s = common::Stack::new();
    let root = s.root().to_path_buf();
    let mut child = with_token_file(&root, "s3cret\n", 0o600)
        .env("PXELAB_VMS_DIR", root.join("vms"))
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut running = Running(child);
    let mut lines = BufReader::new(stderr).lines();
    let addr: SocketAddr = loop {
        let line = lines
            .next()
            .expect("stack exited before listening")
            .unwrap();
        if let Some(rest) = line.strip_prefix("pxelab-stack: listening on http://") {
            break rest.split(' ').next().unwrap().parse().unwrap();
        }
    };
    let r = common::raw_bytes(
        addr,
        format!(
            "GET /ipxe?mac={} HTTP/1.1\r\nHost: pxe.test\r\nConnection: close\r\n\r\n",
            common::MAC
        )
        .as_bytes(),
    );
    assert_eq!(r.status, 200);
    assert!(r
        .text()
        .contains("kernel http://pxe.test/images/debian-12/x86_64/vmlinuz"));
    // The access log names the request.
    let logged = lines.next().unwrap().unwrap();
    assert!(
        logged.contains("GET /ipxe?mac=") && logged.contains(" 200 "),
        "{logged}"
    );

    // The same API on the control socket, which only the owner may open; URLs in replies name
    // the public address, since a client there has no Host of its own to offer.
    let control = root.join("state/control.sock");
    let mode = std::fs::metadata(&control).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "control socket mode {mode:o}");
    let r = common::control(&control, "GET", &format!("/ipxe?mac={}", common::MAC));
    assert_eq!(r.status, 200);
    assert!(
        r.text().contains(&format!(
            "kernel http://{addr}/images/debian-12/x86_64/vmlinuz"
        )),
        "{}",
        r.text()
    );
    assert_eq!(common::control(&control, "GET", "/healthz").status, 200);

    // The enrollment API, with the token of --api-token-file only.
    let list = |auth: &str| {
        common::raw_bytes(
            addr,
            format!(
                "GET /api/machines HTTP/1.1\r\nHost: pxe.test\r\n{auth}Connection: close\r\n\r\n"
            )
            .as_bytes(),
        )
    };
    assert_eq!(list("").status, 401);
    let r = list("Authorization: Bearer s3cret\r\n");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()[0]["name"], "t1");

    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(running.0.id() as i32, libc::SIGTERM) };
    let t = Instant::now();
    let status = loop {
        if let Some(status) = running.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "still running 2 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "still listening after exit"
    );
    assert!(!control.exists(), "control socket left behind");
}
