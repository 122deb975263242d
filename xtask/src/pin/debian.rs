//! Debian package sets into pins: the one resolution path over `pxelab-debian`, for both lock
//! verbs. Read the signed indexes of every suite, take the dependency closure, keep what the
//! request asks for. A root filesystem's request also names a base suite: every
//! `Priority: required` package of that suite joins the closure (what mmdebstrap's minbase would
//! take) and each pin records the archive's Priority.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use pxelab_debian::{
    Archive, Index, ResolveOptions, Source, Trust, DEBIAN_MIRROR, DEBIAN_SECURITY_MIRROR,
};
use serde::{Deserialize, Serialize};

use super::{DebFacts, Pin};

/// How far to follow dependencies.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Closure {
    /// Depends and Pre-Depends, transitively (first satisfiable alternative, Provides honoured).
    Full,
    /// Exactly the named packages.
    None,
}

/// What one Debian package set asks for on one arch. Its JSON is what a recipe set's
/// fingerprint covers, so the fields and their order are part of `recipes/pxelab.lock`.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct DebianRequest {
    pub mirror: String,
    pub suites: Vec<String>,
    pub components: Vec<String>,
    /// `amd64`, `arm64`, … or `all`.
    pub arch: String,
    pub packages: Vec<String>,
    pub closure: Closure,
    /// Glob patterns (`*` only) limiting which dependencies are followed; empty = all.
    pub follow: Vec<String>,
}

/// Pins for `request`, sorted by package name. With `base_suite`, the closure also takes every
/// `Priority: required` package of that suite, and each pin records its archive Priority.
pub fn resolve(request: &DebianRequest, base_suite: Option<&str>) -> Result<Vec<Pin>> {
    let index = open(request)?;
    let mut names: BTreeSet<&str> = request.packages.iter().map(String::as_str).collect();
    if let Some(suite) = base_suite {
        names.extend(
            index
                .packages()
                .iter()
                .filter(|p| p.suite() == suite && p.priority.as_deref() == Some("required"))
                .map(|p| p.name.as_str()),
        );
    }
    let names: Vec<&str> = names.into_iter().collect();
    let packages = index
        .resolve_packages(&names, &ResolveOptions::default())
        .context("cannot resolve the Debian package closure")?;
    let keep = |name: &str| {
        request.packages.iter().any(|p| p == name)
            || (request.closure == Closure::Full
                && (request.follow.is_empty()
                    || request.follow.iter().any(|g| glob_match(g, name))))
    };
    let mut out = Vec::new();
    for package in packages.into_iter().filter(|p| keep(&p.name)) {
        let pin = package.pin();
        if request.arch == "all" && pin.arch != "all" {
            bail!(
                "package {} {} is Architecture: {}, but the set is for `all`: list real arches instead",
                pin.package,
                pin.version,
                pin.arch
            );
        }
        out.push(Pin {
            name: pin.package,
            url: pin.url,
            size: pin.size,
            sha256: pin.sha256,
            deb: Some(DebFacts {
                version: pin.version,
                arch: pin.arch,
                suite: pin.suite,
                filename: pin.filename,
                priority: base_suite.map(|_| {
                    package
                        .priority
                        .clone()
                        .unwrap_or_else(|| "optional".into())
                }),
            }),
        });
    }
    Ok(out)
}

/// Indexes already read in this run, by (mirror, suites, components, arch): several recipes
/// resolve against the same suites, and each index is ~10 MB of download.
static OPENED: Mutex<BTreeMap<String, Index>> = Mutex::new(BTreeMap::new());

fn open(d: &DebianRequest) -> Result<Index> {
    let key = format!("{} {:?} {:?} {}", d.mirror, d.suites, d.components, d.arch);
    if let Some(index) = OPENED.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(index.clone());
    }
    // `all` packages are listed in every arch's index; amd64's is always there.
    let arch = if d.arch == "all" {
        "amd64"
    } else {
        d.arch.as_str()
    };
    let components: Vec<&str> = d.components.iter().map(String::as_str).collect();
    let sources: Vec<Source> = d
        .suites
        .iter()
        .map(|suite| {
            // Security updates live on their own mirror unless the request names a custom one.
            let mirror = if d.mirror == DEBIAN_MIRROR && suite.ends_with("-security") {
                DEBIAN_SECURITY_MIRROR
            } else {
                d.mirror.as_str()
            };
            Source::new(mirror, suite, &components, arch)
        })
        .collect();
    let index = Archive::new(Trust::default())?
        .open_all(&sources)
        .with_context(|| {
            format!(
                "cannot read Debian's package indexes of {}",
                d.suites.join(", ")
            )
        })?;
    OPENED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, index.clone());
    Ok(index)
}

/// Does `name` match the `*`-glob `pattern`?
pub fn glob_match(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((prefix, rest)) => {
            if !name.starts_with(prefix) {
                return false;
            }
            let tail = &name[prefix.len()..];
            (0..=tail.len()).any(|i| tail.is_char_boundary(i) && glob_match(rest, &tail[i..]))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match(
            "linux-image-*",
            "linux-image-6.1.0-28-cloud-amd64"
        ));
        assert!(!glob_match("linux-image-*", "linux-base"));
        assert!(glob_match("*-dev", "libc6-dev"));
        assert!(glob_match("a*b*c", "axxbyyc"));
    }
}
