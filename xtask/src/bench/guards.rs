//! Drop guards for everything a figure starts or attaches: servers, loop devices, mounts and the
//! lab. Each one undoes its own thing on drop, so an error (or a panic) anywhere in a figure
//! leaves nothing behind on the machine.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use xshell::cmd;

use crate::process;

/// A background server process, stopped with SIGTERM (then SIGKILL after 5 s) on drop. SIGTERM
/// rather than SIGKILL so nginx's master takes its workers down with it.
pub struct Server {
    pub name: String,
    child: Child,
    pub log: PathBuf,
}

impl Server {
    /// Starts `cmd` (from [`process::command`]) with stdout and stderr appended to `log`
    /// (never a pipe nobody reads).
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Result<Server> {
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name} ({})", process::describe(cmd)))?;
        Ok(Server {
            name: name.into(),
            child,
            log: log.to_path_buf(),
        })
    }

    /// Sends `signal` to the server unless it has exited.
    pub fn signal(&self, signal: i32) {
        if let Ok(pid) = process::pid::Pid::of(self.child.id()) {
            pid.signal(signal);
        }
    }

    /// An error (with the end of its log) if the process has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); its log ends with:\n{}",
                self.name,
                super::log_tail(&self.log, 20)
            );
        }
        Ok(())
    }

    /// Polls `GET url` until it answers 200 (returns the body), the process dies, or 15 s pass.
    pub fn wait_ready(&mut self, url: &str) -> Result<Vec<u8>> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            self.check_alive()?;
            match http_get(url) {
                Ok((200, body)) => return Ok(body),
                Ok(_) | Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Ok((code, body)) => bail!(
                    "{} answers {url} with HTTP {code}: {}",
                    self.name,
                    String::from_utf8_lossy(&body).trim()
                ),
                Err(e) => {
                    return Err(e.context(format!("{} did not answer {url} within 15 s", self.name)))
                }
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET url` on loopback: (status, body), any status.
pub fn http_get(url: &str) -> Result<(u16, Vec<u8>)> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .http_status_as_error(false)
        .build()
        .into();
    let mut response = agent
        .get(url)
        .call()
        .with_context(|| format!("GET {url}"))?;
    let status = response.status().as_u16();
    let body = response
        .body_mut()
        .with_config()
        .limit(64 << 20)
        .read_to_vec()
        .with_context(|| format!("reading {url}"))?;
    Ok((status, body))
}

/// A sparse disk image attached to a loop device (with partition scanning); on drop, anything
/// still mounted from it is unmounted, the device detached and the image deleted.
pub struct LoopDev {
    pub dev: String,
    image: PathBuf,
}

impl LoopDev {
    pub fn attach(image: &Path, size: u64) -> Result<LoopDev> {
        File::create(image)
            .and_then(|f| f.set_len(size))
            .with_context(|| format!("creating the sparse disk image {}", image.display()))?;
        let sh = process::shell()?;
        let dev =
            process::read(cmd!(sh, "losetup --find --show --partscan {image}")).and_then(|dev| {
                match dev.starts_with("/dev/loop") {
                    true => Ok(dev),
                    false => bail!("losetup named {dev:?}, not a loop device"),
                }
            });
        let dev = match dev {
            Ok(dev) => dev,
            Err(e) => {
                let _ = std::fs::remove_file(image);
                return Err(e.context("attaching a loop device (losetup, util-linux)"));
            }
        };
        Ok(LoopDev {
            dev,
            image: image.to_path_buf(),
        })
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        for m in mounts_where(|source, _| {
            source == self.dev || source.starts_with(&format!("{}p", self.dev))
        }) {
            unmount(&m);
        }
        // `losetup -d` on a device that is still held (a filesystem is released a moment after
        // its unmount) only marks it for autoclear: wait for the detach itself, up to 5 s.
        let backing = Path::new("/sys/block")
            .join(self.dev.trim_start_matches("/dev/"))
            .join("loop/backing_file");
        let Ok(sh) = process::shell() else { return };
        let dev = &self.dev;
        for _ in 0..50 {
            let _ = process::status_logged(cmd!(sh, "losetup -d {dev}"), None);
            if !backing.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let _ = std::fs::remove_file(&self.image);
    }
}

/// Unmounts everything mounted at or below `dir` on drop (deepest first): what a tool we ran
/// (the installer) left mounted after a failure.
pub struct MountsUnder(pub PathBuf);

impl Drop for MountsUnder {
    fn drop(&mut self) {
        for m in mounts_where(|_, at| Path::new(at).starts_with(&self.0)) {
            unmount(&m);
        }
    }
}

/// A filesystem we mounted, unmounted on drop.
pub struct Mount(pub PathBuf);

impl Mount {
    pub fn new(source: &str, at: &Path, args: &[&str]) -> Result<Mount> {
        std::fs::create_dir_all(at).with_context(|| format!("creating {}", at.display()))?;
        let sh = process::shell()?;
        process::output(cmd!(sh, "mount {args...} {source} {at}"))?;
        Ok(Mount(at.to_path_buf()))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        unmount(&self.0);
    }
}

fn unmount(at: &Path) {
    let Ok(sh) = process::shell() else { return };
    let ok = process::status_logged(cmd!(sh, "umount {at}"), None).is_ok_and(|s| s.success());
    if !ok {
        let _ = process::status_logged(cmd!(sh, "umount -l {at}"), None);
    }
}

/// Mount points (deepest first) whose (source, mount point) satisfy `pred`.
fn mounts_where(pred: impl Fn(&str, &str) -> bool) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| {
            let fields: Vec<&str> = l.split(' ').collect();
            let at = *fields.get(4)?;
            let sep = fields.iter().position(|f| *f == "-")?;
            let source = *fields.get(sep + 2)?;
            pred(source, at).then(|| PathBuf::from(at))
        })
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    found
}

/// The lab in the bench's lab home: `lab down --purge` on drop (VMs, stack, namespace).
pub struct LabGuard(pub PathBuf);

impl LabGuard {
    /// Tears the lab down now, reporting a failure (drop only logs it).
    pub fn down(&self) -> Result<()> {
        let lab = crate::lab::home::Lab::at(self.0.clone())?;
        crate::lab::down(&lab, true)
    }
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        let created = crate::lab::home::Lab::at(self.0.clone()).is_ok_and(|lab| lab.is_created());
        if created {
            if let Err(e) = self.down() {
                eprintln!(
                    "bench: warning: lab down in {} failed: {e:#}",
                    self.0.display()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn require(tool: &str, package: &str) {
        assert!(
            crate::hostdeps::find_bin(tool).is_some(),
            "{tool} not found: apt-get install {package}"
        );
    }

    /// A figure that fails half-way must leave no loop device, mount or image behind.
    #[test]
    fn sys_loop_device_and_mount_are_gone_after_drop() {
        assert!(process::is_root(), "this test needs root (losetup, mount)");
        require("losetup", "util-linux");
        require("mke2fs", "e2fsprogs");
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        let at = dir.path().join("mnt");
        let dev = {
            let disk = LoopDev::attach(&image, 64 << 20).unwrap();
            let sh = process::shell().unwrap();
            let dev = &disk.dev;
            process::output(cmd!(sh, "mke2fs -t ext4 -F -q {dev}")).unwrap();
            let _mount = Mount::new(&disk.dev, &at, &[]).unwrap();
            // Left mounted on purpose: LoopDev's drop must unmount it too.
            let second = dir.path().join("again");
            std::fs::create_dir_all(&second).unwrap();
            process::output(cmd!(sh, "mount {dev} {second}")).unwrap();
            assert_eq!(
                mounts_where(|_, m| Path::new(m).starts_with(dir.path())).len(),
                2
            );
            disk.dev.clone()
        };
        assert!(
            mounts_where(|_, m| Path::new(m).starts_with(dir.path())).is_empty(),
            "mounts left behind"
        );
        let sh = process::shell().unwrap();
        let list = process::read(cmd!(sh, "losetup -a")).unwrap();
        assert!(
            !list
                .lines()
                .any(|l| l.contains(&image.display().to_string())),
            "{dev} still attached: {list}"
        );
        assert!(!image.exists(), "the disk image was not deleted");
    }
}
