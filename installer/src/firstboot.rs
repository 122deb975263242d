//! systemd units for the installed system's first boot: SSH before cloud-init, and a report to
//! the stack when cloud-init is done.
//!
//! cloud-init (Debian 12: 22.4) orders itself before sshd: `cloud-init.service` is
//! `Before=sysinit.target` and `Before=sshd.service`, and the network comes up only after
//! `cloud-init-local` (`Before=network-pre.target`). Two Python stages under emulation kept
//! SSH down for most of the first boot. With host keys and the login already on the disk, SSH
//! needs only the NIC, so `pxelab-early-ssh.service` (no default dependencies) gives the NIC
//! the address the installer itself was leased — the same reservation DHCP hands out again
//! later — and runs sshd on it until Debian's `ssh.service` starts; that one's drop-in stops
//! the early sshd first (sessions survive: `KillMode=process`). The NIC gets the name the
//! NoCloud network-config gives it (by the unit itself, and a `.link` file for udev), so
//! cloud-init finds it already named and renames nothing under a live sshd. Only until cloud-init finished its first run
//! (`/var/lib/cloud/instance/boot-finished`): later boots are left to the distro. The early
//! sshd waits for nothing (the root need not be remounted read-write to serve a login), and
//! cloud-init's first Python stage waits for it: under TCG the two together took both vCPUs
//! and the sshd listened 5 s later than alone.
//!
//! systemd keeps `/run/nologin` until the boot is complete, and sshd's PAM stack has
//! `pam_nologin` (measured: every login refused until cloud-init's second stage was done). The
//! early sshd has a PAM service of its own: its stack is the distro's common one, without
//! `pam_nologin` (or the motd and mail session extras). OpenSSH up to 9.7 (Debian 12) names the
//! service after its program, so the early sshd runs under its own name; from 9.8 the PAM work
//! is `sshd-session`'s, under the fixed service `sshd` unless `PAMServiceName` (10.0, Debian 13)
//! says otherwise, so where sshd knows that keyword the unit passes it too.
//!
//! `pxelab-cloud-init-done.service` runs after `cloud-final` on every boot and posts a
//! `cloud-init-done` event with each stage's duration and any errors.

use std::fs;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use pxelab_contract::{Mac, NIC_NAME};

use crate::error::{Context, Result};
use crate::seed::write_atomic;

const UNITS: &str = "etc/systemd/system";
pub const EARLY_SSH: &str = "pxelab-early-ssh.service";
pub const CLOUD_INIT_DONE: &str = "pxelab-cloud-init-done.service";
const REPORTER: &str = "usr/local/lib/pxelab/cloud-init-done";
/// The early sshd's program name and PAM service.
const EARLY_SSHD: &str = "pxelab-early-sshd";
/// sshd's keyword for its PAM service, as its keyword table spells it.
const PAM_SERVICE_KEYWORD: &[u8] = b"pamservicename";
const EARLY_NET: &str = "usr/local/lib/pxelab/early-ssh-net";

/// The IPv4 address and prefix length of a network interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Address {
    pub ip: Ipv4Addr,
    pub prefix: u8,
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.ip, self.prefix)
    }
}

/// Writes the early-SSH unit, the NIC name and the `ssh.service` drop-in into the new root.
/// Returns a console phrase, or why there is no early SSH (e.g. the rootfs has no sshd).
pub fn early_ssh(root: &Path, mac: Mac, address: Address) -> Result<String> {
    let Some(ip) = find_in_root(root, &["ip"]) else {
        return Ok("no early SSH: the rootfs has no ip (iproute2)".into());
    };
    let Some(sshd) = find_in_root(root, &["sshd"]) else {
        return Ok("no early SSH: the rootfs has no sshd".into());
    };
    write_atomic(
        &root.join(format!("etc/systemd/network/10-pxelab-{NIC_NAME}.link")),
        link_file(mac).as_bytes(),
        0o644,
    )?;
    let program = format!("/usr/local/sbin/{EARLY_SSHD}");
    let link = root.join(&program[1..]);
    fs::create_dir_all(root.join("usr/local/sbin")).context(|| "creating /usr/local/sbin")?;
    let _ = fs::remove_file(&link);
    std::os::unix::fs::symlink(&sshd, &link).context(|| format!("creating {}", link.display()))?;
    write_atomic(
        &root.join("etc/pam.d").join(EARLY_SSHD),
        EARLY_SSHD_PAM.as_bytes(),
        0o644,
    )?;
    write_atomic(
        &root.join(EARLY_NET),
        early_net_script(&ip).as_bytes(),
        0o755,
    )?;
    write_atomic(
        &root.join(UNITS).join(EARLY_SSH),
        early_ssh_unit(&program, &pam_service_option(root, &sshd), mac, address).as_bytes(),
        0o644,
    )?;
    write_atomic(
        &root.join(UNITS).join("ssh.service.d/pxelab-early-ssh.conf"),
        SSH_DROP_IN.as_bytes(),
        0o644,
    )?;
    for python_stage in CLOUD_INIT_FIRST_STAGES {
        write_atomic(
            &root
                .join(UNITS)
                .join(format!("{python_stage}.d/pxelab-early-ssh.conf")),
            CLOUD_INIT_DROP_IN.as_bytes(),
            0o644,
        )?;
    }
    enable(root, "multi-user.target", EARLY_SSH)?;
    Ok(format!("early SSH on {NIC_NAME} {address}"))
}

