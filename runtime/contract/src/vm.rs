//! A target machine's definition (`VmDefinition`, the original pvmlab JSON plus pxelab's keys),
//! its `Arch` and how it boots.

use std::{
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use serde::{Deserialize, Serialize};

use crate::Mac;

/// A target machine's CPU architecture, spelled as QEMU and the original pvmlab spell it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Arch {
    #[serde(rename = "x86_64")]
    X86_64,
    #[serde(rename = "aarch64")]
    Aarch64,
}

impl Arch {
    pub const ALL: [Arch; 2] = [Arch::X86_64, Arch::Aarch64];

    pub fn as_str(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }

    /// Debian's name for the architecture (`amd64`, `arm64`).
    pub fn debian(self) -> &'static str {
        match self {
            Arch::X86_64 => "amd64",
            Arch::Aarch64 => "arm64",
        }
    }

    /// Debian's multiarch directory name (`/usr/lib/<multiarch>/`).
    pub fn multiarch(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64-linux-gnu",
            Arch::Aarch64 => "aarch64-linux-gnu",
        }
    }

    /// The ELF `e_machine` of binaries for this architecture.
    pub fn elf_machine(self) -> u16 {
        match self {
            Arch::X86_64 => 62,
            Arch::Aarch64 => 183,
        }
    }

    /// The Rust target that pxelab builds static binaries for.
    pub fn rust_target(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64-unknown-linux-gnu",
            Arch::Aarch64 => "aarch64-unknown-linux-gnu",
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Arch {
    type Err = String;

    fn from_str(s: &str) -> Result<Arch, String> {
        match s {
            "x86_64" | "amd64" => Ok(Arch::X86_64),
            "aarch64" | "arm64" => Ok(Arch::Aarch64),
            _ => Err(format!("unknown architecture {s:?}: use x86_64 or aarch64")),
        }
    }
}

/// How a target boots from the stack.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BootMode {
    /// Network-boot the installer once, then boot the installed disk.
    #[default]
    Install,
    /// Diskless: root filesystem over NFS from the stack, every boot.
    Nfsroot,
}

/// One target machine, as stored in `<vms dir>/<name>.json`.
///
/// The keys of the original pvmlab (`name, arch, distro, mac, ssh_key, kernel, initrd, pxeboot`)
/// keep their meaning, also when absent: pvmlab leaves `pxeboot` out when it is false (a
/// disk-mode VM, which must never be installed over), so a missing `pxeboot` is false; pxelab
/// always writes it. The others are pxelab's. Construct it with [`VmDefinition::from_json`] or
/// [`VmDefinition::validate`], which reject anything the stack could not serve safely.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDefinition {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    pub arch: Arch,
    pub distro: String,
    pub mac: Mac,
    /// One or more OpenSSH public keys, one per line.
    #[serde(default)]
    pub ssh_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    #[serde(default)]
    pub pxeboot: bool,
    /// The address reserved for this MAC on the lab network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<Ipv4Addr>,
    /// The IPv6 address reserved for this MAC (DHCPv6) and published as its AAAA record, when
    /// the stack serves IPv6 (`--ipv6`); the original's key, bare as it writes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<Ipv6Addr>,
    /// Host name inside the guest; the VM name when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// The disk the installer must use (e.g. `/dev/vda`); auto-detected when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    #[serde(default)]
    pub boot: BootMode,
    /// Debug switch (`lab vm start --installer-shell`): network-boot the installer's console
    /// shell (`pxelab.mode=shell`) instead of installing, also once installed.
    #[serde(default, skip_serializing_if = "is_false")]
    pub installer_shell: bool,
    /// Debug switch (`lab vm start --no-reboot`): stay in the installer after installing.
    #[serde(default, skip_serializing_if = "is_false")]
    pub no_reboot: bool,
    /// After installing, reboot through the firmware (which network-boots again and is told to
    /// boot the disk) instead of the installer starting the installed system itself: the path
    /// every real machine takes on its next power cycle (`lab vm create --firmware-reboot`).
    /// Definitions written before the switch root call it `no_kexec`.
    #[serde(default, alias = "no_kexec", skip_serializing_if = "is_false")]
    pub firmware_reboot: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("not a VM definition: {0}")]
    Json(#[from] serde_json::Error),
    #[error("invalid VM name {0:?}: use 1-63 lowercase letters, digits and '-', not starting or ending with '-'")]
    Name(String),
    #[error(
        "invalid hostname {0:?}: use dot-separated labels of lowercase letters, digits and '-'"
    )]
    Hostname(String),
    #[error("invalid distro {0:?}: use letters, digits, '.', '_' and '-' only")]
    Distro(String),
    #[error("invalid ssh_key line {0:?}: expected an OpenSSH public key such as 'ssh-ed25519 AAAA… comment'")]
    SshKey(String),
    #[error("invalid disk {0:?}: expected a device path such as /dev/vda")]
    Disk(String),
    #[error("invalid ipv6 {0}: expected a unicast address such as fd12:3456:789a::10")]
    Ipv6(Ipv6Addr),
    #[error("invalid {field} {value:?}: expected a plain file name in the distro's image directory, such as vmlinuz (letters, digits, '.', '_', '+' and '-')")]
    File { field: &'static str, value: String },
}

