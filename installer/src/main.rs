//! pxelab-installer: runs inside the installer initrd (started by its `/init`) and turns a blank
//! disk into a bootable install, reporting every phase to the boot handler.
//!
//! This file is the glue: parse the command line, fetch the config, run the phases in order,
//! and end with one clear console line and one final event, then start the installed system:
//! on the running kernel when the installed one is the same build (the installer boots the
//! distro's own kernel, so it is, and `/init` switches root: no second kernel boot), else by a
//! firmware reboot. The phases live in their modules; the ordering rule that
//! matters is that the boot loader is installed only after the rootfs stream was verified, so a
//! corrupt or partial download never yields a bootable disk.

mod biosboot;
mod bootloader;
mod cmd;
mod config;
mod disk;
mod error;
mod events;
mod extract;
mod firstboot;
mod hostkeys;
mod http;
mod image;
mod login;
mod mkfs;
mod mounts;
mod partition;
mod pipeline;
mod seed;
mod stream;
mod wipeguard;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use pxelab_contract::{Artifact, Event, InstallerConfig, Phase};

use crate::config::Args;
use crate::disk::Disk;
use crate::error::{err, human_bytes, Error, Result};
use crate::events::Reporter;
use crate::http::Http;
use crate::mkfs::FsIds;
use crate::mounts::Mounts;
use crate::seed::Seed;
use crate::stream::{HttpSource, StreamError, VerifiedStream};

/// Present only in the pxelab initrd: the installer never reboots a machine it was not booted on
/// for (e.g. a developer's, when run by hand or by a test).
const INITRD_MARKER: &str = "/etc/pxelab-initrd";

/// The exit status (which `/init` tells apart) of an install the stack did not acknowledge.
const NOT_ACKNOWLEDGED: u8 = 3;
/// Exit code telling /init to switch root into the installed system, whose root device is in
/// [`SWITCH_ROOT_FILE`]. The installer cannot do it itself: only PID 1 (/init) can hand over
/// to the installed system's init.
const SWITCH_ROOT: u8 = 4;
const SWITCH_ROOT_FILE: &str = "/run/pxelab-switch-root";

/// A failed install: the phase that failed and why.
struct Failure {
    phase: Phase,
    error: Error,
}

