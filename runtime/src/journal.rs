//! The durable half of the machines' state: an append-only journal of events in the state
//! directory, replayed at start.
//!
//! Files:
//! - `journal-<n>.jsonl`: one event per line (`EventLine`), numbered by a sequence that only grows.
//!   Lines are gathered in memory and written in batches by a background thread within
//!   [`FLUSH_DELAY`] (so a request costs no system call for its event).
//! - `snapshot.jsonl`: one [`MachineRecord`] per machine, written atomically and durably.
//!
//! A reply that shows a machine entering or leaving `installed` (the one state that changes what
//! it boots) is sent only after [`Journal::wait`] wrote and `fdatasync`ed that event (the
//! segment's directory entry was fsynced when it was created). Syncs are shared: one
//! `fdatasync` covers every line appended before it started, so machines that report at once
//! wait for one disk flush, and an event that needs no flush never waits for one. A `kill -9`
//! or power cut loses at most the last moments of the other events, which leave every machine
//! booting as it would have.
//!
//! Compaction (at start, and when the journal has grown) moves appends to a new segment, writes
//! the snapshot from memory and deletes the older segments. A record carries the sequence of the
//! last event it contains, so replay skips events already in the snapshot, whatever moment a
//! crash interrupted. A line cut by a crash (the write of an event whose reply was never sent)
//! is ignored.

use std::{
    collections::{BTreeMap, VecDeque},
    fs::{self, File, OpenOptions},
    io::{self, Write},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Condvar, Mutex,
    },
    time::Duration,
};

use pxelab_contract::{Mac, Phase, TimelineEntry, VmState};
use serde::{Deserialize, Serialize};

use crate::log;

/// Timeline entries kept per machine (the tail is what `/vms/<name>/timeline` serves). An
/// install posts about a hundred (its rootfs progress at most once a second). With messages
/// capped at [`pxelab_contract::MAX_MESSAGE`] bytes, a timeline stays under 256 × ~700 bytes.
pub const TIMELINE_KEEP: usize = 256;
/// The journal is compacted when it is larger than this and than twice the last snapshot.
const COMPACT_AT: u64 = 64 << 20;

const SNAPSHOT: &str = "snapshot.jsonl";

/// Everything the stack remembers about one machine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineRecord {
    pub vm: String,
    pub mac: Mac,
    pub state: VmState,
    /// When `state` was entered, Unix milliseconds.
    pub since_ms: u64,
    /// Sequence of the last event folded into this record.
    pub seq: u64,
    /// The [`Ticket`] of the event that last entered or left `installed`: a reader that sees
    /// that state waits until it is durable (every replayed state already is).
    #[serde(skip)]
    pub state_ticket: Ticket,
    /// The last [`TIMELINE_KEEP`] events, oldest first.
    pub timeline: VecDeque<TimelineEntry>,
    /// The token of the machine's current network boot ([`crate::access`]): set by the event
    /// that handed the boot out, dropped by a reprovision or a new MAC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The reprovision nonce ([`pxelab_contract::InstallerConfig::wipe`]): set by the operator's
    /// reprovision, dropped when the machine reports `installed` (or a new MAC appears).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wipe: Option<String>,
}

/// The secrets an event hands out, kept with the machine's record.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Minted {
    /// A boot token (an `/ipxe` that hands out a boot).
    pub token: Option<String>,
    /// A reprovision nonce (the operator's reprovision).
    pub wipe: Option<String>,
}

impl MachineRecord {
    pub fn new(vm: &str, mac: Mac) -> MachineRecord {
        MachineRecord {
            vm: vm.to_string(),
            mac,
            state: VmState::New,
            since_ms: 0,
            seq: 0,
            state_ticket: Ticket::default(),
            timeline: VecDeque::new(),
            token: None,
            wipe: None,
        }
    }

