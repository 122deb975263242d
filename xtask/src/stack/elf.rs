//! Which shared libraries a binary needs, found by reading its ELF headers (`PT_INTERP` and
//! `DT_NEEDED`) rather than running `ldd`, which would need a runnable binary of the target arch
//! and would consult the host's libraries.
//!
//! Resolution happens inside a [`Tree`]: a directory holding the extracted files of the Debian
//! packages the initrd draws from. Symlinks are followed inside that tree only (an absolute
//! link target means the tree's root), and every link passed on the way is reported, so the
//! initrd can reproduce exactly the paths the dynamic loader will look up.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use object::elf;
use object::read::elf::{Dyn, FileHeader, ProgramHeader};

/// What the dynamic loader needs to know about one ELF file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Deps {
    /// `e_machine` (e.g. 62 for x86_64, 183 for aarch64).
    pub machine: u16,
    /// The program interpreter (`PT_INTERP`), for executables linked dynamically.
    pub interp: Option<String>,
    /// `DT_NEEDED` entries in file order.
    pub needed: Vec<String>,
}

/// Parse `data` as ELF (32 or 64 bit, either endianness) and read its dependencies.
pub fn deps(data: &[u8]) -> Result<Deps> {
    match object::FileKind::parse(data).context("not a recognisable object file")? {
        object::FileKind::Elf32 => deps_of::<elf::FileHeader32<object::Endianness>>(data),
        object::FileKind::Elf64 => deps_of::<elf::FileHeader64<object::Endianness>>(data),
        other => bail!("not an ELF file (looks like {other:?})"),
    }
}

fn deps_of<H: FileHeader<Endian = object::Endianness>>(data: &[u8]) -> Result<Deps> {
    let header = H::parse(data).context("bad ELF header")?;
    let endian = header.endian().context("bad ELF endianness")?;
    let mut out = Deps {
        machine: header.e_machine(endian).0,
        ..Deps::default()
    };
    for ph in header
        .program_headers(endian, data)
        .context("bad ELF program headers")?
    {
        if let Some(interp) = ph.interpreter(endian, data).context("bad PT_INTERP")? {
            out.interp = Some(String::from_utf8_lossy(interp).into_owned());
        }
    }
    let sections = header
        .sections(endian, data)
        .context("bad ELF section headers")?;
    if let Some((dyns, link)) = sections
        .dynamic(endian, data)
        .context("bad ELF dynamic section")?
    {
        let strings = sections
            .strings(endian, data, link)
            .context("bad ELF dynamic string table")?;
        for d in dyns {
            let tag = d.tag(endian);
            if tag == elf::DT_NULL {
                break;
            }
            if tag == elf::DT_NEEDED {
                let off = u32::try_from(d.val(endian)).context("DT_NEEDED offset out of range")?;
                let name = strings.get(off).ok().context("bad DT_NEEDED string")?;
                out.needed.push(String::from_utf8_lossy(name).into_owned());
            }
        }
    }
    Ok(out)
}

/// The library directories of a Debian system for one architecture, in the order glibc's
/// loader searches them when there is no `ld.so.cache` (as in our initrd). Both the split and
/// the merged-/usr spelling are listed because bookworm packages still ship `/lib/...`.
pub fn library_dirs(multiarch: &str) -> Vec<String> {
    vec![
        format!("/lib/{multiarch}"),
        format!("/usr/lib/{multiarch}"),
        "/lib".to_string(),
        "/usr/lib".to_string(),
        "/lib64".to_string(),
        "/usr/lib64".to_string(),
    ]
}

/// A path inside a tree, resolved: the symlinks passed on the way and the regular file reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// `(link path, link target as stored)`, absolute tree paths, in the order followed.
    pub links: Vec<(String, String)>,
    /// The absolute tree path of the regular file finally reached.
    pub file: String,
}

/// A directory standing in for `/` of the target system.
#[derive(Clone, Debug)]
pub struct Tree {
    root: PathBuf,
}

