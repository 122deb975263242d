//! Installing GRUB with the tools the rootfs already contains, run in a chroot: no network and no
//! package manager in the target.
//!
//! `grub-install --removable --no-nvram` puts GRUB at `EFI/BOOT/BOOT<ARCH>.EFI`, which firmware
//! boots without an NVRAM entry (a fresh OVMF VARS file has none). The initrd has no udev, so
//! grub-mkconfig would fall back to `root=/dev/vda2` (FIELD-NOTES pitfall 7): we provide
//! `/dev/disk/by-uuid` links while it runs, set `GRUB_DISABLE_LINUX_UUID=false`, and then check
//! (and if needed fix) that the generated grub.cfg boots `root=UUID=<root fs>`.

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cmd;
use crate::error::{err, Context, Result};
use crate::mkfs::FsIds;
use crate::mounts::Mounts;
use crate::say;
use crate::seed::write_atomic;

/// GRUB's platform name for the machine the installer runs on.
pub fn grub_target() -> &'static str {
    if cfg!(target_arch = "aarch64") {
        "arm64-efi"
    } else {
        "x86_64-efi"
    }
}

/// The kernel console for the lab's serial log.
fn serial_console() -> &'static str {
    if cfg!(target_arch = "aarch64") {
        "console=tty0 console=ttyAMA0,115200n8"
    } else {
        "console=tty0 console=ttyS0,115200n8"
    }
}

const SEARCH: [&str; 4] = ["usr/sbin", "usr/bin", "sbin", "bin"];

/// `/usr/sbin/<name>` (or another standard dir) as seen inside `root`, if it exists there.
pub fn find_in_root(root: &Path, names: &[&str]) -> Option<String> {
    names.iter().find_map(|name| {
        SEARCH.iter().find_map(|dir| {
            let rel = format!("{dir}/{name}");
            root.join(&rel).is_file().then(|| format!("/{rel}"))
        })
    })
}

/// Kernel versions with a `/boot/vmlinuz-<version>` in the new root, sorted.
pub fn kernels(root: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(root.join("boot"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("vmlinuz-")
                .map(str::to_string)
        })
        .collect();
    v.sort();
    v
}

