//! An interrupted `cargo xtask e2e` (Ctrl-C, or CI's SIGTERM at its time limit) takes its
//! throw-away lab down while a target's QEMU runs: no QEMU, tap, namespace, stack and no lab
//! home are left behind.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use xshell::cmd;
use xtask::lab::net::tap_name;
use xtask::process::{self, pid};

#[test]
fn sys_interrupted_e2e_leaves_no_lab_behind() {
    assert!(
        process::is_root(),
        "this test needs root (network namespaces): run it through `cargo xtask test`"
    );
    for (signal, name) in [(libc::SIGINT, "SIGINT"), (libc::SIGTERM, "SIGTERM")] {
        interrupt_while_a_vm_runs(signal, name);
    }
}

/// What an e2e run has running once its first firmware target boots.
struct Running {
    home: PathBuf,
    ns: String,
    stack: pid::Pid,
    qemu: pid::Pid,
    tap: String,
}

fn interrupt_while_a_vm_runs(signal: i32, name: &str) {
    let sh = process::shell().unwrap();
    let xtask = env!("CARGO_BIN_EXE_xtask");
    let mut child = process::command(cmd!(sh, "{xtask} e2e --only firmware"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The e2e makes its lab home as `pxelab-e2e-<pid>-<random>` in the temp dir.
    let prefix = format!("pxelab-e2e-{}-", child.id());
    let home_of_child = || {
        std::fs::read_dir(std::env::temp_dir())
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
            })
    };
    // Until the first firmware target's QEMU runs (a cold machine first builds the stack and
    // pulls Debian).
    let deadline = Instant::now() + Duration::from_secs(1500);
    let running = loop {
        if let Some(running) = home_of_child().and_then(|home| running(&home)) {
            break running;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "e2e exited before its first VM ran"
        );
        assert!(Instant::now() < deadline, "the e2e lab never started a VM");
        std::thread::sleep(Duration::from_millis(200));
    };
    let ns = &running.ns;
    assert!(Path::new("/run/netns").join(ns).exists());
    let links = cmd!(sh, "ip -n {ns} -o link show").read().unwrap();
    assert!(
        links.contains(&running.tap),
        "no tap {} in {links}",
        running.tap
    );

    pid::Pid::of(child.id()).unwrap().signal(signal);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "exit status after {name}");
    assert!(
        !Path::new("/run/netns").join(ns).exists(),
        "{name}: namespace {ns} left behind"
    );
    let host_links = cmd!(sh, "ip -o link show").read().unwrap();
    assert!(
        !host_links.contains(&running.tap),
        "{name}: tap {} left behind",
        running.tap
    );
    for (what, pid) in [("QEMU", running.qemu), ("the stack", running.stack)] {
        assert!(
            !pid.is_running(),
            "{name}: {what} (pid {}) still runs",
            pid.id()
        );
    }
    let home_arg = running.home.display().to_string();
    let left = cmd!(sh, "pgrep -a -f {home_arg}")
        .quiet()
        .ignore_status()
        .read()
        .unwrap();
    assert!(left.is_empty(), "{name}: still running: {left}");
    assert!(
        !running.home.exists(),
        "{name}: {} left behind",
        running.home.display()
    );
}

/// The lab of an e2e run at `home` once its stack and a target's QEMU run.
fn running(home: &Path) -> Option<Running> {
    let run = home.join("run");
    let stack = pid::read(&run.join("stack.pid"))?;
    let (vm, qemu) = std::fs::read_dir(&run)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let file = e.file_name().to_string_lossy().into_owned();
            let vm = file.strip_suffix(".pid")?.to_string();
            let pid = pid::read(&e.path())?;
            (vm != "stack" && vm != "netns").then_some((vm, pid))
        })
        .next()?;
    let config = std::fs::read_to_string(home.join("lab.json")).ok()?;
    let ns = serde_json::from_str::<serde_json::Value>(&config).ok()?["namespace"]
        .as_str()?
        .to_string();
    Some(Running {
        home: home.to_path_buf(),
        ns,
        stack,
        qemu,
        tap: tap_name(&vm),
    })
}
