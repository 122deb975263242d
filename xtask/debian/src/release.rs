//! A suite's `InRelease` (or `Release` + `Release.gpg`): its OpenPGP signature checked by the
//! host's `gpgv` against a keyring, its `Valid-Until` against the clock, and its fields — above
//! all the size and SHA-256 of every index file, which is what makes the `Packages` files (and
//! through them each `.deb`) trusted.

use crate::deb822;
use crate::{Error, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Where Debian's `debian-archive-keyring` package installs the archive keys.
pub const DEBIAN_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// How a Release file's signature is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// Require a good signature by a key in this keyring (checked with `gpgv`).
    Keyring(PathBuf),
    /// Do not check signatures: only for local test fixture mirrors that have no keys.
    Unverified,
}

impl Default for Trust {
    fn default() -> Self {
        Trust::Keyring(PathBuf::from(DEBIAN_KEYRING))
    }
}

/// Size and SHA-256 of one file listed in a Release file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexFile {
    /// Size in bytes.
    pub size: u64,
    /// SHA-256, lowercase hex.
    pub sha256: String,
}

/// The parsed fields of a Release file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    /// `Suite` (e.g. `oldstable`).
    pub suite: Option<String>,
    /// `Codename` (e.g. `bookworm`, `bookworm-security`).
    pub codename: Option<String>,
    /// `Date`, verbatim.
    pub date: Option<String>,
    /// `Valid-Until`, verbatim: [`Release::check_fresh`] refuses the release after it. Debian's
    /// main suites omit it; `-security` and `-updates` carry one a week or so ahead.
    pub valid_until: Option<String>,
    /// `Acquire-By-Hash: yes`: indexes can also be fetched from `by-hash/SHA256/<hash>`.
    pub acquire_by_hash: bool,
    /// `Architectures`.
    pub architectures: Vec<String>,
    /// `Components`.
    pub components: Vec<String>,
    files: BTreeMap<String, IndexFile>,
}

impl Release {
    /// Parses the (already verified or unsigned) text of a Release file.
    pub fn parse(text: &str, source_name: &str) -> Result<Self> {
        let stanzas = deb822::parse(text, source_name)?;
        let err = |line: usize, message: String| Error::Parse {
            source_name: source_name.to_string(),
            line,
            message,
        };
        let [stanza] = stanzas.as_slice() else {
            return Err(err(
                1,
                format!("expected one stanza, found {}", stanzas.len()),
            ));
        };
        let list = |name: &str| {
            stanza
                .get(name)
                .map(|v| v.split_whitespace().map(str::to_string).collect())
                .unwrap_or_default()
        };
        let sums = stanza.get("SHA256").ok_or_else(|| {
            err(
                stanza.line(),
                "no SHA256 field: refusing an index without hashes".into(),
            )
        })?;
        let mut files = BTreeMap::new();
        for line in sums.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let parts: Vec<&str> = line.split_whitespace().collect();
            let [sha256, size, path] = parts.as_slice() else {
                return Err(err(stanza.line(), format!("bad SHA256 line {line:?}")));
            };
            let size = size
                .parse()
                .map_err(|_| err(stanza.line(), format!("bad size in SHA256 line {line:?}")))?;
            files.insert(
                path.to_string(),
                IndexFile {
                    size,
                    sha256: sha256.to_ascii_lowercase(),
                },
            );
        }
        let owned = |name: &str| stanza.get(name).map(str::to_string);
        Ok(Release {
            suite: owned("Suite"),
            codename: owned("Codename"),
            date: owned("Date"),
            valid_until: owned("Valid-Until"),
            acquire_by_hash: stanza
                .get("Acquire-By-Hash")
                .is_some_and(|v| v.eq_ignore_ascii_case("yes")),
            architectures: list("Architectures"),
            components: list("Components"),
            files,
        })
    }

    /// The listed size and hash of `path` (relative to `dists/<suite>/`).
    pub fn file(&self, path: &str) -> Option<&IndexFile> {
        self.files.get(path)
    }

    /// Refuses a release whose `Valid-Until` lies before `now` (seconds since the Unix epoch): a
    /// signature stays good forever, so only this date stops a mirror (or a man in the middle)
    /// from replaying an old signed release that hides later security updates.
    pub fn check_fresh(&self, now: u64, release: &str) -> Result<()> {
        let Some(until) = &self.valid_until else {
            return Ok(());
        };
        let limit = parse_date(until).ok_or_else(|| Error::Parse {
            source_name: release.to_string(),
            line: 1,
            message: format!(
                "Valid-Until {until:?} is not a date like \"Sat, 21 Jun 2025 10:45:19 UTC\""
            ),
        })?;
        if now > limit {
            return Err(Error::Expired {
                release: release.to_string(),
                suite: self
                    .codename
                    .clone()
                    .or_else(|| self.suite.clone())
                    .unwrap_or_default(),
                valid_until: until.clone(),
            });
        }
        Ok(())
    }

    /// Whether this Release describes `suite` (by `Suite` or `Codename`).
    pub fn is_for(&self, suite: &str) -> bool {
        self.suite.as_deref() == Some(suite) || self.codename.as_deref() == Some(suite)
    }
}

