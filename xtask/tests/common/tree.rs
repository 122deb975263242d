//! A root filesystem's tree as comparable records, read from a tarball and from a mounted
//! filesystem: kind, mode, owner, mtime, link target or content digest, device numbers, xattrs
//! and which paths share an inode.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use sha2::{Digest, Sha256};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// `d`, `f`, `l`, `c`, `b`, `p`.
    pub kind: char,
    /// Permission bits with setuid, setgid and sticky.
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: i64,
    /// Symlink target, file content digest, or `major:minor`.
    pub what: String,
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// The paths sharing this inode (hard links), itself included, when more than one.
    pub links: Vec<String>,
}

pub type Tree = BTreeMap<String, Node>;

fn digest(r: &mut impl Read) -> String {
    let mut h = Sha256::new();
    std::io::copy(r, &mut h).unwrap();
    hex::encode(h.finalize())
}

/// The tree a `rootfs.tar.zst` describes (paths relative, `""` the root).
pub fn from_tar(path: &Path) -> Tree {
    let decoder = zstd::stream::read::Decoder::new(fs::File::open(path).unwrap()).unwrap();
    let mut archive = tar::Archive::new(decoder);
    let mut tree = Tree::new();
    let mut hard: Vec<(String, String)> = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut e = entry.unwrap();
        let p = clean(&String::from_utf8_lossy(&e.path_bytes()));
        let h = e.header().clone();
        let kind = match h.entry_type() {
            tar::EntryType::Directory => 'd',
            tar::EntryType::Regular => 'f',
            tar::EntryType::Symlink => 'l',
            tar::EntryType::Char => 'c',
            tar::EntryType::Block => 'b',
            tar::EntryType::Fifo => 'p',
            tar::EntryType::Link => {
                let target = clean(&String::from_utf8_lossy(&e.link_name_bytes().unwrap()));
                hard.push((p, target));
                continue;
            }
            other => panic!("{p}: unexpected tar entry type {other:?}"),
        };
        let mut xattrs = BTreeMap::new();
        if let Some(pax) = e.pax_extensions().unwrap() {
            for ext in pax {
                let ext = ext.unwrap();
                if let Some(name) = ext.key().unwrap().strip_prefix("SCHILY.xattr.") {
                    xattrs.insert(name.to_string(), ext.value_bytes().to_vec());
                }
            }
        }
        let what = match kind {
            'f' => digest(&mut e),
            'l' => String::from_utf8_lossy(&e.link_name_bytes().unwrap()).into_owned(),
            'c' | 'b' => format!(
                "{}:{}",
                h.device_major().unwrap().unwrap(),
                h.device_minor().unwrap().unwrap()
            ),
            _ => String::new(),
        };
        tree.insert(
            p,
            Node {
                kind,
                mode: h.mode().unwrap() & 0o7777,
                uid: h.uid().unwrap(),
                gid: h.gid().unwrap(),
                mtime: h.mtime().unwrap() as i64,
                what,
                xattrs,
                links: Vec::new(),
            },
        );
    }
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (link, target) in hard {
        let node = tree
            .get(&target)
            .unwrap_or_else(|| panic!("{link} → {target}"))
            .clone();
        groups
            .entry(target.clone())
            .or_insert_with(|| vec![target.clone()])
            .push(link.clone());
        tree.insert(link, node);
    }
    for group in groups.into_values() {
        let mut sorted = group.clone();
        sorted.sort();
        for p in &group {
            tree.get_mut(p).unwrap().links = sorted.clone();
        }
    }
    tree
}

/// The tree under `root` (a mounted filesystem), without `lost+found`.
pub fn from_dir(root: &Path) -> Tree {
    let mut tree = Tree::new();
    let mut by_inode: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    walk(root, "", &mut tree, &mut by_inode);
    for group in by_inode.into_values().filter(|g| g.len() > 1) {
        let mut sorted = group.clone();
        sorted.sort();
        for p in &group {
            tree.get_mut(p).unwrap().links = sorted.clone();
        }
    }
    tree
}

fn walk(root: &Path, rel: &str, tree: &mut Tree, by_inode: &mut BTreeMap<u64, Vec<String>>) {
    let path = root.join(rel);
    let m = fs::symlink_metadata(&path).unwrap();
    let t = m.file_type();
    let kind = if t.is_dir() {
        'd'
    } else if t.is_file() {
        'f'
    } else if t.is_symlink() {
        'l'
    } else if t.is_char_device() {
        'c'
    } else if t.is_block_device() {
        'b'
    } else if t.is_fifo() {
        'p'
    } else {
        panic!("{rel}: unexpected file type")
    };
    let what = match kind {
        'f' => digest(&mut fs::File::open(&path).unwrap()),
        'l' => fs::read_link(&path).unwrap().to_string_lossy().into_owned(),
        'c' | 'b' => {
            let rdev = m.rdev();
            format!("{}:{}", libc::major(rdev), libc::minor(rdev))
        }
        _ => String::new(),
    };
    if kind != 'd' {
        by_inode.entry(m.ino()).or_default().push(rel.to_string());
    }
    tree.insert(
        rel.to_string(),
        Node {
            kind,
            mode: m.mode() & 0o7777,
            uid: m.uid().into(),
            gid: m.gid().into(),
            mtime: m.mtime(),
            what,
            xattrs: xattrs(&path),
            links: Vec::new(),
        },
    );
    assert_eq!(m.mtime_nsec(), 0, "{rel}: mtime has nanoseconds");
    if kind == 'd' {
        let mut names: Vec<String> = fs::read_dir(&path)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        for name in names {
            if rel.is_empty() && name == "lost+found" {
                continue;
            }
            let child = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            walk(root, &child, tree, by_inode);
        }
    }
}

fn xattrs(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut names = vec![0u8; 65536];
    // SAFETY: `c` is NUL-terminated and `names` is writable for its length.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(n >= 0, "llistxattr {}", path.display());
    let mut out = BTreeMap::new();
    for name in names[..n as usize]
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty())
    {
        let cname = CString::new(name).unwrap();
        let mut value = vec![0u8; 65536];
        // SAFETY: both strings are NUL-terminated and `value` is writable for its length.
        let len = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                cname.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        assert!(len >= 0, "lgetxattr {}", path.display());
        value.truncate(len as usize);
        out.insert(String::from_utf8_lossy(name).into_owned(), value);
    }
    out
}

fn clean(p: &str) -> String {
    p.trim_start_matches("./")
        .trim_start_matches('/')
        .trim_end_matches('/')
        .to_string()
}

/// Panics with the first differences between two trees.
pub fn assert_same(expected: &Tree, actual: &Tree) {
    let mut diffs = Vec::new();
    for (p, e) in expected {
        match actual.get(p) {
            None => diffs.push(format!("{p:?}: missing")),
            Some(a) if a != e => diffs.push(format!("{p:?}: expected {e:?}, found {a:?}")),
            _ => {}
        }
    }
    for p in actual.keys().filter(|p| !expected.contains_key(*p)) {
        diffs.push(format!("{p:?}: not in the tar"));
    }
    assert!(
        diffs.is_empty(),
        "{} differences, first ones:\n{}",
        diffs.len(),
        diffs
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}