/// Writes the unit and script that report `cloud-init-done` to `events_url`.
pub fn cloud_init_done(root: &Path, events_url: &str) -> Result<()> {
    write_atomic(&root.join(REPORTER), REPORTER_SCRIPT.as_bytes(), 0o755)?;
    write_atomic(
        &root.join(UNITS).join(CLOUD_INIT_DONE),
        cloud_init_done_unit(events_url).as_bytes(),
        0o644,
    )?;
    enable(root, "cloud-init.target", CLOUD_INIT_DONE)
}

/// What `systemctl enable` does for `WantedBy=<target>`.
fn enable(root: &Path, target: &str, unit: &str) -> Result<()> {
    let dir = root.join(UNITS).join(format!("{target}.wants"));
    fs::create_dir_all(&dir).context(|| format!("creating {}", dir.display()))?;
    let link = dir.join(unit);
    let _ = fs::remove_file(&link);
    std::os::unix::fs::symlink(format!("/{UNITS}/{unit}"), &link)
        .context(|| format!("creating {}", link.display()))
}

fn link_file(mac: Mac) -> String {
    format!(
        "# Written by pxelab-installer: the name the NoCloud network-config gives this NIC, here\n\
         # from the first boot on, so the early SSH can use it before cloud-init runs.\n\
         [Match]\n\
         MACAddress={mac}\n\
         \n\
         [Link]\n\
         Name={NIC_NAME}\n"
    )
}

/// `-o PAMServiceName=…` when the rootfs's sshd has the keyword (asked of its keyword table:
/// the target's sshd cannot be run here), else nothing, which older sshds would refuse.
fn pam_service_option(root: &Path, sshd: &str) -> String {
    let binary = fs::read(root.join(sshd.trim_start_matches('/'))).unwrap_or_default();
    let knows = binary
        .windows(PAM_SERVICE_KEYWORD.len())
        .any(|w| w == PAM_SERVICE_KEYWORD);
    if knows {
        format!(" -o PAMServiceName={EARLY_SSHD}")
    } else {
        String::new()
    }
}

fn early_ssh_unit(sshd: &str, pam_service: &str, mac: Mac, address: Address) -> String {
    format!(
        "# Written by pxelab-installer: SSH on the first boot before cloud-init has run (the host\n\
         # keys and the login are already in place). ssh.service stops it when it starts.\n\
         [Unit]\n\
         Description=OpenSSH server until cloud-init has run (pxelab first boot)\n\
         DefaultDependencies=no\n\
         ConditionPathExists=!/var/lib/cloud/instance/boot-finished\n\
         ConditionPathExists=!/etc/ssh/sshd_not_to_be_run\n\
         Conflicts=shutdown.target\n\
         Before=shutdown.target\n\
         \n\
         [Service]\n\
         Type=notify\n\
         ExecStartPre=/bin/sh /{EARLY_NET} {mac} {address}\n\
         ExecStart={sshd} -D -o PasswordAuthentication=no -o KbdInteractiveAuthentication=no -o PermitRootLogin=no{pam_service}\n\
         KillMode=process\n\
         RuntimeDirectory=sshd\n\
         RuntimeDirectoryMode=0755\n\
         # ssh.service uses the same directory after this one stops.\n\
         RuntimeDirectoryPreserve=yes\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n"
    )
}

