//! Host tools the tests and the lab need, mapped to the Debian packages that provide them.
//!
//! Presence is detected by looking for the binary or file itself (not by asking dpkg), so a tool
//! installed any other way counts. As root on Debian/Ubuntu the missing packages are installed
//! with apt-get; otherwise the error says exactly what to install.

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

/// Everything `cargo xtask test` makes sure of before the `sys` tier.
pub const HOST_DEPS: &[HostDep] = &[
    bin("dnsmasq", "dnsmasq-base"),
    // Static: the installer tests copy it into a chroot (it also provides udhcpc).
    bin("busybox", "busybox-static"),
    bin("ip", "iproute2"),
    bin("mke2fs", "e2fsprogs"),
    bin("mkfs.fat", "dosfstools"),
    bin("mcopy", "mtools"),
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
];

/// Builds a Debian rootfs (its version is part of the rootfs step's key).
pub const MMDEBSTRAP: HostDep = bin("mmdebstrap", "mmdebstrap");
/// Indexes a kernel's modules in a distro's modules archive.
pub const DEPMOD: HostDep = bin("depmod", "kmod");
/// Converts an Ubuntu cloud image to a raw disk.
pub const QEMU_IMG: HostDep = bin("qemu-img", "qemu-utils");
/// Says whether programs of an architecture run here (mmdebstrap asks it too).
pub const ARCH_TEST: HostDep = bin("arch-test", "arch-test");

/// What `distro pull` of a Debian recipe runs.
pub const DEBIAN_PULL: [HostDep; 2] = [MMDEBSTRAP, DEPMOD];

/// What `distro pull` of an Ubuntu recipe runs on the cloud image.
pub const UBUNTU_PULL: [HostDep; 2] = [QEMU_IMG, DEPMOD];

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
        }
    }

    pub fn what(&self) -> &'static str {
        match self.probe {
            Probe::Bin(n) | Probe::File(n) => n,
        }
    }

    /// Where the tool or file is, or an error naming the package that provides it.
    pub fn path(&self) -> Result<std::path::PathBuf> {
        let found = match self.probe {
            Probe::Bin(name) => find_bin(name),
            Probe::File(p) => Some(p.into()).filter(|p: &std::path::PathBuf| p.exists()),
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

/// The packages (sorted, unique) whose probe fails, with what was missing.
pub fn missing(deps: &[HostDep]) -> Vec<(&'static str, Vec<&'static str>)> {
    let mut by_pkg: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
    for d in deps.iter().filter(|d| !d.present()) {
        by_pkg.entry(d.package).or_default().push(d.what());
    }
    by_pkg.into_iter().collect()
}

/// Make every dependency present: install with apt-get when we can, else fail with the list.
pub fn ensure(deps: &[HostDep]) -> Result<()> {
    let missing = missing(deps);
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("host tools missing: {}", describe(&missing));
    if !can_apt() {
        bail!(
            "missing host packages: {}. Install them (Debian/Ubuntu: `sudo apt-get install --no-install-recommends {}`) \
             or run this as root on Debian/Ubuntu to have it done",
            describe(&missing),
            missing.iter().map(|(p, _)| *p).collect::<Vec<_>>().join(" ")
        );
    }
    let sh = Shell::new()?;
    sh.set_var("DEBIAN_FRONTEND", "noninteractive");
    cmd!(sh, "apt-get update -q")
        .run()
        .context("apt-get update failed")?;
    let mut missing = missing;
    // Two rounds: to install a new package apt may remove a present one that conflicts with it
    // (measured: bookworm's qemu-system-x86 removed a backported qemu-utils, so qemu-img was
    // gone afterwards); asked again, apt installs the version that fits.
    for round in 0..2 {
        let packages: Vec<&str> = missing.iter().map(|(p, _)| *p).collect();
        if round > 0 {
            eprintln!(
                "apt-get removed {} to resolve a conflict: installing the version that fits",
                packages.join(" ")
            );
        }
        let pkgs = packages.clone();
        cmd!(
            sh,
            // A fresh Ubuntu machine often runs unattended-upgrades at first boot: wait for its lock.
            "apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=600 {pkgs...}"
        )
        .run()
        .with_context(|| format!("apt-get install {} failed", packages.join(" ")))?;
        missing = self::missing(deps);
        if missing.is_empty() {
            return Ok(());
        }
    }
    bail!(
        "still missing after apt-get install: {}",
        describe(&missing)
    )
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
