//! Every route of the boot handler, in one table ([`Context::route`]), and what each answers.
//!
//! Each handler selects the machine from the request (MAC or name, parsed into canonical form
//! first), renders the whole reply into memory and returns it; the transport in
//! [`crate::server`] writes it. Errors are one human-readable line with a 4xx/5xx status.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use pxelab_contract::{
    Artifact, BootMode, ConfigReply, DistroManifest, Event, InstallerConfig, Mac, Phase,
    StackStatus, VmDefinition, VmState, VmStatus,
};

use crate::{
    cloudinit,
    events::EventStore,
    files, ipxe, log,
    nfsroot::{self, NfsRoots, RootStatus},
    server::{Body, Handler, Request, Response},
    vms::VmStore,
};

/// Everything a request may need; shared by all connection threads.
pub struct Context {
    pub vms: Arc<VmStore>,
    pub events: Arc<EventStore>,
    pub images_dir: PathBuf,
    pub initrds_dir: PathBuf,
    /// `host[:port]` for URLs when the request's Host header is missing or unusable.
    pub advertise: Option<String>,
    /// Serve cloud-init documents only to the VM's reserved IP.
    pub ip_check: bool,
    /// DNS domain of the lab (`<name>.<domain>`).
    pub domain: String,
    /// Diskless roots and their NFS server; `None` when the stack runs without one.
    pub nfs: Option<Arc<NfsRoots>>,
}

impl Handler for Context {
    fn handle(&self, request: &Request) -> Response {
        self.route(request)
    }
}

/// How long a target that cannot boot yet waits before asking `/ipxe` again.
const RETRY_SECONDS: u32 = 10;

const ROUTES: &str =
    "GET /healthz, /status, /boot.ipxe, /ipxe?mac=, /config/<mac>, /cloud-init/<name>/<doc>, \
                      /vms/<name>/timeline, /images/…, /initrds/…, /nfsroot/overlay.cpio, \
                      /nfsroot/<distro>/<arch>/initrd.img; POST /events/<mac>";

