//! Making the new root bootable without running GRUB's tools: the files `grub-install` and
//! `update-grub` would produce are written directly.
//!
//! - The rootfs's monolithic EFI GRUB image (every module it needs built in, e.g. Debian's
//!   `usr/lib/grub/x86_64-efi/monolithic/grubx64.efi`) is copied to the removable-media path
//!   `EFI/BOOT/BOOT<ARCH>.EFI`, which firmware boots without an NVRAM entry.
//! - Its built-in config reads `grub.cfg` beside it; ours finds the root filesystem by UUID
//!   and loads `/boot/grub/grub.cfg` from it — the file `update-grub` maintains, so a kernel
//!   upgrade in the target (which runs `update-grub`) keeps the disk booting.
//! - `/boot/grub/grub.cfg` boots the newest kernel with `root=UUID=…`, and
//!   `/etc/default/grub.d/90-pxelab.cfg` makes the target's own `update-grub` write the same.
//!
//! Running grub-install and update-grub in a chroot under emulation took 16-27 s per install.

use std::cmp::Ordering;
use std::fs;
use std::path::Path;

use crate::error::{err, Context, Result};
use crate::mkfs::FsIds;
use crate::mounts::Mounts;
use crate::seed::{write_atomic, write_with};

/// The rootfs's monolithic GRUB image and the removable-media file name firmware looks for.
fn efi_image() -> (&'static str, &'static str) {
    if cfg!(target_arch = "aarch64") {
        (
            "usr/lib/grub/arm64-efi/monolithic/grubaa64.efi",
            "BOOTAA64.EFI",
        )
    } else {
        (
            "usr/lib/grub/x86_64-efi/monolithic/grubx64.efi",
            "BOOTX64.EFI",
        )
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

/// GRUB's menu timeout, in seconds, for both the config written here and `update-grub`'s.
const TIMEOUT: u32 = 1;

/// Everything the boot-loader step needs to know about the new install.
pub struct Target<'a> {
    pub root: &'a Path,
    pub esp_dev: &'a Path,
    pub ids: &'a FsIds,
}

/// The kernel the disk boots, as GRUB starts it (paths inside the root filesystem).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootEntry {
    pub version: String,
    pub kernel: String,
    pub initrd: String,
    /// The kernel command line without `BOOT_IMAGE=` (which GRUB adds).
    pub cmdline: String,
}

/// Mounts the ESP at `boot/efi` (it stays on `mounts` until the final unmount) and writes the
/// boot files for GRUB to boot `entry` ([`newest_kernel`]).
pub fn install(t: &Target<'_>, entry: &BootEntry, mounts: &mut Mounts) -> Result<()> {
    let (image, removable) = efi_image();
    let grub = fs::read(t.root.join(image)).context(|| {
        format!("reading /{image} from the rootfs (Debian: package grub-efi-amd64-bin or grub-efi-arm64-bin)")
    })?;
    write_atomic(
        &t.root.join("etc/default/grub.d/90-pxelab.cfg"),
        grub_defaults().as_bytes(),
        0o644,
    )?;
    write_atomic(
        &t.root.join("boot/grub/grub.cfg"),
        grub_cfg(entry, &t.ids.root_uuid).as_bytes(),
        0o444,
    )?;
    let esp = t.root.join("boot/efi");
    mounts.mount(t.esp_dev, &esp, "vfat", "umask=0077")?;
    let config = esp_grub_cfg(&t.ids.root_uuid);
    // The image reads `/EFI/<vendor>/grub.cfg` (its built-in prefix), else searches every disk
    // for a CD's `/.disk/info` (two error lines on each boot) and reads the file beside itself.
    let vendor = os_id(t.root).map(|id| format!("EFI/{id}"));
    for dir in ["EFI/BOOT".to_string()].into_iter().chain(vendor) {
        let dir = esp.join(dir);
        fs::create_dir_all(&dir).context(|| format!("creating {}", dir.display()))?;
        write_fat(&dir.join("grub.cfg"), config.as_bytes())?;
    }
    write_fat(&esp.join("EFI/BOOT").join(removable), &grub)
}

/// The distro's `ID` from os-release, which Debian and Ubuntu also use as GRUB's EFI vendor
/// directory; only a plain lowercase word.
fn os_id(root: &Path) -> Option<String> {
    let text = ["etc/os-release", "usr/lib/os-release"]
        .iter()
        .find_map(|p| fs::read_to_string(root.join(p)).ok())?;
    let id = text
        .lines()
        .find_map(|l| l.strip_prefix("ID="))?
        .trim_matches('"');
    let plain = !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    plain.then(|| id.to_string())
}

