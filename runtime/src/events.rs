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
//!
//! With `--store etcd://…` ([`EventStore::share`]) a machine's state, since, token and nonce are
//! the cluster's ([`crate::etcd::Shared`]): read from etcd by every request that needs them, and
//! changed only by a transaction on the revision that was read, checks included, so two stacks
//! cannot both hand out an install or both enter `installed`. The timeline and the journal stay
//! the stack's own (what it saw). etcd unreachable is a [`StateError`]: never a guess.

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
    etcd::{self, Etcd, Shared},
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

/// A VM's state and the secrets of its current boot ([`EventStore::boot_view`]).
#[derive(Debug, Default)]
pub struct BootView {
    pub state: VmState,
    /// The token the boot was handed, if a boot handed one out.
    pub token: Option<String>,
    /// The reprovision nonce, from the operator's reprovision until `installed`.
    pub wipe: Option<String>,
}

/// Why [`EventStore::post`] did not record an event.
#[derive(Debug)]
pub enum Refused {
    /// The request's token is not the machine's current boot token (or it has none).
    Token,
    /// `installed` while the machine is not `installing`; its state is given.
    NotInstalling(VmState),
    /// `installed` again, with the token of the install that reported it: the installer's
    /// retry after an acknowledgement lost on the way. Acknowledged, not recorded twice (nor
    /// its host keys replaced, which the token readable in the installed system could try).
    Repeated,
    /// Over the network, an event other than `cloud-init-done` from an installed machine: its
    /// boot token was handed to the installer and is readable in the installed system (its
    /// kernel command line), where it must not change what the stack believes.
    Installed,
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
    /// `--store etcd://…`: where the machines' states and tokens are kept.
    shared: Option<Arc<Etcd>>,
}

