//! The deployable files under `runtime/deploy/` and README's "Deploying the stack" checked
//! without root: the Kubernetes manifest against Kubernetes' own schemas (offline, with PyPI's
//! `kubernetes-validate`, which `cargo xtask test` installs), the systemd unit with
//! `systemd-analyze verify`, and every documented command line's flags against the binary's
//! parser, so the documents cannot drift from the binary. `sys_deploy.rs` runs them for real.

use pxelab_tests::cmd::{command, output, require};
use pxelab_tests::deploy::{
    deploy_file, kubernetes_args, kubernetes_container, kubernetes_manifest, kubernetes_validate,
    readme_command, unit_exec_start,
};

const STACK: &str = env!("CARGO_BIN_EXE_pxelab-stack");

/// What the stack's parser says of `args` followed by `--help`: clap rejects an unknown flag,
/// or a flag without its value, before it reaches `--help`.
fn assert_accepted(what: &str, args: &[String]) {
    let out = output(command(&[STACK]).args(args).arg("--help"));
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("Usage:"),
        "{what}: pxelab-stack refuses {args:?}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The arguments after the image in a `podman run`/`docker run` line.
fn after_image(line: &[String]) -> Vec<String> {
    let at = line
        .iter()
        .position(|w| w.contains("pxeboot-stack:"))
        .unwrap_or_else(|| panic!("no image in {line:?}"));
    line[at + 1..].to_vec()
}

#[test]
fn the_kubernetes_manifest_validates_against_the_kubernetes_schemas() {
    let tool = kubernetes_validate();
    let manifest = deploy_file("kubernetes.yaml");
    let out = output(command(&[tool.to_str().unwrap(), "--strict"]).arg(&manifest));
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.contains("passed") && !said.contains("WARN"),
        "{said}"
    );
    // The checker fails on what the schemas forbid.
    let broken = tempfile::tempdir().unwrap();
    let bad = broken.path().join("bad.yaml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(
        &bad,
        text.replace("hostNetwork: true", "hostNetwork: yes please"),
    )
    .unwrap();
    let out = output(command(&[tool.to_str().unwrap(), "--strict"]).arg(&bad));
    assert!(!out.status.success(), "a broken manifest passed: {out:?}");
}

#[test]
fn the_daemonset_runs_on_the_host_network_of_provisioning_nodes_with_the_token_as_a_file() {
    let docs = kubernetes_manifest();
    let ds = docs.iter().find(|d| d["kind"] == "DaemonSet").unwrap();
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert!(
        pod["nodeSelector"]
            .as_object()
            .is_some_and(|m| !m.is_empty()),
        "no nodeSelector: {pod}"
    );
    let c = kubernetes_container();
    let caps: Vec<&str> = c["securityContext"]["capabilities"]["add"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for cap in ["NET_ADMIN", "NET_RAW"] {
        assert!(caps.contains(&cap), "{cap} missing: {caps:?}");
    }
    let args = kubernetes_args();
    let value = |flag: &str| {
        pxelab_tests::deploy::Placement::value(&args, flag)
            .unwrap_or_else(|| panic!("no {flag} in {args:?}"))
            .to_string()
    };
    let volume = |name: &str| {
        pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no volume {name}"))
            .clone()
    };
    let mount_of = |path: &str| {
        c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| path.starts_with(m["mountPath"].as_str().unwrap()))
            .unwrap_or_else(|| panic!("nothing mounted at {path}"))
            .clone()
    };
    // The token file lies in a Secret's volume, not readable by every user (the stack refuses
    // that).
    let token = mount_of(&value("--api-token-file"));
    let secret = volume(token["name"].as_str().unwrap());
    assert!(secret["secret"]["secretName"].is_string(), "{secret}");
    assert_eq!(secret["secret"]["defaultMode"].as_u64().unwrap() & 0o004, 0);
    // The data directories the image declares are on volumes that outlive the pod.
    for dir in ["vms", "images", "state"] {
        let m = mount_of(&format!("/var/lib/pxelab/{dir}"));
        assert_eq!(m["mountPath"], format!("/var/lib/pxelab/{dir}"));
        let v = volume(m["name"].as_str().unwrap());
        assert!(
            v["hostPath"].is_object() || v["persistentVolumeClaim"].is_object(),
            "{dir}: {v}"
        );
    }
    // The probe asks the address the stack listens on.
    let ip = value("--server-ip");
    assert_eq!(
        c["livenessProbe"]["httpGet"]["host"].as_str(),
        ip.split('/').next()
    );
}

#[test]
fn the_systemd_unit_verifies() {
    require("systemd-analyze", "systemd");
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("pxelab-stack.service");
    let text = std::fs::read_to_string(deploy_file("pxelab-stack.service")).unwrap();
    let documented = &unit_exec_start()[0];
    assert_eq!(documented, "/usr/local/bin/pxelab-stack");
    std::fs::write(&unit, text.replace(documented.as_str(), STACK)).unwrap();
    let out = output(command(&["systemd-analyze", "verify"]).arg(&unit));
    // It reports what it ignores on stderr, with success: a clean unit prints nothing.
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_documented_command_line_is_one_the_binary_takes() {
    let binary = readme_command(&["pxelab-stack", "--interface"]);
    assert_accepted("README's pxelab-stack line", &binary[1..]);
    let shared = readme_command(&["pxelab-stack", "--store"]);
    assert_accepted("README's pxelab-stack --store line", &shared[1..]);
    let unit = unit_exec_start();
    assert_accepted("the unit's ExecStart", &unit[1..]);
    // The service runs what the README shows.
    assert_eq!(unit[1..], binary[1..], "the unit and README differ");
    let podman = readme_command(&["podman", "run"]);
    assert_accepted("README's podman run", &after_image(&podman));
    assert_accepted("the DaemonSet's args", &kubernetes_args());
    // docker is not run here: its lines are the podman lines with the other program and
    // archive.
    let docker = readme_command(&["docker", "run"]);
    assert_eq!(docker[1..], podman[1..], "docker run and podman run differ");
    let load = |p: &str| readme_command(&[p, "load"]);
    assert_eq!(
        load("docker")[1..].join(" "),
        load("podman")[1..]
            .join(" ")
            .replace(".oci.tar", ".docker.tar")
    );
    // A flag the binary does not have is refused, so the checks above can fail.
    let out = output(&mut command(&[STACK, "--no-such-flag", "--help"]));
    assert!(!out.status.success());
}
