//! The stack's main loop: start the HTTP server, run dnsmasq (and nfs-ganesha while diskless
//! VMs exist), follow the VMs directory, stop cleanly.
//!
//! Every ~100 ms the loop checks for a stop signal; every 500 ms it looks whether the VM
//! definitions changed (reported by [`crate::watch`]; SIGHUP re-reads them all at once, and
//! without inotify the loop rescans the directory itself) and, when the DHCP/DNS files change,
//! rewrites them and sends dnsmasq SIGHUP — so an edited VM file is live within a second. A dnsmasq that exits on its
//! own is restarted (at most once every 2 s, with its log's tail in ours). On SIGTERM/SIGINT the
//! listener closes, dnsmasq and ganesha get SIGTERM (then SIGKILL, dnsmasq after 1 s, ganesha
//! after 0.5 s more), and the process exits within 2 s, with no child left behind. Measured in a
//! lab namespace: "stopping" to "stopped" 0.2 s with both running.
//!
//! ganesha runs only while some VM has `boot: nfsroot` and at least one of their roots is
//! unpacked; its config lists exactly those roots. When that set changes it is restarted
//! (graceless: ~1 s; booted diskless clients reconnect), and the handler offers a root to
//! iPXE only once ganesha accepts connections with it exported.
//!
//! The same HTTP API is also served on `<state>/control.sock` (mode 0600) for local tools.

