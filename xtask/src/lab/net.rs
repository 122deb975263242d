//! The lab network: one network namespace holding a bridge, the stack's address and one tap per
//! VM. Nothing links the namespace to the host (no veth, no route, no NAT), so lab traffic can
//! never leave through the host's default route. Everything that talks to a VM runs inside it,
//! through [`LabNet::command`]; the stack itself is also reachable over its control socket.

use std::{
    ffi::OsStr,
    fmt,
    io::Read,
    net::{Ipv4Addr, Ipv6Addr},
    os::unix::process::CommandExt,
    path::PathBuf,
    process::Stdio,
    str::FromStr,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use xshell::{cmd, Cmd, Shell};

use super::home::Lab;
use crate::process::{self, pid};

impl Lab {
    /// This lab's network (it may or may not exist yet).
    pub fn net(&self) -> Result<LabNet> {
        Ok(LabNet::new(
            self.config.namespace.clone(),
            self.subnet()?,
            self.netns_holder_pidfile(),
        ))
    }

    pub fn subnet(&self) -> Result<Subnet> {
        self.config.subnet.parse()
    }
}

/// Tap names are at most 15 bytes; derived from the VM name so they are stable and unique.
pub fn tap_name(vm: &str) -> String {
    format!("pxt{}", &hex::encode(Sha256::digest(vm.as_bytes()))[..10])
}

/// An IPv4 subnet such as `10.77.0.0/24`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Subnet {
    network: Ipv4Addr,
    prefix: u8,
}

impl Subnet {
    /// The stack's own address on the lab network: the first host.
    pub fn gateway(&self) -> Ipv4Addr {
        self.host(1)
            .expect("a validated subnet has at least 4 addresses")
    }

    /// The `n`th address of the subnet, if it is a usable host address.
    pub fn host(&self, n: u32) -> Option<Ipv4Addr> {
        let size = 1u32 << (32 - self.prefix);
        (n >= 1 && n < size - 1).then(|| Ipv4Addr::from(u32::from(self.network) + n))
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX << (32 - self.prefix);
        u32::from(ip) & mask == u32::from(self.network)
    }

    /// Inside the subnet and neither its network nor its broadcast address.
    pub fn is_host(&self, ip: Ipv4Addr) -> bool {
        self.contains(ip) && self.host(u32::from(ip) - u32::from(self.network)).is_some()
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }
}

impl FromStr for Subnet {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Subnet> {
        let hint = "expected an IPv4 subnet such as 10.77.0.0/24 (prefix 8 to 29)";
        let (addr, prefix) = s
            .split_once('/')
            .with_context(|| format!("subnet {s:?}: {hint}"))?;
        let addr: Ipv4Addr = addr
            .parse()
            .with_context(|| format!("subnet {s:?}: {hint}"))?;
        let prefix: u8 = prefix
            .parse()
            .with_context(|| format!("subnet {s:?}: {hint}"))?;
        if !(8..=29).contains(&prefix) {
            bail!("subnet {s:?}: {hint}");
        }
        let mask = u32::MAX << (32 - prefix);
        if u32::from(addr) & !mask != 0 {
            bail!(
                "subnet {s:?} has host bits set: did you mean {}/{prefix}?",
                Ipv4Addr::from(u32::from(addr) & mask)
            );
        }
        Ok(Subnet {
            network: addr,
            prefix,
        })
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// The bridge inside the namespace; the name is private to the namespace, so it cannot clash.
pub const BRIDGE: &str = "pxbr0";

/// A lab network namespace (it may or may not exist yet).
///
/// As root it is a named namespace (`ip netns`, visible in `ip netns list`). As a normal user
/// it is held by a `sleep` that `unshare` started in a new user namespace (where the user is
/// root) and a new network namespace; everything that runs in the lab enters both with
/// `nsenter`. Nothing needs privileges on the host beyond a usable `/dev/net/tun`.
#[derive(Clone, Debug)]
pub struct LabNet {
    pub ns: String,
    pub subnet: Subnet,
    /// Where a rootless lab records its holder's pid.
    holder: PathBuf,
}

impl LabNet {
    pub fn new(ns: String, subnet: Subnet, holder: PathBuf) -> LabNet {
        LabNet { ns, subnet, holder }
    }

