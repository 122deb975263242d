//! Dependency closure over an [`Index`]: what to download so that the named packages and
//! everything they `Depends`/`Pre-Depends` on are present.
//!
//! Rules, chosen to be predictable rather than clever (this is a download set, not an
//! installability proof: `Conflicts`, `Breaks` and `Recommends` are not considered):
//! - one version per package name; a request or dependency picks the highest version that
//!   satisfies it across all merged sources;
//! - a dependency group already satisfied by a chosen package adds nothing; otherwise its first
//!   satisfiable alternative wins;
//! - a name with no real package is satisfied through `Provides` (a versioned dependency only by
//!   a versioned `Provides`); among several providers an already chosen one wins, then the one
//!   with the highest `Priority`, then the first by name;
//! - arch qualifiers (`:any`, `:native`, `:<arch>`) and `[arch]` lists are honoured for the
//!   index's single architecture plus `all`;
//! - packages are visited breadth-first from the sorted requests, so the result depends only on
//!   the index and the request, and it is returned sorted by name.

use crate::packages::{DebPin, Index, Package};
use crate::relation::{self, display_alternatives, Relation};
use crate::{Error, Result};
use std::collections::{BTreeMap, HashMap, VecDeque};

/// Knobs for [`Index::resolve`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolveOptions {
    /// Treat dependencies on `Essential: yes` / `Priority: required` packages as satisfied by
    /// the base system and leave them out (requested names are always included).
    pub skip_base: bool,
}

impl Index {
    /// Resolves the closure of `requests`, each a package name optionally with a constraint in
    /// relation syntax (`linux-image-cloud-amd64`, `busybox-static (= 1:1.35.0-4+b3)`).
    pub fn resolve(&self, requests: &[&str], options: &ResolveOptions) -> Result<Vec<DebPin>> {
        Ok(self
            .resolve_packages(requests, options)?
            .into_iter()
            .map(Package::pin)
            .collect())
    }

    /// Like [`Index::resolve`] but returns the index's packages (Priority, Section, stanza…).
    pub fn resolve_packages(
        &self,
        requests: &[&str],
        options: &ResolveOptions,
    ) -> Result<Vec<&Package>> {
        let mut requests: Vec<Relation> = requests
            .iter()
            .map(|r| {
                relation::parse_one(r).map_err(|message| Error::Parse {
                    source_name: "package request".into(),
                    line: 1,
                    message,
                })
            })
            .collect::<Result<_>>()?;
        requests.sort_by(|a, b| a.name.cmp(&b.name));
        let mut state = State {
            index: self,
            options,
            chosen: BTreeMap::new(),
            parent: HashMap::new(),
            queue: VecDeque::new(),
        };
        for request in &requests {
            state.request(request)?;
        }
        while let Some(i) = state.queue.pop_front() {
            for group in self.package(i).dependencies()? {
                state.satisfy(&group, i)?;
            }
        }
        Ok(state.chosen.values().map(|&i| self.package(i)).collect())
    }
}

struct State<'a> {
    index: &'a Index,
    options: &'a ResolveOptions,
    /// Package name → chosen package index.
    chosen: BTreeMap<String, usize>,
    /// Chosen package → the package that pulled it in (for error chains).
    parent: HashMap<usize, usize>,
    queue: VecDeque<usize>,
}

