//! What a target reports while it installs and boots (`Event`, `Phase`), the timeline the
//! stack keeps of it, and each machine's install state machine (`VmState`).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::Mac;

/// A step in a target's life, as reported by the boot handler or the installer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// dnsmasq acknowledged a DHCP lease for the VM (recorded by the stack from dnsmasq's log).
    Dhcp,
    /// The handler answered `/ipxe` with the installer (the VM is network-booting).
    Ipxe,
    /// The VM (from its reserved IP) fetched its kernel from the handler.
    Kernel,
    /// The handler answered `/ipxe` with "boot from the local disk".
    LocalBoot,
    /// The installer is running and has its config.
    #[default]
    Installing,
    /// The installer chose (and checked) the target disk.
    Disk,
    /// GPT written.
    Partition,
    /// Filesystems created and mounted.
    Mkfs,
    /// Root filesystem streamed and extracted (progress events carry bytes).
    Rootfs,
    /// cloud-init seed, fstab written.
    Seed,
    /// Boot loader installed.
    Bootloader,
    /// The install finished; the next network boot goes to the disk.
    Installed,
    /// The install failed; `message` says where and why.
    Failed,
    /// A diskless VM mounted its root over NFS (reported by its initramfs); it is booting
    /// into the distro, with nothing to install.
    NfsRoot,
    /// The operator reset the VM's install state (`POST /vms/<name>/reprovision` on the
    /// control socket): its next network boot installs again. Never sent by a machine.
    Reprovision,
    /// The installed system's cloud-init finished all its stages (reported by the target after
    /// `cloud-final`, on every boot; `message` says whether any module failed). SSH answers
    /// before this: the installer already wrote the host keys and the login.
    CloudInitDone,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Dhcp => "dhcp",
            Phase::Ipxe => "ipxe",
            Phase::Kernel => "kernel",
            Phase::LocalBoot => "local-boot",
            Phase::Installing => "installing",
            Phase::Disk => "disk",
            Phase::Partition => "partition",
            Phase::Mkfs => "mkfs",
            Phase::Rootfs => "rootfs",
            Phase::Seed => "seed",
            Phase::Bootloader => "bootloader",
            Phase::Installed => "installed",
            Phase::Failed => "failed",
            Phase::NfsRoot => "nfs-root",
            Phase::Reprovision => "reprovision",
            Phase::CloudInitDone => "cloud-init-done",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Longest `message` the stack keeps, in bytes; longer ones are cut (on a character boundary).
pub const MAX_MESSAGE: usize = 512;

/// The body of `POST /events/<mac>`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub phase: Phase,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// Set on the event that ends a phase: how long the phase took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// Progress within a phase (the rootfs stream).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_done: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_total: Option<u64>,
    /// Milliseconds since the sender started (its own clock; the handler stamps arrival).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elapsed_ms: Option<u64>,
    /// On `installed`: the public SSH host keys the installer wrote into the target
    /// (`<type> <base64>`, as in `known_hosts`), so SSH can trust them from the first login.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_keys: Vec<String>,
}

/// At most this many host keys are kept from one `installed` event.
pub const MAX_HOST_KEYS: usize = 8;

impl Event {
    /// What a machine sent, made safe to keep and show: the message cleaned
    /// ([`Event::clean_message`]) and only well-formed host keys kept ([`Event::is_host_key`]),
    /// since the lab writes them into a `known_hosts` file.
    pub fn clean(&mut self) {
        // Most messages are clean already (every `/ipxe` records one): keep them as they are.
        let clean = self.message.len() <= MAX_MESSAGE && self.message.chars().all(is_printable);
        if !clean {
            self.message = Event::clean_message(&self.message);
        }
        self.host_keys.retain(|k| Event::is_host_key(k));
        self.host_keys.truncate(MAX_HOST_KEYS);
    }

    /// `<type> <base64>` of an OpenSSH public host key type, nothing else (no comment, no
    /// options, no line break): one line of `known_hosts` after the host name.
    pub fn is_host_key(key: &str) -> bool {
        let Some((kind, blob)) = key.split_once(' ') else {
            return false;
        };
        matches!(
            kind,
            "ssh-ed25519"
                | "ecdsa-sha2-nistp256"
                | "ecdsa-sha2-nistp384"
                | "ecdsa-sha2-nistp521"
                | "ssh-rsa"
        ) && (16..=1024).contains(&blob.len())
            && blob
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='))
    }

