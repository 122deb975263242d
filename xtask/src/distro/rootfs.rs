//! Deterministic root filesystem tarballs: `rootfs.tar.zst`.
//!
//! Two producers: [`RootfsWriter`] writes a tree entry by entry (the Ubuntu path walks an ext4
//! image) — callers add entries in sorted order, owners and modes are kept as they are, mtimes are
//! clamped to SOURCE_DATE_EPOCH, no user/group names; [`compress_tar`] compresses a tarball that is
//! already deterministic (mmdebstrap's) and notes the facts the manifest needs in the same pass.
//! Both compress with multithreaded zstd at [`ZSTD_LEVEL`]: the output of zstd's multithreaded
//! mode does not depend on the number of workers, so digests are stable across machines.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Read, Write};
use std::path::Path;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

/// zstd level for the rootfs. The guest's cost hardly depends on it (decompression speed is
/// about the same at every level and dominated by the bytes written), so it trades size
/// against build time. Measured on the Debian 12 rootfs (484 MiB tar, 2 threads, loaded 2-core
/// machine): level 3 → 165 MiB in 6 s, 6 → 155 MiB in 22 s, 9 → 144 MiB in 41 s,
/// 12 → 143 MiB in 76 s. Level 9 is the knee.
pub const ZSTD_LEVEL: i32 = 9;

/// Digest and sizes of a written `rootfs.tar.zst`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RootfsInfo {
    pub sha256: String,
    pub size: u64,
    pub uncompressed_size: u64,
}

/// Paths of interest in a root filesystem, relative without a leading `/` or `./`.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Facts {
    pub paths: BTreeSet<String>,
}

impl Facts {
    /// Notes `path` if the manifest may ask about it (boot files, GRUB, cloud-init).
    pub fn note(&mut self, path: &str) {
        let path = path.trim_start_matches("./").trim_start_matches('/');
        let interesting = path.starts_with("boot/vmlinuz-")
            || path.starts_with("boot/vmlinux-")
            || path.starts_with("boot/initrd.img-")
            || matches!(
                path,
                "usr/sbin/grub-install"
                    | "usr/sbin/update-grub"
                    | "usr/sbin/update-initramfs"
                    | "usr/bin/cloud-init"
                    | "usr/sbin/grub-mkconfig"
            );
        if interesting {
            self.paths.insert(path.to_string());
        }
    }

    pub fn has(&self, path: &str) -> bool {
        self.paths.contains(path)
    }
}

/// Ownership, permissions and time of one entry.
#[derive(Clone, Copy, Debug)]
pub struct Meta {
    /// Permission bits incl. setuid/setgid/sticky (no file type bits).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
}

/// Writes a tarball entry by entry into a zstd stream.
pub struct RootfsWriter {
    builder: tar::Builder<Counting<zstd::stream::write::Encoder<'static, Hashing<fs::File>>>>,
    epoch: u64,
    pub facts: Facts,
}

impl RootfsWriter {
    pub fn create(path: &Path, epoch: u64) -> Result<RootfsWriter> {
        let file =
            fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
        let encoder = encoder(Hashing::new(file))?;
        let mut builder = tar::Builder::new(Counting::new(encoder));
        builder.mode(tar::HeaderMode::Complete);
        Ok(RootfsWriter {
            builder,
            epoch,
            facts: Facts::default(),
        })
    }

    fn header(&self, kind: tar::EntryType, meta: Meta, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(meta.mode & 0o7777);
        h.set_uid(meta.uid.into());
        h.set_gid(meta.gid.into());
        h.set_mtime(meta.mtime.clamp(0, self.epoch as i64) as u64);
        h.set_size(size);
        h
    }

    pub fn dir(&mut self, path: &str, meta: Meta) -> Result<()> {
        let mut h = self.header(tar::EntryType::Directory, meta, 0);
        self.builder
            .append_data(&mut h, format!("{path}/"), io::empty())?;
        Ok(())
    }

