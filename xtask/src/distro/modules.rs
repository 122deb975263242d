//! The kernel-modules archive: `modules.cpio.zst`, a newc archive placing a module set at
//! `/lib/modules/<kver>/` with the index files `modprobe` needs, appended to the installer initrd.
//!
//! Modules arrive as `.ko`, `.ko.xz` (newer Debian) or `.ko.zst` (Ubuntu); busybox `modprobe` reads
//! only plain ELF, so every module is decompressed and `depmod` (kmod, runs without root) rebuilds
//! `modules.dep` & co. for exactly the files in the archive. The `installer` set is a list of
//! directory prefixes (network, storage, filesystems) closed over `modules.dep`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Context, Result};

/// Which modules go into the archive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModuleSet {
    All,
    /// Network + storage + filesystems: what the installer needs to reach the server and write a disk.
    Installer,
}

impl FromStr for ModuleSet {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<ModuleSet> {
        match s {
            "all" => Ok(ModuleSet::All),
            "installer" => Ok(ModuleSet::Installer),
            _ => bail!("unknown module set {s:?}: use \"all\" or \"installer\""),
        }
    }
}

impl fmt::Display for ModuleSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ModuleSet::All => "all",
            ModuleSet::Installer => "installer",
        })
    }
}

/// Path prefixes under `lib/modules/<kver>/kernel/` that seed the installer set; their
/// dependencies come along through `modules.dep`.
const INSTALLER_PREFIXES: &[&str] = &[
    // network: paravirtual and common physical NICs
    "drivers/net/virtio_net.ko",
    "drivers/net/ethernet/",
    "drivers/net/vmxnet3/",
    "drivers/net/hyperv/",
    "drivers/net/xen-netfront.ko",
    // storage
    "drivers/block/",
    "drivers/nvme/",
    "drivers/ata/",
    "drivers/virtio/",
    "drivers/mmc/",
    "drivers/scsi/virtio_scsi.ko",
    "drivers/scsi/sd_mod.ko",
    "drivers/scsi/sr_mod.ko",
    "drivers/scsi/vmw_pvscsi.ko",
    "drivers/scsi/hv_storvsc.ko",
    // filesystems the installer creates or reads (ext4 root, vfat ESP, iso9660 seed, efivars)
    "fs/ext4/",
    "fs/jbd2/",
    "fs/mbcache.ko",
    "fs/fat/",
    "fs/nls/",
    "fs/isofs/",
    "fs/efivarfs/",
    // ext4 loads crc32c through the crypto API, which modules.dep cannot see
    "crypto/crc32c",
    "arch/x86/crypto/crc32c",
    "lib/libcrc32c.ko",
];

/// zstd level of the archive (the kernel unpacks it at the same speed at any level). Measured on
/// Debian's cloud kernel, all modules (89 MiB cpio): level 12 → 17.9 MiB in 30 s, 15 → 17.8 MiB
/// in 118 s, 19 → 17.4 MiB in ~120 s.
const MODULES_ZSTD_LEVEL: i32 = 12;

/// What [`build_archive`] made.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ModulesInfo {
    pub kernel_version: String,
    pub set: ModuleSet,
    /// Number of `.ko` files in the archive.
    pub count: usize,
    /// Bytes of the uncompressed cpio.
    pub cpio_size: u64,
}

/// Builds `out` (zstd-compressed newc cpio) from a module tree `src` (= some
/// `…/lib/modules/<kver>`). Entries are sorted, owned by 0:0, stamped with `mtime`.
/// The modules are staged under `scratch` (the step's own scratch directory in the store), not
/// the system temp dir: a pull killed with SIGKILL leaves its staging where `gc` finds it.
pub fn build_archive(
    src: &Path,
    kernel_version: &str,
    set: ModuleSet,
    mtime: u64,
    scratch: &Path,
    out: &Path,
) -> Result<ModulesInfo> {
    let stage = tempfile::Builder::new()
        .prefix("modules-")
        .tempdir_in(scratch)
        .with_context(|| {
            format!(
                "cannot create a staging dir for the modules in {}",
                scratch.display()
            )
        })?;
    let dest = stage.path().join("lib/modules").join(kernel_version);
    let count = stage_modules(src, &dest)?;
    if count == 0 {
        bail!(
            "{} holds no kernel modules (*.ko, *.ko.xz, *.ko.zst)",
            src.display()
        );
    }
    depmod(stage.path(), kernel_version)?;
    if set == ModuleSet::Installer {
        select_installer_set(&dest)?;
        depmod(stage.path(), kernel_version)?;
    }
    let count = walk_files(&dest.join("kernel"))?.len();
    let cpio_size = write_cpio(stage.path(), Path::new("lib"), mtime, out)?;
    Ok(ModulesInfo {
        kernel_version: kernel_version.to_string(),
        set,
        count,
        cpio_size,
    })
}