    pub fn exists(&self) -> bool {
        if rootless() {
            self.holder_pid().is_some()
        } else {
            netns_path(&self.ns).exists()
        }
    }

    /// The holder of a rootless lab, if it runs (a live process in another network namespace).
    fn holder_pid(&self) -> Option<pid::Pid> {
        let pid = pid::read(&self.holder)?;
        let ns_of = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/net")).ok();
        let theirs = ns_of(&pid.id().to_string())?;
        (Some(theirs) != ns_of("self")).then_some(pid)
    }

    /// Creates the namespace, its loopback and the bridge with the stack's address. Idempotent.
    pub fn create(&self) -> Result<()> {
        if rootless() {
            self.start_holder()?;
        } else if !self.exists() {
            let sh = process::shell()?;
            let ns = &self.ns;
            cmd!(sh, "ip netns add {ns}")
                .quiet()
                .run()
                .context("creating the lab namespace")?;
        }
        let addr = format!("{}/{}", self.subnet.gateway(), self.subnet.prefix());
        let setup = || -> Result<()> {
            self.ip(&["link", "set", "lo", "up"])?;
            if self.ip(&["link", "show", BRIDGE]).is_err() {
                self.ip(&["link", "add", BRIDGE, "type", "bridge"])?;
            }
            if !self
                .ip(&["-4", "addr", "show", "dev", BRIDGE])?
                .contains(&addr)
            {
                self.ip(&["addr", "add", &addr, "dev", BRIDGE])?;
            }
            // An IPv6 prefix on the bridge lets the stack's dnsmasq send router advertisements;
            // without any, iPXE solicits a router five times (16 s here) before it boots.
            let ula = self.ula();
            if !self
                .ip(&["-6", "addr", "show", "dev", BRIDGE])?
                .contains(&ula)
            {
                self.ip(&["addr", "add", &ula, "dev", BRIDGE, "nodad"])?;
            }
            self.ip(&["link", "set", BRIDGE, "up"])?;
            Ok(())
        };
        setup().with_context(|| format!("setting up bridge {BRIDGE} in namespace {}", self.ns))
    }

