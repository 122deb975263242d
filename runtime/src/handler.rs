//! Every route of the boot handler, in one table ([`Context::route`]), and what each answers.
//!
//! Each handler selects the machine from the request (MAC or name, parsed into canonical form
//! first), renders the whole reply into memory and returns it; the transport in
//! [`crate::server`] writes it. Errors are one human-readable line with a 4xx/5xx status.

use std::{
    net::IpAddr,
    path::Path,
    sync::{Arc, Weak},
};

use pxelab_contract::{
    cloudinit, Artifact, ConfigReply, DistroManifest, Event, InstallerConfig, Mac, Phase,
    StackStatus, VmDefinition, VmState, VmStatus,
};

use crate::{
    access::{self, Leases},
    events::{EventStore, Refused, StateRecord},
    files,
    images::{Catalog, ManifestError},
    ipxe, log,
    nfsroot::NfsRoots,
    server::{Channel, Handler, Request, Response},
    vms::{VmSet, VmStore},
    watch::{self, Watched, Watcher},
};

mod api;
mod boot;

/// Everything a request may need; shared by all connection threads.
pub struct Context {
    pub vms: Arc<VmStore>,
    pub events: Arc<EventStore>,
    /// The images and initrds directories, cached.
    pub catalog: Arc<Catalog>,
    /// Change notices for `vms` and `catalog` (see [`watch_stores`]); `None` without inotify,
    /// when the supervisor's rescan keeps them current.
    pub watch: Option<Watcher>,
    /// `host[:port]` for URLs when the request's Host header is missing or unusable.
    pub advertise: Option<String>,
    /// Hand out boots and cloud-init documents only to the machine's own address.
    pub ip_check: bool,
    /// proxyDHCP (`--dhcp proxy`): the site's server leases the addresses, so a VM without an
    /// `ip` is known by the address its last `/ipxe` boot came from (see [`access`]).
    pub proxy_dhcp: bool,
    /// The address of each VM without a reserved one: the lease dnsmasq gave, or in proxy mode
    /// the address its boot came from.
    pub leases: Arc<Leases>,
    /// DNS domain of the lab (`<name>.<domain>`).
    pub domain: String,
    /// The stack's dnsmasq serves DHCPv6 (`--ipv6`): a VM with an `ipv6` is told to ask for it.
    pub dhcpv6: bool,
    /// Diskless roots and their NFS server; `None` when the stack runs without one.
    pub nfs: Option<Arc<NfsRoots>>,
    /// The operator token of the enrollment API (`/api/…`); `None`: the API is off.
    pub api_token: Option<String>,
}

/// Follows the changes of what a [`Context`] keeps in memory.
pub fn watch_stores(vms: &Arc<VmStore>, catalog: &Arc<Catalog>) -> Option<Watcher> {
    let vms: Weak<dyn Watched> = Arc::downgrade(vms) as Weak<dyn Watched>;
    let catalog: Weak<dyn Watched> = Arc::downgrade(catalog) as Weak<dyn Watched>;
    Watcher::start(vec![vms, catalog])
        .map_err(|e| watch::warn_unwatched(Path::new("the VM, images and initrds directories"), &e))
        .ok()
}

impl Handler for Context {
    fn handle(&self, request: &Request) -> Response {
        self.route(request)
    }
}

/// How long a target that cannot boot yet waits before asking `/ipxe` again.
const RETRY_SECONDS: u32 = 10;

const ROUTES: &str = "GET /healthz, /boot.ipxe, /ipxe?mac=, /config/<mac>?token=, \
                      /cloud-init/<name>/<doc>, /images/…, /initrds/…, /nfsroot/overlay.cpio, \
                      /nfsroot/<distro>/<arch>/initrd.img; POST /events/<mac>?token=; \
                      /api/machines[/<name>] (operator token)";
/// Routes served only on the control socket (what the operator reads and does), listed after
/// [`ROUTES`] there.
const CONTROL_ROUTES: &str = "; GET /status, /vms/<name>/timeline; POST /vms/<name>/reprovision";

