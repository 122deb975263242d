//! The static runtime binaries (`pxelab-stack`, `pxelab-installer`), built with the stock gnu
//! target and `+crt-static` in their own target directory so the normal dev builds are not
//! invalidated by the different RUSTFLAGS.
//!
//! The action cache key is a hash of the crate's sources (and of its workspace path
//! dependencies), `Cargo.lock`, the root `Cargo.toml` (it holds the release profile), `rustc -vV`
//! and the flags. Computing it reads a few hundred KiB and runs `rustc -vV` once, never cargo,
//! so a no-op `build-stack` costs milliseconds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use xshell::{cmd, Shell};

use pxelab_contract::Arch;

use super::elf;

/// One binary we ship: which workspace package builds it and what it is called.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Binary {
    /// Directory of the package, relative to the workspace root.
    pub dir: &'static str,
    pub package: &'static str,
    pub bin: &'static str,
}

pub const STACK: Binary = Binary {
    dir: "runtime",
    package: "pxelab-runtime",
    bin: "pxelab-stack",
};
pub const INSTALLER: Binary = Binary {
    dir: "installer",
    package: "pxelab-installer",
    bin: "pxelab-installer",
};

/// The RUSTFLAGS of a static build. The remap keeps the cargo registry's host path out of
/// panic messages (workspace sources are already named relative to the workspace), so the
/// bytes do not depend on where the tree or CARGO_HOME live.
pub fn rustflags() -> String {
    let mut flags = vec!["-C target-feature=+crt-static".to_string()];
    if let Some(home) = cargo_home() {
        flags.push(format!("--remap-path-prefix={}=/cargo", home.display()));
    }
    flags.join(" ")
}

fn cargo_home() -> Option<PathBuf> {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
}

/// Fails with one line saying how to install the Rust target if it is missing.
pub fn check_target(arch: Arch) -> Result<()> {
    let sh = Shell::new()?;
    let rustc = rustc();
    let sysroot = cmd!(sh, "{rustc} --print sysroot")
        .quiet()
        .read()
        .context("running `rustc --print sysroot`")?;
    let triple = arch.rust_target();
    if !Path::new(sysroot.trim())
        .join("lib/rustlib")
        .join(triple)
        .join("lib")
        .is_dir()
    {
        bail!(
            "the Rust target {triple} is not installed: run `rustup target add {triple}`{}",
            if arch == Arch::X86_64 {
                ""
            } else {
                " (and install a linker for it, e.g. apt-get install gcc-aarch64-linux-gnu)"
            }
        );
    }
    Ok(())
}

fn rustc() -> String {
    std::env::var("RUSTC")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "rustc".to_string())
}

fn cargo() -> String {
    std::env::var("CARGO")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "cargo".to_string())
}

/// `rustc -vV`: version, commit and host, so a toolchain update invalidates the binaries.
pub fn rustc_version() -> Result<String> {
    let sh = Shell::new()?;
    let rustc = rustc();
    cmd!(sh, "{rustc} -vV")
        .quiet()
        .read()
        .context("running `rustc -vV` (is Rust installed?)")
}

/// Hash of everything that decides what `bin` compiles to, except the toolchain and flags.
pub fn source_digest(root: &Path, bin: Binary) -> Result<String> {
    let mut files = BTreeMap::new();
    let ws = root.join("Cargo.toml");
    let ws_text =
        std::fs::read_to_string(&ws).with_context(|| format!("reading {}", ws.display()))?;
    let ws_toml: toml::Table =
        toml::from_str(&ws_text).with_context(|| format!("parsing {}", ws.display()))?;
    files.insert("Cargo.toml".to_string(), ws_text.into_bytes());
    let lock = root.join("Cargo.lock");
    files.insert(
        "Cargo.lock".to_string(),
        std::fs::read(&lock).with_context(|| format!("reading {}", lock.display()))?,
    );
    let mut pending = vec![bin.dir.to_string()];
    let mut seen = std::collections::BTreeSet::new();
    while let Some(dir) = pending.pop() {
        if !seen.insert(dir.clone()) {
            continue;
        }
        let manifest = root.join(&dir).join("Cargo.toml");
        let text = std::fs::read_to_string(&manifest)
            .with_context(|| format!("reading {}", manifest.display()))?;
        let t: toml::Table =
            toml::from_str(&text).with_context(|| format!("parsing {}", manifest.display()))?;
        files.insert(format!("{dir}/Cargo.toml"), text.into_bytes());
        let build_rs = root.join(&dir).join("build.rs");
        if build_rs.is_file() {
            files.insert(format!("{dir}/build.rs"), std::fs::read(&build_rs)?);
        }
        collect(root, &format!("{dir}/src"), &mut files)?;
        pending.extend(path_deps(&t, &ws_toml, &dir));
    }
    let mut h = Sha256::new();
    for (name, data) in &files {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update((data.len() as u64).to_le_bytes());
        h.update(data);
    }
    Ok(hex::encode(h.finalize()))
}