    pub fn file(&mut self, path: &str, meta: Meta, size: u64, data: impl Read) -> Result<()> {
        self.facts.note(path);
        let mut h = self.header(tar::EntryType::Regular, meta, size);
        // A reader that ends early would shift every later entry: refuse it.
        let mut data = data.take(size);
        self.builder
            .append_data(&mut h, path, &mut data)
            .with_context(|| format!("cannot add {path} to the rootfs"))?;
        Ok(())
    }

    pub fn symlink(&mut self, path: &str, meta: Meta, target: &str) -> Result<()> {
        self.facts.note(path);
        let mut h = self.header(tar::EntryType::Symlink, meta, 0);
        self.builder.append_link(&mut h, path, target)?;
        Ok(())
    }

    /// A hard link to an entry already written (`target` is its archive path).
    pub fn hardlink(&mut self, path: &str, meta: Meta, target: &str) -> Result<()> {
        self.facts.note(path);
        let mut h = self.header(tar::EntryType::Link, meta, 0);
        self.builder.append_link(&mut h, path, target)?;
        Ok(())
    }

    /// Character or block device, or FIFO.
    pub fn special(
        &mut self,
        path: &str,
        kind: tar::EntryType,
        meta: Meta,
        dev: (u32, u32),
    ) -> Result<()> {
        let mut h = self.header(kind, meta, 0);
        h.set_device_major(dev.0)?;
        h.set_device_minor(dev.1)?;
        self.builder.append_data(&mut h, path, io::empty())?;
        Ok(())
    }

    pub fn finish(self) -> Result<(RootfsInfo, Facts)> {
        let counting = self.builder.into_inner()?;
        let uncompressed_size = counting.count;
        let hashing = counting.inner.finish()?;
        let info = hashing.finish(uncompressed_size)?;
        Ok((info, self.facts))
    }
}

pub(super) fn encoder<W: Write>(inner: W) -> Result<zstd::stream::write::Encoder<'static, W>> {
    let mut encoder = zstd::stream::write::Encoder::new(inner, ZSTD_LEVEL)?;
    // Fixed at 2 workers whatever the machine: the bytes are the same for any count ≥ 1, and the
    // build machines have 2 cores.
    encoder.multithread(2)?;
    encoder.include_checksum(true)?;
    Ok(encoder)
}

/// Compresses the tarball at `input` into `out` and collects [`Facts`] from its entries.
pub fn compress_tar(
    input: &Path,
    out: &Path,
    progress: &dyn Fn(u64),
) -> Result<(RootfsInfo, Facts)> {
    let file = fs::File::open(input).with_context(|| format!("cannot open {}", input.display()))?;
    let output =
        fs::File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut encoder = Counting::new(encoder(Hashing::new(output))?);
    let mut facts = Facts::default();
    {
        // Tee: the tar parser sees every byte that goes into the encoder.
        let tee = Tee {
            inner: file,
            sink: &mut encoder,
            progress,
            done: 0,
        };
        let mut archive = tar::Archive::new(tee);
        for entry in archive
            .entries()
            .context("the mmdebstrap tarball is unreadable")?
        {
            let entry = entry?;
            facts.note(
                &entry
                    .path_bytes()
                    .iter()
                    .map(|&b| b as char)
                    .collect::<String>(),
            );
        }
        // The parser stops at the end-of-archive marker; the padding after it belongs too.
        let mut rest = archive.into_inner();
        io::copy(&mut rest, &mut io::sink())?;
    }
    let uncompressed_size = encoder.count;
    let info = encoder.inner.finish()?.finish(uncompressed_size)?;
    Ok((info, facts))
}

struct Tee<'a, R, W> {
    inner: R,
    sink: &'a mut W,
    progress: &'a dyn Fn(u64),
    done: u64,
}

impl<R: Read, W: Write> Read for Tee<'_, R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sink.write_all(&buf[..n])?;
        self.done += n as u64;
        (self.progress)(self.done);
        Ok(n)
    }
}

struct Counting<W> {
    inner: W,
    count: u64,
}

