//! dnsmasq: the configuration rendered from the VM definitions, and its command line.
//!
//! The main file (`dnsmasq.conf`) depends only on the stack's settings; everything that depends
//! on the VMs lives in two files dnsmasq re-reads on SIGHUP: `dhcp-hosts` (one reservation per
//! MAC) and `hosts` (DNS names). Unknown MACs get nothing: the only DHCP range is `static` and
//! clients without a reservation are ignored outright.
//!
//! Boot file per client (tags are mutually exclusive, so dnsmasq's order of `dhcp-boot` lines
//! does not matter): iPXE (option 175 present) → `http://<server>/boot.ipxe`, which chains to
//! `/ipxe?mac=${mac}`; UEFI x86_64 (client-arch 7 or 9) → `ipxe.efi`; UEFI arm64 (11) →
//! `ipxe-arm64.efi`; anything else (BIOS) → `undionly.kpxe`; the last three over TFTP. UEFI
//! HTTP boot clients (client-arch 16 or 19) get a URL that answers 404: pxelab boots through
//! PXE and iPXE, and OVMF tries HTTP boot after an installed VM's iPXE exits to the firmware;
//! without an answer it waits 60 s before it moves on to the disk (measured here).
//!
//! Lease times for the timeline come from dnsmasq's own log ([`parse_answer`]): its `DHCPACK`
//! lines, and in proxy mode (where the stack leases nothing) its `PXE` lines.
//!
//! Proxy mode (`--dhcp proxy`, [`DnsmasqSettings::proxy`]): the site's DHCP server leases the
//! addresses and dnsmasq answers only the PXE part (`dhcp-range=<network>,proxy`), still only to
//! the defined MACs (`dhcp-hosts` then lists every VM, with or without an `ip`, so that `known`
//! is set). A proxy offer has no address, DNS or lease time, and dnsmasq does not honour
//! `dhcp-option-force` in it, so there is no DNS, no router advertisement (the site's network
//! has its own) and no forced iPXE option 176. Boot files: firmware PXE clients get the first
//! stage through `pxe-service` lines (one per client architecture, a file name with its suffix,
//! so no PXE layer is appended and a single entry needs no menu); dnsmasq listens on the PXE
//! port 4011 only when a `pxe-service` exists, and iPXE asks there after its lease (a
//! ProxyDHCPREQUEST). iPXE (option 175) gets the `boot.ipxe` URL from `dhcp-boot`, which
//! dnsmasq puts in its proxy offers and 4011 answers when no `pxe-service` matches the client.
//!
//! dnsmasq parses whatever any host on the lab network sends, so it does not run as root: the
//! stack starts it as `nobody` (uid and gid 65534) with only `CAP_NET_BIND_SERVICE`,
//! `CAP_NET_ADMIN` and `CAP_NET_RAW` (ambient, so they survive the exec), in `--no-daemon`
//! mode, which never changes user itself. Dropping before the exec, not through dnsmasq's
//! `user=`, keeps the parent-death signal (any later credential change clears it) and lets it
//! read a data directory only root may enter (root's home is 0700): it runs in its work
//! directory and names every file there relative to it, and its TFTP root is a copy of the
//! first-stage files in `<work>/tftp`, reached through `/proc/self/cwd` (a path from `/` would
//! need every parent to be searchable by nobody). In a user namespace that cannot map nobody
//! (a rootless lab) it keeps the namespace's root, which is the unprivileged user outside.
//!
//! Speed fixes measured in FIELD-NOTES: `no-ping` (~3 s per first offer), router advertisements
//! (old iPXE waits ~13 s for IPv6 otherwise; dnsmasq sends them only when the interface has an
//! IPv6 prefix, so the lab gives its bridge a ULA — measured 16 s per iPXE start without it),
//! and forcing iPXE option 175.176 (no ProxyDHCP wait, ~3 s).
//!
//! IPv6 (`--ipv6`, [`DnsmasqSettings::ipv6`], full mode only): the RA-only range becomes a
//! static DHCPv6 range on the same constructed prefix, so the advertisements carry the managed
//! flag (addresses from DHCPv6, none by SLAAC) and the prefix as on-link; each VM with an
//! `ipv6` gets it reserved beside its IPv4, with a second address for its network boot stage
//! ([`boot_stage_ipv6`]; dnsmasq matches the MAC of an on-link DHCPv6 client whatever DUID it
//! sends) and an AAAA record; the stack itself is `pxelab-stack.<domain>` (A and AAAA). DNS over DHCPv6 names
//! the stack's own address (`[::]`).

