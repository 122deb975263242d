//! Figure 4: the installer streaming the real Debian rootfs onto a loop device, against
//! `curl | zstd -d | tar -x` of the same file into the same kind of filesystem.
//!
//! Both read the tarball over loopback HTTP from the real boot handler (`pxelab-stack
//! --no-dnsmasq`, serving the bench's `distro pull`). Every run gets a fresh sparse disk image
//! on a new loop device: the installer partitions and formats it itself (as on a target); the
//! peer gets a fresh ext4 made with the installer's mke2fs options, mkfs not timed. Ours is the
//! installer's own `rootfs` phase (download + sha256 + zstd + tar, as it reports it to the
//! handler); the whole install (partition, mkfs, rootfs, seed, GRUB) is reported beside it.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use pxelab_contract::{Arch, BootMode, Mac, Phase, TimelineEntry, VmDefinition};
use xshell::cmd;

use super::guards::{http_get, LoopDev, Mount, MountsUnder, Server};
use super::report::{Better, Group, Row};
use super::{free_port, log_tail, mib, timed, Ctx, DEBIAN_12};
use crate::hostdeps::{HostDep, Probe};
use crate::lab::home::Lab;
use crate::process;

const NAME: &str = "bench-install";
const MAC: &str = "52:54:00:be:4c:02";
const DISK_SIZE: u64 = 8 << 30;
const PEER: &str = "curl | zstd -d | tar -x";

pub fn run(ctx: &mut Ctx, group: &mut Group) -> Result<()> {
    process::require_root(
        "benchmarking the installer",
        "it writes to loop devices and mounts them",
    )?;
    crate::hostdeps::ensure(&TOOLS)?;
    let stack = ctx.stack_dir()?;
    let pulled = ctx.distro(DEBIAN_12)?;
    let distro = pulled
        .dir
        .parent()
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_str())
        .context("distro pull returned an unexpected directory")?
        .to_string();
    let rootfs = &pulled.manifest.contract.rootfs;
    group.fact(
        "rootfs",
        format!(
            "{distro} {}: {:.0} MiB zstd, {:.0} MiB tar",
            rootfs.file,
            mib(rootfs.size),
            mib(pulled.manifest.rootfs_uncompressed_size)
        ),
    );

    let dir = ctx.scratch("install")?;
    let data = dir.join("data");
    for d in ["vms", "state", "initrds/x86_64"] {
        std::fs::create_dir_all(data.join(d))?;
    }
    // The stack hands out an install only when it has the installer initrd to serve (the
    // installer runs here straight from the build, not from it).
    std::fs::copy(
        stack.join("initrd-x86_64.img"),
        data.join("initrds/x86_64/initrd.img"),
    )
    .context("copying the built installer initrd")?;
    let port = free_port()?;
    let base = format!("http://127.0.0.1:{port}");
    let sh = process::shell()?;
    let binary = stack.join("pxelab-stack");
    let images = Lab::at(ctx.lab_home())?.images_root();
    let listen = format!("127.0.0.1:{port}");
    let mut handler = Server::spawn(
        "pxelab-stack",
        &mut process::command(cmd!(
            sh,
            "{binary} --data-dir {data} --images-dir {images} --no-dnsmasq --no-access-log --no-ip-check --listen {listen}"
        )),
        &dir.join("pxelab-stack.log"),
    )?;
    handler.wait_ready(&format!("{base}/healthz"))?;
    let url = format!("{base}/images/{distro}/x86_64/{}", rootfs.file);

    let runs = ctx.runs(3, 1);
    let (mut ours, mut peer, mut whole) = (Vec::new(), Vec::new(), Vec::new());
    let mut phases: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut failures = Vec::new();
    for i in 0..runs {
        ctx.ui
            .println(format!("bench install: run {}/{runs}", i + 1));
        let order: [bool; 2] = if i % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for mine in order {
            if mine {
                let (timeline, failed) = install_once(
                    &dir,
                    i,
                    &data,
                    &base,
                    &distro,
                    &stack.join("pxelab-installer"),
                    &mut handler,
                )?;
                let phase_s = |p: Phase| {
                    timeline
                        .iter()
                        .rev()
                        .find(|e| e.event.phase == p)
                        .and_then(|e| e.event.duration_ms)
                        .map(|ms| ms as f64 / 1000.0)
                };
                ours.push(
                    phase_s(Phase::Rootfs)
                        .context("the installer reported no finished rootfs phase")?,
                );
                match failed {
                    Some(why) => failures.push(why),
                    None => whole.push(
                        phase_s(Phase::Installed)
                            .context("the installer reported no installed event")?,
                    ),
                }
                for p in [
                    Phase::Disk,
                    Phase::Partition,
                    Phase::Mkfs,
                    Phase::Rootfs,
                    Phase::Seed,
                    Phase::Bootloader,
                ] {
                    if let Some(s) = phase_s(p) {
                        phases.entry(p.to_string()).or_default().push(s);
                    }
                }
            } else {
                peer.push(peer_once(&dir, i, &url)?);
            }
        }
    }
    let rate = |v: &[f64]| v.iter().map(|s| mib(rootfs.size) / s).collect::<Vec<_>>();
    group.push(
        &ctx.ui,
        Row::new(
            "rootfs onto a fresh ext4 (loop device), over loopback HTTP",
            "s",
            Better::Lower,
            ours.clone(),
        )
        .peer(PEER, peer.clone())
        .note("ours: the installer's rootfs phase (download, sha256, zstd, tar)"),
    );
    group.push(
        &ctx.ui,
        Row::new(
            "rootfs stream rate (compressed bytes)",
            "MiB/s",
            Better::Higher,
            rate(&ours),
        )
        .peer(PEER, rate(&peer)),
    );
    let breakdown: Vec<String> = phases
        .iter()
        .filter_map(|(p, v)| super::report::stats(v).0.map(|m| format!("{p} {m:.1}")))
        .collect();
    group.push(
        &ctx.ui,
        Row::new(
            "whole install on a loop device (partition, mkfs, rootfs, seed, GRUB)",
            "s",
            Better::Lower,
            whole,
        )
        .note(format!("median s per phase: {}", breakdown.join(", ")))
        .note(match failures.first() {
            Some(why) => format!(
                "{} of {runs} installs failed after the rootfs: {why}",
                failures.len()
            ),
            None => String::new(),
        }),
    );
    Ok(())
}

