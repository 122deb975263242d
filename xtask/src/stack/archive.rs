//! A file tree as data, then as bytes: the model behind the initrd and the image layers.
//!
//! Following u-root's initramfs package, an archive is first a plain map from destination path
//! to a record: parent directories are added automatically, two different records for one path
//! are an error, device nodes are declared records (so building needs no root), and everything
//! is written sorted by path with owner 0:0 and one fixed mtime. Written as newc cpio (the
//! format the kernel unpacks; the `cpio` crate) or as tar (image layers; the `tar` crate), and
//! compressed with zstd or gzip.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};

/// Where a regular file's bytes come from. Files are read when the archive is written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Bytes(Vec<u8>),
    File(PathBuf),
}

impl Source {
    fn read(&self) -> Result<Vec<u8>> {
        match self {
            Source::Bytes(b) => Ok(b.clone()),
            Source::File(p) => std::fs::read(p).with_context(|| format!("reading {}", p.display())),
        }
    }

    fn len(&self) -> Result<u64> {
        match self {
            Source::Bytes(b) => Ok(b.len() as u64),
            Source::File(p) => Ok(std::fs::metadata(p)
                .with_context(|| format!("reading {}", p.display()))?
                .len()),
        }
    }
}

/// One archive member. Modes are permission bits only (the file type comes from the variant).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    Dir { mode: u32 },
    File { mode: u32, source: Source },
    Symlink { target: String },
    CharDev { mode: u32, major: u32, minor: u32 },
    BlockDev { mode: u32, major: u32, minor: u32 },
}

impl Record {
    fn type_bits(&self) -> u32 {
        match self {
            Record::Dir { .. } => 0o040000,
            Record::File { .. } => 0o100000,
            Record::Symlink { .. } => 0o120000,
            Record::CharDev { .. } => 0o020000,
            Record::BlockDev { .. } => 0o060000,
        }
    }

    fn perm(&self) -> u32 {
        match self {
            Record::Dir { mode }
            | Record::File { mode, .. }
            | Record::CharDev { mode, .. }
            | Record::BlockDev { mode, .. } => *mode & 0o7777,
            Record::Symlink { .. } => 0o777,
        }
    }
}

#[derive(Clone, Debug)]
struct Entry {
    record: Record,
    /// Added only as the parent of something else: an explicit record may replace it.
    implicit: bool,
}

/// Destination path → record. Paths are stored without the leading `/`.
#[derive(Clone, Debug, Default)]
pub struct Archive {
    entries: BTreeMap<String, Entry>,
}

/// Turn `/usr/bin/x` or `usr/bin/x` into `usr/bin/x`; reject `.`/`..`/empty components so no
/// entry can point outside the archive root.
pub fn normalize(path: &str) -> Result<String> {
    let trimmed = path.trim_start_matches('/');
    if trimmed.is_empty() {
        bail!("initrd path {path:?} names the archive root; give a file or directory below it");
    }
    for c in trimmed.split('/') {
        if c.is_empty() || c == "." || c == ".." {
            bail!("initrd path {path:?} has an empty, `.` or `..` component; use a plain absolute path");
        }
    }
    Ok(trimmed.to_string())
}

impl Archive {
    pub fn new() -> Archive {
        Archive::default()
    }

