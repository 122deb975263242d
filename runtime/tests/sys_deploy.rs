//! The documented host-network command lines run for real: README's `pxelab-stack` line (which
//! is also the systemd unit's `ExecStart`, see `deploy.rs`) and the Kubernetes DaemonSet's
//! arguments, each with exactly its documented flags — the interface, address and absolute
//! paths moved into a namespace standing in for the provisioning host and a temporary
//! directory — while a second namespace on the other end of a veth pair, routed nowhere else,
//! is the target network: a DHCP client there gets the defined address, TFTP the first stage,
//! `/ipxe?mac=` the machine's script, and the enrollment API answers the operator token only.
//! Needs root, iproute2, dnsmasq-base and busybox; fails loudly without them.

mod common;

use common::StackProcess;
use pxelab_tests::cmd::{require, require_root};
use pxelab_tests::deploy::{kubernetes_args, readme_command, Placement, TargetNet};
use std::path::Path;
use std::process::Stdio;

const MAC: &str = "52:54:00:d1:e2:01";

fn prerequisites() {
    require_root("the deploy sys tests (network namespaces)");
    require("ip", "iproute2");
    require("dnsmasq", "dnsmasq-base");
    require("busybox", "busybox-static");
}

/// Starts `args` (already placed) in the host namespace with `env`, waits until it serves, and
/// checks what the target network gets; the stack is stopped (and its log shown on failure)
/// when this returns or fails.
fn run_and_check(net: &TargetNet, dir: &Path, args: &[String], env: &[(&str, &Path)], ip: &str) {
    let log = dir.join("stack.log");
    let file = std::fs::File::create(&log).unwrap();
    let mut cmd = net.host.command(env!("CARGO_BIN_EXE_pxelab-stack"));
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let t = std::time::Instant::now();
    let stack = StackProcess {
        child: Some(cmd.spawn().unwrap()),
        log: log.clone(),
    };
    let shown = || std::fs::read_to_string(&log).unwrap_or_default();
    net.wait_ready(15, &shown);
    eprintln!("serving {:.2} s after start", t.elapsed().as_secs_f64());
    net.assert_serves(dir, MAC, ip);
    drop(stack);
}

#[test]
fn sys_deploy_the_documented_binary_line_serves_a_host_network() {
    prerequisites();
    let tmp = tempfile::tempdir().unwrap();
    let net = TargetNet::new("b", "10.233.0.1/24");
    let placed = net.placement(&tmp.path().join("root"));
    let line = readme_command(&["pxelab-stack", "--interface"]);
    let args = placed.stack_flags(&line[1..]);
    let data = placed.path(Placement::value(&line, "--data-dir").expect("--data-dir"));
    let token = placed.path(Placement::value(&line, "--api-token-file").expect("a token file"));
    placed.prepare(
        &data.join("vms"),
        Some(&data.join("tftp")),
        &token,
        MAC,
        "10.233.0.50",
    );
    run_and_check(&net, tmp.path(), &args, &[], "10.233.0.50");
}

/// The container's arguments with the binary, against the data directory the image sets
/// (`PXELAB_DATA_DIR`) and the paths its volumes mount, moved under a temporary directory.
#[test]
fn sys_deploy_the_daemonset_args_serve_a_host_network() {
    prerequisites();
    let tmp = tempfile::tempdir().unwrap();
    let net = TargetNet::new("k", "10.234.0.1/24");
    let placed = net.placement(&tmp.path().join("root"));
    let documented = kubernetes_args();
    let args = placed.stack_flags(&documented);
    let data = placed.path("/var/lib/pxelab");
    let token = placed.path(Placement::value(&documented, "--api-token-file").expect("token"));
    placed.prepare(
        &data.join("vms"),
        Some(&data.join("tftp")),
        &token,
        MAC,
        "10.234.0.50",
    );
    run_and_check(
        &net,
        tmp.path(),
        &args,
        &[("PXELAB_DATA_DIR", &data)],
        "10.234.0.50",
    );
}
