//! The VM definitions directory: loading, validating, indexing and following changes.
//!
//! Every `*.json` in the directory (not hidden, not in subdirectories) is one VM. A file is
//! rejected, by name and with a reason, when it does not parse, is not named `<name>.json`, or
//! reuses the name, MAC or IP of a file that sorts before it; rejected files never stop the
//! others from being served.
//!
//! The definitions live in memory, indexed by MAC, name and IP, so a lookup costs the same with
//! one or 100,000 VMs. [`crate::watch`] tells the store which files changed; only those are
//! re-read, and the new [`VmSet`] is published whole (readers load it without a lock and never
//! see half an update). SIGHUP ([`VmStore::refresh`]) re-reads every file.
//!
//! The enrollment API writes and removes definitions through [`VmStore::put`] and
//! [`VmStore::remove`]: one at a time (under the reload lock), each whole and durable, the new
//! set published before they return.
//!
//! With `--store etcd://…` ([`VmStore::shared`]) the definitions are the keys
//! `/pxelab/vms/<name>.json` of etcd instead of files, validated the same way; every stack on the
//! cluster polls them every half second ([`VmStore::rescan`], on a thread of the supervisor), so a
//! definition written through one stack's API is served by the others within that. The
//! `<name>.noreboot` flag stays a file of each stack's VMs directory.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs,
    net::Ipv4Addr,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use arc_swap::ArcSwap;
use pxelab_contract::{InvalidVm, Mac, VmDefinition};

use crate::{
    etcd::{self, Etcd},
    log,
    watch::{Changes, Watched},
};

/// A VM definition file is a few hundred bytes; anything this large is a mistake.
const MAX_VM_FILE: u64 = 64 * 1024;

/// One consistent view of the directory.
#[derive(Debug, Default)]
pub struct VmSet {
    /// Valid definitions, sorted by name.
    pub vms: Vec<VmDefinition>,
    pub invalid: Vec<InvalidVm>,
    /// VMs whose installer stays up after installing (`<name>.noreboot` exists).
    noreboot: HashSet<String>,
    by_mac: HashMap<Mac, usize>,
    by_name: HashMap<String, usize>,
    by_ip: HashMap<Ipv4Addr, usize>,
    /// Bumped each time the store publishes a changed set.
    pub generation: u64,
}

impl PartialEq for VmSet {
    /// Same definitions, rejections and flags (the indexes follow from them).
    fn eq(&self, other: &VmSet) -> bool {
        self.vms == other.vms && self.invalid == other.invalid && self.noreboot == other.noreboot
    }
}

impl VmSet {
    pub fn by_mac(&self, mac: Mac) -> Option<&VmDefinition> {
        self.by_mac.get(&mac).map(|i| &self.vms[*i])
    }

    pub fn by_name(&self, name: &str) -> Option<&VmDefinition> {
        self.by_name.get(name).map(|i| &self.vms[*i])
    }

    pub fn by_ip(&self, ip: Ipv4Addr) -> Option<&VmDefinition> {
        self.by_ip.get(&ip).map(|i| &self.vms[*i])
    }

    pub fn reboots(&self, name: &str) -> bool {
        !self.noreboot.contains(name)
    }

    /// Reads and validates every definition in `dir`. A missing directory is an empty set.
    pub fn load(dir: &Path) -> VmSet {
        Files::read_all(dir).set()
    }
}

/// What the directory holds, file by file: the store's reload state.
#[derive(Default)]
struct Files {
    /// `<name>.json` → its definition or why it is rejected, in file-name order.
    parsed: BTreeMap<String, Result<VmDefinition, String>>,
    noreboot: HashSet<String>,
}

impl Files {
    /// The definitions under etcd's `vms/` (keys named as files are).
    fn from_etcd(dir: &Path, keys: Vec<(String, Vec<u8>)>) -> Files {
        let mut files = Files::default();
        for (file, bytes) in keys {
            let Some(stem) = file.strip_suffix(".json") else {
                continue;
            };
            let parsed = std::str::from_utf8(&bytes)
                .map_err(|_| "not UTF-8".to_string())
                .and_then(|text| parse_one(stem, text));
            files.parsed.insert(file, parsed);
        }
        files.noreboot = Files::read_all(dir).noreboot;
        files
    }

    fn read_all(dir: &Path) -> Files {
        let mut files = Files::default();
        if let Ok(entries) = fs::read_dir(dir) {
            for e in entries.flatten() {
                files.update(dir, &e.file_name().to_string_lossy());
            }
        }
        files
    }

