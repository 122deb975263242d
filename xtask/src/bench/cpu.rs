//! The CPU time the lab's QEMU processes use while a `lab up` runs, sampled from
//! `/proc/<pid>/stat`: it tells whether targets started together are slow because the host's
//! cores are all busy emulating them (an N-fold slowdown is then what the cores can give) or
//! because something waits.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::lab::home::{Lab, VmFile};
use crate::process::pid;

/// How often each QEMU's CPU time is read.
const EVERY: Duration = Duration::from_millis(200);

/// Samples every VM's QEMU of a lab until [`Sampler::finish`].
pub struct Sampler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Series>,
}

/// Per VM: (Unix ms, CPU seconds its QEMU had used), oldest first, for its last QEMU only.
#[derive(Debug, Default)]
pub struct Series(BTreeMap<String, Vec<(u64, f64)>>);

/// Starts sampling the QEMUs of `lab`'s VMs, also those started after this call.
pub fn start(lab: &Lab) -> Sampler {
    let stop = Arc::new(AtomicBool::new(false));
    let (lab, flag) = (lab.clone(), stop.clone());
    let thread = std::thread::spawn(move || {
        let mut series = Series::default();
        let mut pids: BTreeMap<String, i32> = BTreeMap::new();
        while !flag.load(Ordering::Relaxed) {
            for vm in lab.vm_pidfiles() {
                let Some(pid) = pid::read(&lab.vm_file(&vm, VmFile::Pid)) else {
                    continue;
                };
                let Some(cpu) = cpu_seconds(pid.id()) else {
                    continue;
                };
                let samples = series.0.entry(vm.clone()).or_default();
                // A new QEMU for the VM starts counting from zero again.
                if pids.insert(vm, pid.id()) != Some(pid.id()) {
                    samples.clear();
                }
                samples.push((crate::lab::follow::now_ms(), cpu));
            }
            std::thread::sleep(EVERY);
        }
        series
    });
    Sampler { stop, thread }
}

impl Sampler {
    pub fn finish(self) -> Series {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

impl Series {
    /// The CPU seconds `vm`'s QEMU had used at Unix ms `at`: the first sample at or after it
    /// (at most [`EVERY`] late), else None.
    pub fn at(&self, vm: &str, at: u64) -> Option<f64> {
        let samples = self.0.get(vm)?;
        samples
            .iter()
            .find(|(ms, _)| *ms >= at)
            .map(|(_, cpu)| *cpu)
    }
}

/// User plus system CPU seconds of process `pid` (all its threads: QEMU's vCPUs and I/O).
fn cpu_seconds(pid: i32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks_per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (ticks_per_s > 0).then_some(())?;
    Some(cpu_ticks(&text)? as f64 / ticks_per_s as f64)
}

/// utime + stime (fields 14 and 15) of a `/proc/<pid>/stat` line. The command name (field 2)
/// is in parentheses and may hold spaces and parentheses, so fields count from the last `)`.
fn cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(14 - 3);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(user + system)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_user_plus_system_counted_after_the_name() {
        let stat = "4242 (qemu-system (x) 1) S 1 4242 4242 0 -1 4194560 1234 0 0 0 \
                    731 269 0 0 20 0 5 0 98765 2000000000 40000 18446744073709551615";
        assert_eq!(cpu_ticks(stat), Some(1000));
        assert_eq!(cpu_ticks("4242 (qemu) S 1"), None);
    }

    #[test]
    fn our_own_cpu_time_is_read_and_grows() {
        let me = std::process::id() as i32;
        let before = cpu_seconds(me).unwrap();
        let spin = std::time::Instant::now();
        let mut x = 0u64;
        while spin.elapsed() < Duration::from_millis(300) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        assert!(cpu_seconds(me).unwrap() > before, "{x}");
    }

    #[test]
    fn a_sample_is_the_first_at_or_after_the_moment_asked() {
        let mut series = Series::default();
        series
            .0
            .insert("t".into(), vec![(1000, 1.0), (1200, 1.4), (1400, 1.8)]);
        assert_eq!(series.at("t", 1100), Some(1.4));
        assert_eq!(series.at("t", 1200), Some(1.4));
        assert_eq!(series.at("t", 1500), None);
        assert_eq!(series.at("u", 1000), None);
    }
}
