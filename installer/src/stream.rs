//! The rootfs byte stream: a `Read` that survives dropped connections and verifies what it read.
//!
//! [`VerifiedStream`] hands out the artifact's bytes exactly once and in order. When the
//! connection drops or stalls, it re-requests from the byte offset already consumed (`Range:
//! bytes=<consumed>-`), so the decompressor reading from it never notices. Every byte goes
//! through sha256; [`VerifiedStream::finish`] drains whatever the consumer left unread and
//! compares size and digest with the config. Nothing may treat the install as good before that.

use std::io::{self, Read};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::http::{Backoff, Http};
use crate::say;

/// Opens the artifact positioned at a byte offset.
pub trait Source {
    fn open(&mut self, offset: u64) -> Result<Box<dyn Read + Send>, OpenError>;
}

/// Why [`Source::open`] failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenError {
    /// Worth retrying (connection refused, reset, 5xx).
    Retry(String),
    /// Retrying cannot help (404, the server disagrees with the config about the size).
    Fatal(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    #[error("sha256 mismatch: downloaded {actual}, the config pins {expected} (corrupt download or changed artifact)")]
    HashMismatch { expected: String, actual: String },
    #[error("{0}")]
    Source(String),
    #[error(
        "download failed {attempts} times in a row at byte {offset} of {size}; last error: {last}"
    )]
    GaveUp {
        attempts: u32,
        offset: u64,
        size: u64,
        last: String,
    },
    #[error("the server sent more than the {size} bytes the config pins")]
    TooLong { size: u64 },
}

/// What a completed, verified stream delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub bytes: u64,
    /// How many times the stream had to reconnect.
    pub reconnects: u32,
    /// Time spent in sha256 (in an emulated guest without SHA instructions it is a fifth of
    /// the stream's CPU: said in the rootfs event, so each install shows it).
    pub hashing: Duration,
}

pub type Progress = Box<dyn FnMut(u64) + Send>;

pub struct VerifiedStream<S: Source> {
    source: S,
    body: Option<Box<dyn Read + Send>>,
    size: u64,
    expected_sha256: String,
    consumed: u64,
    hasher: Sha256,
    hashing: Duration,
    retries: u32,
    backoff: Backoff,
    /// Failures since the last byte received; reset by progress.
    failures: u32,
    reconnects: u32,
    fatal: Option<StreamError>,
    progress: Option<Progress>,
}

impl<S: Source> VerifiedStream<S> {
    /// `retries` bounds consecutive failures without progress; a connection that keeps delivering
    /// bytes before dropping is always resumed.
    pub fn new(
        source: S,
        size: u64,
        expected_sha256: &str,
        retries: u32,
        backoff: Backoff,
    ) -> Self {
        VerifiedStream {
            source,
            body: None,
            size,
            expected_sha256: expected_sha256.to_ascii_lowercase(),
            consumed: 0,
            hasher: Sha256::new(),
            hashing: Duration::ZERO,
            retries,
            backoff,
            failures: 0,
            reconnects: 0,
            fatal: None,
            progress: None,
        }
    }

    /// Called with the byte count after every read.
    pub fn on_progress(&mut self, f: Progress) {
        self.progress = Some(f);
    }

    /// The error that stopped the stream, if any.
    #[cfg(test)]
    pub fn failure(&self) -> Option<&StreamError> {
        self.fatal.as_ref()
    }

    /// Reads the rest of the artifact (the decompressor may stop before the end, e.g. at tar's
    /// end-of-archive blocks), then checks that nothing follows and that the digest matches.
    pub fn finish(&mut self) -> Result<Summary, StreamError> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match self.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    return Err(self
                        .fatal
                        .clone()
                        .unwrap_or(StreamError::Source(e.to_string())))
                }
            }
        }
        if let Some(body) = self.body.as_mut() {
            let mut extra = [0u8; 1];
            if matches!(body.read(&mut extra), Ok(n) if n > 0) {
                return Err(self.fail(StreamError::TooLong { size: self.size }));
            }
        }
        let actual = hex::encode(self.hasher.clone().finalize());
        if actual != self.expected_sha256 {
            return Err(self.fail(StreamError::HashMismatch {
                expected: self.expected_sha256.clone(),
                actual,
            }));
        }
        Ok(Summary {
            bytes: self.consumed,
            reconnects: self.reconnects,
            hashing: self.hashing,
        })
    }

    fn fail(&mut self, e: StreamError) -> StreamError {
        self.body = None;
        self.fatal = Some(e.clone());
        e
    }

    /// Drops the connection and waits before the next attempt, or gives up.
    fn lost(&mut self, why: String) -> io::Result<()> {
        self.body = None;
        if self.failures >= self.retries {
            let e = StreamError::GaveUp {
                attempts: self.failures + 1,
                offset: self.consumed,
                size: self.size,
                last: why,
            };
            return Err(io::Error::other(self.fail(e)));
        }
        let pause = self.backoff.delay(self.failures);
        self.failures += 1;
        self.reconnects += 1;
        let pct = percent(self.consumed, self.size);
        say!(
            "rootfs: {why}; resuming at byte {} ({pct:.1} %) in {:.1} s (retry {}/{})",
            self.consumed,
            pause.as_secs_f64(),
            self.failures,
            self.retries
        );
        std::thread::sleep(pause);
        Ok(())
    }
}

