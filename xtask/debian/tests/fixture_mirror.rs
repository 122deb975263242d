//! Reading a mirror over HTTP, against a fixture mirror served on loopback: InRelease and the
//! Release fallback, by-hash fetching, hash checks, suite checks, .xz and .gz indexes, and
//! releases signed by a throwaway key: good, forged and past their `Valid-Until`.

use pxelab_debian::{Archive, Error, ResolveOptions, Source, Trust};
use pxelab_tests::TestKey;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::Arc;

/// A tiny HTTP/1.0-style server: GET path → bytes, 404 otherwise.
fn serve(files: HashMap<String, Vec<u8>>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let files = Arc::new(files);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let files = files.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request = String::new();
                reader.read_line(&mut request).unwrap();
                let mut line = String::new();
                while reader.read_line(&mut line).unwrap_or(0) > 2 {
                    line.clear();
                }
                let path = request.split_whitespace().nth(1).unwrap_or("/").to_string();
                let reply = match files.get(&path) {
                    Some(body) => {
                        let mut r = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            body.len()
                        )
                        .into_bytes();
                        r.extend_from_slice(body);
                        r
                    }
                    None => {
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                            .to_vec()
                    }
                };
                let _ = stream.write_all(&reply);
            });
        }
    });
    base
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

const PACKAGES: &str = "\
Package: app
Version: 2.0-1
Architecture: amd64
Priority: optional
Section: net
Depends: libc6 (>= 2.36), tool-data
Filename: pool/main/a/app/app_2.0-1_amd64.deb
Size: 1000
SHA256: 1111111111111111111111111111111111111111111111111111111111111111

Package: libc6
Version: 2.36-9+deb12u10
Architecture: amd64
Priority: required
Section: libs
Filename: pool/main/g/glibc/libc6_2.36-9+deb12u10_amd64.deb
Size: 2000
SHA256: 2222222222222222222222222222222222222222222222222222222222222222

Package: tool-data
Version: 5
Architecture: all
Section: misc
Filename: pool/main/t/tool/tool-data_5_all.deb
Size: 3000
SHA256: 3333333333333333333333333333333333333333333333333333333333333333
";

fn release(codename: &str, entries: &[(&str, &[u8])], by_hash: bool) -> String {
    let mut text = format!(
        "Origin: Fixture\nSuite: {codename}\nCodename: {codename}\nArchitectures: amd64\n\
         Components: main\nAcquire-By-Hash: {}\nSHA256:\n",
        if by_hash { "yes" } else { "no" }
    );
    for (path, bytes) in entries {
        text.push_str(&format!(" {} {} {path}\n", sha256(bytes), bytes.len()));
    }
    text
}

fn clearsign(text: &str) -> Vec<u8> {
    format!(
        "-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\n{text}-----BEGIN PGP SIGNATURE-----\n\
         \nnot a real signature\n-----END PGP SIGNATURE-----\n"
    )
    .into_bytes()
}