    /// The message as it may reach an operator's terminal: no control characters (ANSI and OSC
    /// escape sequences lose their ESC and print as text), no bidirectional overrides, line
    /// breaks and tabs as spaces, at most [`MAX_MESSAGE`] bytes.
    pub fn clean_message(message: &str) -> String {
        let mut out = String::with_capacity(message.len().min(MAX_MESSAGE));
        for c in message.chars() {
            let c = match c {
                '\n' | '\r' | '\t' => ' ',
                c if !is_printable(c) => continue,
                c => c,
            };
            if out.len() + c.len_utf8() > MAX_MESSAGE {
                break;
            }
            out.push(c);
        }
        out
    }
}

/// What a message keeps as it is: not a control character, not a reordering one.
fn is_printable(c: char) -> bool {
    !c.is_control() && !is_bidi_control(c)
}

/// Characters that reorder the text around them when printed (Trojan Source style).
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// One entry of a VM's timeline (`GET /vms/<name>/timeline` serves its last entries).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimelineEntry {
    /// Arrival time at the handler, Unix milliseconds.
    pub at_ms: u64,
    #[serde(flatten)]
    pub event: Event,
}

/// Where a VM is in its provisioning.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    #[default]
    New,
    Booting,
    Installing,
    Installed,
    Failed,
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VmState::New => "new",
            VmState::Booting => "booting",
            VmState::Installing => "installing",
            VmState::Installed => "installed",
            VmState::Failed => "failed",
        })
    }
}

impl VmState {
    /// The state after `phase` was recorded. This is the whole state machine:
    /// `new → booting → installing → installed | failed`; a new network boot into the installer
    /// (`ipxe`) starts over from any state but `installed`, which only a reprovision resets.
    pub fn after(self, phase: Phase) -> VmState {
        match (self, phase) {
            (_, Phase::Reprovision) => VmState::New,
            (VmState::Installed, _) => VmState::Installed,
            (_, Phase::Ipxe) => VmState::Booting,
            // Observations of the network boot, not steps of the install.
            (_, Phase::Dhcp | Phase::Kernel) => self,
            // A diskless boot is booting until the lab sees SSH; it never installs.
            (_, Phase::NfsRoot) => self,
            // Reported by the running system, after the install (or by a diskless one).
            (_, Phase::CloudInitDone) => self,
            (_, Phase::LocalBoot) => self,
            (_, Phase::Installed) => VmState::Installed,
            (_, Phase::Failed) => VmState::Failed,
            (VmState::Failed, _) => VmState::Failed,
            (_, _) => VmState::Installing,
        }
    }
}

/// One row of `GET /status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    pub name: String,
    pub mac: Mac,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<std::net::Ipv4Addr>,
    pub state: VmState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_event: Option<TimelineEntry>,
    /// When the VM entered `state`, Unix milliseconds (absent for `new`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_ms: Option<u64>,
}

/// A VM definition file the stack could not use, and why (one line).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvalidVm {
    pub file: String,
    pub error: String,
}

/// The stack serves its HTTP API also on this Unix socket in its state directory (mode 0600),
/// for local tools that cannot reach its network (a namespace, a container). Operator actions
/// are served only here: `POST /vms/<name>/reprovision` resets a VM's install state and
/// answers its [`VmStatus`] (404 with a one-line reason for an unknown VM).
pub const CONTROL_SOCKET: &str = "control.sock";

