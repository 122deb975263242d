//! Verified, resumable, parallel downloads into the store: the engine under `cargo xtask fetch`,
//! the lock verbs' consumers and every build step that needs a pinned file.
//!
//! A download streams into `tmp/<sha256>.part` (named by the *expected* digest, so a later run
//! resumes it) while hashing. It resumes with `Range: bytes=N-` and trusts only a 206 whose
//! `Content-Range` starts at N; a 200 means the server ignored the range and we start from zero.
//! Transient failures (connection errors, cut bodies, 5xx) are retried with exponential backoff.
//! Only a complete file whose size and sha256 match becomes a blob (fsync + rename), so a process
//! killed at any moment leaves at most a `.part` file. A per-digest lock makes two concurrent
//! runs that need the same input download it once: the second waits, then finds it in the store.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::store::{validate_digest, BlobState, Store};
use crate::ui::{Task, Ui};
use crate::util::human_bytes;

/// One file to fetch.
#[derive(Clone, Debug)]
pub struct Fetch {
    /// Shown on the progress bar and in errors (e.g. `initrd/amd64/busybox-static`).
    pub label: String,
    pub url: String,
    pub sha256: String,
    /// Expected size, if known (checked before hashing and used for the progress bar).
    pub size: Option<u64>,
    /// Said when the server answers 404/410 (e.g. which pinned Debian package vanished).
    pub gone_hint: Option<String>,
}

/// What [`Fetcher::fetch_all`] did.
#[derive(Debug, Default)]
pub struct Summary {
    /// Inputs that were already in the store.
    pub present: usize,
    /// Labels and sizes of inputs downloaded by this run.
    pub downloaded: Vec<(String, u64)>,
    pub elapsed: Duration,
}

/// Downloads into one store.
pub struct Fetcher<'s> {
    store: &'s Store,
    ui: Ui,
    client: reqwest::blocking::Client,
    /// Parallel downloads.
    pub jobs: usize,
    /// Attempts after the first for transient failures.
    pub retries: u32,
    /// First retry delay; doubles each time.
    pub backoff: Duration,
}

enum Failure {
    /// Worth another attempt (network trouble, cut body, 5xx, a resume that went wrong).
    Retry(anyhow::Error),
    /// Will not get better by retrying (404, hash mismatch on a full download).
    Fatal(anyhow::Error),
}