fn main() -> ExitCode {
    let start = Instant::now();
    let words: Vec<String> = std::env::args().skip(1).collect();
    if words.iter().any(|w| w == "--help" || w == "-h") {
        println!("{}", config::USAGE);
        return ExitCode::SUCCESS;
    }
    let args = match config::parse_args(words) {
        Ok(args) => args,
        Err(e) => {
            say!("FAILED: {e}");
            return ExitCode::from(2);
        }
    };
    say!(
        "{} starting; config {}",
        env!("CARGO_PKG_VERSION"),
        args.config_url
    );
    let http = Http::new(args.retries, args.backoff());

    let fetched = config::fetch(&http, &args.config_url)
        .and_then(|config| Ok((Seed::fetch(&http, &config.cloud_init_url)?, config)));
    let (seed, config) = match fetched {
        Ok(v) => v,
        Err(e) => {
            // Without a config there is no events URL: the console is the only report.
            say!("FAILED at step {}: {e}", Phase::Installing);
            return ExitCode::FAILURE;
        }
    };
    let mut reporter = Reporter::start(http.clone(), &config.events_url, start);
    let message = format!(
        "{} ({}), seed: {}",
        config.name,
        config.distro,
        seed.names().join(" ")
    );
    reporter.phase(Phase::Installing, start.elapsed(), message);
    say!(
        "config: {} will get {} ({})",
        config.hostname,
        config.distro,
        human_bytes(config.rootfs.size)
    );

    let mut run = Run {
        reporter,
        config: &config,
        args: &args,
        http: &http,
        phase_start: Instant::now(),
    };
    let result = run.install(&seed);
    let total = start.elapsed();
    let reporter = run.reporter;
    match result {
        Ok(done) => {
            let next = match config.reboot {
                false => "stay up".to_string(),
                true => done.start.to_string(),
            };
            let message = format!(
                "installed in {:.1} s (final sync and unmount {:.1} s); next: {next}",
                total.as_secs_f64(),
                done.cleanup.as_secs_f64()
            );
            let event = Event {
                phase: Phase::Installed,
                message: message.clone(),
                host_keys: done.host_keys,
                ..Event::default()
            };
            let delivery = reporter.finish(total, event, Some(events::UNTIL_ACKNOWLEDGED));
            say!("SUCCESS: {} {message}", config.hostname);
            if let Err(why) = acknowledged(delivery) {
                say!("NOT REBOOTING: {why}; the machine would be reinstalled at its next network boot. Check the stack (`cargo xtask lab status`); `cargo xtask lab vm reprovision {}` installs it again", config.name);
                return ExitCode::from(NOT_ACKNOWLEDGED);
            }
            if config.reboot {
                match &done.start {
                    Start::SwitchRoot { version, root_dev } => {
                        match std::fs::write(SWITCH_ROOT_FILE, format!("{}\n", root_dev.display()))
                        {
                            Ok(()) => {
                                say!("switching root into the installed system ({version}, the running kernel)");
                                return ExitCode::from(SWITCH_ROOT);
                            }
                            Err(e) => {
                                say!("cannot write {SWITCH_ROOT_FILE}: {e}; rebooting instead")
                            }
                        }
                    }
                    Start::Reboot(_) => {}
                }
                reboot();
            }
            say!("reboot disabled by the config: staying up");
            ExitCode::SUCCESS
        }
        Err(Failure { phase, error }) => {
            let event = Event {
                phase: Phase::Failed,
                message: format!("{phase}: {error}"),
                ..Event::default()
            };
            reporter.finish(total, event, None);
            say!("FAILED at step {phase}: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Ok when the stack recorded `installed`, so the next network boot will not reinstall.
fn acknowledged(delivery: events::Delivery) -> Result<(), String> {
    match delivery {
        events::Delivery::Acknowledged { .. } => Ok(()),
        events::Delivery::Refused(why) => Err(format!("the stack refused the installed report ({why})")),
        events::Delivery::Unanswered { error, attempts } => Err(format!(
            "the stack did not acknowledge the installed report after {attempts} attempts over {} minutes (last: {error})",
            events::UNTIL_ACKNOWLEDGED.give_up_after.as_secs() / 60
        )),
    }
}

/// A finished install, before the final event.
struct Done {
    /// How long the final sync and unmount took.
    cleanup: Duration,
    /// The target's public host keys (`<type> <base64>`).
    host_keys: Vec<String>,
    /// How the installed system starts once the stack has recorded `installed`.
    start: Start,
}

/// How the installed system is started after the install.
enum Start {
    /// The installed kernel is the running one: `/init` switches root to `root_dev`.
    SwitchRoot { version: String, root_dev: PathBuf },
    /// Through the firmware (which the stack sends to the disk); why, when the config asked for a
    /// direct start (` (…)`, else empty).
    Reboot(String),
}

impl Start {
    /// The direct start (`direct`: asked for, and this is the installer's initrd) when the
    /// installed kernel `version` is the `running` one; else a reboot that says why.
    fn choose(direct: bool, running: Option<String>, version: &str, root_dev: &Path) -> Start {
        match running {
            _ if !direct => Start::Reboot(String::new()),
            Some(running) if running == version => Start::SwitchRoot {
                version: running,
                root_dev: root_dev.to_path_buf(),
            },
            running => Start::Reboot(format!(
                " (the installed kernel {version} is not the running {})",
                running.as_deref().unwrap_or("unknown one")
            )),
        }
    }
}

/// What the `installed` event says comes next (`lab up` reads "next: switch root").
impl std::fmt::Display for Start {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Start::SwitchRoot { version, .. } => {
                write!(f, "switch root into {version} (the running kernel)")
            }
            Start::Reboot(why) => write!(f, "reboot{why}"),
        }
    }
}

struct Run<'a> {
    reporter: Reporter,
    config: &'a InstallerConfig,
    args: &'a Args,
    http: &'a Http,
    phase_start: Instant,
}

impl Run<'_> {
    /// Ends `phase` successfully: posts its duration and starts the clock for the next one.
    fn done(&mut self, phase: Phase, message: String) {
        let duration = self.phase_start.elapsed();
        say!("{phase}: {message} ({:.1} s)", duration.as_secs_f64());
        self.reporter.phase(phase, duration, message);
        self.phase_start = Instant::now();
    }

    /// All phases after the config, up to the final unmount.
    fn install(&mut self, seed: &Seed) -> Result<Done, Failure> {
        let at = |phase: Phase| move |error: Error| Failure { phase, error };
        let config = self.config;

        let (disk, why) = choose_disk(config).map_err(at(Phase::Disk))?;
        let size = human_bytes(disk.size);
        self.done(
            Phase::Disk,
            format!("{} ({size}, {why})", disk.path.display()),
        );

        let layout = partition::layout(disk.size);
        let [esp_dev, root_dev] =
            partition::partition(&disk, &layout).map_err(at(Phase::Partition))?;
        let id = install_id(config)
            .and_then(|id| wipeguard::write_id(&disk.path, &id).map(|()| id))
            .map_err(at(Phase::Partition))?;
        self.done(
            Phase::Partition,
            format!(
                "GPT: {} ESP, {} root; install id {}",
                esp_dev.display(),
                root_dev.display(),
                id.id
            ),
        );

        let mut mounts = Mounts::new();
        let target = self.args.target.clone();
        let image = config.disk_image.as_ref();
        let ids =
            make_filesystems(&esp_dev, &root_dev, image.is_none()).map_err(at(Phase::Mkfs))?;
        let root = match image {
            Some(_) => "root from the image".to_string(),
            None => {
                mounts
                    .mount(&root_dev, &target, "ext4", "")
                    .map_err(at(Phase::Mkfs))?;
                format!("root UUID {}", ids.root_uuid)
            }
        };
        self.done(Phase::Mkfs, format!("{root}, ESP UUID {}", ids.esp_uuid));

        let message = match image {
            Some(image) => self.write_image(image, &root_dev, &ids),
            None => self.stream_rootfs(&target),
        }
        .map_err(at(Phase::Rootfs))?;
        if image.is_some() {
            mounts
                .mount(&root_dev, &target, "ext4", "")
                .map_err(at(Phase::Rootfs))?;
        }
        self.done(Phase::Rootfs, message);

        let entry =
            bootloader::newest_kernel(&target, &ids.root_uuid).map_err(at(Phase::Bootloader))?;
        // Starting the installed system without the firmware (the config's `direct_start`) needs
        // the installed kernel to be the running one (the distro's own, which the installer
        // boots): `/init` then switches root into the disk. A different kernel (a rootfs whose
        // newest kernel is not the one pulled) boots through the firmware and GRUB, as on any
        // power cycle. A kexec could skip the firmware there, at the cost of a second kernel
        // boot and initramfs (5.5 s to SSH under TCG); no distro the pipeline builds needs it.
        let direct = config.reboot && config.direct_start && in_initrd();
        let start = Start::choose(direct, running_release(), &entry.version, &root_dev);

        let (host_keys, first_boot) = (|| -> Result<(Vec<String>, String)> {
            seed.write(&target)?;
            seed::write_fstab(&target, &ids)?;
            seed::write_hostname(&target, &config.hostname)?;
            let keys = hostkeys::write(&target, &config.hostname)?;
            let mut notes = vec![format!("{} host keys", keys.len())];
            if let Some(login) = &config.login {
                login::create(&target, login)?;
                notes.push(format!("login {}", login.user));
            }
            notes.push(match firstboot::nic_address(config.mac) {
                Ok(Some(address)) => firstboot::early_ssh(&target, config.mac, address)?,
                Ok(None) => firstboot::no_address(config.mac),
                Err(e) => format!("no early SSH: {e}"),
            });
            firstboot::cloud_init_done(&target, &config.events_url)?;
            Ok((keys, notes.join(", ")))
        })()
        .map_err(at(Phase::Seed))?;
        self.done(
            Phase::Seed,
            format!(
                "cloud-init seed, fstab by UUID, hostname {}, {first_boot}",
                config.hostname
            ),
        );

        let t = bootloader::Target {
            root: &target,
            esp_dev: &esp_dev,
            ids: &ids,
        };
        // Each part timed: under emulation they cost seconds, not milliseconds.
        let clock = Instant::now();
        bootloader::install(&t, &entry, &mut mounts).map_err(at(Phase::Bootloader))?;
        let efi = clock.elapsed().as_secs_f64();
        let bios = biosboot::install(&target, &disk.path, disk.logical_sector, layout.bios)
            .map_err(at(Phase::Bootloader))?;
        let bios = format!("{bios} in {:.1} s", clock.elapsed().as_secs_f64() - efi);
        self.done(
            Phase::Bootloader,
            format!(
                "EFI GRUB (removable) in {efi:.1} s, {bios}, booting {} with root=UUID={}",
                entry.kernel, ids.root_uuid,
            ),
        );

        let cleanup = Instant::now();
        mounts.unmount_all().map_err(at(Phase::Bootloader))?;
        let finished = wipeguard::InstallId {
            finished: Some(wipeguard::utc(unix_now())),
            ..id
        };
        wipeguard::write_id(&disk.path, &finished).map_err(at(Phase::Bootloader))?;
        Ok(Done {
            cleanup: cleanup.elapsed(),
            host_keys,
            start,
        })
    }

    /// HTTP → sha256 → decompress → tar, with progress events; verified before returning.
    fn stream_rootfs(&mut self, target: &Path) -> Result<String> {
        let artifact = &self.config.rootfs;
        let started = Instant::now();
        let stream = self.verified_stream(artifact);
        let (extracted, stream) = extract::extract(stream, target);
        let (summary, stats) = verified(stream, extracted, &artifact.url, "unpacking")?;
        Ok(format!(
            "{} entries, {} unpacked from {} (sha256 verified in {:.1} s of hashing, {} reconnects) at {:.1} MiB/s",
            stats.entries,
            human_bytes(stats.tar_bytes),
            human_bytes(summary.bytes),
            summary.hashing.as_secs_f64(),
            summary.reconnects,
            rate(summary.bytes, started)
        ))
    }

    /// HTTP → sha256 → decompress → the root partition, verified; then the install's UUID and
    /// the whole partition ([`image`]).
    fn write_image(&mut self, artifact: &Artifact, root_dev: &Path, ids: &FsIds) -> Result<String> {
        let started = Instant::now();
        let stream = self.verified_stream(artifact);
        let (written, stream) =
            pipeline::decompressed(stream, |bytes| image::write(bytes, root_dev));
        let (summary, written) = verified(stream, written, &artifact.url, "writing")?;
        let streamed = started.elapsed();
        image::adopt(root_dev, &ids.root_uuid, mkfs::ROOT_LABEL)?;
        Ok(format!(
            "image of {} ({} of data, the rest zeroed) from {} (sha256 verified in {:.1} s of hashing, {} reconnects) at {:.1} MiB/s in {:.1} s (waiting for data {:.1} s, writing {:.1} s, zeroing {:.1} s); UUID {}, grown to the partition in {:.1} s",
            human_bytes(written.image),
            human_bytes(written.data),
            human_bytes(summary.bytes),
            summary.hashing.as_secs_f64(),
            summary.reconnects,
            rate(summary.bytes, started),
            streamed.as_secs_f64(),
            written.waiting,
            written.writing,
            written.zeroing,
            ids.root_uuid,
            (started.elapsed() - streamed).as_secs_f64()
        ))
    }

    /// The download of `artifact`, resumable and hashed, reporting its progress.
    fn verified_stream(&mut self, artifact: &Artifact) -> VerifiedStream<HttpSource> {
        let source = HttpSource::new(self.http.clone(), &artifact.url, artifact.size);
        let mut stream = VerifiedStream::new(
            source,
            artifact.size,
            &artifact.sha256,
            self.args.retries,
            self.args.backoff(),
        );
        let total = artifact.size;
        let mut progress = self.reporter.progress(Phase::Rootfs, total);
        let started = Instant::now();
        let mut last_log = Instant::now();
        stream.on_progress(Box::new(move |done| {
            progress.update(done);
            if last_log.elapsed() >= Duration::from_secs(5) {
                last_log = Instant::now();
                say!(
                    "rootfs: {:.0} % of {} ({:.1} MiB/s)",
                    done as f64 * 100.0 / total as f64,
                    human_bytes(total),
                    rate(done, started)
                );
            }
        }));
        stream
    }
}

