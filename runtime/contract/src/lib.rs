//! The contract between pxelab's parts: the types that cross a process boundary.
//!
//! The boot handler, the installer and xtask all read and write these; nothing else defines a
//! wire or file format. Values are validated when parsed, so code that holds a [`VmDefinition`]
//! or a [`Mac`] can trust it.

pub mod cloudinit;
mod event;
mod installer;
mod mac;
mod vm;

pub use event::{
    Event, InvalidVm, Phase, StackStatus, TimelineEntry, VmState, VmStatus, CONTROL_SOCKET,
    MAX_MESSAGE,
};
pub use installer::{
    Artifact, ConfigReply, DistroManifest, InstallerConfig, Login, ManifestFile, DISK_IMAGE_FRAME,
    ESP_SIZE_MIB, NIC_NAME,
};
pub use mac::{Mac, MacError};
pub use vm::{Arch, BootMode, VmDefinition, VmError};