const TOOLS: [HostDep; 8] = [
    HostDep {
        probe: Probe::Bin("curl"),
        package: "curl",
    },
    HostDep {
        probe: Probe::Bin("zstd"),
        package: "zstd",
    },
    HostDep {
        probe: Probe::Bin("bash"),
        package: "bash",
    },
    HostDep {
        probe: Probe::Bin("losetup"),
        package: "util-linux",
    },
    HostDep {
        probe: Probe::Bin("blkid"),
        package: "util-linux",
    },
    HostDep {
        probe: Probe::Bin("mke2fs"),
        package: "e2fsprogs",
    },
    HostDep {
        probe: Probe::Bin("mkfs.fat"),
        package: "dosfstools",
    },
    HostDep {
        probe: Probe::Bin("sfdisk"),
        package: "fdisk",
    },
];

/// One install by the real installer onto a fresh loop device; returns the timeline the
/// handler recorded for it.
fn install_once(
    dir: &Path,
    i: usize,
    data: &Path,
    base: &str,
    distro: &str,
    installer: &Path,
    handler: &mut Server,
) -> Result<(Vec<TimelineEntry>, Option<String>)> {
    let disk = LoopDev::attach(&dir.join(format!("disk-ours-{i}.img")), DISK_SIZE)?;
    let target = dir.join(format!("target-{i}"));
    let _left_mounted = MountsUnder(target.clone());
    let vm = VmDefinition {
        name: NAME.into(),
        role: None,
        arch: Arch::X86_64,
        distro: distro.into(),
        mac: MAC.parse::<Mac>().map_err(|e| anyhow::anyhow!("{e}"))?,
        ssh_key: String::new(),
        kernel: None,
        initrd: None,
        pxeboot: true,
        ip: None,
        ipv6: None,
        hostname: None,
        disk: Some(disk.dev.clone()),
        boot: BootMode::Install,
        installer_shell: false,
        no_reboot: false,
        firmware_reboot: false,
    };
    std::fs::write(data.join(format!("vms/{NAME}.noreboot")), b"")?;
    crate::store::write_atomic(
        &data.join(format!("vms/{NAME}.json")),
        vm.to_json().as_bytes(),
    )?;
    // SIGHUP makes it re-read the VM definitions now.
    handler.signal(libc::SIGHUP);
    // On the control socket the config needs no boot token.
    let control = data.join("state").join(pxelab_contract::CONTROL_SOCKET);
    let config_path = format!("/config/{}", MAC.replace(':', "-"));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, body) = crate::lab::stack::request(&control, "GET", &config_path)?;
        let config: Option<pxelab_contract::InstallerConfig> = (code == 200)
            .then(|| serde_json::from_str(&body).ok())
            .flatten();
        if config.is_some_and(|c| c.disk.as_deref() == Some(disk.dev.as_str())) {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "the boot handler does not serve the new VM definition (GET {config_path} answers {code}: {})",
                body.trim()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // The stack owns install state: ask it to forget the previous run's `installed`.
    let reset = format!("/vms/{NAME}/reprovision");
    match crate::lab::stack::request(&control, "POST", &reset)? {
        (200, _) => {}
        (code, body) => bail!(
            "POST {reset} on {} answered {code}: {}",
            control.display(),
            body.trim()
        ),
    }
    // A boot hands the installer its config URL, which carries that boot's token.
    let (code, script) = http_get(&format!("{base}/ipxe?mac={MAC}"))?;
    let script = String::from_utf8_lossy(&script);
    let config_url = script
        .split_whitespace()
        .find_map(|w| w.strip_prefix("config_url="))
        .with_context(|| format!("/ipxe answered {code} without a config_url: {script}"))?
        .to_string();
    let log = dir.join(format!("installer-{i}.log"));
    let out = std::fs::File::create(&log)?;
    let sh = process::shell()?;
    let (config_arg, target_arg) = (
        format!("config_url={config_url}"),
        format!("pxelab.target={}", target.display()),
    );
    let status = process::command(cmd!(sh, "{installer} {config_arg} {target_arg}"))
        .stdout(out.try_clone()?)
        .stderr(out)
        .status()
        .with_context(|| format!("running {}", installer.display()))?;
    handler.check_alive()?;
    let (code, body) =
        crate::lab::stack::request(&control, "GET", &format!("/vms/{NAME}/timeline"))?;
    if code != 200 {
        bail!("GET /vms/{NAME}/timeline answered {code}");
    }
    let mut timeline: Vec<TimelineEntry> =
        serde_json::from_str(&body).context("parsing the install's timeline")?;
    // This run's events: everything after the reset above.
    if let Some(reset) = timeline
        .iter()
        .rposition(|e| e.event.phase == Phase::Reprovision)
    {
        timeline.drain(..=reset);
    }
    if status.success() {
        return Ok((timeline, None));
    }
    // A failure after the rootfs phase (e.g. GRUB on a host kernel without vfat) still leaves a
    // valid rootfs measurement; the whole-install row says why it has no sample.
    let streamed = timeline
        .iter()
        .any(|e| e.event.phase == Phase::Rootfs && e.event.duration_ms.is_some());
    if !streamed {
        bail!(
            "the installer failed ({status}) on {}; its output ends with:\n{}",
            disk.dev,
            log_tail(&log, 15)
        );
    }
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let line = text
        .lines()
        .rev()
        .find(|l| l.contains("FAILED"))
        .unwrap_or("no FAILED line");
    Ok((
        timeline,
        Some(line.trim_start_matches("pxelab-installer: ").to_string()),
    ))
}

/// `curl | zstd -d | tar -x` into a fresh ext4 on a new loop device; returns seconds.
fn peer_once(dir: &Path, i: usize, url: &str) -> Result<f64> {
    let disk = LoopDev::attach(&dir.join(format!("disk-peer-{i}.img")), DISK_SIZE)?;
    let sh = process::shell()?;
    let dev = &disk.dev;
    process::output(cmd!(
        sh,
        "mke2fs -t ext4 -F -q -O ^orphan_file,^metadata_csum_seed -E lazy_itable_init=1,nodiscard {dev}"
    ))?;
    let at = dir.join(format!("peer-{i}"));
    let mount = Mount::new(&disk.dev, &at, &[])?;
    let ((), secs) = timed(|| {
        let script = r#"curl -fsS "$1" | zstd -dc | tar -x -C "$2""#;
        process::output(cmd!(sh, "bash -o pipefail -c {script} bench {url} {at}"))
            .with_context(|| format!("{PEER} of {url}"))?;
        Ok(())
    })?;
    drop(mount);
    drop(disk);
    Ok(secs)
}
