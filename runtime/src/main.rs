//! `pxelab-stack`: argument parsing and wiring only; the stack lives in the library.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use clap::Parser;
use pxelab_runtime::{
    access,
    dnsmasq::DnsmasqSettings,
    etcd::{self, StoreSpec},
    nfs::NfsSettings,
    server::ServerOptions,
    supervisor,
};

const EXAMPLES: &str = "\
Layout under --data-dir (each directory can be moved with its own flag):
  vms/<name>.json                      VM definitions (name, arch, distro, mac, ip, ssh_key, ...)
  vms/<name>.noreboot                  optional: the installer stays up after installing
  images/<distro>/<arch>/              vmlinuz, modules.cpio.zst, rootfs.tar.zst, manifest.json
  initrds/<arch>/initrd.img            the installer initrd
  tftp/                                ipxe.efi, ipxe-arm64.efi, undionly.kpxe (dnsmasq's TFTP root)
  state/                               snapshot.jsonl, journal-<n>.jsonl (every VM's state and timeline),
                                       control.sock, dnsmasq/ (config, leases, log), nfs/ (ganesha.conf, ganesha.log),
                                       nfsroot/<distro>/<arch>/<sha>/ (mode 0700: the unpacked rootfs diskless VMs boot from)

Examples:
  # Only the HTTP boot handler, unprivileged, on a high port:
  pxelab-stack --data-dir ~/.pxelab --no-dnsmasq --listen 127.0.0.1:8080
  curl --unix-socket ~/.pxelab/state/control.sock http://stack/status

  # The whole stack on a lab interface (as root or inside the lab's network namespace):
  pxelab-stack --data-dir /srv/pxelab --interface br-lab --server-ip 10.77.0.1/24

  # Beside the site's DHCP server, which keeps leasing the addresses (proxyDHCP):
  pxelab-stack --data-dir /srv/pxelab --interface eth1 --server-ip 192.168.10.5/24 --dhcp proxy

  # One of several stacks sharing machines, states and tokens in a 3-member etcd cluster:
  pxelab-stack --data-dir /srv/pxelab --interface eth1 --server-ip 192.168.10.5/24 --dhcp proxy \\
       --store etcd://10.0.0.11:2379,10.0.0.12:2379,10.0.0.13:2379

  # Reinstall VM web-1 at its next network boot (on the control socket: the stack's user only):
  curl --unix-socket /srv/pxelab/state/control.sock -X POST http://stack/vms/web-1/reprovision

  # Enroll a machine over HTTP (stack started with --api-token-file /etc/pxelab/api-token):
  curl -X PUT -H \"Authorization: Bearer $(cat /etc/pxelab/api-token)\" \\
       --data-binary @web-2.json http://10.77.0.1/api/machines/web-2

HTTP endpoints: GET /healthz, /boot.ipxe, /ipxe?mac=<mac>, /config/<mac>?token=<token>,
/cloud-init/<name>/{meta-data,user-data,network-config,vendor-data}, /images/..., /initrds/...
(Range, HEAD), /nfsroot/overlay.cpio, /nfsroot/<distro>/<arch>/initrd.img;
POST /events/<mac>?token=<token>. /ipxe hands each install or diskless boot a new token (only to
the VM's own address: its \"ip\", else its DHCP lease) inside the URLs it gives the machine;
/config and /events accept only that. With --dhcp proxy a VM without \"ip\" is known by the
address its last /ipxe came from, and its /config, /events and cloud-init documents must come
from there too. The same API is served on <state>/control.sock (mode 0600), where
no token is needed and which alone also serves GET /status, /vms/<name>/timeline and
POST /vms/<name>/reprovision.
With --api-token-file the enrollment API is served too: GET /api/machines (every definition),
GET, PUT (body: the JSON of a vms/<name>.json file, validated as files are) and DELETE
/api/machines/<name>; over HTTP it needs Authorization: Bearer <token>, on control.sock no token.
A PUT writes vms/<name>.json atomically and is seen by the next request.
VMs with \"boot\": \"nfsroot\" boot diskless: the stack unpacks their distro's rootfs once and
exports it read-only over NFSv4 with nfs-ganesha (port 2049, on every address of the network
namespace it runs in: run it in the lab's); each boot writes to its own tmpfs overlay.
VM definitions are followed as files change (inotify, and a rescan every 10 s); SIGHUP re-reads
them all at once. SIGTERM or Ctrl-C stops everything within 2 s.";

/// The pxelab boot stack: HTTP boot handler (iPXE scripts, installer config, cloud-init, files,
/// events) and the dnsmasq it supervises (DHCP reservations, TFTP, DNS).
#[derive(Parser, Debug)]
#[command(name = "pxelab-stack", version, after_long_help = EXAMPLES, after_help = "Run with --help for the directory layout and examples.")]
struct Args {
    /// Base directory; the other directories default to subdirectories of it.
    #[arg(
        long,
        env = "PXELAB_DATA_DIR",
        default_value = "/var/lib/pxelab",
        value_name = "DIR"
    )]
    data_dir: PathBuf,
    /// VM definitions, one <name>.json per VM [default: <data-dir>/vms]
    #[arg(long, env = "PXELAB_VMS_DIR", value_name = "DIR")]
    vms_dir: Option<PathBuf>,
    /// Distro artifacts, served at /images/ [default: <data-dir>/images]
    #[arg(long, env = "PXELAB_IMAGES_DIR", value_name = "DIR")]
    images_dir: Option<PathBuf>,
    /// Installer initrds, served at /initrds/ [default: <data-dir>/initrds]
    #[arg(long, env = "PXELAB_INITRDS_DIR", value_name = "DIR")]
    initrds_dir: Option<PathBuf>,
    /// Where VM states, timelines and dnsmasq's files are written [default: <data-dir>/state]
    #[arg(long, env = "PXELAB_STATE_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// iPXE first-stage binaries, dnsmasq's TFTP root [default: <data-dir>/tftp]
    #[arg(long, env = "PXELAB_TFTP_DIR", value_name = "DIR")]
    tftp_dir: Option<PathBuf>,
    /// HTTP listen address [default: <server-ip>:80; one of the two is required, so only the
    /// network chosen sees the files]. Port 80 because firmware and iPXE are handed plain
    /// http://<server>/ URLs.
    #[arg(long, env = "PXELAB_LISTEN", value_name = "IP:PORT")]
    listen: Option<SocketAddr>,
    /// Network interface dnsmasq serves (required unless --no-dnsmasq).
    #[arg(long, env = "PXELAB_INTERFACE", value_name = "IFACE")]
    interface: Option<String>,
    /// The stack's IPv4 address on --interface, with the lab's prefix length (default /24).
    /// Used in DHCP answers, in URLs when a client sends no usable Host header, and as the only
    /// subnet the NFS exports answer (diskless boots need it).
    #[arg(long, env = "PXELAB_SERVER_IP", value_name = "IP[/PREFIX]")]
    server_ip: Option<String>,
    /// The stack's IPv6 address on --interface, which must carry it with a /64 (e.g.
    /// fd12:3456:789a::1/64). dnsmasq then serves DHCPv6 there: router advertisements with the
    /// managed flag, each VM's "ipv6" reserved for its MAC, AAAA records for <name>.<domain>
    /// (and pxelab-stack.<domain>), and cloud-init's network-config asks for DHCPv6 too.
    /// Without it the stack sends router advertisements only. Ignored with --dhcp proxy.
    #[arg(long, env = "PXELAB_IPV6", value_name = "IPV6[/64]")]
    ipv6: Option<String>,
    /// DNS domain of the lab: every VM resolves as <name>.<domain>.
    #[arg(long, env = "PXELAB_DOMAIN", default_value = pxelab_contract::cloudinit::DEFAULT_DOMAIN)]
    domain: String,
    /// Do not serve DNS (dnsmasq gets port=0). Implied by --dhcp proxy.
    #[arg(long, env = "PXELAB_NO_DNS")]
    no_dns: bool,
    /// Who leases the addresses on --interface.
    ///
    /// full (the default, the lab's mode): the stack's dnsmasq is the network's only DHCP
    /// server: it leases each VM its "ip", boots it, serves DNS for <name>.<domain>, and ignores
    /// every other MAC. proxy: the site's own DHCP server leases the addresses (and names the
    /// DNS servers); dnsmasq answers only the PXE part (proxyDHCP: the first-stage iPXE file
    /// over TFTP to firmware, the http://<server-ip>/boot.ipxe URL to iPXE), only to defined
    /// MACs, serves no DNS and sends no router advertisements. VMs then need no "ip": a VM
    /// without one is known by the address its boot (/ipxe) comes from.
    #[arg(long, env = "PXELAB_DHCP", value_enum, default_value_t = DhcpMode::Full, verbatim_doc_comment)]
    dhcp: DhcpMode,
    /// Run only the HTTP handler; DHCP/TFTP are someone else's job.
    #[arg(long, env = "PXELAB_NO_DNSMASQ")]
    no_dnsmasq: bool,
    /// Hand out boots (with their tokens) and cloud-init documents to any client, not only the
    /// VM's own address (debugging, benchmarks).
    #[arg(long, env = "PXELAB_NO_IP_CHECK")]
    no_ip_check: bool,
    /// The dnsmasq binary.
    #[arg(
        long,
        env = "PXELAB_DNSMASQ",
        default_value = "dnsmasq",
        value_name = "PATH"
    )]
    dnsmasq: PathBuf,
    /// Do not run the NFS server (it also does not run without --server-ip): VMs with boot mode
    /// nfsroot are told why on their console.
    #[arg(long, env = "PXELAB_NO_NFS")]
    no_nfs: bool,
    /// The nfs-ganesha daemon (started only while diskless VMs exist).
    #[arg(
        long,
        env = "PXELAB_GANESHA",
        default_value = "ganesha.nfsd",
        value_name = "PATH"
    )]
    ganesha: PathBuf,
    /// Most HTTP connections open at once, an eighth of them from one client address; when
    /// full, the connection idle longest is closed for a new one, and only when none is idle are
    /// more answered 503.
    #[arg(long, default_value_t = 512, value_name = "N")]
    max_connections: usize,
    /// Seconds a client has to send a complete request (and that an idle connection is kept);
    /// a request head must be complete within 3 s of its first byte.
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    request_timeout: u64,
    /// Do not log one line per HTTP request.
    #[arg(long)]
    no_access_log: bool,
    /// Serve the enrollment API (/api/machines) to clients that send this file's token as
    /// `Authorization: Bearer <token>`. The file must not be readable by every user. Without
    /// it there is no API.
    #[arg(long, env = "PXELAB_API_TOKEN_FILE", value_name = "PATH")]
    api_token_file: Option<PathBuf>,
    /// Where machine definitions, states and boot tokens are kept: `files` (the VMs and state
    /// directories) or etcd://host:port[,host:port…], an etcd cluster (v3, its client URLs)
    /// that several stacks share, so each machine is installed once whichever stack it asks.
    /// Each stack keeps its own timelines; `<name>.noreboot` stays a file.
    #[arg(
        long,
        env = "PXELAB_STORE",
        default_value = "files",
        value_name = "STORE"
    )]
    store: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum DhcpMode {
    Full,
    Proxy,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match options(args).and_then(supervisor::run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pxelab-stack: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn options(a: Args) -> Result<supervisor::Options, String> {
    let api_token = a
        .api_token_file
        .as_deref()
        .map(access::read_operator_token)
        .transpose()?;
    let etcd = match etcd::parse_store(&a.store)? {
        StoreSpec::Files => None,
        StoreSpec::Etcd(endpoints) => Some(Arc::new(etcd::Etcd::new(endpoints))),
    };
    let sub = |given: Option<PathBuf>, name: &str| given.unwrap_or_else(|| a.data_dir.join(name));
    let state_dir = sub(a.state_dir.clone(), "state");
    let server_ip = a.server_ip.as_deref().map(parse_cidr).transpose()?;
    // Never every address by default: a host's other networks must not see the boot files.
    let listen = match (a.listen, server_ip) {
        (Some(listen), _) => listen,
        (None, Some((ip, _))) => SocketAddr::from((ip, 80)),
        (None, None) => {
            return Err(
                "no address to listen on: pass --server-ip (the stack's address on the lab network, e.g. 10.77.0.1/24) or --listen IP:PORT".into(),
            )
        }
    };
    let port_suffix = if listen.port() == 80 {
        String::new()
    } else {
        format!(":{}", listen.port())
    };
    let advertise = server_ip.map(|(ip, _)| format!("{ip}{port_suffix}"));
    let ipv6 = a.ipv6.as_deref().map(parse_ipv6).transpose()?;
    let dnsmasq = if a.no_dnsmasq {
        None
    } else {
        let interface = a.interface.clone().ok_or(
            "dnsmasq needs --interface (the lab network interface); pass --no-dnsmasq to run the HTTP handler alone",
        )?;
        let (ip, prefix) = server_ip.ok_or(
            "dnsmasq needs --server-ip (the stack's address on --interface, e.g. 10.77.0.1/24); pass --no-dnsmasq to run the HTTP handler alone",
        )?;
        Some((
            a.dnsmasq.clone(),
            DnsmasqSettings {
                interface,
                server_ip: ip,
                prefix,
                http_base: format!("http://{ip}{port_suffix}"),
                tftp_dir: sub(a.tftp_dir.clone(), "tftp"),
                domain: a.domain.clone(),
                dns: !a.no_dns,
                work_dir: state_dir.join("dnsmasq"),
                proxy: a.dhcp == DhcpMode::Proxy,
                ipv6,
            },
        ))
    };
    if !a
        .domain
        .split('.')
        .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
    {
        return Err(format!(
            "invalid --domain {:?}: use dot-separated letters, digits and '-'",
            a.domain
        ));
    }
    // The exports answer the lab subnet only, so without one there is no NFS server.
    let nfs = server_ip
        .filter(|_| !a.no_nfs)
        .map(|(ip, prefix)| NfsSettings {
            binary: a.ganesha.clone(),
            work_dir: state_dir.join("nfs"),
            port: 2049,
            clients: format!("{}/{prefix}", network(ip, prefix)),
        });
    Ok(supervisor::Options {
        listen,
        vms_dir: sub(a.vms_dir.clone(), "vms"),
        images_dir: sub(a.images_dir.clone(), "images"),
        initrds_dir: sub(a.initrds_dir.clone(), "initrds"),
        state_dir,
        advertise,
        ip_check: !a.no_ip_check,
        proxy_dhcp: a.dhcp == DhcpMode::Proxy,
        domain: a.domain.clone(),
        server: ServerOptions {
            max_connections: a.max_connections.max(1),
            max_per_client: (a.max_connections / 8).max(1),
            request_timeout: Duration::from_secs(a.request_timeout.max(1)),
            access_log: !a.no_access_log,
            ..ServerOptions::default()
        },
        dnsmasq,
        nfs,
        api_token,
        etcd,
    })
}

/// The network address of `ip/prefix`.
fn network(ip: std::net::Ipv4Addr, prefix: u8) -> std::net::Ipv4Addr {
    let mask = u32::MAX << (32 - u32::from(prefix));
    std::net::Ipv4Addr::from(u32::from(ip) & mask)
}

/// `--ipv6`: an address, optionally with the only prefix length DHCPv6 ranges here use, /64.
fn parse_ipv6(s: &str) -> Result<std::net::Ipv6Addr, String> {
    let bad = || {
        format!("invalid --ipv6 {s:?}: expected the stack's IPv6 address on a /64, e.g. fd12:3456:789a::1/64")
    };
    let ip = match s.split_once('/') {
        Some((ip, "64")) => ip,
        Some(_) => return Err(bad()),
        None => s,
    };
    let ip: std::net::Ipv6Addr = ip.parse().map_err(|_| bad())?;
    if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
        return Err(bad());
    }
    Ok(ip)
}

fn parse_cidr(s: &str) -> Result<(std::net::Ipv4Addr, u8), String> {
    let bad = || {
        format!("invalid --server-ip {s:?}: expected an IPv4 address with optional prefix, e.g. 10.77.0.1/24")
    };
    let (ip, prefix) = match s.split_once('/') {
        Some((ip, p)) => (ip, p.parse::<u8>().map_err(|_| bad())?),
        None => (s, 24),
    };
    if !(8..=30).contains(&prefix) {
        return Err(bad());
    }
    Ok((ip.parse().map_err(|_| bad())?, prefix))
}