/// The newest `/boot/vmlinuz-<version>` (GRUB's menu lists it first), which must have an
/// initramfs, with the command line `update-grub` would give it.
pub fn newest_kernel(root: &Path, root_uuid: &str) -> Result<BootEntry> {
    let mut versions: Vec<String> = fs::read_dir(root.join("boot"))
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
    if versions.is_empty() {
        return Err(err("the rootfs has no kernel (/boot/vmlinuz-*); it cannot boot: rebuild it with a kernel package"));
    }
    versions.sort_by(|a, b| version_cmp(b, a));
    let version = versions.remove(0);
    let initrd = [
        format!("/boot/initrd.img-{version}"),
        format!("/boot/initramfs-{version}.img"),
    ]
    .into_iter()
    .find(|p| root.join(&p[1..]).is_file())
    .ok_or_else(|| {
        err(format!(
            "the rootfs has no initramfs for kernel {version} (/boot/initrd.img-{version}); rebuild it with initramfs-tools"
        ))
    })?;
    let defaults = fs::read_to_string(root.join("etc/default/grub")).unwrap_or_default();
    let words = [
        format!("root=UUID={root_uuid} ro"),
        default_value(&defaults, "GRUB_CMDLINE_LINUX"),
        serial_console().to_string(),
        default_value(&defaults, "GRUB_CMDLINE_LINUX_DEFAULT"),
    ];
    Ok(BootEntry {
        kernel: format!("/boot/vmlinuz-{version}"),
        initrd,
        cmdline: words
            .join(" ")
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" "),
        version,
    })
}

/// The value of a plain `KEY="words"` line of `/etc/default/grub` (the last one wins, as when
/// the shell sources it); empty if absent or not a plain quoted string.
fn default_value(defaults: &str, key: &str) -> String {
    defaults
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.strip_prefix('"')?.strip_suffix('"'))
        .filter(|v| !v.contains(['$', '`', '"', '\\']))
        .unwrap_or_default()
        .to_string()
}

/// Orders kernel versions as people (and GRUB's `version_sort`) do: runs of digits by value,
/// so `6.1.0-10` is newer than `6.1.0-9`.
pub fn version_cmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let digits = |s: &[u8]| s.iter().take_while(|c| c.is_ascii_digit()).count();
                let (na, nb) = (digits(a), digits(b));
                let (da, db) = (trim_zeros(&a[..na]), trim_zeros(&b[..nb]));
                let by_value = da.len().cmp(&db.len()).then_with(|| da.cmp(db));
                if by_value != Ordering::Equal {
                    return by_value;
                }
                (a, b) = (&a[na..], &b[nb..]);
            }
            (Some(x), Some(y)) if x != y => return x.cmp(y),
            _ => (a, b) = (&a[1..], &b[1..]),
        }
    }
}

fn trim_zeros(digits: &[u8]) -> &[u8] {
    let zeros = digits.iter().take_while(|c| **c == b'0').count();
    &digits[zeros..]
}

/// `/etc/default/grub.d/90-pxelab.cfg`: Debian's grub-mkconfig sources it after
/// `/etc/default/grub` (`90-` sorts after the distro's own drop-ins).
fn grub_defaults() -> String {
    format!(
        "# Written by pxelab-installer: boot the root by UUID, a short menu timeout, kernel messages\n\
         # on the serial console for the lab's log. update-grub (run by kernel upgrades) reads it.\n\
         GRUB_DISABLE_LINUX_UUID=false\n\
         GRUB_TIMEOUT={TIMEOUT}\n\
         # GRUB's own console, which the firmware mirrors to the serial port: without it\n\
         # update-grub's menu switches to gfxterm and the serial log goes silent.\n\
         GRUB_TERMINAL=console\n\
         GRUB_CMDLINE_LINUX=\"$GRUB_CMDLINE_LINUX {}\"\n",
        serial_console()
    )
}

/// `/boot/grub/grub.cfg` until the target's own `update-grub` replaces it.
pub fn grub_cfg(entry: &BootEntry, root_uuid: &str) -> String {
    format!(
        "# Written by pxelab-installer; update-grub replaces it (with the settings of\n\
         # /etc/default/grub.d/90-pxelab.cfg).\n\
         set default=0\n\
         set timeout={TIMEOUT}\n\
         menuentry 'Linux {version}' {{\n\
         \tsearch --no-floppy --fs-uuid --set=root {root_uuid}\n\
         \tlinux\t{kernel} {cmdline}\n\
         \tinitrd\t{initrd}\n\
         }}\n",
        version = entry.version,
        kernel = entry.kernel,
        cmdline = entry.cmdline,
        initrd = entry.initrd,
    )
}

/// `EFI/BOOT/grub.cfg` on the ESP, read by the GRUB image beside it.
pub fn esp_grub_cfg(root_uuid: &str) -> String {
    format!(
        "# Written by pxelab-installer: load the root filesystem's GRUB config, which update-grub\n\
         # maintains.\n\
         search --no-floppy --fs-uuid --set=root {root_uuid}\n\
         set prefix=($root)/boot/grub\n\
         configfile $prefix/grub.cfg\n"
    )
}

