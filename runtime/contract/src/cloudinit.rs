//! NoCloud documents for a VM: the stack serves them (`/cloud-init/<name>/…`) and the lab writes
//! them onto a disk-mode VM's seed disk, so both say the same.
//!
//! One login: user `pxelab` with the VM's SSH keys and passwordless sudo. No password is set
//! for anyone, SSH password login is off and root login is disabled. Networking is DHCP on the
//! NIC matched by MAC (renamed [`NIC_NAME`] so every renderer — netplan, networkd, ifupdown — agrees
//! on the name). Strings are emitted as JSON strings, which YAML reads as double-quoted scalars,
//! so an SSH key comment cannot break the document.
//!
//! First boot is kept short (measured under TCG: RSA host key generation and grub-dpkg's
//! debconf run were 10 s of cloud-init's 31 s): ed25519 and ECDSA host keys only, and no
//! grub-dpkg (the installer already made the disk bootable). The installer writes the host keys
//! and this login itself (see [`login`]) so SSH answers before cloud-init runs: cloud-init must
//! keep those keys (`ssh_deletekeys: false`) and only makes the ones that are missing (a
//! diskless root has none). The locale is C.UTF-8, the one glibc builds in: left to its
//! default, cloud-init ran Debian's `locale-gen` (which builds only what /etc/locale.gen lists,
//! none) and then failed on `update-locale LANG=en_US.UTF-8`, 5 s and a warning on every first
//! boot for nothing; `locale: false` skipped that but is not valid cloud-config (cloud-init 22.4
//! logged "Invalid cloud-config provided" on every boot). For C.UTF-8 cloud-init runs no
//! `locale-gen`, only `update-locale`, which writes `LANG=C.UTF-8` to /etc/default/locale.

use crate::{Login, VmDefinition, NIC_NAME};

pub const USER: &str = "pxelab";
/// The lab's DNS domain unless the stack is told another (`--domain`).
pub const DEFAULT_DOMAIN: &str = "pxelab.local";
pub const DOCUMENTS: [&str; 4] = ["meta-data", "user-data", "network-config", "vendor-data"];

fn q(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

pub fn meta_data(vm: &VmDefinition) -> String {
    format!(
        "instance-id: {}\nlocal-hostname: {}\n",
        q(&format!("iid-pxelab-{}", vm.name)),
        q(vm.guest_hostname())
    )
}

/// The one login of the user-data, for the installer to create before cloud-init runs.
pub fn login(vm: &VmDefinition) -> Login {
    Login {
        user: USER.to_string(),
        gecos: "pxelab lab user".to_string(),
        shell: "/bin/bash".to_string(),
        sudo: Some("ALL=(ALL) NOPASSWD:ALL".to_string()),
        ssh_authorized_keys: vm.ssh_keys().map(str::to_string).collect(),
    }
}

pub fn user_data(vm: &VmDefinition, domain: &str) -> String {
    let host = vm.guest_hostname();
    let fqdn = if host.contains('.') {
        host.to_string()
    } else {
        format!("{host}.{domain}")
    };
    let login = login(vm);
    let mut keys = String::new();
    for key in &login.ssh_authorized_keys {
        keys.push_str(&format!("      - {}\n", q(key)));
    }
    let keys = if keys.is_empty() {
        "    ssh_authorized_keys: []\n".to_string()
    } else {
        format!("    ssh_authorized_keys:\n{keys}")
    };
    format!(
        "#cloud-config\n\
         hostname: {short}\n\
         fqdn: {fqdn}\n\
         prefer_fqdn_over_hostname: false\n\
         manage_etc_hosts: true\n\
         ssh_pwauth: false\n\
         disable_root: true\n\
         ssh_deletekeys: false\n\
         ssh_genkeytypes: [ed25519, ecdsa]\n\
         locale: C.UTF-8\n\
         grub_dpkg:\n\
         \x20 enabled: false\n\
         users:\n\
         \x20 - name: {user}\n\
         \x20   gecos: {gecos}\n\
         \x20   shell: {shell}\n\
         \x20   lock_passwd: true\n\
         {sudo}\
         {keys}",
        short = q(host.split('.').next().unwrap_or(host)),
        fqdn = q(&fqdn),
        user = login.user,
        gecos = login.gecos,
        shell = login.shell,
        sudo = login
            .sudo
            .as_deref()
            .map(|rule| format!("    sudo: {}\n", q(rule)))
            .unwrap_or_default(),
    )
}

/// `dhcp6` (the stack serves DHCPv6 and the VM has an `ipv6`): the NIC asks DHCPv6 for its
/// address too (with Debian's ifupdown, `dhclient -6`; the on-link prefix comes from the
/// router advertisements).
pub fn network_config(vm: &VmDefinition, dhcp6: bool) -> String {
    format!(
        "version: 2\n\
         ethernets:\n\
         \x20 {NIC_NAME}:\n\
         \x20   match:\n\
         \x20     macaddress: {mac}\n\
         \x20   set-name: {NIC_NAME}\n\
         \x20   dhcp4: true\n\
         {dhcp6}",
        mac = q(&vm.mac.to_string()),
        dhcp6 = if dhcp6 { "    dhcp6: true\n" } else { "" },
    )
}

/// Nothing vendor-specific; served so NoCloud's optional fetch succeeds instead of logging 404.
pub fn vendor_data() -> String {
    "#cloud-config\n{}\n".to_string()
}

/// `dhcpv6`: the stack serves DHCPv6 (`--ipv6`).
pub fn document(vm: &VmDefinition, which: &str, domain: &str, dhcpv6: bool) -> Option<String> {
    Some(match which {
        "meta-data" => meta_data(vm),
        "user-data" => user_data(vm, domain),
        "network-config" => network_config(vm, dhcpv6 && vm.ipv6.is_some()),
        "vendor-data" => vendor_data(),
        _ => return None,
    })
}
