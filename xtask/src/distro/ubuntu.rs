//! Ubuntu: from the official cloud image (`.img`, qcow2) to rootfs, kernel and modules — without
//! root, loop mounts, qemu-nbd or guestfish.
//!
//! The image is trusted through the release's `SHA256SUMS`, whose detached signature
//! `SHA256SUMS.gpg` gpgv checks against Ubuntu's cloud-image key ([`Keyring`]) both when the
//! image is pinned and before every build from the pins.
//!
//! qcow2 → raw with `qemu-img convert` (into the step's scratch dir), GPT parsed with the `gpt`
//! crate, every ext4 partition opened read-only with `ext4-view`. The root filesystem is the one
//! holding `/usr`; a separate `/boot` partition (noble has one) is walked in place of the empty
//! `/boot` mount point. ext4-view exposes no inode numbers, so hard links are rebuilt from files
//! whose whole inode metadata (incl. nanosecond ctime and creation time) and content are equal.
//! It exposes no xattrs either: file capabilities are not carried over (noble's default image
//! sets none that boot or install depend on).

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ext4_view::{Ext4, Ext4Read, Metadata};
use pxelab_contract::Arch;
use sha2::{Digest, Sha256};

use super::modules::{self, ModuleSet, ModulesInfo};
use super::recipe::UbuntuSource;
use super::rootfs::{Facts, Meta, RootfsInfo, RootfsWriter};
use super::{write_json, Job, KERNEL_JSON, ROOTFS_JSON};
use crate::fetch::{Fetch, Fetcher};
use crate::lock::{Lock, LockedInput};
use crate::pin::{Mirror, Pin};
use crate::store::{StepOutputs, Store};
use crate::ui::Ui;

/// Bump when [`step`] makes something else from the same image.
const STEP_VERSION: u32 = 2;

/// The pins of a release besides its image: the checksums and their signature.
pub const SUMS: &str = "SHA256SUMS";
pub const SUMS_SIGNATURE: &str = "SHA256SUMS.gpg";

