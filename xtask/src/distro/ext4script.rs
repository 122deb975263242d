//! A rootfs tarball as a `debugfs -w -f` script: the whole tree of an ext4 image built from the
//! tar's own listing, in the tar's order, without root and without trusting the host filesystem
//! (its readdir order, its ctimes, whether it can hold owners, device nodes or xattrs).
//!
//! Creation comes first (`mkdir`, `write` of each file's bytes saved beside the script,
//! `symlink`, `mknod`, `ln`), then every entry's metadata by path (`sif` mode, uid, gid, mtime;
//! `ea_set` for xattrs; `links_count` of hard-linked files), so creating a child never touches
//! a directory's recorded time afterwards. Inode numbers follow from the order alone. Times
//! debugfs stamps itself (ctime, atime, crtime) come from `E2FSPROGS_FAKE_TIME`, and the
//! nanosecond `_extra` fields stay zero.
//!
//! debugfs's parser (libss) knows only double quotes, doubled inside a quoted word; names with a
//! newline cannot be written in a script line and are refused. `write`, `mknod` and `ln` take a
//! name in the current directory (a `/` becomes part of the name) and `mkdir` cannot make a
//! top-level directory by absolute path, so every entry is made by name after a `cd` into its
//! parent; `sif` and `ea_set` look paths up from the root.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};

const BLOCK: u64 = 4096;

/// The script and what the image must hold.
#[derive(Debug)]
pub struct Plan {
    pub script: Vec<u8>,
    /// Entries in the tar (the root directory included).
    pub entries: u64,
    /// 4 KiB blocks the content needs: file data, directories, long symlink targets, xattrs.
    pub blocks: u64,
    /// Bytes of the regular files.
    pub file_bytes: u64,
}

/// One entry's metadata, applied after every entry exists.
struct Meta {
    path: Vec<u8>,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    xattrs: Vec<(String, std::path::PathBuf)>,
}

