//! The initrd's `/init` (initrd/init), run as PID 1 of fresh PID and mount namespaces, chrooted
//! into a root built from initrd/manifest.toml's busybox applet list (so an applet /init uses but
//! the manifest forgets fails here). Networking happens between two network namespaces the test
//! creates (no route out): busybox udhcpd on one side, /init's DHCP client on the other.
//! A fake `/bin/pxelab-installer` prints what /init gave it and what DHCP configured.
//!
//! Needs root, iproute2 (`ip`), util-linux (`unshare`) and a static busybox (busybox-static).

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use pxelab_tests::cmd::{require, require_root};
use pxelab_tests::NetNs;

fn initrd_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../initrd")
}

fn write_exec(path: &Path, text: &str) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, text).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

/// A root with busybox, the manifest's applet links, /init, the udhcpc hook and a fake installer.
fn build_root(dir: &Path) -> PathBuf {
    let root = dir.join("root");
    let manifest: toml::Value =
        toml::from_str(&fs::read_to_string(initrd_dir().join("manifest.toml")).unwrap())
            .expect("manifest.toml parses");
    fs::create_dir_all(root.join("bin")).unwrap();
    let busybox = fs::read("/bin/busybox").expect("/bin/busybox: apt-get install busybox-static");
    write_exec(&root.join("bin/busybox"), "");
    fs::write(root.join("bin/busybox"), busybox).unwrap();
    let links = manifest["busybox"]["links"]
        .as_array()
        .expect("[busybox] links");
    for link in links {
        symlink("busybox", root.join("bin").join(link.as_str().unwrap())).unwrap();
    }
    let extras = manifest["extra"].as_array().expect("[[extra]]");
    for extra in extras {
        let src = initrd_dir().join(extra["src"].as_str().unwrap());
        let dest = root.join(extra["dest"].as_str().unwrap().trim_start_matches('/'));
        fs::create_dir_all(dest.parent().unwrap()).unwrap();
        fs::copy(&src, &dest).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
        let mode = u32::from_str_radix(extra["mode"].as_str().unwrap(), 8).unwrap();
        fs::set_permissions(&dest, fs::Permissions::from_mode(mode)).unwrap();
    }
    fs::create_dir_all(root.join("etc")).unwrap();
    write_exec(
        &root.join("bin/pxelab-installer"),
        "#!/bin/sh\necho \"fake-installer args: $*\"\nip -4 -o addr show dev eth1\nip route\ncat /etc/resolv.conf\n\
         case \"$*\" in *switch-root*) echo /dev/no-such-root > /run/pxelab-switch-root; exit 4 ;; esac\nexit 1\n",
    );
    root
}

