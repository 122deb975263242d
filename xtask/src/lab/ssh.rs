//! SSH to targets: the lab's key pair, the host keys each VM printed on its serial console
//! (the only ones trusted, in a known_hosts file per VM), and the `ssh` command run inside the
//! lab namespace.

use std::{
    ffi::OsString,
    net::Ipv4Addr,
    path::PathBuf,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use pxelab_contract::{Phase, VmDefinition};
use xshell::cmd;

use super::home::{Lab, VmFile};
use crate::process;

/// The login cloud-init creates on every target.
const USER: &str = pxelab_contract::cloudinit::USER;

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
    command_over(lab, vm, false, command)
}

/// [`command`] to the VM's IPv6 address when `ipv6` (`lab vm ssh --ipv6`).
pub fn command_over(
    lab: &Lab,
    vm: &VmDefinition,
    ipv6: bool,
    command: &[String],
) -> Result<Command> {
    let (ip, options) = trusted(lab, vm)?;
    let ip = if ipv6 {
        let v6 = vm.ipv6.with_context(|| {
            format!(
                "{} has no IPv6 address: `cargo xtask lab up --ipv6` gives every VM one",
                vm.name
            )
        })?;
        std::net::IpAddr::from(v6)
    } else {
        ip.into()
    };
    let sh = process::shell()?;
    let ssh = lab
        .net()?
        .command(&sh, "ssh")?
        .args(options)
        .arg(format!("{USER}@{ip}"))
        .args(command);
    Ok(process::command(ssh))
}

/// One end of `lab vm copy`: a path on the host, or `NAME:PATH` on a VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CopyEnd {
    Local(PathBuf),
    Vm { name: String, path: String },
}

impl CopyEnd {
    /// `NAME:PATH` is a VM's when NAME could be a VM name (so `./a:b` and `/x:y` are local
    /// paths); an empty PATH is an error.
    pub fn parse(text: &str) -> Result<CopyEnd> {
        match text.split_once(':') {
            Some((name, path)) if !name.is_empty() && !name.contains('/') => {
                if path.is_empty() {
                    bail!("{text:?} names no path on {name}: write {name}:PATH (e.g. {name}:/tmp/file)");
                }
                Ok(CopyEnd::Vm {
                    name: name.to_string(),
                    path: path.to_string(),
                })
            }
            _ => Ok(CopyEnd::Local(PathBuf::from(text))),
        }
    }
}

/// The VM a copy from `from` to `to` involves: exactly one end must name one.
pub fn copy_vm<'a>(from: &'a CopyEnd, to: &'a CopyEnd) -> Result<&'a str> {
    match (from, to) {
        (CopyEnd::Vm { name, .. }, CopyEnd::Local(_))
        | (CopyEnd::Local(_), CopyEnd::Vm { name, .. }) => Ok(name),
        (CopyEnd::Vm { .. }, CopyEnd::Vm { .. }) => {
            bail!("both ends name a VM: copy from one VM to the host, then from the host to the other")
        }
        (CopyEnd::Local(_), CopyEnd::Local(_)) => {
            bail!("neither end names a VM: write one end as NAME:PATH (e.g. target-1:/tmp/file)")
        }
    }
}

/// An `scp` between the host and `vm` (the VM [`copy_vm`] named), run inside the lab
/// namespace with the same key and trusted host keys as [`command`]. Local paths are made
/// absolute first: lab commands run in `/` (see [`process::shell`]).
pub fn copy(
    lab: &Lab,
    vm: &VmDefinition,
    from: &CopyEnd,
    to: &CopyEnd,
    recursive: bool,
) -> Result<Command> {
    let (ip, options) = trusted(lab, vm)?;
    let arg = |end: &CopyEnd| -> Result<OsString> {
        Ok(match end {
            CopyEnd::Local(path) => std::path::absolute(path)
                .with_context(|| format!("resolving {}", path.display()))?
                .into_os_string(),
            CopyEnd::Vm { path, .. } => format!("{USER}@{ip}:{path}").into(),
        })
    };
    let sh = process::shell()?;
    let scp = lab
        .net()?
        .command(&sh, "scp")?
        .args(recursive.then_some("-r"))
        .args(options)
        .arg(arg(from)?)
        .arg(arg(to)?);
    Ok(process::command(scp))
}

