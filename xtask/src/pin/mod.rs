//! What is pinned: one type for a pinned file ([`Pin`]), the one rule that moves a pinned URL to
//! another mirror ([`Mirror`]), the one conversion of a pin into a download ([`Pin::to_fetch`],
//! with what to say when upstream deleted the file), and the one fingerprint-and-check shape
//! ([`fingerprint`], [`drift`]) by which a lock notices, without network, that its recipe changed.
//!
//! Both lock files map onto [`Pin`]: `recipes/pxelab.lock` (`lock`, written by `cargo
//! xtask lock`) and `recipes/distros/<name>.lock` (`distro::lock`, written by `cargo
//! xtask distro lock`). Their on-disk rows are private serde mirrors of the files; everything
//! else sees pins. Debian package sets are resolved into pins by [`debian::resolve`], the one path
//! over `pxelab-debian` that both lock verbs use.

pub mod debian;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use crate::fetch::Fetch;

/// One pinned file: where it comes from and exactly what it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pin {
    /// The package name of a Debian pin; otherwise the file's name in its recipe or lock.
    pub name: String,
    pub url: String,
    pub size: u64,
    pub sha256: String,
    /// What the archive says about a Debian package; `None` for any other file.
    pub deb: Option<DebFacts>,
}

/// The facts a Debian archive gave for a pinned `.deb`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DebFacts {
    pub version: String,
    /// Debian architecture: `amd64`, `arm64`, … or `all`.
    pub arch: String,
    /// The suite it was resolved from (`bookworm`, `bookworm-security`).
    pub suite: String,
    /// Path below the mirror base (`pool/main/…`).
    pub filename: String,
    /// The archive's `Priority`, recorded for a root filesystem's closure (its local repository
    /// must say what the archive says); `None` where nothing reads it.
    pub priority: Option<String>,
}

impl Pin {
    /// The Debian facts of a pin that must be a `.deb`, or an error naming it.
    pub fn debian(&self) -> Result<&DebFacts> {
        self.deb.as_ref().with_context(|| {
            format!(
                "{} is pinned as a plain file, not a Debian package",
                self.name
            )
        })
    }

    /// The download of this pin, labelled `label`: its URL moved by `mirror` when it lies under
    /// the mirror's base, and, for when the server says the file is gone, what to do about it;
    /// `relock` is the command that pins it again.
    pub fn to_fetch(&self, label: String, mirror: Option<&Mirror>, relock: &str) -> Fetch {
        let moved = mirror.and_then(|m| m.apply(&self.url));
        let gone_hint = match &self.deb {
            Some(deb) => {
                let from = match (&moved, mirror) {
                    (Some(_), Some(m)) => m.to.clone(),
                    _ => "Debian's mirror".to_string(),
                };
                format!(
                    "Debian package {} {} ({}, {}) is no longer on {from}, which keeps only current versions; \
                     run `{relock}` to refresh the pins, or set PXELAB_DEBIAN_MIRROR to a snapshot \
                     mirror that still has it (e.g. http://snapshot.debian.org/archive/debian/20250101T000000Z)",
                    self.name, deb.version, deb.arch, deb.suite,
                )
            }
            None => format!(
                "upstream no longer serves the pinned {}: point its recipe at a file that exists and run `{relock}`",
                self.name
            ),
        };
        Fetch {
            label,
            url: moved.unwrap_or_else(|| self.url.clone()),
            sha256: self.sha256.clone(),
            size: Some(self.size),
            gone_hint: Some(gone_hint),
        }
    }
}

/// A mirror override: a URL under base `from` moves to the same path under base `to`. A URL
/// elsewhere keeps its place (e.g. Debian's security archive when Debian's main archive moves).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mirror {
    from: String,
    to: String,
}

impl Mirror {
    pub fn new(from: &str, to: &str) -> Mirror {
        Mirror {
            from: from.trim_end_matches('/').to_string(),
            to: to.trim_end_matches('/').to_string(),
        }
    }

    /// `PXELAB_DEBIAN_MIRROR` when set: Debian's main archive moved to another base (e.g. a
    /// dated snapshot of it).
    pub fn debian_from_env() -> Option<Mirror> {
        let to = std::env::var("PXELAB_DEBIAN_MIRROR").ok()?;
        (!to.is_empty()).then(|| Mirror::new(pxelab_debian::DEBIAN_MIRROR, &to))
    }

    /// `url` under the new base, or `None` when it is not under the old one.
    pub fn apply(&self, url: &str) -> Option<String> {
        let rest = url.strip_prefix(&self.from)?.strip_prefix('/')?;
        Some(format!("{}/{rest}", self.to))
    }

    /// `url` under the new base, or unchanged.
    pub fn rebase(mirror: Option<&Mirror>, url: &str) -> String {
        mirror
            .and_then(|m| m.apply(url))
            .unwrap_or_else(|| url.to_string())
    }
}

