//! Reading `.deb` files without dpkg, ar or tar binaries: the `ar` container, then
//! `control.tar.*` and `data.tar.*` (xz, zstd, gzip or none) streamed through the `tar` crate.
//!
//! Paths are reported without the `./` prefix dpkg-deb writes (`usr/sbin/dnsmasq`). Extraction
//! refuses, as an error rather than a silent skip, any member or hard-link target that is
//! absolute or contains `..`; the `tar` crate additionally refuses to write through a symlink
//! that leads outside the target directory.

use crate::deb822::{self, Stanza};
use crate::{Error, Result};
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

/// What kind of filesystem object a data member is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// Regular file.
    File,
    /// Directory.
    Dir,
    /// Symbolic link, with its target exactly as stored.
    Symlink(String),
    /// Hard link to another member (normalized path, like [`DataEntry::path`]).
    Hardlink(String),
    /// Anything else (device, FIFO): never in a Debian binary package, refused on extraction.
    Other(u8),
}

/// One member of `data.tar`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataEntry {
    /// Path relative to the package root, without `./` or a trailing `/` (`usr/bin/x`).
    pub path: String,
    /// File, directory, link…
    pub kind: EntryKind,
    /// Permission bits including setuid/setgid/sticky.
    pub mode: u32,
    /// Size of the stored content (0 for links and directories).
    pub size: u64,
}

/// An opened `.deb`. Every read streams the file again, so multi-hundred-MiB kernel packages
/// are never held in memory.
#[derive(Debug, Clone)]
pub struct Deb {
    path: PathBuf,
    control_member: String,
    data_member: String,
}