use std::{
    fmt::Write as _,
    fs,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::Command,
};

use pxelab_contract::{Mac, VmDefinition};

/// The path UEFI HTTP boot clients are sent to; nothing is served there (404), so the firmware
/// gives up on HTTP boot at once.
pub const NO_HTTP_BOOT: &str = "/no-uefi-http-boot";

/// dnsmasq's files, relative to its work directory (its working directory too).
const CONF: &str = "dnsmasq.conf";
const DHCP_HOSTS: &str = "dhcp-hosts";
const HOSTS: &str = "hosts";
const LEASES: &str = "leases";
const TFTP_COPY: &str = "tftp";

/// The stack's own DNS name in its domain (with `--ipv6`: A and AAAA).
pub const STACK_NAME: &str = "pxelab-stack";

/// nobody and nogroup: what dnsmasq runs as.
pub const UNPRIVILEGED: u32 = 65534;

#[derive(Clone, Debug)]
pub struct DnsmasqSettings {
    pub interface: String,
    pub server_ip: Ipv4Addr,
    pub prefix: u8,
    /// `http://<server>[:port]` for the iPXE chain URL.
    pub http_base: String,
    pub tftp_dir: PathBuf,
    pub domain: String,
    /// Serve DNS (`<name>.<domain>`) on port 53; else `port=0`.
    pub dns: bool,
    /// Where the rendered files, the lease file and the log live (inside the state dir).
    pub work_dir: PathBuf,
    /// proxyDHCP: another server leases the addresses; answer only the PXE part (module doc).
    pub proxy: bool,
    /// The stack's IPv6 address on `interface` (a /64 there): serve DHCPv6 and AAAA records.
    pub ipv6: Option<Ipv6Addr>,
}

impl DnsmasqSettings {
    pub fn conf_path(&self) -> PathBuf {
        self.work_dir.join(CONF)
    }
    pub fn dhcp_hosts_path(&self) -> PathBuf {
        self.work_dir.join(DHCP_HOSTS)
    }
    pub fn dns_hosts_path(&self) -> PathBuf {
        self.work_dir.join(HOSTS)
    }
    pub fn leases_path(&self) -> PathBuf {
        self.work_dir.join(LEASES)
    }
    pub fn log_path(&self) -> PathBuf {
        self.work_dir.join("dnsmasq.log")
    }