impl Tree {
    pub fn new(root: impl Into<PathBuf>) -> Tree {
        Tree { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The host path of absolute tree path `p` (no resolution).
    pub fn host_path(&self, p: &str) -> PathBuf {
        self.root.join(p.trim_start_matches('/'))
    }

    /// Follow `path` component by component inside the tree. `Ok(None)` if it does not exist;
    /// an error for loops, escapes or a path that ends at something other than a regular file.
    pub fn resolve(&self, path: &str) -> Result<Option<Resolved>> {
        let mut links = Vec::new();
        let mut pending: VecDeque<String> = split(path).into();
        let mut done: Vec<String> = Vec::new();
        let mut hops = 0;
        while let Some(c) = pending.pop_front() {
            if c == ".." {
                done.pop();
                continue;
            }
            let candidate = format!("/{}", join(&done, &c));
            let host = self.host_path(&candidate);
            let meta = match std::fs::symlink_metadata(&host) {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e).with_context(|| format!("reading {}", host.display())),
            };
            if meta.file_type().is_symlink() {
                hops += 1;
                if hops > 40 {
                    bail!(
                        "{path}: too many levels of symlinks in {}",
                        self.root.display()
                    );
                }
                let target = std::fs::read_link(&host)
                    .with_context(|| format!("reading link {}", host.display()))?;
                let target = target
                    .to_str()
                    .with_context(|| format!("{}: link target is not UTF-8", host.display()))?;
                links.push((candidate, target.to_string()));
                if target.starts_with('/') {
                    done.clear();
                }
                for (i, t) in split(target).into_iter().enumerate() {
                    pending.insert(i, t);
                }
            } else if pending.is_empty() {
                if !meta.is_file() {
                    bail!("{path} resolves to {candidate}, which is not a regular file");
                }
                return Ok(Some(Resolved {
                    links,
                    file: candidate,
                }));
            } else if meta.is_dir() {
                done.push(c);
            } else {
                return Ok(None);
            }
        }
        bail!("{path} resolves to a directory, not a file")
    }
}

fn split(p: &str) -> Vec<String> {
    p.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .map(str::to_string)
        .collect()
}

fn join(done: &[String], c: &str) -> String {
    let mut s = done.join("/");
    if !s.is_empty() {
        s.push('/');
    }
    s.push_str(c);
    s
}

/// Everything the initrd must contain so that `programs` run: each program, its interpreter and
/// the transitive `DT_NEEDED` closure, with every symlink on the way.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Closure {
    /// Regular files (absolute tree paths).
    pub files: BTreeSet<String>,
    /// Symlinks: path → target as stored in the package.
    pub links: BTreeMap<String, String>,
}

impl Closure {
    fn add(&mut self, r: &Resolved) {
        self.files.insert(r.file.clone());
        for (p, t) in &r.links {
            self.links.insert(p.clone(), t.clone());
        }
    }
}