impl Context {
    pub fn route(&self, r: &Request) -> Response {
        let segments = match files::decode_path(&r.path) {
            Ok(s) => s,
            Err(reply) => return reply,
        };
        let s: Vec<&str> = segments.iter().map(String::as_str).collect();
        let get = r.method == "GET" || r.method == "HEAD";
        let post = r.method == "POST";
        let (allowed, reply) = match s.as_slice() {
            ["healthz"] => ("GET, HEAD", get.then(|| Response::line(200, "ok"))),
            ["status"] => ("GET, HEAD", get.then(|| self.status())),
            ["boot.ipxe"] => ("GET, HEAD", get.then(|| self.boot_ipxe(r))),
            ["ipxe"] => ("GET, HEAD", get.then(|| self.ipxe(r))),
            ["config", mac] => ("GET, HEAD", get.then(|| self.config(r, mac))),
            ["cloud-init", name, doc] => ("GET, HEAD", get.then(|| self.cloud_init(r, name, doc))),
            ["vms", name, "timeline"] => ("GET, HEAD", get.then(|| self.timeline(name))),
            ["images", rest @ ..] if !rest.is_empty() => (
                "GET, HEAD",
                get.then(|| {
                    let reply = self.file(&self.images_dir, &segments[1..], r);
                    self.note_kernel_fetch(r, &segments[1..], &reply);
                    reply
                }),
            ),
            ["initrds", rest @ ..] if !rest.is_empty() => (
                "GET, HEAD",
                get.then(|| self.file(&self.initrds_dir, &segments[1..], r)),
            ),
            ["nfsroot", "overlay.cpio"] => ("GET, HEAD", get.then(|| self.overlay_cpio())),
            ["nfsroot", distro, arch, ipxe::DISTRO_INITRD] => (
                "GET, HEAD",
                get.then(|| self.distro_initrd(r, distro, arch)),
            ),
            ["events", mac] => ("POST", post.then(|| self.event(r, mac))),
            _ => {
                let shown: String = r.path.chars().take(120).collect();
                return Response::line(
                    404,
                    &format!("no such endpoint {shown:?}; endpoints: {ROUTES}"),
                );
            }
        };
        reply.unwrap_or_else(|| {
            let method: String = r.method.chars().take(20).collect();
            Response::line(
                405,
                &format!("method {method} is not allowed here; use {allowed}"),
            )
            .with_header("Allow", allowed)
        })
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

    fn select_by_mac(&self, raw: &str) -> Result<(Mac, Option<VmDefinition>), Response> {
        let mac: Mac = raw
            .parse()
            .map_err(|e: pxelab_contract::MacError| Response::line(400, &e.to_string()))?;
        let set = self.vms.current();
        Ok((mac, set.by_mac(mac).cloned()))
    }

    fn status(&self) -> Response {
        let set = self.vms.current();
        let mut status = StackStatus {
            vms: Vec::new(),
            invalid: set.invalid.clone(),
        };
        for vm in &set.vms {
            let record = match self.events.record(vm) {
                Ok(r) => r,
                Err(e) => return Response::line(500, &e.to_string()),
            };
            status.vms.push(VmStatus {
                name: vm.name.clone(),
                mac: vm.mac,
                ip: vm.ip,
                state: record.as_ref().map(|r| r.state).unwrap_or_default(),
                last_event: record.as_ref().and_then(|r| r.last_event.clone()),
                since_ms: record.map(|r| r.since_ms),
            });
        }
        Response::json(200, &status)
    }

    fn boot_ipxe(&self, r: &Request) -> Response {
        Response::new(
            200,
            "text/plain; charset=utf-8",
            ipxe::chain_script(&self.base_url(r)).into_bytes(),
        )
    }

    fn ipxe(&self, r: &Request) -> Response {
        let Some(raw) = query_param(&r.query, "mac") else {
            return Response::line(
                400,
                "mac query parameter is required, e.g. /ipxe?mac=52:54:00:12:34:56",
            );
        };
        let (mac, vm) = match self.select_by_mac(&raw) {
            Ok(found) => found,
            Err(reply) => return reply,
        };
        let Some(vm) = vm else {
            log!("/ipxe: no VM is defined for MAC {mac}");
            return Response::new(
                404,
                "text/plain; charset=utf-8",
                ipxe::unknown_mac_script(mac).into_bytes(),
            );
        };
        let base = self.base_url(r);
        let reply = self.boot_script(r, &vm, &base);
        // iPXE shows only an error number when `chain` gets an error status, and the chain
        // script would then try undionly.kpxe or give up (under OVMF: the EFI shell). A script
        // that prints the reason keeps it on the target's console and asks again, so the target
        // boots by itself once the operator has pulled or built what was missing.
        match (reply.status, &reply.body) {
            (500..=599, Body::Bytes(text)) => {
                let why = String::from_utf8_lossy(text).trim().to_string();
                log!(
                    "/ipxe for {}: {why} (told to ask again in {RETRY_SECONDS} s)",
                    vm.name
                );
                Response::new(
                    200,
                    "text/plain; charset=utf-8",
                    ipxe::retry_script(&vm, &base, &why, RETRY_SECONDS).into_bytes(),
                )
            }
            _ => reply,
        }
    }

    /// What `vm` boots now: the installer, its local disk, or its distro over NFS.
    fn boot_script(&self, r: &Request, vm: &VmDefinition, base: &str) -> Response {
        let state = match self.events.state(vm) {
            Ok(s) => s,
            Err(e) => return Response::line(500, &e.to_string()),
        };
        if vm.boot == BootMode::Nfsroot {
            return self.nfsroot_ipxe(r, vm, base);
        }
        if state == VmState::Installed || !vm.pxeboot {
            let why = if vm.pxeboot {
                "installed"
            } else {
                "pxeboot is false"
            };
            if r.method == "GET" {
                self.record(
                    vm,
                    Phase::LocalBoot,
                    format!("boot from the local disk ({why})"),
                );
            }
            return Response::new(
                200,
                "text/plain; charset=utf-8",
                ipxe::local_boot_script(vm).into_bytes(),
            );
        }
        if let Some(reply) = self.check_install_files(vm) {
            return reply;
        }
        let script = ipxe::install_script(vm, base);
        // A HEAD (a human checking the URL) is not a boot.
        if r.method == "GET" {
            self.record(
                vm,
                Phase::Ipxe,
                format!("installer for {} ({}) from {base}", vm.distro, vm.arch),
            );
        }
        Response::new(200, "text/plain; charset=utf-8", script.into_bytes())
    }

    /// A diskless VM boots its distro over NFS every time (its state never reaches
    /// `installed`). Until the export is unpacked and served, iPXE is told to come back.
    fn nfsroot_ipxe(&self, r: &Request, vm: &VmDefinition, base: &str) -> Response {
        let Some(nfs) = &self.nfs else {
            return Response::line(
                503,
                &format!(
                    "VM {} boots diskless (boot: nfsroot) but this stack runs without its NFS server; start pxelab-stack without --no-nfs",
                    vm.name
                ),
            );
        };
        let dir = self.images_dir.join(&vm.distro).join(vm.arch.as_str());
        if !dir.join(ipxe::kernel_file(vm)).is_file() {
            return Response::line(
                503,
                &format!(
                    "distro {} ({}) is not pulled: {} is missing; run `cargo xtask distro pull {}`",
                    vm.distro,
                    vm.arch,
                    dir.join(ipxe::kernel_file(vm)).display(),
                    vm.distro
                ),
            );
        }
        let ready = match nfs.get(&vm.distro, vm.arch) {
            RootStatus::Ready(ready) => ready,
            RootStatus::Preparing(why) => {
                let why = format!("the NFS root of {} is not ready yet ({why})", vm.name);
                return Response::new(
                    200,
                    "text/plain; charset=utf-8",
                    ipxe::retry_script(vm, base, &why, 5).into_bytes(),
                );
            }
            RootStatus::Missing(why) => return Response::line(503, &why),
            RootStatus::Failed(why) => return Response::line(500, &why),
        };
        // The NFS server is this stack, at the address the target reached us on.
        let server = match r.local.ip() {
            IpAddr::V4(v4) => v4,
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => v4,
                None => {
                    return Response::line(
                        501,
                        &format!(
                            "diskless boots need IPv4 (the initramfs mounts NFS by IPv4 address); {} reached the stack over IPv6",
                            vm.name
                        ),
                    )
                }
            },
        };
        let script = ipxe::nfsroot_script(vm, base, &server.to_string(), &ready.export.pseudo());
        if r.method == "GET" {
            self.record(
                vm,
                Phase::Ipxe,
                format!(
                    "diskless {} ({}) with root {server}:{} from {base}",
                    vm.distro,
                    vm.arch,
                    ready.export.pseudo()
                ),
            );
        }
        Response::new(200, "text/plain; charset=utf-8", script.into_bytes())
    }

