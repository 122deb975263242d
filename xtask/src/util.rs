//! Small helpers shared by every command: the project root, sizes (of a tree, human-readable),
//! `/`-path normalization and UTC calendar fields.

use std::path::{Path, PathBuf};

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

/// Bytes under `path` (a file or a directory tree); 0 if it is gone.
pub fn dir_size(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if !meta.is_dir() {
        return meta.len();
    }
    std::fs::read_dir(path)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| dir_size(&e.path())).sum())
        .unwrap_or(0)
}

/// `a/./b/../c` → `a/c`: a `/`-separated path with empty and `.` parts dropped and each `..`
/// taking back the part before it (never above the start), without leading `/`.
pub fn normalize_path(p: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    parts.join("/")
}

/// A Unix time as UTC calendar fields.
pub struct Utc {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u64,
    pub minute: u64,
    pub second: u64,
    /// 0 = Thursday (1970-01-01 was one), as `days % 7` gives it.
    pub weekday_from_thursday: usize,
}

/// Splits `secs` since the Unix epoch into UTC date and time (civil-from-days, H. Hinnant;
/// valid for every date after 1970). One place for the three formats pxelab writes: OCI's
/// RFC 3339 `created`, a Release file's RFC 2822 `Date`, and the bench report's stamp.
pub fn utc(secs: u64) -> Utc {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    Utc {
        year: yoe + era * 400 + i64::from(month <= 2),
        month,
        day,
        hour: rem / 3600,
        minute: rem / 60 % 60,
        second: rem % 60,
        weekday_from_thursday: (days % 7) as usize,
    }
}
