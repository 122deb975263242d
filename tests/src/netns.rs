//! Network namespaces for tests: named uniquely per process, wired with veth pairs, and removed
//! with every process started in them when the guard drops — also when the test fails half-way.
//! Nothing is ever routed to the host's network: a namespace starts with only `lo`.

use std::path::Path;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::cmd::{check, command};

/// One network namespace; deleted on drop after its processes are killed.
pub struct NetNs {
    name: String,
    children: Vec<Child>,
}

impl NetNs {
    /// `ip netns add <tag>-<pid>-<n>` with `lo` up. `tag` keeps tests that run in parallel apart
    /// in listings; the name is unique anyway.
    pub fn new(tag: &str) -> NetNs {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("pxt-{tag}-{}-{n}", std::process::id());
        check(&mut command(&["ip", "netns", "add", &name]));
        // The guard exists from here on: a failure below still deletes the namespace.
        let ns = NetNs {
            name,
            children: Vec::new(),
        };
        ns.ip("link set lo up");
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <ns> <args>` (split on whitespace); fails the test unless it succeeds.
    pub fn ip(&self, args: &str) -> String {
        let mut c = command(&["ip", "-n", &self.name]);
        c.args(args.split_whitespace());
        check(&mut c)
    }

    /// `program` to be run inside the namespace (`ip netns exec <ns> program …`).
    pub fn command(&self, program: &str) -> Command {
        let mut c = command(&["ip", "netns", "exec", &self.name, program]);
        c.current_dir("/");
        c
    }

    /// Runs `args` inside the namespace; fails the test unless it succeeds; returns stdout.
    pub fn must(&self, args: &[&str]) -> String {
        let mut c = self.command(args[0]);
        c.args(&args[1..]);
        check(&mut c)
    }

    /// Keeps `child` (started inside the namespace) to be killed when the namespace goes.
    pub fn adopt(&mut self, child: Child) -> &mut Child {
        self.children.push(child);
        self.children.last_mut().expect("just pushed")
    }

    /// Runs `f` on a thread that has joined this namespace (for sockets opened from the test
    /// process itself).
    pub fn within<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                use std::os::fd::AsRawFd;
                let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
                // SAFETY: a valid namespace fd; setns affects only this thread.
                let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            // The test fails with the thread's own message.
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// One DHCP exchange by busybox `udhcpc` on `iface` (extra options `extra`, e.g. `-x
    /// 0x5d:0007`), its script writing into `dir`: the lease's variables (`ip`, `siaddr`,
    /// `boot_file`, …), or None when no server answered. The address is not configured.
    pub fn dhcp_lease(
        &self,
        iface: &str,
        dir: &Path,
        extra: &[&str],
    ) -> Option<Vec<(String, String)>> {
        let out_file = dir.join("lease.env");
        let _ = std::fs::remove_file(&out_file);
        let script = dir.join("udhcpc.sh");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\n[ \"$1\" = bound ] && env > {}\nexit 0\n",
                out_file.display()
            ),
        )
        .expect("writing the udhcpc script");
        check(command(&["chmod", "755"]).arg(&script));
        let script = script.display().to_string();
        let mut c = self.command("busybox");
        c.args([
            "udhcpc", "-i", iface, "-f", "-q", "-n", "-t", "3", "-T", "1", "-s", &script,
        ])
        .args(extra);
        let out = crate::cmd::output(&mut c);
        let env = std::fs::read_to_string(&out_file).ok()?;
        assert!(
            out.status.success(),
            "udhcpc bound but failed: {}",
            crate::cmd::failure(&c, &out)
        );
        Some(
            env.lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    /// A veth pair: `here_if` in this namespace, `there_if` in `there`, both up.
    pub fn veth(&self, here_if: &str, there: &NetNs, there_if: &str) {
        self.ip(&format!(
            "link add {here_if} type veth peer name {there_if} netns {}",
            there.name
        ));
        self.ip(&format!("link set {here_if} up"));
        there.ip(&format!("link set {there_if} up"));
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Anything else still running inside (a daemon a child started) would keep it alive.
        if let Ok(out) = command(&["ip", "netns", "pids", &self.name]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    // SAFETY: kill has no memory preconditions; the pid was listed in our namespace.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        let _ = command(&["ip", "netns", "del", &self.name]).status();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmd::require_root;

    #[test]
    fn sys_namespaces_are_wired_and_removed_with_their_processes() {
        require_root("creating network namespaces");
        crate::cmd::require("busybox", "busybox-static");
        let path;
        let sleeper;
        {
            let mut a = NetNs::new("self");
            let b = NetNs::new("self");
            a.veth("va", &b, "vb");
            a.ip("addr add 10.250.0.1/30 dev va");
            b.ip("addr add 10.250.0.2/30 dev vb");
            b.must(&["busybox", "ping", "-c", "1", "-W", "2", "10.250.0.1"]);
            // Only the veth's own subnet: no route anywhere else.
            let routes = a.ip("-4 route show");
            assert_eq!(
                routes.trim(),
                "10.250.0.0/30 dev va proto kernel scope link src 10.250.0.1"
            );
            let child = a.command("sleep").arg("60").spawn().unwrap();
            sleeper = child.id() as i32;
            a.adopt(child);
            path = format!("/run/netns/{}", a.name());
            assert!(Path::new(&path).exists());
        }
        assert!(!Path::new(&path).exists(), "{path} left behind");
        // SAFETY: signal 0 only checks existence.
        let alive = unsafe { libc::kill(sleeper, 0) };
        assert_ne!(alive, 0, "process {sleeper} left running");
    }
}
