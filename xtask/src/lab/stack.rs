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
use pxelab_contract::{Arch, CONTROL_SOCKET};
use serde::{Deserialize, Serialize};
use xshell::{cmd, Shell};

use super::{
    home::Lab,
    net::BRIDGE,
    qemu::{running_pid, wait_gone},
};

/// How the lab runs the stack.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StackKind {
    /// The static `pxelab-stack` binary, run directly inside the namespace.
    #[default]
    Process,
    /// The built OCI image, run by podman (runc) with the namespace as its network.
    Container,
}

/// Name of the lab's stack container (one per namespace, so one per lab home).
pub fn container_name(lab: &Lab) -> String {
    format!("{}-stack", lab.config.namespace)
}

/// Starts the stack in the lab namespace unless it already runs. Returns whether it was
/// started now. Either way the pid file names the stack's process as the host sees it, so
/// `reload` (SIGHUP) and liveness checks work the same for both kinds.
pub fn start(lab: &Lab) -> Result<bool> {
    if running_pid(&lab.stack_pidfile()).is_some() {
        return Ok(false);
    }
    let pid = match lab.config.stack {
        StackKind::Process => start_process(lab, &stack_binary(lab)?)?,
        StackKind::Container => start_container(lab)?,
    };
    crate::store::write_atomic(&lab.stack_pidfile(), format!("{pid}\n").as_bytes())?;
    Ok(true)
}

/// The lab's copy of the stack binary (`bin/pxelab-stack`), first refreshed from what
/// `build-stack` last produced for the host architecture, so a (re)start runs the newest build.
/// The copy keeps the lab home self-contained: a lab runs without access to the checkout.
pub fn stack_binary(lab: &Lab) -> Result<PathBuf> {
    let built = super::stack_build_dir(host_arch()).join("pxelab-stack");
    let copy = lab.dir("bin").join("pxelab-stack");
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
    let Some(pid) = running_pid(&lab.stack_pidfile()) else {
        return false;
    };
    if lab.config.stack != StackKind::Process {
        return false;
    }
    let running = std::fs::read(format!("/proc/{pid}/exe"));
    let current = std::fs::read(lab.dir("bin").join("pxelab-stack"));
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
    Ok(vec![
        "--data-dir".into(),
        data_dir.display().to_string(),
        "--interface".into(),
        BRIDGE.into(),
        "--server-ip".into(),
        format!("{gateway}/{}", net.subnet.prefix()),
        "--listen".into(),
        format!("{gateway}:80"),
    ])
}

fn start_process(lab: &Lab, binary: &Path) -> Result<u32> {
    let net = lab.net()?;
    let log_path = lab.dir("logs").join("stack.log");
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let mut cmd = net.command(binary)?;
    cmd.args(stack_flags(lab, &lab.home)?)
        .stdin(Stdio::null())
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
    super::net::require_root(
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
    let sh = Shell::new()?;
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
        let name = Path::new(&path)
            .file_name()
            .context("a volume path has a name")?;
        let dir = lab.home.join(name);
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
                if running_pid(&lab.stack_pidfile()).is_none() {
                    let log = match lab.config.stack {
                        StackKind::Process => {
                            lab.dir("logs").join("stack.log").display().to_string()
                        }
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
    let pidfile = lab.stack_pidfile();
    if lab.config.stack == StackKind::Container {
        let sh = Shell::new()?;
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

/// `GET <path>` on the stack's control socket (`state/control.sock`, the same API as its HTTP
/// port): (status, body). Through the file system, so it works wherever the stack's network
/// is — a namespace this process may not join (rootless), or a container.
pub fn get(lab: &Lab, path: &str) -> Result<(u16, String)> {
    let socket = lab.dir("state").join(CONTROL_SOCKET);
    let what = || format!("GET {path} on {}", socket.display());
    let mut stream = UnixStream::connect(&socket).with_context(what)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.1\r\nConnection: close\r\n\r\n").with_context(what)?;
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