/// Seconds since the Unix epoch of a Release date (`Sat, 21 Jun 2025 10:45:19 UTC`, RFC 1123 in
/// UTC; the weekday is optional and not checked).
fn parse_date(text: &str) -> Option<u64> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let text = text.trim();
    let text = text.split_once(", ").map_or(text, |(_, rest)| rest);
    let parts: Vec<&str> = text.split_whitespace().collect();
    let [day, month, year, time, zone] = parts.as_slice() else {
        return None;
    };
    if !["UTC", "GMT", "Z", "+0000"].contains(zone) {
        return None;
    }
    let month = MONTHS.iter().position(|m| m.eq_ignore_ascii_case(month))? as i64 + 1;
    let day: i64 = day.parse().ok()?;
    let year: i64 = year.parse().ok()?;
    let hms: Vec<u64> = time
        .split(':')
        .map(|n| n.parse().ok())
        .collect::<Option<_>>()?;
    let [h, m, s] = hms[..] else {
        return None;
    };
    if !(1..=31).contains(&day) || year < 1970 || h > 23 || m > 59 || s > 60 {
        return None;
    }
    // Days from civil (H. Hinnant), with March as the first month of the year.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + day - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    Some(days as u64 * 86_400 + h * 3600 + m * 60 + s)
}

/// Removes the OpenPGP clear-sign armor from an `InRelease` without checking it: only for
/// [`Trust::Unverified`]. Verified text comes from gpgv itself, so nothing outside the signed
/// part can slip in.
pub fn strip_clearsign(text: &str, source_name: &str) -> Result<String> {
    let err = |message: &str| Error::Parse {
        source_name: source_name.to_string(),
        line: 1,
        message: message.to_string(),
    };
    let mut lines = text.lines();
    if lines.next().map(str::trim_end) != Some("-----BEGIN PGP SIGNED MESSAGE-----") {
        return Err(err("not an OpenPGP clear-signed message"));
    }
    // Armor headers ("Hash: SHA256") end at the first empty line.
    for line in lines.by_ref() {
        if line.trim().is_empty() {
            break;
        }
    }
    let mut out = String::new();
    for line in lines {
        if line.trim_end() == "-----BEGIN PGP SIGNATURE-----" {
            return Ok(out);
        }
        // Dash-escaping (RFC 4880 §7.1).
        out.push_str(line.strip_prefix("- ").unwrap_or(line));
        out.push('\n');
    }
    Err(err("clear-signed message has no signature block"))
}

/// Checks a clear-signed `InRelease` with gpgv and returns the text that was signed. The message
/// goes in on gpgv's stdin and the text comes back on its stdout: nothing is written to disk, so a
/// killed caller leaves nothing behind.
pub fn verify_inline(signed: &[u8], keyring: &Path, url: &str) -> Result<String> {
    let text = gpgv(keyring, url, &[arg("--output"), arg("-"), arg("-")], signed)?;
    String::from_utf8(text).map_err(|_| Error::Parse {
        source_name: url.to_string(),
        line: 1,
        message: "signed text is not UTF-8".into(),
    })
}

