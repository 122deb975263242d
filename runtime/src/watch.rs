//! Change notices for the directories the stack serves from (inotify), so what it keeps in
//! memory (the VM index, the distro catalog) is reloaded when a file changes instead of being
//! checked on every request.
//!
//! One background thread reads the notices and hands each watched store the names that changed;
//! every 10 s it also asks each store to rescan (what inotify cannot see: a network filesystem,
//! a change from another mount namespace, a dropped queue). A request first calls
//! [`Watcher::settle`]: one `ioctl(FIONREAD)` and an atomic load, no lock. Only when a notice is
//! queued or being applied does it wait for the thread, so a file written before a request was
//! sent is always seen by that request — the guarantee of the former per-request directory scan,
//! without its cost.

use std::{
    collections::HashMap,
    ffi::{CString, OsStr, OsString},
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Condvar, Mutex, Weak,
    },
    time::{Duration, Instant},
};

use crate::log;

/// How often every store rescans regardless of notices.
pub const RESCAN_EVERY: Duration = Duration::from_secs(10);

/// What a store learns from the watcher.
pub enum Changes<'a> {
    /// Entries that changed (created, written, removed, renamed) in one of its directories.
    Entries(&'a [(PathBuf, OsString)]),
    /// Anything may have changed (periodic rescan, queue overflow, a directory replaced).
    Everything,
}

/// A store that keeps files in memory and must follow their changes.
pub trait Watched: Send + Sync {
    /// The directories to watch now; asked again after each batch, so new subdirectories (a
    /// freshly pulled distro) are watched from then on. Missing directories are skipped.
    fn dirs(&self) -> Vec<PathBuf>;
    fn changed(&self, changes: Changes<'_>);
}

/// The notices for everything one stack serves; dropping it stops its thread.
pub struct Watcher {
    shared: Arc<Shared>,
}

struct Shared {
    fd: OwnedFd,
    /// True while the thread applies a batch it has read.
    busy: AtomicBool,
    /// Signalled after each batch.
    done: (Mutex<u64>, Condvar),
    stop: AtomicBool,
}

const MASK: u32 = libc::IN_CREATE
    | libc::IN_DELETE
    | libc::IN_CLOSE_WRITE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_ATTRIB
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF
    | libc::IN_ONLYDIR;

impl Watcher {
    /// Watches the stores' directories from a background thread. The stores are held weakly:
    /// the thread ends when they are gone or the watcher is dropped.
    pub fn start(stores: Vec<Weak<dyn Watched>>) -> io::Result<Watcher> {
        // SAFETY: inotify_init1 has no preconditions; the result is checked before use.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let shared = Arc::new(Shared {
            // SAFETY: fd is a new descriptor that nothing else owns.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            busy: AtomicBool::new(false),
            done: (Mutex::new(0), Condvar::new()),
            stop: AtomicBool::new(false),
        });
        let mut dirs = HashMap::new();
        add_watches(&shared, &stores, &mut dirs);
        let thread_shared = shared.clone();
        std::thread::Builder::new()
            .name("watch".into())
            .spawn(move || run(&thread_shared, &stores, dirs))?;
        Ok(Watcher { shared })
    }

    /// Returns once every change queued before the call has been applied. Costs one syscall
    /// when nothing is pending.
    pub fn settle(&self) {
        let deadline = Instant::now() + Duration::from_secs(2);
        while pending(&self.shared) || self.shared.busy.load(Ordering::SeqCst) {
            if Instant::now() >= deadline {
                // A store stuck reloading must not hang every request: serve what is loaded.
                return;
            }
            let (lock, cvar) = &self.shared.done;
            let batches = lock.lock().unwrap_or_else(|p| p.into_inner());
            let _ = cvar.wait_timeout(batches, Duration::from_millis(5));
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
    }
}

/// Bytes of notices queued and not yet read.
fn pending(shared: &Shared) -> bool {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int through the valid pointer.
    let rc = unsafe { libc::ioctl(shared.fd.as_raw_fd(), libc::FIONREAD, &mut n) };
    rc == 0 && n > 0
}

/// Watch descriptor → (directory, index of the store that asked for it).
type Dirs = HashMap<i32, (PathBuf, usize)>;

