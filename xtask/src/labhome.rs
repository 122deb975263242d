//! Where the lab keeps its state: `PXELAB_HOME`, else `~/.pxelab`.
//!
//! Unlike the original (whose `PVMLAB_HOME` named the *parent* of `.pvmlab`), `PXELAB_HOME` names
//! the lab home itself, so a test can point it at a temp dir without a hidden subdirectory.

use std::path::PathBuf;

use anyhow::{bail, Result};

/// The lab home directory (not created here).
pub fn lab_home() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("PXELAB_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(home) => Ok(PathBuf::from(home).join(".pxelab")),
        None => {
            bail!("neither PXELAB_HOME nor HOME is set: set PXELAB_HOME to the lab's directory")
        }
    }
}

/// `<lab home>/images/<distro>/<arch>`: what the boot handler serves as `/images/<distro>/<arch>/`.
pub fn images_dir(distro: &str, arch: &str) -> Result<PathBuf> {
    Ok(lab_home()?.join("images").join(distro).join(arch))
}
