//! The stack's documented deployments as the tests read them — the command lines of README's
//! "Deploying the stack" section, the systemd unit's `ExecStart`, the Kubernetes manifest (as
//! JSON, through the `kubernetes-validate` venv `cargo xtask test` installs) — and what a test
//! needs to run them for real between two network namespaces: the documented host-specific
//! values (interface, address, absolute paths) moved into the test's own ([`Placement`]), and a
//! target network with a DHCP, TFTP and HTTP client on it ([`TargetNet`]).

use std::path::{Path, PathBuf};
use std::process::Output;

use crate::cmd::{check, command, must, output};
use crate::NetNs;

/// The repository's top directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_path_buf()
}

/// `runtime/deploy/<name>`.
pub fn deploy_file(name: &str) -> PathBuf {
    workspace_root().join("runtime/deploy").join(name)
}

/// The command lines of the README's "Deploying the stack" section: every line of its code
/// blocks, with `\` continuations joined and split into words (the documented lines use no
/// quoting).
pub fn readme_commands() -> Vec<Vec<String>> {
    let path = workspace_root().join("README.md");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let start = text
        .find("\n## Deploying the stack\n")
        .expect("README.md has no \"## Deploying the stack\" section");
    let section = &text[start + 1..];
    let section = &section[..section[1..].find("\n## ").map_or(section.len(), |e| e + 1)];
    let mut commands = Vec::new();
    let mut in_code = false;
    let mut line = String::new();
    for l in section.lines() {
        if l.starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if !in_code || l.trim_start().starts_with('#') {
            continue;
        }
        let (part, more) = match l.trim_end().strip_suffix('\\') {
            Some(p) => (p, true),
            None => (l, false),
        };
        line.push_str(part);
        line.push(' ');
        if !more {
            let words: Vec<String> = line.split_whitespace().map(String::from).collect();
            if !words.is_empty() {
                commands.push(words);
            }
            line.clear();
        }
    }
    commands
}

/// The one README command line that starts with `words` (e.g. `["podman", "run"]`).
pub fn readme_command(words: &[&str]) -> Vec<String> {
    let found: Vec<_> = readme_commands()
        .into_iter()
        .filter(|c| c.len() >= words.len() && c.iter().zip(words).all(|(a, b)| a == b))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "README's \"Deploying the stack\" should show exactly one `{}` line: {found:?}",
        words.join(" ")
    );
    found.into_iter().next().expect("one")
}

/// The systemd unit's `ExecStart=` command line, split into words.
pub fn unit_exec_start() -> Vec<String> {
    let path = deploy_file("pxelab-stack.service");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let lines: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("ExecStart="))
        .collect();
    let [line] = lines[..] else {
        panic!("{} should have one ExecStart: {lines:?}", path.display())
    };
    line.split_whitespace().map(String::from).collect()
}

/// The `kubernetes-validate` installed by `cargo xtask test` (xtask's `hostdeps`).
pub fn kubernetes_validate() -> PathBuf {
    let state = match std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".local/state"),
    };
    let tool = state.join("pxelab/kubernetes-validate/bin/kubernetes-validate");
    assert!(
        tool.is_file(),
        "{} not found: `cargo xtask test` installs it (PyPI's kubernetes-validate in a venv; \
         needs the Debian package python3-venv)",
        tool.display()
    );
    tool
}

/// `runtime/deploy/kubernetes.yaml`'s documents as JSON (read by the PyYAML of the
/// `kubernetes-validate` venv: the workspace has no YAML parser).
pub fn kubernetes_manifest() -> Vec<serde_json::Value> {
    let python = kubernetes_validate().with_file_name("python");
    let json = check(
        command(&[
            python.to_str().expect("UTF-8 path"),
            "-c",
            "import json, sys, yaml; json.dump(list(yaml.safe_load_all(open(sys.argv[1]))), sys.stdout)",
        ])
        .arg(deploy_file("kubernetes.yaml")),
    );
    serde_json::from_str(&json).expect("the YAML reader printed JSON")
}

/// The DaemonSet's stack container.
pub fn kubernetes_container() -> serde_json::Value {
    let docs = kubernetes_manifest();
    let ds = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .expect("kubernetes.yaml has a DaemonSet");
    let containers = ds["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers");
    assert_eq!(containers.len(), 1, "one container: {containers:?}");
    containers[0].clone()
}

