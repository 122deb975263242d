//! Test support shared by every pxelab crate: a loopback fixture HTTP server with fault
//! injection ([`FixtureServer`]), host commands with one failure format ([`cmd`]), network
//! namespaces ([`NetNs`]) and loop-device disks ([`LoopDisk`]) that clean up after themselves,
//! a throwaway OpenPGP key that signs what fixture mirrors serve ([`TestKey`]), and the stack's
//! documented deployments read back for tests ([`deploy`]).

pub mod cmd;
pub mod deploy;
mod fixture;
mod gpg;
mod loopdisk;
mod netns;

pub use fixture::{Behavior, FixtureServer, Recorded};
pub use gpg::TestKey;
pub use loopdisk::LoopDisk;
pub use netns::NetNs;

/// Lower-case hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}