    /// Re-reads one directory entry (gone, new or changed).
    fn update(&mut self, dir: &Path, file: &str) {
        let path = dir.join(file);
        if let Some(name) = file.strip_suffix(".noreboot") {
            if path.exists() {
                self.noreboot.insert(name.to_string());
            } else {
                self.noreboot.remove(name);
            }
        } else if is_vm_file(&path) {
            self.parsed.insert(file.to_string(), read_one(&path));
        } else {
            self.parsed.remove(file);
        }
    }

    /// The valid definitions in file-name order, each clash rejected in favour of the earlier.
    fn set(&self) -> VmSet {
        let mut set = VmSet {
            noreboot: self.noreboot.clone(),
            ..VmSet::default()
        };
        let mut names = BTreeMap::new();
        let mut macs = BTreeMap::new();
        let mut ips = BTreeMap::new();
        for (file, parsed) in &self.parsed {
            let file = file.clone();
            match parsed {
                Err(error) => set.invalid.push(InvalidVm {
                    file,
                    error: error.clone(),
                }),
                Ok(vm) => {
                    let clash = names
                        .get(&vm.name)
                        .map(|f| format!("name {} is already used by {f}", vm.name))
                        .or_else(|| {
                            macs.get(&vm.mac)
                                .map(|f| format!("MAC {} is already used by {f}", vm.mac))
                        })
                        .or_else(|| {
                            vm.addresses().find_map(|ip| {
                                ips.get(&ip)
                                    .map(|f| format!("IP {ip} is already used by {f}"))
                            })
                        });
                    if let Some(error) = clash {
                        set.invalid.push(InvalidVm {
                            file,
                            error: format!("{error}: give this VM its own"),
                        });
                        continue;
                    }
                    names.insert(vm.name.clone(), file.clone());
                    macs.insert(vm.mac, file.clone());
                    // No two VMs may share an address, IPv4 or IPv6.
                    for ip in vm.addresses() {
                        ips.insert(ip, file.clone());
                    }
                    set.vms.push(vm.clone());
                }
            }
        }
        set.vms.sort_by(|a, b| a.name.cmp(&b.name));
        for (i, vm) in set.vms.iter().enumerate() {
            set.by_mac.insert(vm.mac, i);
            set.by_name.insert(vm.name.clone(), i);
            if let Some(ip) = vm.ip {
                set.by_ip.insert(ip, i);
            }
        }
        set
    }
}

fn is_vm_file(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    name.ends_with(".json") && !name.starts_with('.') && path.is_file()
}

fn read_one(path: &Path) -> Result<VmDefinition, String> {
    let meta = fs::metadata(path).map_err(|e| format!("cannot read: {e}"))?;
    if meta.len() > MAX_VM_FILE {
        return Err(format!(
            "file is {} bytes; a VM definition is at most {MAX_VM_FILE}",
            meta.len()
        ));
    }
    let text = fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))?;
    parse_one(
        path.file_stem().and_then(|s| s.to_str()).unwrap_or(""),
        &text,
    )
}

/// The definition in `text`, stored under the name `stem` (`<stem>.json`).
fn parse_one(stem: &str, text: &str) -> Result<VmDefinition, String> {
    if text.len() as u64 > MAX_VM_FILE {
        return Err(format!(
            "{} bytes; a VM definition is at most {MAX_VM_FILE}",
            text.len()
        ));
    }
    let vm = VmDefinition::from_json(text).map_err(|e| e.to_string())?;
    if stem != vm.name {
        return Err(format!(
            "the file of VM {:?} must be named {}.json",
            vm.name, vm.name
        ));
    }
    Ok(vm)
}

/// What identifies the directory's state cheaply: names, sizes, inodes and change times.
type Fingerprint = Vec<(String, u64, u64, i64, i64, i64, i64)>;

fn fingerprint(dir: &Path) -> Fingerprint {
    let mut fp: Fingerprint = match fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let m = fs::metadata(e.path()).ok()?;
                Some((
                    name,
                    m.len(),
                    m.ino(),
                    m.mtime(),
                    m.mtime_nsec(),
                    m.ctime(),
                    m.ctime_nsec(),
                ))
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    fp.sort();
    fp
}

/// Why [`VmStore::put`] did not change the directory; one line each.
#[derive(Debug)]
pub enum WriteError {
    /// The definition's MAC or IP is another VM's.
    Conflict(String),
    Io(String),
}

