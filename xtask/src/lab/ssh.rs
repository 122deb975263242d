//! SSH to targets: the lab's key pair, the host keys each VM printed on its serial console
//! (the only ones trusted, in a known_hosts file per VM), and the `ssh` command run inside the
//! lab namespace.

use std::process::Command;

use anyhow::{bail, Context, Result};
use pxelab_contract::VmDefinition;
use xshell::cmd;

use super::home::{Lab, VmFile};
use crate::process;

/// The lab's SSH public key, generating the pair on first use (private key mode 0600).
pub fn ensure_key(lab: &Lab) -> Result<String> {
    let key = lab.ssh_key();
    let public = key.with_extension("pub");
    if !key.exists() || !public.exists() {
        std::fs::create_dir_all(lab.ssh_dir())?;
        let _ = std::fs::remove_file(&key);
        let _ = std::fs::remove_file(&public);
        let sh = process::shell()?;
        cmd!(sh, "ssh-keygen -q -t ed25519 -N '' -C pxelab-lab -f {key}")
            .quiet()
            .run()
            .context("generating the lab SSH key")?;
    }
    std::fs::read_to_string(&public).with_context(|| format!("reading {}", public.display()))
}

/// An `ssh` to the VM run inside the lab namespace, with the lab key. The VM's host keys are
/// not trusted on first use: they are taken from its serial console, where cloud-init prints
/// them once it has generated them (the last such block counts, so a reboot or a diskless VM,
/// which gets new keys every boot, is handled). Until that block appears, there is nothing to
/// connect to.
pub fn command(lab: &Lab, vm: &VmDefinition, command: &[String]) -> Result<Command> {
    let net = lab.net()?;
    let ip = vm
        .ip
        .with_context(|| format!("{} has no IP address", vm.name))?;
    let console = std::fs::read(lab.vm_file(&vm.name, VmFile::Console)).unwrap_or_default();
    let keys = console_host_keys(&String::from_utf8_lossy(&console));
    if keys.is_empty() {
        bail!(
            "{} has not printed its SSH host keys on its console yet (cloud-init does that when it is done)",
            vm.name
        );
    }
    let known: String = keys.iter().map(|k| format!("{ip} {k}\n")).collect();
    let known_hosts = lab.known_hosts(&vm.name);
    crate::store::write_atomic(&known_hosts, known.as_bytes())?;
    let sh = process::shell()?;
    let ssh = net
        .command(&sh, "ssh")?
        .arg("-i")
        .arg(lab.ssh_key())
        .args([
            "-o",
            "LogLevel=ERROR",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=5",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
        ])
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
        .arg(format!("pxelab@{ip}"))
        .args(command);
    Ok(process::command(ssh))
}

/// Forgets the host keys trusted for `vm` (it is reinstalled or gone).
pub fn forget_host_key(lab: &Lab, vm: &str) {
    let _ = std::fs::remove_file(lab.known_hosts(vm));
}

/// The host public keys (`<type> <base64>`) of the last `BEGIN SSH HOST KEY KEYS` block that
/// cloud-init printed on the console.
fn console_host_keys(console: &str) -> Vec<String> {
    let Some(start) = console.rfind("-----BEGIN SSH HOST KEY KEYS-----") else {
        return Vec::new();
    };
    let block = &console[start..];
    let Some(end) = block.find("-----END SSH HOST KEY KEYS-----") else {
        return Vec::new();
    };
    block[..end]
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let (kind, key) = (words.next()?, words.next()?);
            let plausible = (kind.starts_with("ssh-") || kind.starts_with("ecdsa-"))
                && key
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b));
            plausible.then(|| format!("{kind} {key}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::console_host_keys;

    #[test]
    fn host_keys_come_from_the_last_console_block() {
        let console = "\
-----BEGIN SSH HOST KEY KEYS-----\r
ssh-ed25519 AAAAold root@t\r
-----END SSH HOST KEY KEYS-----\r
[  12.0] reboot\r
-----BEGIN SSH HOST KEY KEYS-----\r
ecdsa-sha2-nistp256 AAAAE2Vj= root@t\r
ssh-ed25519 AAAAC3Nz root@t\r
garbage line\r
-----END SSH HOST KEY KEYS-----\r
";
        assert_eq!(
            console_host_keys(console),
            vec!["ecdsa-sha2-nistp256 AAAAE2Vj=", "ssh-ed25519 AAAAC3Nz"]
        );
        assert!(
            console_host_keys("-----BEGIN SSH HOST KEY KEYS-----\nssh-ed25519 AAAA").is_empty()
        );
        assert!(console_host_keys("nothing here").is_empty());
    }
}