impl<'s> Fetcher<'s> {
    pub fn new(store: &'s Store, ui: Ui) -> Result<Fetcher<'s>> {
        let client = reqwest::blocking::Client::builder()
            .user_agent(concat!("pxelab-xtask/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(20))
            // The blocking client applies this to each read of the body, so it catches a stalled
            // transfer without limiting how long a large download may take.
            .timeout(Duration::from_secs(60))
            .build()
            .context("creating the HTTP client")?;
        Ok(Fetcher {
            store,
            ui,
            client,
            jobs: 4,
            retries: 4,
            backoff: Duration::from_millis(500),
        })
    }

    /// Inputs not (or no longer, after a failed check) in the store, in order.
    pub fn missing<'a>(&self, items: &'a [Fetch]) -> Result<Vec<&'a Fetch>> {
        let mut out = Vec::new();
        for item in items {
            if !self.store.has(&item.sha256)? {
                out.push(item);
            }
        }
        Ok(out)
    }

    /// Make every item present in the store; downloads what is missing, `jobs` at a time.
    /// All failures are reported together, one line each.
    pub fn fetch_all(&self, items: &[Fetch]) -> Result<Summary> {
        let started = Instant::now();
        let mut seen = std::collections::HashSet::new();
        let items: Vec<&Fetch> = items
            .iter()
            .filter(|i| seen.insert(i.sha256.clone()))
            .collect();
        let mut todo = Vec::new();
        let mut summary = Summary::default();
        for item in items {
            validate_digest(&item.sha256)
                .with_context(|| format!("{}: bad sha256 in the lock", item.label))?;
            if self.store.has(&item.sha256)? {
                summary.present += 1;
            } else {
                todo.push(item);
            }
        }
        let next = AtomicUsize::new(0);
        let results: Mutex<Vec<(usize, Result<Option<u64>>)>> = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for _ in 0..self.jobs.clamp(1, todo.len().max(1)) {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(item) = todo.get(i) else { break };
                    let r = self.fetch_one(item);
                    results
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((i, r));
                });
            }
        });
        let mut results = results.into_inner().unwrap_or_else(|e| e.into_inner());
        results.sort_by_key(|(i, _)| *i);
        let mut errors = Vec::new();
        for (i, r) in results {
            match r {
                Ok(Some(n)) => summary.downloaded.push((todo[i].label.clone(), n)),
                Ok(None) => summary.present += 1,
                Err(e) => errors.push(format!("{:#}", e)),
            }
        }
        summary.elapsed = started.elapsed();
        if !errors.is_empty() {
            bail!(
                "{} of {} downloads failed:\n  {}",
                errors.len(),
                todo.len(),
                errors.join("\n  ")
            );
        }
        Ok(summary)
    }

    /// Make one item present. Returns the bytes downloaded, or `None` if another run (or an
    /// earlier item with the same content) put it in the store meanwhile.
    pub fn fetch_one(&self, item: &Fetch) -> Result<Option<u64>> {
        let _lock = self.store.lock_item(&item.sha256, &item.label)?;
        if self.store.has(&item.sha256)? {
            return Ok(None);
        }
        let part = self.store.tmp_dir().join(format!("{}.part", item.sha256));
        let task = self.ui.bytes_task(&item.label, item.size.unwrap_or(0));
        let size = item
            .size
            .map(|s| format!(" ({})", human_bytes(s)))
            .unwrap_or_default();
        task.log(&format!("downloading {}{size}", item.url));
        let mut attempt = 0;
        loop {
            match self.attempt(item, &part, &task) {
                Ok(()) => break,
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Retry(e)) => {
                    if attempt >= self.retries {
                        return Err(e.context(format!(
                            "{}: giving up after {} attempts",
                            item.url,
                            attempt + 1
                        )));
                    }
                    let delay = self.backoff * 2u32.pow(attempt);
                    task.note(&format!("{:#}; retrying in {:.1}s", e, delay.as_secs_f64()));
                    std::thread::sleep(delay);
                    attempt += 1;
                }
            }
        }
        self.store.publish(&part, &item.sha256)?;
        let size = fs::metadata(self.store.blob_path(&item.sha256))?.len();
        let secs = task.elapsed().as_secs_f64();
        task.finish(&format!("{} in {secs:.1}s", human_bytes(size)));
        Ok(Some(size))
    }

    /// One HTTP request, resuming `part` if it holds a prefix. Ok means `part` is complete and
    /// verified.
    fn attempt(&self, item: &Fetch, part: &PathBuf, task: &Task) -> Result<(), Failure> {
        let url = &item.url;
        let io = |e: std::io::Error, what: &str| {
            Failure::Fatal(anyhow!(e).context(format!("{what} {}", part.display())))
        };
        let mut have = fs::metadata(part).map(|m| m.len()).unwrap_or(0);
        if item.size.is_some_and(|s| have > s) {
            have = 0;
        }
        if have > 0 && Some(have) == item.size {
            // A complete download from a run that died before publishing: no request needed.
            return self.finish_part(item, part, true);
        }
        let mut hasher = Sha256::new();
        if have > 0 {
            let mut f = File::open(part).map_err(|e| io(e, "opening"))?;
            let mut buf = vec![0u8; 1 << 20];
            let mut left = have;
            while left > 0 {
                let n = f
                    .read(&mut buf[..(left.min(1 << 20)) as usize])
                    .map_err(|e| io(e, "reading"))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                left -= n as u64;
            }
        }
        let mut req = self.client.get(url);
        if have > 0 {
            req = req.header(reqwest::header::RANGE, format!("bytes={have}-"));
        }
        let mut resp = req
            .send()
            .map_err(|e| Failure::Retry(anyhow!("{url}: {}", error_chain(&e))))?;
        let status = resp.status().as_u16();
        match status {
            206 if have > 0 => {
                let start = resp
                    .headers()
                    .get(reqwest::header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("bytes "))
                    .and_then(|v| v.split('-').next())
                    .and_then(|v| v.parse::<u64>().ok());
                if start != Some(have) {
                    let _ = fs::remove_file(part);
                    return Err(Failure::Retry(anyhow!(
                        "{url}: 206 with an unexpected Content-Range; restarting"
                    )));
                }
                task.note(&format!("resuming at {}", human_bytes(have)));
            }
            200 => {
                if have > 0 {
                    task.note("server ignored Range; restarting from zero");
                }
                have = 0;
                hasher = Sha256::new();
            }
            404 | 410 => {
                let _ = fs::remove_file(part);
                let hint = item
                    .gone_hint
                    .as_deref()
                    .map(|h| format!(": {h}"))
                    .unwrap_or_default();
                return Err(Failure::Fatal(anyhow!(
                    "{url}: HTTP {status} (file is gone){hint}"
                )));
            }
            416 if have > 0 => {
                let _ = fs::remove_file(part);
                return Err(Failure::Retry(anyhow!(
                    "{url}: server refused to resume (416); restarting"
                )));
            }
            408 | 425 | 429 | 500..=599 => {
                return Err(Failure::Retry(anyhow!("{url}: HTTP {status}")))
            }
            _ => return Err(Failure::Fatal(anyhow!("{url}: unexpected HTTP {status}"))),
        }
        if let (Some(size), Some(len)) = (item.size, resp.content_length()) {
            if have + len != size {
                let _ = fs::remove_file(part);
                return Err(Failure::Fatal(anyhow!(
                    "{url}: size mismatch: expected {size} bytes, server offers {}",
                    have + len
                )));
            }
        }
        task.set_length(
            item.size
                .or(resp.content_length().map(|l| l + have))
                .unwrap_or(0),
        );
        task.set_position(have);
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(part)
            .map_err(|e| io(e, "opening"))?;
        file.set_len(have).map_err(|e| io(e, "truncating"))?;
        let mut file = std::io::BufWriter::with_capacity(1 << 20, file);
        std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(have))
            .map_err(|e| io(e, "seeking"))?;
        let resumed = have > 0;
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = match resp.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    // Keep what arrived: the next attempt resumes from it.
                    file.flush().map_err(|e| io(e, "writing"))?;
                    return Err(Failure::Retry(anyhow!(
                        "{url}: connection lost after {}: {e}",
                        human_bytes(have)
                    )));
                }
            };
            file.write_all(&buf[..n]).map_err(|e| io(e, "writing"))?;
            hasher.update(&buf[..n]);
            have += n as u64;
            task.set_position(have);
            if item.size.is_some_and(|s| have > s) {
                drop(file);
                let _ = fs::remove_file(part);
                return Err(Failure::Fatal(anyhow!(
                    "{url}: size mismatch: expected {} bytes, got more",
                    item.size.unwrap_or(0)
                )));
            }
        }
        file.flush().map_err(|e| io(e, "writing"))?;
        drop(file);
        if let Some(size) = item.size {
            if have < size {
                return Err(Failure::Retry(anyhow!(
                    "{url}: connection closed after {have} of {size} bytes"
                )));
            }
        }
        let actual = hex::encode(hasher.finalize());
        self.check_digest(item, part, &actual, resumed)
    }

    /// Hash a part file that is already complete and accept or reject it.
    fn finish_part(&self, item: &Fetch, part: &PathBuf, resumed: bool) -> Result<(), Failure> {
        let actual = crate::store::hash_file(part).map_err(Failure::Fatal)?;
        self.check_digest(item, part, &actual, resumed)
    }

    fn check_digest(
        &self,
        item: &Fetch,
        part: &PathBuf,
        actual: &str,
        resumed: bool,
    ) -> Result<(), Failure> {
        if actual == item.sha256 {
            return Ok(());
        }
        let _ = fs::remove_file(part);
        let err = anyhow!(
            "{}: sha256 mismatch: expected {}, got {actual}",
            item.url,
            item.sha256
        );
        // A resumed file may mix two versions of the upstream file: one clean retry from zero.
        if resumed {
            Err(Failure::Retry(err))
        } else {
            Err(Failure::Fatal(err))
        }
    }
}

