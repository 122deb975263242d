//! Static files under a root (`/images/…`, `/initrds/…`), confined, with `Range` and `HEAD`.
//!
//! Confinement does not trust text: a request path is percent-decoded once, rejected if it
//! contains encoded separators, backslashes, NUL, `.`/`..` segments or hidden names, and the
//! joined path is then canonicalized (resolving every symlink) and must still lie inside the
//! canonical root. The final open uses `O_NOFOLLOW` and the opened file must be a regular file.

use std::{
    fs::{File, OpenOptions},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use crate::server::{Body, Response};

/// Splits a raw (percent-encoded) request path into decoded segments, refusing anything that
/// could name a parent, a separator in disguise, or a hidden file. Errors are 400 replies.
pub fn decode_path(raw: &str) -> Result<Vec<String>, Response> {
    let lower = raw.to_ascii_lowercase();
    for bad in ["%2f", "%5c", "%00"] {
        if lower.contains(bad) {
            return Err(Response::line(
                400,
                &format!(
                    "path {:?} contains an encoded separator or NUL ({bad})",
                    clip(raw)
                ),
            ));
        }
    }
    let bytes: Vec<u8> = percent_encoding::percent_decode_str(raw).collect();
    let text = String::from_utf8(bytes).map_err(|_| {
        Response::line(
            400,
            &format!("path {:?} is not valid UTF-8 once decoded", clip(raw)),
        )
    })?;
    if text.contains('\\') || text.contains('\0') || text.chars().any(char::is_control) {
        return Err(Response::line(
            400,
            &format!(
                "path {:?} contains a backslash or control character",
                clip(raw)
            ),
        ));
    }
    let Some(rest) = text.strip_prefix('/') else {
        return Err(Response::line(
            400,
            &format!("path {:?} does not start with '/'", clip(raw)),
        ));
    };
    let mut segments: Vec<String> = rest.split('/').map(str::to_string).collect();
    if segments.last().is_some_and(|s| s.is_empty()) {
        segments.pop();
    }
    for s in &segments {
        if s.is_empty() || s == "." || s == ".." {
            return Err(Response::line(
                400,
                &format!("path {:?} has an empty, '.' or '..' segment", clip(raw)),
            ));
        }
    }
    Ok(segments)
}

fn clip(s: &str) -> String {
    s.chars().take(120).collect()
}

/// Answers a `GET`/`HEAD` for `segments` under `root` (the server drops the body for `HEAD`).
pub fn serve(root: &Path, segments: &[String], range: Option<&str>, if_range: bool) -> Response {
    let shown = segments.join("/");
    let not_found = || Response::line(404, &format!("no such file: {shown}"));
    if segments.is_empty() || segments.iter().any(|s| s.starts_with('.')) {
        return not_found();
    }
    let Ok(root) = root.canonicalize() else {
        return Response::line(
            404,
            &format!("no such file: {shown} (the served directory does not exist)"),
        );
    };
    let joined: PathBuf = segments.iter().fold(root.clone(), |p, s| p.join(s));
    let Ok(real) = joined.canonicalize() else {
        return not_found();
    };
    if !real.starts_with(&root) {
        return Response::line(
            404,
            &format!("no such file: {shown} (it resolves outside the served directory)"),
        );
    }
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&real)
    {
        Ok(f) => f,
        Err(_) => return not_found(),
    };
    let meta = match file.metadata() {
        Ok(m) if m.is_file() => m,
        _ => return not_found(),
    };
    let size = meta.len();
    ranged(file, size, if if_range { None } else { range })
}

fn ranged(file: File, size: u64, range: Option<&str>) -> Response {
    let base = |status| Response {
        status,
        headers: vec![
            ("Content-Type", "application/octet-stream".to_string()),
            ("Accept-Ranges", "bytes".to_string()),
        ],
        body: Body::Bytes(Vec::new()),
    };
    match range.map(|r| parse_range(r, size)) {
        None | Some(RangeSpec::Ignore) => Response {
            body: Body::File {
                file,
                start: 0,
                len: size,
            },
            ..base(200)
        },
        Some(RangeSpec::Unsatisfiable) => {
            let mut r = Response::line(
                416,
                &format!("range not satisfiable: the file has {size} bytes"),
            );
            r.headers.push(("Content-Range", format!("bytes */{size}")));
            r
        }
        Some(RangeSpec::Bytes(start, end)) => Response {
            body: Body::File {
                file,
                start,
                len: end - start + 1,
            },
            ..base(206)
        }
        .with_header("Content-Range", format!("bytes {start}-{end}/{size}")),
    }
}

#[derive(Debug, PartialEq)]
enum RangeSpec {
    /// Inclusive byte positions.
    Bytes(u64, u64),
    Unsatisfiable,
    /// Malformed, or several ranges: RFC 9110 lets us answer with the whole file.
    Ignore,
}

