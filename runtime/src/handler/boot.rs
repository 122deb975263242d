//! The boot half of the routes: what `/ipxe` answers a machine (its installer, its local disk, its
//! diskless root, or a script that waits and says why) and the files a diskless boot fetches.

use std::net::IpAddr;

use pxelab_contract::{BootMode, Event, Phase, VmDefinition, VmState};

use super::{query_param, Context, RETRY_SECONDS};
use crate::{
    access, ipxe, log,
    nfsroot::{self, RootStatus},
    server::{Body, Request, Response},
};

impl Context {
    pub(super) fn boot_ipxe(&self, r: &Request) -> Response {
        Response::new(
            200,
            "text/plain; charset=utf-8",
            ipxe::chain_script(&self.base_url(r)).into_bytes(),
        )
    }

    pub(super) fn ipxe(&self, r: &Request) -> Response {
        let Some(raw) = query_param(&r.query, "mac") else {
            return Response::line(
                400,
                "mac query parameter is required, e.g. /ipxe?mac=52:54:00:12:34:56",
            );
        };
        let (mac, set) = match self.select_by_mac(&raw) {
            Ok(found) => found,
            Err(reply) => return reply,
        };
        let Some(vm) = set.by_mac(mac) else {
            if self.vms.uncertain() {
                // It may be defined in etcd, which this stack cannot read now.
                let why = "the stack cannot read the machine definitions from etcd";
                log!("/ipxe for MAC {mac}: {why} (told to ask again in {RETRY_SECONDS} s)");
                return Response::new(
                    200,
                    "text/plain; charset=utf-8",
                    ipxe::retry_mac_script(mac, &self.base_url(r), why, RETRY_SECONDS).into_bytes(),
                );
            }
            log!("/ipxe: no VM is defined for MAC {mac}");
            return Response::new(
                404,
                "text/plain; charset=utf-8",
                ipxe::unknown_mac_script(mac).into_bytes(),
            );
        };
        if r.method == "GET" {
            self.bind_boot_address(r, vm);
        }
        let base = self.base_url(r);
        let reply = self.boot_script(r, vm, &base);
        // iPXE shows only an error number when `chain` gets an error status, and the chain
        // script would then try undionly.kpxe or give up (under OVMF: the EFI shell). A script
        // that prints the reason keeps it on the target's console and asks again, so the target
        // boots by itself once the operator has pulled or built what was missing.
        match (reply.status, &reply.body) {
            (500..=599, Body::Bytes(text)) => {
                let why = String::from_utf8_lossy(text).trim().to_string();
                log!(
                    "/ipxe for {}: {why} (told to ask again in {RETRY_SECONDS} s)",
                    vm.name
                );
                Response::new(
                    200,
                    "text/plain; charset=utf-8",
                    ipxe::retry_script(vm, &base, &why, RETRY_SECONDS).into_bytes(),
                )
            }
            _ => reply,
        }
    }

    /// What `vm` boots now: the installer, its local disk, or its distro over NFS.
    pub(super) fn boot_script(&self, r: &Request, vm: &VmDefinition, base: &str) -> Response {
        let state = match self.events.state(vm) {
            Ok(s) => s,
            Err(e) => return Response::line(500, &e.to_string()),
        };
        if vm.boot == BootMode::Nfsroot {
            return self.nfsroot_ipxe(r, vm, base);
        }
        if (state == VmState::Installed && !vm.installer_shell) || !vm.pxeboot {
            let why = if vm.pxeboot {
                "installed"
            } else {
                "pxeboot is false"
            };
            if r.method == "GET" {
                self.record(
                    vm,
                    Phase::LocalBoot,
                    format!("boot from the local disk ({why})"),
                );
            }
            return Response::new(
                200,
                "text/plain; charset=utf-8",
                ipxe::local_boot_script(vm).into_bytes(),
            );
        }
        if let Some(reply) = self.check_install_files(vm) {
            return reply;
        }
        let message = format!("installer for {} ({}) from {base}", vm.distro, vm.arch);
        let token =
            match self.begin_boot(r, vm, base, "the installer", message, !vm.installer_shell) {
                Ok(token) => token,
                Err(reply) => return reply,
            };
        let script = ipxe::install_script(vm, base, &token);
        Response::new(200, "text/plain; charset=utf-8", script.into_bytes())
    }

