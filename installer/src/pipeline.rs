//! The decompression pipeline behind both installs: one thread reads the download (and hashes
//! it), one cuts it up or decompresses it, workers decompress frames, and the caller consumes
//! the bytes in order. In an emulated guest each stage costs seconds of CPU, and the guest has
//! two vCPUs or more.
//!
//! A zstd stream cut into independent frames of at most [`DISK_IMAGE_FRAME`] bytes of content
//! (the pipeline writes `rootfs.img.zst` that way) is decompressed a frame per worker, frame
//! `i` by worker `i % workers`, and the consumer takes the results in the same turn, so the
//! order needs no bookkeeping. Any other stream (the tarball, a gzip, an older image) is
//! decompressed by the cutting thread and passed through the workers as it is.

use std::io::{self, Read};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::time::{Duration, Instant};

use pxelab_contract::DISK_IMAGE_FRAME;
use zstd::zstd_safe;

/// How the input is compressed.
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

/// Size of the chunks the reader hands on (and of decompressed chunks of a plain stream).
const CHUNK: usize = 256 << 10;
/// Chunks in flight from the reader: bounds memory (4 MiB) while letting both run.
const IN_FLIGHT: usize = 16;
/// Work queued per worker: with one result waiting and one being made, at most four frames'
/// worth of memory per worker (64 MiB).
const QUEUED: usize = 2;
/// Enough of a stream to hold a zstd frame header (`ZSTD_FRAMEHEADERSIZE_MAX`).
const HEADER: usize = 18;
/// A frame of at most [`DISK_IMAGE_FRAME`] bytes compresses to less than this, whatever its
/// bytes; a longer run without a whole frame is not such a stream.
const MAX_COMPRESSED_FRAME: usize = DISK_IMAGE_FRAME + (DISK_IMAGE_FRAME >> 4);

type Chunk = io::Result<Vec<u8>>;

/// What the cutting thread hands a worker.
enum Work {
    /// One whole zstd frame of at most [`DISK_IMAGE_FRAME`] bytes of content.
    Frame(Vec<u8>),
    /// Bytes already decompressed, to pass on.
    Plain(Vec<u8>),
    Failed(io::Error),
}

/// Runs `consume` on the decompressed bytes of `input` (see the module's description). Returns
/// `input` back, so the caller can drain and verify the rest of it whatever happened here.
pub fn decompressed<R: Read + Send + 'static, T>(
    input: R,
    consume: impl FnOnce(&mut dyn Read) -> io::Result<T>,
) -> (io::Result<T>, R) {
    let (raw_tx, raw_rx) = mpsc::sync_channel::<Chunk>(IN_FLIGHT);
    let reader = std::thread::spawn(move || {
        let mut input = input;
        let mut busy = Duration::ZERO;
        if let Err(e) = pump(
            &mut input,
            &mut |chunk| raw_tx.send(chunk).is_ok(),
            &mut busy,
        ) {
            let _ = raw_tx.send(Err(e));
        }
        (input, busy)
    });
    let count = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 4));
    let (mut work, mut results, mut workers) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..count {
        let (work_tx, work_rx) = mpsc::sync_channel::<Work>(QUEUED);
        let (result_tx, result_rx) = mpsc::sync_channel::<Chunk>(1);
        workers.push(std::thread::spawn(move || {
            decompress_frames(work_rx, result_tx)
        }));
        work.push(work_tx);
        results.push(result_rx);
    }
    let cutter = std::thread::spawn(move || {
        let mut turns = Turns { work, next: 0 };
        let mut raw = Chunks::new(vec![raw_rx]);
        let mut cut = Cut::default();
        if let Err(e) = cut_up(&mut raw, &mut turns, &mut cut) {
            turns.send(Work::Failed(e));
        }
        cut.busy = cut.busy.saturating_sub(raw.waited);
        cut
    });
    let mut bytes = Chunks::new(results);
    let result = consume(&mut bytes);
    let waited = bytes.waited;
    // Hanging up stops every stage before this one, however far it got.
    drop(bytes);
    let cut = join(cutter);
    let decompressing: Duration = workers.into_iter().map(join).sum::<Duration>() + cut.busy;
    let (input, reading) = join(reader);
    let how = match cut.frames {
        0 => String::new(),
        n => format!(" ({n} frames on {count} threads)"),
    };
    crate::say!(
        "pipeline: reading {:.1} s, decompressing {:.1} s{how}, the last stage waited {:.1} s",
        reading.as_secs_f64(),
        decompressing.as_secs_f64(),
        waited.as_secs_f64()
    );
    (result, input)
}

