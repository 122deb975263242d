//! An interrupted `cargo xtask e2e` (Ctrl-C, or CI's SIGTERM at its time limit) takes its
//! throw-away lab down: no namespace, no stack, no QEMU and no lab home are left behind.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use xshell::cmd;
use xtask::process::{self, pid};

#[test]
fn sys_interrupted_e2e_leaves_no_lab_behind() {
    assert!(
        process::is_root(),
        "this test needs root (network namespaces): run it through `cargo xtask test`"
    );
    let sh = process::shell().unwrap();
    let xtask = env!("CARGO_BIN_EXE_xtask");
    let mut child = process::command(cmd!(sh, "{xtask} e2e --only firmware"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let home = std::env::temp_dir().join(format!("pxelab-e2e-{}", child.id()));
    // Wait until the lab's stack runs (a cold machine first builds the stack and pulls Debian).
    let pidfile = home.join("run/stack.pid");
    let deadline = Instant::now() + Duration::from_secs(1500);
    while !pidfile.exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "e2e exited before its lab came up"
        );
        assert!(Instant::now() < deadline, "the e2e lab never came up");
        std::thread::sleep(Duration::from_millis(200));
    }
    let config = std::fs::read_to_string(home.join("lab.json")).unwrap();
    let ns = serde_json::from_str::<serde_json::Value>(&config).unwrap()["namespace"]
        .as_str()
        .unwrap()
        .to_string();
    let stack = pid::read(&pidfile).expect("the pid file names the running stack");
    assert!(Path::new("/run/netns").join(&ns).exists());

    pid::Pid::of(child.id()).unwrap().signal(libc::SIGINT);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "exit status after Ctrl-C");
    assert!(
        !Path::new("/run/netns").join(&ns).exists(),
        "namespace {ns} left behind"
    );
    assert!(
        !stack.is_running(),
        "the stack (pid {}) still runs",
        stack.id()
    );
    assert!(!home.exists(), "{} left behind", home.display());
}