/// Writes a file on the FAT ESP, which has no owners or modes to set (the mount's umask
/// decides).
fn write_fat(path: &Path, body: &[u8]) -> Result<()> {
    write_with(path, body, |_| Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_sort_by_number() {
        let mut v = vec![
            "6.1.0-9-amd64",
            "6.1.0-10-amd64",
            "5.10.0-28-amd64",
            "6.1.0-10",
        ];
        v.sort_by(|a, b| version_cmp(a, b));
        assert_eq!(
            v,
            [
                "5.10.0-28-amd64",
                "6.1.0-9-amd64",
                "6.1.0-10",
                "6.1.0-10-amd64"
            ]
        );
        assert_eq!(version_cmp("6.01", "6.1"), Ordering::Equal);
    }

    #[test]
    fn boots_the_newest_kernel_with_an_initramfs_by_uuid() {
        let t = tempfile::tempdir().unwrap();
        let boot = t.path().join("boot");
        fs::create_dir_all(&boot).unwrap();
        for f in [
            "vmlinuz-6.1.0-9-amd64",
            "initrd.img-6.1.0-9-amd64",
            "vmlinuz-6.1.0-10-amd64",
            "initrd.img-6.1.0-10-amd64",
            "config-6.1.0-10-amd64",
        ] {
            fs::write(boot.join(f), "").unwrap();
        }
        let e = newest_kernel(t.path(), "1234").unwrap();
        assert_eq!(e.kernel, "/boot/vmlinuz-6.1.0-10-amd64");
        assert_eq!(e.initrd, "/boot/initrd.img-6.1.0-10-amd64");
        assert_eq!(e.cmdline, format!("root=UUID=1234 ro {}", serial_console()));
        // As update-grub: GRUB_CMDLINE_LINUX, then ours, then GRUB_CMDLINE_LINUX_DEFAULT.
        fs::create_dir_all(t.path().join("etc/default")).unwrap();
        fs::write(
            t.path().join("etc/default/grub"),
            "GRUB_CMDLINE_LINUX_DEFAULT=\"splash\"\n# GRUB_CMDLINE_LINUX=\"x\"\nGRUB_CMDLINE_LINUX=\"net.ifnames=0\"\nGRUB_CMDLINE_LINUX_DEFAULT=\"quiet\"\n",
        )
        .unwrap();
        let e = newest_kernel(t.path(), "1234").unwrap();
        assert_eq!(
            e.cmdline,
            format!("root=UUID=1234 ro net.ifnames=0 {} quiet", serial_console())
        );
        let shell = "GRUB_CMDLINE_LINUX=\"$X y\"\n";
        assert_eq!(default_value(shell, "GRUB_CMDLINE_LINUX"), "");
        let cfg = grub_cfg(&e, "1234");
        assert!(cfg.contains("\tsearch --no-floppy --fs-uuid --set=root 1234\n"));
        assert!(cfg.contains(&format!(
            "\tlinux\t/boot/vmlinuz-6.1.0-10-amd64 {}\n",
            e.cmdline
        )));
        assert!(cfg.contains("set timeout=1\n"));

        fs::remove_file(boot.join("initrd.img-6.1.0-10-amd64")).unwrap();
        let e = newest_kernel(t.path(), "1234").unwrap_err().0;
        assert!(e.contains("no initramfs for kernel 6.1.0-10-amd64"), "{e}");
        fs::remove_dir_all(&boot).unwrap();
        let e = newest_kernel(t.path(), "1234").unwrap_err().0;
        assert!(e.contains("has no kernel"), "{e}");
    }

    #[test]
    fn the_vendor_directory_is_the_os_release_id() {
        let t = tempfile::tempdir().unwrap();
        assert_eq!(os_id(t.path()), None);
        fs::create_dir_all(t.path().join("usr/lib")).unwrap();
        fs::write(
            t.path().join("usr/lib/os-release"),
            "NAME=\"Debian\"\nID=debian\n",
        )
        .unwrap();
        assert_eq!(os_id(t.path()).as_deref(), Some("debian"));
        fs::create_dir_all(t.path().join("etc")).unwrap();
        fs::write(t.path().join("etc/os-release"), "ID=\"../x\"\n").unwrap();
        assert_eq!(os_id(t.path()), None);
    }

    #[test]
    fn the_esp_config_chains_the_roots_config_and_defaults_keep_uuid_and_console() {
        let esp = esp_grub_cfg("abcd");
        assert!(esp.contains("search --no-floppy --fs-uuid --set=root abcd\n"));
        assert!(esp.ends_with("configfile $prefix/grub.cfg\n"));
        let d = grub_defaults();
        assert!(d.contains("GRUB_DISABLE_LINUX_UUID=false\n"));
        assert!(d.contains(serial_console()));
        assert!(d.contains("\nGRUB_TERMINAL=console\n"), "{d}");
    }
}
