//! Per-VM state and timeline: in memory, made durable by [`crate::journal`].
//!
//! Each machine has its own lock; the map of machines is published whole and read without one,
//! so a boot storm's lookups never queue behind each other, and one machine's event never waits
//! for another's disk flush (they share one when they happen together). Entering or leaving
//! `installed` — the one state that changes what a machine boots — is durable before any reply
//! that reports it: `installed` survives a power cut. A record for a
//! different MAC than the VM's current one is stale (the VM was redefined) and counts as `new`.
//!
//! What a machine posts is checked under its lock ([`EventStore::post`]): the boot token of
//! [`crate::access`], and `installed` only while `installing`.

use std::{
    collections::HashMap,
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use arc_swap::ArcSwap;
use pxelab_contract::{Event, Mac, Phase, TimelineEntry, VmDefinition, VmState};

use crate::{
    access,
    journal::{Journal, MachineRecord, Minted, Ticket},
    log,
    vms::VmSet,
};

/// A VM's state as the handler reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateRecord {
    pub mac: Mac,
    pub state: VmState,
    /// When `state` was entered, Unix milliseconds.
    pub since_ms: u64,
    pub last_event: Option<TimelineEntry>,
}

/// The state cannot be read or written; answering anything (e.g. "install") could wipe an
/// installed disk, so callers report this instead of guessing.
#[derive(Debug)]
pub struct StateError(pub String);

impl std::fmt::Display for StateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why [`EventStore::post`] did not record an event.
#[derive(Debug)]
pub enum Refused {
    /// The request's token is not the machine's current boot token (or it has none).
    Token,
    /// `installed` while the machine is not `installing`; its state is given.
    NotInstalling(VmState),
    Failed(StateError),
}

impl From<StateError> for Refused {
    fn from(e: StateError) -> Refused {
        Refused::Failed(e)
    }
}

/// One machine: `None` until it reports its first event.
type Slot = Mutex<Option<MachineRecord>>;

pub struct EventStore {
    journal: Arc<Journal>,
    slots: ArcSwap<HashMap<String, Arc<Slot>>>,
    /// Serializes additions to `slots` (not taken by readers).
    adding: Mutex<()>,
    compacting: Arc<AtomicBool>,
    /// Generation of the VM set whose machines all have slots (`u64::MAX`: none yet).
    prepared: AtomicU64,
}

impl EventStore {
    /// Loads the state directory's journal (compacting it). Errors name the file and the fix.
    pub fn open(dir: &Path) -> Result<EventStore, StateError> {
        let (journal, records) = Journal::open(dir).map_err(|e| {
            StateError(format!(
                "cannot load the machines' state from {}: {e}",
                dir.display()
            ))
        })?;
        let slots = records
            .into_iter()
            .map(|(name, r)| (name, Arc::new(Mutex::new(Some(r)))))
            .collect();
        Ok(EventStore {
            journal: Arc::new(journal),
            slots: ArcSwap::from_pointee(slots),
            adding: Mutex::new(()),
            compacting: Arc::new(AtomicBool::new(false)),
            prepared: AtomicU64::new(u64::MAX),
        })
    }

    /// Makes sure every VM of `set` has a slot: one copy of the map for a whole new set of
    /// definitions instead of one per machine's first event. Cheap when `set` was prepared.
    pub fn prepare(&self, set: &VmSet) {
        if self.prepared.load(Ordering::SeqCst) == set.generation {
            return;
        }
        self.add_slots(set.vms.iter().map(|vm| vm.name.as_str()));
        self.prepared.store(set.generation, Ordering::SeqCst);
    }