    /// Add `record` at `path`, creating missing parent directories (mode 0755). Adding the same
    /// record twice is allowed; a different record at an existing path is an error.
    pub fn add(&mut self, path: &str, record: Record) -> Result<()> {
        let path = normalize(path)?;
        let mut parent = String::new();
        let components: Vec<&str> = path.split('/').collect();
        for c in &components[..components.len() - 1] {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(c);
            match self.entries.get(&parent) {
                Some(Entry { record: Record::Dir { .. }, .. }) => {}
                Some(Entry { record, .. }) => bail!(
                    "initrd: cannot add /{path}: its parent /{parent} is already a {} (not a directory)",
                    kind(record)
                ),
                None => {
                    self.entries
                        .insert(parent.clone(), Entry { record: Record::Dir { mode: 0o755 }, implicit: true });
                }
            }
        }
        match self.entries.get(&path) {
            None => {}
            Some(existing) if existing.record == record => {
                // Same record again: keep it, but an explicit add makes it explicit.
            }
            Some(Entry { record: Record::Dir { .. }, implicit: true }) if matches!(record, Record::Dir { .. }) => {}
            Some(existing) => bail!(
                "initrd: /{path} is added twice with different contents (first a {}, then a {}); keep only one of them",
                kind(&existing.record),
                kind(&record)
            ),
        }
        if !matches!(record, Record::Dir { .. }) && self.has_children(&path) {
            bail!(
                "initrd: cannot add /{path} as a {}: files were already added below it",
                kind(&record)
            );
        }
        self.entries.insert(
            path,
            Entry {
                record,
                implicit: false,
            },
        );
        Ok(())
    }

    fn has_children(&self, path: &str) -> bool {
        let prefix = format!("{path}/");
        self.entries
            .range(prefix.clone()..)
            .next()
            .is_some_and(|(k, _)| k.starts_with(&prefix))
    }

    /// The record at `path`, if any.
    pub fn get(&self, path: &str) -> Option<&Record> {
        normalize(path)
            .ok()
            .and_then(|p| self.entries.get(&p))
            .map(|e| &e.record)
    }

    pub fn contains(&self, path: &str) -> bool {
        self.get(path).is_some()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Regular files by size, largest first: `(path with leading /, bytes)`.
    pub fn largest_files(&self) -> Result<Vec<(String, u64)>> {
        let mut v = Vec::new();
        for (path, e) in &self.entries {
            if let Record::File { source, .. } = &e.record {
                v.push((format!("/{path}"), source.len()?));
            }
        }
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        Ok(v)
    }

    /// Write the archive as newc cpio: sorted by path, owner 0:0, every mtime `mtime`, inode
    /// numbers counting from 1 in path order, then the trailer.
    pub fn write<W: Write>(&self, w: W, mtime: u32) -> Result<W> {
        let mut w = w;
        for (i, (path, entry)) in self.entries.iter().enumerate() {
            let record = &entry.record;
            let ino = u32::try_from(i + 1).context("initrd has more than 2^32 entries")?;
            let mut builder = cpio::newc::Builder::new(path)
                .ino(ino)
                .uid(0)
                .gid(0)
                .mtime(mtime)
                .mode(record.type_bits() | record.perm())
                .nlink(if matches!(record, Record::Dir { .. }) {
                    2
                } else {
                    1
                });
            if let Record::CharDev { major, minor, .. } | Record::BlockDev { major, minor, .. } =
                record
            {
                builder = builder.rdev_major(*major).rdev_minor(*minor);
            }
            let data = match record {
                Record::File { source, .. } => source.read()?,
                Record::Symlink { target } => target.as_bytes().to_vec(),
                Record::Dir { .. } | Record::CharDev { .. } | Record::BlockDev { .. } => Vec::new(),
            };
            let size = u32::try_from(data.len())
                .with_context(|| format!("/{path} is larger than 4 GiB"))?;
            let mut writer = builder.write(w, size);
            writer
                .write_all(&data)
                .with_context(|| format!("writing /{path} to the initrd"))?;
            w = writer.finish()?;
        }
        Ok(cpio::newc::trailer(w)?)
    }

    /// The uncompressed newc bytes.
    pub fn to_cpio(&self, mtime: u32) -> Result<Vec<u8>> {
        self.write(Vec::new(), mtime)
    }

    /// The archive as a tar stream (GNU headers for long names): sorted, owner 0:0 with no user
    /// or group names, every mtime `mtime`. Device nodes are refused: image layers need none.
    pub fn to_tar(&self, mtime: u64) -> Result<Vec<u8>> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, entry) in &self.entries {
            let record = &entry.record;
            let mut h = tar::Header::new_gnu();
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(mtime);
            h.set_mode(record.perm());
            match record {
                Record::Dir { .. } => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_size(0);
                    b.append_data(&mut h, format!("{path}/"), std::io::empty())?;
                }
                Record::File { source, .. } => {
                    let data = source.read()?;
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(data.len() as u64);
                    b.append_data(&mut h, path, data.as_slice())?;
                }
                Record::Symlink { target } => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_size(0);
                    b.append_link(&mut h, path, target)?;
                }
                Record::CharDev { .. } | Record::BlockDev { .. } => {
                    bail!("/{path}: device nodes cannot go into a tar layer")
                }
            }
        }
        Ok(b.into_inner()?)
    }

    /// Every entry in path order (paths without the leading `/`).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Record)> {
        self.entries.iter().map(|(p, e)| (p.as_str(), &e.record))
    }
}