impl<S: Source> Read for VerifiedStream<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(e) = &self.fatal {
            return Err(io::Error::other(e.clone()));
        }
        let remaining = self.size - self.consumed;
        if remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(remaining).unwrap_or(usize::MAX));
        loop {
            let body = match self.body.as_mut() {
                Some(body) => body,
                None => match self.source.open(self.consumed) {
                    Ok(body) => self.body.insert(body),
                    Err(OpenError::Fatal(msg)) => {
                        return Err(io::Error::other(self.fail(StreamError::Source(msg))))
                    }
                    Err(OpenError::Retry(msg)) => {
                        self.lost(msg)?;
                        continue;
                    }
                },
            };
            match body.read(&mut buf[..want]) {
                Ok(0) => {
                    let why = format!(
                        "connection closed early at byte {} of {}",
                        self.consumed, self.size
                    );
                    self.lost(why)?;
                }
                Ok(n) => {
                    let clock = Instant::now();
                    self.hasher.update(&buf[..n]);
                    self.hashing += clock.elapsed();
                    self.consumed += n as u64;
                    self.failures = 0;
                    if let Some(progress) = self.progress.as_mut() {
                        progress(self.consumed);
                    }
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => self.lost(format!("connection lost: {e}"))?,
            }
        }
    }
}

fn percent(done: u64, total: u64) -> f64 {
    if total == 0 {
        100.0
    } else {
        done as f64 * 100.0 / total as f64
    }
}

/// The artifact over HTTP: `200` for the first request, `206` with the exact `Content-Range`
/// for resumes.
pub struct HttpSource {
    http: Http,
    url: String,
    size: u64,
}

impl HttpSource {
    pub fn new(http: Http, url: &str, size: u64) -> HttpSource {
        HttpSource {
            http,
            url: url.to_string(),
            size,
        }
    }
}

impl Source for HttpSource {
    fn open(&mut self, offset: u64) -> Result<Box<dyn Read + Send>, OpenError> {
        let (url, size) = (&self.url, self.size);
        let opened = self.http.open(url, offset).map_err(OpenError::Retry)?;
        match opened.status {
            200 => {
                if let Some(len) = opened.content_length.filter(|len| *len != size) {
                    return Err(OpenError::Fatal(format!(
                        "{url} is {len} bytes but the config pins {size}: the artifact changed on the server; pull it again"
                    )));
                }
                let mut body = opened.body;
                if offset > 0 {
                    // A server without Range support: read again from the start and drop what
                    // was already consumed (the final digest still covers every byte used).
                    say!("rootfs: server ignored Range; re-reading {offset} bytes to resume");
                    let skipped = io::copy(&mut (&mut body).take(offset), &mut io::sink())
                        .map_err(|e| OpenError::Retry(format!("connection lost while skipping to byte {offset}: {e}")))?;
                    if skipped != offset {
                        return Err(OpenError::Retry(format!("connection closed while skipping to byte {offset}")));
                    }
                }
                Ok(body)
            }
            206 if offset > 0 => {
                let range = opened.content_range.unwrap_or_default();
                if content_range_matches(&range, offset, size) {
                    Ok(opened.body)
                } else {
                    Err(OpenError::Fatal(format!(
                        "{url}: asked for bytes {offset}- and got Content-Range {range:?}; expected \"bytes {offset}-{}/{size}\"",
                        size - 1
                    )))
                }
            }
            416 => Err(OpenError::Fatal(format!(
                "{url}: server has no byte {offset} (416), but the config pins {size} bytes: the artifact changed on the server"
            ))),
            s if s >= 500 || s == 429 => Err(OpenError::Retry(format!("GET {url}: server answered {s}"))),
            s => Err(OpenError::Fatal(format!("GET {url}: server answered {s}"))),
        }
    }
}

