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
            // An IPv6 address would be tentative (unusable) for a second otherwise.
            let nodad = if cidr.contains(':') { "nodad" } else { "" };
            let args = [
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                cidr,
                "dev",
                &self.cli_if,
                nodad,
            ];
            must(&args[..args.len() - usize::from(nodad.is_empty())]);
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
/// <server-ip>:80) serving `interface`, with `extra` flags, and waits until it answers HTTP
/// there.
fn start_stack(lab: &Lab, data: &Path, interface: &str, extra: &[&str]) -> StackProcess {
    let log = data.join("stack.log");
    let child = lab
        .srv
        .command(env!("CARGO_BIN_EXE_pxelab-stack"))
        .arg("--data-dir")
        .arg(data)
        .args([
            "--interface",
            interface,
            "--server-ip",
            &format!("{SERVER_IP}/24"),
        ])
        .args(extra)
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
    let mut stack = start_stack(&lab, data, &lab.srv_if, &[]);

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

    // t1 removed and t2 defined on its address, which t1's lease holds for another hour:
    // dnsmasq alone would refuse t2 ("leased to" t1's MAC) until then.
    std::fs::remove_file(data.join("vms/t1.json")).unwrap();
    let t2 = serde_json::json!({"name": "t2", "arch": "x86_64", "distro": "debian-12",
        "mac": "52:54:00:aa:bb:99", "ip": "10.231.0.51", "ssh_key": KEY, "pxeboot": true});
    std::fs::write(data.join("vms/t2.json"), t2.to_string()).unwrap();
    let changed = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        if let Some(lease) = lab.dhcp(data, &[]) {
            assert_eq!(get(&lease, "ip"), Some("10.231.0.51"), "{lease:?}");
            break;
        }
        assert!(
            changed.elapsed() < Duration::from_secs(8),
            "t2 got no lease on t1's old address; dnsmasq's log:\n{}",
            std::fs::read_to_string(data.join("state/dnsmasq/dnsmasq.log")).unwrap_or_default()
        );
    }
    eprintln!(
        "a removed VM's address leased to its successor {:?} after the change",
        changed.elapsed()
    );

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
    let mut stack = start_stack(&lab, data, &lab.srv_if, &[]);
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

/// One DHCP reply as a PXE client reads it.
#[derive(Debug)]
struct Reply {
    /// Option 54.
    server: std::net::Ipv4Addr,
    /// Option 53: 2 offer, 5 ack.
    kind: u8,
    yiaddr: std::net::Ipv4Addr,
    siaddr: std::net::Ipv4Addr,
    file: String,
    /// The type of the first item of a PXE boot menu (option 43, sub-option 9).
    menu_item: Option<u16>,
}

/// A BOOTREQUEST as PXE firmware or iPXE sends it: `kind` (1 discover, 3 request), client
/// architecture `arch` (option 93), option 175 when `ipxe`, the broadcast flag set, and the
/// boot server item it asks port 4011 for (`boot_item`, option 43 sub-option 71) from its
/// leased address `ciaddr`.
fn pxe_request(
    mac: &str,
    xid: u32,
    kind: u8,
    (arch, ipxe): (u16, bool),
    boot_item: Option<u16>,
    ciaddr: std::net::Ipv4Addr,
) -> Vec<u8> {
    let mut p = vec![0u8; 240];
    p[..4].copy_from_slice(&[1, 1, 6, 0]);
    p[4..8].copy_from_slice(&xid.to_be_bytes());
    p[10] = 0x80;
    p[12..16].copy_from_slice(&ciaddr.octets());
    for (i, byte) in mac.split(':').enumerate() {
        p[28 + i] = u8::from_str_radix(byte, 16).unwrap();
    }
    p[236..240].copy_from_slice(&[99, 130, 83, 99]);
    let class = format!("PXEClient:Arch:{arch:05}:UNDI:003016");
    let mut option = |code: u8, value: &[u8]| {
        p.push(code);
        p.push(value.len() as u8);
        p.extend_from_slice(value);
    };
    option(53, &[kind]);
    option(55, &[1, 3, 6, 43, 60, 66, 67, 97, 128, 175]);
    option(60, class.as_bytes());
    option(93, &arch.to_be_bytes());
    option(94, &[1, 3, 16]);
    option(97, &[0; 17]);
    if ipxe {
        option(175, &[0x13, 1, 1]);
    }
    if let Some(item) = boot_item {
        let [hi, lo] = item.to_be_bytes();
        option(43, &[71, 4, hi, lo, 0, 0, 255]);
    }
    p.push(255);
    p
}