impl State<'_> {
    fn request(&mut self, request: &Relation) -> Result<()> {
        if let Some(&i) = self.chosen.get(&request.name) {
            if self.satisfies(i, request) {
                return Ok(());
            }
        }
        match self.candidate(request) {
            Some(i) => {
                self.choose(i, None);
                Ok(())
            }
            None if self.index.indices(&request.name).is_empty()
                && self.index.provider_indices(&request.name).is_empty() =>
            {
                Err(Error::NoSuchPackage {
                    name: request.name.clone(),
                    sources: self.sources(),
                })
            }
            None => Err(Error::Unsatisfiable {
                relation: request.to_string(),
                chain: "the request".into(),
            }),
        }
    }

    fn satisfy(&mut self, group: &[Relation], needed_by: usize) -> Result<()> {
        let arch = self.index.arch();
        let group: Vec<&Relation> = group.iter().filter(|r| r.applies_to(arch)).collect();
        if group.is_empty() {
            return Ok(());
        }
        if group.iter().any(|r| self.already_satisfied(r)) {
            return Ok(());
        }
        for relation in &group {
            if let Some(i) = self.candidate(relation) {
                let package = self.index.package(i);
                if self.options.skip_base && package.is_base() {
                    return Ok(());
                }
                self.choose(i, Some(needed_by));
                return Ok(());
            }
        }
        let owned: Vec<Relation> = group.into_iter().cloned().collect();
        Err(Error::Unsatisfiable {
            relation: display_alternatives(&owned),
            chain: self.chain(needed_by),
        })
    }

    fn choose(&mut self, i: usize, needed_by: Option<usize>) {
        let package = self.index.package(i);
        self.chosen.insert(package.name.clone(), i);
        if let Some(parent) = needed_by {
            self.parent.insert(i, parent);
        }
        self.queue.push_back(i);
    }

    /// Whether a chosen package (by name or by Provides) satisfies `relation`.
    fn already_satisfied(&self, relation: &Relation) -> bool {
        if let Some(&i) = self.chosen.get(&relation.name) {
            if self.satisfies(i, relation) {
                return true;
            }
        }
        self.index
            .provider_indices(&relation.name)
            .iter()
            .any(|&i| self.is_chosen(i) && self.provides(i, relation))
    }

    /// The package to choose for `relation`, or `None` if nothing can satisfy it without
    /// replacing an already chosen version.
    fn candidate(&self, relation: &Relation) -> Option<usize> {
        let compatible = |i: usize| {
            let name = &self.index.package(i).name;
            self.chosen.get(name).is_none_or(|&c| c == i)
        };
        let real = self
            .index
            .indices(&relation.name)
            .iter()
            .copied()
            .filter(|&i| compatible(i) && self.satisfies(i, relation))
            .reduce(|best, i| self.newer(i, best));
        if real.is_some() {
            return real;
        }
        let mut providers: Vec<usize> = self
            .index
            .provider_indices(&relation.name)
            .iter()
            .copied()
            .filter(|&i| compatible(i) && self.provides(i, relation))
            .collect();
        providers.sort_by(|&a, &b| {
            let (pa, pb) = (self.index.package(a), self.index.package(b));
            (!self.is_chosen(a), priority_rank(pa), &pa.name)
                .cmp(&(!self.is_chosen(b), priority_rank(pb), &pb.name))
                .then_with(|| pb.version.cmp(&pa.version))
        });
        providers.first().copied()
    }

    /// `i` if it is a strictly higher version than `best`, else `best` (first source wins ties).
    fn newer(&self, i: usize, best: usize) -> usize {
        if self.index.package(i).version > self.index.package(best).version {
            i
        } else {
            best
        }
    }

    fn is_chosen(&self, i: usize) -> bool {
        self.chosen.get(&self.index.package(i).name) == Some(&i)
    }

    fn arch_ok(&self, package: &Package, relation: &Relation) -> bool {
        let native = self.index.arch();
        let arch_of = |p: &Package| {
            if p.arch == "all" {
                native.to_string()
            } else {
                p.arch.clone()
            }
        };
        match relation.arch_qualifier.as_deref() {
            None | Some("any") | Some("native") => true,
            Some(wanted) => arch_of(package) == wanted,
        }
    }

    /// Whether real package `i` satisfies `relation` by name, arch and version.
    fn satisfies(&self, i: usize, relation: &Relation) -> bool {
        let p = self.index.package(i);
        p.name == relation.name && self.arch_ok(p, relation) && relation.accepts(&p.version)
    }

    /// Whether package `i` satisfies `relation` through its `Provides`.
    fn provides(&self, i: usize, relation: &Relation) -> bool {
        let p = self.index.package(i);
        self.arch_ok(p, relation)
            && p.provides.iter().any(|provided| {
                provided.name == relation.name
                    && match (&relation.version, &provided.version) {
                        (None, _) => true,
                        (Some(_), Some((_, v))) => relation.accepts(v),
                        // Policy §7.5: an unversioned Provides never satisfies a versioned dependency.
                        (Some(_), None) => false,
                    }
            })
    }

    /// `a 1.0 ← b 2.0 ← the request` for error messages.
    fn chain(&self, mut i: usize) -> String {
        let mut parts = Vec::new();
        loop {
            let p = self.index.package(i);
            parts.push(format!("{} {} ({})", p.name, p.version_str(), p.suite()));
            match self.parent.get(&i) {
                Some(&parent) if parts.len() < 64 => i = parent,
                _ => break,
            }
        }
        parts.push("the request".into());
        parts.join(" ← ")
    }

    fn sources(&self) -> String {
        match self.index.sources() {
            [] => "an empty index".into(),
            sources => sources.join(", "),
        }
    }
}