fn kind(r: &Record) -> &'static str {
    match r {
        Record::Dir { .. } => "directory",
        Record::File { .. } => "file",
        Record::Symlink { .. } => "symlink",
        Record::CharDev { .. } => "character device",
        Record::BlockDev { .. } => "block device",
    }
}

/// One member as read back from an archive (for tests and `--list` style reports).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    /// With a leading `/`.
    pub path: String,
    /// Full st_mode (type and permission bits).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: u32,
    pub size: u32,
    pub rdev: (u32, u32),
    /// The link target for symlinks.
    pub link: Option<String>,
}

/// Read every member of a newc archive (uncompressed).
pub fn list(bytes: &[u8]) -> Result<Vec<Listed>> {
    let mut out = Vec::new();
    let mut rest: &[u8] = bytes;
    loop {
        let mut reader = cpio::newc::Reader::new(rest).context("reading a cpio header")?;
        let e = reader.entry().clone();
        if e.is_trailer() {
            break;
        }
        let mut data = Vec::new();
        reader
            .read_to_end(&mut data)
            .with_context(|| format!("reading {} from the cpio", e.name()))?;
        let link =
            (e.mode() & 0o170000 == 0o120000).then(|| String::from_utf8_lossy(&data).into_owned());
        out.push(Listed {
            path: format!("/{}", e.name()),
            mode: e.mode(),
            uid: e.uid(),
            gid: e.gid(),
            mtime: e.mtime(),
            size: e.file_size(),
            rdev: (e.rdev_major(), e.rdev_minor()),
            link,
        });
        rest = reader.finish()?;
    }
    Ok(out)
}

/// How the initrd is compressed. Debian's and Ubuntu's kernels unpack both.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Compression {
    Zstd,
    Gzip,
}

impl Compression {
    pub fn name(self) -> &'static str {
        match self {
            Compression::Zstd => "zstd",
            Compression::Gzip => "gzip",
        }
    }
}

/// zstd level 19 keeps the window at 8 MiB, which the kernel's initramfs decompressor accepts.
const ZSTD_LEVEL: i32 = 19;

/// Compress deterministically: single-threaded zstd, or gzip with no name and mtime 0.
pub fn compress(data: &[u8], how: Compression) -> Result<Vec<u8>> {
    match how {
        Compression::Zstd => {
            Ok(zstd::bulk::compress(data, ZSTD_LEVEL).context("zstd compression")?)
        }
        Compression::Gzip => {
            let mut enc = flate2::GzBuilder::new()
                .mtime(0)
                .write(Vec::new(), flate2::Compression::best());
            enc.write_all(data)?;
            Ok(enc.finish()?)
        }
    }
}

