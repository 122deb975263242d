//! Reading a Debian mirror over HTTP: `dists/<suite>/InRelease` (signature and `Valid-Until`
//! checked), then each component's `binary-<arch>/Packages.{xz,gz}` checked against the size
//! and SHA-256 the Release file lists, decompressed and parsed into an [`Index`].

use crate::packages::{check, Index};
use crate::release::{self, Release, Trust};
use crate::{Error, Result};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::time::Duration;

/// Debian's main mirror (a CDN that redirects to a nearby mirror).
pub const DEBIAN_MIRROR: &str = "http://deb.debian.org/debian";
/// Where Debian's `<codename>-security` suites live.
pub const DEBIAN_SECURITY_MIRROR: &str = "http://deb.debian.org/debian-security";

/// One suite of one mirror, for one architecture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// Mirror base URL, e.g. [`DEBIAN_MIRROR`] or a dated snapshot of it.
    pub mirror: String,
    /// Suite or codename, e.g. `bookworm`, `bookworm-updates`, `bookworm-security`.
    pub suite: String,
    /// Components to read, e.g. `main`.
    pub components: Vec<String>,
    /// Debian architecture, e.g. `amd64`; `all` packages are included automatically.
    pub arch: String,
}

impl Source {
    /// A source on any mirror.
    pub fn new(mirror: &str, suite: &str, components: &[&str], arch: &str) -> Self {
        Source {
            mirror: mirror.trim_end_matches('/').to_string(),
            suite: suite.to_string(),
            components: components.iter().map(|c| c.to_string()).collect(),
            arch: arch.to_string(),
        }
    }

    /// The `main` component of a suite on Debian's own mirrors (the security mirror for
    /// `*-security` suites).
    pub fn debian(suite: &str, arch: &str) -> Self {
        let mirror = if suite.ends_with("-security") {
            DEBIAN_SECURITY_MIRROR
        } else {
            DEBIAN_MIRROR
        };
        Source::new(mirror, suite, &["main"], arch)
    }

    fn dists(&self) -> String {
        format!("{}/dists/{}", self.mirror, self.suite)
    }
}

/// Reads suites from mirrors with one HTTP client and one trust policy.
#[derive(Debug, Clone)]
pub struct Archive {
    client: reqwest::blocking::Client,
    trust: Trust,
}

impl Archive {
    /// An archive reader with its own HTTP client.
    pub fn new(trust: Trust) -> Result<Self> {
        let client = reqwest::blocking::Client::builder()
            .connect_timeout(Duration::from_secs(30))
            // Whole-request limit: Packages.xz of a big suite is ~10 MB.
            .timeout(Duration::from_secs(600))
            .user_agent(concat!("pxelab-debian/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|source| Error::Http {
                url: "(building the HTTP client)".into(),
                source,
            })?;
        Ok(Archive { client, trust })
    }

    /// An archive reader that shares an existing HTTP client.
    pub fn with_client(client: reqwest::blocking::Client, trust: Trust) -> Self {
        Archive { client, trust }
    }