/// Module file name without its compression suffix, or None when it is no module.
fn plain_module_name(name: &str) -> Option<&str> {
    [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .find_map(|suffix| {
            name.strip_suffix(suffix)
                .map(|stem| &name[..stem.len() + 3])
        })
}

/// Copies every module (decompressed) and the depmod inputs from `src` to `dest`.
fn stage_modules(src: &Path, dest: &Path) -> Result<usize> {
    let mut count = 0;
    for rel in walk_files(src)? {
        let name = rel.to_string_lossy();
        if !name.starts_with("kernel/") && !name.starts_with("updates/") {
            continue;
        }
        let Some(plain) = plain_module_name(&name) else {
            continue;
        };
        let target = dest.join(plain);
        fs::create_dir_all(target.parent().expect("module paths have a parent"))?;
        let input = fs::File::open(src.join(&rel))
            .with_context(|| format!("cannot read module {}", src.join(&rel).display()))?;
        let mut reader: Box<dyn Read> = if name.ends_with(".xz") {
            Box::new(liblzma::read::XzDecoder::new(input))
        } else if name.ends_with(".zst") {
            Box::new(zstd::stream::read::Decoder::new(input)?)
        } else if name.ends_with(".gz") {
            Box::new(flate2::read::GzDecoder::new(input))
        } else {
            Box::new(input)
        };
        let mut output = fs::File::create(&target)?;
        io::copy(&mut reader, &mut output)
            .with_context(|| format!("cannot decompress module {}", src.join(&rel).display()))?;
        count += 1;
    }
    // depmod needs to know what is built in (else it reports those symbols as missing) and the
    // link order (modprobe's tie-breaker); module names in them lose the compression suffix.
    for file in [
        "modules.order",
        "modules.builtin",
        "modules.builtin.modinfo",
    ] {
        let path = src.join(file);
        if !path.exists() {
            continue;
        }
        let bytes = fs::read(&path)?;
        let bytes = if file == "modules.builtin.modinfo" {
            bytes
        } else {
            strip_suffixes(&String::from_utf8_lossy(&bytes)).into_bytes()
        };
        fs::write(dest.join(file), bytes)?;
    }
    Ok(count)
}

fn strip_suffixes(list: &str) -> String {
    list.lines()
        .map(|l| format!("{}\n", plain_module_name(l.trim()).unwrap_or(l.trim())))
        .collect()
}

fn depmod(base: &Path, kernel_version: &str) -> Result<()> {
    let depmod = crate::hostdeps::DEPMOD.path()?;
    let sh = xshell::Shell::new()?;
    // Its warnings (e.g. no modules.builtin.modinfo in older kernels) are noise unless it fails.
    let out = xshell::cmd!(sh, "{depmod} -b {base} {kernel_version}")
        .quiet()
        .ignore_status()
        .output()?;
    if !out.status.success() {
        bail!(
            "depmod failed on the modules of kernel {kernel_version}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Keeps the installer prefixes and their `modules.dep` closure, deletes the rest and the index
/// files that named them.
fn select_installer_set(dest: &Path) -> Result<()> {
    let deps = parse_modules_dep(&fs::read_to_string(dest.join("modules.dep"))?);
    let mut keep: BTreeSet<String> = BTreeSet::new();
    let mut todo: Vec<String> = deps
        .keys()
        .filter(|m| {
            let rel = m.strip_prefix("kernel/").unwrap_or(m);
            INSTALLER_PREFIXES.iter().any(|p| rel.starts_with(p))
        })
        .cloned()
        .collect();
    while let Some(m) = todo.pop() {
        if keep.insert(m.clone()) {
            todo.extend(deps.get(&m).into_iter().flatten().cloned());
        }
    }
    for m in deps.keys().filter(|m| !keep.contains(*m)) {
        fs::remove_file(dest.join(m))?;
    }
    for entry in fs::read_dir(dest)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let generated = name.starts_with("modules.")
            && !matches!(
                name.as_str(),
                "modules.order" | "modules.builtin" | "modules.builtin.modinfo"
            );
        if generated {
            fs::remove_file(entry.path())?;
        }
    }
    let order = dest.join("modules.order");
    if order.exists() {
        let kept: String = fs::read_to_string(&order)?
            .lines()
            .filter(|l| keep.contains(l.trim()))
            .map(|l| format!("{l}\n"))
            .collect();
        fs::write(&order, kept)?;
    }
    remove_empty_dirs(&dest.join("kernel"))?;
    Ok(())
}

/// `modules.dep`: `kernel/a.ko: kernel/b.ko kernel/c.ko` per line.
pub fn parse_modules_dep(text: &str) -> BTreeMap<String, Vec<String>> {
    text.lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(m, deps)| {
            (
                m.trim().to_string(),
                deps.split_whitespace().map(String::from).collect(),
            )
        })
        .collect()
}

fn remove_empty_dirs(dir: &Path) -> Result<bool> {
    let mut empty = true;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            if remove_empty_dirs(&entry.path())? {
                fs::remove_dir(entry.path())?;
            } else {
                empty = false;
            }
        } else {
            empty = false;
        }
    }
    Ok(empty)
}