/// The pull of an Ubuntu recipe: one step from the pinned image (and its signed SHA256SUMS) to
/// rootfs, kernel and modules archive, keyed by the pins, the keyring and the options.
pub(super) fn step(job: &Job, u: &UbuntuSource, pins: &[Pin]) -> Result<StepOutputs> {
    let keyring = Keyring::of(u)?;
    let mut step = job
        .store
        .step("distro-ubuntu", STEP_VERSION)
        .param("arch", job.arch)
        .param("modules", job.modules)
        .param("source_date_epoch", job.epoch)
        .input("keyring", &keyring.digest()?);
    for p in pins {
        step = step.input(&p.name, &p.sha256);
    }
    let image_name = job.arch_recipe.image.as_deref().expect("validated");
    step.run(|out| {
        // Before any download: a missing tool should not cost a 600 MB fetch first.
        crate::hostdeps::ensure(&crate::hostdeps::UBUNTU_PULL)?;
        let mirror = job.mirror.map(|m| Mirror::new(&u.mirror, m));
        let pin = |name: &str| {
            pins.iter()
                .find(|p| p.name == name)
                .with_context(|| format!("the lock has no pin for {name}: run `{}`", job.relock()))
        };
        let fetch = |names: &[&str]| -> Result<()> {
            let fetches = names
                .iter()
                .map(|name| {
                    Ok(Fetch {
                        gone_hint: Some(format!(
                            "Ubuntu deletes old release serials: pick a current serial in the recipe and run `{}`",
                            job.relock()
                        )),
                        ..pin(name)?.to_fetch(job.label(name), mirror.as_ref(), &job.relock())
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            job.fetcher.fetch_all(&fetches).map(|_| ())
        };
        // The small signed files first: a release that is not Ubuntu's costs no image download.
        fetch(&[SUMS, SUMS_SIGNATURE])?;
        let sums_pin = pin(SUMS)?;
        let sums = job.store.read(&sums_pin.sha256)?;
        let signature = job.store.blob_path(&pin(SUMS_SIGNATURE)?.sha256);
        verify_sums(
            &sums,
            &signature,
            &keyring.path(job.store, job.fetcher)?,
            &sums_pin.url,
        )?;
        let image = pin(image_name)?;
        check_sums(
            &String::from_utf8_lossy(&sums),
            image_name,
            &image.sha256,
            &job.relock(),
        )?;
        fetch(&[image_name])?;
        let scratch = out.parent().context("step output dir has a parent")?;
        let x = extract(
            &job.store.blob_path(&image.sha256),
            job.arch,
            job.modules,
            job.epoch,
            scratch,
            out,
            job.ui,
        )?;
        write_json(&out.join(ROOTFS_JSON), &(x.rootfs, x.facts))?;
        write_json(&out.join(KERNEL_JSON), &x.modules)
    })
}

/// Where Debian's `ubuntu-keyring` package keeps the key that signs the cloud images' sums.
const CLOUDIMAGE_KEYRING: &str = "usr/share/keyrings/ubuntu-cloudimage-keyring.gpg";

/// The keyring `SHA256SUMS.gpg` must verify against.
pub enum Keyring {
    /// Ubuntu's cloud-image key inside the `ubuntu-keyring` package `recipes/pxelab.lock` pins
    /// (bookworm has no such package to install on the host; trixie's is pinned).
    Pinned(Box<LockedInput>),
    /// The recipe's `keyring`.
    File(PathBuf),
}

impl Keyring {
    pub fn of(u: &UbuntuSource) -> Result<Keyring> {
        Ok(match &u.keyring {
            Some(path) => Keyring::File(path.clone()),
            None => Keyring::Pinned(Box::new(
                Lock::load_default()?
                    .get("keyrings", "all", "ubuntu-keyring")?
                    .clone(),
            )),
        })
    }

    /// What identifies the trusted keys in a step key: the pinned package's digest, or the
    /// file's.
    fn digest(&self) -> Result<String> {
        match self {
            Keyring::Pinned(input) => Ok(input.pin.sha256.clone()),
            Keyring::File(path) => crate::store::hash_file(path).with_context(|| {
                format!(
                    "cannot read the keyring {} that the Ubuntu recipe names",
                    path.display()
                )
            }),
        }
    }

    /// The keyring as a file for gpgv: the recipe's, or the key taken out of the pinned
    /// package (fetched if need be) into the store.
    pub fn path(&self, store: &Store, fetcher: &Fetcher) -> Result<PathBuf> {
        match self {
            Keyring::File(path) => Ok(path.clone()),
            Keyring::Pinned(input) => {
                let deb = crate::fetch::ensure(fetcher, &input.to_fetch())?;
                let key = pxelab_debian::Deb::open(&deb)?
                    .read_data_file(CLOUDIMAGE_KEYRING)
                    .with_context(|| {
                        format!(
                            "the pinned {} has no {CLOUDIMAGE_KEYRING}: pin another version in \
                             recipes/keyrings.toml",
                            input.label()
                        )
                    })?;
                let digest = store.insert_bytes(&key)?;
                Ok(store.blob_path(&digest))
            }
        }
    }
}

/// Checks the release's `SHA256SUMS` (fetched from `url`) against its detached signature, a file
/// in the store.
pub fn verify_sums(sums: &[u8], signature: &Path, keyring: &Path, url: &str) -> Result<()> {
    pxelab_debian::release::verify_detached(sums, signature, keyring, url).with_context(|| {
        format!("{url} is not signed by the release's key: the mirror serves a tampered or foreign release")
    })
}

/// The digest `SHA256SUMS` lists for `image`, lowercase.
pub fn listed_digest(sums: &str, image: &str) -> Option<String> {
    sums.lines().find_map(|line| {
        let (digest, name) = line.split_once(char::is_whitespace)?;
        (name.trim().trim_start_matches('*') == image).then(|| digest.to_ascii_lowercase())
    })
}

/// The image's line in the release's `SHA256SUMS` must name `image_sha256` (the lock's pin);
/// `relock` is the command that pins the distro again.
pub fn check_sums(sums: &str, image: &str, image_sha256: &str, relock: &str) -> Result<()> {
    match listed_digest(sums, image) {
        None => {
            bail!("SHA256SUMS does not list {image}: the release serial or image name is wrong")
        }
        Some(d) if d != image_sha256 => bail!(
            "SHA256SUMS says {image} has sha256 {d}, the lock pins {image_sha256}: the mirror's \
             release differs from the pinned one (run `{relock}` to re-pin)"
        ),
        Some(_) => Ok(()),
    }
}

/// What [`extract`] wrote into its output directory.
#[derive(Debug)]
pub struct Extracted {
    pub kernel_version: String,
    pub rootfs: RootfsInfo,
    pub facts: Facts,
    pub modules: ModulesInfo,
}

/// One ext4 partition of the raw disk image.
struct Partition {
    file: fs::File,
    offset: u64,
    len: u64,
}

impl Ext4Read for Partition {
    fn read(
        &mut self,
        start: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        if start.saturating_add(dst.len() as u64) > self.len {
            return Err(format!("read past the end of the partition at byte {start}").into());
        }
        self.file.read_exact_at(dst, self.offset + start)?;
        Ok(())
    }
}

/// Converts `image` (qcow2) and writes `rootfs.tar.zst`, `vmlinuz` and `modules.cpio.zst` into
/// `out`. `scratch` holds the raw image meanwhile (several GiB, sparse).
pub fn extract(
    image: &Path,
    arch: Arch,
    set: ModuleSet,
    epoch: u64,
    scratch: &Path,
    out: &Path,
    ui: &Ui,
) -> Result<Extracted> {
    let raw = scratch.join("disk.raw");
    let qemu_img = crate::hostdeps::QEMU_IMG.path()?;
    let task = ui.bytes_task("convert qcow2 → raw", 0);
    let sh = xshell::Shell::new()?;
    // `-f qcow2` so a file that is not qcow2 is an error, never probed as something else.
    xshell::cmd!(sh, "{qemu_img} convert -f qcow2 -O raw {image} {raw}")
        .quiet()
        .run()
        .with_context(|| format!("qemu-img could not convert {}", image.display()))?;
    task.finish("converted");

    let (root, boot) = open_filesystems(&raw)?;
    let mut walker = Walker {
        writer: RootfsWriter::create(&out.join("rootfs.tar.zst"), epoch)?,
        seen: HashMap::new(),
        task: ui.bytes_task("rootfs.tar.zst", 0),
        done: 0,
    };
    walker.walk(&root, 0, "/", "", boot.as_ref())?;
    walker.task.finish("written");
    let (rootfs, facts) = walker.writer.finish()?;

    let boot_fs = boot.as_ref().unwrap_or(&root);
    let boot_dir = if boot.is_some() { "/" } else { "/boot/" };
    let kernel_version = pick_kernel(&facts)?;
    let kernel = boot_fs
        .read(format!("{boot_dir}vmlinuz-{kernel_version}").as_str())
        .context("cannot read the kernel from the image")?;
    fs::write(out.join("vmlinuz"), kernel_image(arch, kernel)?)?;

    let moddir = root
        .canonicalize(format!("/lib/modules/{kernel_version}").as_str())
        .with_context(|| format!("the image has no /lib/modules/{kernel_version}"))?;
    let moddir = moddir
        .to_str()
        .context("module path is not UTF-8")?
        .to_string();
    let staged = tempfile::tempdir_in(scratch)?;
    copy_tree(&root, &moddir, staged.path())?;
    let modules = modules::build_archive(
        staged.path(),
        &kernel_version,
        set,
        epoch,
        scratch,
        &out.join("modules.cpio.zst"),
    )?;
    Ok(Extracted {
        kernel_version,
        rootfs,
        facts,
        modules,
    })
}

/// The arm64 kernel ships as a gzipped `Image`, which firmware and iPXE cannot boot: inflate it.
pub fn kernel_image(arch: Arch, bytes: Vec<u8>) -> Result<Vec<u8>> {
    if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&bytes[..])
            .read_to_end(&mut out)
            .context("the kernel is gzip but does not decompress")?;
        return Ok(out);
    }
    if arch == Arch::Aarch64 && bytes.get(56..60) != Some(b"ARM\x64") {
        bail!("the arm64 kernel is neither gzip nor an arm64 Image");
    }
    Ok(bytes)
}

/// The one kernel in `/boot` (the newest if there are several).
fn pick_kernel(facts: &Facts) -> Result<String> {
    let mut versions: Vec<&str> = facts
        .paths
        .iter()
        .filter_map(|p| p.strip_prefix("boot/vmlinuz-"))
        .collect();
    versions.sort_by(|a, b| natural_cmp(a, b));
    versions
        .last()
        .map(|v| v.to_string())
        .context("the image has no /boot/vmlinuz-<version>: it is no cloud .img (the tar.xz and squashfs images carry no kernel)")
}

/// Compares runs of digits numerically (`6.8.0-100` after `6.8.0-99`).
fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn chunks(s: &str) -> Vec<(u64, String)> {
        let mut out = Vec::new();
        let mut rest = s;
        while !rest.is_empty() {
            let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
            if digits > 0 {
                out.push((rest[..digits].parse().unwrap_or(u64::MAX), String::new()));
                rest = &rest[digits..];
            } else {
                let n = rest
                    .find(|c: char| c.is_ascii_digit())
                    .unwrap_or(rest.len());
                out.push((0, rest[..n].to_string()));
                rest = &rest[n..];
            }
        }
        out
    }
    chunks(a).cmp(&chunks(b))
}

/// Opens every ext4 partition; returns (root, separate /boot if any).
fn open_filesystems(raw: &Path) -> Result<(Ext4, Option<Ext4>)> {
    let disk = gpt::GptConfig::new()
        .writable(false)
        .open(raw)
        .with_context(|| format!("{} has no readable GPT", raw.display()))?;
    let block = *disk.logical_block_size();
    let mut root = None;
    let mut boot = None;
    for (number, part) in disk.partitions() {
        let offset = part.bytes_start(block)?;
        let len = part.bytes_len(block)?;
        let file = fs::File::open(raw)?;
        let mut magic = [0u8; 2];
        if len < 2048
            || file.read_exact_at(&mut magic, offset + 1024 + 56).is_err()
            || magic != [0x53, 0xef]
        {
            continue;
        }
        let fs = Ext4::load(Box::new(Partition { file, offset, len }))
            .with_context(|| format!("partition {number} is ext4 but ext4-view cannot read it"))?;
        if fs.exists("/usr/bin").unwrap_or(false) {
            if root.is_some() {
                bail!("the image has two root filesystems (partitions with /usr/bin)");
            }
            root = Some(fs);
        } else if fs.read_dir("/")?.filter_map(|e| e.ok()).any(|e| {
            e.file_name()
                .as_str()
                .is_ok_and(|n| n.starts_with("vmlinuz-"))
        }) {
            boot = Some(fs);
        }
    }
    let root = root.context("no ext4 partition of the image holds a root filesystem (/usr/bin)")?;
    Ok((root, boot))
}

/// A regular file already written: archive path, path in its filesystem, content digest once known.
#[derive(Clone)]
struct Candidate {
    archive: String,
    path: String,
    digest: Option<String>,
}

struct Walker {
    writer: RootfsWriter,
    /// Regular files by whole inode metadata: candidates for hard links.
    seen: HashMap<(u8, Metadata), Vec<Candidate>>,
    task: crate::ui::Task,
    done: u64,
}

fn meta_of(m: &Metadata) -> Meta {
    Meta {
        mode: m.mode() as u32,
        uid: m.uid(),
        gid: m.gid(),
        mtime: m.modified().seconds(),
    }
}

impl Walker {
    /// Writes the children of `dir` (an absolute path in `fs`) under archive prefix `prefix`;
    /// `boot` replaces the root's `/boot`.
    fn walk(
        &mut self,
        fs: &Ext4,
        fs_id: u8,
        dir: &str,
        prefix: &str,
        boot: Option<&Ext4>,
    ) -> Result<()> {
        let mut names = Vec::new();
        for entry in fs
            .read_dir(dir)
            .with_context(|| format!("cannot list {dir} in the image"))?
        {
            let entry = entry?;
            let name = entry.file_name();
            let name = name
                .as_str()
                .with_context(|| format!("a file name in {dir} is not UTF-8"))?
                .to_string();
            if name == "." || name == ".." || (name == "lost+found" && dir == "/") {
                continue;
            }
            names.push(name);
        }
        names.sort();
        for name in names {
            let path = format!(
                "{}{name}",
                if dir.ends_with('/') {
                    dir.to_string()
                } else {
                    format!("{dir}/")
                }
            );
            let archive = format!("{prefix}{name}");
            let meta = fs.symlink_metadata(path.as_str())?;
            let kind = meta.file_type();
            if kind.is_dir() {
                self.writer.dir(&archive, meta_of(&meta))?;
                match (boot, archive.as_str()) {
                    (Some(boot_fs), "boot") => self.walk(boot_fs, 1, "/", "boot/", None)?,
                    _ => self.walk(fs, fs_id, &path, &format!("{archive}/"), boot)?,
                }
            } else if kind.is_symlink() {
                let target = fs.read_link(path.as_str())?;
                let target = target
                    .to_str()
                    .with_context(|| format!("symlink {path} is not UTF-8"))?;
                self.writer.symlink(&archive, meta_of(&meta), target)?;
            } else if kind.is_regular_file() {
                self.file(fs, fs_id, &path, &archive, meta)?;
            } else {
                // ext4-view does not expose device numbers; a cloud image's /dev is a devtmpfs.
                eprintln!("note: skipping {path} (device, FIFO or socket)");
            }
        }
        Ok(())
    }

    /// Writes a regular file, or a hard link to an earlier file of the same filesystem with
    /// equal inode metadata and content.
    fn file(
        &mut self,
        fs: &Ext4,
        fs_id: u8,
        path: &str,
        archive: &str,
        meta: Metadata,
    ) -> Result<()> {
        let key = (fs_id, meta.clone());
        if let Some(candidates) = self.seen.get_mut(&key) {
            let digest = hash(fs, path)?;
            for c in candidates.iter_mut() {
                if c.digest.is_none() {
                    c.digest = Some(hash(fs, &c.path)?);
                }
                if c.digest.as_deref() == Some(digest.as_str()) {
                    let target = c.archive.clone();
                    return self.writer.hardlink(archive, meta_of(&meta), &target);
                }
            }
            candidates.push(Candidate {
                archive: archive.into(),
                path: path.into(),
                digest: Some(digest),
            });
        } else if meta.len() > 0 {
            self.seen.insert(
                key,
                vec![Candidate {
                    archive: archive.into(),
                    path: path.into(),
                    digest: None,
                }],
            );
        }
        let reader = fs
            .open(path)
            .with_context(|| format!("cannot open {path} in the image"))?;
        self.writer
            .file(archive, meta_of(&meta), meta.len(), reader)?;
        self.done += meta.len();
        self.task.set_position(self.done);
        Ok(())
    }
}

fn hash(fs: &Ext4, path: &str) -> Result<String> {
    let mut file = fs
        .open(path)
        .with_context(|| format!("cannot open {path} in the image"))?;
    let mut h = Sha256::new();
    std::io::copy(&mut file, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

/// Copies the regular files under `dir` in `fs` to `dest` on disk.
fn copy_tree(fs: &Ext4, dir: &str, dest: &Path) -> Result<()> {
    fs::create_dir_all(dest)?;
    for entry in fs.read_dir(dir)? {
        let entry = entry?;
        let name = entry
            .file_name()
            .as_str()
            .context("module file name is not UTF-8")?
            .to_string();
        if name == "." || name == ".." {
            continue;
        }
        let path = format!("{dir}/{name}");
        let kind = entry.file_type()?;
        if kind.is_dir() {
            copy_tree(fs, &path, &dest.join(&name))?;
        } else if kind.is_regular_file() {
            let mut reader = fs.open(path.as_str())?;
            let mut out = fs::File::create(dest.join(&name))?;
            std::io::copy(&mut reader, &mut out)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_must_list_the_pinned_digest() {
        let d = "ab".repeat(32);
        let sums = format!(
            "{d} *noble-server-cloudimg-amd64.img\n{} other.img\n",
            "cd".repeat(32)
        );
        let relock = "cargo xtask distro lock ubuntu-24.04";
        check_sums(&sums, "noble-server-cloudimg-amd64.img", &d, relock).unwrap();
        let err = check_sums(
            &sums,
            "noble-server-cloudimg-amd64.img",
            &"ef".repeat(32),
            relock,
        )
        .unwrap_err();
        assert!(err.to_string().contains("the lock pins"), "{err}");
        assert!(
            err.to_string()
                .ends_with("(run `cargo xtask distro lock ubuntu-24.04` to re-pin)"),
            "the fix names the distro lock verb: {err}"
        );
        let err = check_sums(&sums, "missing.img", &d, relock).unwrap_err();
        assert!(
            err.to_string().contains("does not list missing.img"),
            "{err}"
        );
    }

    #[test]
    fn sys_the_pinned_keyring_is_ubuntus_cloud_image_key() {
        let cache = tempfile::tempdir().unwrap();
        let store = Store::open(cache.path()).unwrap();
        let fetcher = Fetcher::new(&store, Ui::plain()).unwrap();
        let u = UbuntuSource {
            codename: "noble".into(),
            serial: "20250115".into(),
            mirror: "https://cloud-images.ubuntu.com".into(),
            keyring: None,
        };
        let keyring = Keyring::of(&u)
            .unwrap()
            .path(&store, &fetcher)
            .expect("the pinned ubuntu-keyring downloads from Debian's mirror");
        let sh = xshell::Shell::new().unwrap();
        let home = tempfile::tempdir().unwrap();
        let home = home.path();
        let keys = crate::process::read(xshell::cmd!(
            sh,
            "gpg --homedir {home} --show-keys --with-colons {keyring}"
        ))
        .expect("gpg lists the keyring (apt-get install gpg)");
        // "UEC Image Automatic Signing Key <cdimage@ubuntu.com>", which signs every release's
        // SHA256SUMS on cloud-images.ubuntu.com.
        assert!(
            keys.lines()
                .any(|l| l == "fpr:::::::::D2EB44626FDDC30B513D5BB71A5D6C4C7DB87C81:"),
            "{keys}"
        );
    }

    #[test]
    fn newest_kernel_wins_numerically() {
        let mut facts = Facts::default();
        for p in [
            "boot/vmlinuz-6.8.0-99-generic",
            "boot/vmlinuz-6.8.0-100-generic",
            "boot/initrd.img-6.8.0-100-generic",
        ] {
            facts.note(p);
        }
        assert_eq!(pick_kernel(&facts).unwrap(), "6.8.0-100-generic");
        assert!(pick_kernel(&Facts::default()).is_err());
    }

    #[test]
    fn gzipped_arm64_kernel_is_inflated() {
        let mut image = vec![0u8; 64];
        image[56..60].copy_from_slice(b"ARM\x64");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &image).unwrap();
        let gz = gz.finish().unwrap();
        assert_eq!(kernel_image(Arch::Aarch64, gz).unwrap(), image);
        assert!(kernel_image(Arch::Aarch64, vec![0; 64]).is_err());
        assert_eq!(kernel_image(Arch::X86_64, vec![1, 2]).unwrap(), vec![1, 2]);
    }
}