fn parse_reply(p: &[u8], xid: u32) -> Option<Reply> {
    if p.len() < 240
        || p[0] != 2
        || p[4..8] != xid.to_be_bytes()
        || p[236..240] != [99, 130, 83, 99]
    {
        return None;
    }
    let addr = |b: &[u8]| std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]);
    let (mut server, mut kind, mut menu_item) = (None, None, None);
    let mut rest = &p[240..];
    while let [code, len, tail @ ..] = rest {
        let value = tail.get(..usize::from(*len))?;
        match code {
            53 => kind = value.first().copied(),
            54 if value.len() == 4 => server = Some(addr(value)),
            43 => {
                let mut sub = value;
                while let [code, len, tail @ ..] = sub {
                    let Some(v) = tail.get(..usize::from(*len)) else {
                        break;
                    };
                    if *code == 9 && v.len() >= 2 {
                        menu_item = Some(u16::from_be_bytes([v[0], v[1]]));
                    }
                    sub = &tail[v.len()..];
                }
            }
            255 => break,
            _ => {}
        }
        rest = &tail[usize::from(*len)..];
    }
    let file = &p[108..236];
    Some(Reply {
        server: server?,
        kind: kind?,
        yiaddr: addr(&p[16..20]),
        siaddr: addr(&p[20..24]),
        file: String::from_utf8_lossy(&file[..file.iter().position(|b| *b == 0).unwrap_or(128)])
            .into_owned(),
        menu_item,
    })
}

/// Sends `packet` from port 68 of `ns` (out of `interface`) to `to` and collects the replies
/// to its transaction for `wait`, or until there are `enough`.
fn exchange(
    ns: &NetNs,
    interface: &str,
    to: std::net::SocketAddrV4,
    packet: &[u8],
    (wait, enough): (Duration, usize),
) -> Vec<Reply> {
    let xid = u32::from_be_bytes(packet[4..8].try_into().unwrap());
    ns.within(|| {
        use std::os::fd::AsRawFd;
        let socket = std::net::UdpSocket::bind("0.0.0.0:68").expect("bind port 68");
        socket.set_broadcast(true).unwrap();
        // SAFETY: a valid socket and a buffer of the given length.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_BINDTODEVICE,
                interface.as_ptr().cast(),
                interface.len() as libc::socklen_t,
            )
        };
        assert_eq!(
            rc,
            0,
            "SO_BINDTODEVICE: {}",
            std::io::Error::last_os_error()
        );
        socket.send_to(packet, to).expect("send the DHCP request");
        let end = Instant::now() + wait;
        let mut replies = Vec::new();
        let mut buf = [0u8; 1500];
        while let Some(left) = end
            .checked_duration_since(Instant::now())
            .filter(|_| replies.len() < enough)
        {
            socket
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            match socket.recv_from(&mut buf) {
                Ok((n, _)) => replies.extend(parse_reply(&buf[..n], xid)),
                Err(_) => break,
            }
        }
        replies
    })
}