/// The container's `args`.
pub fn kubernetes_args() -> Vec<String> {
    kubernetes_container()["args"]
        .as_array()
        .expect("the container has args")
        .iter()
        .map(|a| a.as_str().expect("string args").to_string())
        .collect()
}

/// Where a test puts a documented deployment: every documented absolute path moves under
/// `root`, the interface and the address become the test's.
pub struct Placement {
    pub root: PathBuf,
    pub interface: String,
    /// `ip/prefix`.
    pub server_ip: String,
}

impl Placement {
    /// The documented absolute `path`, under [`Placement::root`].
    pub fn path(&self, path: &str) -> PathBuf {
        assert!(path.starts_with('/'), "not an absolute path: {path}");
        self.root.join(path.trim_start_matches('/'))
    }

    /// The stack's flags `args` with each value that names the host replaced: `--interface`,
    /// `--server-ip`, `--listen` (same port) and absolute paths. Every flag stays.
    pub fn stack_flags(&self, args: &[String]) -> Vec<String> {
        self.flags(args, true)
    }

    /// [`Placement::stack_flags`] for a container: its paths are the image's and stay.
    pub fn container_flags(&self, args: &[String]) -> Vec<String> {
        self.flags(args, false)
    }

    fn flags(&self, args: &[String], paths: bool) -> Vec<String> {
        let ip = self.server_ip.split('/').next().expect("split has one");
        let mut out = Vec::new();
        let mut prev = "";
        for a in args {
            out.push(match prev {
                "--interface" => self.interface.clone(),
                "--server-ip" => self.server_ip.clone(),
                "--listen" => format!("{ip}:{}", a.rsplit(':').next().expect("a port")),
                _ if paths && a.starts_with('/') => self.path(a).display().to_string(),
                _ => a.clone(),
            });
            prev = a;
        }
        out
    }

    /// The value of `flag` in `args`.
    pub fn value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .map(String::as_str)
    }

    /// A stack's inputs: one VM (`mac`, fixed `ip`) in `vms`, the first-stage files in `tftp`
    /// (unless the image has its own), and the operator token (0600) at `token`.
    pub fn prepare(&self, vms: &Path, tftp: Option<&Path>, token: &Path, mac: &str, ip: &str) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(vms).expect("vms dir");
        let vm = format!(
            r#"{{"name": "web-1", "arch": "x86_64", "distro": "debian-12", "mac": "{mac}", "ip": "{ip}", "pxeboot": true,
               "ssh_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIK0wmN/Cr3JXqmLW7u+g9pTh+wyqDHpSQEIQczXkVx9q lab"}}"#
        );
        std::fs::write(vms.join("web-1.json"), vm).expect("VM file");
        if let Some(tftp) = tftp {
            std::fs::create_dir_all(tftp).expect("tftp dir");
            for f in ["ipxe.efi", "ipxe-arm64.efi", "undionly.kpxe"] {
                std::fs::write(tftp.join(f), format!("first stage {f}\n")).expect("tftp file");
            }
        }
        std::fs::create_dir_all(token.parent().expect("a directory")).expect("token dir");
        std::fs::write(token, "test-operator-token\n").expect("token");
        std::fs::set_permissions(token, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
}

/// The operator token [`Placement::prepare`] writes.
pub const TOKEN: &str = "test-operator-token";

/// The provisioning host (a namespace with `host_if` at the server address) and the network it
/// serves (a second namespace, `target_if`), joined by a veth pair and routed nowhere else.
pub struct TargetNet {
    pub host: NetNs,
    pub target: NetNs,
    pub host_if: String,
    pub target_if: String,
    /// `ip/prefix` on `host_if`.
    pub server_ip: String,
}

impl TargetNet {
    /// `tag` (a letter or two) keeps tests that run at once apart.
    pub fn new(tag: &str, server_ip: &str) -> TargetNet {
        let id = std::process::id();
        let net = TargetNet {
            host: NetNs::new(&format!("deploy-h{tag}")),
            target: NetNs::new(&format!("deploy-t{tag}")),
            host_if: format!("pxh{tag}{id}"),
            target_if: format!("pxt{tag}{id}"),
            server_ip: server_ip.to_string(),
        };
        net.host.veth(&net.host_if, &net.target, &net.target_if);
        net.host
            .ip(&format!("addr add {server_ip} dev {}", net.host_if));
        net
    }