impl Deb {
    /// Opens a `.deb` and checks its container: `debian-binary` says 2.x, and a control and a
    /// data member are present.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(Error::io(&path))?;
        let mut archive = ar::Archive::new(BufReader::new(file));
        let mut members = Vec::new();
        let mut format = None;
        while let Some(entry) = archive.next_entry() {
            let mut entry =
                entry.map_err(|e| deb_error(&path, format!("not an ar archive: {e}")))?;
            let name = member_name(entry.header().identifier());
            if name == "debian-binary" {
                let mut text = String::new();
                entry
                    .read_to_string(&mut text)
                    .map_err(|e| deb_error(&path, format!("reading debian-binary: {e}")))?;
                format = Some(text.trim().to_string());
            }
            members.push(name);
        }
        match format.as_deref() {
            Some(v) if v.starts_with("2.") => {}
            Some(v) => return Err(deb_error(&path, format!("unsupported .deb format {v:?}"))),
            None => {
                return Err(deb_error(
                    &path,
                    "no debian-binary member: not a .deb".into(),
                ))
            }
        }
        let find = |prefix: &str| {
            members
                .iter()
                .find(|m| m.as_str() == prefix || m.starts_with(&format!("{prefix}.")))
                .cloned()
                .ok_or_else(|| {
                    deb_error(&path, format!("no {prefix}.* member (found {members:?})"))
                })
        };
        Ok(Deb {
            control_member: find("control.tar")?,
            data_member: find("data.tar")?,
            path,
        })
    }

    /// The path this `.deb` was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The package's `control` file.
    pub fn control(&self) -> Result<Stanza> {
        let bytes = self.with_tar(&self.control_member, |path, archive| {
            for entry in archive.entries().map_err(tar_error(path))? {
                let mut entry = entry.map_err(tar_error(path))?;
                if normalize(&entry_path(path, &entry)?) == Ok(Some("control".into())) {
                    return read_all(path, &mut entry).map(Some);
                }
            }
            Ok(None)
        })?;
        let bytes =
            bytes.ok_or_else(|| deb_error(&self.path, "control.tar has no ./control".into()))?;
        let text = String::from_utf8(bytes)
            .map_err(|_| deb_error(&self.path, "control file is not UTF-8".into()))?;
        let label = format!("{} control", self.path.display());
        deb822::parse(&text, &label)?
            .into_iter()
            .next()
            .ok_or_else(|| deb_error(&self.path, "empty control file".into()))
    }

    /// Lists every member of `data.tar` in archive order.
    pub fn data_entries(&self) -> Result<Vec<DataEntry>> {
        self.with_tar(&self.data_member, |path, archive| {
            let mut out = Vec::new();
            for entry in archive.entries().map_err(tar_error(path))? {
                if let Some(e) = describe(path, &entry.map_err(tar_error(path))?)? {
                    out.push(e);
                }
            }
            Ok(out)
        })
    }

    /// The content of the regular file `member` (`usr/sbin/dnsmasq` or `./usr/sbin/dnsmasq`).
    /// A hard link yields its target's content; a symlink is an error naming its target.
    pub fn read_data_file(&self, member: &str) -> Result<Vec<u8>> {
        let wanted = normalize(member)
            .ok()
            .flatten()
            .ok_or_else(|| unsafe_path(&self.path, member))?;
        let found = self.with_tar(&self.data_member, |path, archive| {
            for entry in archive.entries().map_err(tar_error(path))? {
                let mut entry = entry.map_err(tar_error(path))?;
                let Some(e) = describe(path, &entry)? else {
                    continue;
                };
                if e.path != wanted {
                    continue;
                }
                return match e.kind {
                    EntryKind::File => read_all(path, &mut entry).map(Found::Data),
                    EntryKind::Hardlink(target) => Ok(Found::Link(target)),
                    EntryKind::Symlink(target) => Err(deb_error(
                        path,
                        format!("member {wanted} is a symlink to {target:?}, not a file"),
                    )),
                    _ => Err(deb_error(
                        path,
                        format!("member {wanted} is not a regular file"),
                    )),
                };
            }
            Ok(Found::Missing)
        })?;
        match found {
            Found::Data(bytes) => Ok(bytes),
            Found::Link(target) if target != wanted => self.read_data_file(&target),
            Found::Link(_) | Found::Missing => Err(Error::NoSuchMember {
                path: self.path.clone(),
                member: member.to_string(),
            }),
        }
    }

    /// Extracts the whole data tree into `dir` (created if missing), keeping modes (setuid
    /// included), mtimes, symlinks and hard links; ownership is the caller's. Returns the
    /// entries written.
    pub fn extract_to(&self, dir: &Path) -> Result<Vec<DataEntry>> {
        std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
        self.with_tar(&self.data_member, |path, archive| {
            archive.set_preserve_permissions(true);
            archive.set_preserve_mtime(true);
            archive.set_overwrite(true);
            archive.set_unpack_xattrs(false);
            let mut written = Vec::new();
            let mut read_only_dirs = Vec::new();
            for entry in archive.entries().map_err(tar_error(path))? {
                let mut entry = entry.map_err(tar_error(path))?;
                let Some(e) = describe(path, &entry)? else {
                    continue;
                };
                if let EntryKind::Other(kind) = e.kind {
                    return Err(deb_error(
                        path,
                        format!(
                            "member {} has unsupported tar type {:?}",
                            e.path, kind as char
                        ),
                    ));
                }
                let unpacked = entry.unpack_in(dir).map_err(|err| {
                    deb_error(
                        path,
                        format!("extracting {} into {}: {err}", e.path, dir.display()),
                    )
                })?;
                if !unpacked {
                    return Err(unsafe_path(path, &e.path));
                }
                // A read-only directory (0555) would stop its own members from being written
                // by a non-root user: keep it writable until the end.
                if e.kind == EntryKind::Dir && e.mode & 0o200 == 0 {
                    let on_disk = dir.join(&e.path);
                    set_mode(&on_disk, e.mode | 0o700)?;
                    read_only_dirs.push((on_disk, e.mode));
                }
                written.push(e);
            }
            for (on_disk, mode) in read_only_dirs.iter().rev() {
                set_mode(on_disk, *mode)?;
            }
            Ok(written)
        })
    }

    /// Streams member `name` of the ar container, decompressed, into a tar reader.
    fn with_tar<T>(
        &self,
        name: &str,
        f: impl FnOnce(&Path, &mut tar::Archive<Box<dyn Read + '_>>) -> Result<T>,
    ) -> Result<T> {
        let path = &self.path;
        let file = File::open(path).map_err(Error::io(path))?;
        let mut archive = ar::Archive::new(BufReader::new(file));
        while let Some(entry) = archive.next_entry() {
            let entry = entry.map_err(|e| deb_error(path, format!("reading ar member: {e}")))?;
            if member_name(entry.header().identifier()) != name {
                continue;
            }
            let reader: Box<dyn Read + '_> = match name.rsplit_once('.') {
                Some((_, "xz")) => Box::new(liblzma::read::XzDecoder::new_multi_decoder(entry)),
                Some((_, "zst")) => Box::new(
                    zstd::stream::read::Decoder::new(entry)
                        .map_err(|e| deb_error(path, format!("{name}: {e}")))?,
                ),
                Some((_, "gz")) => Box::new(flate2::read::MultiGzDecoder::new(entry)),
                Some((_, "tar")) => Box::new(entry),
                _ => {
                    return Err(deb_error(
                        path,
                        format!("unsupported compression of {name}"),
                    ))
                }
            };
            let mut tar = tar::Archive::new(reader);
            return f(path, &mut tar);
        }
        Err(deb_error(
            path,
            format!("member {name} disappeared while reading"),
        ))
    }
}