    /// A GET that boots `vm`: recorded as its `ipxe` event with a new boot token, which is
    /// returned. Refused (a script that says why) from another address than the machine's. A
    /// HEAD (a human checking the URL) is not a boot: it gets a token of zeros and no event.
    /// `installs`: refused when the machine is `installed` by the time the boot is recorded.
    pub(super) fn begin_boot(
        &self,
        r: &Request,
        vm: &VmDefinition,
        base: &str,
        what: &str,
        message: String,
        installs: bool,
    ) -> Result<String, Response> {
        if r.method != "GET" {
            return Ok("0".repeat(access::TOKEN_LEN));
        }
        if let Err(why) = self.check_machine_address(r, vm, what) {
            log!("/ipxe for {}: {why}", vm.name);
            return Err(Response::new(
                200,
                "text/plain; charset=utf-8",
                ipxe::retry_script(vm, base, &why, RETRY_SECONDS).into_bytes(),
            ));
        }
        let event = Event {
            phase: Phase::Ipxe,
            message,
            ..Event::default()
        };
        self.events
            .begin_boot(vm, event, installs)
            .map_err(|e| Response::line(500, &e.to_string()))
    }

    /// A diskless VM boots its distro over NFS every time (its state never reaches
    /// `installed`). Until the export is unpacked and served, iPXE is told to come back.
    pub(super) fn nfsroot_ipxe(&self, r: &Request, vm: &VmDefinition, base: &str) -> Response {
        let Some(nfs) = &self.nfs else {
            return Response::line(
                503,
                &format!(
                    "VM {} boots diskless (boot: nfsroot) but this stack runs without its NFS server; start pxelab-stack with --server-ip (the lab subnet it exports to) and without --no-nfs",
                    vm.name
                ),
            );
        };
        let dir = self
            .catalog
            .images_dir()
            .join(&vm.distro)
            .join(vm.arch.as_str());
        if self
            .catalog
            .file_size(&dir.join(ipxe::kernel_file(vm)))
            .is_none()
        {
            return not_pulled(vm, ipxe::kernel_file(vm));
        }
        let ready = match nfs.get(&vm.distro, vm.arch) {
            RootStatus::Ready(ready) => ready,
            RootStatus::Preparing(why) => {
                let why = format!("the NFS root of {} is not ready yet ({why})", vm.name);
                return Response::new(
                    200,
                    "text/plain; charset=utf-8",
                    ipxe::retry_script(vm, base, &why, 5).into_bytes(),
                );
            }
            RootStatus::Missing(why) => return Response::line(503, &why),
            RootStatus::Failed(why) => return Response::line(500, &why),
        };
        // The NFS server is this stack, at the address the target reached us on.
        let server = match r.local.ip() {
            IpAddr::V4(v4) => v4,
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => v4,
                None => {
                    return Response::line(
                        501,
                        &format!(
                            "diskless boots need IPv4 (the initramfs mounts NFS by IPv4 address); {} reached the stack over IPv6",
                            vm.name
                        ),
                    )
                }
            },
        };
        let message = format!(
            "diskless {} ({}) with root {server}:{} from {base}",
            vm.distro,
            vm.arch,
            ready.export.pseudo()
        );
        let token = match self.begin_boot(r, vm, base, "the diskless boot", message, false) {
            Ok(token) => token,
            Err(reply) => return reply,
        };
        let script = ipxe::nfsroot_script(
            vm,
            base,
            &server.to_string(),
            &ready.export.pseudo(),
            &token,
        );
        Response::new(200, "text/plain; charset=utf-8", script.into_bytes())
    }

    pub(super) fn overlay_cpio(&self) -> Response {
        Response::new(200, "application/octet-stream", nfsroot::overlay_cpio())
    }

    /// The distro's own initramfs (`boot/initrd.img-<kernel_version>` inside its export), which
    /// has the NFS client and the NIC drivers (initramfs-tools, MODULES=most).
    pub(super) fn distro_initrd(&self, r: &Request, distro: &str, arch: &str) -> Response {
        let Some(nfs) = &self.nfs else {
            return Response::line(
                503,
                "this stack runs without its NFS server (--no-nfs, or no --server-ip): no diskless boot files",
            );
        };
        let Ok(arch) = arch.parse::<pxelab_contract::Arch>() else {
            return Response::line(
                404,
                &format!("unknown architecture {arch:?}: use x86_64 or aarch64"),
            );
        };
        let distro_ok = !distro.starts_with('.')
            && distro
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !distro_ok {
            return Response::line(404, &format!("no distro {distro:?}"));
        }
        // Unpacking takes minutes and gigabytes: only for what a defined VM boots.
        let used = self
            .set()
            .vms
            .iter()
            .any(|vm| vm.boot == BootMode::Nfsroot && vm.distro == distro && vm.arch == arch);
        if !used {
            return Response::line(
                404,
                &format!("no diskless VM boots {distro} ({arch}): nothing is served for it"),
            );
        }
        match nfs.unpacked(distro, arch) {
            Ok((export, kernel_version)) => {
                let name = format!("initrd.img-{kernel_version}");
                let reply = self.file(&export.path, &["boot".to_string(), name], r);
                if reply.status == 404 {
                    return Response::line(
                        404,
                        &format!(
                            "the root filesystem of {distro} ({arch}) has no boot/initrd.img-{kernel_version}: it must contain the initramfs of its kernel (initramfs-tools, MODULES=most)"
                        ),
                    );
                }
                reply
            }
            Err(RootStatus::Preparing(why)) => {
                Response::line(503, &format!("not ready yet: {why}"))
            }
            Err(RootStatus::Missing(why)) => Response::line(404, &why),
            Err(RootStatus::Failed(why)) => Response::line(500, &why),
            // `unpacked` reports readiness only through Ok.
            Err(RootStatus::Ready(_)) => Response::line(500, "inconsistent diskless root state"),
        }
    }

    /// The files an install boot fetches must exist, or the target would stop in iPXE's shell
    /// with only an HTTP error code to go on.
    pub(super) fn check_install_files(&self, vm: &VmDefinition) -> Option<Response> {
        let (images, arch) = (self.catalog.images_dir(), vm.arch.as_str());
        for file in [ipxe::kernel_file(vm), ipxe::MODULES_ARCHIVE] {
            if self
                .catalog
                .file_size_at(images, &[&vm.distro, arch, file])
                .is_none()
            {
                return Some(not_pulled(vm, file));
            }
        }
        let initrds = self.catalog.initrds_dir();
        if self
            .catalog
            .file_size_at(initrds, &[arch, ipxe::INSTALLER_INITRD])
            .is_none()
        {
            return Some(Response::line(
                503,
                &format!(
                    "the installer initrd initrds/{}/{} is missing; run `cargo xtask build-stack`",
                    vm.arch,
                    ipxe::INSTALLER_INITRD
                ),
            ));
        }
        None
    }
}

/// 503 for a file of `vm`'s distro that is not there (named relative to the images directory:
/// replies never name host paths).
fn not_pulled(vm: &VmDefinition, file: &str) -> Response {
    Response::line(
        503,
        &format!(
            "distro {d} ({a}) is not pulled: images/{d}/{a}/{file} is missing; run `cargo xtask distro pull {d}`",
            d = vm.distro,
            a = vm.arch,
        ),
    )
}