    pub fn netmask(&self) -> Ipv4Addr {
        let bits = if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix.min(32)))
        };
        Ipv4Addr::from(bits)
    }

    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.server_ip) & u32::from(self.netmask()))
    }

    /// The stack's IPv6 address when it serves DHCPv6 (never in proxy mode: the site's
    /// network has its own).
    pub fn dhcpv6(&self) -> Option<Ipv6Addr> {
        self.ipv6.filter(|_| !self.proxy)
    }

    pub fn render_conf(&self) -> String {
        let mut c = String::new();
        let i = &self.interface;
        let mut line = |s: String| {
            c.push_str(&s);
            c.push('\n');
        };
        line("# Generated by pxelab-stack; edits are overwritten at the next start.".into());
        line(format!("interface={i}"));
        line("except-interface=lo".into());
        line("bind-interfaces".into());
        // Looked up at start but never switched to under --no-daemon (see the module doc); names
        // every passwd has, where dnsmasq's default group "dip" is missing from the image.
        line("user=root".into());
        line("group=root".into());
        line("pid-file=".into());
        line("log-facility=-".into());
        line("log-dhcp".into());
        line("no-resolv".into());
        line("no-hosts".into());
        if self.dns && !self.proxy {
            line(format!("domain={}", self.domain));
            line(format!("local=/{}/", self.domain));
            line(format!("addn-hosts={HOSTS}"));
            line(format!("dhcp-option=option:dns-server,{}", self.server_ip));
            if let Some(v6) = self.dhcpv6() {
                line("dhcp-option=option6:dns-server,[::]".into());
                line(format!("dhcp-option=option6:domain-search,{}", self.domain));
                line(format!(
                    "host-record={STACK_NAME}.{d},{STACK_NAME},{},{v6}",
                    self.server_ip,
                    d = self.domain
                ));
            }
        } else {
            line("port=0".into());
        }
        if self.proxy {
            line(format!(
                "dhcp-range={},proxy,{}",
                self.network(),
                self.netmask()
            ));
        } else {
            line(format!(
                "dhcp-range={},static,{},1h",
                self.network(),
                self.netmask()
            ));
        }
        line(format!("dhcp-hostsfile={DHCP_HOSTS}"));
        line("dhcp-ignore=tag:!known".into());
        // Even a proxy writes one (empty), and its default is outside the work directory.
        line(format!("dhcp-leasefile={LEASES}"));
        if !self.proxy {
            line("dhcp-authoritative".into());
            line("no-ping".into());
            line("enable-ra".into());
            if self.dhcpv6().is_some() {
                line(format!("dhcp-range=::,constructor:{i},static,64,1h"));
            } else {
                line(format!("dhcp-range=::,constructor:{i},ra-only"));
            }
        }
        line("dhcp-match=set:ipxe,175".into());
        if !self.proxy {
            line("dhcp-option-force=tag:ipxe,encap:175,176,1".into());
        }
        line("dhcp-match=set:efi-x86_64,option:client-arch,7".into());
        line("dhcp-match=set:efi-x86_64,option:client-arch,9".into());
        line("dhcp-match=set:efi-arm64,option:client-arch,11".into());
        let ipxe_boot = format!("dhcp-boot=tag:ipxe,{}/boot.ipxe", self.http_base);
        if self.proxy {
            line(ipxe_boot);
            // dnsmasq's names for client-arch 0, 7, 9 and 11.
            for (csa, file) in [
                ("x86PC", "undionly.kpxe"),
                ("X86-64_EFI", "ipxe.efi"),
                ("BC_EFI", "ipxe.efi"),
                ("ARM64_EFI", "ipxe-arm64.efi"),
            ] {
                line(format!("pxe-service=tag:!ipxe,{csa},\"pxelab\",{file}"));
            }
        } else {
            line("dhcp-match=set:efi-http,option:client-arch,16".into());
            line("dhcp-match=set:efi-http,option:client-arch,19".into());
            line("dhcp-option-force=tag:efi-http,option:vendor-class,HTTPClient".into());
            line(ipxe_boot);
            line(format!(
                "dhcp-boot=tag:!ipxe,tag:efi-http,{}{NO_HTTP_BOOT}",
                self.http_base
            ));
            line(format!(
                "dhcp-boot=tag:!ipxe,tag:efi-x86_64,ipxe.efi,,{}",
                self.server_ip
            ));
            line(format!(
                "dhcp-boot=tag:!ipxe,tag:efi-arm64,ipxe-arm64.efi,,{}",
                self.server_ip
            ));
            line(format!(
                "dhcp-boot=tag:!ipxe,tag:!efi-x86_64,tag:!efi-arm64,tag:!efi-http,undionly.kpxe,,{}",
                self.server_ip
            ));
        }
        line("enable-tftp".into());
        line(format!("tftp-root=/proc/self/cwd/{TFTP_COPY}"));
        c
    }

    /// Where dnsmasq serves TFTP from: a copy of `tftp_dir`'s files in its work directory.
    pub fn tftp_copy(&self) -> PathBuf {
        self.work_dir.join(TFTP_COPY)
    }
}

