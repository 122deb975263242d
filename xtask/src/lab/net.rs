//! The lab network: one network namespace holding a bridge, the stack's address and one tap per
//! VM. Nothing links the namespace to the host (no veth, no route, no NAT), so lab traffic can
//! never leave through the host's default route. Everything that talks to a VM runs inside it:
//! child processes through `ip netns exec`, and in-process HTTP through [`in_netns`].

use std::{fmt, fs::File, net::Ipv4Addr, os::fd::AsRawFd, path::PathBuf, str::FromStr};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use xshell::{cmd, Shell};

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
#[derive(Clone, Debug)]
pub struct LabNet {
    pub ns: String,
    pub subnet: Subnet,
}

impl LabNet {
    pub fn exists(&self) -> bool {
        netns_path(&self.ns).exists()
    }

    /// Creates the namespace, its loopback and the bridge with the stack's address. Idempotent.
    pub fn create(&self) -> Result<()> {
        require_root("create the lab network namespace")?;
        let sh = Shell::new()?;
        let ns = &self.ns;
        if !self.exists() {
            cmd!(sh, "ip netns add {ns}")
                .quiet()
                .run()
                .context("creating the lab namespace")?;
        }
        let addr = format!("{}/{}", self.subnet.gateway(), self.subnet.prefix());
        let setup = || -> Result<()> {
            cmd!(sh, "ip -n {ns} link set lo up").quiet().run()?;
            if cmd!(sh, "ip -n {ns} link show {BRIDGE}")
                .quiet()
                .ignore_stderr()
                .output()
                .is_err()
            {
                cmd!(sh, "ip -n {ns} link add {BRIDGE} type bridge")
                    .quiet()
                    .run()?;
            }
            let shown = cmd!(sh, "ip -n {ns} -4 addr show dev {BRIDGE}")
                .quiet()
                .read()?;
            if !shown.contains(&addr) {
                cmd!(sh, "ip -n {ns} addr add {addr} dev {BRIDGE}")
                    .quiet()
                    .run()?;
            }
            // An IPv6 prefix on the bridge lets the stack's dnsmasq send router advertisements;
            // without any, iPXE solicits a router five times (16 s here) before it boots.
            let ula = self.ula();
            let shown = cmd!(sh, "ip -n {ns} -6 addr show dev {BRIDGE}")
                .quiet()
                .read()?;
            if !shown.contains(&ula) {
                cmd!(sh, "ip -n {ns} addr add {ula} dev {BRIDGE} nodad")
                    .quiet()
                    .run()?;
            }
            cmd!(sh, "ip -n {ns} link set {BRIDGE} up").quiet().run()?;
            Ok(())
        };
        setup().with_context(|| format!("setting up bridge {BRIDGE} in namespace {ns}"))
    }

    /// The bridge's IPv6 address: a unique local /64 (RFC 4193) whose global ID comes from
    /// the namespace name, so two labs on one host never share a prefix.
    pub fn ula(&self) -> String {
        let id = Sha256::digest(self.ns.as_bytes());
        let word = |hi: u8, lo: u8| u16::from_be_bytes([hi, lo]);
        // Printed the way iproute2 prints it (RFC 5952), so `addr show` output matches.
        let addr = std::net::Ipv6Addr::new(
            word(0xfd, id[0]),
            word(id[1], id[2]),
            word(id[3], id[4]),
            0,
            0,
            0,
            0,
            1,
        );
        format!("{addr}/64")
    }

    /// Adds a tap enslaved to the bridge (QEMU opens it from inside the namespace). Idempotent.
    pub fn add_tap(&self, tap: &str) -> Result<()> {
        let sh = Shell::new()?;
        let ns = &self.ns;
        if cmd!(sh, "ip -n {ns} link show {tap}")
            .quiet()
            .ignore_stderr()
            .output()
            .is_err()
        {
            cmd!(sh, "ip -n {ns} tuntap add dev {tap} mode tap")
                .quiet()
                .run()
                .with_context(|| format!("creating tap {tap} in namespace {ns}"))?;
        }
        cmd!(sh, "ip -n {ns} link set {tap} master {BRIDGE} up")
            .quiet()
            .run()
            .with_context(|| format!("attaching tap {tap} to {BRIDGE}"))?;
        Ok(())
    }

    /// Deletes the namespace and with it the bridge and every tap. Processes still inside must
    /// have been stopped first (the caller does that).
    pub fn destroy(&self) -> Result<()> {
        if !self.exists() {
            return Ok(());
        }
        let sh = Shell::new()?;
        let ns = &self.ns;
        cmd!(sh, "ip netns del {ns}")
            .quiet()
            .run()
            .with_context(|| format!("deleting namespace {ns}"))
    }

    /// The argument prefix that runs a program inside the namespace.
    pub fn exec_prefix(&self) -> Vec<String> {
        vec!["ip".into(), "netns".into(), "exec".into(), self.ns.clone()]
    }
}

fn netns_path(ns: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(ns)
}

pub fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "pxelab needs root to {what} (it creates a network namespace, a bridge and taps): \
             run as root, e.g. `sudo -E cargo xtask …`"
        );
    }
    Ok(())
}

/// Runs `f` on a thread that has joined the namespace `ns`, so every socket `f` opens belongs to
/// the lab network. Only blocking, same-thread clients (std, ureq) may be used inside: a client
/// with its own worker threads (reqwest) would open sockets in the host namespace.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let file = File::open(netns_path(ns))
        .with_context(|| format!("lab namespace {ns} does not exist: run `cargo xtask lab up`"))?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: setns on a valid namespace fd only changes this thread's namespace.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    bail!(
                        "joining namespace {ns}: {}",
                        std::io::Error::last_os_error()
                    );
                }
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("a thread inside namespace {ns} panicked"))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
        require_root("run this test").unwrap();
        let net = LabNet {
            ns: format!("pxelab-test-{}", std::process::id()),
            subnet: "10.99.0.0/24".parse().unwrap(),
        };
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
        // A socket opened inside the namespace cannot reach anything outside the lab subnet.
        let reached = in_netns(ns, || {
            std::net::TcpStream::connect_timeout(
                &"192.0.2.1:80".parse().unwrap(),
                std::time::Duration::from_millis(300),
            )
            .is_ok()
        })
        .unwrap();
        assert!(!reached);
        net.destroy().unwrap();
        assert!(!net.exists());
        drop(guard);
    }
}