    fn add_slots<'a>(&self, names: impl Iterator<Item = &'a str>) {
        let missing: Vec<&str> = {
            let slots = self.slots.load();
            names.filter(|n| !slots.contains_key(*n)).collect()
        };
        if missing.is_empty() {
            return;
        }
        let _one = self.adding.lock().unwrap_or_else(|p| p.into_inner());
        let mut map = HashMap::clone(&self.slots.load());
        for name in missing {
            map.entry(name.to_string())
                .or_insert_with(|| Arc::new(Mutex::new(None)));
        }
        self.slots.store(Arc::new(map));
    }

    fn slot(&self, name: &str) -> Arc<Slot> {
        if let Some(slot) = self.slots.load().get(name) {
            return slot.clone();
        }
        self.add_slots(std::iter::once(name));
        self.slots.load()[name].clone()
    }

    /// The VM's current record; `None` when it never reported anything (state `new`).
    pub fn record(&self, vm: &VmDefinition) -> Result<Option<StateRecord>, StateError> {
        self.read(vm, report)
    }

    pub fn state(&self, vm: &VmDefinition) -> Result<VmState, StateError> {
        Ok(self.read(vm, |r| r.state)?.unwrap_or_default())
    }

    /// `f` of the VM's record, once the state it shows is durable.
    fn read<T>(
        &self,
        vm: &VmDefinition,
        f: impl FnOnce(&MachineRecord) -> T,
    ) -> Result<Option<T>, StateError> {
        let slot = self.slot(&vm.name);
        let (value, ticket) = {
            let guard = slot.lock().unwrap_or_else(|p| p.into_inner());
            match guard.as_ref() {
                Some(r) if r.mac == vm.mac => (Some(f(r)), r.state_ticket),
                _ => (None, Ticket::default()),
            }
        };
        self.durable(ticket)?;
        Ok(value)
    }

    /// Records `event` (stamped now) in the VM's timeline and advances its state; returns once
    /// a change into or out of `installed` is durable. For the stack's own observations and
    /// operator actions: what a machine posts goes through [`EventStore::post`].
    pub fn append(&self, vm: &VmDefinition, event: Event) -> Result<StateRecord, StateError> {
        self.write(vm, event, Minted::default(), |_| Ok(()), report)
            .map_err(|e| match e {
                Refused::Failed(e) => e,
                other => StateError(format!("internal error: {other:?}")),
            })
    }

    /// [`EventStore::append`] for a caller that needs no record back.
    pub fn note(&self, vm: &VmDefinition, event: Event) -> Result<(), StateError> {
        self.append(vm, event).map(|_| ())
    }

    /// Records `event` as the start of a network boot and hands it a new token, which replaces
    /// the previous one; returns the token.
    pub fn begin_boot(&self, vm: &VmDefinition, event: Event) -> Result<String, StateError> {
        let token = access::mint()
            .map_err(|e| StateError(format!("cannot make a boot token for {}: {e}", vm.name)))?;
        let minted = Minted {
            token: Some(token.clone()),
            wipe: None,
        };
        self.write(vm, event, minted, |_| Ok(()), |_| ())
            .map_err(|e| match e {
                Refused::Failed(e) => e,
                other => StateError(format!("internal error: {other:?}")),
            })?;
        Ok(token)
    }

    /// The operator's reprovision: the machine's next network boot installs again, and that
    /// install may wipe its disk (the new nonce, handed out in `/config` until `installed`).
    pub fn reprovision(&self, vm: &VmDefinition, event: Event) -> Result<StateRecord, StateError> {
        let wipe = access::mint().map_err(|e| {
            StateError(format!(
                "cannot make a reprovision nonce for {}: {e}",
                vm.name
            ))
        })?;
        let minted = Minted {
            token: None,
            wipe: Some(wipe),
        };
        self.write(vm, event, minted, |_| Ok(()), report)
            .map_err(|e| match e {
                Refused::Failed(e) => e,
                other => StateError(format!("internal error: {other:?}")),
            })
    }

    /// An event a machine posted: recorded only with the machine's current boot token
    /// (`token: None` skips that check, for the operator's control socket), and `installed`
    /// only while it is `installing`.
    pub fn post(
        &self,
        vm: &VmDefinition,
        event: Event,
        token: Option<&str>,
    ) -> Result<StateRecord, Refused> {
        let installed = event.phase == Phase::Installed;
        let check = |r: Option<&MachineRecord>| {
            let current = r.filter(|r| r.mac == vm.mac);
            if let Some(given) = token {
                if !access::token_matches(current.and_then(|r| r.token.as_deref()), given) {
                    return Err(Refused::Token);
                }
            }
            let state = current.map(|r| r.state).unwrap_or_default();
            if installed && state != VmState::Installing {
                return Err(Refused::NotInstalling(state));
            }
            Ok(())
        };
        self.write(vm, event, Minted::default(), check, report)
    }

    /// The VM's current boot token, if a boot handed one out.
    pub fn token(&self, vm: &VmDefinition) -> Result<Option<String>, StateError> {
        Ok(self.read(vm, |r| r.token.clone())?.flatten())
    }

    /// The VM's reprovision nonce, from its reprovision until it reports `installed`.
    pub fn wipe(&self, vm: &VmDefinition) -> Result<Option<String>, StateError> {
        Ok(self.read(vm, |r| r.wipe.clone())?.flatten())
    }

    fn write<T>(
        &self,
        vm: &VmDefinition,
        mut event: Event,
        minted: Minted,
        check: impl FnOnce(Option<&MachineRecord>) -> Result<(), Refused>,
        f: impl FnOnce(&MachineRecord) -> T,
    ) -> Result<T, Refused> {
        event.clean();
        let entry = TimelineEntry {
            at_ms: crate::now_ms(),
            event,
        };
        let slot = self.slot(&vm.name);
        let (value, ticket) = {
            let mut guard = slot.lock().unwrap_or_else(|p| p.into_inner());
            check(guard.as_ref())?;
            let (seq, ticket) = self
                .journal
                .append(&vm.name, vm.mac, &entry, &minted)
                .map_err(|e| StateError(format!("cannot record an event of {}: {e}", vm.name)))?;
            let r = guard.get_or_insert_with(|| MachineRecord::new(&vm.name, vm.mac));
            r.apply(vm.mac, entry, seq, ticket, minted);
            (f(r), r.state_ticket)
        };
        self.durable(ticket)?;
        self.compact_if_grown();
        Ok(value)
    }

    /// The VM's timeline (its last [`crate::journal::TIMELINE_KEEP`] events), oldest first.
    pub fn timeline(&self, name: &str) -> Vec<TimelineEntry> {
        let slot = self.slots.load().get(name).cloned();
        slot.and_then(|s| {
            s.lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .map(|r| r.timeline.iter().cloned().collect())
        })
        .unwrap_or_default()
    }

    fn durable(&self, ticket: Ticket) -> Result<(), StateError> {
        self.journal
            .wait(ticket)
            .map_err(|e| StateError(format!("cannot make the machines' state durable: {e}")))
    }

    /// Starts a compaction in the background once the journal has grown enough.
    fn compact_if_grown(&self) {
        if !self.journal.wants_compaction() || self.compacting.swap(true, Ordering::SeqCst) {
            return;
        }
        let (journal, slots, flag) = (
            self.journal.clone(),
            self.slots.load_full(),
            self.compacting.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name("compact".into())
            .spawn(move || {
                if let Err(e) = compact(&journal, &slots) {
                    log!("journal compaction failed (will retry as it grows): {e}");
                }
                flag.store(false, Ordering::SeqCst);
            });
        if spawned.is_err() {
            self.compacting.store(false, Ordering::SeqCst);
        }
    }

    /// Compacts now (what a start does); for tests and the supervisor.
    pub fn compact(&self) -> std::io::Result<()> {
        compact(&self.journal, &self.slots.load())
    }
}

fn compact(journal: &Journal, slots: &HashMap<String, Arc<Slot>>) -> std::io::Result<()> {
    let segment = journal.rotate()?;
    // Slots are keyed by their record's VM name: sorted as the records would be.
    let mut names: Vec<&String> = slots.keys().collect();
    names.sort();
    let locked = names
        .into_iter()
        .map(|name| slots[name].lock().unwrap_or_else(|p| p.into_inner()));
    journal.write_snapshot(locked, |guard| guard.as_ref())?;
    journal.remove_segments_before(segment)
}

fn report(r: &MachineRecord) -> StateRecord {
    StateRecord {
        mac: r.mac,
        state: r.state,
        since_ms: r.since_ms,
        last_event: r.timeline.back().cloned(),
    }
}