use std::{
    fs,
    net::{SocketAddr, TcpListener},
    os::unix::{fs::PermissionsExt, net::UnixListener},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use pxelab_contract::{Event, Phase, CONTROL_SOCKET};

use crate::{
    access::Leases,
    child::{self, Supervised},
    dnsmasq::{self, DnsmasqSettings},
    etcd::Etcd,
    events::EventStore,
    handler::{self, Context},
    images::Catalog,
    log,
    nfs::{self, Export, NfsSettings},
    nfsroot::{self, NfsRoots},
    server::{Server, ServerOptions},
    signals,
    vms::VmStore,
};

pub struct Options {
    pub listen: SocketAddr,
    pub vms_dir: PathBuf,
    pub images_dir: PathBuf,
    pub initrds_dir: PathBuf,
    pub state_dir: PathBuf,
    pub advertise: Option<String>,
    pub ip_check: bool,
    /// `--dhcp proxy`: the site's DHCP server leases the addresses ([`Context::proxy_dhcp`]).
    pub proxy_dhcp: bool,
    pub domain: String,
    pub server: ServerOptions,
    /// `None` runs the HTTP handler alone.
    pub dnsmasq: Option<(PathBuf, DnsmasqSettings)>,
    /// The NFS server of diskless VMs; `None` serves no diskless boots.
    pub nfs: Option<NfsSettings>,
    /// The enrollment API's operator token; `None` serves no API.
    pub api_token: Option<String>,
    /// `--store etcd://…`: the cluster keeping definitions, states and tokens; `None`: files.
    pub etcd: Option<Arc<Etcd>>,
}

/// Runs until SIGTERM/SIGINT. Errors are one line naming what to fix.
pub fn run(opts: Options) -> Result<(), String> {
    signals::install().map_err(|e| format!("cannot install signal handlers: {e}"))?;
    if !opts.vms_dir.is_dir() {
        return Err(format!(
            "VMs directory {} does not exist: create it or pass --vms-dir",
            opts.vms_dir.display()
        ));
    }
    fs::create_dir_all(&opts.state_dir).map_err(|e| {
        format!(
            "cannot create state directory {}: {e}",
            opts.state_dir.display()
        )
    })?;
    for (dir, what) in [(&opts.images_dir, "images"), (&opts.initrds_dir, "initrds")] {
        if !dir.is_dir() {
            log!(
                "warning: {what} directory {} does not exist yet; boots answer 503 until it does",
                dir.display()
            );
        }
    }

    let mut events = EventStore::open(&opts.state_dir).map_err(|e| e.to_string())?;
    let vms = Arc::new(match &opts.etcd {
        Some(etcd) => {
            log!(
                "definitions, states and boot tokens are kept in etcd ({})",
                etcd.endpoints().join(", ")
            );
            events = events.share(etcd.clone());
            VmStore::shared(opts.vms_dir.clone(), etcd.clone())
        }
        None => VmStore::new(opts.vms_dir.clone()),
    });
    let events = Arc::new(events);

    let catalog = Arc::new(Catalog::new(
        opts.images_dir.clone(),
        opts.initrds_dir.clone(),
    ));
    nfsroot::remove_legacy_exports(&opts.images_dir);
    let roots = opts
        .nfs
        .as_ref()
        .map(|_| NfsRoots::new(catalog.clone(), opts.state_dir.join("nfsroot")));
    let mut nfs = opts
        .nfs
        .clone()
        .zip(roots.clone())
        .map(|(settings, roots)| NfsRun::new(settings, roots));
    let leases = Arc::new(Leases::default());
    let watch = handler::watch_stores(&vms, &catalog);
    let watched = watch.is_some();
    let context = Context {
        vms: vms.clone(),
        events: events.clone(),
        catalog,
        watch,
        advertise: opts.advertise.clone(),
        ip_check: opts.ip_check,
        proxy_dhcp: opts.proxy_dhcp,
        leases: leases.clone(),
        domain: opts.domain.clone(),
        dhcpv6: opts
            .dnsmasq
            .as_ref()
            .is_some_and(|(_, s)| s.dhcpv6().is_some()),
        nfs: roots,
        api_token: opts.api_token.clone(),
    };

    let mut dns = match &opts.dnsmasq {
        Some((binary, settings)) => Some(DnsmasqRun::prepare(binary, settings, &vms, &leases)?),
        None => None,
    };

    let listener = TcpListener::bind(opts.listen).map_err(|e| {
        let hint = if opts.listen.port() < 1024 {
            " (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
        } else {
            ""
        };
        format!(
            "cannot listen on {}: {e}{hint}; choose another address with --listen",
            opts.listen
        )
    })?;
    let context = Arc::new(context);
    let server = Server::start(listener, context.clone(), opts.server.clone())
        .map_err(|e| format!("cannot start the HTTP server: {e}"))?;
    let control_path = opts.state_dir.join(CONTROL_SOCKET);
    let control = match start_control(&control_path, server.local_addr(), context, &opts.server) {
        Ok(c) => c,
        Err(e) => {
            server.shutdown();
            return Err(e);
        }
    };
    log!(
        "listening on http://{} (VMs {}, images {}, initrds {}, state {})",
        server.local_addr(),
        opts.vms_dir.display(),
        opts.images_dir.display(),
        opts.initrds_dir.display(),
        opts.state_dir.display()
    );

    if let Some(d) = dns.as_mut() {
        if let Err(e) = d.start() {
            server.shutdown();
            control.shutdown();
            let _ = fs::remove_file(&control_path);
            return Err(e);
        }
    }

    if vms.is_shared() {
        poll_shared(&vms)?;
    }
    let mut last_scan = Instant::now();
    let mut generation = vms.current().generation;
    while !signals::shutdown_requested() {
        std::thread::sleep(Duration::from_millis(100));
        let reload = signals::take_reload();
        if reload || last_scan.elapsed() >= Duration::from_millis(500) {
            last_scan = Instant::now();
            if reload {
                vms.refresh();
            } else if !watched {
                vms.rescan();
            }
            let now = vms.current().generation;
            if let (Some(d), true) = (dns.as_mut(), reload || now != generation) {
                d.sync_hosts(&vms);
            }
            if let Some(d) = dns.as_ref() {
                d.sync_tftp();
            }
            generation = now;
            if let Some(n) = nfs.as_mut() {
                n.sync(&vms);
            }
        }
        if let Some(n) = nfs.as_mut() {
            n.watch();
        }
        if let Some(d) = dns.as_mut() {
            d.watch();
            d.record_leases(&vms, &events, &leases);
        }
        if std::process::id() == 1 {
            let own: Vec<u32> = [
                dns.as_ref().and_then(|d| d.child.pid()),
                nfs.as_ref().and_then(|n| n.child.pid()),
            ]
            .into_iter()
            .flatten()
            .collect();
            reap_orphans(&own);
        }
    }

    log!("stopping");
    // Both children get SIGTERM at once so their shutdowns overlap (ganesha takes ~1-2 s).
    if let Some(n) = nfs.as_ref() {
        n.child.signal(libc::SIGTERM);
    }
    server.shutdown();
    control.shutdown();
    let _ = fs::remove_file(&control_path);
    if let Some(mut d) = dns {
        d.child.stop(Duration::from_secs(1));
    }
    if let Some(mut n) = nfs {
        // It has had SIGTERM since the start of the shutdown; a read-only, graceless server
        // loses nothing to SIGKILL, and the whole stop must stay within 2 s.
        n.stop(Duration::from_millis(500));
    }
    log!("stopped");
    Ok(())
}

/// Follows etcd's definitions every 0.5 s on a thread of its own: a cluster without quorum
/// answers only when the client gives up, and the stack must still stop within 2 s.
fn poll_shared(vms: &Arc<VmStore>) -> Result<(), String> {
    let vms = Arc::downgrade(vms);
    std::thread::Builder::new()
        .name("etcd-poll".into())
        .spawn(move || {
            while !signals::shutdown_requested() {
                std::thread::sleep(Duration::from_millis(500));
                match vms.upgrade() {
                    Some(vms) => vms.rescan(),
                    None => return,
                };
            }
        })
        .map(|_| ())
        .map_err(|e| format!("cannot start the thread that follows etcd: {e}"))
}

/// The same API on a Unix socket in the state directory, for tools on the stack's host: they
/// reach it through the file system wherever the stack's network is (a lab namespace, a
/// container), and only users who may open the state directory can use it.
fn start_control(
    path: &Path,
    public: SocketAddr,
    handler: Arc<Context>,
    options: &ServerOptions,
) -> Result<Server, String> {
    // A previous stack that died leaves its socket file; binding needs the name free.
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot remove the old {}: {e}", path.display())),
    }
    let listener = UnixListener::bind(path).map_err(|e| {
        format!(
            "cannot create the control socket {}: {e} (the path must be shorter than 108 bytes: choose a shorter --state-dir)",
            path.display()
        )
    })?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("cannot restrict {}: {e}", path.display()))?;
    let options = ServerOptions {
        access_log: false,
        ..options.clone()
    };
    Server::start_unix(listener, public, handler, options)
        .map_err(|e| format!("cannot serve the control socket: {e}"))
}