    /// Folds one event in: the state machine of the contract, a bounded timeline of cleaned
    /// messages, the secrets the event hands out (if any). A record of another MAC (the VM was
    /// redefined) starts over from `new` without a token or nonce, keeping the timeline. Returns
    /// whether the state changed.
    pub fn apply(
        &mut self,
        mac: Mac,
        mut entry: TimelineEntry,
        seq: u64,
        ticket: Ticket,
        minted: Minted,
    ) -> bool {
        if self.mac != mac || entry.event.phase == Phase::Reprovision {
            self.token = None;
            self.wipe = None;
        }
        if minted.token.is_some() {
            self.token = minted.token;
        }
        if minted.wipe.is_some() {
            self.wipe = minted.wipe;
        }
        // Journals written before events were cleaned on arrival.
        entry.event.clean();
        let old = if self.mac == mac {
            self.state
        } else {
            VmState::New
        };
        let new = old.after(entry.event.phase);
        let changed = new != old || self.mac != mac;
        if changed || self.since_ms == 0 {
            self.since_ms = entry.at_ms;
        }
        // Only `installed` changes what a machine boots: entering or leaving it must be durable
        // before any reply; losing another change to a power cut leaves a state that boots the
        // same way (the installer), so those replies do not wait for the disk.
        if changed && (new == VmState::Installed || old == VmState::Installed) {
            self.state_ticket = ticket;
        }
        if new == VmState::Installed {
            // The reprovisioned install is done: the next one needs the operator again.
            self.wipe = None;
        }
        self.mac = mac;
        self.state = new;
        self.seq = seq;
        if self.timeline.len() == TIMELINE_KEEP {
            self.timeline.pop_front();
        }
        self.timeline.push_back(entry);
        changed
    }
}

/// One line of a journal segment.
#[derive(Deserialize)]
struct EventLine {
    seq: u64,
    vm: String,
    mac: Mac,
    /// The boot token this event handed out.
    #[serde(default)]
    token: Option<String>,
    /// The reprovision nonce this event handed out.
    #[serde(default)]
    wipe: Option<String>,
    #[serde(flatten)]
    entry: TimelineEntry,
}

/// [`EventLine`] as written, borrowing its parts.
#[derive(Serialize)]
struct EventLineRef<'a> {
    seq: u64,
    vm: &'a str,
    mac: Mac,
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    wipe: Option<&'a str>,
    #[serde(flatten)]
    entry: &'a TimelineEntry,
}

/// What an appended event needs to be durable: a flush that started after it was appended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ticket(u64);

/// How long an appended line may wait in memory before it is written.
pub const FLUSH_DELAY: Duration = Duration::from_millis(5);

pub struct Journal {
    shared: Arc<Shared>,
}

struct Shared {
    dir: PathBuf,
    /// Lines appended and not written yet. Held only to copy a line in or take the lot.
    pending: Mutex<Vec<u8>>,
    /// Wakes the writer thread when `pending` gets its first line.
    wake: Condvar,
    next_seq: AtomicU64,
    /// The segment being appended to; held while writing, syncing or rotating.
    segment: Mutex<Segment>,
    /// Flushes to disk started and finished, counted: an event appended when `started` was `n`
    /// is durable once `synced` exceeds `n`.
    started: AtomicU64,
    synced: AtomicU64,
    /// Size of the last snapshot and of the current segment, for the compaction threshold.
    snapshot_size: AtomicU64,
    segment_size: AtomicU64,
    stop: AtomicBool,
}

struct Segment {
    file: File,
    number: u64,
}

