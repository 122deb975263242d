//! Golden files for everything the stack generates: dnsmasq's configuration and host files,
//! the NoCloud documents and the iPXE scripts. `UPDATE_GOLDEN=1 cargo test -p pxelab-runtime
//! --test golden` rewrites them; review the diff before committing.

use std::path::{Path, PathBuf};

use pxelab_contract::cloudinit;
use pxelab_contract::{Arch, VmDefinition};
use pxelab_runtime::{dnsmasq, ipxe, nfs};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn check(name: &str, actual: &str) {
    let path = golden_dir().join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1") {
        std::fs::create_dir_all(golden_dir()).unwrap();
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; create it with UPDATE_GOLDEN=1", path.display()));
    assert!(
        expected == actual,
        "{} differs from the generated output; if the change is intended, run with UPDATE_GOLDEN=1\n--- expected\n{expected}\n--- actual\n{actual}",
        path.display()
    );
}

fn vms() -> Vec<VmDefinition> {
    let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIK0wmN/Cr3JXqmLW7u+g9pTh+wyqDHpSQEIQczXkVx9q lab: \"quoted\" #comment";
    let a = format!(
        r#"{{"name":"web-1","arch":"x86_64","distro":"debian-12","mac":"52:54:00:12:34:56","ip":"10.77.0.10",
            "ipv6":"fd00:77::a","ssh_key":"{}\nssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7 second\n","disk":"/dev/vda"}}"#,
        key.replace('"', "\\\"")
    );
    let b = r#"{"name":"arm-1","arch":"aarch64","distro":"ubuntu-24.04","mac":"0A:5D:EA:18:55:B6","ip":"10.77.0.11",
                "hostname":"arm-1.example.org","ssh_key":""}"#;
    let c = r#"{"name":"no-ip","arch":"x86_64","distro":"debian-12","mac":"52:54:00:00:00:09",
                "ipv6":"fd00:77::9"}"#;
    let mut v: Vec<VmDefinition> = [a.as_str(), b, c]
        .iter()
        .map(|t| VmDefinition::from_json(t).unwrap())
        .collect();
    v.sort_by(|x, y| x.name.cmp(&y.name));
    v
}

fn settings(dns: bool) -> dnsmasq::DnsmasqSettings {
    settings_in(dns, false)
}

fn settings_in(dns: bool, proxy: bool) -> dnsmasq::DnsmasqSettings {
    dnsmasq::DnsmasqSettings {
        interface: "br-lab".into(),
        server_ip: "10.77.0.1".parse().unwrap(),
        prefix: 24,
        http_base: "http://10.77.0.1".into(),
        tftp_dir: "/var/lib/pxelab/tftp".into(),
        domain: "pxelab.local".into(),
        dns,
        work_dir: "/var/lib/pxelab/state/dnsmasq".into(),
        proxy,
        ipv6: None,
    }
}

#[test]
fn dnsmasq_files() {
    check("dnsmasq.conf", &settings(true).render_conf());
    check("dnsmasq-no-dns.conf", &settings(false).render_conf());
    check(
        "dhcp-hosts",
        &dnsmasq::render_dhcp_hosts(&vms(), false, false),
    );
    check(
        "hosts",
        &dnsmasq::render_dns_hosts(&vms(), "pxelab.local", false),
    );
}

/// `--ipv6`: a static DHCPv6 range (managed-flag RAs), DNS over DHCPv6, the stack's own name,
/// each VM's `ipv6` reserved and published; a VM with only an `ipv6` gets a line of its own.
/// In proxy mode `--ipv6` changes nothing.
#[test]
fn dnsmasq_ipv6_files() {
    let mut s = settings(true);
    s.ipv6 = Some("fd00:77::1".parse().unwrap());
    check("dnsmasq-ipv6.conf", &s.render_conf());
    let mut no_dns = settings(false);
    no_dns.ipv6 = s.ipv6;
    let conf = no_dns.render_conf();
    assert!(
        conf.contains("static,64,1h") && !conf.contains("option6:dns-server"),
        "{conf}"
    );
    check(
        "dhcp-hosts-ipv6",
        &dnsmasq::render_dhcp_hosts(&vms(), false, true),
    );
    check(
        "hosts-ipv6",
        &dnsmasq::render_dns_hosts(&vms(), "pxelab.local", true),
    );
    let mut proxy = settings_in(true, true);
    proxy.ipv6 = s.ipv6;
    assert_eq!(proxy.dhcpv6(), None);
    assert_eq!(proxy.render_conf(), settings_in(true, true).render_conf());
    assert_eq!(
        dnsmasq::render_dhcp_hosts(&vms(), true, true),
        dnsmasq::render_dhcp_hosts(&vms(), true, false)
    );
    // The NoCloud network-config asks DHCPv6 only when the stack serves it and the VM has an
    // address to get; without either it is the IPv4-only document.
    let web = vms().into_iter().find(|v| v.name == "web-1").unwrap();
    check(
        "web-1.network-config-ipv6",
        &cloudinit::document(&web, "network-config", "pxelab.local", true).unwrap(),
    );
    let arm = vms().into_iter().find(|v| v.name == "arm-1").unwrap();
    assert_eq!(
        cloudinit::document(&arm, "network-config", "pxelab.local", true),
        cloudinit::document(&arm, "network-config", "pxelab.local", false)
    );
}

