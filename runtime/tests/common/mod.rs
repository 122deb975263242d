//! Test support: a temporary stack directory, the handler served in-process on loopback, and a
//! raw HTTP client (raw so tests can send exactly the bytes an attacker or a broken client would).
#![allow(dead_code)]

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use pxelab_runtime::{
    events::EventStore,
    handler::{watch_stores, Context},
    images::Catalog,
    server::{Server, ServerOptions},
    vms::VmStore,
};

pub const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIK0wmN/Cr3JXqmLW7u+g9pTh+wyqDHpSQEIQczXkVx9q lab@pxelab";
pub const MAC: &str = "52:54:00:aa:bb:01";

pub struct Stack {
    pub dir: tempfile::TempDir,
    pub server: Option<Server>,
    /// The same handler on `<state>/control.sock`, as the stack serves it.
    pub control: Option<Server>,
    pub addr: SocketAddr,
    /// What both serve (tests play the supervisor's part through it, e.g. a DHCP lease).
    pub context: Option<Arc<Context>>,
}

impl Stack {
    /// A stack directory with one x86_64 VM `t1` (MAC [`MAC`], reserved IP 127.0.0.1) and a
    /// complete, pulled `debian-12` distro, served with default options and the IP check on.
    pub fn new() -> Stack {
        Stack::with(
            ServerOptions {
                access_log: false,
                ..ServerOptions::default()
            },
            true,
        )
    }

