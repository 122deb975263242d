//! Real DHCP, DNS and HTTP in network namespaces: the `pxelab-stack` binary with real dnsmasq
//! on one end of a veth pair, busybox `udhcpc`/`wget`/`nslookup` on the other. Needs root and
//! the Debian packages iproute2, dnsmasq-base and busybox; fails loudly without them.
//! Everything it creates (namespaces, veth, processes) is removed by Drop guards, also on failure.

mod common;

use common::StackProcess;
use pxelab_tests::cmd::{must, output, require};
use pxelab_tests::NetNs;
use std::{
    path::Path,
    process::{Output, Stdio},
    time::{Duration, Instant},
};

const SERVER_IP: &str = "10.231.0.1";
const MAC: &str = "52:54:00:aa:bb:01";
const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIK0wmN/Cr3JXqmLW7u+g9pTh+wyqDHpSQEIQczXkVx9q lab";

fn prerequisites() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this sys_ test creates network namespaces: run it as root"
    );
    require("ip", "iproute2");
    require("dnsmasq", "dnsmasq-base");
    require("busybox", "busybox");
}

/// Server and client namespaces joined by a veth pair; deleted (with everything in them) on
/// drop.
struct Lab {
    srv: NetNs,
    cli: NetNs,
    srv_if: String,
    cli_if: String,
}

impl Lab {
    /// `tag` (one letter) keeps tests that run in parallel apart.
    fn new(tag: &str) -> Lab {
        let id = std::process::id();
        let lab = Lab {
            srv: NetNs::new(&format!("dhcp-s{tag}")),
            cli: NetNs::new(&format!("dhcp-c{tag}")),
            srv_if: format!("pxs{tag}{id}"),
            cli_if: format!("pxc{tag}{id}"),
        };
        lab.srv.veth(&lab.srv_if, &lab.cli, &lab.cli_if);
        lab.srv
            .ip(&format!("addr add {SERVER_IP}/24 dev {}", lab.srv_if));
        lab
    }

    fn in_cli(&self, args: &[&str]) -> Output {
        output(self.cli.command(args[0]).args(&args[1..]))
    }

    fn in_srv(&self, args: &[&str]) -> Output {
        output(self.srv.command(args[0]).args(&args[1..]))
    }

    /// Gives the client interface `cidr` as its only address (`None`: no address), as the
    /// lease would: udhcpc's script here does not configure it.
    fn client_address(&self, cidr: Option<&str>) {
        let ns = self.cli.name();
        must(&["ip", "-n", ns, "addr", "flush", "dev", &self.cli_if]);
        if let Some(cidr) = cidr {
            must(&["ip", "-n", ns, "addr", "add", cidr, "dev", &self.cli_if]);
        }
    }

    fn set_client_mac(&self, mac: &str) {
        must(&[
            "ip",
            "-n",
            self.cli.name(),
            "link",
            "set",
            &self.cli_if,
            "down",
        ]);
        must(&[
            "ip",
            "-n",
            self.cli.name(),
            "link",
            "set",
            &self.cli_if,
            "address",
            mac,
        ]);
        must(&[
            "ip",
            "-n",
            self.cli.name(),
            "link",
            "set",
            &self.cli_if,
            "up",
        ]);
    }

    /// One DHCP exchange from the client namespace; the lease's variables, or None (no lease).
    fn dhcp(&self, dir: &Path, extra: &[&str]) -> Option<Vec<(String, String)>> {
        self.cli.dhcp_lease(&self.cli_if, dir, extra)
    }
}

fn get<'a>(lease: &'a [(String, String)], key: &str) -> Option<&'a str> {
    lease
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn write_vm(dir: &Path, ip: &str) {
    let vm = serde_json::json!({"name": "t1", "arch": "x86_64", "distro": "debian-12", "mac": MAC, "ip": ip,
        "ssh_key": KEY, "pxeboot": true});
    std::fs::write(dir.join("vms/t1.json"), vm.to_string()).unwrap();
}

fn prepare_data(data: &Path) {
    for d in ["vms", "tftp", "images", "initrds"] {
        std::fs::create_dir_all(data.join(d)).unwrap();
    }
    // DHCP answers name them; the test fetches one over TFTP.
    for f in ["ipxe.efi", "ipxe-arm64.efi", "undionly.kpxe"] {
        std::fs::write(data.join("tftp").join(f), format!("first stage {f}\n")).unwrap();
    }
    write_vm(data, "10.231.0.50");
}