fn priority_rank(p: &Package) -> u8 {
    match p.priority.as_deref() {
        Some("required") => 0,
        Some("important") => 1,
        Some("standard") => 2,
        Some("optional") => 3,
        _ => 4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a Packages text from `(name, version, extra fields)` triples.
    fn packages(entries: &[(&str, &str, &str)]) -> String {
        let mut out = String::new();
        for (i, (name, version, extra)) in entries.iter().enumerate() {
            out.push_str(&format!(
                "Package: {name}\nVersion: {version}\nArchitecture: amd64\n{extra}\
                 Filename: pool/{name}_{version}.deb\nSize: {i}\nSHA256: {:064x}\n\n",
                i
            ));
        }
        out
    }

    fn index(entries: &[(&str, &str, &str)], suite: &str) -> Index {
        Index::parse(
            &packages(entries),
            "amd64",
            "http://mirror/debian",
            suite,
            "test",
        )
        .unwrap()
    }

    fn names(pins: &[DebPin]) -> Vec<String> {
        pins.iter()
            .map(|p| format!("{}={}", p.package, p.version))
            .collect()
    }

    fn resolve(index: &Index, req: &[&str]) -> Result<Vec<String>> {
        index
            .resolve(req, &ResolveOptions::default())
            .map(|p| names(&p))
    }

    #[test]
    fn closure_follows_depends_and_pre_depends_and_sorts() {
        let idx = index(
            &[
                (
                    "app",
                    "1.0",
                    "Pre-Depends: libpre\nDepends: libz (>= 1.2), libc6\n",
                ),
                ("libz", "1.3", "Depends: libc6\n"),
                ("libc6", "2.36", ""),
                ("libpre", "1", ""),
                ("unrelated", "1", ""),
            ],
            "s",
        );
        assert_eq!(
            resolve(&idx, &["app"]).unwrap(),
            ["app=1.0", "libc6=2.36", "libpre=1", "libz=1.3"]
        );
    }

    #[test]
    fn first_satisfiable_alternative_unless_one_is_already_chosen() {
        let idx = index(
            &[
                ("a", "1", "Depends: missing | mta-b | mta-c\n"),
                ("b", "1", "Depends: mta-c | mta-b\n"),
                ("mta-b", "1", ""),
                ("mta-c", "1", ""),
            ],
            "s",
        );
        // `a` takes mta-b (first that exists); `b` is then satisfied by the chosen mta-b.
        assert_eq!(
            resolve(&idx, &["a", "b"]).unwrap(),
            ["a=1", "b=1", "mta-b=1"]
        );
        assert_eq!(resolve(&idx, &["b"]).unwrap(), ["b=1", "mta-c=1"]);
    }

    #[test]
    fn provides_versioned_and_unversioned() {
        let idx = index(
            &[
                ("app", "1", "Depends: awk, libfoo-abi (>= 2)\n"),
                ("mawk", "1.3", "Priority: required\nProvides: awk\n"),
                ("gawk", "5", "Priority: optional\nProvides: awk\n"),
                ("libfoo1", "1", "Provides: libfoo-abi\n"),
                ("libfoo2", "2", "Provides: libfoo-abi (= 2)\n"),
            ],
            "s",
        );
        // Unversioned provides cannot satisfy (>= 2); the required-priority awk provider wins.
        assert_eq!(
            resolve(&idx, &["app"]).unwrap(),
            ["app=1", "libfoo2=2", "mawk=1.3"]
        );
        // An explicitly chosen provider is reused.
        assert_eq!(
            resolve(&idx, &["app", "gawk"]).unwrap(),
            ["app=1", "gawk=5", "libfoo2=2"]
        );
    }

    #[test]
    fn version_constraints_and_highest_version_across_sources() {
        let base = index(
            &[
                ("app", "1", "Depends: lib (<< 2.0)\n"),
                ("lib", "1.5", ""),
                ("tool", "1.0-1", ""),
            ],
            "bookworm",
        );
        let security = index(
            &[("lib", "2.1", ""), ("tool", "1.0-1+deb12u1", "")],
            "bookworm-security",
        );
        let idx = base.merge(security).unwrap();
        let pins = idx
            .resolve(&["app", "tool"], &ResolveOptions::default())
            .unwrap();
        assert_eq!(names(&pins), ["app=1", "lib=1.5", "tool=1.0-1+deb12u1"]);
        assert_eq!(pins[2].suite, "bookworm-security");
        // A request may pin a version in relation syntax.
        assert_eq!(resolve(&idx, &["tool (= 1.0-1)"]).unwrap(), ["tool=1.0-1"]);
        // Highest version wins for a plain request.
        assert_eq!(resolve(&idx, &["lib"]).unwrap(), ["lib=2.1"]);
    }

    #[test]
    fn conflicting_version_needs_are_reported_with_the_chain() {
        let idx = index(
            &[
                ("top", "1", "Depends: mid, lib (>= 3)\n"),
                ("mid", "1", "Depends: lib (<< 2)\n"),
                ("lib", "1", ""),
                ("lib", "3", ""),
            ],
            "s",
        );
        let err = resolve(&idx, &["top"]).unwrap_err().to_string();
        assert_eq!(
            err,
            "cannot satisfy lib (<< 2) (needed by mid 1 (s) ← top 1 (s) ← the request)"
        );
    }

    #[test]
    fn cycles_terminate() {
        let idx = index(
            &[
                ("a", "1", "Depends: b\n"),
                ("b", "1", "Depends: c\n"),
                ("c", "1", "Pre-Depends: a\n"),
            ],
            "s",
        );
        assert_eq!(resolve(&idx, &["c"]).unwrap(), ["a=1", "b=1", "c=1"]);
    }

    #[test]
    fn missing_dependency_and_missing_request_errors() {
        let idx = index(
            &[("a", "1", "Depends: libgone (>= 1) | libalt\n")],
            "trixie",
        );
        let err = resolve(&idx, &["a"]).unwrap_err().to_string();
        assert_eq!(
            err,
            "cannot satisfy libgone (>= 1) | libalt (needed by a 1 (trixie) ← the request)"
        );
        let err = resolve(&idx, &["nope"]).unwrap_err().to_string();
        assert_eq!(
            err,
            "package nope is not in http://mirror/debian trixie (check the name, suite and component)"
        );
        let err = resolve(&idx, &["a (>= 2)"]).unwrap_err().to_string();
        assert!(err.starts_with("cannot satisfy a (>= 2)"), "{err}");
    }

    #[test]
    fn arch_qualifiers_and_restrictions() {
        let text = "Package: perl\nVersion: 5.36\nArchitecture: amd64\nMulti-Arch: allowed\n\
                    Filename: p.deb\nSize: 1\nSHA256: {h}\n\n\
                    Package: data\nVersion: 1\nArchitecture: all\nFilename: d.deb\nSize: 1\nSHA256: {h}\n\n\
                    Package: app\nVersion: 1\nArchitecture: amd64\n\
                    Depends: perl:any, data:amd64, onlyi386 [i386], libx:i386 | data\n\
                    Filename: a.deb\nSize: 1\nSHA256: {h}\n"
            .replace("{h}", &"a".repeat(64));
        let idx = Index::parse(&text, "amd64", "m", "s", "t").unwrap();
        assert_eq!(
            resolve(&idx, &["app"]).unwrap(),
            ["app=1", "data=1", "perl=5.36"]
        );
    }

    #[test]
    fn skip_base_leaves_out_essential_and_required_dependencies() {
        let idx = index(
            &[
                ("app", "1", "Depends: libc6, bash, libx\n"),
                ("libc6", "2.36", "Priority: required\n"),
                ("bash", "5.2", "Essential: yes\nPriority: required\n"),
                ("libx", "1", "Priority: optional\n"),
            ],
            "s",
        );
        let opts = ResolveOptions { skip_base: true };
        let pins = idx.resolve(&["app", "bash"], &opts).unwrap();
        assert_eq!(names(&pins), ["app=1", "bash=5.2", "libx=1"]);
        assert_eq!(
            resolve(&idx, &["app"]).unwrap(),
            ["app=1", "bash=5.2", "libc6=2.36", "libx=1"]
        );
    }
}
