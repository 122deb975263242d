//! iPXE scripts. Every value interpolated here is validated first (VM names, distros, the Host
//! header), so nothing a client sends can add a command to a script.

use std::fmt::Write as _;

use pxelab_contract::{Arch, Mac, VmDefinition};

/// File names the installer's boot uses; `initrd=` on the command line must match the names
/// given to iPXE's `initrd --name` (old iPXE on EFI only hands named initrds to the kernel's EFI
/// stub; newer iPXE passes them all via LoadFile2 and the kernel then ignores `initrd=`).
pub const INSTALLER_INITRD: &str = "initrd.img";
pub const MODULES_ARCHIVE: &str = "modules.cpio.zst";
pub const DEFAULT_KERNEL: &str = "vmlinuz";

/// The kernel arguments every network boot gets: the serial console, and a reboot 10 s after a
/// kernel panic instead of a hang, so the machine network-boots again (an installer starts
/// over, a diskless system boots afresh). Under TCG, Debian 13's 6.12 kernel now and then dies
/// of "Oops: int3" in an interrupt while it patches its own code on two vCPUs (seen in CI in
/// an installer and in a diskless boot, each time hanging the run); a server in a rack should
/// not hang on a panic either.
pub fn console(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => "console=ttyS0,115200 panic=10",
        Arch::Aarch64 => "console=ttyAMA0,115200 panic=10",
    }
}

pub fn kernel_file(vm: &VmDefinition) -> &str {
    vm.kernel.as_deref().unwrap_or(DEFAULT_KERNEL)
}

/// `base` is `http://host[:port]`; `token` is the boot's ([`crate::access`]), carried by the
/// config URL (the installer's events URL comes with the config). `BOOTIF` names the NIC that
/// booted, for the initrd's `/init` (iPXE's own spelling, as in [`nfsroot_script`]).
pub fn install_script(vm: &VmDefinition, base: &str, token: &str) -> String {
    let images = format!("{base}/images/{}/{}", vm.distro, vm.arch);
    let kernel = format!("{images}/{}", kernel_file(vm));
    let bootif = vm.mac.to_string().replace(':', "-");
    // Sized once: a boot storm renders this per request, and growing it cost a tenth of that.
    let mut script = String::with_capacity(1024);
    let _ = write!(
        script,
        "#!ipxe\n\
         echo pxelab: installing {distro} ({arch}) on {name} ({mac})\n\
         kernel {kernel} {console} BOOTIF=01-{bootif} config_url={base}/config/{mac}?token={token}{shell} initrd={INSTALLER_INITRD} initrd={MODULES_ARCHIVE} || goto failed\n\
         initrd --name {INSTALLER_INITRD} {base}/initrds/{arch}/{INSTALLER_INITRD} || goto failed\n\
         initrd --name {MODULES_ARCHIVE} {images}/{MODULES_ARCHIVE} || goto failed\n\
         boot || goto failed\n\
         :failed\n\
         echo pxelab: network boot of {name} failed, see the message above and the log of pxelab-stack\n\
         shell\n",
        distro = vm.distro,
        arch = vm.arch,
        name = vm.name,
        mac = vm.mac,
        console = console(vm.arch),
        shell = if vm.installer_shell { " pxelab.mode=shell" } else { "" },
    );
    script
}

/// Leave iPXE so the firmware boots the installed disk.
///
/// - BIOS (SeaBIOS, undionly.kpxe): `sanboot --no-describe --drive 0x80` boots the first hard
///   disk's MBR through INT 13h directly; more reliable than returning to the BIOS, which
///   not every BIOS follows with the next boot device.
/// - UEFI (OVMF): `exit 1`. A *failing* exit status makes the boot manager try the next
///   `BootOrder` entry (the disk); `exit 0` (success) sends OVMF to its boot-manager menu and
///   the machine would sit there.
pub fn local_boot_script(vm: &VmDefinition) -> String {
    format!(
        "#!ipxe\n\
         echo pxelab: {name} ({mac}) is installed, booting from the local disk\n\
         iseq ${{platform}} pcbios || goto leave\n\
         sanboot --no-describe --drive 0x80 || goto leave\n\
         :leave\n\
         exit 1\n",
        name = vm.name,
        mac = vm.mac,
    )
}

/// Served with status 404 (iPXE will not run it; it is for whoever reads the reply).
pub fn unknown_mac_script(mac: Mac) -> String {
    format!(
        "#!ipxe\n\
         echo pxelab: no VM is defined for MAC {mac}: add a VM definition with this MAC to the VMs directory\n\
         exit 1\n"
    )
}

