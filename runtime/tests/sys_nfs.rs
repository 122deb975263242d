//! The NFS server of diskless boots, for real: the `pxelab-stack` binary in a network namespace
//! unpacks a root filesystem and runs nfs-ganesha on it; a client namespace joined by a veth
//! reads it over NFSv4 with libnfs's userspace client (this machine's kernel has no NFS client:
//! `mount -t nfs4` fails with ENODEV). Needs root and the Debian packages iproute2, busybox,
//! nfs-ganesha, nfs-ganesha-vfs and libnfs-utils; fails loudly without them. Namespaces, veth
//! and processes are removed by Drop guards, also on failure.

mod common;

use std::{
    os::unix::fs::MetadataExt,
    path::Path,
    process::{Output, Stdio},
    time::{Duration, Instant},
};

use common::{rootfs_tar_zst, sha256_of, StackProcess, KEY, KVER};
use pxelab_tests::cmd::{output, require};
use pxelab_tests::NetNs;

const SERVER_IP: &str = "10.232.0.1";
const CLIENT_IP: &str = "10.232.0.50";
const MAC: &str = "52:54:00:aa:bb:07";

fn prerequisites() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this sys_ test creates network namespaces: run it as root"
    );
    require("ip", "iproute2");
    require("busybox", "busybox");
    require("ganesha.nfsd", "nfs-ganesha nfs-ganesha-vfs");
    assert!(
        Path::new("/usr/lib/x86_64-linux-gnu/ganesha/libfsalvfs.so").is_file()
            || Path::new("/usr/lib/aarch64-linux-gnu/ganesha/libfsalvfs.so").is_file(),
        "ganesha's VFS backend is missing: apt-get install nfs-ganesha-vfs"
    );
    require("nfs-cat", "libnfs-utils");
    require("nfs-cp", "libnfs-utils");
}

/// Server and client namespaces joined by a veth pair; deleted (with everything in them) on
/// drop.
struct Lab {
    srv: NetNs,
    cli: NetNs,
}

impl Lab {
    fn new() -> Lab {
        let id = std::process::id();
        let lab = Lab {
            srv: NetNs::new("nfs-s"),
            cli: NetNs::new("nfs-c"),
        };
        let (srv_if, cli_if) = (format!("pxns{id}"), format!("pxnc{id}"));
        lab.srv.veth(&srv_if, &lab.cli, &cli_if);
        lab.srv.ip(&format!("addr add {SERVER_IP}/24 dev {srv_if}"));
        lab.cli.ip(&format!("addr add {CLIENT_IP}/24 dev {cli_if}"));
        lab
    }

    fn exec(&self, ns: &NetNs, args: &[&str]) -> Output {
        output(ns.command(args[0]).args(&args[1..]))
    }
}

fn write_vm(data: &Path, boot: &str) {
    let vm = serde_json::json!({"name": "t1", "arch": "x86_64", "distro": "debian-12", "mac": MAC,
        "ip": CLIENT_IP, "ssh_key": KEY, "boot": boot});
    std::fs::write(data.join("vms/t1.json"), vm.to_string()).unwrap();
}

fn prepare_data(data: &Path) {
    let img = data.join("images/debian-12/x86_64");
    for d in [data.join("vms"), img.clone()] {
        std::fs::create_dir_all(d).unwrap();
    }
    let rootfs = rootfs_tar_zst();
    std::fs::write(img.join("rootfs.tar.zst"), &rootfs).unwrap();
    std::fs::write(img.join("vmlinuz"), b"KERNEL").unwrap();
    let manifest = serde_json::json!({
        "rootfs": {"file": "rootfs.tar.zst", "sha256": sha256_of(&rootfs), "size": rootfs.len()},
        "kernel_version": KVER
    });
    std::fs::write(img.join("manifest.json"), manifest.to_string()).unwrap();
    write_vm(data, "nfsroot");
}

fn pid_alive(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    !stat.is_empty()
        && !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z'))
}

fn ganesha_pid(data: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(data.join("state/nfs/ganesha.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    (comm.trim() == "ganesha.nfsd" && pid_alive(pid)).then_some(pid)
}

/// True when a TCP socket listens on `port` in the network namespace whose `/proc/net` this is.
fn listens(proc_net_tcp: &[String], port: u16) -> bool {
    let port = format!(":{port:04X}");
    proc_net_tcp.iter().any(|text| {
        text.lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1].ends_with(&port) && f[3] == "0A"
        })
    })
}

fn nfs_url(path: &str) -> String {
    format!("nfs://{SERVER_IP}/pxelab/debian-12/x86_64{path}?version=4")
}

