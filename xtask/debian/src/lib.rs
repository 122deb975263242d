//! pxelab's Debian package source, in pure Rust (no apt, dpkg, ar or tar binaries; only `gpgv`
//! for signatures).
//!
//! The path from a package name to bytes on disk:
//! 1. [`Archive::open`] reads one [`Source`] (mirror, suite, components, architecture): the
//!    suite's `InRelease` is checked with `gpgv` against a keyring ([`Trust`]), then each
//!    `Packages.xz` is checked against the size and SHA-256 the signed Release lists and parsed
//!    into an [`Index`]. [`Index::merge`] combines suites (bookworm + bookworm-security …).
//! 2. [`Index::resolve`] computes the `Depends`/`Pre-Depends` closure of some package names and
//!    returns one [`DebPin`] per package, sorted by name: what the lock file records.
//! 3. Someone else (xtask's store) downloads `pin.url` and checks `pin.sha256`
//!    ([`DebPin::verify_file`] does it for a file on disk).
//! 4. [`Deb::open`] reads a downloaded `.deb`: [`Deb::data_entries`], [`Deb::read_data_file`],
//!    [`Deb::extract_to`], [`Deb::control`].
//!
//! ```no_run
//! use pxelab_debian::{Archive, Deb, ResolveOptions, Source, Trust};
//! # fn main() -> pxelab_debian::Result<()> {
//! let archive = Archive::new(Trust::default())?;
//! let index = archive.open_all(&[
//!     Source::debian("bookworm", "amd64"),
//!     Source::debian("bookworm-security", "amd64"),
//! ])?;
//! let pins = index.resolve(&["busybox-static"], &ResolveOptions::default())?;
//! // … fetch pins[i].url into a file, verify, then:
//! let deb = Deb::open("busybox-static.deb")?;
//! let busybox = deb.read_data_file("bin/busybox")?;
//! # Ok(()) }
//! ```

mod archive;
mod deb;
pub mod deb822;
mod error;
mod packages;
pub mod relation;
pub mod release;
mod resolve;

pub use archive::{Archive, Source, DEBIAN_MIRROR, DEBIAN_SECURITY_MIRROR};
pub use deb::{DataEntry, Deb, EntryKind};
pub use deb822::Stanza;
pub use debversion::Version;
pub use error::{Error, Result};
pub use packages::{DebPin, Index, Package};
pub use release::{Release, Trust, DEBIAN_KEYRING};
pub use resolve::ResolveOptions;
