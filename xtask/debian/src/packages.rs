//! A binary `Packages` index: its stanzas turned into [`Package`]s (name, version, where the
//! `.deb` lives and its hash), merged across suites into one [`Index`] per architecture, and the
//! [`DebPin`] a lock file records for each resolved package.

use crate::deb822::{self, Stanza};
use crate::relation::{self, Alternatives, Relation};
use crate::{Error, Result};
use debversion::Version;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::sync::Arc;

/// One binary package version from a `Packages` index.
#[derive(Debug, Clone)]
pub struct Package {
    /// `Package`
    pub name: String,
    /// `Version`, parsed for comparison.
    pub version: Version,
    /// `Architecture`: the index's architecture or `all`.
    pub arch: String,
    /// `Filename`, relative to the mirror base.
    pub filename: String,
    /// `Size` of the `.deb` in bytes.
    pub size: u64,
    /// `SHA256` of the `.deb`, lowercase hex.
    pub sha256: String,
    /// `Essential: yes`.
    pub essential: bool,
    /// `Priority` (`required`, `important`, `standard`, `optional`, `extra`).
    pub priority: Option<String>,
    /// `Section` (e.g. `admin`, `libs`).
    pub section: Option<String>,
    /// `Provides`, parsed.
    pub provides: Vec<Relation>,
    /// The whole stanza, for any other field.
    pub stanza: Stanza,
    suite: Arc<str>,
    mirror: Arc<str>,
}

impl Package {
    fn from_stanza(stanza: Stanza, suite: &Arc<str>, mirror: &Arc<str>, src: &str) -> Result<Self> {
        let line = stanza.line();
        let err = |message: String| Error::Parse {
            source_name: src.to_string(),
            line,
            message,
        };
        let field = |name: &str| {
            stanza
                .get(name)
                .map(str::to_string)
                .ok_or_else(|| err(format!("stanza has no {name} field")))
        };
        let name = field("Package")?;
        let version_text = field("Version")?;
        let version = relation::parse_version(&version_text)
            .map_err(|e| err(format!("package {name}: {e}")))?;
        let size_text = field("Size")?;
        let size = size_text.parse().map_err(|_| {
            err(format!(
                "package {name}: Size {size_text:?} is not a number"
            ))
        })?;
        let sha256 = field("SHA256")?.to_ascii_lowercase();
        if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(err(format!(
                "package {name}: SHA256 {sha256:?} is not 64 hex digits"
            )));
        }
        let provides = match stanza.get("Provides") {
            None => Vec::new(),
            Some(text) => text
                .split(',')
                .filter(|p| !p.trim().is_empty())
                .map(relation::parse_one)
                .collect::<Result<_, _>>()
                .map_err(|e| err(format!("package {name}: Provides: {e}")))?,
        };
        Ok(Package {
            arch: field("Architecture")?,
            filename: field("Filename")?,
            essential: stanza
                .get("Essential")
                .is_some_and(|e| e.eq_ignore_ascii_case("yes")),
            priority: stanza.get("Priority").map(str::to_string),
            section: stanza.get("Section").map(str::to_string),
            name,
            version,
            size,
            sha256,
            provides,
            stanza,
            suite: suite.clone(),
            mirror: mirror.clone(),
        })
    }

    /// The version exactly as the index spells it.
    pub fn version_str(&self) -> &str {
        self.stanza.get("Version").unwrap_or_default()
    }

    /// The suite this package was read from (as requested, e.g. `bookworm-security`).
    pub fn suite(&self) -> &str {
        &self.suite
    }

    /// The mirror base URL this package was read from.
    pub fn mirror(&self) -> &str {
        &self.mirror
    }

    /// `Essential: yes` or `Priority: required`: part of every Debian base system.
    pub fn is_base(&self) -> bool {
        self.essential || self.priority.as_deref() == Some("required")
    }

    /// `Pre-Depends` followed by `Depends`, parsed.
    pub fn dependencies(&self) -> Result<Vec<Alternatives>> {
        let mut all = Vec::new();
        for field in ["Pre-Depends", "Depends"] {
            if let Some(text) = self.stanza.get(field) {
                all.extend(relation::parse(text).map_err(|message| Error::Parse {
                    source_name: format!("{} {} ({})", self.name, self.version_str(), self.suite),
                    line: self.stanza.line(),
                    message: format!("{field}: {message}"),
                })?);
            }
        }
        Ok(all)
    }

    /// What a lock records for this package.
    pub fn pin(&self) -> DebPin {
        DebPin {
            package: self.name.clone(),
            version: self.version_str().to_string(),
            arch: self.arch.clone(),
            suite: self.suite.to_string(),
            filename: self.filename.clone(),
            url: format!("{}/{}", self.mirror, self.filename),
            size: self.size,
            sha256: self.sha256.clone(),
        }
    }
}

