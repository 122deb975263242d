//! The disk image step: `rootfs.img`, a byte-reproducible ext4 filesystem holding exactly the
//! tree of `rootfs.tar.zst` (disk-mode VMs boot it through a copy-on-write overlay), and
//! `initrd.img`, the rootfs's own initramfs, for booting it without a boot loader.
//!
//! Built without root: `mke2fs` makes an empty filesystem whose every input is fixed (our own
//! `mke2fs.conf` instead of the host's, the UUID and directory hash seed from the rootfs digest,
//! the times from `E2FSPROGS_FAKE_TIME` = SOURCE_DATE_EPOCH) and one `debugfs -w -f` run fills it
//! from the script [`super::ext4script`] derives from the tar alone. `e2fsck -fn` must find it
//! clean. Keyed by the rootfs digest, the epoch and the e2fsprogs version.

use std::fs;
use std::io::{Read, Write};
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use pxelab_contract::DISK_IMAGE_FRAME;
use sha2::{Digest, Sha256};

use super::ext4script;
use crate::hostdeps::{DEBUGFS, E2FSCK, MKE2FS};
use crate::store::{StepFile, StepOutputs, Store};

/// Bump when [`build`] makes something else from the same rootfs.
const DISK_STEP_VERSION: u32 = 3;

/// The image file next to the manifest.
pub const IMAGE: &str = "rootfs.img";
/// The image compressed as the rootfs tarball is (what the installer streams).
pub const IMAGE_ZST: &str = "rootfs.img.zst";
/// The rootfs's own initramfs next to the manifest.
pub const INITRD: &str = "initrd.img";

/// The features Debian 12's e2fsprogs gives ext4, written down so the host's
/// `/etc/mke2fs.conf` cannot change the image. No `orphan_file` or `metadata_csum_seed`: GRUB
/// 2.06 (Debian 12) refuses filesystems with incompatible features it does not know.
const MKE2FS_CONF: &str = "[defaults]
\tbase_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
\tdefault_mntopts = acl,user_xattr
\tenable_periodic_fsck = 0
\tblocksize = 4096
\tinode_size = 256
\tinode_ratio = 16384
\treserved_ratio = 5.0
[fs_types]
\text4 = {
\t\tfeatures = has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
\t}
";

/// Free space the image has beyond its content, for a first boot's logs and caches; the
/// installer or cloud-init's `resize_rootfs` grows it to its disk.
const SLACK_MIB: u64 = 128;
/// The journal: what mke2fs picks for a filesystem of 1–2 GiB.
const JOURNAL_MIB: u64 = 32;

/// What the step records beside the image.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct DiskInfo {
    pub entries: u64,
    pub size: u64,
}

/// `rootfs.img` (and `initrd.img` when the rootfs has `initrd`, a path like
/// `boot/initrd.img-<kver>`) from the rootfs step's `rootfs.tar.zst`.
pub(super) fn step(
    store: &Store,
    rootfs: &StepFile,
    initrd: Option<&str>,
    epoch: u64,
) -> Result<StepOutputs> {
    crate::hostdeps::ensure(&[MKE2FS, DEBUGFS, E2FSCK])?;
    store
        .step("distro-disk-image", DISK_STEP_VERSION)
        .input("rootfs.tar.zst", &rootfs.digest)
        .param("source_date_epoch", epoch)
        .param("initrd", initrd.unwrap_or_default())
        .param("e2fsprogs", e2fsprogs_version()?)
        .run(|out| {
            let scratch = out.parent().context("step output dir has a parent")?;
            build(&rootfs.path, &rootfs.digest, initrd, epoch, scratch, out)?;
            Ok(())
        })
}

/// `debugfs -V`: part of the key (another version may lay out other bytes).
fn e2fsprogs_version() -> Result<String> {
    let debugfs = DEBUGFS.path()?;
    let sh = crate::process::shell()?;
    let out = crate::process::output(xshell::cmd!(sh, "{debugfs} -V"))?;
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    Ok(text.lines().next().unwrap_or_default().trim().to_string())
}

