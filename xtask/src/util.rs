//! Small helpers shared by every command: the project root and human-readable sizes.

use std::path::PathBuf;

/// The workspace root (the directory holding `recipes/` and the top `Cargo.toml`).
pub fn project_root() -> PathBuf {
    // CARGO_MANIFEST_DIR is xtask/, fixed at compile time, so this works from any cwd.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    dir.parent().unwrap_or(dir).to_path_buf()
}

/// `1536` → `"1.5 KiB"`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}
