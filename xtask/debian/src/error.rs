//! The crate's one error type: every variant names the input that was wrong and, where there
//! is one, the fix.

use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while reading an archive, resolving or extracting.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The HTTP request itself failed (DNS, connection, timeout, body).
    #[error("fetching {url}: {source}")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// The server answered with a non-success status.
    #[error("fetching {url}: HTTP {status}")]
    HttpStatus { url: String, status: u16 },
    /// A host tool needed for signature checks is absent.
    #[error("{tool} not found ({reason}): apt-get install {package}")]
    MissingTool {
        tool: String,
        package: String,
        reason: String,
    },
    /// The keyring file to verify against is absent.
    #[error("keyring {} not found: apt-get install {package}", path.display())]
    MissingKeyring { path: PathBuf, package: String },
    /// gpgv did not find a good signature by a key in the keyring.
    #[error("{url}: no good signature by a key in {}: {detail}", keyring.display())]
    BadSignature {
        url: String,
        keyring: PathBuf,
        detail: String,
    },
    /// The Release file does not list an index we need.
    #[error(
        "{release} lists no {wanted} (does suite {suite} have this component and architecture?)"
    )]
    IndexNotListed {
        release: String,
        suite: String,
        wanted: String,
    },
    /// The Release file describes another suite than the one asked for.
    #[error(
        "{release} is for suite {found:?}, not {wanted:?}: check the mirror URL and suite name"
    )]
    WrongSuite {
        release: String,
        wanted: String,
        found: String,
    },
    /// A signed Release past its `Valid-Until`: signed metadata replayed or a mirror gone stale.
    #[error(
        "{release}: suite {suite} expired on {valid_until} (its Valid-Until): the mirror serves \
         outdated signed indexes; use an up-to-date mirror, or set this machine's clock right"
    )]
    Expired {
        release: String,
        suite: String,
        valid_until: String,
    },
    /// Downloaded bytes differ from what a signed index promised.
    #[error("{what}: {field} is {actual}, expected {expected}")]
    Mismatch {
        what: String,
        field: &'static str,
        expected: String,
        actual: String,
    },
    /// A deb822 or relation field could not be parsed.
    #[error("{source_name}:{line}: {message}")]
    Parse {
        source_name: String,
        line: usize,
        message: String,
    },
    /// A requested package name is in none of the sources.
    #[error("package {name} is not in {sources} (check the name, suite and component)")]
    NoSuchPackage { name: String, sources: String },
    /// No alternative of a dependency can be satisfied.
    #[error("cannot satisfy {relation} (needed by {chain})")]
    Unsatisfiable { relation: String, chain: String },
    /// Two sources of different architectures were merged.
    #[error("cannot merge an index for {other} into one for {arch}")]
    ArchMismatch { arch: String, other: String },
    /// A malformed or unsupported .deb.
    #[error("{}: {message}", path.display())]
    Deb { path: PathBuf, message: String },
    /// A .deb member path that would land outside the extraction directory.
    #[error("{}: member {member:?} escapes the extraction directory; refusing to extract", path.display())]
    UnsafePath { path: PathBuf, member: String },
    /// A member asked for is not in the .deb.
    #[error("{}: no member {member:?} in data.tar", path.display())]
    NoSuchMember { path: PathBuf, member: String },
    /// Local I/O with the path that failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { path, source }
    }
}