/// A pinned `.deb`: everything needed to fetch and verify it without the index.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DebPin {
    /// Package name.
    pub package: String,
    /// Exact version.
    pub version: String,
    /// `amd64`, `arm64`, … or `all`.
    pub arch: String,
    /// Suite it was resolved from.
    pub suite: String,
    /// Path below the mirror base (`pool/main/…`).
    pub filename: String,
    /// Mirror base + `/` + filename.
    pub url: String,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 of the file, lowercase hex.
    pub sha256: String,
}

impl DebPin {
    /// Checks that the file at `path` has this pin's size and SHA-256.
    pub fn verify_file(&self, path: &Path) -> Result<()> {
        let mut file = std::fs::File::open(path).map_err(Error::io(path))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut size = 0u64;
        loop {
            let n = file.read(&mut buf).map_err(Error::io(path))?;
            if n == 0 {
                break;
            }
            size += n as u64;
            hasher.update(&buf[..n]);
        }
        let what = format!("{} ({} {})", path.display(), self.package, self.version);
        check(&what, "size", &self.size.to_string(), &size.to_string())?;
        check(
            &what,
            "sha256",
            &self.sha256,
            &hex::encode(hasher.finalize()),
        )
    }
}

pub(crate) fn check(what: &str, field: &'static str, expected: &str, actual: &str) -> Result<()> {
    if expected == actual {
        return Ok(());
    }
    Err(Error::Mismatch {
        what: what.to_string(),
        field,
        expected: expected.to_string(),
        actual: actual.to_string(),
    })
}

/// Every package of one architecture (plus `all`) from one or more suites.
#[derive(Debug, Clone)]
pub struct Index {
    arch: String,
    packages: Vec<Package>,
    sources: Vec<String>,
    by_name: HashMap<String, Vec<usize>>,
    providers: HashMap<String, Vec<usize>>,
}

impl Index {
    /// Parses the text of a `Packages` file. Stanzas for other architectures are skipped.
    /// `source_name` labels errors (e.g. the URL).
    pub fn parse(
        text: &str,
        arch: &str,
        mirror: &str,
        suite: &str,
        source_name: &str,
    ) -> Result<Self> {
        let suite: Arc<str> = Arc::from(suite);
        let mirror: Arc<str> = Arc::from(mirror.trim_end_matches('/'));
        let mut packages = Vec::new();
        for stanza in deb822::parse(text, source_name)? {
            match stanza.get("Architecture") {
                Some(a) if a == arch || a == "all" => {}
                _ => continue,
            }
            packages.push(Package::from_stanza(stanza, &suite, &mirror, source_name)?);
        }
        let mut index = Index {
            arch: arch.to_string(),
            packages,
            sources: vec![format!("{mirror} {suite}")],
            by_name: HashMap::new(),
            providers: HashMap::new(),
        };
        index.reindex();
        Ok(index)
    }

    /// An index with no packages (the identity for [`Index::merge`]).
    pub fn empty(arch: &str) -> Self {
        Index {
            arch: arch.to_string(),
            packages: Vec::new(),
            sources: Vec::new(),
            by_name: HashMap::new(),
            providers: HashMap::new(),
        }
    }

    /// Combines two indexes of the same architecture (e.g. `bookworm` + `bookworm-security`).
    /// Resolution later picks the highest version across all of them; an identical version in
    /// several sources comes from the one merged first.
    pub fn merge(mut self, other: Index) -> Result<Index> {
        if self.arch != other.arch {
            return Err(Error::ArchMismatch {
                arch: self.arch,
                other: other.arch,
            });
        }
        self.packages.extend(other.packages);
        self.sources.extend(other.sources);
        self.reindex();
        Ok(self)
    }

    fn reindex(&mut self) {
        self.by_name.clear();
        self.providers.clear();
        for (i, p) in self.packages.iter().enumerate() {
            self.by_name.entry(p.name.clone()).or_default().push(i);
            for provided in &p.provides {
                self.providers
                    .entry(provided.name.clone())
                    .or_default()
                    .push(i);
            }
        }
    }

    /// The architecture of this index (packages are this or `all`).
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// Every package version in the index, in source order.
    pub fn packages(&self) -> &[Package] {
        &self.packages
    }

    /// The sources merged into this index, as `mirror suite`.
    pub fn sources(&self) -> &[String] {
        &self.sources
    }

    /// All versions of the real package `name`, in source order.
    pub fn versions(&self, name: &str) -> impl Iterator<Item = &Package> {
        self.indices(name).iter().map(|&i| &self.packages[i])
    }

    /// The package `name` at exactly `version` (as spelled in the index), if present.
    pub fn get(&self, name: &str, version: &str) -> Option<&Package> {
        self.versions(name).find(|p| p.version_str() == version)
    }

    /// An `apt-ftparchive` override file (`package priority section` per line) for `pins`,
    /// taken from the archive's own Priority and Section: without it apt-ftparchive trusts each
    /// .deb's control file and demotes packages the archive marks required.
    pub fn ftparchive_override(&self, pins: &[DebPin]) -> String {
        let mut out = String::new();
        for pin in pins {
            if let Some(p) = self.get(&pin.package, &pin.version) {
                let priority = p.priority.as_deref().unwrap_or("optional");
                let section = p.section.as_deref().unwrap_or("misc");
                out.push_str(&format!("{} {priority} {section}\n", p.name));
            }
        }
        out
    }