/// proxyDHCP beside a site server: the site's dnsmasq (no PXE options at all, on the same
/// bridge) leases the address; the stack (`--dhcp proxy`) answers only the PXE part, to
/// defined MACs only (one of them without an `ip`), and serves no DNS. Then the address rule:
/// a VM without `ip` is known by the address its `/ipxe` came from.
#[test]
fn sys_proxy_dhcp_beside_a_site_server() {
    prerequisites();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path();
    prepare_data(data);
    // The VM has no address of ours: the site's server leases it.
    let vm = serde_json::json!({"name": "t1", "arch": "x86_64", "distro": "debian-12", "mac": MAC,
        "ssh_key": KEY, "pxeboot": true});
    std::fs::write(data.join("vms/t1.json"), vm.to_string()).unwrap();
    let lab = Lab::new("p");
    lab.set_client_mac(MAC);
    // The stack's side becomes a bridge with a port to the client and one to the site.
    let id = std::process::id();
    let (bridge, site_port, site_if) = (format!("pxb{id}"), format!("pxp{id}"), format!("pxq{id}"));
    let site = NetNs::new("dhcp-site");
    lab.srv.ip(&format!("addr flush dev {}", lab.srv_if));
    lab.srv.ip(&format!("link add {bridge} type bridge"));
    lab.srv
        .ip(&format!("link set {} master {bridge}", lab.srv_if));
    lab.srv.veth(&site_port, &site, &site_if);
    lab.srv.ip(&format!("link set {site_port} master {bridge}"));
    lab.srv.ip(&format!("addr add {SERVER_IP}/24 dev {bridge}"));
    lab.srv.ip(&format!("link set {bridge} up"));
    site.ip(&format!("addr add 10.231.0.2/24 dev {site_if}"));
    let mut site = site;
    let site_log = data.join("site-dnsmasq.log");
    let child = site
        .command("dnsmasq")
        .args([
            "--no-daemon",
            "--conf-file=/dev/null",
            "--port=0",
            "--bind-interfaces",
            "--user=root",
            "--pid-file=",
            "--no-ping",
            "--log-dhcp",
            "--dhcp-range=10.231.0.100,10.231.0.150,1h",
        ])
        .arg(format!("--interface={site_if}"))
        .arg(format!(
            "--dhcp-leasefile={}",
            data.join("site.leases").display()
        ))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&site_log).unwrap())
        .stderr(std::fs::File::create(&site_log).unwrap())
        .spawn()
        .unwrap();
    site.adopt(child);
    let mut stack = start_stack(&lab, data, &bridge, &["--dhcp", "proxy"]);
    let conf = std::fs::read_to_string(data.join("state/dnsmasq/dnsmasq.conf")).unwrap();
    assert!(conf.contains("port=0"), "proxy mode serves DNS: {conf}");

    let broadcast = std::net::SocketAddrV4::new(std::net::Ipv4Addr::BROADCAST, 67);
    let site_ip: std::net::Ipv4Addr = "10.231.0.2".parse().unwrap();
    let stack_ip: std::net::Ipv4Addr = SERVER_IP.parse().unwrap();
    // Two offers (the site's, the stack's) are all a known MAC gets; an unknown one is given
    // the time to get a second.
    let offers = |mac: &str, xid: u32, arch: u16, ipxe: bool| {
        let replies = exchange(
            &lab.cli,
            &lab.cli_if,
            broadcast,
            &pxe_request(
                mac,
                xid,
                1,
                (arch, ipxe),
                None,
                std::net::Ipv4Addr::UNSPECIFIED,
            ),
            (Duration::from_millis(1500), 2),
        );
        let (site, proxy): (Vec<Reply>, Vec<Reply>) =
            replies.into_iter().partition(|r| r.server == site_ip);
        (site.into_iter().next(), proxy.into_iter().next())
    };
    // What the client is told on port 4011 (from its leased address), as firmware asks for the
    // item of the boot menu it was offered and iPXE asks with no item.
    let ask_4011 =
        |leased: std::net::Ipv4Addr, xid: u32, arch: u16, ipxe: bool, item: Option<u16>| {
            lab.client_address(Some(&format!("{leased}/24")));
            let replies = exchange(
                &lab.cli,
                &lab.cli_if,
                std::net::SocketAddrV4::new(stack_ip, 4011),
                &pxe_request(MAC, xid, 3, (arch, ipxe), item, leased),
                (Duration::from_millis(1500), 1),
            );
            lab.client_address(None);
            replies
                .into_iter()
                .find(|r| r.server == stack_ip && r.kind == 5)
        };
    let unspecified = std::net::Ipv4Addr::UNSPECIFIED;
    // The site offers an address and no boot file; the stack's proxy offer has no address and
    // names the first stage on its TFTP server (in the offer or, for a boot menu, on 4011).
    let mut leased = unspecified;
    for (xid, arch, ipxe, file) in [
        (0x1000, 0, false, "undionly.kpxe"),
        (0x1010, 7, false, "ipxe.efi"),
        (0x1020, 9, false, "ipxe.efi"),
        (0x1030, 11, false, "ipxe-arm64.efi"),
        (0x1040, 7, true, "http://10.231.0.1/boot.ipxe"),
        (0x1050, 0, true, "http://10.231.0.1/boot.ipxe"),
    ] {
        // A lost broadcast is retried, as a DHCP client does (once in CI the first exchange,
        // on a bridge made a moment before, went unanswered by the site server).
        let (site, proxy) = (1..=3)
            .map(|_| offers(MAC, xid, arch, ipxe))
            .find(|(site, proxy)| site.is_some() && proxy.is_some())
            .unwrap_or_default();
        let site = site.unwrap_or_else(|| {
            panic!(
                "arch {arch}: no offer from the site server in 3 tries; its log:\n{}",
                std::fs::read_to_string(&site_log).unwrap_or_default()
            )
        });
        assert!(site.kind == 2 && site.file.is_empty(), "{site:?}");
        leased = site.yiaddr;
        let proxy = proxy.unwrap_or_else(|| panic!("arch {arch}, iPXE {ipxe}: no proxy offer"));
        assert_eq!((proxy.kind, proxy.yiaddr), (2, unspecified), "{proxy:?}");
        let told = if proxy.file.is_empty() {
            let ack = ask_4011(leased, xid + 1, arch, ipxe, proxy.menu_item);
            ack.map(|r| (r.siaddr, r.file))
        } else {
            Some((proxy.siaddr, proxy.file.clone()))
        };
        // A URL needs no next server.
        let told = told.map(|(siaddr, f)| (f.starts_with("http://") || siaddr == stack_ip, f));
        assert_eq!(
            told,
            Some((true, file.to_string())),
            "arch {arch}, iPXE {ipxe}: offer {proxy:?}; the stack's dnsmasq log:\n{}",
            std::fs::read_to_string(data.join("state/dnsmasq/dnsmasq.log")).unwrap_or_default()
        );
        if ipxe {
            // iPXE asks 4011 after its lease too (a ProxyDHCPREQUEST, no boot item).
            let ack = ask_4011(leased, xid + 2, arch, true, None);
            assert_eq!(
                ack.map(|r| r.file).as_deref(),
                Some(file),
                "arch {arch}: ProxyDHCPREQUEST"
            );
        }
    }
    // The stack leased nothing, yet the machine's timeline shows its PXE answers: the proxy
    // offers, and the answer on 4011 (the BIOS menu item) to the address the site gave it.
    let socket = data.join("state").join(pxelab_contract::CONTROL_SOCKET);
    let timeline = || common::control(&socket, "GET", "/vms/t1/timeline").text();
    let t = Instant::now();
    let expected = [
        "proxyDHCP: boot file offered".to_string(),
        format!("proxyDHCP: boot file undionly.kpxe for {leased}"),
    ];
    while !expected.iter().all(|m| timeline().contains(m.as_str())) {
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "no proxyDHCP events {expected:?}: {}",
            timeline()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // A client that is not PXE (the installer's udhcpc, the installed system) hears only the
    // site's server: an address from its pool, no boot file.
    let lease = lab.dhcp(data, &[]).expect("no lease from the site server");
    let ip: std::net::Ipv4Addr = get(&lease, "ip").unwrap_or_default().parse().unwrap();
    assert!((100..=150).contains(&ip.octets()[3]), "{lease:?}");
    assert_eq!(get(&lease, "serverid"), Some("10.231.0.2"), "{lease:?}");
    assert_eq!(get(&lease, "boot_file"), None, "{lease:?}");
    // An unknown MAC still gets its address from the site, and nothing from the stack.
    let (site, proxy) = offers("52:54:00:aa:bb:99", 0x1060, 7, false);
    assert!(site.is_some() && proxy.is_none(), "{proxy:?}");

    // The address rule: /ipxe from any address starts the boot and binds that address; the
    // machine's documents are then served there only.
    lab.client_address(Some(&format!("{leased}/24")));
    let wget = |lab_ns: &str, url: &str| {
        let args = ["busybox", "wget", "-q", "-O", "-", url];
        let out = if lab_ns == "cli" {
            lab.in_cli(&args)
        } else {
            lab.in_srv(&args)
        };
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let meta = format!("http://{SERVER_IP}/cloud-init/t1/meta-data");
    let (ok, _) = wget("cli", &meta);
    assert!(!ok, "cloud-init served before the machine booted");
    let (ok, script) = wget("cli", &format!("http://{SERVER_IP}/ipxe?mac={MAC}"));
    assert!(ok, "/ipxe: {script}");
    let (ok, text) = wget("cli", &meta);
    assert!(ok && text.contains("local-hostname: \"t1\""), "{text}");
    let (ok, _) = wget("srv", &meta);
    assert!(!ok, "cloud-init served to another address than the boot's");
    lab.client_address(None);
    drop(stack.child.take());
    drop(stack);
    eprintln!(
        "site dnsmasq log:\n{}",
        std::fs::read_to_string(&site_log).unwrap_or_default()
    );
}

/// `--ipv6`: the defined MAC gets its reserved IPv6 address from the stack's dnsmasq over
/// DHCPv6 (ISC `dhclient -6`, the client the installed Debian runs), also after its boot stage
/// took the boot-stage address under another DUID, the router advertisements
/// put the prefix on-link, and the VM's and the stack's AAAA names resolve; an unknown MAC gets
/// no IPv6 lease. dhclient's script is `/bin/true` (it must not rewrite the host's
/// resolv.conf), so the test reads the lease file and adds the address itself.
#[test]
fn sys_dhcpv6_lease_and_aaaa_names() {
    prerequisites();
    require("dhclient", "isc-dhcp-client");
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path();
    prepare_data(data);
    let vm = serde_json::json!({"name": "t1", "arch": "x86_64", "distro": "debian-12", "mac": MAC,
        "ip": "10.231.0.50", "ipv6": "fd00:231::32", "ssh_key": KEY, "pxeboot": true});
    std::fs::write(data.join("vms/t1.json"), vm.to_string()).unwrap();
    let lab = Lab::new("c");
    lab.srv
        .ip(&format!("addr add fd00:231::1/64 dev {} nodad", lab.srv_if));
    lab.set_client_mac(MAC);
    let _stack = start_stack(&lab, data, &lab.srv_if, &["--ipv6", "fd00:231::1/64"]);
    let conf = std::fs::read_to_string(data.join("state/dnsmasq/dnsmasq.conf")).unwrap();
    assert!(conf.contains("static,64,1h"), "{conf}");

    // A network boot chain: the boot stage (iPXE) asks first under a DUID of its own and keeps
    // its lease, then the installed system asks under another (dhclient makes a new DUID-LLT
    // per lease file, from the time in seconds): it must still get the VM's address.
    let boot = lab
        .dhcpv6(data, "boot", 20)
        .expect("the known MAC got no DHCPv6 lease");
    assert!(boot.contains("iaaddr fd00:231::1:0:0:32 "), "{boot}");
    std::thread::sleep(Duration::from_millis(1100));
    let lease = lab
        .dhcpv6(data, "system", 20)
        .expect("the second DUID got no DHCPv6 lease");
    assert!(lease.contains("iaaddr fd00:231::32 "), "{lease}");
    let duid = |l: &str| {
        l.lines()
            .find(|l| l.contains("default-duid"))
            .map(str::to_string)
    };
    assert_ne!(duid(&boot), duid(&lease), "both runs had one DUID");
    // The advertisements make the prefix on-link (the lease itself is a /128).
    let t = Instant::now();
    loop {
        let routes = lab.in_cli(&["ip", "-6", "route", "show"]);
        let routes = String::from_utf8_lossy(&routes.stdout).to_string();
        if routes.contains("fd00:231::/64") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no on-link prefix from the router advertisements: {routes:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    lab.client_address(Some("fd00:231::32/64"));
    for (name, address) in [
        ("t1.pxelab.local", "fd00:231::32"),
        ("pxelab-stack.pxelab.local", "fd00:231::1"),
    ] {
        let dns = lab.in_cli(&["busybox", "nslookup", "-type=aaaa", name, "fd00:231::1"]);
        let answer = String::from_utf8_lossy(&dns.stdout);
        assert!(
            answer.contains(&format!("Address: {address}")),
            "AAAA {name}: {answer} {}",
            String::from_utf8_lossy(&dns.stderr)
        );
    }
    lab.client_address(None);

    lab.set_client_mac("52:54:00:aa:bb:99");
    assert_eq!(
        lab.dhcpv6(data, "unknown", 8),
        None,
        "an unknown MAC got a lease"
    );
}

impl Lab {
    /// One DHCPv6 exchange (`dhclient -6 -1`, given `secs`) from the client namespace; the
    /// lease file when it holds an address. `tag` names the files.
    fn dhcpv6(&self, dir: &Path, tag: &str, secs: u32) -> Option<String> {
        // The client needs a link-local address out of duplicate address detection.
        let t = Instant::now();
        loop {
            let out = self.in_cli(&[
                "ip",
                "-6",
                "addr",
                "show",
                "dev",
                &self.cli_if,
                "scope",
                "link",
            ]);
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            if text.contains("inet6") && !text.contains("tentative") {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "no link-local address: {text}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let leases = dir.join(format!("dhclient6-{tag}.leases"));
        let pidfile = dir.join(format!("dhclient6-{tag}.pid"));
        let out = self.in_cli(&[
            "timeout",
            &secs.to_string(),
            "dhclient",
            "-6",
            "-1",
            "-v",
            "-sf",
            "/bin/true",
            "-lf",
            leases.to_str().unwrap(),
            "-pf",
            pidfile.to_str().unwrap(),
            &self.cli_if,
        ]);
        // With a lease dhclient stays in the background to renew it: stop it now (the
        // namespace's removal would, too).
        if let Some(pid) = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
        {
            // SAFETY: kill(2) on the dhclient this test started, named by its pid file.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let lease = std::fs::read_to_string(&leases).unwrap_or_default();
        eprintln!(
            "dhclient -6 ({tag}): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        lease.contains("iaaddr").then_some(lease)
    }
}
