//! The VM definitions directory: loading, validating and noticing changes.
//!
//! Every `*.json` in the directory (not hidden, not in subdirectories) is one VM. A file is
//! rejected, by name and with a reason, when it does not parse, is not named `<name>.json`, or
//! reuses the name, MAC or IP of a file that sorts before it; rejected files never stop the
//! others from being served. [`VmStore::current`] re-reads the directory whenever a file's
//! metadata changed, so a request always sees the definitions as they are on disk.

use std::{
    collections::BTreeMap,
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use pxelab_contract::{InvalidVm, Mac, VmDefinition};

use crate::log;

/// A VM definition file is a few hundred bytes; anything this large is a mistake.
const MAX_VM_FILE: u64 = 64 * 1024;

/// One consistent view of the directory.
#[derive(Debug, Default, PartialEq)]
pub struct VmSet {
    /// Valid definitions, sorted by name.
    pub vms: Vec<VmDefinition>,
    pub invalid: Vec<InvalidVm>,
}

impl VmSet {
    pub fn by_mac(&self, mac: Mac) -> Option<&VmDefinition> {
        self.vms.iter().find(|vm| vm.mac == mac)
    }

    pub fn by_name(&self, name: &str) -> Option<&VmDefinition> {
        self.vms.iter().find(|vm| vm.name == name)
    }

    /// Reads and validates every definition in `dir`. A missing directory is an empty set.
    pub fn load(dir: &Path) -> VmSet {
        let mut set = VmSet::default();
        let mut files: Vec<PathBuf> = match fs::read_dir(dir) {
            Ok(entries) => entries
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| is_vm_file(p))
                .collect(),
            Err(_) => return set,
        };
        files.sort();
        let mut names = BTreeMap::new();
        let mut macs = BTreeMap::new();
        let mut ips = BTreeMap::new();
        for path in files {
            let file = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            match read_one(&path) {
                Err(error) => set.invalid.push(InvalidVm { file, error }),
                Ok(vm) => {
                    let clash = names
                        .get(&vm.name)
                        .map(|f| format!("name {} is already used by {f}", vm.name))
                        .or_else(|| {
                            macs.get(&vm.mac)
                                .map(|f| format!("MAC {} is already used by {f}", vm.mac))
                        })
                        .or_else(|| {
                            vm.ip.and_then(|ip| {
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
                    if let Some(ip) = vm.ip {
                        ips.insert(ip, file.clone());
                    }
                    set.vms.push(vm);
                }
            }
        }
        set.vms.sort_by(|a, b| a.name.cmp(&b.name));
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
    let vm = VmDefinition::from_json(&text).map_err(|e| e.to_string())?;
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
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

/// The shared, self-refreshing view of the VMs directory.
pub struct VmStore {
    dir: PathBuf,
    cached: Mutex<(Fingerprint, Arc<VmSet>)>,
}

impl VmStore {
    pub fn new(dir: PathBuf) -> VmStore {
        let store = VmStore {
            dir,
            cached: Mutex::new((Vec::new(), Arc::new(VmSet::default()))),
        };
        store.refresh();
        store
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The definitions as on disk now (re-read when any file's metadata changed).
    pub fn current(&self) -> Arc<VmSet> {
        let fp = fingerprint(&self.dir);
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if cached.0 != fp {
            let set = VmSet::load(&self.dir);
            if set != *cached.1 {
                report(&set);
            }
            *cached = (fp, Arc::new(set));
        }
        cached.1.clone()
    }

    /// Re-reads every file regardless of metadata (catches a same-size rewrite within one
    /// timestamp tick). Returns true when the set changed.
    pub fn refresh(&self) -> bool {
        let fp = fingerprint(&self.dir);
        let set = VmSet::load(&self.dir);
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        let changed = set != *cached.1;
        if changed {
            report(&set);
            cached.1 = Arc::new(set);
        }
        cached.0 = fp;
        changed
    }
}

fn report(set: &VmSet) {
    let names: Vec<&str> = set.vms.iter().map(|v| v.name.as_str()).collect();
    log!(
        "VM definitions: {} valid ({})",
        names.len(),
        names.join(", ")
    );
    for bad in &set.invalid {
        log!("skipping VM file {}: {}", bad.file, bad.error);
    }
    for vm in set.vms.iter().filter(|v| v.ip.is_none()) {
        log!(
            "VM {} has no \"ip\": it gets no DHCP lease until one is set",
            vm.name
        );
    }
}