/// reqwest's Display hides the cause ("error sending request"); show the whole chain.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Report for `--offline`: every missing input, one per line.
pub fn offline_report(missing: &[&Fetch]) -> String {
    let lines: Vec<String> = missing
        .iter()
        .map(|m| format!("  {} sha256:{} ({})", m.label, m.sha256, m.url))
        .collect();
    format!(
        "offline: {} locked input(s) are not in the store:\n{}\nrun `cargo xtask fetch` with network access",
        missing.len(),
        lines.join("\n")
    )
}

/// Make sure `items` are in the store (downloading what is missing unless `offline`) and return
/// their blob paths, in order. Blobs are read-only; copy with [`Store::materialize`].
pub fn ensure_all(store: &Store, items: &[Fetch], offline: bool) -> Result<Vec<PathBuf>> {
    let fetcher = Fetcher::new(store, Ui::new())?;
    if offline {
        let missing = fetcher.missing(items)?;
        if !missing.is_empty() {
            bail!("{}", offline_report(&missing));
        }
    } else {
        fetcher.fetch_all(items)?;
    }
    Ok(items.iter().map(|i| store.blob_path(&i.sha256)).collect())
}

/// Re-check a blob the caller is about to use: if it went corrupt, fetch it again.
pub fn ensure(fetcher: &Fetcher, item: &Fetch) -> Result<PathBuf> {
    if fetcher.store.check(&item.sha256)? != BlobState::Good {
        fetcher.fetch_one(item)?;
    }
    Ok(fetcher.store.blob_path(&item.sha256))
}