    pub fn placement(&self, root: &Path) -> Placement {
        Placement {
            root: root.to_path_buf(),
            interface: self.host_if.clone(),
            server_ip: self.server_ip.clone(),
        }
    }

    fn ip(&self) -> &str {
        self.server_ip.split('/').next().expect("split has one")
    }

    fn in_target(&self, args: &[&str]) -> Output {
        output(self.target.command(args[0]).args(&args[1..]))
    }

    /// Waits (at most `secs`) until the stack answers `/healthz` on the server address from
    /// the host namespace and dnsmasq has the DHCP port open there; `log` explains a failure.
    pub fn wait_ready(&self, secs: u64, log: &dyn Fn() -> String) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        let url = format!("http://{}/healthz", self.ip());
        loop {
            let health = output(
                self.host
                    .command("busybox")
                    .args(["wget", "-q", "-O", "-", &url]),
            );
            let udp = self.host.within(|| {
                std::fs::read_to_string("/proc/thread-self/net/udp").unwrap_or_default()
            });
            let dhcp = udp.lines().any(|l| {
                l.split_whitespace()
                    .nth(1)
                    .is_some_and(|a| a.ends_with(":0043"))
            });
            if health.stdout == b"ok\n" && dhcp {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the stack did not answer {url} with DHCP open within {secs} s:\n{}",
                log()
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }

    /// Checks, from the target network, what a machine `mac` defined with `ip` gets: that
    /// address by DHCP with a first-stage boot file, that file over TFTP, its iPXE script over
    /// HTTP from that address, and the enrollment API with the operator [`TOKEN`] only.
    pub fn assert_serves(&self, scratch: &Path, mac: &str, ip: &str) {
        let t = &self.target_if;
        let ns = self.target.name();
        for args in [
            vec!["link", "set", t, "down"],
            vec!["link", "set", t, "address", mac],
            vec!["link", "set", t, "up"],
            vec!["addr", "flush", "dev", t],
        ] {
            check(command(&["ip", "-n", ns]).args(args));
        }
        let lease = self
            .target
            .dhcp_lease(t, scratch, &[])
            .unwrap_or_else(|| panic!("no DHCP lease for {mac}"));
        let env = format!("{lease:?}");
        let var = |k: &str| lease.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        assert_eq!(var("ip").as_deref(), Some(ip), "{env}");
        assert_eq!(var("siaddr").as_deref(), Some(self.ip()), "{env}");
        assert_eq!(var("boot_file").as_deref(), Some("undionly.kpxe"), "{env}");

        must(&["ip", "-n", ns, "addr", "add", &format!("{ip}/24"), "dev", t]);
        let fetched = scratch.join("fetched");
        let tftp = self.in_target(&[
            "busybox",
            "tftp",
            "-g",
            "-r",
            "undionly.kpxe",
            "-l",
            fetched.to_str().expect("UTF-8"),
            self.ip(),
        ]);
        let first_stage = std::fs::read(&fetched).unwrap_or_default();
        assert!(!first_stage.is_empty(), "TFTP gave nothing: {tftp:?}");

        let base = format!("http://{}", self.ip());
        let ipxe = self.in_target(&[
            "busybox",
            "wget",
            "-q",
            "-O",
            "-",
            &format!("{base}/ipxe?mac={mac}"),
        ]);
        let script = String::from_utf8_lossy(&ipxe.stdout);
        assert!(
            script.starts_with("#!ipxe") && script.contains(mac),
            "/ipxe?mac={mac}: {script} {}",
            String::from_utf8_lossy(&ipxe.stderr)
        );
        let api = format!("{base}/api/machines");
        let auth = format!("Authorization: Bearer {TOKEN}");
        let listed = self.in_target(&["busybox", "wget", "-q", "-O", "-", "--header", &auth, &api]);
        assert!(
            String::from_utf8_lossy(&listed.stdout).contains("\"web-1\""),
            "GET /api/machines with the token: {listed:?}"
        );
        let refused = self.in_target(&["busybox", "wget", "-q", "-O", "-", &api]);
        assert!(
            !refused.status.success(),
            "the API answered without the token"
        );
        must(&["ip", "-n", ns, "addr", "flush", "dev", t]);
    }
}