/// Runs `program` (a path inside `root`) chrooted into `root`, with a clean environment.
pub fn chroot_run(root: &Path, program: &str, args: &[&str]) -> Result<String> {
    let root_c =
        CString::new(root.as_os_str().as_bytes()).map_err(|_| err("root path contains NUL"))?;
    let mut c = Command::new(program);
    c.args(args)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("LC_ALL", "C")
        .env("HOME", "/root")
        .env("DEBIAN_FRONTEND", "noninteractive");
    // SAFETY: chroot and chdir are async-signal-safe; root_c lives until the closure is dropped.
    unsafe {
        c.pre_exec(move || {
            if libc::chroot(root_c.as_ptr()) != 0 || libc::chdir(c"/".as_ptr()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd::run(&mut c, None, "not in the rootfs")
        .context(|| format!("chroot {program} {}", args.join(" ")))
}

/// Everything the boot-loader step needs to know about the new install.
pub struct Target<'a> {
    pub root: &'a Path,
    pub root_dev: &'a Path,
    pub esp_dev: &'a Path,
    pub ids: &'a FsIds,
}

/// Mounts the ESP and the API filesystems into the new root (they stay on `mounts` until the
/// final unmount), then installs and configures GRUB.
pub fn install(t: &Target<'_>, mounts: &mut Mounts) -> Result<()> {
    let kernels = kernels(t.root);
    if kernels.is_empty() {
        return Err(err("the rootfs has no kernel (/boot/vmlinuz-*); it cannot boot: rebuild it with a kernel package"));
    }
    let grub_install =
        find_in_root(t.root, &["grub-install", "grub2-install"]).ok_or_else(|| {
            err("the rootfs has no grub-install: rebuild it with grub-efi (Debian: grub-efi-amd64)")
        })?;

    mounts.mount(t.esp_dev, &t.root.join("boot/efi"), "vfat", "umask=0077")?;
    for api in ["dev", "proc", "sys"] {
        mounts.bind(&Path::new("/").join(api), &t.root.join(api))?;
    }
    let efivars = Path::new("/sys/firmware/efi/efivars");
    if fs::read_dir(efivars)
        .map(|mut d| d.next().is_some())
        .unwrap_or(false)
    {
        mounts.bind(efivars, &t.root.join("sys/firmware/efi/efivars"))?;
    }
    let _links =
        ByUuidLinks::create(&[(&t.ids.root_uuid, t.root_dev), (&t.ids.esp_uuid, t.esp_dev)]);
    write_grub_defaults(t.root)?;

    for version in &kernels {
        ensure_initrd(t.root, version)?;
    }

    let target = format!("--target={}", grub_target());
    let out = chroot_run(
        t.root,
        &grub_install,
        &[
            &target,
            "--efi-directory=/boot/efi",
            "--removable",
            "--no-nvram",
        ],
    )?;
    say!(
        "bootloader: {grub_install} {target} --removable --no-nvram: {}",
        last_line(&out).unwrap_or("ok")
    );

    let cfg = if let Some(update) = find_in_root(t.root, &["update-grub"]) {
        chroot_run(t.root, &update, &[])?;
        "boot/grub/grub.cfg"
    } else if let Some(mkconfig) = find_in_root(t.root, &["grub-mkconfig"]) {
        chroot_run(t.root, &mkconfig, &["-o", "/boot/grub/grub.cfg"])?;
        "boot/grub/grub.cfg"
    } else if let Some(mkconfig) = find_in_root(t.root, &["grub2-mkconfig"]) {
        chroot_run(t.root, &mkconfig, &["-o", "/boot/grub2/grub.cfg"])?;
        "boot/grub2/grub.cfg"
    } else {
        return Err(err("the rootfs has neither update-grub nor grub-mkconfig"));
    };
    fix_root_by_uuid(&t.root.join(cfg), &t.ids.root_uuid)
}

/// Debian's grub-mkconfig sources `/etc/default/grub.d/*.cfg` after `/etc/default/grub`;
/// `90-` sorts after the distro's own drop-ins.
fn write_grub_defaults(root: &Path) -> Result<()> {
    let text = format!(
        "# Written by pxelab-installer: the installer has no udev, so make sure GRUB boots the root\n\
         # by UUID; short menu timeout; kernel messages on the serial console for the lab's log.\n\
         GRUB_DISABLE_LINUX_UUID=false\n\
         GRUB_TIMEOUT=1\n\
         GRUB_CMDLINE_LINUX=\"$GRUB_CMDLINE_LINUX {}\"\n",
        serial_console()
    );
    write_atomic(
        &root.join("etc/default/grub.d/90-pxelab.cfg"),
        text.as_bytes(),
        0o644,
    )
}

/// Builds an initramfs for `version` only when the rootfs has none (a rootfs built by a package
/// manager normally has one already, and rebuilding costs tens of seconds).
fn ensure_initrd(root: &Path, version: &str) -> Result<()> {
    let present = [
        format!("boot/initrd.img-{version}"),
        format!("boot/initramfs-{version}.img"),
    ]
    .iter()
    .any(|p| root.join(p).is_file());
    if present {
        return Ok(());
    }
    if let Some(tool) = find_in_root(root, &["update-initramfs"]) {
        say!("bootloader: no initrd for kernel {version}; running update-initramfs");
        chroot_run(root, &tool, &["-c", "-k", version])?;
    } else if let Some(tool) = find_in_root(root, &["dracut"]) {
        say!("bootloader: no initramfs for kernel {version}; running dracut");
        chroot_run(
            root,
            &tool,
            &[
                "--force",
                &format!("/boot/initramfs-{version}.img"),
                version,
            ],
        )?;
    } else {
        say!("bootloader: warning: kernel {version} has no initrd and the rootfs has no tool to build one");
    }
    Ok(())
}

/// Rewrites every `root=/dev/…` in grub.cfg to `root=UUID=<uuid>`, then requires that the
/// config boots that UUID.
pub fn fix_root_by_uuid(cfg: &Path, uuid: &str) -> Result<()> {
    let text =
        fs::read_to_string(cfg).context(|| format!("reading the generated {}", cfg.display()))?;
    let wanted = format!("root=UUID={uuid}");
    let mut fixed = 0;
    let out: Vec<String> = text
        .split_inclusive('\n')
        .map(|line| {
            if !line.contains("root=/dev/") {
                return line.to_string();
            }
            let mut pieces = Vec::new();
            for piece in line.split(' ') {
                if piece.starts_with("root=/dev/") {
                    fixed += 1;
                    let tail = if piece.ends_with('\n') { "\n" } else { "" };
                    pieces.push(format!("{wanted}{tail}"));
                } else {
                    pieces.push(piece.to_string());
                }
            }
            pieces.join(" ")
        })
        .collect();
    let out = out.concat();
    if fixed > 0 {
        say!(
            "bootloader: {} used root=/dev/…; rewrote {fixed} entries to {wanted}",
            cfg.display()
        );
        write_atomic(cfg, out.as_bytes(), 0o444)?;
    }
    if !out.contains(&wanted) {
        return Err(err(format!(
            "{} has no kernel entry with {wanted}; the disk would not boot",
            cfg.display()
        )));
    }
    Ok(())
}

fn last_line(s: &str) -> Option<&str> {
    s.lines().rev().map(str::trim).find(|l| !l.is_empty())
}

/// `/dev/disk/by-uuid/<uuid>` links for the new filesystems while GRUB runs, removed afterwards
/// (only what we created).
struct ByUuidLinks {
    created: Vec<PathBuf>,
}

impl ByUuidLinks {
    fn create(links: &[(&String, &Path)]) -> ByUuidLinks {
        let mut created = Vec::new();
        let dir = Path::new("/dev/disk/by-uuid");
        for d in [Path::new("/dev/disk"), dir] {
            if !d.exists() && fs::create_dir(d).is_ok() {
                created.push(d.to_path_buf());
            }
        }
        for (uuid, dev) in links {
            let link = dir.join(uuid);
            if fs::symlink_metadata(&link).is_err()
                && std::os::unix::fs::symlink(dev, &link).is_ok()
            {
                created.push(link);
            }
        }
        ByUuidLinks { created }
    }
}

impl Drop for ByUuidLinks {
    fn drop(&mut self) {
        for p in self.created.iter().rev() {
            let _ = fs::remove_file(p).or_else(|_| fs::remove_dir(p));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_device_roots_to_uuid() {
        let t = tempfile::tempdir().unwrap();
        let cfg = t.path().join("grub.cfg");
        fs::write(&cfg, "menuentry 'x' {\n\tlinux /boot/vmlinuz-6.1 root=/dev/vda2 ro quiet\n\tlinux /v root=/dev/vda2\n}\n").unwrap();
        fix_root_by_uuid(&cfg, "1234").unwrap();
        let text = fs::read_to_string(&cfg).unwrap();
        assert_eq!(text, "menuentry 'x' {\n\tlinux /boot/vmlinuz-6.1 root=UUID=1234 ro quiet\n\tlinux /v root=UUID=1234\n}\n");
    }

    #[test]
    fn a_config_that_boots_another_root_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let cfg = t.path().join("grub.cfg");
        fs::write(&cfg, "linux /vmlinuz root=UUID=other ro\n").unwrap();
        let e = fix_root_by_uuid(&cfg, "1234").unwrap_err().0;
        assert!(e.contains("no kernel entry with root=UUID=1234"), "{e}");
    }

    #[test]
    fn finds_tools_and_kernels_in_the_root() {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir_all(t.path().join("usr/sbin")).unwrap();
        fs::create_dir_all(t.path().join("boot")).unwrap();
        fs::write(t.path().join("usr/sbin/grub-install"), "").unwrap();
        fs::write(t.path().join("boot/vmlinuz-6.1.0-9-amd64"), "").unwrap();
        fs::write(t.path().join("boot/vmlinuz-6.1.0-10-amd64"), "").unwrap();
        fs::write(t.path().join("boot/config-6.1.0-9-amd64"), "").unwrap();
        assert_eq!(
            find_in_root(t.path(), &["grub-install"]).as_deref(),
            Some("/usr/sbin/grub-install")
        );
        assert_eq!(find_in_root(t.path(), &["update-grub"]), None);
        assert_eq!(kernels(t.path()), ["6.1.0-10-amd64", "6.1.0-9-amd64"]);
    }
}