/// `dhcp-hostsfile`: `mac,ip,name` per VM that has an address (sorted by name), with
/// `[ipv6]` after the IPv4 when `ipv6` (the stack serves DHCPv6) and the VM has one; in proxy
/// mode the MAC of every VM (what makes it `known`: the site's server owns the addresses and
/// names).
pub fn render_dhcp_hosts(vms: &[VmDefinition], proxy: bool, ipv6: bool) -> String {
    let mut out = String::new();
    for vm in vms {
        if proxy {
            let _ = writeln!(out, "{}", vm.mac);
            continue;
        }
        let v4 = vm.ip.map(|ip| ip.to_string());
        let v6 = vm
            .ipv6
            .filter(|_| ipv6)
            .map(|ip| format!("[{ip}],[{}]", boot_stage_ipv6(ip)));
        let addrs: Vec<String> = v4.into_iter().chain(v6).collect();
        if !addrs.is_empty() {
            let _ = writeln!(out, "{},{},{}", vm.mac, addrs.join(","), vm.name);
        }
    }
    out
}

/// The second IPv6 address reserved for a VM's MAC, for its network boot stage. iPXE asks
/// DHCPv6 too (the advertisements' managed flag) under a DUID of its own, and keeps its lease
/// when it hands over; the installed system's DUID then found the VM's one address taken ("no
/// addresses available", seen in the e2e). dnsmasq gives a new DUID of a MAC a free address of
/// its reservation, the last listed first (measured: `sys_dhcpv6_lease_and_aaaa_names`), and
/// iPXE always asks first, so the line lists this one last: iPXE gets it and the system the
/// VM's `ipv6`. It is that address with its fifth group's lowest bit flipped (`<prefix>::a` →
/// `<prefix>::1:0:0:a`).
pub fn boot_stage_ipv6(ip: Ipv6Addr) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(ip) ^ (1 << 48))
}

/// `addn-hosts`: `ip name.domain name` per address a VM has (its `ipv6` only when `ipv6`).
pub fn render_dns_hosts(vms: &[VmDefinition], domain: &str, ipv6: bool) -> String {
    let mut out = String::new();
    for vm in vms {
        for ip in vm.addresses().filter(|ip| ipv6 || ip.is_ipv4()) {
            let _ = writeln!(out, "{ip} {}.{domain} {}", vm.name, vm.name);
        }
    }
    out
}

/// Writes the VM-dependent files; true when either changed (dnsmasq then needs SIGHUP).
pub fn write_hosts(settings: &DnsmasqSettings, vms: &[VmDefinition]) -> std::io::Result<bool> {
    let mut changed = false;
    for (path, text) in [
        (
            settings.dhcp_hosts_path(),
            render_dhcp_hosts(vms, settings.proxy, settings.dhcpv6().is_some()),
        ),
        (
            settings.dns_hosts_path(),
            render_dns_hosts(vms, &settings.domain, settings.dhcpv6().is_some()),
        ),
    ] {
        if fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
            crate::write_atomic(&path, text.as_bytes(), false)?;
            changed = true;
        }
    }
    Ok(changed)
}

/// What a line of dnsmasq's DHCP log says a machine was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// `DHCPACK`: the machine holds this address from us.
    Lease(Mac, Ipv4Addr),
    /// Proxy mode, a PXE answer to a DHCP broadcast: the boot file, no address.
    ProxyOffer(Mac),
    /// Proxy mode, an answer on the PXE port 4011 to a machine that holds `Ipv4Addr` from the
    /// site's server: boot file `String`.
    ProxyBoot(Mac, Ipv4Addr, String),
}