/// The size the server reports for `url` (a HEAD request): what a pin records for a file whose
/// digest is known from elsewhere (a recipe, a SHA256SUMS).
pub fn remote_size(url: &str) -> Result<u64> {
    let resp = reqwest::blocking::Client::new()
        .head(url)
        .send()
        .and_then(|r| r.error_for_status())
        .with_context(|| format!("HEAD {url}"))?;
    // Not `content_length()`: for HEAD that is the (empty) body's length.
    resp.headers()
        .get(reqwest::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .filter(|&n| n > 0)
        .with_context(|| format!("{url} gives no Content-Length"))
}

/// sha256 (hex) of a canonical description of what a recipe asks for. A lock records it for each
/// unit it pins, so [`drift`] can tell without network that the recipe changed since.
pub fn fingerprint(canonical: &str) -> String {
    hex::encode(Sha256::digest(canonical.as_bytes()))
}

/// One unit a lock pins as a whole (a recipe set for one arch, a distro for one arch), by id,
/// with the [`fingerprint`] of what the recipe asks for (wanted) or asked for (locked).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unit {
    pub id: String,
    pub fingerprint: String,
}

/// How a lock differs from its recipes for one unit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Drift {
    /// The recipes ask for it; the lock has no pins for it.
    Unpinned(String),
    /// Pinned from another version of the recipe.
    Stale(String),
    /// Pinned, but no recipe asks for it any more.
    Orphan(String),
}

impl Drift {
    pub fn id(&self) -> &str {
        match self {
            Drift::Unpinned(id) | Drift::Stale(id) | Drift::Orphan(id) => id,
        }
    }
}

impl std::fmt::Display for Drift {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Drift::Unpinned(id) => write!(f, "{id}: in the recipes but not in the lock"),
            Drift::Stale(id) => write!(f, "{id}: the recipe changed since the lock was written"),
            Drift::Orphan(id) => write!(f, "{id}: in the lock but no recipe names it"),
        }
    }
}

/// The units the recipes ask for now against those a lock recorded, in the order of `wanted`
/// then `locked`.
pub fn drift(wanted: &[Unit], locked: &[Unit]) -> Vec<Drift> {
    let mut out = Vec::new();
    for w in wanted {
        match locked.iter().find(|l| l.id == w.id) {
            None => out.push(Drift::Unpinned(w.id.clone())),
            Some(l) if l.fingerprint != w.fingerprint => out.push(Drift::Stale(w.id.clone())),
            Some(_) => {}
        }
    }
    for l in locked {
        if !wanted.iter().any(|w| w.id == l.id) {
            out.push(Drift::Orphan(l.id.clone()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pin(url: &str, deb: bool) -> Pin {
        Pin {
            name: "hello".into(),
            url: url.into(),
            size: 3,
            sha256: "5".repeat(64),
            deb: deb.then(|| DebFacts {
                version: "2.10-3".into(),
                arch: "amd64".into(),
                suite: "bookworm".into(),
                filename: "pool/main/h/hello/hello_2.10-3_amd64.deb".into(),
                priority: None,
            }),
        }
    }

    #[test]
    fn a_mirror_moves_only_urls_under_its_base() {
        let m = Mirror::new("https://cloud-images.ubuntu.com/", "http://127.0.0.1:9/u/");
        assert_eq!(
            m.apply("https://cloud-images.ubuntu.com/releases/noble/release-1/SHA256SUMS")
                .as_deref(),
            Some("http://127.0.0.1:9/u/releases/noble/release-1/SHA256SUMS")
        );
        assert_eq!(m.apply("https://cloud-images.ubuntu.com.evil/x"), None);
        let debian = Mirror::new(pxelab_debian::DEBIAN_MIRROR, "http://snap/debian");
        let security = "http://deb.debian.org/debian-security/pool/updates/main/a/apt/apt.deb";
        assert_eq!(Mirror::rebase(Some(&debian), security), security);
    }

    #[test]
    fn a_gone_pin_says_what_to_run() {
        let m = Mirror::new(pxelab_debian::DEBIAN_MIRROR, "http://snap/debian");
        let url = "http://deb.debian.org/debian/pool/main/h/hello/hello_2.10-3_amd64.deb";
        let f = pin(url, true).to_fetch("x/hello".into(), Some(&m), "cargo xtask lock");
        assert_eq!(
            f.url,
            "http://snap/debian/pool/main/h/hello/hello_2.10-3_amd64.deb"
        );
        let hint = f.gone_hint.unwrap();
        assert!(
            hint.starts_with(
                "Debian package hello 2.10-3 (amd64, bookworm) is no longer on http://snap/debian"
            ) && hint.contains("run `cargo xtask lock`"),
            "{hint}"
        );
        let f = pin("http://x/fw.bin", false).to_fetch("fw".into(), None, "cargo xtask lock");
        assert!(f.gone_hint.unwrap().contains("run `cargo xtask lock`"));
    }

    #[test]
    fn drift_names_unpinned_stale_and_orphaned_units() {
        let unit = |id: &str, f: &str| Unit {
            id: id.into(),
            fingerprint: f.into(),
        };
        let wanted = [unit("a", "1"), unit("b", "2"), unit("c", "3")];
        let locked = [unit("b", "2"), unit("c", "old"), unit("d", "4")];
        assert_eq!(
            drift(&wanted, &locked),
            [
                Drift::Unpinned("a".into()),
                Drift::Stale("c".into()),
                Drift::Orphan("d".into())
            ]
        );
        assert_eq!(
            Drift::Orphan("fw/gone/amd64".into()).to_string(),
            "fw/gone/amd64: in the lock but no recipe names it"
        );
    }
}