impl Context {
    pub fn route(&self, r: &Request) -> Response {
        let segments = match files::decode_path(&r.path) {
            Ok(s) => s,
            Err(reply) => return reply,
        };
        let s: Vec<&str> = segments.iter().map(String::as_str).collect();
        if let Some(w) = &self.watch {
            w.settle();
        }
        let get = r.method == "GET" || r.method == "HEAD";
        let post = r.method == "POST";
        let (allowed, reply) = match s.as_slice() {
            ["healthz"] => ("GET, HEAD", get.then(|| Response::line(200, "ok"))),
            ["api", rest @ ..] => return self.api(r, rest),
            ["status"] if r.channel == Channel::Control => {
                ("GET, HEAD", get.then(|| self.status()))
            }
            ["boot.ipxe"] => ("GET, HEAD", get.then(|| self.boot_ipxe(r))),
            ["ipxe"] => ("GET, HEAD", get.then(|| self.ipxe(r))),
            ["config", mac] => ("GET, HEAD", get.then(|| self.config(r, mac))),
            ["cloud-init", name, doc] => ("GET, HEAD", get.then(|| self.cloud_init(r, name, doc))),
            ["vms", name, "timeline"] if r.channel == Channel::Control => {
                ("GET, HEAD", get.then(|| self.timeline(name)))
            }
            ["images", rest @ ..] if !rest.is_empty() => (
                "GET, HEAD",
                get.then(|| {
                    let reply = self.file(self.catalog.images_dir(), &segments[1..], r);
                    self.note_kernel_fetch(r, &segments[1..], &reply);
                    reply
                }),
            ),
            ["initrds", rest @ ..] if !rest.is_empty() => (
                "GET, HEAD",
                get.then(|| self.file(self.catalog.initrds_dir(), &segments[1..], r)),
            ),
            ["nfsroot", "overlay.cpio"] => ("GET, HEAD", get.then(|| self.overlay_cpio())),
            ["nfsroot", distro, arch, ipxe::DISTRO_INITRD] => (
                "GET, HEAD",
                get.then(|| self.distro_initrd(r, distro, arch)),
            ),
            ["events", mac] => ("POST", post.then(|| self.event(r, mac))),
            ["vms", name, "reprovision"] if r.channel == Channel::Control => {
                ("POST", post.then(|| self.reprovision(name)))
            }
            _ => {
                let shown: String = r.path.chars().take(120).collect();
                let control = match r.channel {
                    Channel::Control => CONTROL_ROUTES,
                    Channel::Network => "",
                };
                return Response::line(
                    404,
                    &format!("no such endpoint {shown:?}; endpoints: {ROUTES}{control}"),
                );
            }
        };
        reply.unwrap_or_else(|| method_not_allowed(r, allowed))
    }