/// The answer a line of dnsmasq's log records, e.g.
/// `dnsmasq-dhcp[42]: 2785133232 DHCPACK(br-lab) 10.77.0.10 52:54:00:12:34:56 web-1`,
/// `dnsmasq-dhcp[42]: 2785133232 PXE(br-lab) 52:54:00:12:34:56 proxy` or
/// `dnsmasq-dhcp[42]: 2785133233 PXE(br-lab) 10.231.0.120 52:54:00:12:34:56 ipxe.efi`
/// (the transaction id is there with `log-dhcp`). These formats have been stable for over a
/// decade; they are how the stack learns when a VM was answered, without a script hook.
/// Ignored clients (`proxy-ignored`) and every other line give `None`.
pub fn parse_answer(line: &str) -> Option<Answer> {
    let mut words = line
        .split_whitespace()
        .skip_while(|w| !w.starts_with("DHCPACK(") && !w.starts_with("PXE("));
    let kind = words.next()?;
    let rest: Vec<&str> = words.collect();
    if kind.starts_with("DHCPACK(") {
        let ip = rest.first()?.parse().ok()?;
        let mac = rest.get(1)?.parse().ok()?;
        return Some(Answer::Lease(mac, ip));
    }
    match rest.as_slice() {
        [mac, "proxy"] => Some(Answer::ProxyOffer(mac.parse().ok()?)),
        [ip, mac, file] => Some(Answer::ProxyBoot(
            mac.parse().ok()?,
            ip.parse().ok()?,
            file.to_string(),
        )),
        _ => None,
    }
}

/// The unexpired `(mac, ip)` leases of dnsmasq's lease file (`<expiry> <mac> <ip> <name>
/// <client id>` per line, expiry 0 for infinite), so a restarted stack knows the addresses
/// its machines already have.
pub fn read_leases(path: &Path, now_secs: u64) -> Vec<(Mac, Ipv4Addr)> {
    let text = fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(lease_line)
        .filter(|(expiry, ..)| *expiry == 0 || *expiry > now_secs)
        .map(|(_, mac, ip)| (mac, ip))
        .collect()
}

/// `(expiry, mac, ip)` of an IPv4 line of the lease file; `None` for the DHCPv6 ones.
fn lease_line(line: &str) -> Option<(u64, Mac, Ipv4Addr)> {
    let mut words = line.split_whitespace();
    Some((
        words.next()?.parse().ok()?,
        words.next()?.parse().ok()?,
        words.next()?.parse().ok()?,
    ))
}

/// `leases` (the lease file's text) without the IPv4 leases that hold an address now reserved
/// for another MAC, and those leases' MACs; `None` when there are none. dnsmasq does not give
/// a reserved address to its MAC while another MAC's lease on it lasts ("not using configured
/// address … because it is leased to …", up to the lease time, an hour), and it reads the
/// lease file only when it starts: a VM removed and another defined on its address got no
/// lease (seen in the e2e, where OVMF gave up on PXE).
pub fn without_stale_leases(leases: &str, vms: &[VmDefinition]) -> Option<(String, Vec<Mac>)> {
    let reserved: std::collections::HashMap<Ipv4Addr, Mac> =
        vms.iter().filter_map(|vm| Some((vm.ip?, vm.mac))).collect();
    let mut kept = String::new();
    let mut dropped = Vec::new();
    for line in leases.lines() {
        match lease_line(line) {
            Some((_, mac, ip)) if reserved.get(&ip).is_some_and(|owner| *owner != mac) => {
                dropped.push(mac)
            }
            _ => {
                kept.push_str(line);
                kept.push('\n');
            }
        }
    }
    (!dropped.is_empty()).then_some((kept, dropped))
}

/// Follows dnsmasq's log from where it ended when the follower was made.
pub struct LogFollower {
    path: PathBuf,
    offset: u64,
}

impl LogFollower {
    pub fn at_end(path: PathBuf) -> LogFollower {
        let offset = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        LogFollower { path, offset }
    }

