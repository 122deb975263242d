//! Unpacking the (zstd or gzip, detected by magic) rootfs tarball onto the mounted root, keeping
//! modes, owners, mtimes, symlinks, hardlinks, device nodes and xattrs.
//!
//! `pxelab-untar` does the unpacking (beneath the root, never outside it, with few system calls
//! per entry: they are what costs in an emulated guest). Download with sha256, and decompression,
//! run on two more threads.

use std::io::{self, Read};
use std::path::Path;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::time::{Duration, Instant};

/// How the tarball is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Zstd,
    Gzip,
}

pub fn detect(magic: &[u8]) -> Option<Compression> {
    match magic {
        [0x28, 0xb5, 0x2f, 0xfd, ..] => Some(Compression::Zstd),
        [0x1f, 0x8b, ..] => Some(Compression::Gzip),
        _ => None,
    }
}

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

/// Size of the chunks handed from one thread to the next.
const CHUNK: usize = 256 << 10;
/// Chunks in flight between two threads: bounds memory (4 MiB) while letting both run.
const IN_FLIGHT: usize = 16;

/// Unpacks the (compressed) tarball `input` into `root`, downloading and decompressing on
/// other threads ([`decompressed`]). Returns `input` back, so the caller can drain and verify
/// the rest of it whatever happened here.
pub fn extract<R: Read + Send + 'static>(input: R, root: &Path) -> (io::Result<Stats>, R) {
    decompressed(input, |bytes| unpack(bytes, root))
}

/// Runs `consume` on the decompressed bytes of `input`, a pipeline of three threads: one reads
/// `input` (for the installer: the download and its sha256), one decompresses, and this one
/// consumes. In an emulated guest each stage costs seconds of CPU, and the guest has two
/// vCPUs. Returns `input` back, as [`extract`] does.
pub fn decompressed<R: Read + Send + 'static, T>(
    input: R,
    consume: impl FnOnce(&mut dyn Read) -> io::Result<T>,
) -> (io::Result<T>, R) {
    let (raw_tx, raw_rx) = mpsc::sync_channel::<io::Result<Vec<u8>>>(IN_FLIGHT);
    let reader = std::thread::spawn(move || {
        let mut input = input;
        let mut busy = Duration::ZERO;
        if let Err(e) = pump(&mut input, &raw_tx, &mut busy) {
            let _ = raw_tx.send(Err(e));
        }
        (input, busy)
    });
    let (tx, rx) = mpsc::sync_channel::<io::Result<Vec<u8>>>(IN_FLIGHT);
    let decompressor = std::thread::spawn(move || {
        let mut raw = Chunks::new(raw_rx);
        let mut busy = Duration::ZERO;
        if let Err(e) = decompress(&mut raw, &tx, &mut busy) {
            let _ = tx.send(Err(e));
        }
        busy.saturating_sub(raw.waited)
    });
    // Each receiver is dropped when its stage returns, which stops the stages before it early
    // on failure.
    let mut bytes = Chunks::new(rx);
    let result = consume(&mut bytes);
    let decompressing = match decompressor.join() {
        Ok(busy) => busy,
        Err(panic) => std::panic::resume_unwind(panic),
    };
    match reader.join() {
        Ok((input, reading)) => {
            crate::say!(
                "pipeline: reading {:.1} s, decompressing {:.1} s, the last stage waited {:.1} s",
                reading.as_secs_f64(),
                decompressing.as_secs_f64(),
                bytes.waited.as_secs_f64()
            );
            (result, input)
        }
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Detects the compression by magic and sends the decompressed bytes in chunks, until the end
/// or until the receiver hangs up.
fn decompress(
    input: &mut impl Read,
    tx: &SyncSender<io::Result<Vec<u8>>>,
    busy: &mut Duration,
) -> io::Result<()> {
    let mut magic = [0u8; 4];
    let mut got = 0;
    while got < magic.len() {
        match input.read(&mut magic[got..])? {
            0 => break,
            n => got += n,
        }
    }
    let whole = io::Cursor::new(magic[..got].to_vec()).chain(input);
    let mut decoder: Box<dyn Read + '_> = match detect(&magic[..got]) {
        Some(Compression::Zstd) => Box::new(zstd::stream::read::Decoder::new(whole)?),
        Some(Compression::Gzip) => Box::new(flate2::read::MultiGzDecoder::new(whole)),
        None => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the rootfs is neither zstd nor gzip (starts with {})",
                    hex::encode(&magic[..got])
                ),
            ))
        }
    };
    pump(&mut decoder, tx, busy)
}

/// Sends what `source` reads in chunks, until its end or until the receiver hangs up; adds the
/// time spent reading to `busy`.
fn pump(
    source: &mut dyn Read,
    tx: &SyncSender<io::Result<Vec<u8>>>,
    busy: &mut Duration,
) -> io::Result<()> {
    loop {
        let mut chunk = vec![0u8; CHUNK];
        let clock = Instant::now();
        let filled = read_full(source, &mut chunk);
        *busy += clock.elapsed();
        let filled = filled?;
        if filled == 0 {
            return Ok(());
        }
        chunk.truncate(filled);
        if tx.send(Ok(chunk)).is_err() {
            return Ok(());
        }
    }
}

/// Reads until `buf` is full or `r` ends; how much was read.
pub fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// The receiving end as a `Read`: the producer's error becomes this reader's error; the
/// producer hanging up after its last chunk is the end of the stream.
struct Chunks {
    rx: Receiver<io::Result<Vec<u8>>>,
    chunk: Vec<u8>,
    pos: usize,
    /// How long reads waited for the stage before.
    waited: Duration,
}

impl Chunks {
    fn new(rx: Receiver<io::Result<Vec<u8>>>) -> Chunks {
        Chunks {
            rx,
            chunk: Vec::new(),
            pos: 0,
            waited: Duration::ZERO,
        }
    }
}

impl Read for Chunks {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.chunk.len() {
            let clock = Instant::now();
            let next = self.rx.recv();
            self.waited += clock.elapsed();
            match next {
                Ok(Ok(chunk)) => {
                    self.chunk = chunk;
                    self.pos = 0;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len() - self.pos);
        buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
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

    #[test]
    fn detects_by_magic() {
        assert_eq!(detect(&[0x28, 0xb5, 0x2f, 0xfd]), Some(Compression::Zstd));
        assert_eq!(detect(&[0x1f, 0x8b, 8, 0]), Some(Compression::Gzip));
        assert_eq!(detect(b"ustar"), None);
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