impl VmDefinition {
    /// The addresses reserved for this machine: its `ip`, then its `ipv6`.
    pub fn addresses(&self) -> impl Iterator<Item = std::net::IpAddr> {
        let v4 = self.ip.map(std::net::IpAddr::from);
        v4.into_iter().chain(self.ipv6.map(std::net::IpAddr::from))
    }

    pub fn from_json(text: &str) -> Result<VmDefinition, VmError> {
        let vm: VmDefinition = serde_json::from_str(text)?;
        vm.validate()?;
        Ok(vm)
    }

    pub fn to_json(&self) -> String {
        let mut text = serde_json::to_string_pretty(self).expect("VM definitions always serialize");
        text.push('\n');
        text
    }

    pub fn validate(&self) -> Result<(), VmError> {
        if !is_label(&self.name) {
            return Err(VmError::Name(self.name.clone()));
        }
        if let Some(h) = &self.hostname {
            if h.len() > 253 || !h.split('.').all(is_label) {
                return Err(VmError::Hostname(h.clone()));
            }
        }
        let distro_ok = !self.distro.is_empty()
            && self.distro.len() <= 64
            && !self.distro.starts_with('.')
            && self
                .distro
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !distro_ok {
            return Err(VmError::Distro(self.distro.clone()));
        }
        for line in self.ssh_keys() {
            if !is_ssh_key(line) {
                return Err(VmError::SshKey(line.to_string()));
            }
        }
        // Both name a file next to the distro's manifest and are copied into iPXE scripts.
        for (field, value) in [("kernel", &self.kernel), ("initrd", &self.initrd)] {
            if let Some(v) = value.as_deref().filter(|v| !is_file_name(v)) {
                return Err(VmError::File {
                    field,
                    value: v.to_string(),
                });
            }
        }
        if let Some(ip) = self.ipv6.filter(|ip| {
            ip.is_unspecified()
                || ip.is_loopback()
                || ip.is_multicast()
                || ip.to_ipv4_mapped().is_some()
        }) {
            return Err(VmError::Ipv6(ip));
        }
        if let Some(d) = &self.disk {
            let ok = d.starts_with("/dev/")
                && d.len() > 5
                && d.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"/_-.:".contains(&b))
                && !d.contains("..");
            if !ok {
                return Err(VmError::Disk(d.clone()));
            }
        }
        Ok(())
    }

    /// The public keys, without blank lines.
    pub fn ssh_keys(&self) -> impl Iterator<Item = &str> {
        self.ssh_key
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
    }

    /// The host name the guest gets: `hostname` if set, else the VM name.
    pub fn guest_hostname(&self) -> &str {
        self.hostname.as_deref().unwrap_or(&self.name)
    }
}

/// An RFC 1123 host name label, lowercase only (names become file names and DNS names).
fn is_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && !s.starts_with('-')
        && !s.ends_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// A file name that is safe in a URL path and an iPXE command line alike.
fn is_file_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b))
}