    /// `http://host[:port]` as the client reached us: the Host header when it is a plain
    /// host[:port], else the advertised address, else the socket's local address.
    pub fn base_url(&self, r: &Request) -> String {
        if let Some(host) = r.header("host").filter(|h| valid_host(h)) {
            return format!("http://{host}");
        }
        if let Some(a) = &self.advertise {
            return format!("http://{a}");
        }
        let ip = match r.local.ip() {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => v4.to_string(),
                None => format!("[{v6}]"),
            },
            IpAddr::V4(v4) => v4.to_string(),
        };
        match r.local.port() {
            80 => format!("http://{ip}"),
            port => format!("http://{ip}:{port}"),
        }
    }

    /// The VM definitions, with a state slot ready for each.
    fn set(&self) -> Arc<VmSet> {
        let set = self.vms.current();
        self.events.prepare(&set);
        set
    }

    /// The MAC in `raw` and the definitions to look it up in (`set.by_mac`): handlers borrow
    /// the machine's definition from the set rather than copy it per request.
    fn select_by_mac(&self, raw: &str) -> Result<(Mac, Arc<VmSet>), Response> {
        let mac: Mac = raw
            .parse()
            .map_err(|e: pxelab_contract::MacError| Response::line(400, &e.to_string()))?;
        Ok((mac, self.set()))
    }

    /// Whether `r` may be handed `vm`'s boot (with its token) or its cloud-init documents: on
    /// the control socket and with `--no-ip-check` always, else only from the machine's own
    /// address. The error is one line for the requester.
    fn check_machine_address(
        &self,
        r: &Request,
        vm: &VmDefinition,
        what: &str,
    ) -> Result<(), String> {
        if r.channel == Channel::Control || !self.ip_check {
            return Ok(());
        }
        match access::machine_address(vm, &self.leases) {
            Some(ip) if r.peer == IpAddr::V4(ip) => Ok(()),
            Some(ip) => Err(format!(
                "{what} of {} is served only to its address {ip}, not {} (start the stack with --no-ip-check to allow any)",
                vm.name, r.peer
            )),
            None => Err(format!(
                "{what} of {} is served only to its address, and it has no \"ip\" and no DHCP lease from this stack: give it an \"ip\" (or start the stack with --no-ip-check)",
                vm.name
            )),
        }
    }

    /// proxyDHCP: no lease of ours says where a machine without an `ip` is, so the address its
    /// `GET /ipxe` comes from is its address until the next one ([`access`]).
    fn bind_boot_address(&self, r: &Request, vm: &VmDefinition) {
        if let (true, None, Channel::Network, IpAddr::V4(peer)) =
            (self.proxy_dhcp, vm.ip, r.channel, r.peer)
        {
            self.leases.set(vm.mac, peer);
        }
    }

    /// proxyDHCP: `/config` and `/events` also come only from the address the boot was handed
    /// to, when it is known (a restarted stack knows it again at the machine's next boot; the
    /// token alone guards the requests in between).
    fn check_bound_address(
        &self,
        r: &Request,
        vm: &VmDefinition,
        what: &str,
    ) -> Result<(), Response> {
        if !self.proxy_dhcp || access::machine_address(vm, &self.leases).is_none() {
            return Ok(());
        }
        self.check_machine_address(r, vm, what)
            .map_err(|why| Response::line(403, &why))
    }

    fn status(&self) -> Response {
        let set = self.set();
        let mut status = StackStatus {
            vms: Vec::new(),
            invalid: set.invalid.clone(),
        };
        for vm in &set.vms {
            match self.events.record(vm) {
                Ok(record) => status.vms.push(vm_status(vm, record)),
                Err(e) => return Response::line(500, &e.to_string()),
            }
        }
        Response::json(200, &status)
    }

    /// The distro manifest of `vm`, and its rootfs present with the manifest's size: what an
    /// install needs before the installer is given its config.
    fn install_manifest(&self, vm: &VmDefinition) -> Result<Arc<DistroManifest>, Response> {
        let manifest = self
            .catalog
            .manifest(&vm.distro, vm.arch)
            .map_err(|e| match e {
                ManifestError::NotPulled(why) => Response::line(503, &why),
                ManifestError::Invalid(why) => Response::line(500, &why),
            })?;
        let rootfs = (self.catalog.images_dir().join(&vm.distro))
            .join(vm.arch.as_str())
            .join(&manifest.rootfs.file);
        let shown = format!("images/{}/{}/{}", vm.distro, vm.arch, manifest.rootfs.file);
        match self.catalog.file_size(&rootfs) {
            Some(size) if size == manifest.rootfs.size => Ok(manifest),
            Some(size) => Err(Response::line(
                500,
                &format!(
                    "{shown} has {size} bytes but the manifest says {}; re-run `cargo xtask distro pull {}`",
                    manifest.rootfs.size,
                    vm.distro
                ),
            )),
            None => Err(Response::line(
                503,
                &format!(
                    "{shown} is missing; run `cargo xtask distro pull {}`",
                    vm.distro
                ),
            )),
        }
    }

    fn record(&self, vm: &VmDefinition, phase: Phase, message: String) {
        let event = Event {
            phase,
            message,
            ..Event::default()
        };
        if let Err(e) = self.events.note(vm, event) {
            log!("cannot record {phase} for {}: {e}", vm.name);
        }
    }

    /// The machine's `current` boot token, checked against the request's `?token=` (over the
    /// network; the control socket needs none). `what` names the request in the refusal.
    fn boot_token(
        r: &Request,
        vm: &VmDefinition,
        current: Option<String>,
        what: &str,
    ) -> Result<String, Response> {
        if r.channel == Channel::Control {
            return Ok(current.unwrap_or_default());
        }
        let given = query_param(&r.query, "token").unwrap_or_default();
        if access::token_matches(current.as_deref(), &given) {
            return Ok(given);
        }
        Err(token_refused(vm, what))
    }

    fn config(&self, r: &Request, raw: &str) -> Response {
        let (mac, set) = match self.select_by_mac(raw) {
            Ok(found) => found,
            Err(reply) => return reply,
        };
        let Some(vm) = set.by_mac(mac) else {
            return Response::line(404, &format!("no VM is defined for MAC {mac}"));
        };
        if let Err(reply) = self.check_bound_address(r, vm, "the install config") {
            return reply;
        }
        let view = match self.events.boot_view(vm) {
            Ok(view) => view,
            Err(e) => return Response::line(500, &e.to_string()),
        };
        let token = match Self::boot_token(r, vm, view.token, "the install config") {
            Ok(token) => token,
            Err(reply) => return reply,
        };
        // The token stays readable in the installed system (its kernel command line, as the
        // installer's kernel runs on): once installed, it no longer opens the install config.
        if r.channel == Channel::Network && view.state == VmState::Installed {
            return Response::line(
                409,
                &format!(
                    "{} is installed: its install config is not served any more; `lab vm reprovision {}` installs it again",
                    vm.name, vm.name
                ),
            );
        }
        let wipe = view.wipe;
        let manifest = match self.install_manifest(vm) {
            Ok(m) => m,
            Err(reply) => return reply,
        };
        let base = self.base_url(r);
        let images = format!("{base}/images/{}/{}", vm.distro, vm.arch);
        let reboot = !vm.no_reboot && self.set().reboots(&vm.name);
        let kmods = manifest
            .modules
            .as_ref()
            .map(|m| m.file.as_str())
            .unwrap_or(ipxe::MODULES_ARCHIVE);
        let config = InstallerConfig {
            name: vm.name.clone(),
            mac: vm.mac,
            hostname: vm.guest_hostname().to_string(),
            distro: vm.distro.clone(),
            rootfs: Artifact {
                url: format!("{images}/{}", manifest.rootfs.file),
                sha256: manifest.rootfs.sha256.clone(),
                size: manifest.rootfs.size,
            },
            disk_image: manifest.disk_image_zst.as_ref().map(|f| Artifact {
                url: format!("{images}/{}", f.file),
                sha256: f.sha256.clone(),
                size: f.size,
            }),
            cloud_init_url: format!("{base}/cloud-init/{}/", vm.name),
            events_url: format!("{base}/events/{}?token={token}", vm.mac),
            disk: vm.disk.clone(),
            reboot,
            direct_start: !vm.firmware_reboot,
            login: Some(cloudinit::login(vm)),
            wipe,
        };
        let reply = ConfigReply {
            arch: vm.arch,
            rootfs_url: config.rootfs.url.clone(),
            kernel_url: format!("{images}/{}", ipxe::kernel_file(vm)),
            kmods_url: format!("{images}/{kmods}"),
            reboot_on_success: reboot,
            config,
        };
        Response::json(200, &reply)
    }

    fn cloud_init(&self, r: &Request, name: &str, doc: &str) -> Response {
        if !cloudinit::DOCUMENTS.contains(&doc) {
            return Response::line(
                404,
                &format!(
                    "unknown cloud-init document {doc:?}; use one of {}",
                    cloudinit::DOCUMENTS.join(", ")
                ),
            );
        }
        let set = self.set();
        let Some(vm) = set.by_name(name) else {
            return Response::line(404, &format!("no VM named {name:?}"));
        };
        if let Err(why) = self.check_machine_address(r, vm, "cloud-init data") {
            return Response::line(403, &why);
        }
        match cloudinit::document(vm, doc, &self.domain, self.dhcpv6) {
            Some(text) => Response::new(200, "text/yaml; charset=utf-8", text.into_bytes()),
            None => Response::line(404, &format!("unknown cloud-init document {doc:?}")),
        }
    }

    fn timeline(&self, name: &str) -> Response {
        if self.set().by_name(name).is_none() {
            return Response::line(404, &format!("no VM named {name:?}"));
        }
        Response::json(200, &self.events.timeline(name))
    }

    fn file(&self, root: &Path, segments: &[String], r: &Request) -> Response {
        files::serve(
            root,
            segments,
            r.header("range"),
            r.header("if-range").is_some(),
        )
    }

    /// A VM fetching its own kernel from its reserved address is a timeline milestone
    /// (between `ipxe` and the installer's first event).
    fn note_kernel_fetch(&self, r: &Request, segments: &[String], reply: &Response) {
        if r.method != "GET" || reply.status != 200 {
            return;
        }
        let IpAddr::V4(peer) = r.peer else { return };
        let set = self.set();
        let Some(vm) = set.by_ip(peer) else {
            return;
        };
        if segments == [vm.distro.as_str(), vm.arch.as_str(), ipxe::kernel_file(vm)] {
            self.record(vm, Phase::Kernel, format!("serving {}", segments.join("/")));
        }
    }

    fn event(&self, r: &Request, raw: &str) -> Response {
        let (mac, set) = match self.select_by_mac(raw) {
            Ok(found) => found,
            Err(reply) => return reply,
        };
        let Some(vm) = set.by_mac(mac) else {
            return Response::line(404, &format!("no VM is defined for MAC {mac}"));
        };
        let event: Event = match serde_json::from_slice(&r.body) {
            Ok(e) => e,
            Err(e) => {
                return Response::line(400, &format!("invalid event JSON: {e}; expected e.g. {{\"phase\":\"rootfs\",\"message\":\"…\"}}"))
            }
        };
        if event.phase == Phase::Reprovision {
            return Response::line(
                400,
                "phase reprovision is not reported by machines: an operator resets a VM with POST /vms/<name>/reprovision on the stack's control socket",
            );
        }
        if let Err(reply) = self.check_bound_address(r, vm, &format!("event {}", event.phase)) {
            return reply;
        }
        let given = match r.channel {
            Channel::Control => None,
            Channel::Network => Some(query_param(&r.query, "token").unwrap_or_default()),
        };
        let phase = event.phase;
        match self.events.post(vm, event, given.as_deref()) {
            Ok(record) => Response::json(200, &vm_status(vm, Some(record))),
            Err(Refused::Token) => token_refused(vm, &format!("event {phase}")),
            Err(Refused::NotInstalling(state)) => Response::line(
                409,
                &format!(
                    "{} is {state}, not installing: installed is accepted only from the installer the current boot handed out",
                    vm.name
                ),
            ),
            // Answered as the first report was, once that one is durable (`record` waits).
            Err(Refused::Repeated) => match self.events.record(vm) {
                Ok(record) => Response::json(200, &vm_status(vm, record)),
                Err(e) => Response::line(500, &e.to_string()),
            },
            Err(Refused::Installed) => Response::line(
                409,
                &format!(
                    "{} is installed: its boot's token only reports cloud-init-done now (event {phase} refused); `lab vm reprovision {}` installs it again",
                    vm.name, vm.name
                ),
            ),
            Err(Refused::Failed(e)) => Response::line(500, &e.to_string()),
        }
    }

    /// Forgets that `name` is installed (control socket only): its next `/ipxe` hands out the
    /// installer again, with a new reprovision nonce in `/config` that lets it wipe the disk.
    fn reprovision(&self, name: &str) -> Response {
        let set = self.set();
        let Some(vm) = set.by_name(name) else {
            return Response::line(404, &format!("no VM named {name:?}"));
        };
        let event = Event {
            phase: Phase::Reprovision,
            message: "install state reset: the next network boot installs again".into(),
            ..Event::default()
        };
        match self.events.reprovision(vm, event) {
            Ok(record) => {
                log!("{}: install state reset (reprovision)", vm.name);
                Response::json(200, &vm_status(vm, Some(record)))
            }
            Err(e) => Response::line(500, &e.to_string()),
        }
    }
}