/// Checks the detached signature in the file `signature` over `data` (given to gpgv on stdin).
pub fn verify_detached(data: &[u8], signature: &Path, keyring: &Path, url: &str) -> Result<()> {
    gpgv(keyring, url, &[signature.into(), arg("-")], data).map(|_| ())
}

fn arg(s: &str) -> std::ffi::OsString {
    s.into()
}

/// Runs gpgv with `stdin` as its input and returns its stdout when at least one signature is good
/// and none is bad. The exit code alone is not enough: Debian signs with several keys and an older
/// keyring that lacks one of them makes gpgv exit non-zero although a trusted key signed (apt
/// decides the same way). The status lines go to stderr, beside gpgv's own messages, because
/// stdout may carry the signed text.
fn gpgv(keyring: &Path, url: &str, args: &[std::ffi::OsString], stdin: &[u8]) -> Result<Vec<u8>> {
    if !keyring.is_file() {
        let package = if keyring == Path::new(DEBIAN_KEYRING) {
            "debian-archive-keyring".to_string()
        } else {
            "the package that ships it, or pass an existing keyring".to_string()
        };
        return Err(Error::MissingKeyring {
            path: keyring.to_path_buf(),
            package,
        });
    }
    let missing = |e: std::io::Error| Error::MissingTool {
        tool: "gpgv".into(),
        package: "gpgv".into(),
        reason: e.to_string(),
    };
    let mut child = Command::new("gpgv")
        .arg("--status-fd")
        .arg("2")
        .arg("--keyring")
        .arg(keyring)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(missing)?;
    let mut input = child.stdin.take().expect("stdin is piped");
    // Written from another thread: gpgv streams the signed text out while it reads, and both
    // pipes fill up. A write error means gpgv stopped reading; its status says why.
    let out = std::thread::scope(|s| {
        s.spawn(move || {
            let _ = std::io::Write::write_all(&mut input, stdin);
        });
        child.wait_with_output()
    })
    .map_err(missing)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let (status, messages): (Vec<&str>, Vec<&str>) = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .partition(|l| l.starts_with("[GNUPG:] "));
    let has = |tag: &str| {
        status
            .iter()
            .any(|l| l["[GNUPG:] ".len()..].split(' ').next() == Some(tag))
    };
    if has("GOODSIG") && !has("BADSIG") {
        return Ok(out.stdout);
    }
    Err(Error::BadSignature {
        url: url.to_string(),
        keyring: keyring.to_path_buf(),
        detail: if messages.is_empty() {
            format!("gpgv exited with {}", out.status)
        } else {
            messages.join("; ")
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const RELEASE: &str = "Origin: Debian\nSuite: oldstable-security\nCodename: bookworm-security\n\
Acquire-By-Hash: yes\nArchitectures: amd64 arm64\nComponents: updates/main updates/contrib\n\
SHA256:\n fadf41b0ef642d1c750f880f5844753ef5ab8d529ac4c190060d5f8bea63a801  2515915 main/binary-amd64/Packages\n \
D3A45860A3F001B55D20EB371C8ED4095115C4BF77666C2847BB3C9D0BB46986   376904 main/binary-amd64/Packages.xz\n";

    #[test]
    fn parses_release_fields_and_hashes() {
        let r = Release::parse(RELEASE, "InRelease").unwrap();
        assert!(r.acquire_by_hash);
        assert!(r.is_for("bookworm-security") && r.is_for("oldstable-security"));
        assert!(!r.is_for("bookworm"));
        assert_eq!(r.architectures, ["amd64", "arm64"]);
        assert_eq!(r.components, ["updates/main", "updates/contrib"]);
        let xz = r.file("main/binary-amd64/Packages.xz").unwrap();
        assert_eq!(xz.size, 376904);
        assert!(xz.sha256.starts_with("d3a45860"));
        assert!(r.file("main/binary-i386/Packages.xz").is_none());
    }

    #[test]
    fn a_release_past_its_valid_until_is_refused_naming_suite_and_date() {
        let text = format!("{RELEASE}Valid-Until: Sat, 21 Jun 2025 10:45:19 UTC\n");
        let r = Release::parse(&text, "InRelease").unwrap();
        // 2025-06-21T10:45:19Z is 1750502719.
        r.check_fresh(1_750_502_719, "u").unwrap();
        let err = r
            .check_fresh(1_750_502_720, "http://m/InRelease")
            .unwrap_err();
        assert!(matches!(err, Error::Expired { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("bookworm-security") && msg.contains("Sat, 21 Jun 2025 10:45:19 UTC"),
            "{msg}"
        );
        assert!(!msg.contains('\n'), "one line: {msg}");
        // Debian's main suites carry no Valid-Until: never stale.
        let main = Release::parse(RELEASE, "InRelease").unwrap();
        main.check_fresh(u64::MAX, "u").unwrap();
        let bad = Release::parse(&format!("{RELEASE}Valid-Until: next week\n"), "I").unwrap();
        let err = bad
            .check_fresh(0, "http://m/InRelease")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("Valid-Until \"next week\" is not a date"),
            "{err}"
        );
    }

    #[test]
    fn release_dates_parse_as_utc() {
        assert_eq!(parse_date("Thu, 01 Jan 1970 00:00:00 UTC"), Some(0));
        assert_eq!(parse_date("29 Feb 2024 23:59:59 GMT"), Some(1_709_251_199));
        assert_eq!(
            parse_date("Sat, 21 Jun 2025 10:45:19 +0000"),
            Some(1_750_502_719)
        );
        assert_eq!(parse_date("Sat, 21 Jun 2025 10:45:19 +0200"), None);
        assert_eq!(parse_date("Sat, 21 Foo 2025 10:45:19 UTC"), None);
        assert_eq!(parse_date("Sat, 21 Jun 2025 25:45:19 UTC"), None);
    }

    #[test]
    fn release_without_sha256_is_refused() {
        let err = Release::parse("Suite: x\nMD5Sum:\n 00 1 a\n", "R").unwrap_err();
        assert!(err.to_string().contains("no SHA256"), "{err}");
    }

    #[test]
    fn strips_clearsign_armor_and_dash_escapes() {
        let signed = "-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\nSuite: x\n- -dash\n\
                      -----BEGIN PGP SIGNATURE-----\nabc\n-----END PGP SIGNATURE-----\n";
        assert_eq!(strip_clearsign(signed, "I").unwrap(), "Suite: x\n-dash\n");
        assert!(strip_clearsign("Suite: x\n", "I").is_err());
        assert!(strip_clearsign("-----BEGIN PGP SIGNED MESSAGE-----\n\nA: b\n", "I").is_err());
    }

    #[test]
    fn sys_gpgv_rejects_a_forged_signature_and_names_missing_keyrings() {
        let signed = "-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\nSuite: x\n\
                      -----BEGIN PGP SIGNATURE-----\n\niQIzBAEBCAAdFiEE\n-----END PGP SIGNATURE-----\n";
        let keyring = Path::new(DEBIAN_KEYRING);
        assert!(
            keyring.is_file(),
            "{DEBIAN_KEYRING} missing: apt-get install debian-archive-keyring"
        );
        let err =
            verify_inline(signed.as_bytes(), keyring, "http://fixture/InRelease").unwrap_err();
        assert!(
            matches!(err, Error::BadSignature { .. }),
            "expected a bad-signature error (is gpgv installed? apt-get install gpgv): {err}"
        );
        let err = verify_inline(b"x", Path::new("/nonexistent/keyring.gpg"), "u").unwrap_err();
        assert!(
            err.to_string()
                .contains("/nonexistent/keyring.gpg not found"),
            "{err}"
        );
        let signature = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(signature.path(), b"y").unwrap();
        let err =
            verify_detached(b"x", signature.path(), Path::new(DEBIAN_KEYRING), "u").unwrap_err();
        assert!(matches!(err, Error::BadSignature { .. }), "{err}");
    }
}
