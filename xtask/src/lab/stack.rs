//! The stack as a lab process: started inside the lab namespace, health-checked and stopped
//! there, and asked for VM status over HTTP from a thread that has joined the namespace.

use std::{
    fs::OpenOptions,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use pxelab_contract::Arch;
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
        StackKind::Process => start_process(lab, &stack_binary()?)?,
        StackKind::Container => start_container(lab)?,
    };
    crate::store::write_atomic(&lab.stack_pidfile(), format!("{pid}\n").as_bytes())?;
    Ok(true)
}

/// The static stack binary that `build-stack` produced for the host architecture.
pub fn stack_binary() -> Result<PathBuf> {
    let path = super::stack_build_dir(host_arch()).join("pxelab-stack");
    if !path.exists() {
        bail!(
            "{} is missing: run `cargo xtask build-stack`",
            path.display()
        );
    }
    Ok(path)
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
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &net.ns])
        .arg(binary)
        .args(stack_flags(lab, &lab.home)?)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group: a Ctrl-C aimed at `cargo xtask` must not take the lab down.
        .process_group(0);
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {} in namespace {}", binary.display(), net.ns))?;
    // `ip netns exec` execs the stack in place, so this pid is the stack's.
    Ok(child.id())
}

/// Loads the built OCI archive into podman and runs it on the lab namespace. The flags are
/// the ones FIELD-NOTES found necessary here: runc (crun fails on hybrid cgroups) and explicit
/// rlimits (the defaults fail with EPERM); NET_ADMIN/NET_RAW for dnsmasq's DHCP,
/// DAC_READ_SEARCH for ganesha's VFS backend (it opens exported files by handle).
fn start_container(lab: &Lab) -> Result<u32> {
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
