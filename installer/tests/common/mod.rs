//! Host-command helpers shared by the installer's test files.
#![allow(dead_code)]

use std::process::Command;

/// Fails the test unless `tool` is on PATH, naming the package that provides it.
pub fn require(tool: &str, package: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success());
    assert!(
        found.unwrap_or(false),
        "{tool} not found: apt-get install {package}"
    );
}

/// Runs a host command; on failure panics with everything needed to see why.
pub fn sh(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