/// Reads the tar `input` and writes each regular file's bytes and each xattr's value into
/// `data` (named by entry number) for the script to copy from. `keep` names rootfs paths
/// (relative, e.g. `boot/initrd.img-6.1.0-1-amd64`) whose saved bytes the caller wants: they
/// are returned by path.
pub fn plan(
    input: impl Read,
    data: &Path,
    keep: &[&str],
) -> Result<(Plan, BTreeMap<String, std::path::PathBuf>)> {
    fs::create_dir_all(data).with_context(|| format!("cannot create {}", data.display()))?;
    let mut create = Vec::new();
    let mut metas = Vec::new();
    let mut links: BTreeMap<Vec<u8>, u32> = BTreeMap::new();
    let mut dir_bytes: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
    let mut kept = BTreeMap::new();
    let mut cwd: Vec<u8> = b"/".to_vec();
    let (mut entries, mut blocks, mut file_bytes) = (0u64, 0u64, 0u64);
    let mut archive = tar::Archive::new(input);
    for (n, entry) in archive
        .entries()
        .context("the rootfs tarball is unreadable")?
        .enumerate()
    {
        let mut entry = entry.context("the rootfs tarball is unreadable")?;
        let path = normalize(&entry.path_bytes())?;
        let kind = entry.header().entry_type();
        entries += 1;
        let (parent, name) = split(&path);
        if !path.is_empty() {
            *dir_bytes.entry(parent.to_vec()).or_default() +=
                8 + (name.len() as u64).div_ceil(4) * 4;
        }
        let abs = absolute(&path);
        let mut go_to_parent = |create: &mut Vec<u8>| {
            let dir = absolute(parent);
            if cwd != dir {
                create.extend_from_slice(b"cd ");
                quote(create, &dir)?;
                create.push(b'\n');
                cwd = dir;
            }
            Ok::<_, anyhow::Error>(())
        };
        let type_bits = match kind {
            tar::EntryType::Directory => {
                if !path.is_empty() {
                    go_to_parent(&mut create)?;
                    create.extend_from_slice(b"mkdir ");
                    quote(&mut create, name)?;
                    create.push(b'\n');
                }
                dir_bytes.entry(path.clone()).or_default();
                0o040000
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let saved = data.join(n.to_string());
                let size = save(&mut entry, &saved)?;
                file_bytes += size;
                blocks += size.div_ceil(BLOCK);
                go_to_parent(&mut create)?;
                create.extend_from_slice(b"write ");
                quote(&mut create, saved.as_os_str().as_encoded_bytes())?;
                create.push(b' ');
                quote(&mut create, name)?;
                create.push(b'\n');
                if let Some(k) = keep.iter().find(|k| k.as_bytes() == path.as_slice()) {
                    kept.insert(k.to_string(), saved);
                }
                0o100000
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .with_context(|| format!("symlink {} has no target", show(&path)))?;
                if target.len() >= 60 {
                    blocks += 1;
                }
                go_to_parent(&mut create)?;
                create.extend_from_slice(b"symlink ");
                quote(&mut create, name)?;
                create.push(b' ');
                quote(&mut create, &target)?;
                create.push(b'\n');
                0o120000
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .with_context(|| format!("hard link {} has no target", show(&path)))?;
                let target = absolute(&normalize(&target)?);
                go_to_parent(&mut create)?;
                create.extend_from_slice(b"ln ");
                quote(&mut create, &target)?;
                create.push(b' ');
                quote(&mut create, name)?;
                create.push(b'\n');
                *links.entry(target).or_insert(1) += 1;
                // The target's own entry carries the metadata.
                continue;
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                go_to_parent(&mut create)?;
                create.extend_from_slice(b"mknod ");
                quote(&mut create, name)?;
                let h = entry.header();
                let (major, minor) = (h.device_major()?, h.device_minor()?);
                match (kind, major, minor) {
                    (tar::EntryType::Fifo, _, _) => create.extend_from_slice(b" p\n"),
                    (_, Some(major), Some(minor)) => {
                        let c = if kind == tar::EntryType::Char {
                            'c'
                        } else {
                            'b'
                        };
                        create.extend_from_slice(format!(" {c} {major} {minor}\n").as_bytes());
                    }
                    _ => bail!("device node {} has no device numbers", show(&path)),
                }
                match kind {
                    tar::EntryType::Char => 0o020000,
                    tar::EntryType::Block => 0o060000,
                    _ => 0o010000,
                }
            }
            other => bail!(
                "{}: tar entry type {other:?} has no place in a root filesystem",
                show(&path)
            ),
        };
        let mut xattrs = Vec::new();
        if let Some(pax) = entry.pax_extensions()? {
            for (i, ext) in pax.enumerate() {
                let ext = ext?;
                let Some(name) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") else {
                    continue;
                };
                let name = std::str::from_utf8(name)
                    .with_context(|| format!("{}: an xattr name is not UTF-8", show(&path)))?;
                let saved = data.join(format!("{n}.xattr{i}"));
                fs::write(&saved, ext.value_bytes())?;
                xattrs.push((name.to_string(), saved));
            }
            // Those that do not fit beside the inode take a block of their own.
            blocks += u64::from(!xattrs.is_empty());
        }
        let h = entry.header();
        metas.push(Meta {
            path: abs,
            mode: type_bits | (h.mode()? & 0o7777),
            uid: h.uid()?,
            gid: h.gid()?,
            mtime: h.mtime()?,
            xattrs,
        });
    }
    if entries == 0 {
        bail!("the rootfs tarball has no entries");
    }
    // A directory's entries take 8 bytes plus the name rounded to 4; blocks are rarely full.
    blocks += dir_bytes
        .values()
        .map(|b| (b + 24).div_ceil(BLOCK / 2).max(1))
        .sum::<u64>();
    let mut script = create;
    for m in &metas {
        for (field, value) in [
            ("mode", format!("0{:o}", m.mode)),
            ("uid", m.uid.to_string()),
            ("gid", m.gid.to_string()),
            ("mtime", format!("@{}", m.mtime)),
        ] {
            script.extend_from_slice(b"sif ");
            quote(&mut script, &m.path)?;
            script.extend_from_slice(format!(" {field} {value}\n").as_bytes());
        }
        for (name, value) in &m.xattrs {
            script.extend_from_slice(b"ea_set -f ");
            quote(&mut script, value.as_os_str().as_encoded_bytes())?;
            script.push(b' ');
            quote(&mut script, &m.path)?;
            script.push(b' ');
            quote(&mut script, name.as_bytes())?;
            script.push(b'\n');
        }
    }
    for (target, count) in &links {
        script.extend_from_slice(b"sif ");
        quote(&mut script, target)?;
        script.extend_from_slice(format!(" links_count {count}\n").as_bytes());
    }
    let plan = Plan {
        script,
        entries,
        blocks,
        file_bytes,
    };
    Ok((plan, kept))
}

