//! The e2e's proxyDHCP part (issue 19), on the e2e's second real distro (issue 18): a "site"
//! DHCP server — a plain dnsmasq with no PXE option at all, in a namespace of its own joined to
//! the lab bridge by a veth pair — leases the addresses, and the stack runs `--dhcp proxy`
//! beside it. A disk VM `proxy-1` with Debian 13 and without an `ip` network-boots (UEFI, the
//! NIC's iPXE ROM), installs, and must answer SSH as itself on the address the site server
//! leased it, run trixie, and report cloud-init done without errors from there (the address
//! rule of `access.rs` lets its events in); then it is removed and the stack goes back to full
//! DHCP. One install covers both issues: a second one would cost the e2e 5–6 min under TCG.
//! Its cost is printed.

use std::{
    collections::BTreeMap,
    fs::File,
    net::Ipv4Addr,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use pxelab_contract::{Arch, Mac};
use xshell::cmd;

use crate::{
    lab::{artifacts, follow, home::Lab, net::BRIDGE, qemu, ssh, stack, targets},
    process::{self, pid},
};

const VM: &str = "proxy-1";
const DISTRO: &str = "debian-13";
/// The site server's own address and its pool, as hosts of the lab subnet: clear of the stack
/// (1) and of the addresses the lab reserves for its VMs (from 10 up).
const SITE_HOST: u32 = 2;
const POOL: (u32, u32) = (200, 250);

pub fn scenario() -> Result<()> {
    let took = Instant::now();
    let mut lab = Lab::open()?;
    let distro = artifacts::prepare(&lab, Arch::X86_64, DISTRO)?;
    let pulled = took.elapsed();
    set_proxy(&mut lab, true)?;
    let site = SiteDhcp::start(&lab)?;
    let (vm, started) =
        super::firmware::create_and_start(&lab, VM, &distro, qemu::Firmware::Uefi, |vm| {
            vm.ip = None
        })?;
    ensure!(vm.ip.is_none(), "{VM} was defined with an address");
    let leased = site.wait_lease(&lab, vm.mac, Duration::from_secs(300))?;
    let subnet = lab.subnet()?;
    let pool = |n| subnet.host(n).map(u32::from).unwrap_or_default();
    ensure!(
        (pool(POOL.0)..=pool(POOL.1)).contains(&u32::from(leased)),
        "{VM} leased {leased}, outside the site server's pool"
    );
    eprintln!(
        "e2e: {VM} leased {leased} from the site server after {:.0}s",
        took.elapsed().as_secs_f64()
    );
    // The lab knows the VM by the address the site server gave it.
    let mut seen = vm.clone();
    seen.ip = Some(leased);
    let rows = follow::wait_all(
        &lab,
        std::slice::from_ref(&seen),
        &BTreeMap::from([(VM.to_string(), started)]),
        Duration::from_secs(1500),
    )?;
    follow::print_summary(&rows);
    let out = ssh::output_within(
        ssh::command(
            &lab,
            &seen,
            &[
                ". /etc/os-release; echo \"$(hostname) $VERSION_CODENAME\"; ip -4 -o addr show; \
               cloud-init status || true"
                    .to_string(),
            ],
        )?,
        Duration::from_secs(120),
    )
    .with_context(|| follow::console_tail(&lab, VM))?;
    let said = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && said.lines().next() == Some(&format!("{VM} trixie")),
        "{VM} should answer SSH on {leased} as host {VM} running Debian trixie; it said {said:?} ({})",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    ensure!(
        said.contains(&format!(" {leased}/")),
        "{VM} does not hold the address the site server leased it ({leased}): {said:?}"
    );
    ensure!(
        said.contains("status: done"),
        "cloud-init is not done on {VM}: {said:?}"
    );
    super::firstboot::cloud_init_done(VM, &stack::timeline(&lab, VM)?)?;
    // Its disk is of no further use: no ACPI shutdown to wait for (45 s and more under TCG).
    targets::remove(&lab, VM)?;
    site.stop()?;
    set_proxy(&mut lab, false)?;
    eprintln!(
        "e2e: {VM} (Debian 13) installed beside the site's DHCP server, answered SSH on {leased} \
         and finished cloud-init in {:.0}s ({:.0}s of it getting the artifacts)",
        took.elapsed().as_secs_f64(),
        pulled.as_secs_f64()
    );
    Ok(())
}

/// Restarts the stack in proxy (or full) DHCP mode.
fn set_proxy(lab: &mut Lab, proxy: bool) -> Result<()> {
    stack::stop(lab)?;
    lab.config.proxy_dhcp = proxy;
    lab.save_config()?;
    stack::start(lab)?;
    stack::wait_healthy(lab, Duration::from_secs(60))
}

/// The site's DHCP server: its namespace (deleted, with the veth pair, on drop) and dnsmasq.
struct SiteDhcp {
    ns: String,
    dnsmasq: Option<Child>,
    leases: std::path::PathBuf,
}

impl SiteDhcp {
    fn start(lab: &Lab) -> Result<SiteDhcp> {
        let sh = process::shell()?;
        let net = lab.net()?;
        let (lab_ns, ns) = (net.ns.clone(), format!("{}-site", net.ns));
        cmd!(sh, "ip netns add {ns}")
            .quiet()
            .run()
            .with_context(|| format!("creating the site namespace {ns}"))?;
        let mut site = SiteDhcp {
            ns: ns.clone(),
            dnsmasq: None,
            leases: lab.run_dir().join("site-dhcp.leases"),
        };
        let subnet = lab.subnet()?;
        let host = |n| {
            subnet
                .host(n)
                .with_context(|| format!("the lab subnet has no host {n}"))
        };
        let address = format!("{}/{}", host(SITE_HOST)?, subnet.prefix());
        let range = format!("{},{},12h", host(POOL.0)?, host(POOL.1)?);
        // The bridge's IPv6 prefix: the site server sends the router advertisements iPXE
        // otherwise waits 16 s for (the stack sends none in proxy mode).
        let ula = net.ula().replace("::1/", "::2/");
        let _ = std::fs::remove_file(&site.leases);
        let leases = site.leases.clone();
        let log = lab.run_dir().join("site-dhcp.log");
        let log = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let setup = [
            cmd!(
                sh,
                "ip -n {lab_ns} link add pxsite type veth peer name eth0 netns {ns}"
            ),
            cmd!(sh, "ip -n {lab_ns} link set pxsite master {BRIDGE} up"),
            cmd!(sh, "ip -n {ns} link set lo up"),
            cmd!(sh, "ip -n {ns} addr add {address} dev eth0"),
            cmd!(sh, "ip -n {ns} addr add {ula} dev eth0 nodad"),
            cmd!(sh, "ip -n {ns} link set eth0 up"),
        ];
        for c in setup {
            process::read(c).context("wiring the site namespace to the lab bridge")?;
        }
        let child = process::command(cmd!(
            sh,
            "ip netns exec {ns} dnsmasq --no-daemon --conf-file=/dev/null --port=0
                --interface=eth0 --bind-interfaces --user=root --pid-file= --log-dhcp
                --dhcp-range={range} --dhcp-leasefile={leases}
                --enable-ra --dhcp-range=::,constructor:eth0,ra-only"
        ))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting the site's dnsmasq (apt-get install dnsmasq-base)")?;
        site.dnsmasq = Some(child);
        Ok(site)
    }

    /// The address the site server leased `mac`, once it has (QEMU must keep running).
    fn wait_lease(&self, lab: &Lab, mac: Mac, timeout: Duration) -> Result<Ipv4Addr> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = std::fs::read_to_string(&self.leases).unwrap_or_default();
            let found = text.lines().find_map(|line| {
                let words: Vec<&str> = line.split_whitespace().collect();
                let (Some(m), Some(ip)) = (words.get(1), words.get(2)) else {
                    return None;
                };
                (m.parse::<Mac>().ok() == Some(mac)).then(|| ip.parse().ok())?
            });
            if let Some(ip) = found {
                return Ok(ip);
            }
            if pid::read(&lab.vm_file(VM, crate::lab::home::VmFile::Pid)).is_none() {
                bail!(
                    "QEMU of {VM} stopped before the site server leased it an address\n{}",
                    follow::console_tail(lab, VM)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "the site server leased {VM} no address within {timeout:?}\n{}",
                    follow::console_tail(lab, VM)
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn stop(mut self) -> Result<()> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<()> {
        if let Some(mut child) = self.dnsmasq.take() {
            let _ = child.kill();
            child.wait().context("waiting for the site's dnsmasq")?;
        }
        let sh = process::shell()?;
        let ns = &self.ns;
        if std::path::Path::new("/run/netns").join(ns).exists() {
            cmd!(sh, "ip netns del {ns}")
                .quiet()
                .run()
                .with_context(|| format!("deleting the site namespace {ns}"))?;
        }
        Ok(())
    }
}

impl Drop for SiteDhcp {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("e2e: {e:#}");
        }
    }
}
