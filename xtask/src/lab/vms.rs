//! VM definitions in `<lab home>/vms/<name>.json`: loading them, and planning a new one with
//! its MAC and IP allocated without conflicts. Planning is pure, so every rejection is tested
//! without touching a disk; only [`define`] writes, under a lock.

use std::{net::Ipv4Addr, path::Path};

use anyhow::{bail, Context, Result};
use pxelab_contract::{Arch, BootMode, Mac, VmDefinition};
use sha2::{Digest, Sha256};

use super::net::Subnet;

/// What a user asks for; everything optional is allocated.
#[derive(Clone, Debug)]
pub struct VmRequest {
    pub name: String,
    pub distro: String,
    pub arch: Arch,
    pub mac: Option<String>,
    pub ip: Option<Ipv4Addr>,
    pub boot: BootMode,
}

/// The first host address handed to VMs (below it: the stack and room for infrastructure).
const FIRST_VM_HOST: u32 = 10;

/// Every valid definition in `dir`, sorted by name. A broken file is an error naming it: the
/// lab refuses to guess around it (the stack itself skips such files and logs them).
pub fn load_all(dir: &Path) -> Result<Vec<VmDefinition>> {
    let mut vms = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vms),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "json") {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let vm = VmDefinition::from_json(&text)
                .with_context(|| format!("{}: fix or remove this VM definition", path.display()))?;
            vms.push(vm);
        }
    }
    vms.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(vms)
}

/// Validates `req` against the existing VMs and the subnet, and allocates what it leaves open.
pub fn plan(
    existing: &[VmDefinition],
    req: &VmRequest,
    subnet: Subnet,
    ssh_key: &str,
) -> Result<VmDefinition> {
    if let Some(other) = existing.iter().find(|v| v.name == req.name) {
        bail!(
            "a VM named {:?} already exists (MAC {}): pick another name or `lab vm rm {}` first",
            other.name,
            other.mac,
            other.name
        );
    }
    let mac = match &req.mac {
        Some(text) => {
            let mac: Mac = text.parse()?;
            if mac.octets()[0] & 1 == 1 {
                bail!("MAC {mac} is a multicast address: a NIC needs a unicast MAC (first octet even)");
            }
            if let Some(other) = existing.iter().find(|v| v.mac == mac) {
                bail!("MAC {mac} is already used by VM {:?}", other.name);
            }
            mac
        }
        None => allocate_mac(existing, &req.name),
    };
    let ip = match req.ip {
        Some(ip) => {
            if !subnet.is_host(ip) {
                bail!("IP {ip} is not a host address of the lab subnet {subnet}");
            }
            if ip == subnet.gateway() {
                bail!("IP {ip} is the stack's own address on {subnet}: pick another");
            }
            if let Some(other) = existing.iter().find(|v| v.ip == Some(ip)) {
                bail!("IP {ip} is already used by VM {:?}", other.name);
            }
            ip
        }
        None => (FIRST_VM_HOST..)
            .map_while(|n| subnet.host(n))
            .find(|ip| existing.iter().all(|v| v.ip != Some(*ip)))
            .with_context(|| {
                format!("no free address left in {subnet}: remove a VM or use a larger --subnet")
            })?,
    };
    let vm = VmDefinition {
        name: req.name.clone(),
        role: Some("target".into()),
        arch: req.arch,
        distro: req.distro.clone(),
        mac,
        ssh_key: ssh_key.trim().to_string() + "\n",
        kernel: None,
        initrd: None,
        pxeboot: true,
        ip: Some(ip),
        ipv6: None,
        hostname: None,
        disk: None,
        boot: req.boot,
        installer_shell: false,
        no_reboot: false,
        firmware_reboot: false,
    };
    vm.validate()?;
    Ok(vm)
}

