//! Debian: a root filesystem from exactly the pinned `.deb`s, assembled by mmdebstrap.
//!
//! The closure is resolved once, when the distro is locked ([`crate::pin::debian::resolve`]:
//! signed indexes, several suites), from the recipe's packages plus every `Priority: required`
//! package of the release — what minbase would take — and pinned with each package's archive
//! Priority. A pull writes those files as a
//! local flat repository (Packages built from each .deb's own control file plus the archive's
//! Priority, and a Release naming the real suite, so apt and mmdebstrap treat it like the
//! archive) and runs `mmdebstrap --variant=essential --include=<every pinned package>`: the
//! result depends on the lock only. The repo is reached through apt's `copy://` method, which
//! copies the .debs into the chroot's cache — no bind mount, so a failed run leaves none behind
//! (a guard still lazily unmounts anything left under the scratch dir).

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use pxelab_contract::Arch;
use sha2::{Digest, Sha256};

use super::modules::{self, ModuleSet, ModulesInfo};
use super::recipe::{ArchRecipe, DebianSource};
use super::rootfs::{self, Facts, RootfsInfo};
use super::{emulation, write_json, Job, KERNEL_JSON, ROOTFS_JSON};
use crate::fetch::Fetch;
use crate::hostdeps::HostDep;
use crate::pin::{Mirror, Pin};
use crate::store::StepOutputs;
use crate::ui::Ui;

const UPDATE_INITRAMFS: &str = "/usr/sbin/update-initramfs";

/// Bump when [`build_rootfs`] makes something else from the same pins.
const ROOTFS_STEP_VERSION: u32 = 7;

/// What dpkg leaves out of the rootfs, as minimal cloud images do: docs, man and info pages and
/// translations, 4,203 of the Debian 12 rootfs's 18,860 entries and 66 of its 487 MiB (144 → 119
/// MiB of zstd), every one a file the installer would create in the emulated guest. mmdebstrap
/// applies them to its own extraction too and keeps them in the target's
/// `/etc/dpkg/dpkg.cfg.d/99mmdebstrap`, so later `apt install`s there leave the same paths out.
/// Licences stay; C.UTF-8 lives in /usr/lib/locale.
const PATH_EXCLUDES: [&str; 6] = [
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
];

/// Bump when [`build_kernel`] makes something else from the same kernel package.
const KERNEL_STEP_VERSION: u32 = 2;

/// The root filesystem from every pinned `.deb`: keyed by the pins, the suite, the installed
/// sources.list, the epoch and mmdebstrap's version (another version may build other bytes).
/// Independent of the module set, so `--modules` rebuilds only [`kernel_step`].
pub(super) fn rootfs_step(job: &Job, d: &DebianSource, pins: &[Pin]) -> Result<StepOutputs> {
    // The key asks mmdebstrap for its version, so tools come first (installed when root,
    // with qemu-user for a foreign arch in the same apt run).
    let mut tools = crate::hostdeps::DEBIAN_PULL.to_vec();
    if emulation::is_foreign(job.arch) {
        tools.extend(crate::hostdeps::emulation_deps(job.arch));
    }
    crate::hostdeps::ensure(&tools)?;
    let mut step = job
        .store
        .step("distro-debian-rootfs", ROOTFS_STEP_VERSION)
        .param("arch", job.arch)
        .param("suite", &d.suite)
        .param("sources_list", d.sources_list.join("\n"))
        .param("source_date_epoch", job.epoch)
        .param("mmdebstrap", tool_version(crate::hostdeps::MMDEBSTRAP)?);
    for p in pins {
        step = step.input(&format!("deb:{}", p.name), &p.sha256);
    }
    step.run(|out| {
        // mmdebstrap runs the rootfs's own maintainer scripts.
        if emulation::is_foreign(job.arch) {
            emulation::ensure(job.arch, job.ui)?;
        }
        job.fetcher.fetch_all(&fetches(job, pins))?;
        let debs: Vec<(Pin, PathBuf)> = pins
            .iter()
            .map(|p| (p.clone(), job.store.blob_path(&p.sha256)))
            .collect();
        let scratch = out.parent().context("step output dir has a parent")?;
        let r = build_rootfs(&debs, d, job.arch, job.epoch, scratch, out, job.ui)?;
        write_json(&out.join(ROOTFS_JSON), &r)
    })
}