/// Drains and verifies `stream` whatever `done` says: a digest mismatch is the root cause to
/// report (corrupt bytes usually surface first as a decompression error). `doing` names what
/// `done` did with the bytes.
fn verified<T>(
    mut stream: VerifiedStream<HttpSource>,
    done: std::io::Result<T>,
    url: &str,
    doing: &str,
) -> Result<(stream::Summary, T)> {
    match (stream.finish(), done) {
        (Err(e @ StreamError::HashMismatch { .. }), _) => {
            Err(err(format!("{e}; nothing was made bootable")))
        }
        (Err(e), _) => Err(err(format!("downloading {url}: {e}"))),
        (Ok(_), Err(e)) => Err(err(format!("{doing} {url}: {e}"))),
        (Ok(summary), Ok(value)) => Ok((summary, value)),
    }
}

/// MiB/s of `bytes` since `started`.
fn rate(bytes: u64, started: Instant) -> f64 {
    bytes as f64 / started.elapsed().as_secs_f64().max(0.001) / 1048576.0
}

/// The target disk and why it was chosen, checked before anything is written: a disk that
/// holds anything is wiped only when the operator reprovisioned the machine.
fn choose_disk(config: &InstallerConfig) -> Result<(Disk, String)> {
    let (path, mut why) = disk::choose(config.disk.as_deref(), Path::new("/sys/block"))?;
    let disk = Disk::open(&path)?;
    disk.check_size(config.rootfs.size)?;
    disk.check_unused()?;
    let mac = config.mac.to_string();
    if let Some(wiping) = wipeguard::check(&disk.path, &config.name, &mac, config.wipe.as_deref())?
    {
        why = format!("{why}; {wiping}");
    }
    Ok((disk, why))
}