impl Journal {
    /// Replays the state directory's journal (snapshot, then segments) and compacts it.
    pub fn open(dir: &Path) -> io::Result<(Journal, BTreeMap<String, MachineRecord>)> {
        fs::create_dir_all(dir)?;
        let (mut machines, segments) = replay(dir)?;
        let next = machines.values().map(|m| m.seq).max().unwrap_or(0) + 1;
        let number = segments.last().copied().unwrap_or(0) + 1;
        if segments.is_empty() && !dir.join(SNAPSHOT).exists() {
            import_legacy(dir, &mut machines);
        }
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            pending: Mutex::new(Vec::new()),
            wake: Condvar::new(),
            next_seq: AtomicU64::new(next),
            segment: Mutex::new(Segment {
                file: create_segment(dir, number)?,
                number,
            }),
            // Ticket 0 (a replayed state) is durable from the start.
            started: AtomicU64::new(1),
            synced: AtomicU64::new(1),
            snapshot_size: AtomicU64::new(0),
            segment_size: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let journal = Journal { shared };
        journal.write_snapshot(machines.values(), |r| Some(*r))?;
        journal.remove_segments_before(number)?;
        remove_legacy(dir);
        let weak = Arc::downgrade(&journal.shared);
        std::thread::Builder::new()
            .name("journal".into())
            .spawn(move || writer(weak))?;
        Ok((journal, machines))
    }

    /// Appends `entry` for `vm` (and the secrets it hands out); returns its sequence and the
    /// ticket to wait on for it to be durable. Callers hold the machine's own lock, so one
    /// machine's events are in the journal in the order its record sees them.
    pub fn append(
        &self,
        vm: &str,
        mac: Mac,
        entry: &TimelineEntry,
        minted: &Minted,
    ) -> io::Result<(u64, Ticket)> {
        let s = &self.shared;
        let seq = s.next_seq.fetch_add(1, Ordering::SeqCst);
        let line = EventLineRef {
            seq,
            vm,
            mac,
            token: minted.token.as_deref(),
            wipe: minted.wipe.as_deref(),
            entry,
        };
        {
            let mut pending = s.pending.lock().unwrap_or_else(|p| p.into_inner());
            if pending.is_empty() {
                s.wake.notify_one();
            }
            // Serialized in place (a boot storm appends a line per request): no line of its own
            // to allocate and copy. A failure takes its partial line back out.
            let start = pending.len();
            if let Err(e) = serde_json::to_writer(&mut *pending, &line) {
                pending.truncate(start);
                return Err(io::Error::other(e));
            }
            pending.push(b'\n');
        }
        // Read after the line is pending: a flush counted higher takes it along.
        Ok((seq, Ticket(s.started.load(Ordering::SeqCst))))
    }

    /// Returns once the event of `ticket` is on disk.
    pub fn wait(&self, ticket: Ticket) -> io::Result<()> {
        let s = &self.shared;
        if s.synced.load(Ordering::SeqCst) > ticket.0 {
            return Ok(());
        }
        let mut segment = s.segment.lock().unwrap_or_else(|p| p.into_inner());
        if s.synced.load(Ordering::SeqCst) > ticket.0 {
            return Ok(());
        }
        // Counted before taking the pending lines: everything appended before this count is in
        // what this flush writes.
        let n = s.started.fetch_add(1, Ordering::SeqCst) + 1;
        write_pending(s, &mut segment)?;
        segment.file.sync_data()?;
        s.synced.fetch_max(n, Ordering::SeqCst);
        Ok(())
    }

    /// True when the journal has grown enough to be worth compacting.
    pub fn wants_compaction(&self) -> bool {
        let s = &self.shared;
        // Atomics only: this runs after every event and must not wait behind a flush.
        s.segment_size.load(Ordering::Relaxed)
            > COMPACT_AT.max(2 * s.snapshot_size.load(Ordering::Relaxed))
    }

    /// First step of a compaction: later events go to a new segment. Returns its number.
    pub fn rotate(&self) -> io::Result<u64> {
        let s = &self.shared;
        let mut segment = s.segment.lock().unwrap_or_else(|p| p.into_inner());
        // The old segment is complete and durable before appends move on.
        let n = s.started.fetch_add(1, Ordering::SeqCst) + 1;
        write_pending(s, &mut segment)?;
        segment.file.sync_data()?;
        let number = segment.number + 1;
        *segment = Segment {
            file: create_segment(&s.dir, number)?,
            number,
        };
        s.segment_size.store(0, Ordering::Relaxed);
        s.synced.fetch_max(n, Ordering::SeqCst);
        Ok(number)
    }

