//! A throwaway OpenPGP signing key for fixture mirrors: made by `gpg` in a private home, exported
//! as a keyring file that `gpgv` can be told to trust, and used to clear-sign or detach-sign
//! what a fixture serves. The key's agent is stopped when the key is dropped.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cmd::{checked, require};

/// One signing key and its keyring.
pub struct TestKey {
    home: tempfile::TempDir,
    keyring: PathBuf,
}

impl TestKey {
    /// A new ed25519 key without passphrase (a second or so).
    pub fn generate() -> TestKey {
        require("gpg", "gpg");
        require("gpg-agent", "gpg-agent");
        require("gpgconf", "gpgconf");
        let home = tempfile::Builder::new()
            .prefix("pxelab-gpg-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a gpg home: {e}"));
        let key = TestKey {
            keyring: home.path().join("trusted.gpg"),
            home,
        };
        key.gpg(&[
            "--passphrase",
            "",
            "--quick-gen-key",
            "pxelab fixture <fixture@pxelab.invalid>",
            "ed25519",
            "sign",
            "never",
        ]);
        let keyring = key.keyring.to_string_lossy().into_owned();
        key.gpg(&["--output", &keyring, "--export"]);
        key
    }

    /// The keyring that holds only this key's public half (what `gpgv --keyring` reads).
    pub fn keyring(&self) -> &Path {
        &self.keyring
    }

    /// `text` as a clear-signed message (an `InRelease`).
    pub fn clearsign(&self, text: &[u8]) -> Vec<u8> {
        self.sign("--clearsign", text)
    }

    /// An armored detached signature of `data` (a `Release.gpg`, a `SHA256SUMS.gpg`).
    pub fn detach_sign(&self, data: &[u8]) -> Vec<u8> {
        self.sign("--detach-sign", data)
    }

    fn sign(&self, how: &str, data: &[u8]) -> Vec<u8> {
        let dir = self.home.path();
        let input = dir.join("input");
        let output = dir.join("signed");
        std::fs::write(&input, data).unwrap();
        let _ = std::fs::remove_file(&output);
        self.gpg(&[
            "--armor",
            "--output",
            &output.to_string_lossy(),
            how,
            &input.to_string_lossy(),
        ]);
        std::fs::read(&output).unwrap()
    }

    fn gpg(&self, args: &[&str]) {
        checked(
            Command::new("gpg")
                .arg("--batch")
                .arg("--quiet")
                .arg("--homedir")
                .arg(self.home.path())
                .args(args),
        );
    }
}

impl Drop for TestKey {
    fn drop(&mut self) {
        // gpg started an agent for this home; it would outlive the test otherwise.
        let _ = Command::new("gpgconf")
            .arg("--homedir")
            .arg(self.home.path())
            .args(["--kill", "all"])
            .output();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sys_gpgv_accepts_what_the_key_signs_and_nothing_else() {
        let key = TestKey::generate();
        let dir = tempfile::tempdir().unwrap();
        let (data, sig) = (dir.path().join("data"), dir.path().join("data.gpg"));
        std::fs::write(&data, b"payload\n").unwrap();
        std::fs::write(&sig, key.detach_sign(b"payload\n")).unwrap();
        let gpgv = |data: &Path| {
            Command::new("gpgv")
                .arg("--keyring")
                .arg(key.keyring())
                .arg(&sig)
                .arg(data)
                .output()
                .expect("gpgv runs (apt-get install gpgv)")
                .status
                .success()
        };
        assert!(gpgv(&data), "a good signature");
        std::fs::write(&data, b"payload!\n").unwrap();
        assert!(!gpgv(&data), "changed data");
        let signed = String::from_utf8(key.clearsign(b"Suite: x\n")).unwrap();
        assert!(
            signed.starts_with("-----BEGIN PGP SIGNED MESSAGE-----") && signed.contains("Suite: x"),
            "{signed}"
        );
    }
}