fn save(entry: &mut impl Read, path: &Path) -> Result<u64> {
    let mut file =
        fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let n = io::copy(entry, &mut file)?;
    file.flush()?;
    Ok(n)
}

/// `./usr/bin/` → `usr/bin`; `./` → empty (the root). `..` is refused.
fn normalize(raw: &[u8]) -> Result<Vec<u8>> {
    let parts: Vec<&[u8]> = raw
        .split(|&b| b == b'/')
        .filter(|p| !p.is_empty() && *p != b".")
        .collect();
    if parts.iter().any(|p| *p == b"..") {
        bail!("tar entry {} climbs out of the root", show(raw));
    }
    Ok(parts.join(&b'/'))
}

/// (parent, name) of a normalized path; the parent of a top-level entry is empty.
fn split(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[], path),
    }
}

fn absolute(path: &[u8]) -> Vec<u8> {
    let mut abs = b"/".to_vec();
    abs.extend_from_slice(path);
    abs
}

/// One word for libss: double quotes around it, a double quote inside doubled.
fn quote(out: &mut Vec<u8>, word: &[u8]) -> Result<()> {
    if let Some(b) = word.iter().find(|&&b| b == b'\n' || b == b'\r' || b == 0) {
        bail!(
            "{} contains byte {b:#04x}, which a debugfs script line cannot carry",
            show(word)
        );
    }
    out.push(b'"');
    for &b in word {
        if b == b'"' {
            out.push(b'"');
        }
        out.push(b);
    }
    out.push(b'"');
    Ok(())
}

fn show(path: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_mtime(7);
        h.set_uid(0);
        h.set_gid(0);
        h
    }

    #[test]
    fn names_are_quoted_for_libss_and_newlines_refused() {
        let mut out = Vec::new();
        quote(&mut out, br#"a "b"\c #d"#).unwrap();
        assert_eq!(out, br#""a ""b""\c #d""#);
        assert!(quote(&mut Vec::new(), b"a\nb").is_err());
        assert_eq!(normalize(b"./usr//bin/").unwrap(), b"usr/bin");
        assert_eq!(normalize(b"./").unwrap(), b"");
        assert!(normalize(b"./a/../../etc").is_err());
        assert_eq!(split(b"usr/bin/x"), (&b"usr/bin"[..], &b"x"[..]));
        assert_eq!(split(b"x"), (&b""[..], &b"x"[..]));
    }

    #[test]
    fn the_script_creates_in_tar_order_then_sets_metadata() {
        let mut b = tar::Builder::new(Vec::new());
        b.append_data(
            &mut header(tar::EntryType::Directory, 0o755, 0),
            "./",
            io::empty(),
        )
        .unwrap();
        b.append_data(
            &mut header(tar::EntryType::Directory, 0o755, 0),
            "./a b/",
            io::empty(),
        )
        .unwrap();
        b.append_data(
            &mut header(tar::EntryType::Regular, 0o4755, 5),
            "./a b/f\"1",
            &b"hello"[..],
        )
        .unwrap();
        let mut l = header(tar::EntryType::Link, 0o4755, 0);
        b.append_link(&mut l, "./top", "./a b/f\"1").unwrap();
        let data = tempfile::tempdir().unwrap();
        let tar = b.into_inner().unwrap();
        let (plan, kept) = plan(&tar[..], data.path(), &["a b/f\"1"]).unwrap();
        let text = String::from_utf8(plan.script).unwrap();
        let f1 = data.path().join("2");
        assert_eq!(fs::read(&f1).unwrap(), b"hello");
        assert_eq!(kept["a b/f\"1"], f1);
        let expected = format!(
            "mkdir \"a b\"\ncd \"/a b\"\nwrite \"{}\" \"f\"\"1\"\ncd \"/\"\nln \"/a b/f\"\"1\" \"top\"\n",
            f1.display()
        );
        assert!(text.starts_with(&expected), "{text}");
        assert!(text.contains("sif \"/\" mode 040755\n"), "{text}");
        assert!(
            text.contains("sif \"/a b/f\"\"1\" mode 0104755\n"),
            "{text}"
        );
        assert!(text.contains("sif \"/a b/f\"\"1\" mtime @7\n"), "{text}");
        assert!(
            text.ends_with("sif \"/a b/f\"\"1\" links_count 2\n"),
            "{text}"
        );
        assert_eq!(plan.entries, 4);
        assert_eq!(plan.file_bytes, 5);
    }
}