/// proxyDHCP: the same with or without DNS (the site's server owns DNS), and every defined MAC
/// is known, with or without an `ip`.
#[test]
fn dnsmasq_proxy_files() {
    let proxy = settings_in(true, true).render_conf();
    assert_eq!(proxy, settings_in(false, true).render_conf());
    check("dnsmasq-proxy.conf", &proxy);
    check(
        "dhcp-hosts-proxy",
        &dnsmasq::render_dhcp_hosts(&vms(), true, false),
    );
}

#[test]
fn dnsmasq_netmask_math() {
    let mut s = settings(true);
    s.server_ip = "172.16.5.77".parse().unwrap();
    s.prefix = 20;
    assert_eq!(
        (s.network().to_string(), s.netmask().to_string()),
        ("172.16.0.0".into(), "255.255.240.0".into())
    );
}

#[test]
fn nocloud_documents() {
    for vm in vms().iter().filter(|v| v.name != "no-ip") {
        for doc in cloudinit::DOCUMENTS {
            check(
                &format!("{}.{doc}", vm.name),
                &cloudinit::document(vm, doc, "pxelab.local", false).unwrap(),
            );
        }
    }
}

/// A boot token as `/ipxe` mints them (fixed here).
const TOKEN: &str = "0123456789abcdef0123456789abcdef";

#[test]
fn ipxe_scripts() {
    let v = vms();
    check(
        "web-1.install.ipxe",
        &ipxe::install_script(&v[2], "http://10.77.0.1", TOKEN),
    );
    check(
        "arm-1.install.ipxe",
        &ipxe::install_script(&v[0], "http://10.77.0.1:8080", TOKEN),
    );
    check("web-1.local.ipxe", &ipxe::local_boot_script(&v[2]));
    check("boot.ipxe", &ipxe::chain_script("http://10.77.0.1"));
    check(
        "web-1.nfsroot.ipxe",
        &ipxe::nfsroot_script(
            &v[2],
            "http://10.77.0.1",
            "10.77.0.1",
            &nfs::pseudo_path("debian-12", Arch::X86_64),
            TOKEN,
        ),
    );
    check(
        "arm-1.nfsroot-retry.ipxe",
        &ipxe::retry_script(
            &v[0],
            "http://10.77.0.1:8080",
            "the NFS root of arm-1 is not ready yet (unpacking rootfs.tar.zst)",
            5,
        ),
    );
}

#[test]
fn ganesha_conf() {
    let settings = nfs::NfsSettings {
        binary: "ganesha.nfsd".into(),
        work_dir: "/var/lib/pxelab/state/nfs".into(),
        port: 2049,
        clients: "10.77.0.0/24".into(),
    };
    let export = |distro: &str, arch: Arch| nfs::Export {
        distro: distro.into(),
        arch,
        path: format!("/var/lib/pxelab/state/nfsroot/{distro}/{arch}/0123456789abcdef").into(),
    };
    // Input order does not matter; the rendering is sorted by pseudo path.
    check(
        "ganesha.conf",
        &nfs::render_conf(
            &settings,
            &[
                export("ubuntu-24.04", Arch::X86_64),
                export("debian-12", Arch::X86_64),
                export("debian-12", Arch::Aarch64),
            ],
        ),
    );
    check("ganesha-no-exports.conf", &nfs::render_conf(&settings, &[]));
}