    /// Starts the process that holds a rootless lab's namespaces, unless it runs.
    fn start_holder(&self) -> Result<()> {
        if self.exists() {
            return Ok(());
        }
        require_tun()?;
        let sh = process::shell()?;
        let mut child = process::command(cmd!(
            sh,
            "unshare --user --map-root-user --net -- sleep infinity"
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        // Its own process group: a Ctrl-C aimed at `cargo xtask` must not take the lab down.
        .process_group(0)
        .spawn()
        .context("running unshare (util-linux) to create the lab's namespaces")?;
        let pid = child.id() as i32;
        let ours = std::fs::read_link("/proc/self/ns/net").ok();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(status) = child.try_wait()? {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                bail!(
                    "cannot create a user and network namespace ({status}: {}): this host forbids \
                     unprivileged user namespaces; allow them (`sysctl kernel.unprivileged_userns_clone=1`, \
                     or on Ubuntu `sysctl kernel.apparmor_restrict_unprivileged_userns=0`) or run as root",
                    err.trim()
                );
            }
            // Ready once unshare has exec'd `sleep`: the network namespace appears before
            // unshare writes the uid map, and a command entering in between is not root there
            // (measured on a loaded host: `ip link set lo up` failed with EPERM).
            let theirs = std::fs::read_link(format!("/proc/{pid}/ns/net")).ok();
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if theirs.is_some() && theirs != ours && comm.trim_end() == "sleep" {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("unshare did not create the lab's namespaces within 5 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        pid::write(&self.holder, pid::Pid::of(child.id())?)
    }

    /// The lab's IPv6 /64: a unique local prefix (RFC 4193) whose global ID comes from the
    /// namespace name, so two labs on one host never share a prefix.
    pub fn ipv6_prefix(&self) -> Ipv6Addr {
        let id = Sha256::digest(self.ns.as_bytes());
        let word = |hi: u8, lo: u8| u16::from_be_bytes([hi, lo]);
        Ipv6Addr::new(
            word(0xfd, id[0]),
            word(id[1], id[2]),
            word(id[3], id[4]),
            0,
            0,
            0,
            0,
            0,
        )
    }

    /// The stack's IPv6 address, the first of the lab's /64 (on the bridge in every lab: the
    /// router advertisements need it).
    pub fn stack_ipv6(&self) -> Ipv6Addr {
        Ipv6Addr::from(u128::from(self.ipv6_prefix()) | 1)
    }

    /// The bridge's IPv6 address with its prefix length, printed the way iproute2 prints it
    /// (RFC 5952), so `addr show` output matches.
    pub fn ula(&self) -> String {
        format!("{}/64", self.stack_ipv6())
    }

    /// A VM's IPv6 address in a lab with IPv6: the lab's /64 with the VM's IPv4 host number
    /// as its interface ID (10.77.0.10 on 10.77.0.0/24 → `<prefix>::a`), so the two
    /// addresses of a VM (and the stack's, `::1` beside `.1`) correspond.
    pub fn vm_ipv6(&self, ip: Ipv4Addr) -> Ipv6Addr {
        let host = u32::from(ip) & !(u32::MAX << (32 - self.subnet.prefix));
        Ipv6Addr::from(u128::from(self.ipv6_prefix()) | u128::from(host))
    }

    /// Adds a tap enslaved to the bridge (QEMU opens it from inside the namespace). Idempotent.
    pub fn add_tap(&self, tap: &str) -> Result<()> {
        if self.ip(&["link", "show", tap]).is_err() {
            self.ip(&["tuntap", "add", "dev", tap, "mode", "tap"])
                .with_context(|| format!("creating tap {tap} in namespace {}", self.ns))?;
        }
        self.ip(&["link", "set", tap, "master", BRIDGE, "up"])
            .with_context(|| format!("attaching tap {tap} to {BRIDGE}"))?;
        Ok(())
    }

    /// Deletes the namespace and with it the bridge and every tap. Processes still inside must
    /// have been stopped first (the caller does that).
    pub fn destroy(&self) -> Result<()> {
        if rootless() {
            if let Some(pid) = self.holder_pid() {
                // The namespaces die with their holder.
                pid.kill().context("stopping the lab's namespace holder")?;
            }
            let _ = std::fs::remove_file(&self.holder);
            return Ok(());
        }
        if !self.exists() {
            return Ok(());
        }
        let sh = process::shell()?;
        let ns = &self.ns;
        cmd!(sh, "ip netns del {ns}")
            .quiet()
            .run()
            .with_context(|| format!("deleting namespace {ns}"))
    }

    /// `program` run inside the lab network (as root there): `ip netns exec` into the named
    /// namespace, or, rootless, `nsenter` into the holder's user and network namespaces. Add
    /// arguments, then run it with xshell or through [`crate::process`].
    pub fn command<'a>(&self, sh: &'a Shell, program: impl AsRef<OsStr>) -> Result<Cmd<'a>> {
        let program = program.as_ref();
        if rootless() {
            let pid = self
                .holder_pid()
                .context("the lab network does not exist: run `cargo xtask lab up` first")?
                .id()
                .to_string();
            // uid 0 inside is the user's own uid; without --preserve-credentials nsenter would
            // also try to switch groups, which an unprivileged user namespace forbids.
            Ok(cmd!(
                sh,
                "nsenter --target {pid} --user --net --preserve-credentials -- {program}"
            ))
        } else {
            let ns = &self.ns;
            Ok(cmd!(sh, "ip netns exec {ns} {program}"))
        }
    }

    /// The route the namespace would take to an address outside the lab subnet (TEST-NET-1
    /// for IPv4, the documentation prefix for IPv6), if it has one. A lab has none: a packet
    /// to anywhere else is unroutable and never leaves.
    pub fn route_out(&self) -> Result<Option<String>> {
        for (family, outside) in [("-4", "192.0.2.1"), ("-6", "2001:db8::1")] {
            match self.ip(&[family, "route", "get", outside]) {
                Ok(route) => return Ok(Some(route)),
                Err(e) if format!("{e:#}").contains("Network is unreachable") => {}
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    /// Runs `ip <args>` in the namespace; its stdout, or an error with its stderr.
    fn ip(&self, args: &[&str]) -> Result<String> {
        let sh = process::shell()?;
        process::read(self.command(&sh, "ip")?.args(args))
            .with_context(|| format!("`ip {}` in namespace {}", args.join(" "), self.ns))
    }
}

fn netns_path(ns: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(ns)
}

/// Whether this lab runs without root: in a user namespace of its own.
pub fn rootless() -> bool {
    !process::is_root()
}

/// Why diskless targets need root: nfs-ganesha's VFS backend opens exported files by handle,
/// which needs CAP_DAC_READ_SEARCH on the host, not just in a user namespace.
pub const NO_ROOTLESS_NFS: &str =
    "the stack's NFS server opens files by handle, which needs CAP_DAC_READ_SEARCH on the host";

/// QEMU (and `ip tuntap`) open /dev/net/tun; udev makes it 0666 on a standard host, so that
/// users can create taps in namespaces they own.
fn require_tun() -> Result<()> {
    let path = std::ffi::CString::new("/dev/net/tun")?;
    // SAFETY: access(2) on a valid C string.
    if unsafe { libc::access(path.as_ptr(), libc::R_OK | libc::W_OK) } != 0 {
        bail!(
            "/dev/net/tun is not readable and writable by you ({}): a rootless lab needs it for \
             its taps; on a standard host udev makes it mode 0666 — `sudo chmod 0666 /dev/net/tun`, \
             or run as root",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_fit_the_kernel_limit_and_differ() {
        assert!(tap_name("a-very-long-vm-name-indeed").len() <= 15);
        assert_ne!(tap_name("a"), tap_name("b"));
    }

    /// A VM's IPv6 address is the lab's /64 with its IPv4 host number; the stack's is `::1`
    /// beside `.1`; two namespaces get different prefixes.
    #[test]
    fn ipv6_addresses_follow_the_ipv4_host_numbers() {
        let net = |ns: &str, subnet: &str| {
            LabNet::new(
                ns.into(),
                subnet.parse().unwrap(),
                PathBuf::from("/nonexistent"),
            )
        };
        let lab = net("pxelab-a", "10.77.0.0/24");
        let prefix = lab.ipv6_prefix();
        assert_eq!(prefix.segments()[0] >> 8, 0xfd, "not a ULA: {prefix}");
        assert_eq!(&prefix.segments()[3..], [0; 5]);
        assert_eq!(u128::from(lab.stack_ipv6()), u128::from(prefix) | 1);
        assert_eq!(lab.ula(), format!("{}/64", lab.stack_ipv6()));
        let ten = lab.vm_ipv6(Ipv4Addr::new(10, 77, 0, 10));
        assert_eq!(u128::from(ten), u128::from(prefix) | 10);
        assert!(ten.to_string().ends_with("::a"), "{ten}");
        let wide = net("pxelab-a", "10.64.0.0/12");
        assert_eq!(
            u128::from(wide.vm_ipv6(Ipv4Addr::new(10, 65, 2, 3))),
            u128::from(prefix) | 0x0001_0203
        );
        assert_ne!(net("pxelab-b", "10.77.0.0/24").ipv6_prefix(), prefix);
    }

    #[test]
    fn subnet_parsing_and_hosts() {
        let s: Subnet = "10.77.0.0/24".parse().unwrap();
        assert_eq!(s.gateway(), Ipv4Addr::new(10, 77, 0, 1));
        assert_eq!(s.host(254), Some(Ipv4Addr::new(10, 77, 0, 254)));
        assert_eq!(s.host(255), None);
        assert!(s.contains(Ipv4Addr::new(10, 77, 0, 9)));
        assert!(!s.contains(Ipv4Addr::new(10, 77, 1, 9)));
        assert!(
            !s.is_host(Ipv4Addr::new(10, 77, 0, 0)) && !s.is_host(Ipv4Addr::new(10, 77, 0, 255))
        );
        let err = "10.77.0.1/24".parse::<Subnet>().unwrap_err().to_string();
        assert!(err.contains("10.77.0.0/24"), "{err}");
        assert!("10.77.0.0".parse::<Subnet>().is_err());
        assert!("10.77.0.0/31".parse::<Subnet>().is_err());
    }

    /// Deletes the namespace even when an assertion fails.
    struct Cleanup(LabNet);

    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = self.0.destroy();
        }
    }

    #[test]
    fn sys_lab_network_has_no_route_out_and_is_removed() {
        assert!(
            !rootless(),
            "this test needs root (it creates a named namespace)"
        );
        let net = LabNet::new(
            format!("pxelab-test-{}", std::process::id()),
            "10.99.0.0/24".parse().unwrap(),
            PathBuf::from("/nonexistent"),
        );
        let guard = Cleanup(net.clone());
        net.create().unwrap();
        net.create().unwrap(); // idempotent
        net.add_tap("pxttest0").unwrap();
        net.add_tap("pxttest0").unwrap();
        let sh = Shell::new().unwrap();
        let ns = &net.ns;
        let routes = cmd!(sh, "ip -n {ns} -4 route show").read().unwrap();
        assert_eq!(
            routes.trim(),
            "10.99.0.0/24 dev pxbr0 proto kernel scope link src 10.99.0.1 linkdown"
        );
        // IPv6: the bridge carries the lab's ULA (for router advertisements), and no route
        // leads anywhere else.
        let ula = net.ula();
        assert!(ula.starts_with("fd") && ula.ends_with("::1/64"), "{ula}");
        let v6 = cmd!(sh, "ip -n {ns} -6 addr show dev pxbr0")
            .read()
            .unwrap();
        assert!(v6.contains(&ula), "{ula} not on the bridge: {v6}");
        let routes6 = cmd!(sh, "ip -n {ns} -6 route show").read().unwrap();
        assert!(!routes6.contains("default"), "{routes6}");
        let links = cmd!(sh, "ip -n {ns} -o link show").read().unwrap();
        assert!(
            links.contains("pxttest0") && links.contains("master pxbr0"),
            "{links}"
        );
        assert!(
            !links.contains("veth"),
            "nothing may link the lab to the host: {links}"
        );
        // Nothing outside the lab subnet is routable, and the check sees a route once there
        // is one (for each family).
        assert_eq!(net.route_out().unwrap(), None);
        for family in ["-4", "-6"] {
            net.ip(&[family, "route", "add", "default", "dev", BRIDGE])
                .unwrap();
            let route = net.route_out().unwrap();
            assert!(
                route.as_deref().is_some_and(|r| r.contains(BRIDGE)),
                "a default route via {BRIDGE} ({family}) went unnoticed: {route:?}"
            );
            net.ip(&[family, "route", "del", "default"]).unwrap();
        }
        assert_eq!(net.route_out().unwrap(), None);
        net.destroy().unwrap();
        assert!(!net.exists());
        drop(guard);
    }
}