fn xz(bytes: &[u8]) -> Vec<u8> {
    let mut e = liblzma::write::XzEncoder::new(Vec::new(), 6);
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn mirror() -> String {
    let packages_xz = xz(PACKAGES.as_bytes());
    let packages_gz = gz(PACKAGES.as_bytes());
    let mut files = HashMap::new();
    // Suite "hashed": InRelease, Packages.xz only reachable by hash.
    let rel = release(
        "hashed",
        &[
            ("main/binary-amd64/Packages", PACKAGES.as_bytes()),
            ("main/binary-amd64/Packages.xz", &packages_xz),
        ],
        true,
    );
    files.insert("/debian/dists/hashed/InRelease".into(), clearsign(&rel));
    files.insert(
        format!(
            "/debian/dists/hashed/main/binary-amd64/by-hash/SHA256/{}",
            sha256(&packages_xz)
        ),
        packages_xz.clone(),
    );
    // Suite "plain": no InRelease, detached Release, only Packages.gz.
    let rel = release(
        "plain",
        &[("main/binary-amd64/Packages.gz", &packages_gz)],
        false,
    );
    files.insert("/debian/dists/plain/Release".into(), rel.into_bytes());
    files.insert(
        "/debian/dists/plain/main/binary-amd64/Packages.gz".into(),
        packages_gz,
    );
    // Suite "tampered": the served Packages.xz is not what the Release lists.
    let rel = release(
        "tampered",
        &[("main/binary-amd64/Packages.xz", &packages_xz)],
        false,
    );
    files.insert("/debian/dists/tampered/InRelease".into(), clearsign(&rel));
    files.insert(
        "/debian/dists/tampered/main/binary-amd64/Packages.xz".into(),
        xz(PACKAGES.replace("2.0-1", "6.6-6").as_bytes()),
    );
    // Suite "alias": its Release claims to be another suite.
    let rel = release(
        "other",
        &[("main/binary-amd64/Packages.xz", &packages_xz)],
        false,
    );
    files.insert("/debian/dists/alias/InRelease".into(), clearsign(&rel));
    serve(files) + "/debian"
}

#[test]
fn reads_indexes_by_hash_and_via_detached_release() {
    let base = mirror();
    let archive = Archive::new(Trust::Unverified).unwrap();
    for suite in ["hashed", "plain"] {
        let index = archive
            .open(&Source::new(&base, suite, &["main"], "amd64"))
            .unwrap();
        assert_eq!(index.packages().len(), 3, "{suite}");
        let pins = index.resolve(&["app"], &ResolveOptions::default()).unwrap();
        let names: Vec<_> = pins.iter().map(|p| p.package.as_str()).collect();
        assert_eq!(names, ["app", "libc6", "tool-data"], "{suite}");
        assert_eq!(
            pins[0].url,
            format!("{base}/pool/main/a/app/app_2.0-1_amd64.deb")
        );
        assert_eq!(pins[0].suite, suite);
        assert_eq!(pins[2].arch, "all");
        let base_only = index
            .resolve(&["app"], &ResolveOptions { skip_base: true })
            .unwrap();
        assert_eq!(base_only.len(), 2, "libc6 is Priority: required");
    }
}

#[test]
fn a_tampered_index_is_rejected_with_both_hashes() {
    let base = mirror();
    let archive = Archive::new(Trust::Unverified).unwrap();
    let err = archive
        .open(&Source::new(&base, "tampered", &["main"], "amd64"))
        .unwrap_err();
    let Error::Mismatch {
        what,
        field,
        expected,
        actual,
    } = &err
    else {
        panic!("expected a mismatch, got {err}");
    };
    assert!(
        what.ends_with("/dists/tampered/main/binary-amd64/Packages.xz"),
        "{err}"
    );
    // Same-length tampering: the size matches, the hash must not.
    assert_eq!(*field, "sha256", "{err}");
    assert_ne!(expected, actual);
    assert!(
        err.to_string().contains(expected.as_str()) && err.to_string().contains(actual.as_str())
    );
}

#[test]
fn wrong_suite_missing_component_and_missing_suite_are_clear_errors() {
    let base = mirror();
    let archive = Archive::new(Trust::Unverified).unwrap();
    let err = archive
        .open(&Source::new(&base, "alias", &["main"], "amd64"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("is for suite \"other\", not \"alias\""),
        "{err}"
    );
    let err = archive
        .open(&Source::new(&base, "hashed", &["contrib"], "amd64"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("lists no contrib/binary-amd64/Packages.xz"),
        "{err}"
    );
    let err = archive
        .open(&Source::new(&base, "hashed", &["main"], "arm64"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("lists no main/binary-arm64"), "{err}");
    let err = archive
        .open(&Source::new(&base, "nosuch", &["main"], "amd64"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("/dists/nosuch/Release: HTTP 404"), "{err}");
}

#[test]
fn sys_fixture_signatures_are_checked_when_trust_is_a_keyring() {
    let base = mirror();
    let archive = Archive::new(Trust::default()).unwrap();
    let err = archive
        .open(&Source::new(&base, "hashed", &["main"], "amd64"))
        .unwrap_err();
    assert!(
        matches!(err, Error::BadSignature { .. }),
        "a fake signature must be refused (needs gpgv and debian-archive-keyring): {err}"
    );
    // The detached form without Release.gpg cannot be trusted either.
    let err = archive
        .open(&Source::new(&base, "plain", &["main"], "amd64"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("plain/Release.gpg: HTTP 404"), "{err}");
}

/// Suites signed by `key`: `fresh` (valid for years), `stale` (its Valid-Until passed),
/// `forged` (signed, then one index hash changed), and the detached form `detached`.
fn signed_mirror(key: &TestKey) -> String {
    let packages_xz = xz(PACKAGES.as_bytes());
    let index = [("main/binary-amd64/Packages.xz", &packages_xz[..])];
    let mut files = HashMap::new();
    for (suite, valid_until) in [
        ("fresh", "Valid-Until: Fri, 01 Jan 2100 00:00:00 UTC\n"),
        ("stale", "Valid-Until: Sat, 01 Jan 2000 00:00:00 UTC\n"),
    ] {
        let rel = release(suite, &index, false) + valid_until;
        files.insert(
            format!("/debian/dists/{suite}/InRelease"),
            key.clearsign(rel.as_bytes()),
        );
        files.insert(
            format!("/debian/dists/{suite}/main/binary-amd64/Packages.xz"),
            packages_xz.clone(),
        );
    }
    let signed =
        String::from_utf8(key.clearsign(release("forged", &index, false).as_bytes())).unwrap();
    let at = signed.find(&sha256(&packages_xz)).unwrap();
    let mut forged = signed.into_bytes();
    forged[at] = if forged[at] == b'0' { b'1' } else { b'0' };
    files.insert("/debian/dists/forged/InRelease".into(), forged);
    let rel = release("detached", &index, false);
    files.insert(
        "/debian/dists/detached/Release.gpg".into(),
        key.detach_sign(rel.as_bytes()),
    );
    files.insert("/debian/dists/detached/Release".into(), rel.into_bytes());
    files.insert(
        "/debian/dists/detached/main/binary-amd64/Packages.xz".into(),
        packages_xz,
    );
    serve(files) + "/debian"
}

#[test]
fn sys_signed_releases_are_trusted_until_their_valid_until_and_not_when_forged() {
    let key = TestKey::generate();
    let base = signed_mirror(&key);
    let archive = Archive::new(Trust::Keyring(key.keyring().to_path_buf())).unwrap();
    let open = |suite: &str| archive.open(&Source::new(&base, suite, &["main"], "amd64"));
    for suite in ["fresh", "detached"] {
        let index = open(suite).unwrap_or_else(|e| panic!("{suite}: {e}"));
        assert_eq!(index.packages().len(), 3, "{suite}");
    }
    let err = open("stale").unwrap_err();
    assert!(matches!(err, Error::Expired { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("suite stale expired on Sat, 01 Jan 2000 00:00:00 UTC"),
        "names the suite and the date: {msg}"
    );
    let err = open("forged").unwrap_err();
    assert!(matches!(err, Error::BadSignature { .. }), "{err}");
    // The same releases under another keyring are refused.
    let other = TestKey::generate();
    let err = Archive::new(Trust::Keyring(other.keyring().to_path_buf()))
        .unwrap()
        .open(&Source::new(&base, "fresh", &["main"], "amd64"))
        .unwrap_err();
    assert!(matches!(err, Error::BadSignature { .. }), "{err}");
}