/// As a container's PID 1 we inherit every orphan (e.g. a dnsmasq TCP helper whose parent
/// died) and must reap it, or zombies pile up. `waitid(WNOWAIT)` peeks first so that our own
/// dnsmasq's exit status is left for `Child::try_wait`.
fn reap_orphans(own_children: &[u32]) {
    loop {
        // SAFETY: waitid/waitpid with a valid siginfo buffer; WNOHANG never blocks.
        unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            if libc::waitid(
                libc::P_ALL,
                0,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            ) != 0
            {
                return;
            }
            let pid = info.si_pid();
            if pid == 0 || own_children.contains(&(pid as u32)) {
                return;
            }
            libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG);
        }
    }
}

/// dnsmasq as the supervisor runs it: started with the stack, its host files rewritten (and
/// it sent SIGHUP) when the definitions change, restarted when it dies.
struct DnsmasqRun {
    binary: PathBuf,
    /// Started as nobody ([`dnsmasq::command`]).
    unprivileged: bool,
    settings: DnsmasqSettings,
    child: Supervised,
    log: dnsmasq::LogFollower,
}

impl DnsmasqRun {
    /// Checks and writes what dnsmasq needs; `leases` learns the leases it already gave.
    fn prepare(
        binary: &Path,
        settings: &DnsmasqSettings,
        vms: &VmStore,
        leases: &Leases,
    ) -> Result<DnsmasqRun, String> {
        let found = child::find_binary(binary).ok_or_else(|| {
            format!(
                "dnsmasq not found ({}): apt-get install dnsmasq-base, pass --dnsmasq PATH, or --no-dnsmasq to run the HTTP handler alone",
                binary.display()
            )
        })?;
        if !settings.tftp_dir.is_dir() {
            return Err(format!(
                "TFTP directory {} does not exist: it must hold ipxe.efi, ipxe-arm64.efi and undionly.kpxe (cargo xtask build-stack); pass --tftp-dir",
                settings.tftp_dir.display()
            ));
        }
        for f in ["ipxe.efi", "ipxe-arm64.efi", "undionly.kpxe"] {
            if !settings.tftp_dir.join(f).is_file() {
                log!(
                    "warning: {} is missing; firmware that needs it cannot network-boot",
                    settings.tftp_dir.join(f).display()
                );
            }
        }
        fs::create_dir_all(&settings.work_dir)
            .map_err(|e| format!("cannot create {}: {e}", settings.work_dir.display()))?;
        crate::write_atomic(
            &settings.conf_path(),
            settings.render_conf().as_bytes(),
            false,
        )
        .map_err(|e| format!("cannot write {}: {e}", settings.conf_path().display()))?;
        dnsmasq::write_hosts(settings, &vms.current().vms).map_err(|e| {
            format!(
                "cannot write dnsmasq host files in {}: {e}",
                settings.work_dir.display()
            )
        })?;
        let unprivileged = dnsmasq::prepare_work_dir(settings).map_err(|e| {
            format!(
                "cannot prepare {} for dnsmasq (TFTP files from {}): {e}",
                settings.work_dir.display(),
                settings.tftp_dir.display()
            )
        })?;
        if !unprivileged {
            log!("dnsmasq keeps this user's identity (a user namespace cannot map nobody)");
        }
        for (mac, ip) in dnsmasq::read_leases(&settings.leases_path(), crate::now_ms() / 1000) {
            leases.set(mac, ip);
        }
        Ok(DnsmasqRun {
            binary: found,
            unprivileged,
            settings: settings.clone(),
            child: Supervised::new("dnsmasq", settings.log_path()),
            log: dnsmasq::LogFollower::at_end(settings.log_path()),
        })
    }