/// In a lab with IPv6 (`lab up --ipv6`), gives `vm` its IPv6 address
/// ([`super::net::LabNet::vm_ipv6`]) unless it has one; whether it changed.
pub fn assign_ipv6(lab: &super::home::Lab, vm: &mut VmDefinition) -> Result<bool> {
    match (lab.config.ipv6, vm.ip, vm.ipv6) {
        (true, Some(ip), None) => {
            vm.ipv6 = Some(lab.net()?.vm_ipv6(ip));
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// A MAC derived from the name (so a re-created lab gets the same addresses), locally
/// administered, and bumped until it is unused.
fn allocate_mac(existing: &[VmDefinition], name: &str) -> Mac {
    (0u32..)
        .map(|salt| {
            let digest = Sha256::new()
                .chain_update(name)
                .chain_update(salt.to_le_bytes())
                .finalize();
            // 0x0a…: unicast, locally administered, and easy to spot as a lab MAC.
            Mac::local_unicast([0x0a, digest[0], digest[1], digest[2], digest[3], digest[4]])
        })
        .find(|mac| existing.iter().all(|v| v.mac != *mac))
        .expect("an unbounded search over 2^40 addresses finds a free one")
}

/// Replaces an existing definition atomically (for a changed setting: the name, MAC and IP
/// stay as planned).
pub fn rewrite(dir: &Path, vm: &VmDefinition) -> Result<()> {
    let path = dir.join(format!("{}.json", vm.name));
    if !path.exists() {
        bail!("{} does not exist", path.display());
    }
    crate::store::write_atomic(&path, vm.to_json().as_bytes())
}

/// Defines a new VM: plans `req` against the VMs defined now, lets `prepare` finish it (an IPv6
/// address, its disk; an error there writes nothing) and writes it, all under an exclusive lock
/// on the VMs directory. Without the lock two `lab vm create` at once both took the first free
/// address (seen in the e2e: disk-1 and bios-1 both got 10.77.0.11, dnsmasq leased it to one of
/// them, and the other never got a lease).
pub fn define(
    dir: &Path,
    req: &VmRequest,
    subnet: Subnet,
    ssh_key: &str,
    prepare: impl FnOnce(&mut VmDefinition) -> Result<()>,
) -> Result<VmDefinition> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(".define.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    lock.lock()
        .with_context(|| format!("locking {}", path.display()))?;
    let mut vm = plan(&load_all(dir)?, req, subnet, ssh_key)?;
    prepare(&mut vm)?;
    write_new(dir, &vm)?;
    Ok(vm)
}

/// Writes a new definition atomically; refuses to overwrite.
pub(super) fn write_new(dir: &Path, vm: &VmDefinition) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("{}.json", vm.name));
    if path.exists() {
        bail!("{} already exists", path.display());
    }
    crate::store::write_atomic(&path, vm.to_json().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIK0wmN/Cr3JXqmLW7u+g9pTh+wyqDHpSQEIQczXkVx9q lab";

    fn req(name: &str) -> VmRequest {
        VmRequest {
            name: name.into(),
            distro: "debian-12".into(),
            arch: Arch::X86_64,
            mac: None,
            ip: None,
            boot: BootMode::Install,
        }
    }

    fn subnet() -> Subnet {
        "10.77.0.0/24".parse().unwrap()
    }

    /// `lab vm create` run several times at once (the e2e defines disk-1 while it defines
    /// bios-1): each VM gets an address of its own.
    #[test]
    fn vms_defined_at_once_get_distinct_addresses() {
        let dir = tempfile::tempdir().unwrap();
        let defined: Vec<VmDefinition> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..6)
                .map(|i| {
                    let dir = dir.path();
                    s.spawn(move || {
                        define(dir, &req(&format!("vm-{i}")), subnet(), KEY, |_| {
                            // What creating the disk takes, while others plan theirs.
                            std::thread::sleep(std::time::Duration::from_millis(50));
                            Ok(())
                        })
                        .unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let ips: std::collections::BTreeSet<_> = defined.iter().map(|v| v.ip).collect();
        let macs: std::collections::BTreeSet<_> = defined.iter().map(|v| v.mac).collect();
        assert_eq!(ips.len(), 6, "{defined:?}");
        assert_eq!(macs.len(), 6);
        assert_eq!(load_all(dir.path()).unwrap(), {
            let mut d = defined.clone();
            d.sort_by(|a, b| a.name.cmp(&b.name));
            d
        });
    }

    #[test]
    fn a_definition_refused_while_being_prepared_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let err = define(dir.path(), &req("vm-1"), subnet(), KEY, |_| {
            anyhow::bail!("no room for its disk")
        })
        .unwrap_err();
        assert!(err.to_string().contains("no room"), "{err}");
        assert!(load_all(dir.path()).unwrap().is_empty());
    }

    #[test]
    fn allocates_distinct_addresses() {
        let a = plan(&[], &req("a"), subnet(), KEY).unwrap();
        let b = plan(std::slice::from_ref(&a), &req("b"), subnet(), KEY).unwrap();
        assert_eq!(a.ip, Some(Ipv4Addr::new(10, 77, 0, 10)));
        assert_eq!(b.ip, Some(Ipv4Addr::new(10, 77, 0, 11)));
        assert_ne!(a.mac, b.mac);
        assert_eq!(
            a.mac,
            plan(&[], &req("a"), subnet(), KEY).unwrap().mac,
            "MACs are stable per name"
        );
    }

    #[test]
    fn rejects_conflicts_and_bad_input_with_clear_errors() {
        let a = plan(&[], &req("a"), subnet(), KEY).unwrap();
        let existing = [a.clone()];
        let err = |r: VmRequest| plan(&existing, &r, subnet(), KEY).unwrap_err().to_string();
        assert!(err(req("a")).contains("already exists"));
        assert!(err(VmRequest {
            ip: a.ip,
            ..req("b")
        })
        .contains("already used by VM \"a\""));
        assert!(err(VmRequest {
            mac: Some(a.mac.to_string()),
            ..req("b")
        })
        .contains("already used"));
        assert!(err(VmRequest {
            mac: Some("52:54:00:zz:00:01".into()),
            ..req("b")
        })
        .contains("invalid MAC"));
        assert!(err(VmRequest {
            mac: Some("01:00:5e:00:00:01".into()),
            ..req("b")
        })
        .contains("multicast"));
        assert!(err(VmRequest {
            ip: Some(Ipv4Addr::new(10, 78, 0, 5)),
            ..req("b")
        })
        .contains("not a host address"));
        assert!(err(VmRequest {
            ip: Some(Ipv4Addr::new(10, 77, 0, 255)),
            ..req("b")
        })
        .contains("not a host address"));
        assert!(err(VmRequest {
            ip: Some(Ipv4Addr::new(10, 77, 0, 0)),
            ..req("b")
        })
        .contains("not a host address"));
        assert!(err(VmRequest {
            ip: Some(Ipv4Addr::new(10, 77, 0, 1)),
            ..req("b")
        })
        .contains("stack's own address"));
        assert!(err(req("Bad_Name")).contains("invalid VM name"));
    }
}
