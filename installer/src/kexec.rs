//! Starting the installed kernel directly after `installed`, without the firmware, iPXE and
//! GRUB of a reboot: `kexec_file_load(2)` while the new root is still mounted (the kernel reads
//! both files then), and `reboot(LINUX_REBOOT_CMD_KEXEC)` after the final unmount. The next
//! real power cycle boots the disk through the firmware as before. Used only when the installed
//! kernel is not the running one; when it is, `/init` switches root instead (see main.rs).

use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::bootloader::BootEntry;
use crate::error::{err, Context, Result};

/// Loads `entry`'s kernel and initramfs from the new root as the kernel to kexec into, with
/// the command line GRUB would give it.
pub fn load(root: &Path, entry: &BootEntry) -> Result<()> {
    let open = |p: &str| {
        let path = root.join(p.trim_start_matches('/'));
        File::open(&path).context(|| format!("opening {}", path.display()))
    };
    let (kernel, initrd) = (open(&entry.kernel)?, open(&entry.initrd)?);
    let cmdline = CString::new(command_line(entry))
        .map_err(|_| err("the kernel command line contains NUL"))?;
    let len = cmdline.as_bytes_with_nul().len();
    // SAFETY: both descriptors are open for reading and cmdline is NUL-terminated and `len`
    // bytes long including the NUL, as kexec_file_load(2) requires.
    let r = unsafe {
        libc::syscall(
            libc::SYS_kexec_file_load,
            kernel.as_raw_fd(),
            initrd.as_raw_fd(),
            len,
            cmdline.as_ptr(),
            0u64,
        )
    };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        return Err(err(format!(
            "kexec_file_load of {}: {e}{}",
            entry.kernel,
            match e.raw_os_error() {
                Some(libc::ENOSYS) => " (the installer's kernel has no CONFIG_KEXEC_FILE)",
                Some(libc::ENOEXEC) => " (an image format this kernel cannot kexec)",
                Some(libc::EPERM) => " (not allowed: lockdown or missing CAP_SYS_BOOT)",
                _ => "",
            }
        )));
    }
    Ok(())
}

/// The loaded kernel's command line: GRUB's (it adds `BOOT_IMAGE=`), and no file system check
/// for this one boot. The installer made the file system and unmounts it cleanly just before
/// the kexec, so the check can only find it clean; under TCG it held the first boot up for 5 s
/// (systemd-fsck-root and fsckd, on the way to the early sshd). Boots through GRUB check as the
/// distro does.
pub fn command_line(entry: &BootEntry) -> String {
    format!(
        "BOOT_IMAGE={} {} fsck.mode=skip",
        entry.kernel, entry.cmdline
    )
}

/// Jumps into the loaded kernel; returns only if that failed.
pub fn exec() -> std::io::Error {
    // SAFETY: sync and reboot have no memory-safety preconditions.
    unsafe {
        libc::sync();
        libc::reboot(libc::LINUX_REBOOT_CMD_KEXEC);
    }
    std::io::Error::last_os_error()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_grubs_without_a_check() {
        let entry = BootEntry {
            version: "6.1.0-9-cloud-amd64".into(),
            kernel: "/boot/vmlinuz-6.1.0-9-cloud-amd64".into(),
            initrd: "/boot/initrd.img-6.1.0-9-cloud-amd64".into(),
            cmdline: "root=UUID=1234 ro console=ttyS0".into(),
        };
        assert_eq!(
            command_line(&entry),
            "BOOT_IMAGE=/boot/vmlinuz-6.1.0-9-cloud-amd64 root=UUID=1234 ro console=ttyS0 fsck.mode=skip"
        );
        let t = tempfile::tempdir().unwrap();
        let e = load(t.path(), &entry).unwrap_err().0;
        assert!(e.starts_with("opening "), "{e}");
    }
}