    fn start(&mut self) -> Result<(), String> {
        let pid = self.child.start(|| {
            Ok(dnsmasq::command(
                &self.binary,
                &self.settings,
                self.unprivileged,
            ))
        })?;
        log!(
            "dnsmasq started (pid {pid}, interface {}, config {}, log {})",
            self.settings.interface,
            self.settings.conf_path().display(),
            self.settings.log_path().display()
        );
        Ok(())
    }

    /// Keeps dnsmasq's TFTP copy current (a new `build-stack` replaces the first stages).
    fn sync_tftp(&self) {
        match dnsmasq::sync_tftp(&self.settings.tftp_dir, &self.settings.tftp_copy()) {
            Ok(true) => log!("TFTP files changed: dnsmasq serves the new ones"),
            Ok(false) => {}
            Err(e) => log!(
                "cannot copy the TFTP files of {}: {e}",
                self.settings.tftp_dir.display()
            ),
        }
    }

    fn sync_hosts(&mut self, vms: &VmStore) {
        match dnsmasq::write_hosts(&self.settings, &vms.current().vms) {
            Ok(true) => {
                if self.child.pid().is_some() && !self.drop_stale_leases(vms) {
                    self.child.signal(libc::SIGHUP);
                    log!("VM definitions changed: dnsmasq reloaded");
                }
            }
            Ok(false) => {}
            Err(e) => log!("cannot update dnsmasq host files: {e}"),
        }
    }

