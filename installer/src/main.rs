//! pxelab-installer: runs inside the installer initrd (started by its `/init`) and turns a blank
//! disk into a bootable install, reporting every phase to the boot handler.
//!
//! This file is the glue: parse the command line, fetch the config, run the phases in order,
//! and end with one clear console line and one final event. The phases live in their modules;
//! the ordering rule that matters is that the boot loader is installed only after the rootfs
//! stream was verified, so a corrupt or partial download never yields a bootable disk.

mod bootloader;
mod cmd;
mod config;
mod disk;
mod error;
mod events;
mod extract;
mod http;
mod mkfs;
mod mounts;
mod partition;
mod seed;
mod stream;

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use pxelab_contract::{InstallerConfig, Phase};

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
        Ok(cleanup) => {
            let message = format!(
                "installed in {:.1} s (final sync and unmount {:.1} s)",
                total.as_secs_f64(),
                cleanup.as_secs_f64()
            );
            reporter.finish(Phase::Installed, total, message.clone());
            say!("SUCCESS: {} {message}", config.hostname);
            if config.reboot {
                reboot();
            }
            say!("reboot disabled by the config: staying up");
            ExitCode::SUCCESS
        }
        Err(Failure { phase, error }) => {
            let message = format!("{phase}: {error}");
            reporter.finish(Phase::Failed, total, message);
            say!("FAILED at step {phase}: {error}");
            ExitCode::FAILURE
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

    /// All phases after the config. Returns how long the final sync and unmount took.
    fn install(&mut self, seed: &Seed) -> Result<Duration, Failure> {
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
        self.done(
            Phase::Partition,
            format!(
                "GPT: {} ESP, {} root",
                esp_dev.display(),
                root_dev.display()
            ),
        );

        let mut mounts = Mounts::new();
        let target = self.args.target.clone();
        let ids =
            make_filesystems(&esp_dev, &root_dev, &target, &mut mounts).map_err(at(Phase::Mkfs))?;
        self.done(
            Phase::Mkfs,
            format!("root UUID {}, ESP UUID {}", ids.root_uuid, ids.esp_uuid),
        );

        let message = self.stream_rootfs(&target).map_err(at(Phase::Rootfs))?;
        self.done(Phase::Rootfs, message);

        (|| -> Result<()> {
            seed.write(&target)?;
            seed::write_fstab(&target, &ids)?;
            seed::write_hostname(&target, &config.hostname)
        })()
        .map_err(at(Phase::Seed))?;
        self.done(
            Phase::Seed,
            format!(
                "cloud-init seed, fstab by UUID, hostname {}",
                config.hostname
            ),
        );

        let t = bootloader::Target {
            root: &target,
            root_dev: &root_dev,
            esp_dev: &esp_dev,
            ids: &ids,
        };
        bootloader::install(&t, &mut mounts).map_err(at(Phase::Bootloader))?;
        self.done(
            Phase::Bootloader,
            format!(
                "GRUB {} (removable), root=UUID={}",
                bootloader::grub_target(),
                ids.root_uuid
            ),
        );

        let cleanup = Instant::now();
        mounts.unmount_all().map_err(at(Phase::Bootloader))?;
        Ok(cleanup.elapsed())
    }

    /// HTTP → sha256 → decompress → tar, with progress events; verified before returning.
    fn stream_rootfs(&mut self, target: &Path) -> Result<String> {
        let artifact = &self.config.rootfs;
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
                let rate = done as f64 / started.elapsed().as_secs_f64().max(0.001) / 1048576.0;
                say!(
                    "rootfs: {:.0} % of {} ({rate:.1} MiB/s)",
                    done as f64 * 100.0 / total as f64,
                    human_bytes(total)
                );
            }
        }));
        let (extracted, mut stream) = extract::extract(stream, target);
        // Drain and verify even when extraction failed: a digest mismatch is the root cause to
        // report (corrupt bytes usually surface first as a decompression error).
        let verified = stream.finish();
        let (summary, stats) = match (verified, extracted) {
            (Err(e @ StreamError::HashMismatch { .. }), _) => {
                return Err(err(format!("{e}; nothing was made bootable")))
            }
            (Err(e), Ok(_)) | (Err(e), Err(_)) => {
                return Err(err(format!("downloading {}: {e}", artifact.url)))
            }
            (Ok(_), Err(e)) => return Err(err(format!("unpacking {}: {e}", artifact.url))),
            (Ok(summary), Ok(stats)) => (summary, stats),
        };
        let secs = started.elapsed().as_secs_f64().max(0.001);
        Ok(format!(
            "{} entries, {} unpacked from {} (sha256 verified, {} reconnects) at {:.1} MiB/s",
            stats.entries,
            human_bytes(stats.tar_bytes),
            human_bytes(summary.bytes),
            summary.reconnects,
            summary.bytes as f64 / secs / 1048576.0
        ))
    }
}

/// The target disk and why it was chosen, checked before anything is written.
fn choose_disk(config: &InstallerConfig) -> Result<(Disk, String)> {
    let (path, why) = disk::choose(config.disk.as_deref(), Path::new("/sys/block"))?;
    let disk = Disk::open(&path)?;
    disk.check_size(config.rootfs.size)?;
    disk.check_unused()?;
    Ok((disk, why))
}

fn make_filesystems(esp: &Path, root: &Path, target: &Path, mounts: &mut Mounts) -> Result<FsIds> {
    let ids = FsIds::random()?;
    mkfs::esp(esp, &ids)?;
    mkfs::ext4(root, &ids)?;
    mounts.mount(root, target, "ext4", "")?;
    Ok(ids)
}

fn reboot() {
    if !Path::new(INITRD_MARKER).exists() {
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
