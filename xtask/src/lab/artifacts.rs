//! Getting the lab's artifacts in place: `build-stack` and `distro pull` through the cache,
//! then the stack's files linked into the lab home where the stack serves them.

use std::path::Path;

use anyhow::{Context, Result};
use pxelab_contract::Arch;

use super::home::Lab;
use crate::ui::Ui;

/// Builds (or reuses) the stack for `arch` and pulls `distro`; returns the distro's canonical
/// name (aliases such as `debian` resolved), which VM definitions must carry.
pub fn prepare(lab: &Lab, arch: Arch, distro: &str) -> Result<String> {
    let ui = Ui::new();
    let pulled = crate::distro::pull(
        &crate::distro::PullArgs {
            name: distro.to_string(),
            arch,
            modules: None,
            mirror: None,
            recipes: None,
        },
        &ui,
    )?;
    let name = pulled
        .dir
        .parent()
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_str())
        .context("distro pull returned an unexpected directory")?
        .to_string();
    let report = prepare_stack(lab, arch, &ui)?;
    eprintln!(
        "artifacts: stack {} ({}), distro {name} {}",
        if report.all_cached() {
            "cached"
        } else {
            "built"
        },
        report.out_dir.display(),
        if pulled.cached { "cached" } else { "pulled" }
    );
    Ok(name)
}

/// Builds (or reuses) the stack for `arch` and installs what the lab serves from it: the
/// installer initrd and the TFTP files (the stack binary, always the host's, is
/// [`super::stack::stack_binary`]'s job).
pub fn prepare_stack(lab: &Lab, arch: Arch, ui: &Ui) -> Result<crate::stack::Report> {
    let args = crate::stack::Args {
        arch,
        compression: crate::stack::archive::Compression::Zstd,
        out: None,
        offline: false,
        root: None,
    };
    let report = crate::stack::build(&crate::store::Store::open_default()?, &args, ui)?;
    let built = &report.out_dir;
    install(&built.join(format!("initrd-{arch}.img")), &lab.initrd(arch))?;
    let tftp = built.join("tftp");
    for entry in std::fs::read_dir(&tftp).with_context(|| format!("reading {}", tftp.display()))? {
        let entry = entry?;
        install(&entry.path(), &lab.tftp_dir().join(entry.file_name()))?;
    }
    Ok(report)
}

/// Copies `src` to `dest` atomically (with its permissions) unless `dest` already has the same
/// bytes.
pub fn install(src: &Path, dest: &Path) -> Result<()> {
    let bytes = std::fs::read(src).with_context(|| {
        format!(
            "{} is missing: run `cargo xtask build-stack`",
            src.display()
        )
    })?;
    if std::fs::read(dest).ok().as_deref() == Some(&bytes[..]) {
        return Ok(());
    }
    std::fs::create_dir_all(dest.parent().context("destination has no parent")?)?;
    crate::store::write_atomic(dest, &bytes)?;
    let mode = std::fs::metadata(src)?.permissions();
    std::fs::set_permissions(dest, mode).with_context(|| format!("chmod {}", dest.display()))
}
