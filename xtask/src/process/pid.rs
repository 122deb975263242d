//! Processes found again through pid files: the stack, QEMU, a rootless lab's namespace holder.
//!
//! A pid alone does not name a process for long: after a reboot (or enough forks) the number
//! belongs to something else, and a lab that signalled it would SIGTERM an unrelated host
//! process as root. So a pid file holds the pid *and* the process's start time (field 22 of
//! `/proc/<pid>/stat`, clock ticks since boot), and [`read`] returns a [`Pid`] only while a
//! process with both is running. A file with a pid alone names nothing.

use std::{
    io::Write,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

/// A running process, identified by its pid and start time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pid {
    pid: i32,
    start: u64,
}

impl Pid {
    /// The process that has `pid` now (e.g. a child just spawned).
    pub fn of(pid: u32) -> Result<Pid> {
        let pid = i32::try_from(pid).with_context(|| format!("pid {pid} out of range"))?;
        let (_, start) =
            stat(pid).with_context(|| format!("process {pid} exited before it was recorded"))?;
        Ok(Pid { pid, start })
    }

    pub fn id(&self) -> i32 {
        self.pid
    }

    /// Whether this very process still runs (an exited one that is not reaped yet does not).
    pub fn is_running(&self) -> bool {
        stat(self.pid).is_some_and(|(state, start)| start == self.start && state != 'Z')
    }

    /// Sends `signal` if the process still runs; whether it was sent.
    pub fn signal(&self, signal: i32) -> bool {
        // SAFETY: kill(2) on a pid just verified to be this process (same start time).
        self.is_running() && unsafe { libc::kill(self.pid, signal) } == 0
    }

    /// Whether the process is gone within `timeout`. Reaps it when it is this process's child
    /// (the stack started by this process, e.g. in `lab stack restart`).
    pub fn wait_gone(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            // SAFETY: non-blocking waitpid on one pid; fails harmlessly if it is not our child.
            unsafe { libc::waitpid(self.pid, std::ptr::null_mut(), libc::WNOHANG) };
            if !self.is_running() {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub fn terminate(&self, grace: Duration) -> Result<()> {
        self.signal(libc::SIGTERM);
        if !self.wait_gone(grace) {
            self.kill()?;
        }
        Ok(())
    }

    /// SIGKILL, and wait until the process is gone.
    pub fn kill(&self) -> Result<()> {
        self.signal(libc::SIGKILL);
        if !self.wait_gone(Duration::from_secs(5)) {
            bail!("process {} did not stop even after SIGKILL", self.pid);
        }
        Ok(())
    }
}

/// The process `pidfile` names, if it runs.
pub fn read(pidfile: &Path) -> Option<Pid> {
    let text = std::fs::read_to_string(pidfile).ok()?;
    let mut words = text.split_whitespace();
    let pid = Pid {
        pid: words.next()?.parse().ok()?,
        start: words.next()?.parse().ok()?,
    };
    (pid.pid > 0 && pid.is_running()).then_some(pid)
}

/// Records `pid` in `pidfile` (atomically).
pub fn write(pidfile: &Path, pid: Pid) -> Result<()> {
    crate::store::write_atomic(pidfile, format!("{} {}\n", pid.pid, pid.start).as_bytes())
}

/// Takes over a pid file that a program wrote with its pid alone (QEMU's `-pidfile`): records
/// the start time too, keeping the file's mtime (when the program started, which `lab up`
/// measures from).
pub fn adopt(pidfile: &Path) -> Result<Pid> {
    let text = std::fs::read_to_string(pidfile)
        .with_context(|| format!("reading {}", pidfile.display()))?;
    let number: u32 = text
        .trim()
        .parse()
        .with_context(|| format!("{} holds {text:?}, not a pid", pidfile.display()))?;
    let mtime = std::fs::metadata(pidfile)?.modified()?;
    let pid = Pid::of(number)?;
    let dir = pidfile.parent().context("a pid file has a directory")?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    write!(tmp, "{} {}", pid.pid, pid.start)?;
    writeln!(tmp)?;
    tmp.as_file().set_modified(mtime)?;
    tmp.persist(pidfile)
        .with_context(|| format!("writing {}", pidfile.display()))?;
    Ok(pid)
}

/// (state, start time) of `pid` from `/proc/<pid>/stat`.
fn stat(pid: i32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// The command name (field 2) is in parentheses and may itself hold spaces and parentheses, so
/// fields are counted from the last `)`: state is field 3, the start time field 22.
fn parse_stat(text: &str) -> Option<(char, u64)> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let start = fields.nth(22 - 4)?.parse().ok()?;
    Some((state, start))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A `sleep` a test owns (an unrelated process to the lab), killed even when an assertion
    /// fails.
    pub(crate) struct Sleeper(pub std::process::Child);

    impl Sleeper {
        pub(crate) fn spawn() -> Sleeper {
            let sh = xshell::Shell::new().unwrap();
            Sleeper(
                crate::process::command(xshell::cmd!(sh, "sleep 30"))
                    .spawn()
                    .unwrap(),
            )
        }

        /// Not exited (a child [`Pid::wait_gone`] reaped is an error to `try_wait`: gone).
        pub(crate) fn alive(&mut self) -> bool {
            matches!(self.0.try_wait(), Ok(None))
        }
    }

    impl Drop for Sleeper {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn stat_fields_count_from_the_last_parenthesis() {
        let line =
            "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 987654 1 2 3";
        assert_eq!(parse_stat(line), Some(('S', 987654)));
        assert_eq!(parse_stat("4242 (x) Z"), None);
    }

    #[test]
    fn a_recorded_process_is_found_and_stopped() {
        let mut sleeper = Sleeper::spawn();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sleep.pid");
        write(&file, Pid::of(sleeper.0.id()).unwrap()).unwrap();
        let pid = read(&file).expect("a recorded live process is found");
        assert_eq!(pid.id(), sleeper.0.id() as i32);
        pid.terminate(Duration::from_secs(5)).unwrap();
        assert!(!sleeper.alive());
        assert_eq!(read(&file), None, "an exited process is not found");
    }

    #[test]
    fn a_pid_without_its_start_time_names_no_process() {
        let mut sleeper = Sleeper::spawn();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("stale.pid");
        let id = sleeper.0.id();
        std::fs::write(&file, format!("{id}\n")).unwrap();
        assert_eq!(read(&file), None, "a bare pid is trusted");
        let start = Pid::of(id).unwrap().start;
        std::fs::write(&file, format!("{id} {}\n", start + 1)).unwrap();
        assert_eq!(read(&file), None, "another start time is trusted");
        let other = Pid {
            pid: id as i32,
            start: start + 1,
        };
        assert!(!other.signal(libc::SIGKILL));
        assert!(sleeper.alive());
    }

    #[test]
    fn adopting_a_bare_pid_file_keeps_its_mtime() {
        let mut sleeper = Sleeper::spawn();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("qemu.pid");
        std::fs::write(&file, format!("{}\n", sleeper.0.id())).unwrap();
        let then = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        std::fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(then)
            .unwrap();
        let pid = adopt(&file).unwrap();
        assert_eq!(read(&file), Some(pid));
        assert_eq!(std::fs::metadata(&file).unwrap().modified().unwrap(), then);
        assert!(sleeper.alive());
    }
}