/// What marks `disk` as this install's: checked by the next install before it wipes anything.
fn install_id(config: &InstallerConfig) -> Result<wipeguard::InstallId> {
    let mut id = [0u8; 16];
    mkfs::getrandom(&mut id)?;
    Ok(wipeguard::InstallId {
        vm: config.name.clone(),
        mac: config.mac.to_string(),
        at: wipeguard::utc(unix_now()),
        id: hex::encode(id),
        finished: None,
    })
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The ESP, and the root filesystem unless an image brings its own.
fn make_filesystems(esp: &Path, root: &Path, make_root: bool) -> Result<FsIds> {
    let ids = FsIds::random()?;
    mkfs::esp(esp, &ids)?;
    if make_root {
        mkfs::ext4(root, &ids)?;
    }
    Ok(ids)
}

/// The running kernel's release (`uname -r`).
fn running_release() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .map(|s| s.trim().to_string())
}

fn in_initrd() -> bool {
    Path::new(INITRD_MARKER).exists()
}

fn reboot() {
    if !in_initrd() {
        say!("not rebooting: {INITRD_MARKER} is missing, so this is not the pxelab initrd");
        return;
    }
    say!("rebooting");
    // SAFETY: sync and reboot have no memory-safety preconditions.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_AUTOBOOT);
    }
    say!("reboot failed: {}", std::io::Error::last_os_error());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_installed_system_starts_directly_only_on_the_running_kernel() {
        let dev = Path::new("/dev/vda2");
        let v = "6.1.0-57-cloud-amd64";
        let start = Start::choose(true, Some(v.into()), v, dev);
        assert!(
            matches!(&start, Start::SwitchRoot { root_dev, .. } if root_dev == dev),
            "{start}"
        );
        assert_eq!(
            start.to_string(),
            "switch root into 6.1.0-57-cloud-amd64 (the running kernel)"
        );
        // Another kernel in the rootfs: through the firmware and GRUB, saying why.
        let other = Start::choose(true, Some("6.1.0-58-cloud-amd64".into()), v, dev);
        assert_eq!(
            other.to_string(),
            "reboot (the installed kernel 6.1.0-57-cloud-amd64 is not the running 6.1.0-58-cloud-amd64)"
        );
        let unknown = Start::choose(true, None, v, dev);
        assert!(
            unknown
                .to_string()
                .ends_with("not the running unknown one)"),
            "{unknown}"
        );
        // Not asked for (`firmware_reboot`, or not in the initrd): a plain reboot.
        assert_eq!(
            Start::choose(false, Some(v.into()), v, dev).to_string(),
            "reboot"
        );
    }
}
