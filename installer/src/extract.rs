//! Unpacking the (zstd or gzip, detected by magic) rootfs tarball onto the mounted root, keeping
//! modes, owners, mtimes, symlinks, hardlinks, device nodes and xattrs.
//!
//! `pxelab-untar` does the unpacking (beneath the root, never outside it, with few system calls
//! per entry: they are what costs in an emulated guest). Download with sha256, and decompression,
//! run on other threads ([`crate::pipeline`]).

use std::io::{self, Read};
use std::path::Path;

/// What was unpacked.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub entries: u64,
    /// Uncompressed tar bytes.
    pub tar_bytes: u64,
}

/// Counts the bytes the tar reader pulls out of the decompressor.
struct Counting<R> {
    inner: R,
    count: u64,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        Ok(n)
    }
}

/// Unpacks the (compressed) tarball `input` into `root`, downloading and decompressing on
/// other threads ([`crate::pipeline::decompressed`]). Returns `input` back, so the caller can drain and verify
/// the rest of it whatever happened here.
pub fn extract<R: Read + Send + 'static>(input: R, root: &Path) -> (io::Result<Stats>, R) {
    crate::pipeline::decompressed(input, |bytes| unpack(bytes, root))
}

fn unpack(tar_stream: &mut dyn Read, root: &Path) -> io::Result<Stats> {
    let mut counting = Counting {
        inner: tar_stream,
        count: 0,
    };
    // As root, entries keep their owners (the rootfs is root's, with a few system users').
    let summary = pxelab_untar::unpack(&mut counting, root, true)?;
    // Read the tar's trailing padding too, so the decompressor reaches its end and checks its
    // own checksum (gzip CRC, zstd content checksum) and the byte count is the whole tar.
    io::copy(&mut counting, &mut io::sink())?;
    Ok(Stats {
        entries: summary.entries,
        tar_bytes: counting.count,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use tar::EntryType;

    /// Owned by the current user, so the test runs without root.
    fn header(kind: EntryType) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        // SAFETY: getuid/getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        h.set_uid(u64::from(uid));
        h.set_gid(u64::from(gid));
        h.set_size(0);
        h
    }

    fn tarball() -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut dir = header(EntryType::Directory);
        dir.set_mode(0o750);
        dir.set_mtime(1_600_000_000);
        b.append_data(&mut dir, "etc/", io::empty()).unwrap();
        let mut f = header(EntryType::Regular);
        f.set_mode(0o640);
        f.set_size(5);
        f.set_mtime(1_600_000_001);
        b.append_data(&mut f, "etc/a", &b"hello"[..]).unwrap();
        let mut l = header(EntryType::Symlink);
        b.append_link(&mut l, "etc/b", "a").unwrap();
        let mut h = header(EntryType::Link);
        b.append_link(&mut h, "etc/c", "etc/a").unwrap();
        let mut fifo = header(EntryType::Fifo);
        fifo.set_mode(0o600);
        b.append_data(&mut fifo, "run/initctl", io::empty())
            .unwrap();
        b.into_inner().unwrap()
    }

    fn check_tree(root: &Path) {
        assert_eq!(std::fs::read(root.join("etc/a")).unwrap(), b"hello");
        assert_eq!(
            std::fs::read_link(root.join("etc/b")).unwrap(),
            Path::new("a")
        );
        let a = std::fs::metadata(root.join("etc/a")).unwrap();
        assert_eq!(a.permissions().mode() & 0o7777, 0o640);
        assert_eq!(
            a.ino(),
            std::fs::metadata(root.join("etc/c")).unwrap().ino(),
            "hardlink"
        );
        let etc = std::fs::metadata(root.join("etc")).unwrap();
        assert_eq!(etc.permissions().mode() & 0o7777, 0o750);
        assert_eq!(
            etc.mtime(),
            1_600_000_000,
            "directory mtime applied after its contents"
        );
        let fifo = std::fs::symlink_metadata(root.join("run/initctl")).unwrap();
        assert!(std::os::unix::fs::FileTypeExt::is_fifo(&fifo.file_type()));
    }

    #[test]
    fn unpacks_zstd_and_gzip_alike() {
        let tar = tarball();
        let zst = zstd::encode_all(&tar[..], 3).unwrap();
        let t = tempfile::tempdir().unwrap();
        let stats = extract(io::Cursor::new(zst), t.path()).0.unwrap();
        assert_eq!(stats.entries, 5);
        assert_eq!(stats.tar_bytes as usize, tar.len());
        check_tree(t.path());

        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        io::Write::write_all(&mut gz, &tar).unwrap();
        let gz = gz.finish().unwrap();
        let t = tempfile::tempdir().unwrap();
        extract(io::Cursor::new(gz), t.path()).0.unwrap();
        check_tree(t.path());
    }

    #[test]
    fn rejects_unknown_formats() {
        let t = tempfile::tempdir().unwrap();
        let (result, _) = extract(io::Cursor::new(b"PK\x03\x04rest".to_vec()), t.path());
        let e = result.unwrap_err();
        assert!(
            e.to_string()
                .contains("neither zstd nor gzip (starts with 504b0304)"),
            "{e}"
        );
    }
}
