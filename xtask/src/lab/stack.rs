//! The stack as a lab process: started inside the lab namespace, health-checked and stopped
//! there, and asked for VM status over HTTP from a thread that has joined the namespace.

use std::{
    fs::OpenOptions,
    os::unix::process::CommandExt,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::{home::Lab, net::BRIDGE, qemu::running_pid};

/// Starts `binary` (the static `pxelab-stack`) in the lab namespace unless it already runs.
/// Returns whether it was started now.
pub fn start(lab: &Lab, binary: &Path) -> Result<bool> {
    if running_pid(&lab.stack_pidfile()).is_some() {
        return Ok(false);
    }
    let net = lab.net()?;
    let gateway = net.subnet.gateway();
    let log_path = lab.dir("logs").join("stack.log");
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &net.ns])
        .arg(binary)
        .arg("--data-dir")
        .arg(&lab.home)
        .args(["--interface", BRIDGE])
        .arg("--server-ip")
        .arg(format!("{gateway}/{}", net.subnet.prefix()))
        .arg("--listen")
        .arg(format!("{gateway}:80"))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group: a Ctrl-C aimed at `cargo xtask` must not take the lab down.
        .process_group(0);
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {} in namespace {}", binary.display(), net.ns))?;
    // `ip netns exec` execs the stack in place, so this pid is the stack's.
    crate::store::write_atomic(&lab.stack_pidfile(), format!("{}\n", child.id()).as_bytes())?;
    Ok(true)
}

/// Waits until `GET /healthz` answers 200 inside the namespace.
pub fn wait_healthy(lab: &Lab, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        match get(lab, "/healthz") {
            Ok((200, _)) => return Ok(()),
            result => {
                if running_pid(&lab.stack_pidfile()).is_none() {
                    bail!(
                        "the stack exited during start-up: see {}",
                        lab.dir("logs").join("stack.log").display()
                    );
                }
                if Instant::now() > deadline {
                    let why = match result {
                        Ok((status, body)) => format!("HTTP {status}: {body}"),
                        Err(e) => format!("{e:#}"),
                    };
                    bail!("the stack did not become healthy within {timeout:?} ({why})");
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// SIGTERM, then SIGKILL after 5 s. Removes the pid file.
pub fn stop(lab: &Lab) -> Result<()> {
    let pidfile = lab.stack_pidfile();
    if let Some(pid) = running_pid(&pidfile) {
        // SAFETY: signalling a pid this lab started.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        if !wait_gone(pid, Duration::from_secs(5)) {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            if !wait_gone(pid, Duration::from_secs(5)) {
                bail!("the stack (pid {pid}) did not stop even after SIGKILL");
            }
        }
    }
    let _ = std::fs::remove_file(pidfile);
    Ok(())
}

/// Whether `pid` is gone within `timeout`. Reaps it when it is our own child (the stack started
/// by this process, e.g. in `lab stack restart`), so a zombie does not count as alive.
fn wait_gone(pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        // SAFETY: non-blocking waitpid on one pid; fails harmlessly if it is not our child.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
        // SAFETY: signal 0 only checks existence.
        if unsafe { libc::kill(pid, 0) } != 0 {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `GET http://<stack>/<path>` from inside the lab namespace: (status, body).
pub fn get(lab: &Lab, path: &str) -> Result<(u16, String)> {
    let net = lab.net()?;
    let url = format!("http://{}{path}", net.subnet.gateway());
    super::net::in_netns(&net.ns, move || -> Result<(u16, String)> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(5)))
            .http_status_as_error(false)
            .build()
            .into();
        let mut response = agent
            .get(&url)
            .call()
            .with_context(|| format!("GET {url}"))?;
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .read_to_string()
            .with_context(|| format!("reading {url}"))?;
        Ok((status, body))
    })?
}