    /// Complete lines written since the last call (at most 1 MiB per call).
    pub fn new_lines(&mut self) -> Vec<String> {
        use std::io::{Read, Seek, SeekFrom};
        let Ok(mut f) = fs::File::open(&self.path) else {
            return Vec::new();
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if len < self.offset {
            // Truncated or replaced: start over.
            self.offset = 0;
        }
        let mut buf = Vec::new();
        if f.seek(SeekFrom::Start(self.offset)).is_err()
            || f.take(1 << 20).read_to_end(&mut buf).is_err()
        {
            return Vec::new();
        }
        let Some(end) = buf.iter().rposition(|b| *b == b'\n') else {
            return Vec::new();
        };
        self.offset += end as u64 + 1;
        String::from_utf8_lossy(&buf[..end])
            .lines()
            .map(str::to_string)
            .collect()
    }
}

/// Makes the work directory ready for an unprivileged dnsmasq: searchable, its TFTP copy
/// current, the lease file its own. Returns whether dnsmasq drops to nobody here.
pub fn prepare_work_dir(settings: &DnsmasqSettings) -> std::io::Result<bool> {
    use std::os::unix::fs::PermissionsExt;
    let drop = can_drop_privileges();
    fs::set_permissions(&settings.work_dir, fs::Permissions::from_mode(0o755))?;
    sync_tftp(&settings.tftp_dir, &settings.tftp_copy())?;
    let leases = settings.leases_path();
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&leases)?;
    if drop {
        std::os::unix::fs::chown(&leases, Some(UNPRIVILEGED), Some(UNPRIVILEGED))?;
    }
    Ok(drop)
}

/// Mirrors the regular files at the top of `src` into `dst` (world-readable), copying those
/// whose size or mtime differ and deleting those gone; true when anything changed.
pub fn sync_tftp(src: &Path, dst: &Path) -> std::io::Result<bool> {
    use std::os::unix::fs::PermissionsExt;
    fs::create_dir_all(dst)?;
    fs::set_permissions(dst, fs::Permissions::from_mode(0o755))?;
    let stamp = |m: &fs::Metadata| (m.len(), m.modified().ok());
    let mut wanted = std::collections::BTreeSet::new();
    let mut changed = false;
    for e in fs::read_dir(src)?.flatten() {
        let Ok(meta) = fs::metadata(e.path()) else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        let name = e.file_name();
        let copy = dst.join(&name);
        wanted.insert(name);
        if fs::metadata(&copy).ok().map(|m| stamp(&m)) == Some(stamp(&meta)) {
            continue;
        }
        crate::write_atomic(&copy, &fs::read(e.path())?, false)?;
        fs::set_permissions(&copy, fs::Permissions::from_mode(0o644))?;
        if let Ok(mtime) = meta.modified() {
            fs::File::options()
                .write(true)
                .open(&copy)?
                .set_modified(mtime)?;
        }
        changed = true;
    }
    for e in fs::read_dir(dst)?.flatten() {
        if !wanted.contains(&e.file_name()) {
            fs::remove_file(e.path())?;
            changed = true;
        }
    }
    Ok(changed)
}

/// dnsmasq's command line, run in its work directory; [`crate::child::Supervised`] runs it.
/// `unprivileged`: start it as nobody with only the network capabilities it needs (from
/// [`prepare_work_dir`]).
pub fn command(binary: &Path, settings: &DnsmasqSettings, unprivileged: bool) -> Command {
    let mut cmd = Command::new(binary);
    // --no-daemon: no fork, no chdir to /, no change of user (done before the exec instead),
    // DNS over TCP answered without forking.
    cmd.arg("--no-daemon")
        .arg(format!("--conf-file={CONF}"))
        .current_dir(&settings.work_dir);
    if unprivileged {
        // SAFETY: the closure makes only async-signal-safe system calls on stack data.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| drop_privileges(UNPRIVILEGED));
        }
    }
    cmd
}

