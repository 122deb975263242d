//! Host tools the distro pull runs, found on PATH or in the sbin directories (a non-root PATH
//! often lacks them), with an error naming the Debian package to install.

use std::path::PathBuf;

use anyhow::{bail, Result};

pub fn require(binary: &str, package: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from));
    for dir in dirs {
        let candidate = dir.join(binary);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!("{binary} not found: apt-get install {package}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn missing_tool_names_its_package() {
        let err = super::require("pxelab-no-such-tool", "pxelab-pkg").unwrap_err();
        assert_eq!(
            err.to_string(),
            "pxelab-no-such-tool not found: apt-get install pxelab-pkg"
        );
    }
}
