//! The installer initrd, as `initrd/manifest.toml` describes it (its format is documented at the
//! top of that file): files from the pinned Debian packages of `recipes/initrd.toml`, busybox
//! applet links, files from `initrd/` (`/init`), our static binaries, directories and device
//! nodes. No kernel modules: those come from the distro's modules archive, which the kernel
//! unpacks on top of this one.
//!
//! The manifest names the libraries the tools need, but the ELF headers have the last word:
//! after placing everything, every ELF file's `PT_INTERP` and `DT_NEEDED` entries are resolved
//! inside the archive, and whatever is missing is taken from the pinned packages (and reported),
//! so a package update that adds a library cannot produce an initrd whose tools fail to start.
//! The manifest itself is read and checked in `spec`.

mod spec;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::archive::{self, Archive, Compression, Record, Source};
use super::elf::{self, Tree};
use crate::util::human_bytes;
use pxelab_contract::Arch;
use spec::octal;

pub use spec::{Binary, Busybox, Dir, Extra, Manifest, Node, PackageFile, Spec};

/// The pinned initrd packages, each extracted into its own directory.
pub struct Packages {
    pub trees: BTreeMap<String, Tree>,
}

impl Packages {
    fn tree(&self, package: &str) -> Result<&Tree> {
        self.trees.get(package).with_context(|| {
            format!(
                "initrd/manifest.toml takes files from package {package:?}, which recipes/initrd.toml does not pin \
                 (pinned: {}); add it to the recipe and run `cargo xtask lock`",
                self.trees.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })
    }
}

/// Static binaries built by the workspace: cargo package name → built file.
pub type Built = BTreeMap<String, PathBuf>;

fn subst(s: &str, arch: Arch) -> String {
    s.replace("{multiarch}", arch.multiarch())
}

/// Put the archive together from the manifest (no compression). Returns the archive and the
/// libraries the ELF check added beyond what the manifest lists.
pub fn compose(
    spec: &Spec,
    pkgs: &Packages,
    binaries: &Built,
    arch: Arch,
) -> Result<(Archive, Vec<String>)> {
    let m = &spec.manifest;
    let mut a = Archive::new();
    for f in &m.files {
        if f.arch.as_deref().is_some_and(|x| x != arch.as_str()) {
            continue;
        }
        let tree = pkgs.tree(&f.package)?;
        let path = format!("/{}", subst(&f.path, arch).trim_start_matches('/'));
        let r = tree.resolve(&path)?.with_context(|| {
            format!("initrd/manifest.toml: package {} has no {path} (check the path with `dpkg -c` on the pinned .deb)", f.package)
        })?;
        let host = tree.host_path(&r.file);
        a.add(
            &subst(&f.dest, arch),
            Record::File {
                mode: file_mode(&host)?,
                source: Source::File(host),
            },
        )?;
    }
    for b in &m.binaries {
        let built = binaries.get(&b.package).with_context(|| {
            format!(
                "initrd/manifest.toml: [[binary]] {} is not one build-stack builds (it builds {})",
                b.package,
                binaries.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })?;
        a.add(
            &b.dest,
            Record::File {
                mode: 0o755,
                source: Source::File(built.clone()),
            },
        )?;
    }
    for e in &m.extras {
        let data = spec
            .extras
            .get(&e.src)
            .context("extra file read at load time")?
            .clone();
        a.add(
            &e.dest,
            Record::File {
                mode: octal(&e.dest, &e.mode)?,
                source: Source::Bytes(data),
            },
        )?;
    }
    if let Some(bb) = &m.busybox {
        if !matches!(a.get(&bb.binary), Some(Record::File { .. })) {
            bail!(
                "initrd/manifest.toml: [busybox] binary {} is not a [[file]] dest",
                bb.binary
            );
        }
        let (dir, name) = bb.binary.rsplit_once('/').unwrap_or(("", &bb.binary));
        let target = if dir == "/bin" {
            name.to_string()
        } else {
            bb.binary.clone()
        };
        for link in &bb.links {
            if link.contains('/') || link.is_empty() {
                bail!("initrd/manifest.toml: busybox link {link:?} must be a plain applet name");
            }
            a.add(
                &format!("/bin/{link}"),
                Record::Symlink {
                    target: target.clone(),
                },
            )?;
        }
    }
    for d in &m.dirs {
        a.add(
            &d.path,
            Record::Dir {
                mode: octal(&d.path, &d.mode)?,
            },
        )?;
    }
    for n in &m.nodes {
        let mode = octal(&n.path, &n.mode)?;
        let rec = match n.kind.as_str() {
            "char" => Record::CharDev {
                mode,
                major: n.major,
                minor: n.minor,
            },
            _ => Record::BlockDev {
                mode,
                major: n.major,
                minor: n.minor,
            },
        };
        a.add(&n.path, rec)?;
    }
    let added = complete_libraries(&mut a, pkgs, arch)?;
    Ok((a, added))
}

fn file_mode(p: &Path) -> Result<u32> {
    use std::os::unix::fs::PermissionsExt;
    Ok(std::fs::metadata(p)
        .with_context(|| format!("reading {}", p.display()))?
        .permissions()
        .mode()
        & 0o7777)
}

/// Follow symlink records inside the archive to a regular file.
fn resolve_in(a: &Archive, path: &str) -> Option<String> {
    let mut p = format!("/{}", path.trim_start_matches('/'));
    for _ in 0..40 {
        match a.get(&p)? {
            Record::File { .. } => return Some(p),
            Record::Symlink { target } => {
                p = if target.starts_with('/') {
                    target.clone()
                } else {
                    let dir = p.rsplit_once('/').map_or("", |(d, _)| d);
                    format!(
                        "/{}",
                        crate::util::normalize_path(&format!("{dir}/{target}"))
                    )
                };
            }
            _ => return None,
        }
    }
    None
}

fn read_source(r: &Record) -> Option<Vec<u8>> {
    match r {
        Record::File {
            source: Source::File(p),
            ..
        } => std::fs::read(p).ok(),
        Record::File {
            source: Source::Bytes(b),
            ..
        } => Some(b.clone()),
        _ => None,
    }
}

/// Resolve every ELF file's interpreter and `DT_NEEDED` inside the archive; add what is missing
/// from the pinned packages (libraries go to `/lib/<multiarch>/<soname>`, the interpreter to its
/// own path). Returns what was added.
fn complete_libraries(a: &mut Archive, pkgs: &Packages, arch: Arch) -> Result<Vec<String>> {
    let lib_dirs = elf::library_dirs(arch.multiarch());
    let mut added = Vec::new();
    let elf_files = |a: &Archive| -> Result<Vec<(String, elf::Deps)>> {
        let mut v = Vec::new();
        for (p, r) in a.iter() {
            let Some(data) = read_source(r) else { continue };
            if data.starts_with(b"\x7fELF") {
                let path = format!("/{p}");
                let d = elf::deps(&data)
                    .with_context(|| format!("parsing ELF {path} in the initrd"))?;
                if d.machine != arch.elf_machine() {
                    bail!(
                        "{path} in the initrd is for ELF machine {}, not {}",
                        d.machine,
                        arch.as_str()
                    );
                }
                v.push((path, d));
            }
        }
        Ok(v)
    };
    // Interpreters first, at the exact path the programs name, so that a library's DT_NEEDED
    // on the loader finds that copy instead of adding a second one.
    for (path, d) in elf_files(a)? {
        if let Some(interp) = &d.interp {
            if resolve_in(a, interp).is_none() {
                add_from_packages(
                    a,
                    pkgs,
                    interp,
                    std::slice::from_ref(interp),
                    &path,
                    &mut added,
                )?;
            }
        }
    }
    // Then libraries, until nothing new is needed (an added library may need another).
    loop {
        let before = added.len();
        for (path, d) in elf_files(a)? {
            for lib in &d.needed {
                let candidates: Vec<String> =
                    lib_dirs.iter().map(|dir| format!("{dir}/{lib}")).collect();
                if candidates.iter().all(|c| resolve_in(a, c).is_none()) {
                    let dest = format!("/lib/{}/{lib}", arch.multiarch());
                    add_from_packages(a, pkgs, &dest, &candidates, &path, &mut added)?;
                }
            }
        }
        if added.len() == before {
            break;
        }
    }
    added.sort();
    Ok(added)
}

fn add_from_packages(
    a: &mut Archive,
    pkgs: &Packages,
    dest: &str,
    candidates: &[String],
    needed_by: &str,
    added: &mut Vec<String>,
) -> Result<()> {
    let (pkg, host) = find_in_packages(pkgs, candidates)?.with_context(|| {
        format!(
            "{needed_by} in the initrd needs {dest}, which neither initrd/manifest.toml nor any pinned initrd package provides; \
             add the package that ships it to recipes/initrd.toml"
        )
    })?;
    a.add(
        dest,
        Record::File {
            mode: file_mode(&host)?,
            source: Source::File(host),
        },
    )?;
    added.push(format!("{dest} (from {pkg}, needed by {needed_by})"));
    Ok(())
}

fn find_in_packages(pkgs: &Packages, candidates: &[String]) -> Result<Option<(String, PathBuf)>> {
    for c in candidates {
        for (name, tree) in &pkgs.trees {
            if let Some(r) = tree.resolve(c)? {
                return Ok(Some((name.clone(), tree.host_path(&r.file))));
            }
        }
    }
    Ok(None)
}

/// The finished initrd.
pub struct Initrd {
    pub archive: Archive,
    pub cpio_len: usize,
    pub compressed: Vec<u8>,
    pub compression: Compression,
    /// Regular files, largest first.
    pub largest: Vec<(String, u64)>,
    /// Libraries the ELF check added beyond the manifest.
    pub added: Vec<String>,
}

impl Initrd {
    /// The `n` largest files, one per line, with what each costs compressed on its own.
    pub fn top(&self, n: usize) -> String {
        let mut s = String::new();
        for (path, size) in self.largest.iter().take(n) {
            let alone = self
                .archive
                .get(path)
                .and_then(read_source)
                .and_then(|d| zstd::bulk::compress(&d, 3).ok())
                .map_or(0, |c| c.len() as u64);
            s.push_str(&format!(
                "  {:>10}  (~{:>10} zstd alone)  {path}\n",
                human_bytes(*size),
                human_bytes(alone)
            ));
        }
        s
    }

    /// A short summary for the build log.
    pub fn report(&self) -> String {
        let mut s = format!(
            "initrd: {} entries, {} cpio, {} {}; largest files:\n{}",
            self.archive.len(),
            human_bytes(self.cpio_len as u64),
            human_bytes(self.compressed.len() as u64),
            self.compression.name(),
            self.top(5).trim_end()
        );
        for a in &self.added {
            s.push_str(&format!(
                "\n  note: added {a}: initrd/manifest.toml does not list it"
            ));
        }
        s
    }
}

/// Compose, write and compress the initrd.
pub fn build(
    spec: &Spec,
    pkgs: &Packages,
    binaries: &Built,
    arch: Arch,
    how: Compression,
    epoch: u64,
) -> Result<Initrd> {
    let (archive, added) = compose(spec, pkgs, binaries, arch)?;
    let mtime = u32::try_from(epoch)
        .context("SOURCE_DATE_EPOCH does not fit a cpio mtime (before 2106)")?;
    let cpio = archive.to_cpio(mtime)?;
    let compressed = archive::compress(&cpio, how)?;
    let largest = archive.largest_files()?;
    Ok(Initrd {
        cpio_len: cpio.len(),
        compressed,
        compression: how,
        largest,
        archive,
        added,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake package: an x86_64 dynamic binary (a copy of the host's /bin/true) whose libc
    /// lives in another package, behind a symlink.
    fn packages(root: &Path) -> Packages {
        let host_true = std::fs::read("/bin/true").expect("/bin/true (coreutils) on the host");
        let tool = root.join("tool");
        std::fs::create_dir_all(tool.join("bin")).unwrap();
        std::fs::write(tool.join("bin/true"), host_true).unwrap();
        std::fs::set_permissions(
            tool.join("bin/true"),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let libc = root.join("libc");
        let libdir = libc.join("usr/lib/x86_64-linux-gnu");
        std::fs::create_dir_all(&libdir).unwrap();
        let host_libc = Tree::new("/")
            .resolve("/lib/x86_64-linux-gnu/libc.so.6")
            .unwrap()
            .unwrap();
        std::fs::copy(&host_libc.file, libdir.join("libc.so.6.real")).unwrap();
        std::os::unix::fs::symlink("libc.so.6.real", libdir.join("libc.so.6")).unwrap();
        let host_ld = Tree::new("/")
            .resolve("/lib64/ld-linux-x86-64.so.2")
            .unwrap()
            .unwrap();
        std::fs::copy(&host_ld.file, libdir.join("ld-linux-x86-64.so.2")).unwrap();
        std::fs::create_dir_all(libc.join("lib64")).unwrap();
        std::os::unix::fs::symlink(
            "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
            libc.join("lib64/ld-linux-x86-64.so.2"),
        )
        .unwrap();
        Packages {
            trees: BTreeMap::from([
                ("tool".into(), Tree::new(tool)),
                ("libc6".into(), Tree::new(libc)),
            ]),
        }
    }

    fn spec(dir: &Path, manifest: &str) -> Spec {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("manifest.toml"), manifest).unwrap();
        std::fs::write(dir.join("init"), "#!/bin/sh\necho pxelab-init: started\n").unwrap();
        Spec::load(dir).unwrap()
    }

    const MANIFEST: &str = r#"
[busybox]
binary = "/bin/true"
links = ["sh", "ls"]

[[file]]
package = "tool"
path = "bin/true"
dest = "/bin/true"

[[file]]
package = "libc6"
path = "usr/lib/{multiarch}/libc.so.6"
dest = "/lib/{multiarch}/libc.so.6"

[[file]]
package = "libc6"
path = "usr/lib/{multiarch}/libc.so.6"
dest = "/never"
arch = "aarch64"

[[binary]]
package = "pxelab-installer"
bin = "pxelab-installer"
dest = "/bin/pxelab-installer"

[[extra]]
src = "init"
dest = "/init"
mode = "0755"

[[dir]]
path = "/tmp"
mode = "1777"

[[node]]
path = "/dev/console"
kind = "char"
major = 5
minor = 1
mode = "0600"
"#;

    #[test]
    fn manifest_entries_land_where_it_says_and_elf_fills_the_gaps() {
        let t = tempfile::tempdir().unwrap();
        let pkgs = packages(&t.path().join("pkgs"));
        let spec = spec(&t.path().join("initrd"), MANIFEST);
        let installer = t.path().join("installer");
        std::fs::write(&installer, b"static").unwrap();
        let bins = Built::from([("pxelab-installer".to_string(), installer)]);
        let (a, added) = compose(&spec, &pkgs, &bins, Arch::X86_64).unwrap();
        assert!(matches!(
            a.get("/bin/true"),
            Some(Record::File { mode: 0o755, .. })
        ));
        // The symlink in the package is followed; the file lands at dest under its soname.
        assert!(matches!(
            a.get("/lib/x86_64-linux-gnu/libc.so.6"),
            Some(Record::File { .. })
        ));
        assert!(
            a.get("/never").is_none(),
            "arch-filtered entries are skipped"
        );
        assert_eq!(
            a.get("/bin/sh"),
            Some(&Record::Symlink {
                target: "true".into()
            })
        );
        assert_eq!(a.get("/tmp"), Some(&Record::Dir { mode: 0o1777 }));
        assert_eq!(
            a.get("/dev/console"),
            Some(&Record::CharDev {
                mode: 0o600,
                major: 5,
                minor: 1
            })
        );
        assert!(matches!(
            a.get("/init"),
            Some(Record::File { mode: 0o755, .. })
        ));
        assert!(matches!(
            a.get("/bin/pxelab-installer"),
            Some(Record::File { mode: 0o755, .. })
        ));
        // The manifest forgot the loader: PT_INTERP brings it in, from the libc6 package.
        assert!(
            matches!(
                a.get("/lib64/ld-linux-x86-64.so.2"),
                Some(Record::File { .. })
            ),
            "{added:?}"
        );
        assert_eq!(added.len(), 1, "{added:?}");
        assert!(
            added[0].starts_with("/lib64/ld-linux-x86-64.so.2 (from libc6"),
            "{added:?}"
        );
    }

    #[test]
    fn errors_name_the_bad_manifest_entry() {
        let t = tempfile::tempdir().unwrap();
        let pkgs = packages(&t.path().join("pkgs"));
        let bins = Built::new();
        let s = spec(
            &t.path().join("a"),
            "[[file]]\npackage = \"nope\"\npath = \"x\"\ndest = \"/x\"\n",
        );
        let e = compose(&s, &pkgs, &bins, Arch::X86_64)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("package \"nope\"") && e.contains("recipes/initrd.toml"),
            "{e}"
        );
        let s = spec(
            &t.path().join("b"),
            "[[file]]\npackage = \"tool\"\npath = \"bin/false\"\ndest = \"/x\"\n",
        );
        let e = compose(&s, &pkgs, &bins, Arch::X86_64)
            .unwrap_err()
            .to_string();
        assert!(e.contains("has no /bin/false"), "{e}");
        let s = spec(
            &t.path().join("c"),
            "[[binary]]\npackage = \"other\"\nbin = \"o\"\ndest = \"/o\"\n",
        );
        let e = compose(&s, &pkgs, &bins, Arch::X86_64)
            .unwrap_err()
            .to_string();
        assert!(e.contains("[[binary]] other"), "{e}");
        std::fs::create_dir_all(t.path().join("d")).unwrap();
        std::fs::write(
            t.path().join("d/manifest.toml"),
            "[[dir]]\npath = \"/x\"\nmode = \"rwx\"\n",
        )
        .unwrap();
        let e = format!("{:#}", Spec::load(&t.path().join("d")).unwrap_err());
        assert!(e.contains("not octal"), "{e}");
    }
}