fn join<T>(thread: std::thread::JoinHandle<T>) -> T {
    thread
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// What the cutting thread did: frames handed out, or time spent decompressing a plain stream.
#[derive(Default)]
struct Cut {
    frames: u64,
    busy: Duration,
}

/// Hands out work to the workers in turn.
struct Turns {
    work: Vec<SyncSender<Work>>,
    next: usize,
}

impl Turns {
    /// Whether the worker (and so the consumer) still listens.
    fn send(&mut self, item: Work) -> bool {
        let sent = self.work[self.next].send(item).is_ok();
        self.next = (self.next + 1) % self.work.len();
        sent
    }
}

/// Detects the compression by magic; cuts a stream of small zstd frames into frames for the
/// workers, and decompresses any other stream itself.
fn cut_up(input: &mut Chunks, turns: &mut Turns, cut: &mut Cut) -> io::Result<()> {
    let mut head = vec![0u8; HEADER];
    let got = read_full(input, &mut head)?;
    head.truncate(got);
    let framed = matches!(
        zstd_safe::get_frame_content_size(&head),
        Ok(Some(n)) if n <= DISK_IMAGE_FRAME as u64
    );
    let whole = io::Cursor::new(head.clone()).chain(input);
    let mut decoder: Box<dyn Read + '_> = match detect(&head) {
        Some(Compression::Zstd) if framed => {
            return cut_frames(head, whole.into_inner().1, turns, cut);
        }
        Some(Compression::Zstd) => Box::new(zstd::stream::read::Decoder::new(whole)?),
        Some(Compression::Gzip) => Box::new(flate2::read::MultiGzDecoder::new(whole)),
        None => {
            return Err(invalid(format!(
                "the rootfs is neither zstd nor gzip (starts with {})",
                hex::encode(&head[..head.len().min(4)])
            )))
        }
    };
    pump(
        &mut decoder,
        &mut |chunk| match chunk {
            Ok(bytes) => turns.send(Work::Plain(bytes)),
            Err(e) => turns.send(Work::Failed(e)),
        },
        &mut cut.busy,
    )
}

/// Hands each whole frame of `input` (which starts with `buf`) to the next worker.
fn cut_frames(
    mut buf: Vec<u8>,
    input: &mut Chunks,
    turns: &mut Turns,
    cut: &mut Cut,
) -> io::Result<()> {
    loop {
        match zstd_safe::find_frame_compressed_size(&buf) {
            Ok(n) if n <= buf.len() => {
                let rest = buf.split_off(n);
                let frame = std::mem::replace(&mut buf, rest);
                cut.frames += 1;
                if !turns.send(Work::Frame(frame)) {
                    return Ok(());
                }
            }
            _ if buf.len() > MAX_COMPRESSED_FRAME => {
                return Err(invalid(format!(
                    "no whole zstd frame in {} bytes of the image: the stream is corrupt",
                    buf.len()
                )))
            }
            _ => {
                let before = buf.len();
                buf.resize(before + CHUNK, 0);
                let n = read_full(input, &mut buf[before..])?;
                buf.truncate(before + n);
                if n == 0 {
                    return match buf.is_empty() {
                        true => Ok(()),
                        false => Err(invalid("the image ends inside a zstd frame")),
                    };
                }
            }
        }
    }
}

/// A worker: decompresses the frames it is handed and passes everything else on. Returns the
/// time spent decompressing.
fn decompress_frames(work: Receiver<Work>, results: SyncSender<Chunk>) -> Duration {
    let mut busy = Duration::ZERO;
    for item in work {
        let result = match item {
            Work::Plain(bytes) => Ok(bytes),
            Work::Failed(e) => Err(e),
            Work::Frame(frame) => {
                let clock = Instant::now();
                let bytes = decompress_frame(&frame);
                busy += clock.elapsed();
                bytes
            }
        };
        if results.send(result).is_err() {
            break;
        }
    }
    busy
}

/// One frame's content, its checksum verified.
fn decompress_frame(frame: &[u8]) -> io::Result<Vec<u8>> {
    match zstd_safe::get_frame_content_size(frame) {
        Ok(Some(size)) if size <= DISK_IMAGE_FRAME as u64 => {
            zstd::bulk::decompress(frame, size as usize)
        }
        _ => Err(invalid(format!(
            "a zstd frame of the image does not say its size or holds more than {DISK_IMAGE_FRAME} bytes"
        ))),
    }
}

fn invalid(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.into())
}