/// Starts the stack binary in the server namespace (HTTP on the default listen address,
/// <server-ip>:80) and waits until it answers HTTP there.
fn start_stack(lab: &Lab, data: &Path) -> StackProcess {
    let log = data.join("stack.log");
    let child = lab
        .srv
        .command(env!("CARGO_BIN_EXE_pxelab-stack"))
        .arg("--data-dir")
        .arg(data)
        .args([
            "--interface",
            &lab.srv_if,
            "--server-ip",
            &format!("{SERVER_IP}/24"),
        ])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // `ip netns exec` execs the binary, so this pid is the stack itself.
    let stack = StackProcess {
        child: Some(child),
        log,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = lab.in_srv(&[
            "busybox",
            "wget",
            "-q",
            "-O",
            "-",
            &format!("http://{SERVER_IP}/healthz"),
        ]);
        if out.status.success() && out.stdout == b"ok\n" {
            break;
        }
        assert!(Instant::now() < deadline, "stack did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }
    // HTTP is up before dnsmasq has exec'd; wait for dnsmasq too.
    let conf = data.join("state/dnsmasq/dnsmasq.conf");
    while dnsmasq_pids_using(&conf).is_empty() {
        assert!(Instant::now() < deadline, "dnsmasq did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    stack
}

/// Running dnsmasq processes (zombies are dead) that run on `conf` (named relative to their
/// working directory, its directory).
fn dnsmasq_pids_using(conf: &Path) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap_or_default();
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let zombie = stat
                .rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z'));
            let name = conf.file_name().unwrap().to_string_lossy();
            String::from_utf8_lossy(&cmdline).contains(&format!("--conf-file={name}"))
                && Some(cwd.as_path()) == conf.parent()
                && !zombie
        })
        .collect()
}

#[test]
fn sys_dhcp_dns_and_http_in_namespaces() {
    prerequisites();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path();
    prepare_data(data);
    let lab = Lab::new("a");
    lab.set_client_mac(MAC);
    let mut stack = start_stack(&lab, data);

    // dnsmasq parses what any host on the lab network sends: it runs as nobody, with only the
    // capabilities DHCP needs, and still serves files from a data directory only root may
    // enter (tempdirs are 0700, as root's home is).
    let conf = data.join("state/dnsmasq/dnsmasq.conf");
    let [pid] = dnsmasq_pids_using(&conf)[..] else {
        panic!("not one dnsmasq")
    };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    assert_eq!(field("Uid:"), ["65534"; 4], "{status}");
    assert_eq!(field("Gid:"), ["65534"; 4], "{status}");
    // CAP_NET_BIND_SERVICE, CAP_NET_ADMIN, CAP_NET_RAW and nothing else.
    assert_eq!(field("CapEff:"), ["0000000000003400"], "{status}");

    // The reserved address, the BIOS boot file from our TFTP server, DNS and domain.
    let lease = lab.dhcp(data, &[]).expect("the known MAC got no lease");
    assert_eq!(get(&lease, "ip"), Some("10.231.0.50"), "{lease:?}");
    assert_eq!(get(&lease, "boot_file"), Some("undionly.kpxe"), "{lease:?}");
    assert_eq!(get(&lease, "siaddr"), Some(SERVER_IP), "{lease:?}");
    assert_eq!(get(&lease, "dns"), Some(SERVER_IP), "{lease:?}");
    assert_eq!(get(&lease, "domain"), Some("pxelab.local"), "{lease:?}");
    assert_eq!(get(&lease, "hostname"), Some("t1"), "{lease:?}");
    // The lease is on the VM's timeline (the stack follows dnsmasq's log).
    let socket = data.join("state").join(pxelab_contract::CONTROL_SOCKET);
    let timeline = || common::control(&socket, "GET", "/vms/t1/timeline").text();
    let t = Instant::now();
    while !timeline().contains(r#""message": "lease 10.231.0.50""#) {
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "no dhcp event: {}",
            timeline()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    lab.client_address(Some("10.231.0.50/24"));
    let fetched = data.join("fetched");
    let out = lab.in_cli(&[
        "busybox",
        "tftp",
        "-g",
        "-r",
        "undionly.kpxe",
        "-l",
        fetched.to_str().unwrap(),
        SERVER_IP,
    ]);
    assert_eq!(
        std::fs::read_to_string(&fetched).unwrap_or_default(),
        "first stage undionly.kpxe\n",
        "TFTP: {out:?}"
    );
    lab.client_address(None);
    // Per-architecture first stage, and the chain URL once the client is iPXE (option 175).
    for (extra, file) in [
        ("0x5d:0007", "ipxe.efi"),
        ("0x5d:0009", "ipxe.efi"),
        ("0x5d:000b", "ipxe-arm64.efi"),
        ("0xaf:1501", "http://10.231.0.1/boot.ipxe"),
        // UEFI HTTP boot (x64, arm64): a URL that fails at once, so the firmware moves on.
        ("0x5d:0010", "http://10.231.0.1/no-uefi-http-boot"),
        ("0x5d:0013", "http://10.231.0.1/no-uefi-http-boot"),
    ] {
        let lease = lab.dhcp(data, &["-x", extra]).expect("no lease");
        assert_eq!(get(&lease, "boot_file"), Some(file), "{extra}: {lease:?}");
    }

    // HTTP from the VM's own address: cloud-init is served; from another address it is not.
    lab.client_address(Some("10.231.0.50/24"));
    let out = lab.in_cli(&[
        "busybox",
        "wget",
        "-q",
        "-O",
        "-",
        &format!("http://{SERVER_IP}/cloud-init/t1/meta-data"),
    ]);
    assert!(
        out.status.success()
            && String::from_utf8_lossy(&out.stdout).contains("local-hostname: \"t1\""),
        "{out:?}"
    );
    let out = lab.in_srv(&[
        "busybox",
        "wget",
        "-q",
        "-O",
        "-",
        &format!("http://{SERVER_IP}/cloud-init/t1/meta-data"),
    ]);
    assert!(
        !out.status.success(),
        "cloud-init served to the server's own address"
    );
    lab.client_address(None);

    // A changed VM file changes the answer, without a restart, within 2 s.
    write_vm(data, "10.231.0.51");
    let changed = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let lease = lab.dhcp(data, &[]).expect("no lease after the change");
        if get(&lease, "ip") == Some("10.231.0.51") {
            break;
        }
        assert!(
            changed.elapsed() < Duration::from_secs(6),
            "still {lease:?} after the VM file changed"
        );
    }
    let took = changed.elapsed();
    eprintln!("new reservation answered {took:?} after the VM file changed");
    // DNS names for every VM.
    lab.client_address(Some("10.231.0.51/24"));
    let dns = lab.in_cli(&["busybox", "nslookup", "t1.pxelab.local", SERVER_IP]);
    let answer = String::from_utf8_lossy(&dns.stdout);
    assert!(
        answer.contains("10.231.0.51"),
        "DNS: {answer} {}",
        String::from_utf8_lossy(&dns.stderr)
    );
    lab.client_address(None);

    // Unknown MACs get nothing.
    lab.set_client_mac("52:54:00:aa:bb:99");
    assert!(lab.dhcp(data, &[]).is_none(), "an unknown MAC got a lease");

    // SIGTERM: the stack and its dnsmasq are gone within 2 s.
    let conf = data.join("state/dnsmasq/dnsmasq.conf");
    assert_eq!(dnsmasq_pids_using(&conf).len(), 1, "dnsmasq is not running");
    let mut child = stack.child.take().unwrap();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "stack still running 2 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "exit status {status}");
    assert!(
        dnsmasq_pids_using(&conf).is_empty(),
        "dnsmasq survived the stack"
    );
    eprintln!("stopped {:?} after SIGTERM", t.elapsed());
    drop(stack);
}

/// A dnsmasq that dies is restarted; and if the stack is killed without a chance to clean up,
/// the kernel still stops its dnsmasq (PR_SET_PDEATHSIG), so no DHCP server is left behind.
#[test]
fn sys_dnsmasq_restarted_and_dies_with_a_killed_stack() {
    prerequisites();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path();
    prepare_data(data);
    let lab = Lab::new("b");
    let mut stack = start_stack(&lab, data);
    let conf = data.join("state/dnsmasq/dnsmasq.conf");
    let first = dnsmasq_pids_using(&conf);
    assert_eq!(first.len(), 1, "dnsmasq is not running");
    // A dnsmasq that dies on its own is restarted.
    // SAFETY: kill(2) on a pid we just read; SIGKILL to a dnsmasq this test started.
    unsafe { libc::kill(first[0] as i32, libc::SIGKILL) };
    let t = Instant::now();
    loop {
        let now = dnsmasq_pids_using(&conf);
        if now.len() == 1 && now != first {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "dnsmasq was not restarted: {now:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("dnsmasq restarted {:?} after it was killed", t.elapsed());
    let mut child = stack.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let t = Instant::now();
    while !dnsmasq_pids_using(&conf).is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "dnsmasq outlived a SIGKILLed stack"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
