//! Host tools the tests and the lab need, mapped to the Debian packages that provide them.
//!
//! Presence is detected by looking for the binary or file itself (not by asking dpkg), so a tool
//! installed any other way counts. As root on Debian/Ubuntu the missing packages are installed
//! with apt-get, whose output goes to a log file while the terminal gets a summary; otherwise the
//! error says exactly what to install.

use std::path::Path;

use anyhow::{bail, Context, Result};
use xshell::{cmd, Shell};

/// How to tell that a dependency is present.
#[derive(Clone, Copy, Debug)]
pub enum Probe {
    /// An executable on PATH (or in /usr/sbin, /sbin, which root's PATH may lack).
    Bin(&'static str),
    /// A file at this absolute path.
    File(&'static str),
    /// A module Debian's `/usr/bin/python3` imports (Debian moves `ensurepip` out of the
    /// standard library into python3-venv).
    PyModule(&'static str),
}

/// One host dependency.
#[derive(Clone, Copy, Debug)]
pub struct HostDep {
    pub probe: Probe,
    /// Debian package that provides it.
    pub package: &'static str,
}

const fn bin(name: &'static str, package: &'static str) -> HostDep {
    HostDep {
        probe: Probe::Bin(name),
        package,
    }
}

const fn file(path: &'static str, package: &'static str) -> HostDep {
    HostDep {
        probe: Probe::File(path),
        package,
    }
}

const fn py(module: &'static str, package: &'static str) -> HostDep {
    HostDep {
        probe: Probe::PyModule(module),
        package,
    }
}

/// Everything `cargo xtask test` makes sure of before the `sys` tier.
pub const HOST_DEPS: &[HostDep] = &[
    bin("dnsmasq", "dnsmasq-base"),
    // Static: the installer tests copy it into a chroot (it also provides udhcpc).
    bin("busybox", "busybox-static"),
    // DHCPv6 client of the `--ipv6` DHCP test (the one the installed Debian runs).
    bin("dhclient", "isc-dhcp-client"),
    bin("ip", "iproute2"),
    MKE2FS,
    DEBUGFS,
    E2FSCK,
    MKFS_FAT,
    MCOPY,
    bin("fusefat", "fusefat"),
    bin("depmod", "kmod"),
    bin("gcc", "gcc"),
    bin("qemu-img", "qemu-utils"),
    bin("ssh", "openssh-client"),
    bin("sfdisk", "fdisk"),
    bin("losetup", "util-linux"),
    bin("mount", "util-linux"),
    // The rootless lab test runs as `nobody` and checks that nothing of it is left running.
    bin("setpriv", "util-linux"),
    bin("pgrep", "procps"),
    bin("gpgv", "gpgv"),
    // Fixture mirrors sign what they serve with a throwaway key (`pxelab_tests::TestKey`).
    bin("gpg", "gpg"),
    bin("gpg-agent", "gpg-agent"),
    bin("gpgconf", "gpgconf"),
    file(
        "/usr/share/keyrings/debian-archive-keyring.gpg",
        "debian-archive-keyring",
    ),
    bin("zstd", "zstd"),
    bin("cpio", "cpio"),
    bin("qemu-system-x86_64", "qemu-system-x86"),
    file("/usr/share/OVMF/OVMF_CODE.fd", "ovmf"),
    file("/usr/lib/ipxe/qemu/efi-virtio.rom", "ipxe-qemu"),
    bin("skopeo", "skopeo"),
    bin("umoci", "umoci"),
    bin("mmdebstrap", "mmdebstrap"),
    bin("podman", "podman"),
    bin("runc", "runc"),
    // Diskless targets: the stack's NFS server, and a userspace client for the tests (the
    // build machines' kernels have no NFS client).
    bin("ganesha.nfsd", "nfs-ganesha"),
    file(
        "/usr/lib/x86_64-linux-gnu/ganesha/libfsalvfs.so",
        "nfs-ganesha-vfs",
    ),
    bin("nfs-cat", "libnfs-utils"),
    // The shared-state test's 3-member cluster (`--store etcd://…`); started by the test only.
    bin("etcd", "etcd-server"),
    // The stack's systemd unit is verified, and the venv of [`ensure_kubernetes_validate`].
    bin("systemd-analyze", "systemd"),
    py("ensurepip", "python3-venv"),
];

/// Builds a Debian rootfs (its version is part of the rootfs step's key).
pub const MMDEBSTRAP: HostDep = bin("mmdebstrap", "mmdebstrap");
/// Indexes a kernel's modules in a distro's modules archive.
pub const DEPMOD: HostDep = bin("depmod", "kmod");
/// Converts an Ubuntu cloud image to a raw disk.
pub const QEMU_IMG: HostDep = bin("qemu-img", "qemu-utils");
/// Says whether programs of an architecture run here (mmdebstrap asks it too).
pub const ARCH_TEST: HostDep = bin("arch-test", "arch-test");

/// Make, fill and check a distro's disk image (and the installer tests' filesystems).
/// A disk-mode VM's seed disk is a vfat image.
pub const MKFS_FAT: HostDep = bin("mkfs.fat", "dosfstools");
pub const MCOPY: HostDep = bin("mcopy", "mtools");
pub const MKE2FS: HostDep = bin("mke2fs", "e2fsprogs");
pub const DEBUGFS: HostDep = bin("debugfs", "e2fsprogs");
pub const E2FSCK: HostDep = bin("e2fsck", "e2fsprogs");

/// What `distro pull` of a Debian recipe runs.
pub const DEBIAN_PULL: [HostDep; 2] = [MMDEBSTRAP, DEPMOD];

/// Checks signatures (Ubuntu's SHA256SUMS.gpg; pxelab-debian runs it for Debian's releases).
pub const GPGV: HostDep = bin("gpgv", "gpgv");

/// What `distro pull` of an Ubuntu recipe runs on the release and its cloud image.
pub const UBUNTU_PULL: [HostDep; 3] = [GPGV, QEMU_IMG, DEPMOD];

/// What a pull for the foreign `arch` needs besides [`HOST_DEPS`]: qemu-user (static, so it
/// also runs inside the rootfs chroot; its package ships the binfmt.d registrations) and
/// arch-test, which mmdebstrap runs to decide on emulation. Only such pulls install them.
pub fn emulation_deps(arch: pxelab_contract::Arch) -> [HostDep; 2] {
    let qemu = match arch {
        pxelab_contract::Arch::X86_64 => "qemu-x86_64-static",
        pxelab_contract::Arch::Aarch64 => "qemu-aarch64-static",
    };
    [bin(qemu, "qemu-user-static"), ARCH_TEST]
}

impl HostDep {
    pub fn present(&self) -> bool {
        match self.probe {
            Probe::File(p) => Path::new(p).exists(),
            Probe::Bin(name) => find_bin(name).is_some(),
            Probe::PyModule(m) => python_imports(m),
        }
    }

    pub fn what(&self) -> &'static str {
        match self.probe {
            Probe::Bin(n) | Probe::File(n) | Probe::PyModule(n) => n,
        }
    }

    /// Where the tool or file is, or an error naming the package that provides it.
    pub fn path(&self) -> Result<std::path::PathBuf> {
        let found = match self.probe {
            Probe::Bin(name) => find_bin(name),
            Probe::File(p) => Some(p.into()).filter(|p: &std::path::PathBuf| p.exists()),
            Probe::PyModule(m) => python_imports(m).then(|| PYTHON.into()),
        };
        found.with_context(|| {
            format!(
                "{} not found: install the Debian package {} (`apt-get install {}`)",
                self.what(),
                self.package,
                self.package
            )
        })
    }
}

/// Path of executable `name` on PATH or in the sbin directories.
pub fn find_bin(name: &str) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(Into::into))
        .map(|d| d.join(name))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Debian's Python, not whichever `python3` comes first on PATH: its packages are the ones
/// [`HOST_DEPS`] installs.
const PYTHON: &str = "/usr/bin/python3";

fn python_imports(module: &str) -> bool {
    let code = format!("import {module}");
    crate::process::shell()
        .and_then(|sh| crate::process::output(cmd!(sh, "{PYTHON} -c {code}")))
        .is_ok()
}

/// The `kubernetes-validate` (PyPI) the tests check the stack's Kubernetes manifest with,
/// offline: it carries the API schemas of every Kubernetes release up to its own version.
pub const KUBERNETES_VALIDATE: &str = "1.37.0";

/// Installs [`KUBERNETES_VALIDATE`] from PyPI into the venv `<state_dir>/kubernetes-validate`
/// (where `pxelab_tests::deploy` looks for it) unless that version is there; pip's output goes
/// to a log beside it.
pub fn ensure_kubernetes_validate() -> Result<()> {
    let venv = state_dir()?.join("kubernetes-validate");
    let tool = venv.join("bin/kubernetes-validate");
    let sh = crate::process::shell()?;
    let version = KUBERNETES_VALIDATE;
    if crate::process::read(cmd!(sh, "{tool} --version").quiet()).is_ok_and(|v| v == version) {
        return Ok(());
    }
    let python = py("ensurepip", "python3-venv").path()?;
    let log = state_dir()?.join("pip-kubernetes-validate.log");
    eprintln!(
        "installing kubernetes-validate {version} from PyPI into {} (pip's output: {})",
        venv.display(),
        log.display()
    );
    let pip = venv.join("bin/pip");
    for step in [
        cmd!(sh, "{python} -m venv --clear {venv}"),
        cmd!(
            sh,
            "{pip} install --disable-pip-version-check kubernetes-validate=={version}"
        ),
    ] {
        let what = step.to_string();
        let status = crate::process::status_logged(step, Some(&log))?;
        if !status.success() {
            bail!(
                "`{what}` failed ({status}): its output is in {}",
                log.display()
            );
        }
    }
    Ok(())
}

/// The packages (sorted, unique) whose probe fails, with what was missing.
pub fn missing(deps: &[HostDep]) -> Vec<(&'static str, Vec<&'static str>)> {
    let mut by_pkg: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
    for d in deps.iter().filter(|d| !d.present()) {
        by_pkg.entry(d.package).or_default().push(d.what());
    }
    by_pkg.into_iter().collect()
}

/// Make every dependency present: install with apt-get when we can, else fail with the list.
/// apt-get's output (hundreds of lines on a fresh machine) goes to a log file under
/// [`state_dir`]; the terminal gets what is installed, how long it took and where the log is.
pub fn ensure(deps: &[HostDep]) -> Result<()> {
    let missing = missing(deps);
    if missing.is_empty() {
        return Ok(());
    }
    if !can_apt() {
        bail!(
            "missing host packages: {}. Install them (Debian/Ubuntu: `sudo apt-get install --no-install-recommends {}`) \
             or run this as root on Debian/Ubuntu to have it done",
            describe(&missing),
            missing.iter().map(|(p, _)| *p).collect::<Vec<_>>().join(" ")
        );
    }
    let apt = Apt {
        program: find_bin("apt-get").context("apt-get disappeared")?,
        log: apt_log()?,
    };
    install(deps, &apt, &mut |line| eprintln!("{line}"))
}

/// Where apt-get is and where its output goes.
struct Apt {
    program: std::path::PathBuf,
    log: std::path::PathBuf,
}

/// Installs the packages of the missing `deps` with `apt`, telling `say` a few lines.
fn install(deps: &[HostDep], apt: &Apt, say: &mut dyn FnMut(String)) -> Result<()> {
    let started = std::time::Instant::now();
    let mut missing = missing(deps);
    fn packages(m: &[(&'static str, Vec<&str>)]) -> Vec<&'static str> {
        m.iter().map(|(p, _)| *p).collect()
    }
    let wanted = packages(&missing).join(" ");
    say(format!(
        "installing host packages: {} (apt-get's output: {})",
        describe(&missing),
        apt.log.display()
    ));
    let sh = Shell::new()?;
    sh.set_var("DEBIAN_FRONTEND", "noninteractive");
    let program = &apt.program;
    apt.run(cmd!(sh, "{program} update -q"), say)?;
    // Two rounds: to install a new package apt may remove a present one that conflicts with it
    // (measured: bookworm's qemu-system-x86 removed a backported qemu-utils, so qemu-img was
    // gone afterwards); asked again, apt installs the version that fits.
    for round in 0..2 {
        let pkgs = packages(&missing);
        if round > 0 {
            say(format!(
                "apt-get removed {} to resolve a conflict: installing the version that fits",
                pkgs.join(" ")
            ));
        }
        apt.run(
            // A fresh Ubuntu machine often runs unattended-upgrades at first boot: wait for its lock.
            cmd!(
                sh,
                "{program} install -y -q --no-install-recommends -o DPkg::Lock::Timeout=600 {pkgs...}"
            ),
            say,
        )?;
        missing = self::missing(deps);
        if missing.is_empty() {
            // Debian's etcd-server enables and starts a system etcd (localhost:2379); the tests
            // start their own clusters, and nothing else here wants one running.
            if wanted.split(' ').any(|p| p == "etcd-server")
                && Path::new("/run/systemd/system").exists()
            {
                apt.run(cmd!(sh, "systemctl disable --now etcd.service"), say)?;
            }
            say(format!(
                "installed {wanted} in {:.0} s",
                started.elapsed().as_secs_f64()
            ));
            return Ok(());
        }
    }
    bail!(
        "still missing after apt-get install: {} (apt-get's output: {})",
        describe(&missing),
        apt.log.display()
    )
}

impl Apt {
    /// Runs one apt-get command with its output appended to the log; on failure `say`s the
    /// log's last lines and fails with one line naming the log.
    fn run(&self, cmd: xshell::Cmd<'_>, say: &mut dyn FnMut(String)) -> Result<()> {
        let what = cmd.to_string();
        let status = crate::process::status_logged(cmd, Some(&self.log))?;
        if status.success() {
            return Ok(());
        }
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
        say(format!(
            "the last lines of {}:\n  {}",
            self.log.display(),
            tail.join("\n  ")
        ));
        bail!(
            "`{what}` failed ({status}): its whole output is in {}",
            self.log.display()
        )
    }
}

/// How much of apt-get's log a failure shows.
const LOG_TAIL_LINES: usize = 15;

/// `$XDG_STATE_HOME/pxelab` (default `~/.local/state/pxelab`): pxelab's own logs, there before
/// any store or lab home is.
pub fn state_dir() -> Result<std::path::PathBuf> {
    let dir = match std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        Some(state) => std::path::PathBuf::from(state),
        None => std::path::PathBuf::from(
            std::env::var_os("HOME").context("HOME is not set: cannot place pxelab's logs")?,
        )
        .join(".local/state"),
    }
    .join("pxelab");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

/// A new log file for this install: `apt-<UTC time>.log` in [`state_dir`].
fn apt_log() -> Result<std::path::PathBuf> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let t = crate::util::utc(now);
    Ok(state_dir()?.join(format!(
        "apt-{}{:02}{:02}T{:02}{:02}{:02}Z.log",
        t.year, t.month, t.day, t.hour, t.minute, t.second
    )))
}

/// `pkg (tool, tool), pkg (tool)` for what [`missing`] returned.
fn describe(missing: &[(&str, Vec<&str>)]) -> String {
    let parts: Vec<String> = missing
        .iter()
        .map(|(p, w)| format!("{p} ({})", w.join(", ")))
        .collect();
    parts.join(", ")
}

/// Root on a Debian-like system with apt-get.
fn can_apt() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let os = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let debian_like = os.lines().any(|l| {
        (l.starts_with("ID=") || l.starts_with("ID_LIKE="))
            && (l.contains("debian") || l.contains("ubuntu"))
    });
    root && debian_like && find_bin("apt-get").is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An `apt-get` that prints as much as the real one on a fresh machine, creates `made` on
    /// `install`, and fails with apt's status 100 when `fail` exists.
    fn fake_apt(dir: &Path) -> Apt {
        use std::os::unix::fs::PermissionsExt;
        let program = dir.join("apt-get");
        let d = dir.display();
        std::fs::write(
            &program,
            format!(
                "#!/bin/sh\n\
                 for i in $(seq 1 300); do echo \"Get:$i http://deb.debian.org/debian $1 line $i\"; done\n\
                 echo 'apt warning' >&2\n\
                 if [ -e {d}/fail ]; then echo 'E: Unable to locate package nosuch'; exit 100; fi\n\
                 [ \"$1\" = install ] && touch {d}/made\n\
                 exit 0\n"
            ),
        )
        .unwrap();
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
        Apt {
            program,
            log: dir.join("logs/apt.log"),
        }
    }

    #[test]
    fn apt_output_goes_to_a_log_and_the_terminal_gets_a_summary() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("logs")).unwrap();
        let apt = fake_apt(dir.path());
        let made: &'static str =
            Box::leak(format!("{}/made", dir.path().display()).into_boxed_str());
        let deps = [file(made, "pxelab-fake")];
        let mut said = Vec::new();
        install(&deps, &apt, &mut |l| said.push(l)).unwrap();
        let log = apt.log.display().to_string();
        assert!(said.len() <= 3, "a few lines, not apt's output: {said:#?}");
        assert!(
            said[0].contains("pxelab-fake") && said[0].contains(&log),
            "which packages and where the log is: {said:?}"
        );
        assert!(
            said.last()
                .unwrap()
                .starts_with("installed pxelab-fake in "),
            "how long it took: {said:?}"
        );
        let text = std::fs::read_to_string(&apt.log).unwrap();
        assert_eq!(
            text.matches("line 300").count(),
            2,
            "update and install, whole"
        );
        assert!(text.contains("apt warning"), "stderr too");

        // A failing apt-get: its last lines and the log's path, then a one-line error.
        std::fs::remove_file(made).unwrap();
        std::fs::write(dir.path().join("fail"), "").unwrap();
        let mut said = Vec::new();
        let err = install(&deps, &apt, &mut |l| said.push(l)).unwrap_err();
        let shown = said.join("\n");
        assert!(
            shown.contains("E: Unable to locate package nosuch") && shown.contains(&log),
            "{shown}"
        );
        assert!(shown.lines().count() < 25, "the tail only: {shown}");
        let err = format!("{err:#}");
        assert!(
            err.contains("update -q") && err.contains("exit status: 100") && err.contains(&log),
            "{err}"
        );
        assert!(!err.contains('\n'), "one line: {err}");
    }

    #[test]
    fn detects_present_and_missing() {
        let deps = [
            bin("sh", "dash"),
            bin("pxelab-no-such-tool", "pxelab-nothing"),
            file("/nonexistent/x", "pkg-x"),
        ];
        let m = missing(&deps);
        assert_eq!(
            m,
            vec![
                ("pkg-x", vec!["/nonexistent/x"]),
                ("pxelab-nothing", vec!["pxelab-no-such-tool"])
            ]
        );
        assert!(deps[0].path().unwrap().ends_with("sh"));
        assert_eq!(
            deps[1].path().unwrap_err().to_string(),
            "pxelab-no-such-tool not found: install the Debian package pxelab-nothing \
             (`apt-get install pxelab-nothing`)"
        );
    }
}