/// Names the NIC and gives it the address without waiting for udev's coldplug (which reached
/// the NIC 14 s into userspace under TCG). udev applies the same `.link` name later and finds
/// it in place; whichever renames first, the other sees `lan0` already.
fn early_net_script(ip: &str) -> String {
    format!(
        "#!/bin/sh\n\
         # Written by pxelab-installer: name the NIC with MAC $1 {NIC_NAME}, as the .link file and\n\
         # cloud-init do, and give it address $2 (the installer's lease) for the early sshd.\n\
         mac=$1 address=$2\n\
         tries=0\n\
         while [ $tries -lt 300 ]; do\n\
         \tfor dev in /sys/class/net/*; do\n\
         \t\t[ \"$(cat \"$dev/address\" 2>/dev/null)\" = \"$mac\" ] || continue\n\
         \t\tname=${{dev##*/}}\n\
         \t\t[ \"$name\" = {NIC_NAME} ] || {ip} link set dev \"$name\" name {NIC_NAME} || continue\n\
         \t\t{ip} address replace \"$address\" dev {NIC_NAME} && {ip} link set {NIC_NAME} up && exit 0\n\
         \tdone\n\
         \ttries=$((tries + 1))\n\
         \tsleep 0.1\n\
         done\n\
         echo \"no network interface with MAC $mac came up\" >&2\n\
         exit 1\n"
    )
}

const EARLY_SSHD_PAM: &str = "\
# Written by pxelab-installer: PAM for the first boot's early sshd (its program name or
# PAMServiceName). /etc/pam.d/sshd without pam_nologin: systemd forbids logins until the
# boot is complete, and answering SSH before that is the point.
@include common-auth
@include common-account
@include common-session
@include common-password
";

const SSH_DROP_IN: &str = "\
# Written by pxelab-installer: take port 22 over from the first boot's early sshd.
[Service]
ExecStartPre=-/bin/systemctl stop pxelab-early-ssh.service
";

/// The units that start cloud-init's first Python process: `cloud-init-local` up to 24.2
/// (Debian 12), `cloud-init-main` from 24.3 (Debian 13), whose stages then only signal it.
const CLOUD_INIT_FIRST_STAGES: [&str; 2] = ["cloud-init-local.service", "cloud-init-main.service"];

/// Measured on Debian 12 under TCG: started together, Python's start-up took the two vCPUs and
/// the early sshd listened 5.2 s after it started. It needs far less; cloud-init waits for it.
const CLOUD_INIT_DROP_IN: &str = "\
# Written by pxelab-installer: cloud-init's first stage starts once the early sshd listens.
[Unit]
After=pxelab-early-ssh.service
";

fn cloud_init_done_unit(events_url: &str) -> String {
    format!(
        "# Written by pxelab-installer: tell the pxelab stack that cloud-init is done.\n\
         [Unit]\n\
         Description=Report cloud-init done to the pxelab stack\n\
         After=cloud-final.service\n\
         \n\
         [Service]\n\
         Type=oneshot\n\
         ExecStart=/usr/bin/python3 /{REPORTER} {events_url}\n\
         \n\
         [Install]\n\
         WantedBy=cloud-init.target\n"
    )
}

/// Python because cloud-init needs it anyway; never fails the unit (the stack may be gone).
const REPORTER_SCRIPT: &str = r#"#!/usr/bin/python3
# Written by pxelab-installer: posts a `cloud-init-done` event (each stage's duration and any
# errors, from /run/cloud-init/status.json) to the pxelab stack's events URL.
import json
import sys
import time
import urllib.request

url = sys.argv[1]
try:
    with open("/run/cloud-init/status.json") as f:
        status = json.load(f)["v1"]
except (OSError, ValueError, KeyError) as e:
    status = {"errors": ["no /run/cloud-init/status.json: %s" % e]}
stages, errors = [], list(status.get("errors") or [])
for name in ("init-local", "init", "modules-config", "modules-final"):
    stage = status.get(name) or {}
    if stage.get("start") and stage.get("finished"):
        stages.append("%s %.1f s" % (name, stage["finished"] - stage["start"]))
    errors += stage.get("errors") or []
message = ", ".join(stages) or "no stage times"
message += "; errors: " + " | ".join(errors) if errors else "; no errors"
body = json.dumps({"phase": "cloud-init-done", "message": message[:500]}).encode()
request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
for attempt in range(3):
    try:
        urllib.request.urlopen(request, timeout=10).read()
        break
    except OSError as e:
        print("cannot report cloud-init done to %s: %s" % (url, e), file=sys.stderr)
        time.sleep(2)
"#;

const SEARCH: [&str; 4] = ["usr/sbin", "usr/bin", "sbin", "bin"];

/// `/usr/sbin/<name>` (or another standard dir) as seen inside `root`, if it exists there. A
/// symlink counts without being followed: it points into `root`, not into our own root.
pub fn find_in_root(root: &Path, names: &[&str]) -> Option<String> {
    names.iter().find_map(|name| {
        SEARCH.iter().find_map(|dir| {
            let rel = format!("{dir}/{name}");
            let found = fs::symlink_metadata(root.join(&rel)).is_ok_and(|m| !m.is_dir());
            found.then(|| format!("/{rel}"))
        })
    })
}