/// True when we are root and can become nobody: not in a user namespace that lacks a mapping
/// for it or denies `setgroups(2)` (a rootless lab's, whose root is an unprivileged user).
fn can_drop_privileges() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return false;
    }
    if fs::read_to_string("/proc/self/setgroups").is_ok_and(|s| s.trim() == "deny") {
        return false;
    }
    let maps = |id: u32| {
        fs::read_to_string("/proc/self/uid_map").is_ok_and(|map| {
            map.lines().any(|l| {
                let n: Vec<u64> = l
                    .split_whitespace()
                    .filter_map(|w| w.parse().ok())
                    .collect();
                n.len() == 3 && (n[0]..n[0] + n[2]).contains(&u64::from(id))
            })
        })
    };
    maps(UNPRIVILEGED)
}

/// Becomes `id` (uid, gid, no supplementary groups) keeping only the capabilities dnsmasq
/// needs, raised as ambient so that they survive the exec. Runs between fork and exec.
fn drop_privileges(id: u32) -> std::io::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    // CAP_NET_BIND_SERVICE (ports 53, 67, 69), CAP_NET_ADMIN (ARP entries for DHCP replies),
    // CAP_NET_RAW (router advertisements, binding to the interface).
    const CAPS: [u32; 3] = [10, 12, 13];
    let ok = |rc: libc::c_long| {
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    let mask = CAPS.iter().fold(0u32, |m, c| m | 1 << c);
    let mut data = [Data {
        effective: mask,
        permitted: mask,
        inheritable: mask,
    }; 2];
    data[1] = Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    };
    let header = Header {
        version: VERSION_3,
        pid: 0,
    };
    // SAFETY: plain system calls with valid arguments; nothing allocates.
    unsafe {
        // Keep the permitted set across the uid change, then narrow it.
        ok(libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0).into())?;
        ok(libc::setgroups(0, std::ptr::null()).into())?;
        ok(libc::setresgid(id, id, id).into())?;
        ok(libc::setresuid(id, id, id).into())?;
        ok(libc::syscall(libc::SYS_capset, &header, data.as_mut_ptr()))?;
        for cap in CAPS {
            ok(libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_RAISE, cap, 0, 0).into())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_on_an_address_reserved_for_another_mac_is_dropped() {
        let vm = |name: &str, mac: &str, ip: &str| {
            VmDefinition::from_json(&format!(
                r#"{{"name":"{name}","arch":"x86_64","distro":"d","mac":"{mac}","ip":"{ip}","pxeboot":true}}"#
            ))
            .unwrap()
        };
        let vms = [
            vm("new-1", "52:54:00:00:00:02", "10.77.0.11"),
            vm("kept-1", "52:54:00:00:00:03", "10.77.0.12"),
        ];
        let leases = "\
1764871200 52:54:00:00:00:01 10.77.0.11 gone-1 01:52:54:00:00:00:01
1764871200 52:54:00:00:00:03 10.77.0.12 kept-1 *
1764871200 52:54:00:00:00:09 10.77.0.99 other *
duid 00:01:00:01:2e:aa:bb:cc:52:54:00:00:00:00
1764871200 1234 fd00::b kept-1 00:04:aa
";
        let (kept, dropped) = without_stale_leases(leases, &vms).expect("gone-1's lease stays");
        assert_eq!(dropped, ["52:54:00:00:00:01".parse::<Mac>().unwrap()]);
        assert_eq!(
            kept,
            leases.replace(
                "1764871200 52:54:00:00:00:01 10.77.0.11 gone-1 01:52:54:00:00:00:01\n",
                ""
            )
        );
        assert_eq!(without_stale_leases(&kept, &vms), None);
    }

    #[test]
    fn answer_lines() {
        let mac: Mac = "52:54:00:12:34:56".parse().unwrap();
        let lease = Answer::Lease(mac, "10.77.0.10".parse().unwrap());
        for (line, answer) in [
            (
                "dnsmasq-dhcp[42]: 2785133232 DHCPACK(br-lab) 10.77.0.10 52:54:00:12:34:56 web-1",
                lease.clone(),
            ),
            (
                "Nov 22 00:01:02 dnsmasq-dhcp[42]: DHCPACK(br-lab) 10.77.0.10 52:54:00:12:34:56",
                lease,
            ),
            (
                "dnsmasq-dhcp[42]: 2785133232 PXE(br-lab) 52:54:00:12:34:56 proxy",
                Answer::ProxyOffer(mac),
            ),
            (
                "dnsmasq-dhcp[42]: 2785133233 PXE(br-lab) 10.231.0.120 52:54:00:12:34:56 ipxe.efi",
                Answer::ProxyBoot(mac, "10.231.0.120".parse().unwrap(), "ipxe.efi".into()),
            ),
        ] {
            assert_eq!(parse_answer(line), Some(answer), "{line}");
        }
        for line in [
            "dnsmasq-dhcp[42]: 2785133232 DHCPOFFER(br-lab) 10.77.0.10 52:54:00:12:34:56",
            "dnsmasq-dhcp[42]: DHCPACK(br-lab) not-an-ip 52:54:00:12:34:56",
            "dnsmasq-dhcp[42]: DHCPACK(br-lab) 10.77.0.10",
            "dnsmasq-dhcp[42]: 2785133232 PXE(br-lab) 52:54:00:aa:bb:99 proxy-ignored",
            "dnsmasq-dhcp[42]: 2785133232 PXE(br-lab) 52:54:00:12:34:56",
            "dnsmasq-dhcp[42]: 2785133232 tags: known, ipxe, br-lab",
        ] {
            assert_eq!(parse_answer(line), None, "{line}");
        }
    }

    #[test]
    fn the_tftp_copy_follows_its_source() {
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (dir.path().join("tftp"), dir.path().join("work/tftp"));
        fs::create_dir_all(&src).unwrap();
        fs::write(src.join("ipxe.efi"), "v1").unwrap();
        fs::write(src.join("gone.efi"), "x").unwrap();
        assert!(sync_tftp(&src, &dst).unwrap());
        assert!(!sync_tftp(&src, &dst).unwrap(), "nothing changed");
        fs::write(src.join("ipxe.efi"), "v2, longer").unwrap();
        fs::remove_file(src.join("gone.efi")).unwrap();
        assert!(sync_tftp(&src, &dst).unwrap());
        assert_eq!(
            fs::read_to_string(dst.join("ipxe.efi")).unwrap(),
            "v2, longer"
        );
        assert!(!dst.join("gone.efi").exists());
    }

    #[test]
    fn lease_file_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leases");
        fs::write(
            &path,
            "2000 52:54:00:aa:bb:01 10.0.0.5 t1 01:52:54:00:aa:bb:01\n\
             1000 52:54:00:aa:bb:02 10.0.0.6 t2 *\n\
             0 52:54:00:aa:bb:03 10.0.0.7 * *\n\
             duid 00:01:00:01\n",
        )
        .unwrap();
        let found: Vec<String> = read_leases(&path, 1500)
            .iter()
            .map(|(mac, ip)| format!("{mac} {ip}"))
            .collect();
        assert_eq!(
            found,
            ["52:54:00:aa:bb:01 10.0.0.5", "52:54:00:aa:bb:03 10.0.0.7"]
        );
        assert!(read_leases(&dir.path().join("none"), 0).is_empty());
    }

    #[test]
    fn log_follower_returns_only_new_complete_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        fs::write(&path, "old line\n").unwrap();
        let mut f = LogFollower::at_end(path.clone());
        assert!(f.new_lines().is_empty());
        fs::write(&path, "old line\nnew 1\nnew 2\npart").unwrap();
        assert_eq!(f.new_lines(), ["new 1", "new 2"]);
        fs::write(&path, "old line\nnew 1\nnew 2\npartial done\n").unwrap();
        assert_eq!(f.new_lines(), ["partial done"]);
        fs::write(&path, "rotated\n").unwrap();
        assert_eq!(f.new_lines(), ["rotated"]);
    }
}
