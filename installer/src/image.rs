//! The block-image install: the distro's ext4 image (`rootfs.img.zst`) written onto the root
//! partition, then given the install's own UUID and label (`tune2fs`) and grown to the
//! partition (`resize2fs`).
//!
//! Why an image: in an emulated guest, creating some 15,000 files and their directories costs
//! more than the decompression itself; writing the same tree as blocks is a few hundred large
//! writes. They go around the page cache (`O_DIRECT`), so the guest copies nothing twice.
//! Download, sha256 and decompression run on other threads, frames of the image on every CPU
//! ([`crate::pipeline`]).
//!
//! Runs of zeros (free space, empty inode tables, the fresh journal: a third of the image) are
//! not written but zeroed by the disk (`FALLOC_FL_ZERO_RANGE`, a write-zeroes request that
//! costs nothing on a thin-provisioned disk), so the partition ends up equal to the image
//! whatever it held before.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use crate::cmd;
use crate::error::{human_bytes, Context, Result};

/// How much is read and written at once.
const BLOCK: usize = 1 << 20;
/// The granularity at which zeros are told from data (a multiple of every sector size).
const PIECE: usize = 64 << 10;
/// `O_DIRECT` needs buffers (and offsets and lengths) aligned to the logical sector size.
const ALIGN: usize = 4096;

/// What was written, and where the time went.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Written {
    /// The image's size (what the partition now starts with).
    pub image: u64,
    /// Of that, bytes written as data; the rest was zeroed.
    pub data: u64,
    /// Seconds spent waiting for decompressed bytes, writing data and zeroing.
    pub waiting: f64,
    pub writing: f64,
    pub zeroing: f64,
}

/// One 4 KiB-aligned page; a `Vec` of them is an aligned buffer without a custom allocator.
#[derive(Clone, Copy)]
#[repr(C, align(4096))]
struct Page([u8; ALIGN]);

/// Writes the decompressed image read from `image` onto `device`, from its first byte.
pub fn write(image: &mut dyn Read, device: &Path) -> io::Result<Written> {
    let mut dev = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(device)?;
    let capacity = dev.seek(SeekFrom::End(0))?;
    let mut pages = vec![Page([0; ALIGN]); BLOCK / ALIGN];
    // SAFETY: `pages` is BLOCK contiguous initialized bytes (Page is a plain byte array with no
    // padding), borrowed mutably for as long as `buf` lives.
    let buf = unsafe { std::slice::from_raw_parts_mut(pages.as_mut_ptr().cast::<u8>(), BLOCK) };
    let mut written = Written::default();
    let mut zeros: Option<(u64, u64)> = None;
    loop {
        let clock = Instant::now();
        let n = crate::pipeline::read_full(image, buf)?;
        written.waiting += clock.elapsed().as_secs_f64();
        if n == 0 {
            break;
        }
        if written.image == 0 {
            let size = ext4_size(&buf[..n])?;
            if size > capacity {
                return Err(invalid(format!(
                    "the image's filesystem is {} but {} is only {}",
                    human_bytes(size),
                    device.display(),
                    human_bytes(capacity)
                )));
            }
        }
        if n % ALIGN != 0 {
            return Err(invalid(format!(
                "the image ends {n} bytes into a block: not a whole number of 4 KiB blocks"
            )));
        }
        for (start, len, data) in runs(&buf[..n]) {
            let at = written.image + start as u64;
            if data {
                if let Some((from, to)) = zeros.take() {
                    zero_range(&dev, from, to - from, &mut written)?;
                }
                let clock = Instant::now();
                dev.write_all_at(&buf[start..start + len], at)?;
                written.writing += clock.elapsed().as_secs_f64();
                written.data += len as u64;
            } else {
                zeros = match zeros {
                    Some((from, to)) if to == at => Some((from, at + len as u64)),
                    Some((from, to)) => {
                        zero_range(&dev, from, to - from, &mut written)?;
                        Some((at, at + len as u64))
                    }
                    None => Some((at, at + len as u64)),
                };
            }
        }
        written.image += n as u64;
    }
    if let Some((from, to)) = zeros {
        zero_range(&dev, from, to - from, &mut written)?;
    }
    let clock = Instant::now();
    dev.sync_all()?;
    written.writing += clock.elapsed().as_secs_f64();
    Ok(written)
}