#[test]
fn sys_ganesha_exports_the_root_read_only_inside_the_namespace_only() {
    prerequisites();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path();
    prepare_data(data);
    let lab = Lab::new();
    let log = data.join("stack.log");
    let child = lab
        .srv
        .command(env!("CARGO_BIN_EXE_pxelab-stack"))
        .arg("--data-dir")
        .arg(data)
        .args(["--no-dnsmasq", "--server-ip", &format!("{SERVER_IP}/24")])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut stack = StackProcess {
        child: Some(child),
        log,
    };

    // The diskless script is handed out only once the root is unpacked and ganesha serves it.
    let ipxe_url = format!("http://{SERVER_IP}/ipxe?mac={MAC}");
    let t = Instant::now();
    let script = loop {
        let out = lab.exec(&lab.cli, &["busybox", "wget", "-q", "-O", "-", &ipxe_url]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if text.contains("boot=pxelab") {
            break text;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no diskless script after 30 s; last reply {text:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        script.contains(&format!("nfsroot={SERVER_IP}:/pxelab/debian-12/x86_64 ")),
        "{script}"
    );
    let ganesha = ganesha_pid(data).expect("ganesha is not running");

    // Read over NFSv4 from the other namespace: a plain file, and a root-only one (root is not
    // squashed: a booting system must read e.g. /etc/shadow).
    let out = lab.exec(&lab.cli, &["nfs-cat", &nfs_url("/etc/hostname")]);
    assert!(out.status.success(), "nfs-cat failed: {out:?}");
    assert_eq!(out.stdout, b"unset\n");
    let out = lab.exec(&lab.cli, &["nfs-cat", &nfs_url("/etc/shadow")]);
    assert_eq!(out.stdout, b"root:*:1::::::\n", "{out:?}");

    // Owners are numeric on the wire (a booting kernel must not need an idmap upcall).
    let out = lab.exec(&lab.cli, &["nfs-ls", &nfs_url("/etc")]);
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    let shadow: Vec<&str> = listing
        .lines()
        .find(|l| l.ends_with(" shadow"))
        .unwrap_or_else(|| panic!("no shadow in {listing:?} {out:?}"))
        .split_whitespace()
        .collect();
    assert_eq!((shadow[2], shadow[3]), ("0", "0"), "{listing}");

    // Writes are refused by the server, and nothing lands in the export.
    let local = data.join("local.txt");
    std::fs::write(&local, b"written by a client\n").unwrap();
    let out = lab.exec(
        &lab.cli,
        &["nfs-cp", local.to_str().unwrap(), &nfs_url("/etc/new-file")],
    );
    assert!(!out.status.success(), "a write succeeded: {out:?}");
    let err =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        err.contains("NFS4ERR_ROFS"),
        "expected a read-only error: {err}"
    );
    let export = std::fs::read_dir(data.join("state/nfsroot/debian-12/x86_64"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .expect("no export directory");
    assert!(!export.join("etc/new-file").exists());
    // Only the lab subnet is answered: a client on the server's loopback is not in it.
    let out = lab.exec(
        &lab.srv,
        &[
            "nfs-cat",
            "nfs://127.0.0.1/pxelab/debian-12/x86_64/etc/hostname?version=4",
        ],
    );
    assert!(
        !out.status.success() && out.stdout.is_empty(),
        "served outside the lab subnet: {out:?}"
    );

    // Containment: ganesha listens on *:2049, but in the lab namespace only. Checked without
    // sending a packet toward the lab from the host: ganesha's network namespace is the lab's,
    // the lab's socket table has the listener and the host's has none (and loopback refuses).
    let ns_inode = |p: &str| std::fs::metadata(p).unwrap().ino();
    assert_eq!(
        ns_inode(&format!("/proc/{ganesha}/ns/net")),
        ns_inode(&format!("/run/netns/{}", lab.srv.name()))
    );
    assert_ne!(
        ns_inode(&format!("/proc/{ganesha}/ns/net")),
        ns_inode("/proc/self/ns/net")
    );
    let table = |ns: Option<&NetNs>| -> Vec<String> {
        ["/proc/net/tcp", "/proc/net/tcp6"]
            .iter()
            .map(|f| match ns {
                Some(ns) => String::from_utf8_lossy(&lab.exec(ns, &["cat", f]).stdout).into_owned(),
                None => std::fs::read_to_string(f).unwrap_or_default(),
            })
            .collect()
    };
    assert!(
        listens(&table(Some(&lab.srv)), 2049),
        "ganesha does not listen in the lab"
    );
    assert!(
        !listens(&table(None), 2049),
        "something listens on port 2049 in the host's namespace"
    );
    assert!(std::net::TcpStream::connect_timeout(
        &"127.0.0.1:2049".parse().unwrap(),
        Duration::from_secs(1)
    )
    .is_err());

    // No diskless VM left: ganesha stops (and the stack keeps running).
    write_vm(data, "install");
    let t = Instant::now();
    while pid_alive(ganesha) {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "ganesha still runs without diskless VMs"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Diskless again: the export is not unpacked twice, and ganesha is back.
    write_vm(data, "nfsroot");
    let t = Instant::now();
    let ganesha = loop {
        if let Some(pid) = ganesha_pid(data) {
            break pid;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "ganesha did not restart"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let log_text = std::fs::read_to_string(&stack.log).unwrap();
    assert_eq!(log_text.matches("unpacking ").count(), 1, "{log_text}");

    // SIGTERM stops the stack and ganesha within 2 s.
    let mut child = stack.child.take().unwrap();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let t = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "stack exited with {status}");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "the stack took over 2 s to stop"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!pid_alive(ganesha), "ganesha survived the stack");
    let log_text = std::fs::read_to_string(&stack.log).unwrap();
    assert!(log_text.contains("nfs-ganesha stopped"), "{log_text}");
}