/// `bytes <offset>-<size-1>/<size>` (the total may be `*`).
fn content_range_matches(value: &str, offset: u64, size: u64) -> bool {
    let Some(rest) = value.trim().strip_prefix("bytes ") else {
        return false;
    };
    let Some((range, total)) = rest.split_once('/') else {
        return false;
    };
    let Some((first, last)) = range.split_once('-') else {
        return false;
    };
    let total_ok = total == "*" || total.parse::<u64>() == Ok(size);
    first.parse::<u64>() == Ok(offset) && last.parse::<u64>() == Ok(size - 1) && total_ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    const NO_BACKOFF: Backoff = Backoff {
        first: Duration::ZERO,
        max: Duration::ZERO,
    };

    /// Serves `data`; each connection is cut at the next position in `cuts`; the first
    /// `refuse` opens fail.
    struct Fake {
        data: Arc<Vec<u8>>,
        cuts: Vec<u64>,
        refuse: u32,
        opens: Arc<Mutex<Vec<u64>>>,
    }

    impl Source for Fake {
        fn open(&mut self, offset: u64) -> Result<Box<dyn Read + Send>, OpenError> {
            self.opens.lock().unwrap().push(offset);
            if self.refuse > 0 {
                self.refuse -= 1;
                return Err(OpenError::Retry("connection refused".into()));
            }
            if offset >= self.data.len() as u64 {
                return Err(OpenError::Fatal("416".into()));
            }
            let end = self
                .cuts
                .iter()
                .copied()
                .find(|c| *c > offset)
                .unwrap_or(self.data.len() as u64);
            let chunk = self.data[offset as usize..end as usize].to_vec();
            Ok(Box::new(io::Cursor::new(chunk)))
        }
    }

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    fn sha(d: &[u8]) -> String {
        hex::encode(Sha256::digest(d))
    }

    fn stream(
        d: &[u8],
        cuts: Vec<u64>,
        refuse: u32,
        retries: u32,
    ) -> (VerifiedStream<Fake>, Arc<Mutex<Vec<u64>>>) {
        let opens = Arc::new(Mutex::new(Vec::new()));
        let fake = Fake {
            data: Arc::new(d.to_vec()),
            cuts,
            refuse,
            opens: opens.clone(),
        };
        (
            VerifiedStream::new(fake, d.len() as u64, &sha(d), retries, NO_BACKOFF),
            opens,
        )
    }

    #[test]
    fn reads_everything_and_verifies() {
        let d = data(100_000);
        let (mut s, opens) = stream(&d, vec![], 0, 3);
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        assert_eq!(out, d);
        let summary = s.finish().unwrap();
        assert_eq!((summary.bytes, summary.reconnects), (100_000, 0));
        assert!(summary.hashing > Duration::ZERO);
        assert_eq!(*opens.lock().unwrap(), vec![0]);
    }

    #[test]
    fn resumes_at_the_consumed_offset_without_the_reader_noticing() {
        let d = data(100_000);
        let (mut s, opens) = stream(&d, vec![40_000, 40_001, 77_777], 0, 2);
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        assert_eq!(out, d, "the consumer sees one seamless stream");
        assert_eq!(s.finish().unwrap().reconnects, 3);
        assert_eq!(*opens.lock().unwrap(), vec![0, 40_000, 40_001, 77_777]);
    }

    #[test]
    fn progress_resets_the_retry_budget() {
        let d = data(10_000);
        let cuts = (1..10).map(|i| i * 1000).collect();
        let (mut s, _) = stream(&d, cuts, 0, 1);
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        assert_eq!(out, d);
        assert!(s.finish().is_ok());
    }

    #[test]
    fn gives_up_after_the_retry_budget() {
        let d = data(1000);
        let (mut s, opens) = stream(&d, vec![], 10, 2);
        let err = s.read(&mut [0u8; 10]).unwrap_err();
        assert!(
            err.to_string()
                .contains("failed 3 times in a row at byte 0"),
            "{err}"
        );
        assert_eq!(opens.lock().unwrap().len(), 3);
        assert!(matches!(
            s.failure(),
            Some(StreamError::GaveUp { attempts: 3, .. })
        ));
        assert!(
            s.read(&mut [0u8; 10]).is_err(),
            "a failed stream stays failed"
        );
    }

    #[test]
    fn recovers_when_the_server_comes_back_within_budget() {
        let d = data(1000);
        let (mut s, _) = stream(&d, vec![], 2, 2);
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        assert_eq!(s.finish().unwrap().reconnects, 2);
    }

    #[test]
    fn wrong_bytes_fail_the_digest_check() {
        let d = data(5000);
        let opens = Arc::new(Mutex::new(Vec::new()));
        let mut bad = d.clone();
        bad[4000] ^= 1;
        let fake = Fake {
            data: Arc::new(bad),
            cuts: vec![],
            refuse: 0,
            opens,
        };
        let mut s = VerifiedStream::new(fake, 5000, &sha(&d), 1, NO_BACKOFF);
        let err = s.finish().unwrap_err();
        assert!(
            matches!(&err, StreamError::HashMismatch { expected, .. } if *expected == sha(&d)),
            "{err}"
        );
        assert!(err.to_string().starts_with("sha256 mismatch"));
    }

    #[test]
    fn finish_drains_what_the_consumer_left() {
        let d = data(50_000);
        let (mut s, _) = stream(&d, vec![30_000], 0, 1);
        let mut head = vec![0u8; 100];
        s.read_exact(&mut head).unwrap();
        let summary = s.finish().unwrap();
        assert_eq!((summary.bytes, summary.reconnects), (50_000, 1));
    }

    #[test]
    fn a_short_artifact_is_a_clear_error() {
        let d = data(1000);
        let opens = Arc::new(Mutex::new(Vec::new()));
        let fake = Fake {
            data: Arc::new(d[..600].to_vec()),
            cuts: vec![],
            refuse: 0,
            opens,
        };
        let mut s = VerifiedStream::new(fake, 1000, &sha(&d), 3, NO_BACKOFF);
        let err = s.finish().unwrap_err();
        assert_eq!(err, StreamError::Source("416".into()));
    }

    #[test]
    fn progress_reports_consumed_bytes() {
        let d = data(20_000);
        let (mut s, _) = stream(&d, vec![10_000], 0, 1);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        s.on_progress(Box::new(move |n| sink.lock().unwrap().push(n)));
        s.finish().unwrap();
        let seen = seen.lock().unwrap();
        assert_eq!(seen.last(), Some(&20_000));
        assert!(seen.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn content_range_must_match_exactly() {
        assert!(content_range_matches("bytes 100-999/1000", 100, 1000));
        assert!(content_range_matches("bytes 100-999/*", 100, 1000));
        assert!(!content_range_matches("bytes 0-999/1000", 100, 1000));
        assert!(!content_range_matches("bytes 100-998/1000", 100, 1000));
        assert!(!content_range_matches("bytes 100-999/2000", 100, 1000));
        assert!(!content_range_matches("", 100, 1000));
    }

    fn http_stream(
        server: &pxelab_tests::FixtureServer,
        path: &str,
        d: &[u8],
    ) -> VerifiedStream<HttpSource> {
        let http = Http::new(2, NO_BACKOFF);
        let source = HttpSource::new(http, &server.url(path), d.len() as u64);
        VerifiedStream::new(source, d.len() as u64, &sha(d), 2, NO_BACKOFF)
    }

    #[test]
    fn http_resume_uses_range_from_the_consumed_offset() {
        use pxelab_tests::{Behavior, FixtureServer};
        let server = FixtureServer::start();
        let d = data(300_000);
        server.serve("/r.tar.zst", d.clone(), Behavior::CutOnceAfter(120_000));
        let mut s = http_stream(&server, "/r.tar.zst", &d);
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        assert_eq!(out, d);
        assert_eq!(s.finish().unwrap().reconnects, 1);
        let ranges: Vec<Option<String>> = server
            .requests()
            .iter()
            .map(|r| r.header("range").map(str::to_string))
            .collect();
        assert_eq!(ranges, vec![None, Some("bytes=120000-".to_string())]);
    }

    #[test]
    fn http_server_ignoring_range_still_gives_the_right_bytes() {
        use pxelab_tests::{Behavior, FixtureServer};
        let server = FixtureServer::start();
        let d = data(200_000);
        server.serve("/a", d.clone(), Behavior::CutOnceAfter(50_000));
        let mut s = http_stream(&server, "/a", &d);
        let mut head = vec![0u8; 60_000];
        s.read_exact(&mut head[..50_000]).unwrap();
        server.serve("/a", d.clone(), Behavior::IgnoreRange);
        s.read_exact(&mut head[50_000..]).unwrap();
        assert_eq!(head, d[..60_000]);
        assert!(s.finish().is_ok());
    }

    #[test]
    fn http_size_disagreement_is_fatal_not_retried() {
        use pxelab_tests::{Behavior, FixtureServer};
        let server = FixtureServer::start();
        let d = data(1000);
        server.serve("/a", d[..900].to_vec(), Behavior::Normal);
        let mut s = http_stream(&server, "/a", &d);
        let err = s.finish().unwrap_err().to_string();
        assert!(
            err.contains("is 900 bytes but the config pins 1000"),
            "{err}"
        );
        assert_eq!(server.hits("/a"), 1);
    }
}