impl<W> Counting<W> {
    fn new(inner: W) -> Self {
        Counting { inner, count: 0 }
    }
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

struct Hashing<W> {
    inner: W,
    hash: Sha256,
    count: u64,
}

impl Hashing<fs::File> {
    fn new(inner: fs::File) -> Self {
        Hashing {
            inner,
            hash: Sha256::new(),
            count: 0,
        }
    }

    fn finish(mut self, uncompressed_size: u64) -> Result<RootfsInfo> {
        self.inner.flush()?;
        self.inner.sync_all()?;
        Ok(RootfsInfo {
            sha256: hex::encode(self.hash.finalize()),
            size: self.count,
            uncompressed_size,
        })
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(mode: u32, mtime: i64) -> Meta {
        Meta {
            mode,
            uid: 0,
            gid: 42,
            mtime,
        }
    }

    fn write(dir: &Path, name: &str) -> (RootfsInfo, Facts) {
        let mut w = RootfsWriter::create(&dir.join(name), 1000).unwrap();
        w.dir("boot", meta(0o755, 5)).unwrap();
        w.file(
            "boot/vmlinuz-6.8.0-1-generic",
            meta(0o600, 99_999),
            3,
            &b"abc"[..],
        )
        .unwrap();
        w.dir("usr", meta(0o755, 5)).unwrap();
        w.file(
            "usr/bin-long/".repeat(12).trim_end_matches('/'),
            meta(0o4755, 7),
            1,
            &b"x"[..],
        )
        .unwrap();
        w.symlink("vmlinuz", meta(0o777, 5), "boot/vmlinuz-6.8.0-1-generic")
            .unwrap();
        w.hardlink(
            "vmlinuz.hard",
            meta(0o600, 5),
            "boot/vmlinuz-6.8.0-1-generic",
        )
        .unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn writer_is_reproducible_and_keeps_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let (a, facts) = write(dir.path(), "a.tar.zst");
        let (b, _) = write(dir.path(), "b.tar.zst");
        assert_eq!(a, b);
        assert!(facts.has("boot/vmlinuz-6.8.0-1-generic"));
        let bytes = fs::read(dir.path().join("a.tar.zst")).unwrap();
        assert_eq!(a.size, bytes.len() as u64);
        assert_eq!(a.sha256, hex::encode(Sha256::digest(&bytes)));
        let tar = zstd::decode_all(&bytes[..]).unwrap();
        assert_eq!(a.uncompressed_size, tar.len() as u64);
        let mut archive = tar::Archive::new(&tar[..]);
        let entries: Vec<(String, u32, u64, u64, tar::EntryType)> = archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                (
                    e.path().unwrap().to_string_lossy().into_owned(),
                    h.mode().unwrap(),
                    h.mtime().unwrap(),
                    h.gid().unwrap(),
                    h.entry_type(),
                )
            })
            .collect();
        assert_eq!(entries[1].0, "boot/vmlinuz-6.8.0-1-generic");
        assert_eq!(entries[1].2, 1000, "mtime clamped to SOURCE_DATE_EPOCH");
        assert_eq!(entries[1].3, 42, "group kept");
        assert!(
            entries[3].0.len() > 100 && entries[3].1 == 0o4755,
            "long name and setuid kept"
        );
        assert_eq!(entries[4].4, tar::EntryType::Symlink);
        assert_eq!(entries[5].4, tar::EntryType::Link);
    }

    #[test]
    fn compress_tar_round_trips_and_notes_facts() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(2);
        h.set_mode(0o755);
        b.append_data(&mut h, "./usr/sbin/grub-install", &b"#!"[..])
            .unwrap();
        let tar = b.into_inner().unwrap();
        fs::write(dir.path().join("in.tar"), &tar).unwrap();
        let (info, facts) = compress_tar(
            &dir.path().join("in.tar"),
            &dir.path().join("out.tar.zst"),
            &|_| {},
        )
        .unwrap();
        assert!(facts.has("usr/sbin/grub-install"));
        let out = fs::read(dir.path().join("out.tar.zst")).unwrap();
        assert_eq!(zstd::decode_all(&out[..]).unwrap(), tar);
        assert_eq!(info.uncompressed_size, tar.len() as u64);
    }
}