    fn overlay_cpio(&self) -> Response {
        Response::new(200, "application/octet-stream", nfsroot::overlay_cpio())
    }

    /// The distro's own initramfs (`boot/initrd.img-<kernel_version>` inside its export), which
    /// has the NFS client and the NIC drivers (initramfs-tools, MODULES=most).
    fn distro_initrd(&self, r: &Request, distro: &str, arch: &str) -> Response {
        let Some(nfs) = &self.nfs else {
            return Response::line(
                503,
                "this stack runs without its NFS server (--no-nfs): no diskless boot files",
            );
        };
        let Ok(arch) = arch.parse::<pxelab_contract::Arch>() else {
            return Response::line(
                404,
                &format!("unknown architecture {arch:?}: use x86_64 or aarch64"),
            );
        };
        let distro_ok = !distro.starts_with('.')
            && distro
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !distro_ok {
            return Response::line(404, &format!("no distro {distro:?}"));
        }
        match nfs.unpacked(distro, arch) {
            Ok((export, kernel_version)) => {
                let name = format!("initrd.img-{kernel_version}");
                let reply = self.file(&export.path, &["boot".to_string(), name], r);
                if reply.status == 404 {
                    return Response::line(
                        404,
                        &format!(
                            "{} has no boot/initrd.img-{kernel_version}: the distro's rootfs must contain the initramfs of its kernel (initramfs-tools, MODULES=most)",
                            export.path.display()
                        ),
                    );
                }
                reply
            }
            Err(RootStatus::Preparing(why)) => {
                Response::line(503, &format!("not ready yet: {why}"))
            }
            Err(RootStatus::Missing(why)) => Response::line(404, &why),
            Err(RootStatus::Failed(why)) => Response::line(500, &why),
            // `unpacked` reports readiness only through Ok.
            Err(RootStatus::Ready(_)) => Response::line(500, "inconsistent diskless root state"),
        }
    }