    /// Writes the snapshot durably (a record's `seq` says which events it already holds), one
    /// line per item `record` finds a record in. Streamed: each record is serialized while its
    /// item (a machine's lock) is held and written after that item is dropped, so neither a
    /// copy of every record nor the whole file is ever in memory (at 10,000 machines both cost
    /// a quarter of a boot storm's CPU), and no machine waits on the file.
    pub fn write_snapshot<G>(
        &self,
        items: impl IntoIterator<Item = G>,
        record: impl Fn(&G) -> Option<&MachineRecord>,
    ) -> io::Result<()> {
        const CHUNK: usize = 1 << 20;
        let path = self.shared.dir.join(SNAPSHOT);
        let size = crate::write_atomic_with(&path, true, |file| {
            let mut buf = Vec::with_capacity(CHUNK + (CHUNK >> 2));
            let mut size = 0;
            for item in items {
                if let Some(r) = record(&item) {
                    serde_json::to_writer(&mut buf, r).map_err(io::Error::other)?;
                    buf.push(b'\n');
                }
                drop(item);
                if buf.len() >= CHUNK {
                    file.write_all(&buf)?;
                    size += buf.len() as u64;
                    buf.clear();
                }
            }
            file.write_all(&buf)?;
            Ok(size + buf.len() as u64)
        })?;
        self.shared.snapshot_size.store(size, Ordering::SeqCst);
        Ok(())
    }

    /// Last step of a compaction: the segments the snapshot now holds are deleted.
    pub fn remove_segments_before(&self, number: u64) -> io::Result<()> {
        for (n, path) in segments(&self.shared.dir)? {
            if n < number {
                fs::remove_file(&path)?;
            }
        }
        crate::sync_dir(&self.shared.dir)
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        let s = &self.shared;
        s.stop.store(true, Ordering::SeqCst);
        s.wake.notify_one();
        let mut segment = s.segment.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = write_pending(s, &mut segment) {
            log!("cannot write the journal's last events: {e}");
        }
    }
}

/// Writes the pending lines (one `write` for the batch).
fn write_pending(s: &Shared, segment: &mut Segment) -> io::Result<()> {
    let batch = std::mem::take(&mut *s.pending.lock().unwrap_or_else(|p| p.into_inner()));
    if batch.is_empty() {
        return Ok(());
    }
    (&segment.file).write_all(&batch)?;
    s.segment_size
        .fetch_add(batch.len() as u64, Ordering::Relaxed);
    Ok(())
}

/// The background writer: pending lines reach the file within [`FLUSH_DELAY`].
fn writer(shared: std::sync::Weak<Shared>) {
    loop {
        let Some(s) = shared.upgrade() else { return };
        {
            let pending = s.pending.lock().unwrap_or_else(|p| p.into_inner());
            if pending.is_empty() && !s.stop.load(Ordering::SeqCst) {
                let _ = s.wake.wait_timeout(pending, Duration::from_millis(500));
            }
        }
        if s.stop.load(Ordering::SeqCst) {
            return;
        }
        // Let a burst gather into one write.
        std::thread::sleep(FLUSH_DELAY);
        let mut segment = s.segment.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = write_pending(&s, &mut segment) {
            log!("cannot append to the journal in {}: {e}", s.dir.display());
        }
    }
}

fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("journal-{n}.jsonl"))
}

fn create_segment(dir: &Path, n: u64) -> io::Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(segment_path(dir, n))?;
    // The segment's name must survive a power cut before any event in it counts as durable.
    crate::sync_dir(dir)?;
    Ok(file)
}