    /// Restarts dnsmasq without the leases that hold an address now reserved for another MAC
    /// ([`dnsmasq::without_stale_leases`]), which it reads only when it starts; true when it did.
    fn drop_stale_leases(&mut self, vms: &VmStore) -> bool {
        if self.settings.proxy {
            return false;
        }
        let path = self.settings.leases_path();
        let set = vms.current();
        let stale = |text: &str| dnsmasq::without_stale_leases(text, &set.vms);
        if stale(&fs::read_to_string(&path).unwrap_or_default()).is_none() {
            return false;
        }
        // Stopped first: dnsmasq writes the file on every lease change and once more at exit.
        self.child.stop(Duration::from_secs(1));
        if let Some((kept, dropped)) = stale(&fs::read_to_string(&path).unwrap_or_default()) {
            let written = crate::write_atomic(&path, kept.as_bytes(), false)
                .and_then(|()| dnsmasq::prepare_work_dir(&self.settings).map(drop));
            match written {
                Ok(()) => log!(
                    "VM definitions changed: dropped the leases of {} on addresses now reserved for other VMs",
                    dropped.iter().map(|m| m.to_string()).collect::<Vec<_>>().join(", ")
                ),
                Err(e) => log!("cannot rewrite {}: {e}", path.display()),
            }
        }
        if let Err(e) = self.start() {
            log!("cannot restart dnsmasq: {e}");
        }
        true
    }

    /// A `dhcp` event for every lease dnsmasq acknowledged since the last call (`leases` keeps
    /// the address), and in proxy mode for every PXE answer it gave a defined machine.
    fn record_leases(&mut self, vms: &VmStore, events: &EventStore, leases: &Leases) {
        let answers: Vec<_> = self
            .log
            .new_lines()
            .iter()
            .filter_map(|l| dnsmasq::parse_answer(l))
            .collect();
        if answers.is_empty() {
            return;
        }
        let set = vms.current();
        for answer in answers {
            let (mac, message) = match answer {
                dnsmasq::Answer::Lease(mac, ip) => {
                    leases.set(mac, ip);
                    (mac, format!("lease {ip}"))
                }
                // In full mode a PXE line can only repeat what the lease line said.
                _ if !self.settings.proxy => continue,
                dnsmasq::Answer::ProxyOffer(mac) => (
                    mac,
                    "proxyDHCP: boot file offered (the address comes from the site's DHCP server)"
                        .to_string(),
                ),
                dnsmasq::Answer::ProxyBoot(mac, ip, file) => {
                    (mac, format!("proxyDHCP: boot file {file} for {ip}"))
                }
            };
            if let Some(vm) = set.by_mac(mac) {
                let event = Event {
                    phase: Phase::Dhcp,
                    message,
                    ..Event::default()
                };
                if let Err(e) = events.note(vm, event) {
                    log!("cannot record the DHCP answer to {}: {e}", vm.name);
                }
            }
        }
    }

    /// Restarts dnsmasq if it died.
    fn watch(&mut self) {
        self.child.reap();
        if self.child.restart_due() {
            if let Err(e) = self.start() {
                log!("{e}");
            }
        }
    }
}

/// ganesha as the supervisor runs it: started when diskless roots are ready, restarted when
/// their set changes or it dies, stopped when no diskless VM is left.
struct NfsRun {
    settings: NfsSettings,
    roots: Arc<NfsRoots>,
    child: Supervised,
    /// The exports the running (or next) ganesha has in its config.
    exports: Vec<Export>,
    /// True once ganesha accepted a connection since its start.
    listening: bool,
    last_error: Option<String>,
}