/// The shared, self-updating view of the VMs directory.
pub struct VmStore {
    dir: PathBuf,
    current: ArcSwap<VmSet>,
    /// Reload state; locked only while applying changes, never by readers.
    files: Mutex<(Files, Fingerprint)>,
    /// `--store etcd://…`: the definitions are etcd's, the directory holds only flag files.
    shared: Option<Arc<Etcd>>,
    /// Whether the last look at etcd failed (logged once per outage).
    unreachable: std::sync::atomic::AtomicBool,
    /// Whether etcd's definitions were ever read (until then the set is empty, not known).
    loaded: std::sync::atomic::AtomicBool,
}

fn vms_prefix() -> String {
    format!("{}vms/", etcd::PREFIX)
}

impl VmStore {
    pub fn new(dir: PathBuf) -> VmStore {
        VmStore::open(dir, None)
    }

    /// The definitions kept in `etcd` (see the module's notes); `dir` holds the flag files.
    pub fn shared(dir: PathBuf, etcd: Arc<Etcd>) -> VmStore {
        VmStore::open(dir, Some(etcd))
    }

    fn open(dir: PathBuf, shared: Option<Arc<Etcd>>) -> VmStore {
        let store = VmStore {
            dir,
            current: ArcSwap::from_pointee(VmSet::default()),
            files: Mutex::new((Files::default(), Vec::new())),
            shared,
            unreachable: Default::default(),
            loaded: Default::default(),
        };
        store.refresh();
        store
    }

    /// Whether the definitions are etcd's (followed by polling [`VmStore::rescan`]).
    pub fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    /// Whether a MAC missing from [`VmStore::current`] may still be defined: etcd's definitions
    /// were never read, or its last poll failed.
    pub fn uncertain(&self) -> bool {
        use std::sync::atomic::Ordering;
        self.shared.is_some()
            && (!self.loaded.load(Ordering::SeqCst) || self.unreachable.load(Ordering::SeqCst))
    }