/// `/boot.ipxe`: what dnsmasq hands to iPXE clients; it chains to the per-MAC script with iPXE
/// filling in the MAC of the interface that booted. No `|| shell`: when the per-VM script
/// leaves with `exit 1` (boot the disk) or the chain fails, the failure must reach the firmware
/// so it tries its next boot device (a real QEMU/OVMF run sat at `iPXE>` with `|| shell`).
pub fn chain_script(base: &str) -> String {
    format!("#!ipxe\nchain {base}/ipxe?mac=${{mac}}\n")
}

/// Names of the diskless boot's initrds (see [`INSTALLER_INITRD`] for why they are named).
pub const DISTRO_INITRD: &str = "initrd.img";
pub const NFSROOT_OVERLAY: &str = "pxelab-nfsroot.cpio";

/// A diskless boot: the distro's kernel and its own initramfs, plus the stack's boot script
/// (`boot=pxelab`, from `/nfsroot/overlay.cpio`) that mounts `nfs_server:export` read-only over
/// NFSv4 under a per-boot tmpfs overlay. `nfs_server` is the stack's IPv4 address as the
/// target reached it (the kernel does not resolve names); cloud-init gets its NoCloud seed from
/// the handler. `BOOTIF` names the NIC that booted so the initramfs configures that one. `rw`
/// describes the root the system gets (the overlay); the NFS layer under it is read-only.
///
/// `ds=nocloud-net`, not `ds=nocloud`: cloud-init 22.4 (Debian 12) gives `ds=nocloud` the
/// dsmode `local`, so its network stage finds the HTTP seed, then exits "in local mode" and the
/// boot ends on the fallback datasource (no hostname, no user, no SSH host keys — measured).
/// Later cloud-init versions still accept `nocloud-net`.
///
/// `network-config=disabled` keeps cloud-init away from the NIC: it otherwise rendered the
/// initramfs's lease for ifupdown and ran `ifup` on it, so dhclient asked for the lease again
/// (5 s of the boot) and `systemctl stop networking` (every shutdown) flushed the address under
/// the NFS root (measured: "nfs: server … not responding"). The boot script writes
/// `/etc/resolv.conf` from the initramfs's lease instead.
///
/// `token` is the boot's ([`crate::access`]): the initramfs posts its `nfs-root` event with it.
pub fn nfsroot_script(
    vm: &VmDefinition,
    base: &str,
    nfs_server: &str,
    export: &str,
    token: &str,
) -> String {
    let images = format!("{base}/images/{}/{}", vm.distro, vm.arch);
    let kernel = format!("{images}/{}", kernel_file(vm));
    let bootif = vm.mac.to_string().replace(':', "-");
    let mut script = String::with_capacity(1024);
    let _ = write!(
        script,
        "#!ipxe\n\
         echo pxelab: diskless boot of {name} ({mac}): {distro} ({arch}), root {nfs_server}:{export} over NFS\n\
         kernel {kernel} {console} boot=pxelab ip=dhcp BOOTIF=01-{bootif} nfsroot={nfs_server}:{export} rw pxelab.events={base}/events/{mac}?token={token} ds=nocloud-net;s={base}/cloud-init/{name}/ network-config=disabled initrd={DISTRO_INITRD} initrd={NFSROOT_OVERLAY} || goto failed\n\
         initrd --name {DISTRO_INITRD} {base}/nfsroot/{distro}/{arch}/{DISTRO_INITRD} || goto failed\n\
         initrd --name {NFSROOT_OVERLAY} {base}/nfsroot/overlay.cpio || goto failed\n\
         boot || goto failed\n\
         :failed\n\
         echo pxelab: diskless boot of {name} failed, see the message above and the log of pxelab-stack\n\
         shell\n",
        distro = vm.distro,
        arch = vm.arch,
        name = vm.name,
        mac = vm.mac,
        console = console(vm.arch),
    );
    script
}

/// While the VM cannot boot yet (its diskless root is being unpacked, its distro is not
/// pulled, …): say why on the console, wait and ask again. `why` is one line the stack wrote
/// (paths and distro names it validated). `--replace` runs the next script in place of this
/// one, so a target that waits for an hour does not nest hundreds of scripts.
pub fn retry_script(vm: &VmDefinition, base: &str, why: &str, seconds: u32) -> String {
    retry_mac_script(vm.mac, base, why, seconds)
}

/// [`retry_script`] for a MAC whose definition cannot be read now.
pub fn retry_mac_script(mac: Mac, base: &str, why: &str, seconds: u32) -> String {
    let why: String = why
        .chars()
        .map(|c| if c.is_control() || c == '$' { ' ' } else { c })
        .collect();
    format!(
        "#!ipxe\n\
         echo pxelab: {why}; retrying in {seconds} s\n\
         sleep {seconds}\n\
         chain --replace --autofree {base}/ipxe?mac={mac}\n",
    )
}