    /// Fetches and verifies a suite's Release file.
    pub fn release(&self, source: &Source) -> Result<Release> {
        let dists = source.dists();
        let inrelease_url = format!("{dists}/InRelease");
        let (text, url) = match self.get(&inrelease_url)? {
            Some(signed) => {
                let text = match &self.trust {
                    Trust::Keyring(keyring) => {
                        release::verify_inline(&signed, keyring, &inrelease_url)?
                    }
                    Trust::Unverified => {
                        release::strip_clearsign(&utf8(signed, &inrelease_url)?, &inrelease_url)?
                    }
                };
                (text, inrelease_url)
            }
            None => {
                // Older or simpler mirrors only have the detached form.
                let url = format!("{dists}/Release");
                let data = self.get(&url)?.ok_or_else(|| Error::HttpStatus {
                    url: format!("{inrelease_url} and {url}"),
                    status: 404,
                })?;
                if let Trust::Keyring(keyring) = &self.trust {
                    let sig_url = format!("{url}.gpg");
                    let sig = self.require(&sig_url)?;
                    // gpgv reads a detached signature from a file. This fallback is the one
                    // place the crate writes to the temp dir (removed on drop).
                    let mut file =
                        tempfile::NamedTempFile::new().map_err(Error::io(std::env::temp_dir()))?;
                    std::io::Write::write_all(&mut file, &sig).map_err(Error::io(file.path()))?;
                    release::verify_detached(&data, file.path(), keyring, &url)?;
                }
                (utf8(data, &url)?, url)
            }
        };
        let parsed = Release::parse(&text, &url)?;
        if !parsed.is_for(&source.suite) {
            return Err(Error::WrongSuite {
                release: url,
                wanted: source.suite.clone(),
                found: parsed
                    .codename
                    .clone()
                    .or(parsed.suite.clone())
                    .unwrap_or_default(),
            });
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        parsed.check_fresh(now, &url)?;
        Ok(parsed)
    }

    /// Reads every component of `source` into one index.
    pub fn open(&self, source: &Source) -> Result<Index> {
        let release = self.release(source)?;
        let mut index = Index::empty(&source.arch);
        for component in &source.components {
            let text = self.packages_text(source, &release, component)?;
            let label = format!(
                "{}/{component}/binary-{}/Packages",
                source.dists(),
                source.arch
            );
            let part = Index::parse(&text, &source.arch, &source.mirror, &source.suite, &label)?;
            index = index.merge(part)?;
        }
        Ok(index)
    }

    /// Reads several sources, one thread each (download, xz and parsing overlap), and merges
    /// them in the given order (all must have the same architecture).
    pub fn open_all(&self, sources: &[Source]) -> Result<Index> {
        let arch = sources.first().map(|s| s.arch.as_str()).unwrap_or("amd64");
        let parts: Vec<Result<Index>> = std::thread::scope(|scope| {
            let handles: Vec<_> = sources
                .iter()
                .map(|source| scope.spawn(move || self.open(source)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
                })
                .collect()
        });
        let mut index = Index::empty(arch);
        for part in parts {
            index = index.merge(part?)?;
        }
        Ok(index)
    }

    /// Fetches the first listed compressed form of a component's Packages file, checks it
    /// against the Release file and returns it decompressed.
    fn packages_text(&self, source: &Source, release: &Release, component: &str) -> Result<String> {
        let dir = format!("{component}/binary-{}", source.arch);
        let listed: Vec<_> = ["Packages.xz", "Packages.gz", "Packages"]
            .into_iter()
            .filter_map(|name| {
                let path = format!("{dir}/{name}");
                release.file(&path).map(|f| (path, f.clone()))
            })
            .collect();
        if listed.is_empty() {
            return Err(Error::IndexNotListed {
                release: format!("{}/InRelease", source.dists()),
                suite: source.suite.clone(),
                wanted: format!("{dir}/Packages.xz (or .gz)"),
            });
        }
        for (path, expected) in &listed {
            let plain = format!("{}/{path}", source.dists());
            // by-hash paths never change content, so a mirror update between our Release and
            // Packages requests cannot hand us a newer, mismatching file.
            let mut urls = Vec::new();
            if release.acquire_by_hash {
                urls.push(format!(
                    "{}/{dir}/by-hash/SHA256/{}",
                    source.dists(),
                    expected.sha256
                ));
            }
            urls.push(plain.clone());
            for url in urls {
                let Some(bytes) = self.get(&url)? else {
                    continue;
                };
                check(
                    &url,
                    "size",
                    &expected.size.to_string(),
                    &bytes.len().to_string(),
                )?;
                check(
                    &url,
                    "sha256",
                    &expected.sha256,
                    &hex::encode(Sha256::digest(&bytes)),
                )?;
                return utf8(decompress(&bytes, path, &url)?, &url);
            }
        }
        Err(Error::HttpStatus {
            url: format!("{}/{dir}/Packages.{{xz,gz}}", source.dists()),
            status: 404,
        })
    }

    /// GET `url`; `None` on 404/410 so callers can fall back.
    fn get(&self, url: &str) -> Result<Option<Vec<u8>>> {
        let http = |source| Error::Http {
            url: url.to_string(),
            source,
        };
        let response = self.client.get(url).send().map_err(http)?;
        let status = response.status();
        if status == reqwest::StatusCode::NOT_FOUND || status == reqwest::StatusCode::GONE {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(Error::HttpStatus {
                url: url.to_string(),
                status: status.as_u16(),
            });
        }
        Ok(Some(response.bytes().map_err(http)?.to_vec()))
    }

    fn require(&self, url: &str) -> Result<Vec<u8>> {
        self.get(url)?.ok_or_else(|| Error::HttpStatus {
            url: url.to_string(),
            status: 404,
        })
    }
}

fn decompress(bytes: &[u8], path: &str, url: &str) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(bytes.len() * 6);
    let result = if path.ends_with(".xz") {
        liblzma::read::XzDecoder::new_multi_decoder(bytes).read_to_end(&mut out)
    } else if path.ends_with(".gz") {
        flate2::read::MultiGzDecoder::new(bytes).read_to_end(&mut out)
    } else {
        out.extend_from_slice(bytes);
        Ok(out.len())
    };
    result.map_err(|e| Error::Parse {
        source_name: url.to_string(),
        line: 0,
        message: format!("cannot decompress: {e}"),
    })?;
    Ok(out)
}

fn utf8(bytes: Vec<u8>, url: &str) -> Result<String> {
    String::from_utf8(bytes).map_err(|e| Error::Parse {
        source_name: url.to_string(),
        line: 0,
        message: format!("not UTF-8 text (byte {})", e.utf8_error().valid_up_to()),
    })
}