/// The VM's address and the ssh/scp options that make it trusted: the lab key, and the host
/// keys from its console written to its known_hosts file.
fn trusted(lab: &Lab, vm: &VmDefinition) -> Result<(Ipv4Addr, Vec<OsString>)> {
    let ip = vm
        .ip
        .with_context(|| format!("{} has no IP address", vm.name))?;
    let keys = match installed_host_keys(lab, &vm.name) {
        Some(keys) => keys,
        None => {
            let console = std::fs::read(lab.vm_file(&vm.name, VmFile::Console)).unwrap_or_default();
            console_host_keys(&String::from_utf8_lossy(&console))
        }
    };
    if keys.is_empty() {
        bail!(
            "{} has not printed its SSH host keys on its console yet (cloud-init does that when it is done)",
            vm.name
        );
    }
    // Both addresses, so SSH over IPv6 trusts the same keys.
    let v6 = vm.ipv6.map(|v6| v6.to_string());
    let known: String = std::iter::once(ip.to_string())
        .chain(v6)
        .flat_map(|addr| keys.iter().map(move |k| format!("{addr} {k}\n")))
        .collect();
    let known_hosts = lab.known_hosts(&vm.name);
    crate::store::write_atomic(&known_hosts, known.as_bytes())?;
    let mut options: Vec<OsString> = vec!["-i".into(), lab.ssh_key().into()];
    for option in [
        "LogLevel=ERROR",
        "BatchMode=yes",
        "ConnectTimeout=5",
        "StrictHostKeyChecking=yes",
    ] {
        options.extend(["-o".into(), option.into()]);
    }
    options.extend([
        "-o".into(),
        format!("UserKnownHostsFile={}", known_hosts.display()).into(),
    ]);
    Ok((ip, options))
}

/// Runs `command` (an `ssh` or `scp` of this module) to its end, or kills it after `limit`: a
/// VM that lost its root or its network keeps a connection open without answering. Outputs
/// are captured (keep them small: a full pipe would stall the command until `limit`).
pub fn output_within(mut command: Command, limit: Duration) -> Result<Output> {
    let what = process::describe(&command);
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {what}"))?;
    let deadline = Instant::now() + limit;
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("`{what}` did not finish within {} s", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(child.wait_with_output()?)
}

/// Whether `vm` answers SSH now (with its trusted host key and the lab key), asked from inside
/// the lab namespace and given `limit`; the reason when it does not.
pub fn probe(lab: &Lab, vm: &VmDefinition, limit: Duration) -> std::result::Result<(), String> {
    let out = command(lab, vm, &["true".to_string()])
        .and_then(|c| output_within(c, limit))
        .map_err(|e| format!("{e:#}"))?;
    if out.status.success() {
        return Ok(());
    }
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    Err(if err.is_empty() {
        format!("ssh exited with {}", out.status)
    } else {
        err
    })
}

/// Forgets the host keys trusted for `vm` (it is reinstalled or gone).
pub fn forget_host_key(lab: &Lab, vm: &str) {
    let _ = std::fs::remove_file(lab.known_hosts(vm));
}

/// The host keys the installer wrote into `vm`'s disk, as its last `installed` event recorded
/// them: trusted from the first login, before cloud-init prints any. None for a machine that
/// was not installed by this stack (a diskless root makes its keys at boot).
fn installed_host_keys(lab: &Lab, vm: &str) -> Option<Vec<String>> {
    let timeline = super::stack::timeline(lab, vm).ok()?;
    let last = timeline.iter().rev().find(|e| {
        matches!(
            e.event.phase,
            Phase::Installed | Phase::Reprovision | Phase::NfsRoot
        )
    })?;
    (last.event.phase == Phase::Installed && !last.event.host_keys.is_empty())
        .then(|| last.event.host_keys.clone())
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
    use super::*;

    #[test]
    fn copy_ends_tell_vm_paths_from_local_ones() {
        let vm = |name: &str, path: &str| CopyEnd::Vm {
            name: name.into(),
            path: path.into(),
        };
        assert_eq!(
            CopyEnd::parse("target-1:/tmp/x").unwrap(),
            vm("target-1", "/tmp/x")
        );
        assert_eq!(
            CopyEnd::parse("target-1:notes.txt").unwrap(),
            vm("target-1", "notes.txt")
        );
        for local in ["notes.txt", "./a:b", "/srv/x:y", ":x"] {
            assert_eq!(
                CopyEnd::parse(local).unwrap(),
                CopyEnd::Local(local.into()),
                "{local}"
            );
        }
        let err = CopyEnd::parse("target-1:").unwrap_err().to_string();
        assert!(err.contains("target-1:PATH"), "{err}");
    }

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