impl NfsRun {
    fn new(settings: NfsSettings, roots: Arc<NfsRoots>) -> NfsRun {
        NfsRun {
            child: Supervised::new("nfs-ganesha", settings.log_path()),
            settings,
            roots,
            exports: Vec::new(),
            listening: false,
            last_error: None,
        }
    }

    /// Computes the exports the diskless VMs need (starting unpacks) and (re)starts or stops
    /// ganesha to match.
    fn sync(&mut self, vms: &VmStore) {
        let set = vms.current();
        let mut wanted: Vec<(String, pxelab_contract::Arch)> = set
            .vms
            .iter()
            .filter(|vm| vm.boot == pxelab_contract::BootMode::Nfsroot)
            .map(|vm| (vm.distro.clone(), vm.arch))
            .collect();
        wanted.sort();
        wanted.dedup();
        let mut exports = Vec::new();
        for (distro, arch) in &wanted {
            if let Ok((export, _)) = self.roots.unpacked(distro, *arch) {
                if nfs::quotable(&export.path) {
                    exports.push(export);
                } else {
                    log!(
                        "cannot export {}: the path has a quote or control character; move the images directory",
                        export.path.display()
                    );
                }
            }
        }
        exports.sort();
        if exports == self.exports {
            return;
        }
        self.exports = exports;
        self.roots.set_served(Vec::new());
        self.stop(Duration::from_secs(1));
        if !self.exports.is_empty() {
            self.start();
        }
    }

    fn start(&mut self) {
        self.listening = false;
        let (settings, exports) = (&self.settings, &self.exports);
        let started = self.child.start(|| {
            // Shown on the targets' consoles too: the program's name, not its host path.
            let binary = child::find_binary(&settings.binary).ok_or_else(|| {
                format!(
                    "{} not found: diskless VMs cannot boot; apt-get install nfs-ganesha nfs-ganesha-vfs, or pass --ganesha PATH",
                    settings.binary.file_name().unwrap_or_default().to_string_lossy()
                )
            })?;
            let conf = nfs::render_conf(settings, exports);
            fs::create_dir_all(&settings.work_dir)
                .and_then(|()| crate::write_atomic(&settings.conf_path(), conf.as_bytes(), false))
                .map_err(|e| format!("cannot write {}: {e}", settings.conf_path().display()))?;
            nfs::command(&binary, settings)
                .map_err(|e| format!("cannot start {}: {e}", binary.display()))
        });
        match started {
            Ok(pid) => {
                log!(
                    "nfs-ganesha started (pid {pid}, exports {}, config {}, log {})",
                    self.exports
                        .iter()
                        .map(|e| e.pseudo())
                        .collect::<Vec<_>>()
                        .join(" "),
                    self.settings.conf_path().display(),
                    self.settings.log_path().display()
                );
                self.roots.set_server_error(None);
                self.last_error = None;
            }
            Err(e) => self.fail(e),
        }
    }

    /// Notices when ganesha starts accepting connections (then the exports are bootable) and
    /// restarts it when it died.
    fn watch(&mut self) {
        if self.child.reap() {
            self.listening = false;
            self.roots.set_served(Vec::new());
        }
        if self.child.pid().is_some() && !self.listening {
            let addr = SocketAddr::from(([127, 0, 0, 1], self.settings.port));
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
                self.listening = true;
                self.roots.set_served(self.exports.clone());
                log!("nfs-ganesha is serving on port {}", self.settings.port);
            }
        }
        if !self.exports.is_empty() && self.child.restart_due() {
            self.start();
        }
    }

    /// Records why ganesha cannot run (the handler shows it); logged once per distinct reason,
    /// not at every retry.
    fn fail(&mut self, e: String) {
        if self.last_error.as_deref() != Some(e.as_str()) {
            log!("{e}");
        }
        self.roots.set_server_error(Some(e.clone()));
        self.last_error = Some(e);
    }

    fn stop(&mut self, grace: Duration) {
        self.child.stop(grace);
        self.listening = false;
    }
}
