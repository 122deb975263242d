use serde::{Deserialize, Serialize};

use crate::Mac;

/// Size of the EFI system partition the installer creates.
pub const ESP_SIZE_MIB: u64 = 512;

/// A file the installer downloads, pinned by digest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    pub url: String,
    /// Lowercase hex sha256 of the bytes served at `url`.
    pub sha256: String,
    /// Size in bytes of the bytes served at `url`.
    pub size: u64,
}

/// What the boot handler tells the installer at `GET /config/<mac>`.
///
/// Every URL is absolute and built from the address the installer used to reach the handler,
/// so the installer never guesses a server address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstallerConfig {
    pub name: String,
    pub mac: Mac,
    pub hostname: String,
    pub distro: String,
    /// The root filesystem tarball (`rootfs.tar.zst` or `.tar.gz`).
    pub rootfs: Artifact,
    /// Base URL of the NoCloud documents, ending in `/` (`…/cloud-init/<name>/`).
    pub cloud_init_url: String,
    /// Where to `POST` [`crate::Event`]s.
    pub events_url: String,
    /// The disk to install to; when absent the installer picks one and logs which.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    /// Reboot after a successful install (else stay up, e.g. for debugging).
    pub reboot: bool,
}