/// Builds [`IMAGE`] (and [`INITRD`]) into `out` from the rootfs tarball `tar_zst` whose sha256
/// is `digest`; `scratch` holds the files the script copies from. Prints where the time went.
pub fn build(
    tar_zst: &Path,
    digest: &str,
    initrd: Option<&str>,
    epoch: u64,
    scratch: &Path,
    out: &Path,
) -> Result<DiskInfo> {
    let started = Instant::now();
    let input = zstd::stream::read::Decoder::new(
        fs::File::open(tar_zst).with_context(|| format!("cannot open {}", tar_zst.display()))?,
    )?;
    let data = scratch.join("data");
    let keep: Vec<&str> = initrd.into_iter().collect();
    let (plan, kept) = ext4script::plan(input, &data, &keep)?;
    let script = scratch.join("populate.debugfs");
    fs::write(&script, &plan.script)?;
    let planned = started.elapsed();

    let image = out.join(IMAGE);
    let size = image_size(&plan);
    fs::File::create(&image)
        .and_then(|f| f.set_len(size))
        .with_context(|| format!("cannot create {}", image.display()))?;
    let conf = scratch.join("mke2fs.conf");
    fs::write(&conf, MKE2FS_CONF)?;
    let (uuid, hash_seed) = ids(digest);
    let (mke2fs, debugfs, e2fsck) = (MKE2FS.path()?, DEBUGFS.path()?, E2FSCK.path()?);
    let sh = crate::process::shell()?;
    let epoch = epoch.to_string();
    let extended =
        format!("hash_seed={hash_seed},root_owner=0:0,lazy_itable_init=0,lazy_journal_init=0");
    let journal = format!("size={JOURNAL_MIB}");
    crate::process::output(
        xshell::cmd!(
            sh,
            "{mke2fs} -q -F -t ext4 -b 4096 -I 256 -L rootfs -U {uuid} -J {journal} -E {extended} {image}"
        )
        .env("MKE2FS_CONFIG", &conf)
        .env("E2FSPROGS_FAKE_TIME", &epoch),
    )?;
    let made = started.elapsed();
    let run = crate::process::output(
        xshell::cmd!(sh, "{debugfs} -w -f {script} {image}").env("E2FSPROGS_FAKE_TIME", &epoch),
    )?;
    // debugfs carries on past a failed command and exits 0: anything on stderr but its banner
    // is a failure.
    let errors: Vec<String> = String::from_utf8_lossy(&run.stderr)
        .lines()
        .filter(|l| !l.starts_with("debugfs ") && !l.trim().is_empty())
        .map(str::to_string)
        .collect();
    if !errors.is_empty() {
        bail!(
            "debugfs could not build the image ({} errors), first ones:\n{}",
            errors.len(),
            errors
                .iter()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    let populated = started.elapsed();
    crate::process::output(xshell::cmd!(sh, "{e2fsck} -fn {image}"))
        .context("the built image is not a clean ext4 filesystem")?;
    if let Some(path) = initrd {
        let saved = kept
            .get(path)
            .with_context(|| format!("the rootfs has no regular file /{path}"))?;
        fs::rename(saved, out.join(INITRD))?;
    }
    fs::remove_dir_all(&data)?;
    let checked = started.elapsed();
    compress(&image, &out.join(IMAGE_ZST))?;
    eprintln!(
        "{IMAGE}: {} entries, {} MiB of files in a {} MiB image; script {:.1} s, mke2fs {:.1} s, debugfs {:.1} s, e2fsck {:.1} s, zstd {:.1} s",
        plan.entries,
        plan.file_bytes >> 20,
        size >> 20,
        planned.as_secs_f64(),
        (made - planned).as_secs_f64(),
        (populated - made).as_secs_f64(),
        (checked - populated).as_secs_f64(),
        (started.elapsed() - checked).as_secs_f64(),
    );
    Ok(DiskInfo {
        entries: plan.entries,
        size,
    })
}

/// [`IMAGE_ZST`]: the whole image, holes as the zeros they read as (zstd makes them almost
/// nothing; the installer writes zeros only where the partition held something else), as
/// independent frames of [`DISK_IMAGE_FRAME`] bytes that each say their size, so the installer
/// decompresses them on every CPU. Measured on this image: 2 % larger than one frame.
fn compress(image: &Path, out: &Path) -> Result<()> {
    let mut input =
        fs::File::open(image).with_context(|| format!("cannot open {}", image.display()))?;
    let mut file =
        fs::File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut frame = Vec::with_capacity(DISK_IMAGE_FRAME);
    loop {
        frame.clear();
        let n = (&mut input)
            .take(DISK_IMAGE_FRAME as u64)
            .read_to_end(&mut frame)
            .with_context(|| format!("reading {}", image.display()))?;
        if n == 0 {
            break;
        }
        let mut encoder = super::rootfs::encoder(&mut file)?;
        encoder.set_pledged_src_size(Some(n as u64))?;
        encoder.include_contentsize(true)?;
        encoder
            .write_all(&frame)
            .with_context(|| format!("compressing {}", image.display()))?;
        encoder.finish()?;
    }
    file.sync_all()?;
    Ok(())
}

/// Content plus a tenth, the journal, inode tables (a 256-byte inode per 16 KiB), the 5 %
/// reserved for root and [`SLACK_MIB`], in whole MiB.
fn image_size(plan: &ext4script::Plan) -> u64 {
    let content = plan.blocks * 4096;
    let mib = 1 << 20;
    let fixed = content + content / 10 + (JOURNAL_MIB + SLACK_MIB) * mib;
    // Inode tables take 1/64 of the image and the reserve 1/20.
    let total = fixed * 320 / (320 - 5 - 16);
    total.div_ceil(mib) * mib
}

/// The filesystem UUID and directory hash seed, from the rootfs digest: the same rootfs always
/// gives the same image (the installer gives each machine its own UUID).
fn ids(digest: &str) -> (String, String) {
    let h = Sha256::digest(format!("pxelab rootfs.img {digest}").as_bytes());
    let uuid = |b: &[u8]| {
        let mut b: [u8; 16] = b.try_into().expect("16 bytes");
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        let x = hex::encode(b);
        format!(
            "{}-{}-{}-{}-{}",
            &x[..8],
            &x[8..12],
            &x[12..16],
            &x[16..20],
            &x[20..]
        )
    };
    (uuid(&h[..16]), uuid(&h[16..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_well_formed_and_follow_the_digest() {
        let (u, s) = ids("aa");
        assert_eq!(ids("aa"), (u.clone(), s.clone()));
        assert_ne!(ids("ab").0, u);
        assert_ne!(u, s);
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
    }
}
