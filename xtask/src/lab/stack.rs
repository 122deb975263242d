//! The stack as a lab process: started inside the lab namespace, health-checked and stopped
//! there, and asked for VM status over its control socket in the lab home.

use std::{
    fs::OpenOptions,
    io::{Read, Write},
    os::unix::net::UnixStream,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use pxelab_contract::{Arch, TimelineEntry, VmStatus};
use xshell::cmd;

use super::{
    home::{Lab, StackKind},
    net::BRIDGE,
};
use crate::process::{self, pid};

/// Name of the lab's stack container (one per namespace, so one per lab home).
pub fn container_name(lab: &Lab) -> String {
    format!("{}-stack", lab.config.namespace)
}

/// Starts the stack in the lab namespace unless it already runs. Returns whether it was
/// started now. Either way the pid file names the stack's process as the host sees it, so
/// `reload` (SIGHUP) and liveness checks work the same for both kinds.
pub fn start(lab: &Lab) -> Result<bool> {
    if running(lab).is_some() {
        return Ok(false);
    }
    let _starting = super::may_start()?;
    let pid = match lab.config.stack {
        StackKind::Process => start_process(lab, &stack_binary(lab)?)?,
        StackKind::Container => start_container(lab)?,
    };
    pid::write(&lab.stack_pidfile(), pid::Pid::of(pid)?)?;
    Ok(true)
}

/// The stack's process, if it runs.
pub fn running(lab: &Lab) -> Option<pid::Pid> {
    pid::read(&lab.stack_pidfile())
}

/// The lab's copy of the stack binary (`bin/pxelab-stack`), first refreshed from what
/// `build-stack` last produced for the host architecture, so a (re)start runs the newest build.
/// The copy keeps the lab home self-contained: a lab runs without access to the checkout.
pub fn stack_binary(lab: &Lab) -> Result<PathBuf> {
    let built = super::stack_build_dir(host_arch()).join("pxelab-stack");
    let copy = lab.stack_binary();
    if built.exists() {
        super::artifacts::install(&built, &copy)?;
    } else if !copy.exists() {
        bail!(
            "{} is missing: run `cargo xtask build-stack`",
            built.display()
        );
    }
    Ok(copy)
}

/// Whether the running stack was started from other bytes than the lab's current copy (a
/// newer `build-stack`): `lab up` restarts it then.
pub fn is_stale(lab: &Lab) -> bool {
    let Some(pid) = running(lab) else {
        return false;
    };
    if lab.config.stack != StackKind::Process {
        return false;
    }
    let running = std::fs::read(format!("/proc/{}/exe", pid.id()));
    let current = std::fs::read(lab.stack_binary());
    matches!((running, current), (Ok(a), Ok(b)) if a != b)
}

fn host_arch() -> Arch {
    if cfg!(target_arch = "aarch64") {
        Arch::Aarch64
    } else {
        Arch::X86_64
    }
}

/// The flags that place the stack on the lab network (the same for both kinds).
fn stack_flags(lab: &Lab, data_dir: &Path) -> Result<Vec<String>> {
    let net = lab.net()?;
    let gateway = net.subnet.gateway();
    let mut flags = vec![
        "--data-dir".into(),
        data_dir.display().to_string(),
        "--interface".into(),
        BRIDGE.into(),
        "--server-ip".into(),
        format!("{gateway}/{}", net.subnet.prefix()),
        "--listen".into(),
        format!("{gateway}:80"),
    ];
    if lab.config.proxy_dhcp {
        flags.extend(["--dhcp".into(), "proxy".into()]);
    }
    if lab.config.ipv6 {
        flags.extend(["--ipv6".into(), net.ula()]);
    }
    Ok(flags)
}

fn start_process(lab: &Lab, binary: &Path) -> Result<u32> {
    let net = lab.net()?;
    let log_path = lab.stack_log();
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let sh = process::shell()?;
    let mut cmd = process::command(
        net.command(&sh, binary)?
            .args(stack_flags(lab, lab.home())?),
    );
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group: a Ctrl-C aimed at `cargo xtask` must not take the lab down.
        .process_group(0);
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {} in namespace {}", binary.display(), net.ns))?;
    // `ip netns exec` and `nsenter` exec the stack in place, so this pid is the stack's.
    Ok(child.id())
}

/// Loads the built OCI archive into podman and runs it on the lab namespace. The flags are
/// the ones FIELD-NOTES found necessary here: runc (crun fails on hybrid cgroups) and explicit
/// rlimits (the defaults fail with EPERM); NET_ADMIN/NET_RAW for dnsmasq's DHCP,
/// DAC_READ_SEARCH for ganesha's VFS backend (it opens exported files by handle).
fn start_container(lab: &Lab) -> Result<u32> {
    process::require_root(
        "the container stack",
        "podman joins the lab's named network namespace",
    )?;
    let archive = match &lab.config.image {
        Some(chosen) => chosen.clone(),
        None => super::stack_build_dir(host_arch()).join("pxeboot-stack.oci.tar"),
    };
    if !archive.exists() {
        bail!(
            "{} is missing: run `cargo xtask build-stack` (or `cargo xtask lab stack reload --image <archive>`)",
            archive.display()
        );
    }
    let sh = process::shell()?;
    let net = lab.net()?;
    let name = container_name(lab);
    let loaded = cmd!(sh, "podman load -q -i {archive}")
        .quiet()
        .read()
        .with_context(|| format!("podman load of {}", archive.display()))?;
    let image = loaded_ref(&loaded).with_context(|| {
        format!(
            "podman loaded {} but named no image: {loaded:?}",
            archive.display()
        )
    })?;
    let netns = format!("ns:/run/netns/{}", net.ns);
    // Exactly the image's declared volumes, each bound to the lab home's directory: a bind of
    // the whole data dir would be shadowed by the anonymous volumes podman creates for them.
    // The installer initrd and the TFTP root stay the image's own.
    let mut volumes = Vec::new();
    for path in crate::stack::image::volumes() {
        let dir = lab.volume_source(Path::new(&path))?;
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        volumes.push("-v".to_string());
        volumes.push(format!("{}:{path}", dir.display()));
    }
    let flags = stack_flags(lab, Path::new(crate::stack::image::DATA_DIR))?;
    cmd!(
        sh,
        "podman run -d --replace --name {name} --runtime runc --ulimit nofile=1024:1024 --ulimit nproc=1000:1000
            --network {netns} --cap-add NET_ADMIN,NET_RAW,NET_BIND_SERVICE,DAC_READ_SEARCH {volumes...} {image} {flags...}"
    )
    .quiet()
    .ignore_stdout()
    .run()
    .context("podman run of the stack image")?;
    let format = "{{.State.Pid}}";
    let pid = cmd!(sh, "podman container inspect -f {format} {name}")
        .quiet()
        .read()?;
    pid.trim()
        .parse()
        .with_context(|| format!("podman reported pid {pid:?} for {name}"))
}

/// The image reference in `podman load` output (`Loaded image: <ref>`, or `Loaded image(s):
/// <ref>, …` from older podman).
fn loaded_ref(output: &str) -> Option<String> {
    output.lines().rev().find_map(|line| {
        let (_, refs) = line
            .split_once(':')
            .filter(|(k, _)| k.starts_with("Loaded image"))?;
        let first = refs.split(',').next()?.trim();
        (!first.is_empty()).then(|| first.to_string())
    })
}

/// Swaps the stack for one run from the OCI archive `image` (container mode from now on),
/// leaving the VMs alone: they keep running and retry whatever they were fetching.
pub fn reload_image(lab: &mut Lab, image: &Path) -> Result<()> {
    let image = std::fs::canonicalize(image)
        .with_context(|| format!("{}: no such OCI archive", image.display()))?;
    stop(lab)?;
    lab.config.stack = StackKind::Container;
    lab.config.image = Some(image);
    lab.save_config()?;
    start(lab)?;
    wait_healthy(lab, Duration::from_secs(30))
}

/// Waits until `GET /healthz` answers 200 inside the namespace.
pub fn wait_healthy(lab: &Lab, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        match get(lab, "/healthz") {
            Ok((200, _)) => return Ok(()),
            result => {
                if running(lab).is_none() {
                    let log = match lab.config.stack {
                        StackKind::Process => lab.stack_log().display().to_string(),
                        StackKind::Container => format!("`podman logs {}`", container_name(lab)),
                    };
                    bail!("the stack exited during start-up: see {log}");
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
    if lab.config.stack == StackKind::Container {
        let sh = process::shell()?;
        let name = container_name(lab);
        // Absent containers are fine: stop is idempotent.
        let _ = cmd!(sh, "podman stop -t 2 {name}")
            .quiet()
            .ignore_stdout()
            .ignore_stderr()
            .run();
        let _ = cmd!(sh, "podman rm -f {name}")
            .quiet()
            .ignore_stdout()
            .ignore_stderr()
            .run();
    }
    if let Some(pid) = running(lab) {
        pid.terminate(Duration::from_secs(5))
            .context("stopping the stack")?;
    }
    let _ = std::fs::remove_file(lab.stack_pidfile());
    Ok(())
}

/// `GET <path>` on the stack's control socket (`state/control.sock`, the same API as its HTTP
/// port): (status, body). Through the file system, so it works wherever the stack's network
/// is — a namespace this process may not join (rootless), or a container.
pub fn get(lab: &Lab, path: &str) -> Result<(u16, String)> {
    request(&lab.control_socket(), "GET", path)
}

/// `POST <path>` (without a body) on the control socket: (status, body).
pub fn post(lab: &Lab, path: &str) -> Result<(u16, String)> {
    request(&lab.control_socket(), "POST", path)
}

/// Asks the stack to forget that `vm` was installed: its next network boot runs the installer.
/// The stack answers with the VM's status; it owns its state files, the lab never edits them.
pub fn reprovision(lab: &Lab, vm: &str) -> Result<VmStatus> {
    let path = format!("/vms/{vm}/reprovision");
    match post(lab, &path)? {
        (200, body) => serde_json::from_str(&body)
            .with_context(|| format!("the stack answered POST {path} with {body:?}")),
        (404, body) => bail!(
            "the stack cannot reprovision {vm:?} ({}): `cargo xtask lab vm list` shows the VMs it \
             knows; a stack started from an older build has no reprovision: `cargo xtask lab stack restart`",
            body.trim()
        ),
        (status, body) => bail!("the stack answered POST {path} with {status}: {}", body.trim()),
    }
}

/// One request without a body on the control socket `socket` of any stack (the lab's, or one a
/// bench or test runs on its own data directory): (status, body).
pub fn request(socket: &Path, method: &str, path: &str) -> Result<(u16, String)> {
    let what = || format!("{method} {path} on {}", socket.display());
    let mut stream = UnixStream::connect(socket).with_context(what)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let length = if method == "GET" {
        ""
    } else {
        "Content-Length: 0\r\n"
    };
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\n{length}Connection: close\r\n\r\n"
    )
    .with_context(what)?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).with_context(what)?;
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut head = httparse::Response::new(&mut headers);
    let body_at = match head.parse(&reply) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => bail!("{}: the stack sent an incomplete reply", what()),
    };
    let status = head.code.unwrap_or(0);
    Ok((
        status,
        String::from_utf8_lossy(&reply[body_at..]).into_owned(),
    ))
}

/// The last entries of `name`'s timeline, from the stack's control socket.
pub fn timeline(lab: &Lab, name: &str) -> Result<Vec<TimelineEntry>> {
    let (code, body) = get(lab, &format!("/vms/{name}/timeline"))?;
    if code != 200 {
        bail!("GET /vms/{name}/timeline answered {code}: {}", body.trim());
    }
    serde_json::from_str(&body).context("parsing the timeline")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A control socket that answers one request with `reply`; returns what it was sent.
    fn serve_once(socket: &Path, reply: &'static str) -> std::thread::JoinHandle<String> {
        let listener = UnixListener::bind(socket).unwrap();
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut seen = Vec::new();
            let mut buf = [0u8; 1024];
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = conn.read(&mut buf).unwrap();
                assert!(n > 0, "the request ended before its head");
                seen.extend_from_slice(&buf[..n]);
            }
            conn.write_all(reply.as_bytes()).unwrap();
            String::from_utf8(seen).unwrap()
        })
    }

    fn lab() -> (tempfile::TempDir, Lab) {
        let dir = tempfile::tempdir().unwrap();
        let lab = Lab::at(dir.path().to_path_buf()).unwrap();
        lab.create_dirs().unwrap();
        (dir, lab)
    }

    #[test]
    fn reprovision_posts_to_the_control_socket_and_reads_the_status() {
        let (_dir, lab) = lab();
        let server = serve_once(
            &lab.control_socket(),
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 54\r\n\r\n\
             {\"name\":\"t-1\",\"mac\":\"0a:00:00:00:00:01\",\"state\":\"new\"}",
        );
        let status = reprovision(&lab, "t-1").unwrap();
        assert_eq!(status.name, "t-1");
        assert_eq!(status.state, pxelab_contract::VmState::New);
        let request = server.join().unwrap();
        assert!(
            request.starts_with("POST /vms/t-1/reprovision HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(request.contains("Content-Length: 0\r\n"), "{request}");
    }

    #[test]
    fn reprovision_of_a_vm_the_stack_does_not_know_names_it() {
        let (_dir, lab) = lab();
        let server = serve_once(
            &lab.control_socket(),
            "HTTP/1.1 404 Not Found\r\nContent-Length: 18\r\n\r\nno VM named \"ghost\"",
        );
        let err = reprovision(&lab, "ghost").unwrap_err().to_string();
        assert!(
            err.starts_with("the stack cannot reprovision \"ghost\" (no VM named \"ghost\"): "),
            "{err}"
        );
        server.join().unwrap();
    }

    #[test]
    fn a_refusal_is_quoted_and_a_dead_socket_is_named() {
        let (_dir, lab) = lab();
        let server = serve_once(
            &lab.control_socket(),
            "HTTP/1.1 409 Conflict\r\nContent-Length: 12\r\n\r\nVM is busy\r\n",
        );
        let err = reprovision(&lab, "t-1").unwrap_err().to_string();
        assert!(err.contains("409: VM is busy"), "{err}");
        server.join().unwrap();
        std::fs::remove_file(lab.control_socket()).unwrap();
        let err = format!("{:#}", get(&lab, "/status").unwrap_err());
        assert!(
            err.contains("GET /status on") && err.contains("control.sock"),
            "{err}"
        );
    }
}
