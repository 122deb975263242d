//! Test support shared by pxelab crates: a loopback fixture HTTP server with fault injection
//! ([`FixtureServer`]) and a sha256 helper. std only, so every crate can depend on it cheaply.

mod fixture;

pub use fixture::{Behavior, FixtureServer, Recorded};

/// Lower-case hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}