/// The IPv4 address of the interface with `mac` (the one the installer was booted and leased
/// on). Asked of the kernel (not `/sys/class/net`, which shows the network namespace sysfs was
/// mounted in).
pub fn nic_address(mac: Mac) -> Result<Option<Address>> {
    let sock = Socket::new().context(|| "opening a socket to ask for interface addresses")?;
    for name in interface_names() {
        let hw = sock
            .query(&name, libc::SIOCGIFHWADDR)
            .context(|| format!("reading the MAC of {name}"))?;
        // SAFETY: SIOCGIFHWADDR fills ifru_hwaddr.
        let data = hw.map(|r| unsafe { r.ifr_ifru.ifru_hwaddr.sa_data });
        if data.is_some_and(|d| d[..6].iter().map(|b| *b as u8).eq(mac.octets())) {
            return sock
                .ipv4(&name)
                .context(|| format!("reading the address of {name}"));
        }
    }
    Ok(None)
}

/// Names of the network interfaces in this network namespace.
fn interface_names() -> Vec<String> {
    // SAFETY: if_nameindex returns a list terminated by a zero entry, freed below.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return Vec::new();
        }
        let mut names = Vec::new();
        let mut p = list;
        while (*p).if_index != 0 {
            names.push(
                std::ffi::CStr::from_ptr((*p).if_name)
                    .to_string_lossy()
                    .into_owned(),
            );
            p = p.add(1);
        }
        libc::if_freenameindex(list);
        names
    }
}

struct Socket(OwnedFd);

impl Socket {
    fn new() -> std::io::Result<Socket> {
        // SAFETY: socket has no memory-safety preconditions.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        Ok(Socket(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// An interface ioctl on `ifname`; `None` if the interface has no such address.
    fn query(&self, ifname: &str, request: libc::Ioctl) -> std::io::Result<Option<libc::ifreq>> {
        // SAFETY: ifreq is plain data; all-zero is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req
            .ifr_name
            .iter_mut()
            .zip(ifname.bytes().take(libc::IFNAMSIZ - 1))
        {
            *dst = src as libc::c_char;
        }
        // SAFETY: req is a valid ifreq, which these requests read and fill.
        if unsafe { libc::ioctl(self.0.as_raw_fd(), request, &mut req) } != 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EADDRNOTAVAIL) => Ok(None),
                _ => Err(e),
            };
        }
        Ok(Some(req))
    }

    fn ipv4_query(&self, ifname: &str, request: libc::Ioctl) -> std::io::Result<Option<Ipv4Addr>> {
        Ok(self.query(ifname, request)?.map(|req| {
            // SAFETY: for an AF_INET socket the kernel wrote a sockaddr_in into the union.
            let sin: libc::sockaddr_in = unsafe {
                std::ptr::read_unaligned(
                    (&raw const req.ifr_ifru.ifru_addr).cast::<libc::sockaddr_in>(),
                )
            };
            Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))
        }))
    }

    fn ipv4(&self, ifname: &str) -> std::io::Result<Option<Address>> {
        let (Some(ip), Some(mask)) = (
            self.ipv4_query(ifname, libc::SIOCGIFADDR)?,
            self.ipv4_query(ifname, libc::SIOCGIFNETMASK)?,
        ) else {
            return Ok(None);
        };
        let prefix = u32::from(mask).leading_ones() as u8;
        if ip.is_unspecified() || prefix == 0 {
            return Err(std::io::Error::other(format!(
                "unusable address {ip}/{prefix}"
            )));
        }
        Ok(Some(Address { ip, prefix }))
    }
}