/// Resolve `programs` (absolute tree paths) and all they load. `machine` is the expected
/// `e_machine`; a file for another architecture is an error naming it.
pub fn closure(
    tree: &Tree,
    programs: &[String],
    machine: u16,
    lib_dirs: &[String],
) -> Result<Closure> {
    let mut out = Closure::default();
    let mut queue: VecDeque<(String, String)> = VecDeque::new();
    for p in programs {
        let r = tree.resolve(p)?.with_context(|| {
            format!(
                "{p} is not in the extracted packages; add its package to the recipe that pins them"
            )
        })?;
        out.add(&r);
        queue.push_back((p.clone(), r.file));
    }
    let mut seen = BTreeSet::new();
    while let Some((wanted_by, file)) = queue.pop_front() {
        if !seen.insert(file.clone()) {
            continue;
        }
        let data =
            std::fs::read(tree.host_path(&file)).with_context(|| format!("reading {file}"))?;
        if !data.starts_with(b"\x7fELF") {
            continue; // scripts need only themselves (their interpreter is listed separately)
        }
        let d = deps(&data).with_context(|| format!("parsing ELF {file}"))?;
        if d.machine != machine {
            bail!("{file} is for ELF machine {}, not {machine}: the packages are for the wrong architecture", d.machine);
        }
        if let Some(interp) = &d.interp {
            let r = tree.resolve(interp)?.with_context(|| {
                format!("{file} needs the loader {interp}, which none of the packages provides; add libc6 to their recipe")
            })?;
            out.add(&r);
            queue.push_back((file.clone(), r.file));
        }
        for lib in &d.needed {
            let mut found = None;
            for dir in lib_dirs {
                if let Some(r) = tree.resolve(&format!("{dir}/{lib}"))? {
                    found = Some(r);
                    break;
                }
            }
            let r = found.with_context(|| {
                format!(
                    "{file} (needed by {wanted_by}) needs {lib}, which none of the packages provide (searched {}); add its package to their recipe",
                    lib_dirs.join(", ")
                )
            })?;
            out.add(&r);
            queue.push_back((file.clone(), r.file));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_needed_and_interp_of_a_host_binary() {
        // /bin/ls on Debian is dynamically linked against libc via the x86_64 loader.
        let data =
            std::fs::read("/bin/ls").expect("/bin/ls exists on every Debian host (coreutils)");
        let d = deps(&data).unwrap();
        assert_eq!(d.machine, 62);
        assert!(d.needed.iter().any(|n| n == "libc.so.6"), "{d:?}");
        assert!(d.needed.iter().all(|n| n.contains(".so")), "{d:?}");
        assert_eq!(d.interp.as_deref(), Some("/lib64/ld-linux-x86-64.so.2"));
        // libc itself needs the loader (resolved through the host's merged-/usr symlinks).
        let libc = Tree::new("/")
            .resolve("/lib/x86_64-linux-gnu/libc.so.6")
            .unwrap()
            .unwrap();
        let d = deps(&std::fs::read(&libc.file).unwrap()).unwrap();
        assert_eq!(d.needed, ["ld-linux-x86-64.so.2"]);
        assert!(deps(b"#!/bin/sh\n").is_err());
    }

    #[test]
    fn resolves_symlinks_inside_the_tree_only() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        std::fs::create_dir_all(r.join("usr/lib/x")).unwrap();
        std::fs::write(r.join("usr/lib/x/libfoo.so.1.2"), b"foo").unwrap();
        std::os::unix::fs::symlink("libfoo.so.1.2", r.join("usr/lib/x/libfoo.so.1")).unwrap();
        std::os::unix::fs::symlink("usr/lib", r.join("lib")).unwrap();
        std::fs::create_dir(r.join("lib64")).unwrap();
        std::os::unix::fs::symlink("/lib/x/libfoo.so.1", r.join("lib64/abs")).unwrap();
        std::os::unix::fs::symlink("../../etc/passwd", r.join("lib64/escape")).unwrap();
        let tree = Tree::new(r);
        let got = tree.resolve("/lib/x/libfoo.so.1").unwrap().unwrap();
        assert_eq!(got.file, "/usr/lib/x/libfoo.so.1.2");
        assert_eq!(
            got.links,
            [
                ("/lib".into(), "usr/lib".into()),
                ("/usr/lib/x/libfoo.so.1".into(), "libfoo.so.1.2".into())
            ]
        );
        let got = tree.resolve("/lib64/abs").unwrap().unwrap();
        assert_eq!(got.file, "/usr/lib/x/libfoo.so.1.2");
        assert_eq!(got.links.len(), 3);
        // `..` cannot climb above the tree root: this ends at <root>/etc/passwd, which is absent.
        assert_eq!(tree.resolve("/lib64/escape").unwrap(), None);
        assert_eq!(tree.resolve("/nope").unwrap(), None);
    }
}