fn add_watches(shared: &Shared, stores: &[Weak<dyn Watched>], dirs: &mut Dirs) {
    for (i, store) in stores.iter().enumerate() {
        let Some(store) = store.upgrade() else {
            continue;
        };
        for dir in store.dirs() {
            let Ok(c) = CString::new(dir.as_os_str().as_bytes()) else {
                continue;
            };
            // SAFETY: a valid descriptor and NUL-terminated path.
            let wd = unsafe { libc::inotify_add_watch(shared.fd.as_raw_fd(), c.as_ptr(), MASK) };
            if wd >= 0 {
                dirs.insert(wd, (dir, i));
            }
        }
    }
}

fn run(shared: &Shared, stores: &[Weak<dyn Watched>], mut dirs: Dirs) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut last_rescan = Instant::now();
    loop {
        if shared.stop.load(Ordering::SeqCst) || stores.iter().all(|s| s.strong_count() == 0) {
            return;
        }
        let mut fds = libc::pollfd {
            fd: shared.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let ready = unsafe { libc::poll(&mut fds, 1, 500) } > 0;
        let rescan = last_rescan.elapsed() >= RESCAN_EVERY;
        if !ready && !rescan {
            continue;
        }
        // Set before the read: a request that finds the queue empty because this thread has
        // just read it then sees `busy` and waits for the batch to be applied.
        shared.busy.store(true, Ordering::SeqCst);
        let mut changes: Vec<Vec<(PathBuf, OsString)>> = vec![Vec::new(); stores.len()];
        let mut everything = vec![false; stores.len()];
        let mut new_dirs = false;
        loop {
            // SAFETY: reads into a buffer we own, at most its length.
            let n =
                unsafe { libc::read(shared.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
            for (wd, mask, name) in parse(&buf[..n as usize]) {
                if mask & libc::IN_Q_OVERFLOW != 0 {
                    everything.iter_mut().for_each(|e| *e = true);
                    continue;
                }
                let Some((dir, store)) = dirs.get(&wd).cloned() else {
                    continue;
                };
                if mask & (libc::IN_IGNORED | libc::IN_DELETE_SELF | libc::IN_MOVE_SELF) != 0 {
                    dirs.remove(&wd);
                    everything[store] = true;
                    new_dirs = true;
                    continue;
                }
                if mask & libc::IN_ISDIR != 0 {
                    new_dirs = true;
                }
                if let Some(name) = name {
                    changes[store].push((dir, name));
                }
            }
        }
        if rescan {
            last_rescan = Instant::now();
            everything.iter_mut().for_each(|e| *e = true);
            new_dirs = true;
        }
        if new_dirs {
            add_watches(shared, stores, &mut dirs);
        }
        for (i, store) in stores.iter().enumerate() {
            let Some(store) = store.upgrade() else {
                continue;
            };
            if everything[i] {
                store.changed(Changes::Everything);
            } else if !changes[i].is_empty() {
                store.changed(Changes::Entries(&changes[i]));
            }
        }
        shared.busy.store(false, Ordering::SeqCst);
        let (lock, cvar) = &shared.done;
        *lock.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        cvar.notify_all();
    }
}

/// `(wd, mask, name)` of each `inotify_event` in `bytes`.
fn parse(bytes: &[u8]) -> Vec<(i32, u32, Option<OsString>)> {
    let header = std::mem::size_of::<libc::inotify_event>();
    let mut out = Vec::new();
    let mut at = 0;
    while at + header <= bytes.len() {
        // SAFETY: the kernel wrote a whole inotify_event at `at`; read_unaligned copes with
        // the byte buffer's alignment.
        let ev: libc::inotify_event =
            unsafe { std::ptr::read_unaligned(bytes[at..].as_ptr().cast()) };
        let len = ev.len as usize;
        let name_bytes = bytes.get(at + header..at + header + len).unwrap_or(&[]);
        let name = name_bytes.split(|b| *b == 0).next().unwrap_or(&[]);
        let name = (!name.is_empty()).then(|| OsStr::from_bytes(name).to_os_string());
        out.push((ev.wd, ev.mask, name));
        at += header + len;
    }
    out
}

/// Logs once that a store runs without notices (then only the periodic rescan updates it).
pub fn warn_unwatched(what: &Path, e: &io::Error) {
    log!(
        "cannot watch {} for changes ({e}); changes are noticed by the periodic rescan only",
        what.display()
    );
}