fn method_not_allowed(r: &Request, allowed: &'static str) -> Response {
    let method: String = r.method.chars().take(20).collect();
    Response::line(
        405,
        &format!("method {method} is not allowed here; use {allowed}"),
    )
    .with_header("Allow", allowed)
}

fn token_refused(vm: &VmDefinition, what: &str) -> Response {
    Response::line(
        403,
        &format!(
            "{what} for {} needs the token of its current boot (?token=, handed out with its installer by /ipxe); this request has none or another",
            vm.name
        ),
    )
}

/// The contract's per-VM status from its definition and state record (`None`: state `new`).
fn vm_status(vm: &VmDefinition, record: Option<StateRecord>) -> VmStatus {
    VmStatus {
        name: vm.name.clone(),
        mac: vm.mac,
        ip: vm.ip,
        state: record.as_ref().map(|r| r.state).unwrap_or_default(),
        since_ms: record.as_ref().map(|r| r.since_ms),
        last_event: record.and_then(|r| r.last_event),
    }
}

/// A Host header we can put into a URL unchanged: host name, IPv4 or [IPv6], optional port.
pub fn valid_host(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 255
        && !h.starts_with(['-', '.', ':'])
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
}

/// The first value of `key` in a query string, percent-decoded.
pub fn query_param(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == key).then(|| {
            percent_encoding::percent_decode_str(v)
                .decode_utf8_lossy()
                .into_owned()
        })
    })
}