/// Sends what `source` reads in chunks until its end (or until `send` says nobody listens);
/// adds the time spent reading to `busy`.
fn pump(
    source: &mut dyn Read,
    send: &mut dyn FnMut(Chunk) -> bool,
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
        if !send(Ok(chunk)) {
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

/// The receiving ends as one `Read`, taking a chunk from each in turn: a producer's error
/// becomes this reader's error; the producer whose turn it is hanging up is the end.
struct Chunks {
    rxs: Vec<Receiver<Chunk>>,
    next: usize,
    chunk: Vec<u8>,
    pos: usize,
    /// How long reads waited for the stage before.
    waited: Duration,
}

impl Chunks {
    fn new(rxs: Vec<Receiver<Chunk>>) -> Chunks {
        Chunks {
            rxs,
            next: 0,
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
            let next = self.rxs[self.next].recv();
            self.waited += clock.elapsed();
            self.next = (self.next + 1) % self.rxs.len();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_by_magic() {
        assert_eq!(detect(&[0x28, 0xb5, 0x2f, 0xfd]), Some(Compression::Zstd));
        assert_eq!(detect(&[0x1f, 0x8b, 8, 0]), Some(Compression::Gzip));
        assert_eq!(detect(b"ustar"), None);
    }

    /// Bytes that compress a little, differ from frame to frame, and have runs of zeros.
    fn image(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| match (i / 4096) % 5 {
                0 => 0,
                k => ((i * 31 + i / 977) % 251) as u8 ^ k as u8,
            })
            .collect()
    }

    /// `data` as the pipeline writes the disk image: one frame per `frame` bytes.
    fn framed(data: &[u8], frame: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for piece in data.chunks(frame) {
            let mut e = zstd::stream::write::Encoder::new(&mut out, 3).unwrap();
            e.set_pledged_src_size(Some(piece.len() as u64)).unwrap();
            e.include_contentsize(true).unwrap();
            e.include_checksum(true).unwrap();
            io::Write::write_all(&mut e, piece).unwrap();
            e.finish().unwrap();
        }
        out
    }

    fn all(input: Vec<u8>) -> io::Result<Vec<u8>> {
        decompressed(io::Cursor::new(input), |r| {
            let mut out = Vec::new();
            r.read_to_end(&mut out).map(|_| out)
        })
        .0
    }

    #[test]
    fn frames_and_plain_streams_come_out_whole_and_in_order() {
        let data = image(5 * 1024 * 1024 + 12345);
        // Frames of 1 MiB: six of them, taken by the workers in turn.
        assert!(all(framed(&data, 1 << 20)).unwrap() == data);
        // One frame without a content size (the tarball, an older image): one thread.
        assert!(all(zstd::encode_all(&data[..], 3).unwrap()).unwrap() == data);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        io::Write::write_all(&mut gz, &data).unwrap();
        assert!(all(gz.finish().unwrap()).unwrap() == data);
        assert!(all(Vec::new())
            .unwrap_err()
            .to_string()
            .contains("neither zstd nor gzip"));
    }

    #[test]
    fn frames_go_to_the_workers_in_turn_and_other_streams_as_decompressed_bytes() {
        let data = image(3 << 20);
        let cut = |input: Vec<u8>| {
            let (tx, rx) = mpsc::sync_channel(1);
            tx.send(Ok(input)).unwrap();
            drop(tx);
            let (queues, work): (Vec<_>, Vec<_>) = (0..2).map(|_| mpsc::sync_channel(64)).unzip();
            let mut turns = Turns {
                work: queues,
                next: 0,
            };
            let mut cut = Cut::default();
            cut_up(&mut Chunks::new(vec![rx]), &mut turns, &mut cut).unwrap();
            drop(turns);
            let kinds: Vec<Vec<bool>> = work
                .into_iter()
                .map(|r: Receiver<Work>| r.iter().map(|w| matches!(w, Work::Frame(_))).collect())
                .collect();
            (cut.frames, kinds)
        };
        assert_eq!(
            cut(framed(&data, 1 << 20)),
            (3, vec![vec![true, true], vec![true]])
        );
        let (frames, plain) = cut(zstd::encode_all(&data[..], 3).unwrap());
        assert_eq!(frames, 0);
        assert_eq!(plain.concat().len(), (3 << 20) / CHUNK);
        assert!(plain.concat().iter().all(|frame| !frame));
    }

    #[test]
    fn a_damaged_or_cut_frame_is_an_error_not_short_output() {
        let data = image(3 << 20);
        let good = framed(&data, 1 << 20);
        let cut = good[..good.len() - 100].to_vec();
        let e = all(cut).unwrap_err();
        assert!(e.to_string().contains("ends inside a zstd frame"), "{e}");
        // A flipped byte in the middle frame's data: its checksum (or its blocks) fail.
        let mut bad = good.clone();
        let second = zstd_safe::find_frame_compressed_size(&good).unwrap();
        bad[second + 200] ^= 0x55;
        assert!(all(bad).is_err());
    }

    #[test]
    fn a_consumer_that_stops_early_does_not_hang_the_stages() {
        let data = image(8 << 20);
        let (result, _) = decompressed(io::Cursor::new(framed(&data, 1 << 20)), |r| {
            let mut first = vec![0u8; 100];
            r.read_exact(&mut first)?;
            Err::<(), _>(io::Error::other("the disk failed"))
        });
        assert_eq!(result.unwrap_err().to_string(), "the disk failed");
    }
}