    /// The files an install boot fetches must exist, or the target would stop in iPXE's shell
    /// with only an HTTP error code to go on.
    fn check_install_files(&self, vm: &VmDefinition) -> Option<Response> {
        let dir = self.images_dir.join(&vm.distro).join(vm.arch.as_str());
        for file in [ipxe::kernel_file(vm), ipxe::MODULES_ARCHIVE] {
            if !dir.join(file).is_file() {
                return Some(Response::line(
                    503,
                    &format!(
                        "distro {} ({}) is not pulled: {} is missing; run `cargo xtask distro pull {}`",
                        vm.distro,
                        vm.arch,
                        dir.join(file).display(),
                        vm.distro
                    ),
                ));
            }
        }
        let initrd = self
            .initrds_dir
            .join(vm.arch.as_str())
            .join(ipxe::INSTALLER_INITRD);
        if !initrd.is_file() {
            return Some(Response::line(
                503,
                &format!(
                    "the installer initrd {} is missing; run `cargo xtask build-stack`",
                    initrd.display()
                ),
            ));
        }
        None
    }

    fn record(&self, vm: &VmDefinition, phase: Phase, message: String) {
        let event = Event {
            phase,
            message,
            ..Event::default()
        };
        if let Err(e) = self.events.append(vm, event) {
            log!("cannot record {phase} for {}: {e}", vm.name);
        }
    }

    fn config(&self, r: &Request, raw: &str) -> Response {
        let (mac, vm) = match self.select_by_mac(raw) {
            Ok(found) => found,
            Err(reply) => return reply,
        };
        let Some(vm) = vm else {
            return Response::line(404, &format!("no VM is defined for MAC {mac}"));
        };
        let dir = self.images_dir.join(&vm.distro).join(vm.arch.as_str());
        let manifest = match read_manifest(&dir, &vm) {
            Ok(m) => m,
            Err(reply) => return reply,
        };
        let base = self.base_url(r);
        let images = format!("{base}/images/{}/{}", vm.distro, vm.arch);
        let reboot = !self
            .vms
            .dir()
            .join(format!("{}.noreboot", vm.name))
            .exists();
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
            cloud_init_url: format!("{base}/cloud-init/{}/", vm.name),
            events_url: format!("{base}/events/{}", vm.mac),
            disk: vm.disk.clone(),
            reboot,
            // `vms/<name>.nokexec`: reboot through the firmware instead (kexec is the default).
            kexec: !self.vms.dir().join(format!("{}.nokexec", vm.name)).exists(),
            login: Some(cloudinit::login(&vm)),
        };
        let reply = ConfigReply {
            arch: vm.arch,
            rootfs_url: config.rootfs.url.clone(),
            kernel_url: format!("{images}/{}", ipxe::kernel_file(&vm)),
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
        let set = self.vms.current();
        let Some(vm) = set.by_name(name) else {
            return Response::line(404, &format!("no VM named {name:?}"));
        };
        if let (true, Some(ip)) = (self.ip_check, vm.ip) {
            if r.peer != IpAddr::V4(ip) {
                return Response::line(
                    403,
                    &format!(
                        "cloud-init data of {} is served only to its reserved address {ip}, not {} (start the stack with --no-ip-check to allow any)",
                        vm.name, r.peer
                    ),
                );
            }
        }
        match cloudinit::document(vm, doc, &self.domain) {
            Some(text) => Response::new(200, "text/yaml; charset=utf-8", text.into_bytes()),
            None => Response::line(404, &format!("unknown cloud-init document {doc:?}")),
        }
    }

