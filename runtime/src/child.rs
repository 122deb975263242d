//! One supervised child process (dnsmasq, nfs-ganesha): started, watched, restarted with a
//! minimum interval, stopped with a grace period.
//!
//! A child runs in its own process group (a terminal's Ctrl-C reaches only the stack, which
//! stops its children in order), gets SIGTERM from the kernel if the stack dies first
//! (`PR_SET_PDEATHSIG`), and has its stdio on its log file, so it never holds a pipe of the
//! stack's caller open. When it exits on its own, the exit status and its log's last lines go to
//! the stack's log; the owner decides whether to start it again, at most every
//! [`RESTART_INTERVAL`] (a child that cannot run would otherwise be respawned in a tight loop).

use std::{
    fs,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::log;

/// Least time between two start attempts of one child.
pub const RESTART_INTERVAL: Duration = Duration::from_secs(2);

pub struct Supervised {
    /// How the stack's log names it (`dnsmasq`, `nfs-ganesha`).
    name: &'static str,
    log_path: PathBuf,
    child: Option<Child>,
    /// The last start attempt, successful or not.
    attempted: Option<Instant>,
}

impl Supervised {
    pub fn new(name: &'static str, log_path: PathBuf) -> Supervised {
        Supervised {
            name,
            log_path,
            child: None,
            attempted: None,
        }
    }

    /// Starts the command `prepare` returns (it may fail: a missing binary, an unwritable
    /// config). The attempt counts for [`Supervised::restart_due`] either way. Errors are one
    /// line for the log.
    pub fn start(
        &mut self,
        prepare: impl FnOnce() -> Result<Command, String>,
    ) -> Result<u32, String> {
        self.attempted = Some(Instant::now());
        let mut cmd = prepare()?;
        let program = cmd.get_program().to_string_lossy().into_owned();
        let child =
            spawn(&mut cmd, &self.log_path).map_err(|e| format!("cannot start {program}: {e}"))?;
        let pid = child.id();
        self.child = Some(child);
        Ok(pid)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// True when the child exited since the last call (it is reaped, and its status and the
    /// tail of its log are logged).
    pub fn reap(&mut self) -> bool {
        let status = match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(Some(status))) => status.to_string(),
            Some(Err(e)) => e.to_string(),
            _ => return false,
        };
        self.child = None;
        log!(
            "{} exited ({status}); last lines of {}:",
            self.name,
            self.log_path.display()
        );
        let text = fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        for l in &lines[lines.len().saturating_sub(5)..] {
            log!("  {l}");
        }
        true
    }

    /// True when no child runs and the last start attempt is at least [`RESTART_INTERVAL`] ago.
    pub fn restart_due(&self) -> bool {
        self.child.is_none()
            && self
                .attempted
                .is_none_or(|t| t.elapsed() >= RESTART_INTERVAL)
    }

    pub fn signal(&self, sig: libc::c_int) {
        if let Some(child) = &self.child {
            // SAFETY: plain kill(2) on our own child, not yet reaped (so its pid is still ours).
            unsafe { libc::kill(child.id() as libc::pid_t, sig) };
        }
    }

    /// SIGTERM, up to `grace` for it to exit, then SIGKILL; the child is always reaped.
    pub fn stop(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if !matches!(child.try_wait(), Ok(Some(_))) {
            // SAFETY: as in `signal`: our own, unreaped child.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let start = Instant::now();
            while start.elapsed() < grace && !matches!(child.try_wait(), Ok(Some(_))) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        log!("{} stopped", self.name);
    }
}

fn spawn(cmd: &mut Command, log_path: &Path) -> std::io::Result<Child> {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)?;
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0);
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// A daemon's binary: the given path, else `$PATH`, else `/usr/sbin` and `/sbin` (not in a
/// normal user's PATH on Debian).
pub fn find_binary(given: &Path) -> Option<PathBuf> {
    if given.components().count() > 1 {
        return given.is_file().then(|| given.to_path_buf());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(given))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_that_dies_is_reaped_and_restarted_only_after_the_interval() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Supervised::new("test-child", dir.path().join("log"));
        let sh = || {
            let mut cmd = Command::new("sh");
            cmd.args(["-c", "echo last words; exit 3"]);
            Ok(cmd)
        };
        c.start(sh).unwrap();
        let t = Instant::now();
        while !c.reap() {
            assert!(t.elapsed() < Duration::from_secs(5), "child never exited");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(c.pid(), None);
        assert!(fs::read_to_string(dir.path().join("log"))
            .unwrap()
            .contains("last words"));
        assert!(!c.restart_due(), "restarted within the interval");
        let failed = c.start(|| Err("no binary".to_string()));
        assert_eq!(failed, Err("no binary".to_string()));
        assert!(!c.restart_due(), "a failed attempt must count too");
    }

    #[test]
    fn stop_kills_a_child_that_ignores_sigterm() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Supervised::new("stubborn", dir.path().join("log"));
        c.start(|| {
            let mut cmd = Command::new("sh");
            cmd.args(["-c", "trap '' TERM; echo ready; while :; do sleep 1; done"]);
            Ok(cmd)
        })
        .unwrap();
        let pid = c.pid().unwrap() as libc::pid_t;
        let t = Instant::now();
        while !fs::read_to_string(dir.path().join("log"))
            .unwrap_or_default()
            .contains("ready")
        {
            assert!(t.elapsed() < Duration::from_secs(5), "child never started");
            std::thread::sleep(Duration::from_millis(10));
        }
        let t = Instant::now();
        c.stop(Duration::from_millis(200));
        assert!(t.elapsed() < Duration::from_secs(2));
        // SAFETY: kill with signal 0 only checks whether the pid exists.
        assert_ne!(unsafe { libc::kill(pid, 0) }, 0, "child still alive");
    }
}