/// Workspace-relative directories of the path dependencies of a package (direct `path = …`
/// or through `[workspace.dependencies]`).
fn path_deps(pkg: &toml::Table, ws: &toml::Table, dir: &str) -> Vec<String> {
    let ws_deps = ws
        .get("workspace")
        .and_then(|w| w.get("dependencies"))
        .and_then(|d| d.as_table());
    let mut out = Vec::new();
    for section in ["dependencies", "build-dependencies"] {
        let Some(deps) = pkg.get(section).and_then(|d| d.as_table()) else {
            continue;
        };
        for (name, spec) in deps {
            if let Some(p) = spec.get("path").and_then(|p| p.as_str()) {
                out.push(crate::util::normalize_path(&format!("{dir}/{p}")));
            } else if spec.get("workspace").and_then(|w| w.as_bool()) == Some(true) {
                if let Some(p) = ws_deps
                    .and_then(|d| d.get(name))
                    .and_then(|s| s.get("path"))
                    .and_then(|p| p.as_str())
                {
                    out.push(crate::util::normalize_path(p));
                }
            }
        }
    }
    out
}

fn collect(root: &Path, rel: &str, out: &mut BTreeMap<String, Vec<u8>>) -> Result<()> {
    let dir = root.join(rel);
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    for e in rd {
        let e = e?;
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with('.') {
            continue; // editor swap files and the like
        }
        let child = format!("{rel}/{name}");
        let ft = e.file_type()?;
        if ft.is_dir() {
            collect(root, &child, out)?;
        } else if ft.is_file() {
            out.insert(child, std::fs::read(e.path())?);
        }
    }
    Ok(())
}

/// Build `bin` statically for `arch` into `target_dir` and copy it to `dest` (mode 0755).
/// Checks the result really is static: no interpreter, no `DT_NEEDED`.
pub fn build(root: &Path, bin: Binary, arch: Arch, target_dir: &Path, dest: &Path) -> Result<()> {
    let sh = Shell::new()?;
    sh.change_dir(root);
    let cargo = cargo();
    let triple = arch.rust_target();
    let package = bin.package;
    let name = bin.bin;
    // CARGO_ENCODED_RUSTFLAGS (set when we run under cargo) would override RUSTFLAGS.
    cmd!(sh, "{cargo} build --release --target {triple} -p {package} --bin {name} --target-dir {target_dir}")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env("RUSTFLAGS", rustflags())
        .run()
        .with_context(|| format!("building the static {name} (cargo build --release --target {triple} -p {package})"))?;
    let built = target_dir.join(triple).join("release").join(name);
    let data = std::fs::read(&built).with_context(|| format!("reading {}", built.display()))?;
    let d = elf::deps(&data).with_context(|| format!("parsing {}", built.display()))?;
    if d.interp.is_some() || !d.needed.is_empty() {
        bail!(
            "{} is not static (interpreter {:?}, needs {:?}): check that RUSTFLAGS reach cargo",
            built.display(),
            d.interp,
            d.needed
        );
    }
    if d.machine != arch.elf_machine() {
        bail!(
            "{} was built for ELF machine {}, not {}",
            built.display(),
            d.machine,
            arch.as_str()
        );
    }
    std::fs::write(dest, &data).with_context(|| format!("writing {}", dest.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dest, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(p: &Path, s: &str) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, s).unwrap();
    }

    #[test]
    fn source_digest_follows_path_deps_and_ignores_other_crates() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        write(
            &r.join("Cargo.toml"),
            "[workspace.dependencies]\ncontract = { path = \"runtime/contract\" }\n",
        );
        write(&r.join("Cargo.lock"), "# lock\n");
        write(
            &r.join("runtime/Cargo.toml"),
            "[package]\nname='r'\n[dependencies]\ncontract.workspace = true\n",
        );
        write(&r.join("runtime/src/main.rs"), "fn main() {}\n");
        write(
            &r.join("runtime/contract/Cargo.toml"),
            "[package]\nname='contract'\n",
        );
        write(&r.join("runtime/contract/src/lib.rs"), "pub struct A;\n");
        write(&r.join("installer/Cargo.toml"), "[package]\nname='i'\n");
        write(&r.join("installer/src/main.rs"), "fn main() {}\n");
        let bin = Binary {
            dir: "runtime",
            package: "r",
            bin: "r",
        };
        let a = source_digest(r, bin).unwrap();
        assert_eq!(a, source_digest(r, bin).unwrap());
        // Another crate's source does not matter…
        write(
            &r.join("installer/src/main.rs"),
            "fn main() { println!(); }\n",
        );
        assert_eq!(a, source_digest(r, bin).unwrap());
        // …but the path dependency does, and so do Cargo.lock and new files.
        write(&r.join("runtime/contract/src/lib.rs"), "pub struct B;\n");
        let b = source_digest(r, bin).unwrap();
        assert_ne!(a, b);
        write(&r.join("Cargo.lock"), "# lock 2\n");
        let c = source_digest(r, bin).unwrap();
        assert_ne!(b, c);
        write(&r.join("runtime/src/new.rs"), "\n");
        assert_ne!(c, source_digest(r, bin).unwrap());
    }
}