/// `vmlinuz` and `modules.cpio.zst` from the kernel package among the pins, keyed by that
/// package and the module set.
pub(super) fn kernel_step(job: &Job, pins: &[Pin]) -> Result<StepOutputs> {
    let kernel = kernel_package(pins, job.arch_recipe)?;
    job.store
        .step("distro-kernel-modules", KERNEL_STEP_VERSION)
        .input("kernel.deb", &kernel.sha256)
        .param("arch", job.arch)
        .param("modules", job.modules)
        .param("source_date_epoch", job.epoch)
        .run(|out| {
            let fetch = kernel.to_fetch(
                job.label(&kernel.name),
                Mirror::debian_from_env().as_ref(),
                &job.relock(),
            );
            let deb = crate::fetch::ensure(job.fetcher, &fetch)?;
            let scratch = out.parent().context("step output dir has a parent")?;
            let m = build_kernel(&deb, job.arch, job.modules, job.epoch, scratch, out)?;
            write_json(&out.join(KERNEL_JSON), &m)
        })
}

/// The downloads of a pull's pinned `.deb`s; `PXELAB_DEBIAN_MIRROR` moves them.
fn fetches(job: &Job, pins: &[Pin]) -> Vec<Fetch> {
    let mirror = Mirror::debian_from_env();
    pins.iter()
        .map(|p| p.to_fetch(job.label(&p.name), mirror.as_ref(), &job.relock()))
        .collect()
}

/// `mmdebstrap --version`: part of the rootfs key.
fn tool_version(tool: HostDep) -> Result<String> {
    let path = tool.path()?;
    let sh = xshell::Shell::new()?;
    crate::process::read(xshell::cmd!(sh, "{path} --version"))
}

