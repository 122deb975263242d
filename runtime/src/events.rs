//! Per-VM state and timeline, kept in the state directory so a restart loses nothing.
//!
//! Files (both named by VM name):
//! - `<state>/<name>.timeline.jsonl`: one [`TimelineEntry`] per line, appended with a single
//!   `write` on an `O_APPEND` file, so concurrent writers never interleave within a line;
//! - `<state>/<name>.state`: a [`StateRecord`], replaced atomically (and fsync'd when the state
//!   changes, so `installed` survives a power cut).
//!
//! The state file is read on every use rather than cached, so deleting it takes effect at once
//! (a `reprovision` event replaces it). A record for a different MAC than the VM's current one is stale
//! (the VM was redefined) and counts as `new`.

use std::{
    fs::{self, OpenOptions},
    io::{self, Write},
    path::{Path, PathBuf},
    sync::Mutex,
};

use pxelab_contract::{Event, Mac, Phase, TimelineEntry, VmDefinition, VmState};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateRecord {
    pub mac: Mac,
    pub state: VmState,
    /// When `state` was entered, Unix milliseconds.
    pub since_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_event: Option<TimelineEntry>,
}

/// A state file exists but cannot be used; answering anything (e.g. "install") could wipe an
/// installed disk, so callers report this instead of guessing.
#[derive(Debug)]
pub struct StateError(pub String);

impl std::fmt::Display for StateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

pub struct EventStore {
    dir: PathBuf,
    /// Serializes read-modify-write of state files.
    lock: Mutex<()>,
}

impl EventStore {
    pub fn new(dir: PathBuf) -> EventStore {
        EventStore {
            dir,
            lock: Mutex::new(()),
        }
    }

    pub fn state_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.state"))
    }

    pub fn timeline_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.timeline.jsonl"))
    }

    /// The VM's current record; `None` when it never reported anything (state `new`).
    pub fn record(&self, vm: &VmDefinition) -> Result<Option<StateRecord>, StateError> {
        read_record(&self.state_path(&vm.name), vm.mac)
    }

    pub fn state(&self, vm: &VmDefinition) -> Result<VmState, StateError> {
        Ok(self.record(vm)?.map(|r| r.state).unwrap_or_default())
    }

    /// Appends `event` (stamped now) to the VM's timeline and advances its state.
    pub fn append(&self, vm: &VmDefinition, event: Event) -> Result<StateRecord, StateError> {
        let entry = TimelineEntry {
            at_ms: crate::now_ms(),
            event,
        };
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let before = match read_record(&self.state_path(&vm.name), vm.mac) {
            // A reset must work on a state file that cannot be read: it replaces it.
            Err(_) if entry.event.phase == Phase::Reprovision => None,
            other => other?,
        };
        let old_state = before.as_ref().map(|r| r.state).unwrap_or_default();
        let new_state = old_state.after(entry.event.phase);
        let since_ms = match &before {
            Some(r) if r.state == new_state => r.since_ms,
            _ => entry.at_ms,
        };
        let mut line = serde_json::to_vec(&entry)
            .map_err(|e| StateError(format!("cannot encode event: {e}")))?;
        line.push(b'\n');
        let timeline = self.timeline_path(&vm.name);
        append_line(&timeline, &line)
            .map_err(|e| StateError(format!("cannot append to {}: {e}", timeline.display())))?;
        let record = StateRecord {
            mac: vm.mac,
            state: new_state,
            since_ms,
            last_event: Some(entry),
        };
        let mut text = serde_json::to_vec_pretty(&record)
            .map_err(|e| StateError(format!("cannot encode state: {e}")))?;
        text.push(b'\n');
        let path = self.state_path(&vm.name);
        crate::write_atomic(&path, &text, new_state != old_state)
            .map_err(|e| StateError(format!("cannot write {}: {e}", path.display())))?;
        Ok(record)
    }

    /// The VM's timeline, oldest first. Lines that do not parse (a hand edit) are skipped.
    pub fn timeline(&self, name: &str) -> io::Result<Vec<TimelineEntry>> {
        match fs::read_to_string(self.timeline_path(name)) {
            Ok(text) => Ok(text
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }
}

fn read_record(path: &Path, mac: Mac) -> Result<Option<StateRecord>, StateError> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StateError(format!("cannot read {}: {e}", path.display()))),
    };
    let record: StateRecord = serde_json::from_str(&text).map_err(|e| {
        StateError(format!(
            "state file {} is corrupt ({e}): fix it, or delete it to reinstall the VM",
            path.display()
        ))
    })?;
    Ok((record.mac == mac).then_some(record))
}

fn append_line(path: &Path, line: &[u8]) -> io::Result<()> {
    let mut f = OpenOptions::new().create(true).append(true).open(path)?;
    // One write of the whole line: O_APPEND makes it land after every earlier line, whole.
    f.write_all(line)
}
