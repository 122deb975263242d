//! Resolving a recipe's Debian package set into lock pins, through `pxelab-debian`: read the
//! signed indexes of every suite, take the dependency closure, keep what the recipe asks for.

use std::collections::BTreeMap;
use std::sync::Mutex;

use anyhow::{bail, Result};
use pxelab_debian::{Archive, Index, ResolveOptions, Source, Trust, DEBIAN_SECURITY_MIRROR};

use crate::lock::LockedInput;
use crate::recipe::{glob_match, Closure, DebianRequest, Request, DEFAULT_DEBIAN_MIRROR};

/// Pins for one (recipe, set, arch).
pub fn resolve(r: &Request, d: &DebianRequest) -> Result<Vec<LockedInput>> {
    let index = open(d)?;
    let names: Vec<&str> = d.packages.iter().map(String::as_str).collect();
    let pins = index.resolve(&names, &ResolveOptions::default())?;
    let keep = |name: &str| {
        d.packages.iter().any(|p| p == name)
            || (d.closure == Closure::Full
                && (d.follow.is_empty() || d.follow.iter().any(|g| glob_match(g, name))))
    };
    let mut out = Vec::new();
    for pin in pins.into_iter().filter(|p| keep(&p.package)) {
        if d.arch == "all" && pin.arch != "all" {
            bail!(
                "{}: package {} {} is Architecture: {}, but the set is for `all`: list real arches instead",
                r.id(),
                pin.package,
                pin.version,
                pin.arch
            );
        }
        out.push(LockedInput {
            recipe: r.recipe.clone(),
            set: r.set.clone(),
            arch: r.arch.clone(),
            name: pin.package.clone(),
            url: pin.url,
            size: pin.size,
            sha256: pin.sha256,
            package: Some(pin.package),
            version: Some(pin.version),
            deb_arch: Some(pin.arch),
            suite: Some(pin.suite),
            filename: Some(pin.filename),
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
            // Security updates live on their own mirror unless the recipe names a custom one.
            let mirror = if d.mirror == DEFAULT_DEBIAN_MIRROR && suite.ends_with("-security") {
                DEBIAN_SECURITY_MIRROR
            } else {
                d.mirror.as_str()
            };
            Source::new(mirror, suite, &components, arch)
        })
        .collect();
    let index = Archive::new(Trust::default())?.open_all(&sources)?;
    OPENED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, index.clone());
    Ok(index)
}