    pub fn with(options: ServerOptions, ip_check: bool) -> Stack {
        let dir = tempfile::tempdir().unwrap();
        fill_root(dir.path());
        write_vm(dir.path(), "t1", MAC, Some("127.0.0.1"));
        let mut stack = Stack {
            dir,
            server: None,
            control: None,
            addr: "127.0.0.1:1".parse().unwrap(),
            context: None,
        };
        stack.start(options, ip_check);
        stack
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn context(root: &Path, ip_check: bool) -> Context {
        let vms = Arc::new(VmStore::new(root.join("vms")));
        let catalog = Arc::new(Catalog::new(root.join("images"), root.join("initrds")));
        Context {
            watch: Some(watch_stores(&vms, &catalog).expect("inotify")),
            vms,
            events: Arc::new(EventStore::open(&root.join("state")).unwrap()),
            catalog: catalog.clone(),
            advertise: Some("10.0.0.1".into()),
            ip_check,
            proxy_dhcp: false,
            leases: Arc::default(),
            domain: "pxelab.local".into(),
            dhcpv6: false,
            nfs: Some(pxelab_runtime::nfsroot::NfsRoots::new(
                catalog.clone(),
                root.join("state/nfsroot"),
            )),
            api_token: None,
        }
    }

    /// (Re)starts the server on a fresh port and the control socket over the same directories.
    pub fn start(&mut self, options: ServerOptions, ip_check: bool) {
        self.stop();
        let context = Stack::context(self.root(), ip_check);
        self.serve(context, options);
    }

    /// Stops the server and the control socket, and returns once their context is gone: its
    /// journal has written its last lines and closed, as when a stack process exits, so a new
    /// context can open it.
    pub fn stop(&mut self) {
        for s in [self.server.take(), self.control.take()]
            .into_iter()
            .flatten()
        {
            s.shutdown();
        }
        if let Some(old) = self.context.take().map(|c| Arc::downgrade(&c)) {
            let t = std::time::Instant::now();
            while old.strong_count() > 0 {
                assert!(
                    t.elapsed() < Duration::from_secs(5),
                    "old server still running"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// Serves `context` (made after [`Stack::stop`]: one journal open at a time) on a fresh
    /// port and the control socket.
    pub fn serve(&mut self, context: Context, options: ServerOptions) {
        self.stop();
        let context = Arc::new(context);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let server = Server::start(listener, context.clone(), options.clone()).unwrap();
        self.addr = server.local_addr();
        self.server = Some(server);
        let path = self.control_path();
        let _ = std::fs::remove_file(&path);
        let unix = UnixListener::bind(&path).unwrap();
        self.control = Some(Server::start_unix(unix, self.addr, context.clone(), options).unwrap());
        self.context = Some(context);
    }

    /// [`Stack::new`] with the enrollment API on, for the operator token `token`.
    pub fn with_api_token(token: &str) -> Stack {
        let mut s = Stack::new();
        s.reconfigure(|c| c.api_token = Some(token.into()));
        s
    }

    /// Restarts the stack as [`Stack::new`] runs it, with its context changed by `edit` first.
    pub fn reconfigure(&mut self, edit: impl FnOnce(&mut Context)) {
        self.stop();
        let mut context = Stack::context(self.root(), true);
        edit(&mut context);
        self.serve(
            context,
            ServerOptions {
                access_log: false,
                ..ServerOptions::default()
            },
        );
    }

    /// A stop and start of the stack as [`Stack::new`] runs it (same directories, new port).
    pub fn restart(&mut self) {
        self.start(
            ServerOptions {
                access_log: false,
                ..ServerOptions::default()
            },
            true,
        );
    }

    pub fn control_path(&self) -> PathBuf {
        self.root()
            .join("state")
            .join(pxelab_contract::CONTROL_SOCKET)
    }

    /// `method target` over the control socket.
    pub fn control(&self, method: &str, target: &str) -> Reply {
        control(&self.control_path(), method, target)
    }

    pub fn get(&self, target: &str) -> Reply {
        self.raw(&format!(
            "GET {target} HTTP/1.1\r\nHost: pxe.test\r\nConnection: close\r\n\r\n"
        ))
    }

    /// The text of `/ipxe` for the test VM `t1`.
    pub fn ipxe(&self) -> String {
        self.get(&format!("/ipxe?mac={MAC}")).text()
    }

    /// Boots `t1` into its installer; the boot's token.
    pub fn boot(&self) -> String {
        let script = self.ipxe();
        token_in(&script).unwrap_or_else(|| panic!("no boot token in {script}"))
    }

    /// `POST /events/<MAC>?token=` with `body`.
    pub fn post_event(&self, token: &str, body: &str) -> Reply {
        self.send(
            "POST",
            &format!("/events/{MAC}?token={token}"),
            body.as_bytes(),
        )
    }

    /// `GET target` on the control socket, as JSON.
    pub fn control_json(&self, target: &str) -> serde_json::Value {
        self.control("GET", target).json()
    }

    /// t1's state, read on the control socket.
    pub fn state(&self) -> String {
        self.control_json("/status")["vms"][0]["state"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// The phases of `name`'s timeline, read on the control socket.
    pub fn phases(&self, name: &str) -> Vec<String> {
        phases(&self.control_path(), name)
    }

    pub fn send(&self, method: &str, target: &str, body: &[u8]) -> Reply {
        self.send_with(method, target, &[], body)
    }

    /// [`Stack::send`] with extra header lines (`("Authorization", "Bearer …")`).
    pub fn send_with(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Reply {
        let extra: String = headers
            .iter()
            .map(|(name, value)| format!("{name}: {value}\r\n"))
            .collect();
        let mut req = format!(
            "{method} {target} HTTP/1.1\r\nHost: pxe.test\r\nConnection: close\r\n{extra}Content-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        raw_bytes(self.addr, &req)
    }

    pub fn raw(&self, request: &str) -> Reply {
        raw_bytes(self.addr, request.as_bytes())
    }
}

/// A stack directory without VMs: `vms/`, `state/`, a complete pulled `debian-12` (x86_64)
/// and its installer initrd.
pub fn fill_root(root: &Path) {
    for d in ["vms", "state", "images/debian-12/x86_64", "initrds/x86_64"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    let img = root.join("images/debian-12/x86_64");
    std::fs::write(img.join("vmlinuz"), b"KERNEL-IMAGE-0123456789").unwrap();
    std::fs::write(img.join("modules.cpio.zst"), b"MODULES").unwrap();
    let rootfs = b"ROOTFS-TARBALL";
    std::fs::write(img.join("rootfs.tar.zst"), rootfs).unwrap();
    let manifest = serde_json::json!({
        "rootfs": {"file": "rootfs.tar.zst", "sha256": sha256_of(rootfs), "size": rootfs.len()},
        "kernel_version": "6.1.0-99-cloud-amd64"
    });
    std::fs::write(img.join("manifest.json"), manifest.to_string()).unwrap();
    std::fs::write(root.join("initrds/x86_64/initrd.img"), b"INSTALLER-INITRD").unwrap();
}

pub fn write_vm(root: &Path, name: &str, mac: &str, ip: Option<&str>) -> PathBuf {
    let mut vm = serde_json::json!({
        "name": name, "arch": "x86_64", "distro": "debian-12", "mac": mac,
        "ssh_key": format!("{KEY}\n"), "pxeboot": true,
    });
    if let Some(ip) = ip {
        vm["ip"] = ip.into();
    }
    let path = root.join("vms").join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(&vm).unwrap()).unwrap();
    path
}

pub fn sha256_of(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// An `/ipxe` reply for a target that cannot boot yet: a script that prints `reason` on its
    /// console and asks again later (iPXE would show only an error number for an error status).
    pub fn assert_told_to_wait_because(&self, reason: &str) {
        let t = self.text();
        assert_eq!(self.status, 200, "{t}");
        let lines: Vec<&str> = t.lines().collect();
        assert!(
            lines.len() == 4
                && lines[0] == "#!ipxe"
                && lines[1].starts_with("echo pxelab: ")
                && lines[1].contains(reason)
                && lines[2] == "sleep 10"
                && lines[3].starts_with("chain --replace --autofree http://")
                && lines[3].contains("/ipxe?mac="),
            "not a wait script saying {reason:?}: {t}"
        );
    }

    /// Error bodies are exactly one line.
    pub fn assert_one_line(&self) {
        let t = self.text();
        assert!(
            t.ends_with('\n') && t.matches('\n').count() == 1,
            "not one line: {t:?}"
        );
    }
}

/// `method target` (no body) over the control socket at `socket`.
pub fn control(socket: &Path, method: &str, target: &str) -> Reply {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {target} HTTP/1.1\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    parse_reply(&out).unwrap_or_else(|| panic!("no HTTP reply to {method} {target}: {out:?}"))
}

/// The phases of VM `name`'s timeline, from the control socket `socket`.
pub fn phases(socket: &Path, name: &str) -> Vec<String> {
    control(socket, "GET", &format!("/vms/{name}/timeline"))
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["phase"].as_str().unwrap().to_string())
        .collect()
}

/// The boot token in an iPXE script (`…?token=<hex>`).
pub fn token_in(script: &str) -> Option<String> {
    let at = script.find("?token=")? + "?token=".len();
    let token: String = script[at..]
        .chars()
        .take_while(char::is_ascii_hexdigit)
        .collect();
    (token.len() == 32).then_some(token)
}

/// A connection to `addr` from the loopback address `from` (any of 127.0.0.0/8): another host
/// as far as the stack can tell.
pub fn connect_from(from: Ipv4Addr, addr: SocketAddr) -> TcpStream {
    use std::os::fd::FromRawFd;
    let sockaddr = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    let SocketAddr::V4(to) = addr else {
        panic!("IPv4 only: {addr}")
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: a new socket we own, bound and connected with valid sockaddr_in values.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "{}", std::io::Error::last_os_error());
        let stream = TcpStream::from_raw_fd(fd);
        let local = sockaddr(from, 0);
        let rc = libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), len);
        assert_eq!(rc, 0, "bind {from}: {}", std::io::Error::last_os_error());
        let remote = sockaddr(*to.ip(), to.port());
        let rc = libc::connect(fd, (&remote as *const libc::sockaddr_in).cast(), len);
        assert_eq!(rc, 0, "connect {addr}: {}", std::io::Error::last_os_error());
        stream
    }
}

/// [`raw_bytes`] from another loopback address (see [`connect_from`]).
pub fn raw_from(from: Ipv4Addr, addr: SocketAddr, request: &str) -> Reply {
    let mut s = connect_from(from, addr);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    parse_reply(&out).unwrap_or_else(|| panic!("no HTTP reply to {request:?}: {out:?}"))
}

/// Sends `request` on a fresh connection and reads the reply until the server closes it.
pub fn raw_bytes(addr: SocketAddr, request: &[u8]) -> Reply {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    parse_reply(&out).unwrap_or_else(|| {
        panic!(
            "no HTTP reply to {:?}: got {:?}",
            String::from_utf8_lossy(request),
            String::from_utf8_lossy(&out)
        )
    })
}

pub fn parse_reply(out: &[u8]) -> Option<Reply> {
    let split = out.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&out[..split]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    Some(Reply {
        status,
        headers,
        body: out[split + 4..].to_vec(),
    })
}

/// `uname -r` of the kernel in [`rootfs_tar_zst`].
pub const KVER: &str = "6.1.0-99-cloud-amd64";

/// A tiny root filesystem: an initramfs in /boot, a setuid binary, a root-only file, a symlink
/// and a hard link, and a directory whose mode only applies once its content is written.
pub fn rootfs_tar_zst() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: &str, mode: u32, kind: tar::EntryType, data: &[u8], link: Option<&str>| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_686_355_200);
        h.set_size(data.len() as u64);
        if let Some(l) = link {
            h.set_link_name(l).unwrap();
        }
        h.set_path(path).unwrap();
        h.set_cksum();
        b.append(&h, data).unwrap();
    };
    use tar::EntryType::*;
    add("./", 0o755, Directory, b"", None);
    add("./boot/", 0o755, Directory, b"", None);
    add(
        &format!("./boot/initrd.img-{KVER}"),
        0o644,
        Regular,
        b"DISTRO-INITRAMFS",
        None,
    );
    add("./etc/", 0o755, Directory, b"", None);
    add("./etc/hostname", 0o644, Regular, b"unset\n", None);
    add("./etc/shadow", 0o640, Regular, b"root:*:1::::::\n", None);
    add("./usr/bin/", 0o755, Directory, b"", None);
    add("./usr/bin/sudo", 0o4755, Regular, b"#!/bin/sh\n", None);
    add(
        "./usr/bin/sudoedit",
        0o4755,
        Link,
        b"",
        Some("usr/bin/sudo"),
    );
    add("./bin", 0o777, Symlink, b"", Some("usr/bin"));
    add("./root/", 0o700, Directory, b"", None);
    add("./root/.profile", 0o644, Regular, b"# root\n", None);
    let tar = b.into_inner().unwrap();
    zstd::encode_all(&tar[..], 3).unwrap()
}

/// The stack process; killed on drop if a test fails mid-way (its children follow through
/// their parent-death signal), and its log printed so the failure explains itself.
pub struct StackProcess {
    pub child: Option<std::process::Child>,
    pub log: PathBuf,
}

impl Drop for StackProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- stack log\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}