    /// Reads every definition from etcd; on failure keeps serving the last ones read.
    fn poll(&self, etcd: &Etcd) -> bool {
        use std::sync::atomic::Ordering;
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        match etcd.list(&vms_prefix()) {
            Ok(keys) => {
                if self.unreachable.swap(false, Ordering::SeqCst) {
                    log!("etcd answers again: following the VM definitions");
                }
                files.0 = Files::from_etcd(&self.dir, keys);
                self.loaded.store(true, Ordering::SeqCst);
                self.publish(&files.0)
            }
            Err(e) => {
                if !self.unreachable.swap(true, Ordering::SeqCst) {
                    log!("cannot read the VM definitions from etcd (serving the last ones read): {e}");
                }
                false
            }
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The definitions as last loaded (lock-free; see [`crate::watch::Watcher::settle`]).
    pub fn current(&self) -> Arc<VmSet> {
        self.current.load_full()
    }

    /// Re-reads every file. Returns true when the set changed.
    pub fn refresh(&self) -> bool {
        if let Some(etcd) = &self.shared {
            return self.poll(etcd);
        }
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        *files = (Files::read_all(&self.dir), fingerprint(&self.dir));
        self.publish(&files.0)
    }

    /// Re-reads what changed since the last look (by metadata): the periodic fallback for
    /// changes no notice reported.
    pub fn rescan(&self) -> bool {
        if let Some(etcd) = &self.shared {
            return self.poll(etcd);
        }
        let fp = fingerprint(&self.dir);
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        if fp == files.1 {
            return false;
        }
        let old: HashMap<&String, _> = files.1.iter().map(|e| (&e.0, e)).collect();
        let new: HashMap<&String, _> = fp.iter().map(|e| (&e.0, e)).collect();
        let mut changed: Vec<String> = fp
            .iter()
            .filter(|e| old.get(&e.0) != Some(e))
            .map(|e| e.0.clone())
            .collect();
        changed.extend(
            files
                .1
                .iter()
                .filter(|e| !new.contains_key(&e.0))
                .map(|e| e.0.clone()),
        );
        for name in &changed {
            files.0.update(&self.dir, name);
        }
        files.1 = fp;
        self.publish(&files.0)
    }

    /// Writes `vm` as `<name>.json` (atomically and durably) unless its MAC or IP is another
    /// VM's, and publishes the new set before returning, so the next request sees it. `Ok(true)`
    /// when no VM of that name was defined before.
    pub fn put(&self, vm: &VmDefinition) -> Result<bool, WriteError> {
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.current();
        for other in current.vms.iter().filter(|o| o.name != vm.name) {
            let clash = if other.mac == vm.mac {
                format!("MAC {}", vm.mac)
            } else if let Some(ip) = vm
                .addresses()
                .find(|ip| other.addresses().any(|o| o == *ip))
            {
                format!("IP {ip}")
            } else {
                continue;
            };
            return Err(WriteError::Conflict(format!(
                "{clash} is already used by VM {} ({}.json): give {} its own",
                other.name, other.name, vm.name
            )));
        }
        let file = format!("{}.json", vm.name);
        if let Some(etcd) = &self.shared {
            etcd.put(&format!("{}{file}", vms_prefix()), vm.to_json().as_bytes())
                .map_err(|e| WriteError::Io(format!("cannot write {file} to etcd: {e}")))?;
            files.0.parsed.insert(file, Ok(vm.clone()));
            self.publish(&files.0);
            return Ok(current.by_name(&vm.name).is_none());
        }
        let path = self.dir.join(&file);
        crate::write_atomic(&path, vm.to_json().as_bytes(), true)
            .map_err(|e| WriteError::Io(format!("cannot write {}: {e}", path.display())))?;
        files.0.update(&self.dir, &file);
        self.publish(&files.0);
        Ok(current.by_name(&vm.name).is_none())
    }

    /// Removes the definition of VM `name` (durably) and publishes the new set; `Ok(None)` when
    /// no VM of that name is defined, else the definition removed. The error is one line.
    pub fn remove(&self, name: &str) -> Result<Option<VmDefinition>, String> {
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.current();
        let Some(vm) = current.by_name(name) else {
            return Ok(None);
        };
        // A defined VM's file is always `<name>.json` (see `read_one`).
        let file = format!("{}.json", vm.name);
        if let Some(etcd) = &self.shared {
            etcd.delete(&format!("{}{file}", vms_prefix()))
                .map_err(|e| format!("cannot remove {file} from etcd: {e}"))?;
            files.0.parsed.remove(&file);
            self.publish(&files.0);
            return Ok(Some(vm.clone()));
        }
        let path = self.dir.join(&file);
        fs::remove_file(&path)
            .and_then(|()| crate::sync_dir(&self.dir))
            .map_err(|e| format!("cannot remove {}: {e}", path.display()))?;
        files.0.update(&self.dir, &file);
        self.publish(&files.0);
        Ok(Some(vm.clone()))
    }

    fn publish(&self, files: &Files) -> bool {
        let mut set = files.set();
        let current = self.current.load();
        if set == **current {
            return false;
        }
        report(&set);
        set.generation = current.generation + 1;
        self.current.store(Arc::new(set));
        true
    }
}

impl Watched for VmStore {
    fn dirs(&self) -> Vec<PathBuf> {
        vec![self.dir.clone()]
    }

    fn changed(&self, changes: Changes<'_>) {
        let Changes::Entries(entries) = changes else {
            self.rescan();
            return;
        };
        if self.is_shared() {
            // Only flag files changed; the definitions come from etcd.
            self.rescan();
            return;
        }
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        for (_, name) in entries {
            files.0.update(&self.dir, &name.to_string_lossy());
        }
        self.publish(&files.0);
    }
}

/// Logs the set; long lists are cut (a site with thousands of VMs would get a line per VM at
/// each change otherwise).
fn report(set: &VmSet) {
    const SHOWN: usize = 20;
    let names: Vec<&str> = set.vms.iter().map(|v| v.name.as_str()).collect();
    log!(
        "VM definitions: {} valid ({})",
        names.len(),
        shorten(&names, SHOWN)
    );
    for bad in set.invalid.iter().take(SHOWN) {
        log!("skipping VM file {}: {}", bad.file, bad.error);
    }
    if set.invalid.len() > SHOWN {
        log!("skipping {} more VM files", set.invalid.len() - SHOWN);
    }
    let no_ip: Vec<&str> = set
        .vms
        .iter()
        .filter(|v| v.ip.is_none())
        .map(|v| v.name.as_str())
        .collect();
    match no_ip.as_slice() {
        [] => {}
        [one] => log!("VM {one} has no \"ip\": it gets no DHCP lease until one is set (except from the site's server with --dhcp proxy)"),
        many => log!(
            "VMs {} have no \"ip\": they get no DHCP lease until one is set (except from the site's server with --dhcp proxy)",
            shorten(many, SHOWN)
        ),
    }
}

fn shorten(names: &[&str], shown: usize) -> String {
    if names.len() <= shown {
        return names.join(", ");
    }
    format!(
        "{}, … and {} more",
        names[..shown].join(", "),
        names.len() - shown
    )
}
