//! What only the installer's test files share: the lab's login and MAC, one machine-wide test at
//! a time, the NIC the initrd would have brought up, and the tools the loop-disk tests run.
//! Commands, namespaces and loop disks come from `pxelab_tests`.
#![allow(dead_code)]

use std::sync::{Mutex, MutexGuard};

use pxelab_tests::cmd::{require, require_root};
use pxelab_tests::NetNs;

/// The MAC of the test VM (its NIC in [`private_network`]).
pub const MAC: &str = "52:54:00:12:34:56";
pub const LAB_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIK0wmN/Cr3JXqmLW7u+g9pTh+wyqDHpSQEIQczXkVx9q lab";

/// The login the stack's user-data declares, as the config hands it to the installer.
pub fn lab_login() -> pxelab_contract::Login {
    pxelab_contract::Login {
        user: "pxelab".into(),
        gecos: "pxelab lab user".into(),
        shell: "/bin/bash".into(),
        sudo: Some("ALL=(ALL) NOPASSWD:ALL".into()),
        ssh_authorized_keys: vec![LAB_KEY.into()],
    }
}

/// Loop devices, mounts and /dev/disk are machine-wide: one such test at a time per binary.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A network namespace where a veth carries the config's MAC and an address, as the initrd's
/// NIC does after DHCP. Run the fixture server and the installer in it with
/// [`NetNs::within`]: the installer records the address it was leased.
pub fn private_network() -> NetNs {
    let ns = NetNs::new("installer");
    ns.ip(&format!(
        "link add eth0 address {MAC} type veth peer name eth0p"
    ));
    ns.ip("address add 10.99.7.10/24 dev eth0");
    ns.ip("link set eth0 up");
    ns.ip("link set eth0p up");
    ns
}

/// Root and the host tools the loop-disk tests run.
pub fn require_root_and_tools() {
    require_root("sys_ installer tests (loop devices, mkfs, mount)");
    for (tool, package) in [
        ("losetup", "util-linux"),
        ("partx", "util-linux"),
        ("blkid", "util-linux"),
        ("sfdisk", "fdisk"),
        ("mke2fs", "e2fsprogs"),
        ("mkfs.fat", "dosfstools"),
        ("tar", "tar"),
        ("zstd", "zstd"),
        ("mtype", "mtools"),
        ("ssh-keygen", "openssh-client"),
        ("ip", "iproute2"),
        ("chroot", "coreutils"),
        ("unshare", "util-linux"),
    ] {
        require(tool, package);
    }
}