fn parse_range(header: &str, size: u64) -> RangeSpec {
    let Some(spec) = header.trim().strip_prefix("bytes=") else {
        return RangeSpec::Ignore;
    };
    if spec.contains(',') {
        return RangeSpec::Ignore;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeSpec::Ignore;
    };
    let (a, b) = (a.trim(), b.trim());
    let num = |s: &str| -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
            None
        } else {
            s.parse().ok()
        }
    };
    match (a.is_empty(), b.is_empty()) {
        (true, true) => RangeSpec::Ignore,
        // Suffix: the last n bytes.
        (true, false) => match num(b) {
            None => RangeSpec::Ignore,
            Some(0) => RangeSpec::Unsatisfiable,
            Some(_) if size == 0 => RangeSpec::Unsatisfiable,
            Some(n) => RangeSpec::Bytes(size.saturating_sub(n), size - 1),
        },
        (false, _) => {
            let Some(start) = num(a) else {
                return RangeSpec::Ignore;
            };
            let end = if b.is_empty() {
                Some(u64::MAX)
            } else {
                match num(b) {
                    Some(e) => Some(e),
                    None => return RangeSpec::Ignore,
                }
            };
            let end = end.unwrap_or(u64::MAX);
            if end < start {
                RangeSpec::Ignore
            } else if start >= size {
                RangeSpec::Unsatisfiable
            } else {
                RangeSpec::Bytes(start, end.min(size - 1))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), RangeSpec::Bytes(0, 9));
        assert_eq!(parse_range("bytes=90-", 100), RangeSpec::Bytes(90, 99));
        assert_eq!(parse_range("bytes=90-1000", 100), RangeSpec::Bytes(90, 99));
        assert_eq!(parse_range("bytes=-10", 100), RangeSpec::Bytes(90, 99));
        assert_eq!(parse_range("bytes=-1000", 100), RangeSpec::Bytes(0, 99));
        assert_eq!(parse_range("bytes=100-", 100), RangeSpec::Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 100), RangeSpec::Unsatisfiable);
        assert_eq!(parse_range("bytes=5-1", 100), RangeSpec::Ignore);
        assert_eq!(parse_range("bytes=0-1,5-6", 100), RangeSpec::Ignore);
        assert_eq!(parse_range("items=0-1", 100), RangeSpec::Ignore);
        assert_eq!(parse_range("bytes=+1-2", 100), RangeSpec::Ignore);
        assert_eq!(
            parse_range("bytes=99999999999999999999999-", 100),
            RangeSpec::Ignore
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(4096))]

        /// Any header and size: no panic, and a range given is inside the file.
        #[test]
        fn any_range_header_is_answered_inside_the_file(
            header in "\\PC{0,40}|bytes=[0-9 ,+-]{0,30}",
            size in proptest::prop_oneof![0u64..64, proptest::num::u64::ANY],
        ) {
            match parse_range(&header, size) {
                RangeSpec::Bytes(start, end) => {
                    proptest::prop_assert!(start <= end && end < size, "{start}-{end} of {size}");
                }
                RangeSpec::Unsatisfiable | RangeSpec::Ignore => {}
            }
        }

        /// A well-formed single range means exactly its bytes, clamped to the file.
        #[test]
        fn a_plain_range_is_taken_as_written(a in 0u64..1000, len in 0u64..1000, size in 1u64..1000) {
            let b = a + len;
            let expected = if a >= size {
                RangeSpec::Unsatisfiable
            } else {
                RangeSpec::Bytes(a, b.min(size - 1))
            };
            proptest::prop_assert_eq!(parse_range(&format!("bytes={a}-{b}"), size), expected);
            let suffix = parse_range(&format!("bytes=-{}", len + 1), size);
            proptest::prop_assert_eq!(
                suffix,
                RangeSpec::Bytes(size.saturating_sub(len + 1), size - 1)
            );
        }

        /// Request paths: no panic, and what is accepted has no segment that could climb.
        #[test]
        fn decoded_paths_never_climb(raw in "/[a-zA-Z0-9./%\\\\]{0,30}|\\PC{0,30}") {
            if let Ok(segments) = decode_path(&raw) {
                for s in segments {
                    proptest::prop_assert!(!s.is_empty() && s != "." && s != "..", "{raw:?}");
                    proptest::prop_assert!(!s.contains(['/', '\\', '\0']), "{raw:?}");
                }
            }
        }
    }

    #[test]
    fn decode_rejects_disguised_traversal() {
        for raw in [
            "/images/../x",
            "/images/%2e%2e/x",
            "/images/%2E%2e/x",
            "/images/a%2fb",
            "/images/a%5cb",
            "/images/a\\b",
            "/images/a%00b",
            "/images//x",
            "/images/./x",
            "images/x",
            "/images/%ff",
        ] {
            assert!(decode_path(raw).is_err(), "{raw} accepted");
        }
        let decoded = decode_path("/images/a%20b/c/").ok();
        assert_eq!(
            decoded,
            Some(vec!["images".to_string(), "a b".into(), "c".into()])
        );
    }
}