/// Gives the written filesystem the install's UUID and label, then grows it to the partition.
/// The image's own UUID is the same for every machine that installs it.
pub fn adopt(device: &Path, uuid: &str, label: &str) -> Result<()> {
    let hint = "the initrd needs tune2fs and resize2fs from e2fsprogs";
    cmd::run(
        Command::new("tune2fs")
            .args(["-U", uuid, "-L", label])
            .arg(device),
        None,
        hint,
    )
    .context(|| format!("setting the UUID of {}", device.display()))?;
    cmd::run(Command::new("resize2fs").arg(device), None, hint)
        .context(|| format!("growing the filesystem on {}", device.display()))?;
    Ok(())
}

/// Consecutive [`PIECE`]s of `buf` that are all zero or all data, as (start, length, is data).
fn runs(buf: &[u8]) -> Vec<(usize, usize, bool)> {
    let mut out: Vec<(usize, usize, bool)> = Vec::new();
    for (i, piece) in buf.chunks(PIECE).enumerate() {
        let data = has_data(piece);
        match out.last_mut() {
            Some((_, len, kind)) if *kind == data => *len += piece.len(),
            _ => out.push((i * PIECE, piece.len(), data)),
        }
    }
    out
}

/// The size an ext4 superblock (at byte 1024 of `head`) declares, after checking its magic.
fn ext4_size(head: &[u8]) -> io::Result<u64> {
    let sb = head
        .get(1024..2048)
        .ok_or_else(|| invalid("the image is shorter than an ext4 superblock".into()))?;
    let u32_at = |o: usize| u32::from_le_bytes([sb[o], sb[o + 1], sb[o + 2], sb[o + 3]]);
    if u16::from_le_bytes([sb[0x38], sb[0x39]]) != 0xef53 {
        return Err(invalid(
            "the image is not an ext4 filesystem (no superblock magic)".into(),
        ));
    }
    const INCOMPAT_64BIT: u32 = 0x80;
    let high = if u32_at(0x60) & INCOMPAT_64BIT != 0 {
        u64::from(u32_at(0x150))
    } else {
        0
    };
    let blocks = high << 32 | u64::from(u32_at(0x04));
    let block_size = 1024u64 << u32_at(0x18).min(6);
    Ok(blocks * block_size)
}

/// Whether `piece` holds anything but zeros, a word at a time: an emulated CPU runs this for
/// every byte of the image.
fn has_data(piece: &[u8]) -> bool {
    let words = piece.chunks_exact(8);
    let tail = words.remainder();
    words
        .map(|w| u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]))
        .any(|w| w != 0)
        || tail.iter().any(|&b| b != 0)
}

fn zero_range(dev: &File, offset: u64, len: u64, written: &mut Written) -> io::Result<()> {
    let clock = Instant::now();
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(invalid("a range beyond 2^63 bytes".into()));
    };
    // SAFETY: fallocate only reads its scalar arguments; the descriptor is open for writing.
    let rc = unsafe {
        libc::fallocate(
            dev.as_raw_fd(),
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("zeroing {len} bytes at {offset}: {e}"),
        ));
    }
    written.zeroing += clock.elapsed().as_secs_f64();
    Ok(())
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeros_and_data_alternate_in_whole_pieces() {
        let mut buf = vec![0u8; 4 * PIECE + ALIGN];
        buf[PIECE + 7] = 1;
        buf[2 * PIECE] = 1;
        buf[4 * PIECE + 1] = 9;
        assert_eq!(
            runs(&buf),
            vec![
                (0, PIECE, false),
                (PIECE, 2 * PIECE, true),
                (3 * PIECE, PIECE, false),
                (4 * PIECE, ALIGN, true),
            ]
        );
        assert_eq!(runs(&[0u8; ALIGN]), vec![(0, ALIGN, false)]);
    }

    #[test]
    fn the_superblock_gives_the_size_and_rejects_other_data() {
        let mut head = vec![0u8; 4096];
        head[1024 + 0x38..1024 + 0x3a].copy_from_slice(&0xef53u16.to_le_bytes());
        head[1024 + 0x04..1024 + 0x08].copy_from_slice(&178176u32.to_le_bytes());
        head[1024 + 0x18..1024 + 0x1c].copy_from_slice(&2u32.to_le_bytes());
        assert_eq!(ext4_size(&head).unwrap(), 178176 * 4096);
        head[1024 + 0x60] = 0x80;
        head[1024 + 0x150] = 1;
        assert_eq!(ext4_size(&head).unwrap(), (1u64 << 32 | 178176) * 4096);
        head[1024 + 0x38] = 0;
        let e = ext4_size(&head).unwrap_err();
        assert!(e.to_string().contains("not an ext4 filesystem"), "{e}");
        assert!(ext4_size(&head[..1500]).is_err());
    }
}