fn is_ssh_key(line: &str) -> bool {
    let mut parts = line.split_whitespace();
    let (Some(kind), Some(blob)) = (parts.next(), parts.next()) else {
        return false;
    };
    let known = kind.starts_with("ssh-") || kind.starts_with("ecdsa-") || kind.starts_with("sk-");
    known
        && blob.len() >= 16
        && blob
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b))
        && !line.chars().any(char::is_control)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIK0wmN/Cr3JXqmLW7u+g9pTh+wyqDHpSQEIQczXkVx9q lab";

    fn vm(name: &str) -> String {
        format!(
            r#"{{"name":"{name}","arch":"x86_64","distro":"debian-12","mac":"52:54:00:00:00:01",
                "ssh_key":"{KEY}\n","pxeboot":true,"ip":"10.77.0.10"}}"#
        )
    }

    #[test]
    fn parses_original_keys_and_defaults() {
        let vm = VmDefinition::from_json(&vm("target-1")).unwrap();
        assert_eq!(vm.mac.to_string(), "52:54:00:00:00:01");
        assert_eq!(vm.boot, BootMode::Install);
        assert_eq!(vm.guest_hostname(), "target-1");
        assert_eq!(vm.ssh_keys().collect::<Vec<_>>(), vec![KEY]);
        let again = VmDefinition::from_json(&vm.to_json()).unwrap();
        assert_eq!(again, vm);
    }

    #[test]
    fn rejects_unsafe_names_and_values() {
        for name in ["", "-a", "a-", "A", "a_b", "../x", "a.b", &"x".repeat(64)] {
            assert!(
                matches!(VmDefinition::from_json(&vm(name)), Err(VmError::Name(_))),
                "{name}"
            );
        }
        let bad_mac = vm("a").replace("52:54:00:00:00:01", "52:54:00:00:00");
        assert!(matches!(
            VmDefinition::from_json(&bad_mac),
            Err(VmError::Json(_))
        ));
        let bad_distro = vm("a").replace("debian-12", "../etc");
        assert!(matches!(
            VmDefinition::from_json(&bad_distro),
            Err(VmError::Distro(_))
        ));
        for (field, value) in [
            ("kernel", r"vmlinuz rdinit=sh\nshell\n#"),
            ("kernel", "../vmlinuz"),
            ("initrd", "initrd.img ${x}"),
            ("kernel", ".hidden"),
        ] {
            let text = vm("a").replace(
                r#""pxeboot":true"#,
                &format!(r#""pxeboot":true,"{field}":"{value}""#),
            );
            assert!(
                matches!(VmDefinition::from_json(&text), Err(VmError::File { field: f, .. }) if f == field),
                "{field} {value:?} accepted"
            );
        }
        let fine = vm("a").replace(
            r#""pxeboot":true"#,
            r#""pxeboot":true,"kernel":"vmlinuz-6.1.0-9-amd64","initrd":"initrd.img-6.1_x+1""#,
        );
        assert!(VmDefinition::from_json(&fine).is_ok());
        let bad_key = vm("a").replace(KEY, "password123");
        assert!(matches!(
            VmDefinition::from_json(&bad_key),
            Err(VmError::SshKey(_))
        ));
    }

    /// A target VM file as pvmlab writes it (Go's `omitempty`: no `pxeboot` when false, and keys
    /// pxelab does not use) for a disk-mode VM, and the same VM in PXE mode.
    #[test]
    fn an_upstream_vm_without_pxeboot_is_not_network_installed() {
        let disk_mode = r#"{
  "name": "client1",
  "role": "target",
  "arch": "x86_64",
  "ip": "192.168.100.2",
  "subnet": "192.168.100.0/24",
  "mac": "0a:5d:ea:18:55:b6",
  "distro": "ubuntu-24.04",
  "ssh_key": "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7 pvmlab\n",
  "kernel": "vmlinuz-6.8.0-87-generic",
  "initrd": "initrd.img-6.8.0-87-generic"
}
"#;
        let vm = VmDefinition::from_json(disk_mode).unwrap();
        assert!(
            !vm.pxeboot,
            "a VM file without pxeboot was read as a PXE VM"
        );
        assert_eq!(vm.kernel.as_deref(), Some("vmlinuz-6.8.0-87-generic"));
        let pxe = disk_mode.replace("\"distro\"", "\"pxeboot\": true,\n  \"distro\"");
        assert!(VmDefinition::from_json(&pxe).unwrap().pxeboot);
        // pxelab writes the key either way, so its own files never depend on the default.
        assert!(vm.to_json().contains("\"pxeboot\": false"));
    }

    /// pvmlab's `--ipv6` VM file: `ipv6` bare (pxelab's meaning too) beside `subnetv6`, which
    /// pxelab ignores; a bad address is refused.
    #[test]
    fn an_upstream_ipv6_vm_file_parses() {
        let text = vm("t1").replace(
            "\"ip\":\"10.77.0.10\"",
            "\"ip\":\"10.77.0.10\",\"ipv6\":\"fd00:cafe:babe::2\",\"subnetv6\":\"fd00:cafe:babe::/64\"",
        );
        let vm6 = VmDefinition::from_json(&text).unwrap();
        assert_eq!(vm6.ipv6, Some("fd00:cafe:babe::2".parse().unwrap()));
        assert!(vm6.to_json().contains("\"ipv6\": \"fd00:cafe:babe::2\""));
        assert!(!VmDefinition::from_json(&vm("t1"))
            .unwrap()
            .to_json()
            .contains("ipv6"));
        for bad in ["ff02::1", "::", "::1", "::ffff:10.0.0.1"] {
            let text = text.replace("fd00:cafe:babe::2", bad);
            assert!(
                matches!(VmDefinition::from_json(&text), Err(VmError::Ipv6(_))),
                "{bad} accepted"
            );
        }
    }

    #[test]
    fn debug_switches_are_optional_and_written_only_when_on() {
        let plain = VmDefinition::from_json(&vm("t1")).unwrap();
        assert!(!plain.installer_shell && !plain.no_reboot && !plain.firmware_reboot);
        for key in ["installer_shell", "no_reboot", "firmware_reboot"] {
            assert!(
                !plain.to_json().contains(key),
                "a definition without switches must stay byte-identical: {key} written"
            );
        }
        let debug = VmDefinition {
            installer_shell: true,
            no_reboot: true,
            firmware_reboot: true,
            ..plain
        };
        let text = debug.to_json();
        for key in ["installer_shell", "no_reboot", "firmware_reboot"] {
            assert!(
                text.contains(&format!("\"{key}\": true")),
                "{key} not written"
            );
        }
        assert_eq!(VmDefinition::from_json(&text).unwrap(), debug);
        // A lab's definitions from before the switch root still mean a firmware reboot.
        let old = text.replace("firmware_reboot", "no_kexec");
        assert_eq!(VmDefinition::from_json(&old).unwrap(), debug);
    }

    #[test]
    fn arch_spellings() {
        assert_eq!("amd64".parse::<Arch>().unwrap(), Arch::X86_64);
        assert_eq!(Arch::Aarch64.debian(), "arm64");
        assert!("riscv".parse::<Arch>().is_err());
    }
}