/// The journal segments in the directory, in order.
fn segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut found: Vec<(u64, PathBuf)> = fs::read_dir(dir)?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let n = name
                .to_str()?
                .strip_prefix("journal-")?
                .strip_suffix(".jsonl")?
                .parse()
                .ok()?;
            Some((n, e.path()))
        })
        .collect();
    found.sort();
    Ok(found)
}

type Replayed = (BTreeMap<String, MachineRecord>, Vec<u64>);

fn replay(dir: &Path) -> io::Result<Replayed> {
    let mut machines = BTreeMap::new();
    match fs::read(dir.join(SNAPSHOT)) {
        Ok(bytes) => {
            for (i, line) in bytes.split(|b| *b == b'\n').enumerate() {
                if line.is_empty() {
                    continue;
                }
                let mut r: MachineRecord = serde_json::from_slice(line).map_err(|e| {
                    io::Error::other(format!(
                        "{} line {} is corrupt ({e}): restore it from a backup, or delete it and the journal-*.jsonl files to forget every machine's state",
                        dir.join(SNAPSHOT).display(),
                        i + 1
                    ))
                })?;
                for entry in &mut r.timeline {
                    entry.event.clean();
                }
                machines.insert(r.vm.clone(), r);
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let segments = segments(dir)?;
    for (_, path) in &segments {
        let bytes = fs::read(path)?;
        let mut skipped = 0;
        for line in bytes.split(|b| *b == b'\n') {
            if line.is_empty() {
                continue;
            }
            // A cut or damaged line is an event that was never acknowledged as durable.
            let Ok(e) = serde_json::from_slice::<EventLine>(line) else {
                skipped += 1;
                continue;
            };
            let record = machines
                .entry(e.vm.clone())
                .or_insert_with(|| MachineRecord::new(&e.vm, e.mac));
            if e.seq > record.seq {
                let minted = Minted {
                    token: e.token,
                    wipe: e.wipe,
                };
                record.apply(e.mac, e.entry, e.seq, Ticket::default(), minted);
            }
        }
        if skipped > 0 {
            log!(
                "{}: ignored {skipped} incomplete line(s) (an append cut by a crash)",
                path.display()
            );
        }
    }
    Ok((machines, segments.iter().map(|(n, _)| *n).collect()))
}

/// A machine's state as the stack kept it before the journal: `<name>.state`.
#[derive(Deserialize)]
struct LegacyState {
    mac: Mac,
    state: VmState,
    since_ms: u64,
}

/// A state directory written by an older stack (`<name>.state` and `<name>.timeline.jsonl`
/// per machine) becomes records, so installed machines stay installed across the upgrade.
fn import_legacy(dir: &Path, machines: &mut BTreeMap<String, MachineRecord>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        let Some(name) = file.strip_suffix(".state") else {
            continue;
        };
        let Some(old) = fs::read_to_string(e.path())
            .ok()
            .and_then(|t| serde_json::from_str::<LegacyState>(&t).ok())
        else {
            log!("{}: unreadable, not imported", e.path().display());
            continue;
        };
        let text =
            fs::read_to_string(dir.join(format!("{name}.timeline.jsonl"))).unwrap_or_default();
        let mut timeline: VecDeque<TimelineEntry> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        while timeline.len() > TIMELINE_KEEP {
            timeline.pop_front();
        }
        machines.insert(
            name.to_string(),
            MachineRecord {
                vm: name.to_string(),
                mac: old.mac,
                state: old.state,
                since_ms: old.since_ms,
                seq: 0,
                state_ticket: Ticket::default(),
                timeline,
                token: None,
                wipe: None,
            },
        );
    }
    if !machines.is_empty() {
        log!(
            "imported the state of {} machine(s) from {} into its journal",
            machines.len(),
            dir.display()
        );
    }
}

/// Deletes the per-machine files once the snapshot holds them.
fn remove_legacy(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".state") || name.ends_with(".timeline.jsonl") {
            let _ = fs::remove_file(e.path());
        }
    }
}