    pub(crate) fn indices(&self, name: &str) -> &[usize] {
        self.by_name
            .get(name)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    pub(crate) fn provider_indices(&self, name: &str) -> &[usize] {
        self.providers
            .get(name)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    pub(crate) fn package(&self, i: usize) -> &Package {
        &self.packages[i]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
Package: busybox-static
Version: 1:1.35.0-4+b3
Architecture: amd64
Priority: optional
Section: shells
Provides: busybox
Filename: pool/main/b/busybox/busybox-static_1.35.0-4+b3_amd64.deb
Size: 123
SHA256: 0000000000000000000000000000000000000000000000000000000000000001

Package: other-arch
Version: 1
Architecture: arm64
Filename: pool/x.deb
Size: 1
SHA256: 0000000000000000000000000000000000000000000000000000000000000002

Package: ipxe
Version: 1.21.1+git20250501-1
Architecture: all
Essential: yes
Priority: required
Section: admin
Depends: libc6 (>= 2.36), debconf | debconf-2.0
Filename: pool/main/i/ipxe/ipxe_1.21.1_all.deb
Size: 4
SHA256: ABCDEF0000000000000000000000000000000000000000000000000000000003
";

    #[test]
    fn parses_packages_and_keeps_arch_all() {
        let index =
            Index::parse(SAMPLE, "amd64", "http://m/debian/", "trixie", "Packages").unwrap();
        let names: Vec<_> = index.packages().iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["busybox-static", "ipxe"]);
        let bb = index.get("busybox-static", "1:1.35.0-4+b3").unwrap();
        assert_eq!(bb.provides[0].name, "busybox");
        assert_eq!(bb.section.as_deref(), Some("shells"));
        assert!(!bb.is_base());
        let pin = index.get("ipxe", "1.21.1+git20250501-1").unwrap().pin();
        assert_eq!(
            pin.url,
            "http://m/debian/pool/main/i/ipxe/ipxe_1.21.1_all.deb"
        );
        assert_eq!(pin.arch, "all");
        assert_eq!(pin.suite, "trixie");
        assert_eq!(&pin.sha256[..6], "abcdef");
        let deps = index
            .versions("ipxe")
            .next()
            .unwrap()
            .dependencies()
            .unwrap();
        assert_eq!(deps.len(), 2);
        assert_eq!(deps[1][1].name, "debconf-2.0");
        let json = serde_json::to_string(&pin).unwrap();
        assert_eq!(serde_json::from_str::<DebPin>(&json).unwrap(), pin);
        assert_eq!(index.ftparchive_override(&[pin]), "ipxe required admin\n");
    }

    #[test]
    fn bad_stanzas_are_errors_naming_the_line() {
        let text = "Package: a\nVersion: 1\nArchitecture: all\nFilename: f\nSize: big\nSHA256: x\n";
        let err = Index::parse(text, "amd64", "m", "s", "Packages.xz").unwrap_err();
        assert_eq!(
            err.to_string(),
            "Packages.xz:1: package a: Size \"big\" is not a number"
        );
        let text = format!(
            "Package: a\nVersion: 1\nArchitecture: all\nSize: 1\nSHA256: {}\n",
            "0".repeat(64)
        );
        let err = Index::parse(&text, "amd64", "m", "s", "P").unwrap_err();
        assert!(err.to_string().contains("no Filename field"), "{err}");
    }

    #[test]
    fn merge_requires_same_arch() {
        let a = Index::parse(SAMPLE, "amd64", "m", "bookworm", "P").unwrap();
        let b = Index::parse(SAMPLE, "arm64", "m", "bookworm", "P").unwrap();
        let err = a.clone().merge(b).unwrap_err();
        assert!(err.to_string().contains("arm64"), "{err}");
        let merged = a.clone().merge(a).unwrap();
        assert_eq!(merged.versions("ipxe").count(), 2);
        assert_eq!(merged.sources().len(), 2);
    }

    #[test]
    fn verify_file_reports_expected_and_actual() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.deb");
        std::fs::write(&path, b"hello").unwrap();
        let mut pin = DebPin {
            package: "x".into(),
            version: "1".into(),
            arch: "all".into(),
            suite: "s".into(),
            filename: "x.deb".into(),
            url: "http://m/x.deb".into(),
            size: 5,
            sha256: "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824".into(),
        };
        pin.verify_file(&path).unwrap();
        pin.sha256 = "00".repeat(32);
        let err = pin.verify_file(&path).unwrap_err().to_string();
        assert!(
            err.contains(&"00".repeat(32)) && err.contains("2cf24dba"),
            "{err}"
        );
        pin.size = 6;
        let err = pin.verify_file(&path).unwrap_err().to_string();
        assert!(err.contains("size is 5, expected 6"), "{err}");
    }
}