/// Undo [`compress`] by sniffing the magic (zstd, gzip, or plain newc).
pub fn decompress(data: &[u8]) -> Result<Vec<u8>> {
    if data.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Ok(zstd::stream::decode_all(data).context("zstd decompression")?)
    } else if data.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(data)
            .read_to_end(&mut out)
            .context("gzip decompression")?;
        Ok(out)
    } else if data.starts_with(b"070701") {
        Ok(data.to_vec())
    } else {
        bail!("not a zstd, gzip or newc cpio archive")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Archive {
        let mut a = Archive::new();
        a.add(
            "/init",
            Record::File {
                mode: 0o755,
                source: Source::Bytes(b"#!/bin/sh\necho hi\n".to_vec()),
            },
        )
        .unwrap();
        a.add(
            "/bin/busybox",
            Record::File {
                mode: 0o755,
                source: Source::Bytes(vec![0x7f; 100]),
            },
        )
        .unwrap();
        a.add(
            "/bin/sh",
            Record::Symlink {
                target: "busybox".into(),
            },
        )
        .unwrap();
        a.add(
            "/dev/console",
            Record::CharDev {
                mode: 0o600,
                major: 5,
                minor: 1,
            },
        )
        .unwrap();
        a.add(
            "/dev/null",
            Record::CharDev {
                mode: 0o666,
                major: 1,
                minor: 3,
            },
        )
        .unwrap();
        a.add("/tmp", Record::Dir { mode: 0o1777 }).unwrap();
        a
    }

    #[test]
    fn lists_paths_modes_owners_and_devices_sorted() {
        let bytes = sample().to_cpio(1_700_000_000).unwrap();
        let listed = list(&bytes).unwrap();
        let paths: Vec<&str> = listed.iter().map(|l| l.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "/bin",
                "/bin/busybox",
                "/bin/sh",
                "/dev",
                "/dev/console",
                "/dev/null",
                "/init",
                "/tmp"
            ]
        );
        let by = |p: &str| listed.iter().find(|l| l.path == p).unwrap().clone();
        assert_eq!(by("/bin").mode, 0o040755);
        assert_eq!(by("/bin/busybox").mode, 0o100755);
        assert_eq!(by("/bin/busybox").size, 100);
        assert_eq!(by("/bin/sh").mode, 0o120777);
        assert_eq!(by("/bin/sh").link.as_deref(), Some("busybox"));
        assert_eq!(by("/dev/console").mode, 0o020600);
        assert_eq!(by("/dev/console").rdev, (5, 1));
        assert_eq!(by("/dev/null").rdev, (1, 3));
        assert_eq!(by("/tmp").mode, 0o041777);
        for l in &listed {
            assert_eq!((l.uid, l.gid, l.mtime), (0, 0, 1_700_000_000), "{}", l.path);
        }
    }

    #[test]
    fn deterministic_regardless_of_insertion_order() {
        let a = sample().to_cpio(42).unwrap();
        let mut b = Archive::new();
        b.add("/tmp", Record::Dir { mode: 0o1777 }).unwrap();
        b.add(
            "/dev/null",
            Record::CharDev {
                mode: 0o666,
                major: 1,
                minor: 3,
            },
        )
        .unwrap();
        b.add(
            "/dev/console",
            Record::CharDev {
                mode: 0o600,
                major: 5,
                minor: 1,
            },
        )
        .unwrap();
        b.add(
            "/bin/sh",
            Record::Symlink {
                target: "busybox".into(),
            },
        )
        .unwrap();
        b.add(
            "/bin/busybox",
            Record::File {
                mode: 0o755,
                source: Source::Bytes(vec![0x7f; 100]),
            },
        )
        .unwrap();
        b.add(
            "/init",
            Record::File {
                mode: 0o755,
                source: Source::Bytes(b"#!/bin/sh\necho hi\n".to_vec()),
            },
        )
        .unwrap();
        assert_eq!(a, b.to_cpio(42).unwrap());
        for how in [Compression::Zstd, Compression::Gzip] {
            let c1 = compress(&a, how).unwrap();
            assert_eq!(c1, compress(&a, how).unwrap());
            assert_eq!(decompress(&c1).unwrap(), a);
        }
        // A different mtime must show up in the bytes: nothing else may vary.
        assert_ne!(a, sample().to_cpio(43).unwrap());
    }

    #[test]
    fn conflicts_are_errors_and_duplicates_are_not() {
        let mut a = sample();
        a.add(
            "/bin/sh",
            Record::Symlink {
                target: "busybox".into(),
            },
        )
        .unwrap();
        let err = a
            .add(
                "/bin/sh",
                Record::Symlink {
                    target: "dash".into(),
                },
            )
            .unwrap_err();
        assert!(err.to_string().contains("/bin/sh is added twice"), "{err}");
        let err = a.add("/init/x", Record::Dir { mode: 0o755 }).unwrap_err();
        assert!(
            err.to_string().contains("parent /init is already a file"),
            "{err}"
        );
        let err = a
            .add(
                "/bin",
                Record::Symlink {
                    target: "usr/bin".into(),
                },
            )
            .unwrap_err();
        assert!(err.to_string().contains("/bin"), "{err}");
        // An implicit parent may be made explicit with another mode.
        a.add("/dev", Record::Dir { mode: 0o700 }).unwrap();
        assert_eq!(a.get("/dev"), Some(&Record::Dir { mode: 0o700 }));
        assert!(a.add("/../etc", Record::Dir { mode: 0o755 }).is_err());
        assert!(a.add("/", Record::Dir { mode: 0o755 }).is_err());
    }

    #[test]
    fn tar_is_sorted_owned_by_root_and_stable() {
        let mut a = sample();
        a.add(
            "/dev/console",
            Record::CharDev {
                mode: 0o600,
                major: 5,
                minor: 1,
            },
        )
        .unwrap();
        assert!(
            a.to_tar(7).is_err(),
            "device nodes have no place in a layer"
        );
        let mut a = Archive::new();
        let long = format!("/usr/share/{}/file", "x".repeat(120));
        a.add(
            &long,
            Record::File {
                mode: 0o644,
                source: Source::Bytes(b"data".to_vec()),
            },
        )
        .unwrap();
        a.add(
            "/usr/bin/tool",
            Record::File {
                mode: 0o755,
                source: Source::Bytes(b"elf".to_vec()),
            },
        )
        .unwrap();
        a.add(
            "/usr/sbin/tool",
            Record::Symlink {
                target: "../bin/tool".into(),
            },
        )
        .unwrap();
        let bytes = a.to_tar(1_600_000_000).unwrap();
        assert_eq!(bytes, a.to_tar(1_600_000_000).unwrap());
        let mut ar = tar::Archive::new(bytes.as_slice());
        let mut seen = Vec::new();
        for e in ar.entries().unwrap() {
            let e = e.unwrap();
            let h = e.header();
            assert_eq!(
                (h.uid().unwrap(), h.gid().unwrap(), h.mtime().unwrap()),
                (0, 0, 1_600_000_000)
            );
            assert_eq!(h.username().unwrap(), Some(""));
            assert_eq!(h.groupname().unwrap(), Some(""));
            seen.push((
                e.path().unwrap().to_string_lossy().into_owned(),
                h.mode().unwrap(),
            ));
        }
        let names: Vec<&str> = seen.iter().map(|(p, _)| p.as_str()).collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
        assert!(
            names.contains(&long.trim_start_matches('/')),
            "long names survive: {names:?}"
        );
        assert!(
            seen.contains(&("usr/bin/tool".to_string(), 0o755)),
            "{seen:?}"
        );
        assert!(seen.contains(&("usr/bin/".to_string(), 0o755)), "{seen:?}");
    }

    #[test]
    fn largest_files_first() {
        let top = sample().largest_files().unwrap();
        assert_eq!(top[0], ("/bin/busybox".to_string(), 100));
        assert_eq!(top.len(), 2);
    }
}