enum Found {
    Data(Vec<u8>),
    Link(String),
    Missing,
}

fn tar_error(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| deb_error(path, format!("reading tar: {e}"))
}

fn entry_path<R: Read>(path: &Path, entry: &tar::Entry<'_, R>) -> Result<String> {
    let raw = entry.path_bytes().into_owned();
    String::from_utf8(raw).map_err(|_| deb_error(path, "member path is not UTF-8".into()))
}

/// Describes a tar entry; `None` for the root `./` itself. Unsafe paths are errors.
fn describe<R: Read>(path: &Path, entry: &tar::Entry<'_, R>) -> Result<Option<DataEntry>> {
    let raw = entry_path(path, entry)?;
    let member = normalize(&raw).map_err(|()| unsafe_path(path, &raw))?;
    let Some(member) = member else {
        return Ok(None);
    };
    let header = entry.header();
    let link = || -> Result<String> {
        let target = entry
            .link_name_bytes()
            .ok_or_else(|| deb_error(path, format!("link {member} has no target")))?;
        String::from_utf8(target.into_owned())
            .map_err(|_| deb_error(path, format!("link target of {member} is not UTF-8")))
    };
    let kind = match header.entry_type() {
        tar::EntryType::Regular | tar::EntryType::Continuous => EntryKind::File,
        tar::EntryType::Directory => EntryKind::Dir,
        tar::EntryType::Symlink => EntryKind::Symlink(link()?),
        tar::EntryType::Link => {
            let target = link()?;
            match normalize(&target) {
                Ok(Some(t)) => EntryKind::Hardlink(t),
                _ => {
                    return Err(unsafe_path(
                        path,
                        &format!("{member} (hard link to {target})"),
                    ))
                }
            }
        }
        other => EntryKind::Other(other.as_byte()),
    };
    let mode = header
        .mode()
        .map_err(|e| deb_error(path, format!("bad mode of {member}: {e}")))?;
    Ok(Some(DataEntry {
        path: member,
        kind,
        mode,
        size: entry.size(),
    }))
}

/// `./usr/bin/` → `usr/bin`; `./` → `None`; absolute paths and `..` components → `Err`.
fn normalize(raw: &str) -> std::result::Result<Option<String>, ()> {
    if raw.starts_with('/') {
        return Err(());
    }
    let mut parts = Vec::new();
    for part in raw.split('/') {
        match part {
            "" | "." => continue,
            ".." => return Err(()),
            p => parts.push(p),
        }
    }
    Ok(if parts.is_empty() {
        None
    } else {
        Some(parts.join("/"))
    })
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(Error::io(path))
}

fn read_all<R: Read>(path: &Path, entry: &mut R) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    entry
        .read_to_end(&mut out)
        .map_err(|e| deb_error(path, format!("reading member: {e}")))?;
    Ok(out)
}

fn member_name(identifier: &[u8]) -> String {
    String::from_utf8_lossy(identifier)
        .trim_end()
        .trim_end_matches('/')
        .to_string()
}

fn deb_error(path: &Path, message: String) -> Error {
    Error::Deb {
        path: path.to_path_buf(),
        message,
    }
}

fn unsafe_path(path: &Path, member: &str) -> Error {
    Error::UnsafePath {
        path: path.to_path_buf(),
        member: member.to_string(),
    }
}

#[cfg(test)]
mod tests;