/// Changes of one machine's shared record retried when other stacks changed it in between.
const SWAP_ATTEMPTS: usize = 16;

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
            shared: None,
        })
    }

    /// Keeps the machines' states and tokens in `etcd`, shared with the other stacks using it.
    pub fn share(mut self, etcd: Arc<Etcd>) -> EventStore {
        self.shared = Some(etcd);
        self
    }

    /// The machine's shared record and its revision, folded into `guard`.
    fn fetch(
        &self,
        etcd: &Etcd,
        vm: &VmDefinition,
        guard: &mut Option<MachineRecord>,
    ) -> Result<(Option<Shared>, i64), StateError> {
        let (bytes, revision) = etcd.get(&shared_key(&vm.name)).map_err(|e| {
            StateError(format!(
                "cannot read the state of {} from etcd: {e}",
                vm.name
            ))
        })?;
        let shared = bytes
            .map(|b| serde_json::from_slice::<Shared>(&b))
            .transpose()
            .map_err(|e| {
                StateError(format!(
                    "the state of {} in etcd ({}) is unreadable: {e}",
                    vm.name,
                    shared_key(&vm.name)
                ))
            })?;
        if shared.is_some() || guard.is_some() {
            let r = guard.get_or_insert_with(|| MachineRecord::new(&vm.name, vm.mac));
            let s = shared.clone().unwrap_or(Shared {
                mac: vm.mac,
                state: VmState::New,
                since_ms: 0,
                token: None,
                wipe: None,
            });
            (r.mac, r.state, r.since_ms, r.token, r.wipe) =
                (s.mac, s.state, s.since_ms, s.token, s.wipe);
        }
        Ok((shared, revision))
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

    /// What `/config` needs of the VM's record, in one read: its state, boot token and
    /// reprovision nonce.
    pub fn boot_view(&self, vm: &VmDefinition) -> Result<BootView, StateError> {
        Ok(self
            .read(vm, |r| BootView {
                state: r.state,
                token: r.token.clone(),
                wipe: r.wipe.clone(),
            })?
            .unwrap_or_default())
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
            let mut guard = slot.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(etcd) = &self.shared {
                self.fetch(etcd, vm, &mut guard)?;
            }
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
    /// the previous one; returns the token. `installs`: the boot is an install, refused if the
    /// machine is `installed` by now (another stack's install finished since it was asked).
    pub fn begin_boot(
        &self,
        vm: &VmDefinition,
        event: Event,
        installs: bool,
    ) -> Result<String, StateError> {
        let token = access::mint()
            .map_err(|e| StateError(format!("cannot make a boot token for {}: {e}", vm.name)))?;
        let minted = Minted {
            token: Some(token.clone()),
            wipe: None,
        };
        let check = |r: Option<&MachineRecord>| {
            match r {
            Some(r) if installs && r.mac == vm.mac && r.state == VmState::Installed => {
                Err(Refused::Failed(StateError(format!(
                    "{} was installed meanwhile (through another stack); its next boot starts its disk",
                    vm.name
                ))))
            }
            _ => Ok(()),
        }
        };
        self.write(vm, event, minted, check, |_| ())
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
        let phase = event.phase;
        let check = |r: Option<&MachineRecord>| {
            let current = r.filter(|r| r.mac == vm.mac);
            if let Some(given) = token {
                if !access::token_matches(current.and_then(|r| r.token.as_deref()), given) {
                    return Err(Refused::Token);
                }
            }
            let state = current.map(|r| r.state).unwrap_or_default();
            match phase {
                Phase::Installed if state == VmState::Installed && token.is_some() => {
                    Err(Refused::Repeated)
                }
                Phase::Installed if state != VmState::Installing => {
                    Err(Refused::NotInstalling(state))
                }
                Phase::Installed | Phase::CloudInitDone => Ok(()),
                _ if token.is_some() && state == VmState::Installed => Err(Refused::Installed),
                _ => Ok(()),
            }
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
        check: impl Fn(Option<&MachineRecord>) -> Result<(), Refused>,
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
            match &self.shared {
                Some(etcd) => self.swap(etcd, vm, &mut guard, &entry, &minted, check)?,
                None => check(guard.as_ref())?,
            }
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

    /// Changes the machine's shared record as `entry` does, if `check` passes on the record as
    /// it is now; read and written again when another stack changed it in between.
    fn swap(
        &self,
        etcd: &Etcd,
        vm: &VmDefinition,
        guard: &mut Option<MachineRecord>,
        entry: &TimelineEntry,
        minted: &Minted,
        check: impl Fn(Option<&MachineRecord>) -> Result<(), Refused>,
    ) -> Result<(), Refused> {
        for _ in 0..SWAP_ATTEMPTS {
            let (shared, revision) = self.fetch(etcd, vm, guard)?;
            check(guard.as_ref())?;
            let next = next_shared(guard.as_ref(), vm, entry, minted);
            if shared.as_ref() == Some(&next) {
                return Ok(());
            }
            let bytes = serde_json::to_vec(&next)
                .map_err(|e| StateError(format!("cannot encode the state of {}: {e}", vm.name)))?;
            let written = etcd
                .swap(&shared_key(&vm.name), revision, &bytes)
                .map_err(|e| {
                    StateError(format!(
                        "cannot write the state of {} to etcd: {e}",
                        vm.name
                    ))
                })?;
            if written {
                return Ok(());
            }
        }
        Err(Refused::Failed(StateError(format!(
            "the state of {} in etcd kept changing under {SWAP_ATTEMPTS} attempts to record an event",
            vm.name
        ))))
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

fn shared_key(name: &str) -> String {
    format!("{}machines/{name}", etcd::PREFIX)
}

/// The shared part of `current` once `entry` (handing out `minted`) is folded in.
fn next_shared(
    current: Option<&MachineRecord>,
    vm: &VmDefinition,
    entry: &TimelineEntry,
    minted: &Minted,
) -> Shared {
    // Without the timeline, which `apply` only appends to.
    let mut r = MachineRecord::new(&vm.name, vm.mac);
    if let Some(c) = current {
        (r.mac, r.state, r.since_ms, r.token, r.wipe) =
            (c.mac, c.state, c.since_ms, c.token.clone(), c.wipe.clone());
    }
    r.apply(vm.mac, entry.clone(), 0, Ticket::default(), minted.clone());
    Shared {
        mac: r.mac,
        state: r.state,
        since_ms: r.since_ms,
        token: r.token,
        wipe: r.wipe,
    }
}

fn report(r: &MachineRecord) -> StateRecord {
    StateRecord {
        mac: r.mac,
        state: r.state,
        since_ms: r.since_ms,
        last_event: r.timeline.back().cloned(),
    }
}
