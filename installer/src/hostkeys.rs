//! The target's SSH host keys, made by the installer: sshd can start on the first boot without
//! waiting for cloud-init to make them, the stack learns them with `installed` (so the first
//! SSH login can already check them), and they are on the disk before the first power-on —
//! keys written by cloud-init seconds before a power cut were found empty (ext4 delayed
//! allocation), which bricked SSH.
//!
//! ed25519 and ECDSA P-256, the two types cloud-init made for pxelab before; no RSA.

use std::path::Path;

use ssh_key::rand_core::OsRng;
use ssh_key::{Algorithm, EcdsaCurve, LineEnding, PrivateKey};

use crate::error::{err, Result};
use crate::seed::write_atomic;

/// Key type name as OpenSSH spells it in `ssh_host_<name>_key`, and its algorithm.
const TYPES: [(&str, Algorithm); 2] = [
    ("ed25519", Algorithm::Ed25519),
    (
        "ecdsa",
        Algorithm::Ecdsa {
            curve: EcdsaCurve::NistP256,
        },
    ),
];

/// Makes one key of each type and writes `etc/ssh/ssh_host_<type>_key` (0600) and `.pub`
/// (0644) under `root`, each file and the directory synced. Returns the public keys as
/// `known_hosts` spells them: `<algorithm> <base64>`.
pub fn write(root: &Path, hostname: &str) -> Result<Vec<String>> {
    let dir = root.join("etc/ssh");
    let mut known = Vec::new();
    for (name, algorithm) in TYPES {
        let mut key = PrivateKey::random(&mut OsRng, algorithm)
            .map_err(|e| err(format!("making the {name} SSH host key: {e}")))?;
        key.set_comment(format!("root@{hostname}"));
        let private = key
            .to_openssh(LineEnding::LF)
            .map_err(|e| err(format!("encoding the {name} SSH host key: {e}")))?;
        let public = key
            .public_key()
            .to_openssh()
            .map_err(|e| err(format!("encoding the {name} SSH host key: {e}")))?;
        let file = dir.join(format!("ssh_host_{name}_key"));
        write_atomic(&file, private.as_bytes(), 0o600)?;
        write_atomic(
            &file.with_extension("pub"),
            format!("{public}\n").as_bytes(),
            0o644,
        )?;
        known.push(public.split(' ').take(2).collect::<Vec<_>>().join(" "));
    }
    Ok(known)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn writes_keys_sshd_can_load_and_reports_their_public_halves() {
        let t = tempfile::tempdir().unwrap();
        let known = write(t.path(), "web-1").unwrap();
        assert_eq!(known.len(), 2);
        assert!(known[0].starts_with("ssh-ed25519 AAAA"), "{known:?}");
        assert!(
            known[1].starts_with("ecdsa-sha2-nistp256 AAAA"),
            "{known:?}"
        );
        for (name, public) in ["ed25519", "ecdsa"].iter().zip(&known) {
            let file = t.path().join(format!("etc/ssh/ssh_host_{name}_key"));
            let private = fs::read_to_string(&file).unwrap();
            assert!(private.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----\n"));
            let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&file), 0o600, "sshd refuses a readable private key");
            let pub_file = file.with_extension("pub");
            assert_eq!(mode(&pub_file), 0o644);
            let line = fs::read_to_string(&pub_file).unwrap();
            assert_eq!(line, format!("{public} root@web-1\n"));
            // The private key decodes to the public key that was reported.
            let decoded = PrivateKey::from_openssh(&private).unwrap();
            assert!(public.ends_with(
                decoded
                    .public_key()
                    .to_openssh()
                    .unwrap()
                    .split(' ')
                    .nth(1)
                    .unwrap()
            ));
        }
        let again = write(t.path(), "web-1").unwrap();
        assert_ne!(again, known, "every install gets keys of its own");
    }
}