    fn timeline(&self, name: &str) -> Response {
        if self.vms.current().by_name(name).is_none() {
            return Response::line(404, &format!("no VM named {name:?}"));
        }
        match self.events.timeline(name) {
            Ok(entries) => Response::json(200, &entries),
            Err(e) => Response::line(500, &format!("cannot read the timeline of {name}: {e}")),
        }
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
        let set = self.vms.current();
        let Some(vm) = set.vms.iter().find(|v| v.ip == Some(peer)) else {
            return;
        };
        if segments == [vm.distro.as_str(), vm.arch.as_str(), ipxe::kernel_file(vm)] {
            self.record(vm, Phase::Kernel, format!("serving {}", segments.join("/")));
        }
    }

    fn event(&self, r: &Request, raw: &str) -> Response {
        let (mac, vm) = match self.select_by_mac(raw) {
            Ok(found) => found,
            Err(reply) => return reply,
        };
        let Some(vm) = vm else {
            return Response::line(404, &format!("no VM is defined for MAC {mac}"));
        };
        let event: Event = match serde_json::from_slice(&r.body) {
            Ok(e) => e,
            Err(e) => {
                return Response::line(400, &format!("invalid event JSON: {e}; expected e.g. {{\"phase\":\"rootfs\",\"message\":\"…\"}}"))
            }
        };
        match self.events.append(&vm, event) {
            Ok(record) => Response::json(
                200,
                &VmStatus {
                    name: vm.name.clone(),
                    mac: vm.mac,
                    ip: vm.ip,
                    state: record.state,
                    since_ms: Some(record.since_ms),
                    last_event: record.last_event,
                },
            ),
            Err(e) => Response::line(500, &e.to_string()),
        }
    }
}

fn read_manifest(dir: &Path, vm: &VmDefinition) -> Result<DistroManifest, Response> {
    let path = dir.join("manifest.json");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Response::line(
                503,
                &format!(
                    "distro {} ({}) is not pulled: {} is missing; run `cargo xtask distro pull {}`",
                    vm.distro,
                    vm.arch,
                    path.display(),
                    vm.distro
                ),
            ))
        }
        Err(e) => {
            return Err(Response::line(
                500,
                &format!("cannot read {}: {e}", path.display()),
            ))
        }
    };
    let manifest: DistroManifest = serde_json::from_str(&text).map_err(|e| {
        Response::line(
            500,
            &format!(
                "{} is invalid ({e}); re-run `cargo xtask distro pull {}`",
                path.display(),
                vm.distro
            ),
        )
    })?;
    manifest.rootfs.check().map_err(|e| {
        Response::line(
            500,
            &format!(
                "{}: {e}; re-run `cargo xtask distro pull {}`",
                path.display(),
                vm.distro
            ),
        )
    })?;
    let rootfs = dir.join(&manifest.rootfs.file);
    match std::fs::metadata(&rootfs) {
        Ok(m) if m.len() == manifest.rootfs.size => Ok(manifest),
        Ok(m) => Err(Response::line(
            500,
            &format!(
                "{} has {} bytes but the manifest says {}; re-run `cargo xtask distro pull {}`",
                rootfs.display(),
                m.len(),
                manifest.rootfs.size,
                vm.distro
            ),
        )),
        Err(_) => Err(Response::line(
            503,
            &format!(
                "{} is missing; run `cargo xtask distro pull {}`",
                rootfs.display(),
                vm.distro
            ),
        )),
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