/// Runs /init in the client namespace and collects console lines until `until` appears. The
/// namespace's drop kills whatever a failed assertion leaves running.
fn run_init(client: &NetNs, root: &Path, cmdline: &str, until: &str) -> Vec<String> {
    fs::write(root.join("cmdline"), cmdline).unwrap();
    let mut child = client
        .command("unshare")
        .args([
            "--fork",
            "--pid",
            "--mount",
            "--kill-child=SIGKILL",
            "chroot",
        ])
        .arg(root)
        .arg("/init")
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("PXELAB_CMDLINE_FILE", "/cmdline")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run /init");
    let (tx, rx) = mpsc::channel();
    for pipe in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    drop(tx);
    let start = Instant::now();
    let mut lines = Vec::new();
    while start.elapsed() < Duration::from_secs(40) {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                let done = line.contains(until);
                lines.push(line);
                if done {
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        lines.iter().any(|l| l.contains(until)),
        "no {until:?} from /init; console:\n{}",
        lines.join("\n")
    );
    lines
}

#[test]
fn sys_init_brings_up_dhcp_on_the_boot_nic_and_runs_the_installer() {
    require_root("the /init test (namespaces, chroot)");
    require("ip", "iproute2");
    require("unshare", "util-linux");
    let dir = tempfile::tempdir().unwrap();
    let root = build_root(dir.path());
    let mut srv = NetNs::new("init-srv");
    let client = NetNs::new("init-client");
    // eth1 is the boot NIC, wired to the server namespace. eth0 comes first and has carrier
    // too, so only the MAC can make /init pick eth1.
    srv.ip(&format!(
        "link add veth-s type veth peer name eth1 netns {}",
        client.name()
    ));
    client.ip("link set eth1 address 52:54:00:aa:bb:cc");
    client.ip("link add eth0 address 52:54:00:00:00:99 type veth peer name eth0p");
    client.ip("link set eth0p up");
    client.ip("link set eth0 up");
    srv.ip("addr add 10.99.0.1/24 dev veth-s");
    srv.ip("link set veth-s up");
    let conf = dir.path().join("udhcpd.conf");
    fs::write(
        &conf,
        format!(
            "start 10.99.0.50\nend 10.99.0.60\ninterface veth-s\nlease_file {}\npidfile {}\n\
             option subnet 255.255.255.0\noption router 10.99.0.1\noption dns 10.99.0.1\noption domain lab.test\n",
            dir.path().join("leases").display(),
            dir.path().join("udhcpd.pid").display()
        ),
    )
    .unwrap();
    fs::write(dir.path().join("leases"), "").unwrap();
    let udhcpd = srv
        .command("/bin/busybox")
        .args(["udhcpd", "-f"])
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("udhcpd");
    srv.adopt(udhcpd);

    // Install path: DHCP on the NIC iPXE booted from, installer started with config_url.
    let cmdline = "console=ttyS0 BOOTIF=01-52-54-00-AA-BB-CC config_url=http://10.99.0.1/config/52-54-00-aa-bb-cc pxelab.retries=2 quiet";
    let lines = run_init(&client, &root, cmdline, "console shell");
    let text = lines.join("\n");
    assert_eq!(
        lines.first().map(String::as_str),
        Some("pxelab-init: started"),
        "{text}"
    );
    assert!(
        text.contains("pxelab-init: network: DHCP on eth1"),
        "{text}"
    );
    assert!(text.contains("fake-installer args: config_url=http://10.99.0.1/config/52-54-00-aa-bb-cc pxelab.retries=2"), "{text}");
    assert!(
        text.contains("inet 10.99.0.5") && text.contains("/24"),
        "{text}"
    );
    assert!(text.contains("default via 10.99.0.1 dev eth1"), "{text}");
    assert!(
        text.contains("nameserver 10.99.0.1") && text.contains("search lab.test"),
        "{text}"
    );
    assert!(
        text.contains("INSTALL FAILED (installer exit code 1)"),
        "{text}"
    );
    assert!(text.contains("pxelab-init: console shell"), "{text}");

    // The installer asks for a switch into the installed root (exit code 4 and the device in
    // /run/pxelab-switch-root): /init gives up the NIC's lease and takes it down for the
    // installed system, and when the root does not mount it says so and keeps a shell (PID 1
    // must not exit). The switch itself is the e2e's: it boots a real installed root.
    let cmdline =
        "console=ttyS0 BOOTIF=01-52-54-00-AA-BB-CC config_url=http://10.99.0.1/config/switch-root";
    let lines = run_init(&client, &root, cmdline, "console shell");
    let text = lines.join("\n");
    assert!(
        text.contains(
            "pxelab-init: cannot mount the installed root /dev/no-such-root to switch to it"
        ),
        "{text}"
    );
    assert!(!text.contains("INSTALL FAILED"), "{text}");
    let eth1 = client.ip("-4 -o addr show dev eth1");
    assert!(!eth1.contains("10.99.0."), "the lease was kept: {eth1}");
    let link = client.ip("-o link show dev eth1");
    assert!(link.contains("state DOWN"), "eth1 is still up: {link}");
    client.ip("link set eth1 up");

    // The handler's real command line has no BOOTIF: the MAC in config_url names the NIC.
    let cmdline = "console=ttyS0,115200 config_url=http://10.99.0.1/config/52:54:00:aa:bb:cc initrd=initrd.img";
    let lines = run_init(&client, &root, cmdline, "console shell");
    let text = lines.join("\n");
    assert!(
        text.contains("pxelab-init: network: DHCP on eth1"),
        "{text}"
    );
    let args = "fake-installer args: config_url=http://10.99.0.1/config/52:54:00:aa:bb:cc";
    assert!(lines.iter().any(|l| l == args), "{text}");

    // Debug mode: a shell instead of the installer.
    let lines = run_init(
        &client,
        &root,
        "pxelab.mode=shell config_url=http://x/",
        "debug shell requested",
    );
    assert!(
        !lines.iter().any(|l| l.contains("fake-installer")),
        "{lines:?}"
    );

    // A boot MAC that no NIC has: a clear message, then the shell (never the installer).
    let lines = run_init(
        &client,
        &root,
        "pxelab.mac=02:00:00:00:00:42 config_url=http://x/",
        "console shell",
    );
    let text = lines.join("\n");
    assert!(
        text.contains("no network interface with MAC 02:00:00:00:00:42"),
        "{text}"
    );
    assert!(!text.contains("fake-installer"), "{text}");
}