/// The body of `GET /status`: every valid VM (sorted by name) and every rejected file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StackStatus {
    pub vms: Vec<VmStatus>,
    #[serde(default)]
    pub invalid: Vec<InvalidVm>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_machine() {
        use Phase::*;
        let walk = |phases: &[Phase]| phases.iter().fold(VmState::New, |s, p| s.after(*p));
        assert_eq!(walk(&[Ipxe]), VmState::Booting);
        assert_eq!(walk(&[Dhcp]), VmState::New);
        assert_eq!(walk(&[Dhcp, Ipxe, Kernel]), VmState::Booting);
        assert_eq!(walk(&[Ipxe, Installing, Dhcp]), VmState::Installing);
        assert_eq!(walk(&[Ipxe, Installing, Rootfs]), VmState::Installing);
        assert_eq!(
            walk(&[Ipxe, Installing, Rootfs, Installed]),
            VmState::Installed
        );
        assert_eq!(walk(&[Ipxe, Installing, Failed, Rootfs]), VmState::Failed);
        assert_eq!(walk(&[Ipxe, Installing, Failed, Ipxe]), VmState::Booting);
        assert_eq!(walk(&[Ipxe, Installed, Ipxe, Failed]), VmState::Installed);
        assert_eq!(walk(&[Dhcp, Ipxe, Kernel, NfsRoot]), VmState::Booting);
        assert_eq!(walk(&[Ipxe, Installed, Reprovision]), VmState::New);
        assert_eq!(
            walk(&[Ipxe, Installing, Installed, CloudInitDone]),
            VmState::Installed
        );
        assert_eq!(
            walk(&[Dhcp, Ipxe, NfsRoot, CloudInitDone]),
            VmState::Booting
        );
        assert_eq!(
            walk(&[Ipxe, Installed, Reprovision, Ipxe]),
            VmState::Booting
        );
    }

    #[test]
    fn event_wire_form() {
        let e: Event = serde_json::from_str(r#"{"phase":"local-boot"}"#).unwrap();
        assert_eq!(e.phase, Phase::LocalBoot);
        let e: Event = serde_json::from_str(r#"{"phase":"nfs-root","message":"m"}"#).unwrap();
        assert_eq!((e.phase, e.phase.as_str()), (Phase::NfsRoot, "nfs-root"));
        let line = TimelineEntry {
            at_ms: 5,
            event: Event {
                phase: Phase::Rootfs,
                bytes_done: Some(1),
                ..Event::default()
            },
        };
        assert_eq!(
            serde_json::to_string(&line).unwrap(),
            r#"{"at_ms":5,"phase":"rootfs","bytes_done":1}"#
        );
        assert!(serde_json::from_str::<Event>(r#"{"phase":"bogus"}"#).is_err());
        let done: Event =
            serde_json::from_str(r#"{"phase":"cloud-init-done","message":"no errors"}"#).unwrap();
        assert_eq!(done.phase.as_str(), "cloud-init-done");
        let installed: Event =
            serde_json::from_str(r#"{"phase":"installed","host_keys":["ssh-ed25519 AAAAC3Nza"]}"#)
                .unwrap();
        assert_eq!(installed.host_keys, ["ssh-ed25519 AAAAC3Nza"]);
        let plain = serde_json::to_string(&Event::default()).unwrap();
        assert!(!plain.contains("host_keys"), "{plain}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(1024))]

        /// Any text comes out printable, bounded and unchanged where it was already clean.
        #[test]
        fn any_message_comes_out_printable(message in "\\PC{0,600}|[\\x00-\\x{a0}\\x{202e}]{0,600}") {
            let clean = Event::clean_message(&message);
            proptest::prop_assert!(clean.len() <= MAX_MESSAGE);
            proptest::prop_assert!(!clean.chars().any(|c| c.is_control() || is_bidi_control(c)));
            let printable = !message.chars().any(|c| c.is_control() || is_bidi_control(c));
            if printable && message.len() <= MAX_MESSAGE {
                proptest::prop_assert_eq!(clean, message);
            }
        }
    }

    #[test]
    fn messages_are_cleaned_for_terminals() {
        let evil = "ok\x1b[2J\x1b]0;owned\x07\u{9b}31m\u{202e}txt.exe\r\nnext\tcol\0";
        assert_eq!(
            Event::clean_message(evil),
            "ok[2J]0;owned31mtxt.exe  next col"
        );
        let long = "é".repeat(MAX_MESSAGE);
        let cut = Event::clean_message(&long);
        assert_eq!(cut.len(), MAX_MESSAGE);
        assert!(cut.chars().all(|c| c == 'é'));
        assert_eq!(Event::clean_message("plain"), "plain");
    }

    #[test]
    fn only_well_formed_host_keys_are_kept() {
        let good =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHhK0VfjzHd3vOj2mFGa7JjCqUSzPxcS7zX5pG1e2W9c";
        let mut e = Event {
            phase: Phase::Installed,
            host_keys: vec![
                good.to_string(),
                format!("{good}\n@cert-authority * {good}"),
                format!("{good} comment"),
                "ssh-dss AAAAB3NzaC1kc3MAAACBAP".to_string(),
                "ssh-ed25519 short".to_string(),
            ],
            ..Event::default()
        };
        e.clean();
        assert_eq!(e.host_keys, [good]);
        e.host_keys = vec![good.to_string(); 20];
        e.clean();
        assert_eq!(e.host_keys.len(), MAX_HOST_KEYS);
    }
}
