//! Tests on `.deb` files built here, in Rust, byte by byte: tar headers are written raw so that
//! hostile paths (`../`, absolute) can be produced the way a malicious package would.

use super::*;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;

enum Kind {
    Dir,
    File(&'static [u8]),
    Symlink(&'static str),
    Hardlink(&'static str),
}

fn tar_bytes(members: &[(&str, u32, Kind)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, mode, kind) in members {
        let mut header = tar::Header::new_gnu();
        let gnu = header.as_gnu_mut().unwrap();
        gnu.name[..path.len()].copy_from_slice(path.as_bytes());
        let (entry_type, data, link): (_, &[u8], _) = match kind {
            Kind::Dir => (tar::EntryType::Directory, b"", None),
            Kind::File(d) => (tar::EntryType::Regular, d, None),
            Kind::Symlink(t) => (tar::EntryType::Symlink, b"", Some(*t)),
            Kind::Hardlink(t) => (tar::EntryType::Link, b"", Some(*t)),
        };
        if let Some(target) = link {
            gnu.linkname[..target.len()].copy_from_slice(target.as_bytes());
        }
        header.set_entry_type(entry_type);
        header.set_mode(*mode);
        header.set_size(data.len() as u64);
        header.set_mtime(1_700_000_000);
        header.set_uid(0);
        header.set_gid(0);
        header.set_cksum();
        builder.append(&header, data).unwrap();
    }
    builder.into_inner().unwrap()
}

fn compress(ext: &str, bytes: &[u8]) -> Vec<u8> {
    match ext {
        "xz" => {
            let mut e = liblzma::write::XzEncoder::new(Vec::new(), 6);
            e.write_all(bytes).unwrap();
            e.finish().unwrap()
        }
        "zst" => zstd::encode_all(bytes, 3).unwrap(),
        "gz" => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(bytes).unwrap();
            e.finish().unwrap()
        }
        _ => bytes.to_vec(),
    }
}

const CONTROL: &str = "Package: demo\nVersion: 1.0-1\nArchitecture: amd64\nPriority: optional\n\
                       Description: demo\n a test package\n";

fn build_deb(dir: &Path, ext: &str, data: &[(&str, u32, Kind)]) -> PathBuf {
    let control = tar_bytes(&[
        ("./", 0o755, Kind::Dir),
        ("./control", 0o644, Kind::File(CONTROL.as_bytes())),
    ]);
    let members: Vec<(String, Vec<u8>)> = vec![
        ("debian-binary".into(), b"2.0\n".to_vec()),
        (format!("control.tar.{ext}"), compress(ext, &control)),
        (format!("data.tar.{ext}"), compress(ext, &tar_bytes(data))),
    ];
    let path = dir.join(format!("demo-{ext}.deb"));
    let mut builder = ar::Builder::new(File::create(&path).unwrap());
    for (name, bytes) in members {
        let header = ar::Header::new(name.into_bytes(), bytes.len() as u64);
        builder.append(&header, bytes.as_slice()).unwrap();
    }
    path
}

fn normal_tree() -> Vec<(&'static str, u32, Kind)> {
    vec![
        ("./", 0o755, Kind::Dir),
        ("./usr/", 0o755, Kind::Dir),
        ("./usr/bin/", 0o755, Kind::Dir),
        ("./usr/bin/tool", 0o4755, Kind::File(b"\x7fELF tool")),
        ("./usr/bin/alias", 0o777, Kind::Symlink("tool")),
        (
            "./usr/bin/abs",
            0o777,
            Kind::Symlink("/etc/alternatives/abs"),
        ),
        ("./usr/bin/same", 0o4755, Kind::Hardlink("./usr/bin/tool")),
        ("./etc/", 0o555, Kind::Dir),
        ("./etc/demo.conf", 0o640, Kind::File(b"key=value\n")),
    ]
}

#[test]
fn lists_reads_and_extracts_every_compression() {
    let tmp = tempfile::tempdir().unwrap();
    for ext in ["xz", "zst", "gz"] {
        let deb = Deb::open(build_deb(tmp.path(), ext, &normal_tree())).unwrap();
        assert_eq!(deb.control().unwrap().get("Package"), Some("demo"), "{ext}");

        let entries = deb.data_entries().unwrap();
        let paths: Vec<&str> = entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "usr",
                "usr/bin",
                "usr/bin/tool",
                "usr/bin/alias",
                "usr/bin/abs",
                "usr/bin/same",
                "etc",
                "etc/demo.conf"
            ],
            "{ext}"
        );
        assert_eq!(entries[2].mode, 0o4755);
        assert_eq!(entries[2].size, 9);
        assert_eq!(entries[2].kind, EntryKind::File);
        assert_eq!(entries[3].kind, EntryKind::Symlink("tool".into()));
        assert_eq!(entries[5].kind, EntryKind::Hardlink("usr/bin/tool".into()));
        assert_eq!(entries[1].kind, EntryKind::Dir);

        assert_eq!(
            deb.read_data_file("./usr/bin/tool").unwrap(),
            b"\x7fELF tool"
        );
        assert_eq!(deb.read_data_file("etc/demo.conf").unwrap(), b"key=value\n");
        assert_eq!(deb.read_data_file("usr/bin/same").unwrap(), b"\x7fELF tool");
        let err = deb.read_data_file("usr/bin/alias").unwrap_err().to_string();
        assert!(err.contains("symlink to \"tool\""), "{err}");
        let err = deb.read_data_file("usr/bin/nope").unwrap_err();
        assert!(matches!(err, Error::NoSuchMember { .. }), "{err}");

        let out = tmp.path().join(format!("root-{ext}"));
        let written = deb.extract_to(&out).unwrap();
        assert_eq!(written.len(), 8);
        let tool = out.join("usr/bin/tool");
        assert_eq!(std::fs::read(&tool).unwrap(), b"\x7fELF tool");
        assert_eq!(
            std::fs::metadata(&tool).unwrap().permissions().mode() & 0o7777,
            0o4755
        );
        assert_eq!(
            std::fs::metadata(out.join("etc/demo.conf"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o640
        );
        let etc_mode = std::fs::metadata(out.join("etc"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(
            etc_mode & 0o777,
            0o555,
            "read-only directory modes are restored after their members are written"
        );
        assert_eq!(
            std::fs::read_link(out.join("usr/bin/alias")).unwrap(),
            Path::new("tool")
        );
        assert_eq!(
            std::fs::read_link(out.join("usr/bin/abs")).unwrap(),
            Path::new("/etc/alternatives/abs")
        );
        use std::os::unix::fs::MetadataExt;
        let same = std::fs::metadata(out.join("usr/bin/same")).unwrap();
        assert_eq!(
            same.ino(),
            std::fs::metadata(&tool).unwrap().ino(),
            "hard link"
        );
    }
}

#[test]
fn refuses_parent_dir_escape() {
    let tmp = tempfile::tempdir().unwrap();
    let deb = build_deb(
        tmp.path(),
        "xz",
        &[
            ("./", 0o755, Kind::Dir),
            ("./ok", 0o644, Kind::File(b"fine")),
            ("./../escaped", 0o644, Kind::File(b"pwned")),
        ],
    );
    let deb = Deb::open(deb).unwrap();
    let out = tmp.path().join("root");
    let err = deb.extract_to(&out).unwrap_err();
    assert!(matches!(err, Error::UnsafePath { .. }), "{err}");
    assert!(err.to_string().contains("./../escaped"), "{err}");
    assert!(!tmp.path().join("escaped").exists());
    assert!(deb.data_entries().is_err(), "listing must refuse too");
}

#[test]
fn refuses_absolute_paths_and_hardlinks_out() {
    let tmp = tempfile::tempdir().unwrap();
    let abs = Deb::open(build_deb(
        tmp.path(),
        "gz",
        &[("/tmp/pxelab-debian-absolute", 0o644, Kind::File(b"x"))],
    ))
    .unwrap();
    let err = abs.extract_to(&tmp.path().join("a")).unwrap_err();
    assert!(matches!(err, Error::UnsafePath { .. }), "{err}");
    assert!(!Path::new("/tmp/pxelab-debian-absolute").exists());

    let hard = Deb::open(build_deb(
        tmp.path(),
        "zst",
        &[("./passwd", 0o644, Kind::Hardlink("../../etc/passwd"))],
    ))
    .unwrap();
    let err = hard.extract_to(&tmp.path().join("h")).unwrap_err();
    assert!(matches!(err, Error::UnsafePath { .. }), "{err}");
}

#[test]
fn refuses_writing_through_a_symlink_that_leaves_the_tree() {
    let tmp = tempfile::tempdir().unwrap();
    let outside = tmp.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let target: &'static str = Box::leak(outside.to_str().unwrap().to_string().into_boxed_str());
    let deb = Deb::open(build_deb(
        tmp.path(),
        "xz",
        &[
            ("./sneaky", 0o777, Kind::Symlink(target)),
            ("./sneaky/pwned", 0o644, Kind::File(b"x")),
        ],
    ))
    .unwrap();
    let err = deb.extract_to(&tmp.path().join("root")).unwrap_err();
    assert!(err.to_string().contains("sneaky/pwned"), "{err}");
    assert!(!outside.join("pwned").exists());
}

#[test]
fn rejects_files_that_are_not_debs() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("x.deb");
    std::fs::write(&path, b"definitely not ar").unwrap();
    let err = Deb::open(&path).unwrap_err();
    assert!(err.to_string().contains("not an ar archive"), "{err}");

    let path = tmp.path().join("nodata.deb");
    let mut builder = ar::Builder::new(File::create(&path).unwrap());
    builder
        .append(
            &ar::Header::new(b"debian-binary".to_vec(), 4),
            &b"2.0\n"[..],
        )
        .unwrap();
    drop(builder);
    let err = Deb::open(&path).unwrap_err();
    assert!(err.to_string().contains("no control.tar.* member"), "{err}");
}

#[test]
fn normalizes_member_paths() {
    assert_eq!(normalize("./usr/bin/"), Ok(Some("usr/bin".into())));
    assert_eq!(normalize("./"), Ok(None));
    assert_eq!(normalize("usr//lib/./x"), Ok(Some("usr/lib/x".into())));
    assert_eq!(normalize("./a/../b"), Err(()));
    assert_eq!(normalize("/etc"), Err(()));
}