/// Regular files under `root`, relative, sorted.
fn walk_files(root: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        for entry in fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))? {
            let entry = entry?;
            let path = rel.join(entry.file_name());
            let kind = entry.file_type()?;
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file() {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Writes `base/top` and everything below as a zstd-compressed newc cpio with paths relative to
/// `base`, sorted, directories before their contents. Returns the uncompressed size.
fn write_cpio(base: &Path, top: &Path, mtime: u64, out: &Path) -> Result<u64> {
    let mut entries: Vec<(PathBuf, bool)> = Vec::new();
    let mut stack = vec![top.to_path_buf()];
    while let Some(rel) = stack.pop() {
        entries.push((rel.clone(), true));
        for entry in fs::read_dir(base.join(&rel))? {
            let entry = entry?;
            let path = rel.join(entry.file_name());
            if entry.file_type()?.is_dir() {
                stack.push(path);
            } else {
                entries.push((path, false));
            }
        }
    }
    // Path order puts a directory right before its contents, which the kernel's unpacker needs.
    entries.sort();
    let file = fs::File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut encoder = zstd::stream::write::Encoder::new(file, MODULES_ZSTD_LEVEL)?;
    encoder.multithread(2)?;
    let mut counter = CountingWriter {
        inner: encoder,
        count: 0,
    };
    let mtime = u32::try_from(mtime).context("SOURCE_DATE_EPOCH does not fit a cpio mtime")?;
    for (ino, (rel, is_dir)) in entries.iter().enumerate() {
        let name = rel.to_str().context("module paths are UTF-8")?;
        let builder = cpio::newc::Builder::new(name)
            .ino(ino as u32 + 1)
            .uid(0)
            .gid(0)
            .mtime(mtime);
        if *is_dir {
            builder
                .mode(0o040755)
                .nlink(2)
                .write(&mut counter, 0)
                .finish()?;
        } else {
            let bytes = fs::read(base.join(rel))?;
            let size = u32::try_from(bytes.len()).context("a module over 4 GiB")?;
            let mut w = builder.mode(0o100644).nlink(1).write(&mut counter, size);
            w.write_all(&bytes)?;
            w.finish()?;
        }
    }
    let counter = cpio::newc::trailer(counter)?;
    let size = counter.count;
    counter.inner.finish()?.sync_all()?;
    Ok(size)
}

struct CountingWriter<W> {
    inner: W,
    count: u64,
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Names (paths inside the archive) of a `modules.cpio.zst`, in archive order.
pub fn list_archive(path: &Path) -> Result<Vec<String>> {
    let file = fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut reader: Box<dyn Read> = Box::new(zstd::stream::read::Decoder::new(file)?);
    let mut names = Vec::new();
    loop {
        let entry = cpio::newc::Reader::new(reader)?;
        if entry.entry().is_trailer() {
            break;
        }
        names.push(entry.entry().name().to_string());
        reader = Box::new(entry.finish()?);
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_lose_their_compression_suffix() {
        assert_eq!(
            plain_module_name("kernel/a/virtio_net.ko.xz"),
            Some("kernel/a/virtio_net.ko")
        );
        assert_eq!(
            plain_module_name("kernel/a/b.ko.zst"),
            Some("kernel/a/b.ko")
        );
        assert_eq!(plain_module_name("kernel/a/b.ko"), Some("kernel/a/b.ko"));
        assert_eq!(plain_module_name("modules.dep"), None);
        assert_eq!(
            strip_suffixes("kernel/x.ko.xz\nkernel/y.ko\n"),
            "kernel/x.ko\nkernel/y.ko\n"
        );
    }

    #[test]
    fn modules_dep_parses_into_a_map() {
        let deps = parse_modules_dep("kernel/a.ko: kernel/b.ko kernel/c.ko\nkernel/b.ko:\n");
        assert_eq!(deps["kernel/a.ko"], ["kernel/b.ko", "kernel/c.ko"]);
        assert!(deps["kernel/b.ko"].is_empty());
    }

    #[test]
    fn cpio_is_sorted_with_parents_first_and_readable() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("lib/modules/1.0/kernel/fs")).unwrap();
        fs::write(dir.path().join("lib/modules/1.0/kernel/fs/x.ko"), b"x").unwrap();
        fs::write(
            dir.path().join("lib/modules/1.0/modules.dep"),
            b"kernel/fs/x.ko:\n",
        )
        .unwrap();
        let out = dir.path().join("m.cpio.zst");
        write_cpio(dir.path(), Path::new("lib"), 1, &out).unwrap();
        let first = fs::read(&out).unwrap();
        assert_eq!(
            list_archive(&out).unwrap(),
            [
                "lib",
                "lib/modules",
                "lib/modules/1.0",
                "lib/modules/1.0/kernel",
                "lib/modules/1.0/kernel/fs",
                "lib/modules/1.0/kernel/fs/x.ko",
                "lib/modules/1.0/modules.dep"
            ]
        );
        write_cpio(dir.path(), Path::new("lib"), 1, &out).unwrap();
        assert_eq!(
            fs::read(&out).unwrap(),
            first,
            "the archive is reproducible"
        );
    }
}