/// Builds `rootfs.tar.zst` into `out` from the pinned debs (`debs[i].1` is the verified file of
/// `debs[i].0`).
pub fn build_rootfs(
    debs: &[(Pin, PathBuf)],
    src: &DebianSource,
    arch: Arch,
    epoch: u64,
    scratch: &Path,
    out: &Path,
    ui: &Ui,
) -> Result<(RootfsInfo, Facts)> {
    let mmdebstrap = crate::hostdeps::MMDEBSTRAP.path()?;
    let _mounts = MountGuard(scratch.to_path_buf());
    let repo = scratch.join("repo");
    write_repo(debs, &src.suite, arch, epoch, &repo)?;

    let tar = scratch.join("rootfs.tar");
    let tmp = scratch.join("tmp");
    fs::create_dir_all(&tmp)?;
    let include: Vec<&str> = debs.iter().map(|(d, _)| d.name.as_str()).collect();
    let include = include.join(",");
    // SAFETY: geteuid has no preconditions.
    let mode = if unsafe { libc::geteuid() } == 0 {
        "root"
    } else {
        "unshare"
    };
    let sources_list = src
        .sources_list
        .iter()
        .map(|l| format!("{l}\n"))
        .collect::<String>();
    let repo_line = format!("deb [trusted=yes] copy://{} ./", repo.display());
    let task = ui.bytes_task(&format!("mmdebstrap {} {arch}", src.suite), 0);
    let sh = xshell::Shell::new()?;
    let suite = &src.suite;
    let deb_arch = arch.debian();
    // Each package that touches the initramfs (the kernel, initramfs-tools, udev, …) would
    // rebuild it while installing: three full runs for this set, ~12 min each under qemu-user.
    // A no-op stands in for update-initramfs until everything is installed, then it runs once.
    let essential_hooks = [format!(
        r#"chroot "$1" dpkg-divert --quiet --local --rename --add {UPDATE_INITRAMFS} && printf '#!/bin/sh\nexit 0\n' > "$1{UPDATE_INITRAMFS}" && chmod 0755 "$1{UPDATE_INITRAMFS}""#
    )];
    let hooks = [
        format!(
            r#"rm "$1{UPDATE_INITRAMFS}" && chroot "$1" dpkg-divert --quiet --local --rename --remove {UPDATE_INITRAMFS} && chroot "$1" update-initramfs -c -k all"#
        ),
        // With SOURCE_DATE_EPOCH set, Debian's py3compile writes checked-hash .pyc files: every
        // import then reads and hashes the source as well — over NFS an OPEN/READ/CLOSE per
        // module for a diskless target, ~400 modules per cloud-init stage. The system's Python
        // files change only with their packages (whose scripts compile them anew), so the
        // existing .pyc files are rewritten unchecked: an import reads the .pyc alone.
        r#"chroot "$1" python3 -c 'import pathlib, py_compile, sys; tag = "." + sys.implementation.cache_tag + ".pyc"; [py_compile.compile(str(src), cfile=str(pyc), doraise=True, invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH) for pyc in sorted(pathlib.Path("/usr/lib").rglob("__pycache__/*" + tag)) for src in [pyc.parent.parent / (pyc.name[: -len(tag)] + ".py")] if src.is_file()]'"#.to_string(),
        // systemd rebuilds the linker cache, the journal catalog, the hwdb and the system users
        // at boot while /usr is newer than /etc/.updated or /var/.updated (ConditionNeedsUpdate),
        // so on every first boot of a system that was never booted: under TCG ldconfig alone
        // held a diskless Debian 13 boot up for 10 s before sysinit.target. dpkg's triggers did
        // that work here; the stamps say so, with /usr's time (all clamped to the epoch).
        format!(
            r#"for d in etc var; do printf 'TIMESTAMP_NSEC={epoch}000000000\n' > "$1/$d/.updated" && chmod 0644 "$1/$d/.updated" || exit 1; done"#
        ),
        // Host keys must be made per machine at first boot (cloud-init / ssh-keygen -A), and
        // would make every build differ.
        r#"rm -f "$1"/etc/ssh/ssh_host_*"#.to_string(),
        // Both leak from the build host otherwise.
        r#"printf 'localhost\n' > "$1/etc/hostname" && chmod 0644 "$1/etc/hostname""#.to_string(),
        r#"rm -f "$1/etc/resolv.conf" && : > "$1/etc/resolv.conf" && chmod 0644 "$1/etc/resolv.conf""#.to_string(),
        // The build's local repo must not be the installed system's source.
        format!(r#"printf '%s' '{sources_list}' > "$1/etc/apt/sources.list" && chmod 0644 "$1/etc/apt/sources.list""#),
        r#"rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/archives/*.deb "$1"/var/cache/apt/*.bin"#.to_string(),
        // apt gives these to its sandbox user, but mmdebstrap runs apt unsandboxed when `_apt`
        // cannot read the chroot (a store under a 0700 home): the owner would depend on where
        // the store lives. Measured: `~/.cache/pxelab` and `/tmp/…` built different digests.
        r#"mkdir -p "$1"/var/lib/apt/lists/partial && chroot "$1" chown _apt:root /var/lib/apt/lists/partial /var/cache/apt/archives/partial && chmod 0700 "$1"/var/lib/apt/lists/partial "$1"/var/cache/apt/archives/partial"#.to_string(),
    ];
    let hook_args: Vec<String> = essential_hooks
        .iter()
        .map(|h| format!("--essential-hook={h}"))
        .chain(hooks.iter().map(|h| format!("--customize-hook={h}")))
        .chain(PATH_EXCLUDES.iter().map(|o| format!("--dpkgopt={o}")))
        .collect();
    let result = xshell::cmd!(
        sh,
        "{mmdebstrap} --variant=essential --mode={mode} --architectures={deb_arch} --include={include} {hook_args...} {suite} {tar} {repo_line}"
    )
    .env("SOURCE_DATE_EPOCH", epoch.to_string())
    .env("TMPDIR", &tmp)
    .quiet()
    .ignore_status()
    .output()?;
    if !result.status.success() {
        let stderr = String::from_utf8_lossy(&result.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(15).collect();
        bail!(
            "mmdebstrap failed ({}); last lines:\n{}",
            result.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    task.finish("rootfs built");

    let size = fs::metadata(&tar)?.len();
    let task = ui.bytes_task("rootfs.tar.zst", size);
    let (rootfs, facts) =
        rootfs::compress_tar(&tar, &out.join("rootfs.tar.zst"), &|n| task.set_position(n))?;
    task.finish("compressed");
    fs::remove_file(&tar)?;
    Ok((rootfs, facts))
}

/// Writes `vmlinuz` and `modules.cpio.zst` into `out` from the kernel package `deb` — the very
/// package installed in the rootfs, so both carry the same version.
pub fn build_kernel(
    deb: &Path,
    arch: Arch,
    set: ModuleSet,
    epoch: u64,
    scratch: &Path,
    out: &Path,
) -> Result<ModulesInfo> {
    let kdir = scratch.join("kernel");
    extract_data(deb, &kdir)?;
    // Trixie's kernel packages ship their modules under /usr (the merged-/usr layout);
    // bookworm's under /lib.
    let modules_dir = ["usr/lib/modules", "lib/modules"]
        .into_iter()
        .map(|d| kdir.join(d))
        .find(|d| d.is_dir())
        .with_context(|| format!("{} has no lib/modules or usr/lib/modules", deb.display()))?;
    let kernel_version = single_dir_name(&modules_dir)?;
    let kernel = fs::read(kdir.join(format!("boot/vmlinuz-{kernel_version}")))
        .with_context(|| format!("{} has no boot/vmlinuz-{kernel_version}", deb.display()))?;
    fs::write(
        out.join("vmlinuz"),
        super::ubuntu::kernel_image(arch, kernel)?,
    )?;
    modules::build_archive(
        &modules_dir.join(&kernel_version),
        &kernel_version,
        set,
        epoch,
        scratch,
        &out.join("modules.cpio.zst"),
    )
}

/// The real kernel package (`linux-image-<kver>`) behind the recipe's (meta)package.
fn kernel_package<'a>(pins: &'a [Pin], arch_recipe: &ArchRecipe) -> Result<&'a Pin> {
    let real: Vec<&Pin> = pins
        .iter()
        .filter(|p| {
            p.name.strip_prefix("linux-image-").is_some_and(|rest| {
                rest.starts_with(|c: char| c.is_ascii_digit()) && !rest.ends_with("-dbg")
            })
        })
        .collect();
    match real.as_slice() {
        [one] => Ok(one),
        [] => bail!(
            "the pinned set has no linux-image-<version> package (kernel {:?}): re-lock the distro",
            arch_recipe.kernel
        ),
        many => bail!(
            "the pinned set has several kernels ({}): keep one kernel per recipe",
            many.iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn single_dir_name(dir: &Path) -> Result<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .with_context(|| format!("the kernel package has no {}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    match names.as_slice() {
        [one] => Ok(one.clone()),
        _ => bail!(
            "expected one kernel version under {}, found {names:?}",
            dir.display()
        ),
    }
}

/// Writes the flat repository: the .debs (hard links into the store when possible), Packages and
/// a Release naming `suite`.
pub fn write_repo(
    debs: &[(Pin, PathBuf)],
    suite: &str,
    arch: Arch,
    epoch: u64,
    repo: &Path,
) -> Result<()> {
    fs::create_dir_all(repo)?;
    let mut sorted: Vec<&(Pin, PathBuf)> = debs.iter().collect();
    sorted.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    let mut packages = String::new();
    for (pin, path) in sorted {
        let deb = pin.debian()?;
        let name = deb
            .filename
            .rsplit('/')
            .next()
            .unwrap_or(&deb.filename)
            .to_string();
        let dest = repo.join(&name);
        if fs::hard_link(path, &dest).is_err() {
            fs::copy(path, &dest)
                .with_context(|| format!("cannot copy {} into the local repo", path.display()))?;
        }
        let control =
            control_of(path).with_context(|| format!("cannot read the control file of {name}"))?;
        for line in control.lines() {
            // The archive's Priority rules (see the module doc); a .deb's own one may differ.
            if !line.starts_with("Priority:") && !line.trim().is_empty() {
                packages.push_str(line);
                packages.push('\n');
            }
        }
        let priority = deb.priority.as_deref().with_context(|| {
            format!(
                "the lock records no Priority for {}: re-lock the distro",
                pin.name
            )
        })?;
        packages.push_str(&format!(
            "Priority: {priority}\nFilename: ./{name}\nSize: {}\nSHA256: {}\n\n",
            pin.size, pin.sha256
        ));
    }
    fs::write(repo.join("Packages"), &packages)?;
    let date = httpdate(epoch);
    let release = format!(
        "Origin: pxelab\nLabel: pxelab\nSuite: {suite}\nCodename: {suite}\nDate: {date}\nArchitectures: {} all\n\
         Description: pinned packages of a pxelab distro recipe\nSHA256:\n {} {} Packages\n",
        arch.debian(),
        hex::encode(Sha256::digest(packages.as_bytes())),
        packages.len()
    );
    fs::write(repo.join("Release"), release)?;
    Ok(())
}

/// RFC 2822 date (what Release files use) for a Unix time.
fn httpdate(epoch: u64) -> String {
    let t = crate::util::utc(epoch);
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][t.weekday_from_thursday];
    let mon = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ][t.month as usize - 1];
    format!(
        "{weekday}, {:02} {mon} {} {:02}:{:02}:{:02} UTC",
        t.day, t.year, t.hour, t.minute, t.second
    )
}

/// The `control` file of a .deb.
pub fn control_of(deb: &Path) -> Result<String> {
    let control = pxelab_debian::Deb::open(deb)?.control()?;
    Ok(control.text().to_string())
}

/// Unpacks a .deb's data (files, dirs, symlinks) under `dest`.
pub fn extract_data(deb: &Path, dest: &Path) -> Result<()> {
    fs::create_dir_all(dest)?;
    pxelab_debian::Deb::open(deb)?
        .extract_to(dest)
        .with_context(|| format!("cannot unpack {}", deb.display()))?;
    Ok(())
}

/// Lazily unmounts whatever is still mounted below the scratch dir when a build ends, however it
/// ends (mmdebstrap mounts /proc, /sys and /dev inside its chroot and may die before cleaning up).
struct MountGuard(PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
            return;
        };
        let prefix = self.0.to_string_lossy().into_owned();
        let mut points: Vec<&str> = info
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|p| p.starts_with(&prefix))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for p in points {
            eprintln!("warning: unmounting {p} left behind by mmdebstrap");
            if let Ok(sh) = xshell::Shell::new() {
                let _ = crate::process::status_logged(xshell::cmd!(sh, "umount -l {p}"), None);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_dates_are_rfc2822() {
        assert_eq!(httpdate(0), "Thu, 01 Jan 1970 00:00:00 UTC");
        assert_eq!(httpdate(1_735_689_600), "Wed, 01 Jan 2025 00:00:00 UTC");
    }
}