/// Why there is no early SSH when the installer's NIC has no address (run outside the initrd).
pub fn no_address(mac: Mac) -> String {
    format!("no early SSH: no interface with MAC {mac} has an IPv4 address")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac() -> Mac {
        "52:54:00:12:34:56".parse().unwrap()
    }

    #[test]
    fn early_ssh_units_name_the_nic_and_hand_over_to_ssh_service() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        let address = Address {
            ip: Ipv4Addr::new(10, 77, 0, 10),
            prefix: 24,
        };
        let why = early_ssh(root, mac(), address).unwrap();
        assert_eq!(why, "no early SSH: the rootfs has no ip (iproute2)");
        for (dir, tool) in [("bin", "ip"), ("usr/sbin", "sshd")] {
            fs::create_dir_all(root.join(dir)).unwrap();
            fs::write(root.join(dir).join(tool), "").unwrap();
        }
        assert_eq!(
            early_ssh(root, mac(), address).unwrap(),
            "early SSH on lan0 10.77.0.10/24"
        );
        let link =
            fs::read_to_string(root.join("etc/systemd/network/10-pxelab-lan0.link")).unwrap();
        assert!(
            link.contains("[Match]\nMACAddress=52:54:00:12:34:56\n\n[Link]\nName=lan0\n"),
            "{link}"
        );
        let unit = fs::read_to_string(root.join(UNITS).join(EARLY_SSH)).unwrap();
        for line in [
            "DefaultDependencies=no\n",
            "ConditionPathExists=!/var/lib/cloud/instance/boot-finished\n",
            "ExecStartPre=/bin/sh /usr/local/lib/pxelab/early-ssh-net 52:54:00:12:34:56 10.77.0.10/24\n",
            "ExecStart=/usr/local/sbin/pxelab-early-sshd -D -o PasswordAuthentication=no",
            "KillMode=process\n",
            "RuntimeDirectoryPreserve=yes\n",
        ] {
            assert!(unit.contains(line), "{line:?} missing from\n{unit}");
        }
        // An sshd before OpenSSH 10 refuses the keyword; one that has it is given its service.
        assert!(!unit.contains("PAMServiceName"), "{unit}");
        fs::write(root.join("usr/sbin/sshd"), b"\x7fELF..pamservicename\0..").unwrap();
        early_ssh(root, mac(), address).unwrap();
        let unit = fs::read_to_string(root.join(UNITS).join(EARLY_SSH)).unwrap();
        assert!(
            unit.contains("-o PermitRootLogin=no -o PAMServiceName=pxelab-early-sshd\n"),
            "{unit}"
        );
        assert_eq!(
            fs::read_link(root.join("usr/local/sbin/pxelab-early-sshd")).unwrap(),
            Path::new("/usr/sbin/sshd")
        );
        let pam = fs::read_to_string(root.join("etc/pam.d/pxelab-early-sshd")).unwrap();
        assert!(pam.contains("@include common-account\n") && !pam.contains("pam_nologin.so\n"));
        let drop_in =
            fs::read_to_string(root.join(UNITS).join("ssh.service.d/pxelab-early-ssh.conf"))
                .unwrap();
        assert!(drop_in.contains("ExecStartPre=-/bin/systemctl stop pxelab-early-ssh.service\n"));
        // Nothing before the early sshd but the root: no remount, and cloud-init after it.
        assert!(!unit.contains("After="), "{unit}");
        for stage in ["cloud-init-local.service", "cloud-init-main.service"] {
            let drop_in = fs::read_to_string(
                root.join(UNITS)
                    .join(format!("{stage}.d/pxelab-early-ssh.conf")),
            )
            .unwrap();
            assert!(
                drop_in.contains("[Unit]\nAfter=pxelab-early-ssh.service\n"),
                "{drop_in}"
            );
        }
        assert_eq!(
            fs::read_link(
                root.join(UNITS)
                    .join("multi-user.target.wants")
                    .join(EARLY_SSH)
            )
            .unwrap(),
            Path::new("/etc/systemd/system/pxelab-early-ssh.service")
        );
    }

    #[test]
    fn cloud_init_done_runs_after_cloud_final_and_posts_to_the_stack() {
        let t = tempfile::tempdir().unwrap();
        cloud_init_done(t.path(), "http://10.77.0.1:8080/events/52-54-00-12-34-56").unwrap();
        let unit = fs::read_to_string(t.path().join(UNITS).join(CLOUD_INIT_DONE)).unwrap();
        assert!(unit.contains("After=cloud-final.service\n"), "{unit}");
        assert!(unit.contains(
            "ExecStart=/usr/bin/python3 /usr/local/lib/pxelab/cloud-init-done http://10.77.0.1:8080/events/52-54-00-12-34-56\n"
        ));
        assert!(t
            .path()
            .join(UNITS)
            .join("cloud-init.target.wants")
            .join(CLOUD_INIT_DONE)
            .is_symlink());
        let script = fs::read_to_string(t.path().join(REPORTER)).unwrap();
        assert!(script.contains(r#""phase": "cloud-init-done""#));
    }

    #[test]
    fn loopback_has_an_address_and_an_unknown_mac_has_none() {
        let sock = Socket::new().unwrap();
        assert_eq!(
            sock.ipv4("lo").unwrap(),
            Some(Address {
                ip: Ipv4Addr::LOCALHOST,
                prefix: 8
            })
        );
        assert!(interface_names().contains(&"lo".to_string()));
        assert_eq!(
            nic_address("02:00:00:00:00:01".parse().unwrap()).unwrap(),
            None
        );
    }
}
