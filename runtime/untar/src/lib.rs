//! A tar archive unpacked beneath a directory, never outside it, whatever the archive holds:
//! the installer's rootfs (in the target, often under emulation) and the stack's diskless exports.
//!
//! Paths are not trusted as text: every entry is created relative to a directory descriptor
//! opened from the root one component at a time with `O_NOFOLLOW | O_DIRECTORY`, so an entry
//! that goes through a symbolic link (one the archive itself created, `escape -> /outside`, then
//! `escape/x`) or names `..` is refused instead of followed. Leaves are made with the `*at`
//! calls, which do not follow a final symbolic link either; a hard link's target is resolved the
//! same way. Ownership (when running as root), modes including setuid bits, mtimes and extended
//! attributes (`SCHILY.xattr.*`) are kept; directories get theirs after their content. Device
//! nodes are made when permitted and counted otherwise (a user namespace cannot make them);
//! FIFOs never read the device fields, which GNU tar leaves blank for them.

use std::{
    ffi::CString,
    fs::File,
    io::{self, Read},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::Path,
};

/// What an unpack did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Archive entries read (including metadata-only ones).
    pub entries: u64,
    /// Device nodes not created (no permission).
    pub skipped_devices: u32,
}

/// The directories below the root on the last entry's path, outermost first, open.
///
/// Under emulation (the installer runs in a TCG guest) every system call costs microseconds,
/// and the tar crate's own unpacking made 22 per file (a `readlink` per path component to
/// canonicalize the parent, 8 KiB writes, path-based attribute calls); this makes about 7 (107k
/// for the Debian 12 rootfs, against 323k): an entry opens only the components where its path
/// differs from the last one's (an archive lists a directory's entries together), data goes
/// out in [`COPY_BUFFER`] writes, and a leaf is removed only when creating it found one in the
/// way.
#[derive(Default)]
struct DirPath(Vec<(CString, OwnedFd)>);

impl DirPath {
    /// The directory `parents` names below `root`, made where missing: the kept descriptors as
    /// far as the path is the same, then one [`step`] per differing component. A kept
    /// descriptor stays its directory: no entry replaces a directory by anything else
    /// (`remove_leaf` refuses), so it is the one a new walk from the root would open.
    fn open<'a>(&'a mut self, root: &'a OwnedFd, parents: &[CString]) -> io::Result<&'a OwnedFd> {
        let same = self
            .0
            .iter()
            .zip(parents)
            .take_while(|((kept, _), want)| kept == *want)
            .count();
        self.0.truncate(same);
        for c in &parents[same..] {
            let dir = self.0.last().map_or(root, |(_, fd)| fd);
            let next = step(dir, c, true)?;
            self.0.push((c.clone(), next));
        }
        Ok(self.0.last().map_or(root, |(_, fd)| fd))
    }
}

/// Size of the writes of a file's data.
const COPY_BUFFER: usize = 1 << 20;

/// A directory's attributes, applied once its content is written.
struct Deferred {
    components: Vec<CString>,
    mode: u32,
    owner: Option<(u32, u32)>,
    mtime: i64,
}

/// Unpacks `archive` into the existing directory `root`. `owners`: give entries their
/// archived uid/gid (needs root). Errors name the entry.
pub fn unpack<R: Read>(archive: R, root: &Path, owners: bool) -> io::Result<Summary> {
    let root = open_dir_path(root)?;
    let mut summary = Summary::default();
    let mut directories = Vec::new();
    let (mut dirs, mut buffer) = (DirPath::default(), Vec::new());
    let mut tar = tar::Archive::new(archive);
    for entry in tar.entries()? {
        let mut entry = entry?;
        summary.entries += 1;
        let done = unpack_entry(
            &root,
            &mut entry,
            owners,
            &mut directories,
            &mut summary,
            (&mut dirs, &mut buffer),
        );
        if let Err(e) = done {
            let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            return Err(io::Error::new(e.kind(), format!("entry {name:?}: {e}")));
        }
    }
    drop(dirs);
    // Deepest first: a parent's mode (e.g. read-only) must not stop its children's updates.
    directories.sort_by(|a, b| b.components.cmp(&a.components));
    for d in directories {
        let dir = match d.components.split_last() {
            None => dup(&root)?,
            Some((leaf, parents)) => {
                let parent = walk(&root, parents, false)?;
                open_at(&parent, leaf, libc::O_DIRECTORY | libc::O_NOFOLLOW)?
            }
        };
        set_attributes(&dir, d.owner, d.mode, d.mtime)?;
    }
    Ok(summary)
}

fn unpack_entry<R: Read>(
    root: &OwnedFd,
    entry: &mut tar::Entry<'_, R>,
    owners: bool,
    directories: &mut Vec<Deferred>,
    summary: &mut Summary,
    (dirs, buffer): (&mut DirPath, &mut Vec<u8>),
) -> io::Result<()> {
    let path = components(&entry.path_bytes())?;
    let header = entry.header();
    let kind = header.entry_type();
    // Links have no mode of their own (some writers leave the field blank).
    let mode = match kind {
        tar::EntryType::Symlink | tar::EntryType::Link => 0,
        _ => header.mode()? & 0o7777,
    };
    let owner = if owners {
        Some((header.uid()? as u32, header.gid()? as u32))
    } else {
        None
    };
    let mtime = header.mtime()? as i64;
    // Read only for devices: GNU tar leaves them blank for a FIFO.
    let device = if kind.is_character_special() || kind.is_block_special() {
        let major = header.device_major()?.unwrap_or(0);
        let minor = header.device_minor()?.unwrap_or(0);
        libc::makedev(major, minor)
    } else {
        0
    };
    let Some((leaf, parents)) = path.split_last() else {
        // The archive's root (`./`): its attributes become the root directory's.
        if kind.is_dir() {
            directories.push(Deferred {
                components: path,
                mode,
                owner,
                mtime,
            });
        }
        return Ok(());
    };
    let parent = dirs.open(root, parents)?;
    let xattrs = xattrs(entry)?;
    use tar::EntryType as T;
    match kind {
        T::Directory => {
            make_dir(parent, leaf)?;
            if !xattrs.is_empty() {
                let dir = open_at(parent, leaf, libc::O_DIRECTORY | libc::O_NOFOLLOW)?;
                set_xattrs(&dir, &xattrs)?;
            }
            directories.push(Deferred {
                components: path.clone(),
                mode,
                owner,
                mtime,
            });
        }
        T::Regular | T::Continuous | T::GNUSparse => {
            let fd = replacing(parent, leaf, || create_at(parent, leaf))?;
            let mut file = File::from(fd);
            copy(entry, &mut file, buffer)?;
            let fd = OwnedFd::from(file);
            set_xattrs(&fd, &xattrs)?;
            set_attributes(&fd, owner, mode, mtime)?;
        }
        T::Symlink => {
            let target = entry
                .link_name_bytes()
                .ok_or_else(|| invalid("a symbolic link without a target".into()))?;
            let target = cstring(&target)?;
            replacing(parent, leaf, || {
                // SAFETY: valid descriptor and NUL-terminated strings.
                check(unsafe {
                    libc::symlinkat(target.as_ptr(), parent.as_raw_fd(), leaf.as_ptr())
                })
            })?;
            leaf_attributes(parent, leaf, owner, None, mtime)?;
        }
        T::Link => {
            let target = entry
                .link_name_bytes()
                .ok_or_else(|| invalid("a hard link without a target".into()))?;
            let target = components(&target)?;
            let Some((target_leaf, target_parents)) = target.split_last() else {
                return Err(invalid("a hard link to the archive's root".into()));
            };
            let source = walk(root, target_parents, false)?;
            replacing(parent, leaf, || {
                // Flags 0: a target that is a symbolic link is linked itself, never followed.
                // SAFETY: valid descriptors and NUL-terminated names.
                check(unsafe {
                    libc::linkat(
                        source.as_raw_fd(),
                        target_leaf.as_ptr(),
                        parent.as_raw_fd(),
                        leaf.as_ptr(),
                        0,
                    )
                })
            })?;
        }
        T::Char | T::Block | T::Fifo => {
            let file_type = match kind {
                T::Fifo => libc::S_IFIFO,
                T::Char => libc::S_IFCHR,
                _ => libc::S_IFBLK,
            };
            let made = replacing(parent, leaf, || {
                // SAFETY: valid descriptor and NUL-terminated name.
                check(unsafe {
                    libc::mknodat(parent.as_raw_fd(), leaf.as_ptr(), file_type, device)
                })
            });
            if let Err(e) = made {
                if e.raw_os_error() == Some(libc::EPERM) && kind != T::Fifo {
                    summary.skipped_devices += 1;
                    return Ok(());
                }
                return Err(e);
            }
            leaf_attributes(parent, leaf, owner, Some(mode), mtime)?;
        }
        // Global pax headers and other metadata-only entries create nothing.
        _ => {}
    }
    Ok(())
}

/// The entry's path as components: empty and `.` ones dropped, `..` refused (a leading `/` is
/// dropped, as GNU tar does).
fn components(path: &[u8]) -> io::Result<Vec<CString>> {
    let mut out = Vec::new();
    for c in path.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err(invalid("the path leaves the archive's root (..)".into())),
            c => out.push(cstring(c)?),
        }
    }
    Ok(out)
}

/// Opens `components` below `root` one at a time without following symbolic links, creating
/// missing directories when `create`.
fn walk(root: &OwnedFd, components: &[CString], create: bool) -> io::Result<OwnedFd> {
    let mut dir = dup(root)?;
    for c in components {
        dir = step(&dir, c, create)?;
    }
    Ok(dir)
}

/// Opens the directory `c` in `dir` without following a symbolic link, making it when missing
/// and `create`.
fn step(dir: &OwnedFd, c: &CString, create: bool) -> io::Result<OwnedFd> {
    let next = match open_at(dir, c, libc::O_DIRECTORY | libc::O_NOFOLLOW) {
        Err(e) if create && e.kind() == io::ErrorKind::NotFound => {
            make_dir(dir, c)?;
            open_at(dir, c, libc::O_DIRECTORY | libc::O_NOFOLLOW)
        }
        other => other,
    };
    next.map_err(|e| match e.raw_os_error() {
        Some(libc::ELOOP | libc::ENOTDIR) => invalid(format!(
            "{:?} on its path is not a directory (a symbolic link is never followed)",
            c.to_string_lossy()
        )),
        _ => e,
    })
}

fn make_dir(parent: &OwnedFd, name: &CString) -> io::Result<()> {
    // Private until the deferred attributes are applied.
    // SAFETY: valid descriptor and NUL-terminated name.
    if unsafe { libc::mkdirat(parent.as_raw_fd(), name.as_ptr(), 0o700) } == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EEXIST) {
        return Err(e);
    }
    if is_dir_at(parent, name)? {
        return Ok(());
    }
    remove_leaf(parent, name)?;
    // SAFETY: as above.
    check(unsafe { libc::mkdirat(parent.as_raw_fd(), name.as_ptr(), 0o700) })
}

fn is_dir_at(parent: &OwnedFd, name: &CString) -> io::Result<bool> {
    // SAFETY: stat is plain data, filled by fstatat on a valid descriptor and name.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor, a NUL-terminated name and a stat buffer we own.
    check(unsafe {
        libc::fstatat(
            parent.as_raw_fd(),
            name.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(st.st_mode & libc::S_IFMT == libc::S_IFDIR)
}

/// Runs `make` (which creates `name` in `parent`); when something is in the way (`EEXIST`: an
/// earlier entry of the same name), removes it and runs `make` again. A directory in the way
/// stays and fails the entry (`EISDIR`).
fn replacing<T>(
    parent: &OwnedFd,
    name: &CString,
    mut make: impl FnMut() -> io::Result<T>,
) -> io::Result<T> {
    match make() {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            remove_leaf(parent, name)?;
            make()
        }
        other => other,
    }
}

/// Copies the entry's data in writes of up to [`COPY_BUFFER`] bytes.
fn copy(from: &mut impl Read, to: &mut File, buffer: &mut Vec<u8>) -> io::Result<()> {
    if buffer.is_empty() {
        buffer.resize(COPY_BUFFER, 0);
    }
    loop {
        let mut filled = 0;
        while filled < buffer.len() {
            match from.read(&mut buffer[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if filled == 0 {
            return Ok(());
        }
        io::Write::write_all(to, &buffer[..filled])?;
        if filled < buffer.len() {
            return Ok(());
        }
    }
}

/// Removes a non-directory leaf that a later entry replaces (a directory stays: `EISDIR`).
fn remove_leaf(parent: &OwnedFd, name: &CString) -> io::Result<()> {
    // SAFETY: valid descriptor and NUL-terminated name.
    if unsafe { libc::unlinkat(parent.as_raw_fd(), name.as_ptr(), 0) } == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENOENT) => Ok(()),
        _ => Err(e),
    }
}

fn open_at(dir: &OwnedFd, name: &CString, flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: valid descriptor and NUL-terminated name; the result is checked and owned.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    owned(fd)
}

fn create_at(dir: &OwnedFd, name: &CString) -> io::Result<OwnedFd> {
    let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: as in `open_at`.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags, 0o600) };
    owned(fd)
}

fn open_dir_path(path: &Path) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let c = cstring(path.as_os_str().as_bytes())?;
    // SAFETY: a NUL-terminated path; the result is checked and owned.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    owned(fd)
}

fn dup(fd: &OwnedFd) -> io::Result<OwnedFd> {
    fd.try_clone()
}

fn owned(fd: RawFd) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor just returned to us and owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Owner, then mode (a chown clears setuid bits), then mtime, on an open file or directory.
fn set_attributes(
    fd: &OwnedFd,
    owner: Option<(u32, u32)>,
    mode: u32,
    mtime: i64,
) -> io::Result<()> {
    // SAFETY: plain syscalls on a valid descriptor.
    unsafe {
        if let Some((uid, gid)) = owner {
            check(libc::fchown(fd.as_raw_fd(), uid, gid))?;
        }
        check(libc::fchmod(fd.as_raw_fd(), mode as libc::mode_t))?;
        let times = [timespec(mtime), timespec(mtime)];
        check(libc::futimens(fd.as_raw_fd(), times.as_ptr()))
    }
}

/// The same for a leaf that cannot be opened (a symbolic link, a node), by name, never
/// following it.
fn leaf_attributes(
    parent: &OwnedFd,
    name: &CString,
    owner: Option<(u32, u32)>,
    mode: Option<u32>,
    mtime: i64,
) -> io::Result<()> {
    let (dir, name) = (parent.as_raw_fd(), name.as_ptr());
    // SAFETY: plain syscalls on a valid descriptor and NUL-terminated name.
    unsafe {
        if let Some((uid, gid)) = owner {
            check(libc::fchownat(
                dir,
                name,
                uid,
                gid,
                libc::AT_SYMLINK_NOFOLLOW,
            ))?;
        }
        if let Some(mode) = mode {
            // A node this unpack just made in place of whatever was there: not a link.
            check(libc::fchmodat(dir, name, mode as libc::mode_t, 0))?;
        }
        let times = [timespec(mtime), timespec(mtime)];
        check(libc::utimensat(
            dir,
            name,
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        ))
    }
}

fn timespec(secs: i64) -> libc::timespec {
    libc::timespec {
        tv_sec: secs as libc::time_t,
        tv_nsec: 0,
    }
}

/// `SCHILY.xattr.<name>` pax records of the entry.
fn xattrs<R: Read>(entry: &mut tar::Entry<'_, R>) -> io::Result<Vec<(CString, Vec<u8>)>> {
    let mut out = Vec::new();
    if let Some(extensions) = entry.pax_extensions()? {
        for ext in extensions {
            let ext = ext?;
            if let Some(name) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") {
                out.push((cstring(name)?, ext.value_bytes().to_vec()));
            }
        }
    }
    Ok(out)
}

fn set_xattrs(fd: &OwnedFd, xattrs: &[(CString, Vec<u8>)]) -> io::Result<()> {
    for (name, value) in xattrs {
        // SAFETY: valid descriptor, NUL-terminated name, value pointer and length from a Vec.
        check(unsafe {
            libc::fsetxattr(
                fd.as_raw_fd(),
                name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        })?;
    }
    Ok(())
}

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| invalid("a name with a NUL byte".into()))
}

fn invalid(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// One entry as an attacker may write it: raw path bytes, any type, any link target.
    /// Weighted toward what escapes: a link named `escape` to outside, then entries below it.
    fn entry() -> impl Strategy<Value = (String, u8, String)> {
        let part =
            prop_oneof![4 => Just("escape"), 1 => Just("a"), 1 => Just(".."), 1 => Just(".")];
        let path = proptest::collection::vec(part, 1..4).prop_map(|p| p.join("/"));
        let kind = prop_oneof![
            3 => Just(b'2'),
            3 => Just(b'0'),
            1 => Just(b'1'),
            1 => Just(b'3'),
            1 => Just(b'5'),
            1 => Just(b'6'),
        ];
        let target = prop_oneof![
            4 => Just("OUTSIDE"),
            1 => Just("OUTSIDE/x"),
            1 => Just(".."),
            1 => Just("../.."),
            1 => Just("escape/x"),
        ];
        (path, kind, target.prop_map(str::to_string))
    }

    fn archive(entries: &[(String, u8, String)], outside: &str) -> Vec<u8> {
        let mut out = Vec::new();
        for (path, kind, target) in entries {
            let mut h = tar::Header::new_ustar();
            h.set_size(if *kind == b'0' { 3 } else { 0 });
            h.set_mode(0o4755);
            h.set_mtime(0);
            h.set_uid(0);
            h.set_gid(0);
            let old = h.as_old_mut();
            old.linkflag = [*kind];
            let name = path.as_bytes();
            old.name[..name.len()].copy_from_slice(name);
            let link = target.replace("OUTSIDE", outside);
            old.linkname[..link.len()].copy_from_slice(link.as_bytes());
            h.set_cksum();
            out.extend_from_slice(h.as_bytes());
            if *kind == b'0' {
                let mut block = [0u8; 512];
                block[..3].copy_from_slice(b"abc");
                out.extend_from_slice(&block);
            }
        }
        out.extend_from_slice(&[0u8; 1024]);
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Whatever the archive holds, nothing is created, changed or linked outside the root.
        #[test]
        fn nothing_lands_outside_the_root(entries in proptest::collection::vec(entry(), 1..8)) {
            let dir = tempfile::tempdir().unwrap();
            let (root, outside) = (dir.path().join("root"), dir.path().join("outside"));
            std::fs::create_dir(&root).unwrap();
            std::fs::create_dir(&outside).unwrap();
            std::fs::write(outside.join("x"), b"keep").unwrap();
            let bytes = archive(&entries, outside.to_str().unwrap());
            let _ = unpack(&bytes[..], &root, false);
            let mut top: Vec<_> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            top.sort();
            prop_assert_eq!(top, ["outside", "root"]);
            let inside: Vec<_> = std::fs::read_dir(&outside)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            prop_assert_eq!(inside, ["x"]);
            prop_assert_eq!(std::fs::read(outside.join("x")).unwrap(), b"keep");
            let meta = std::fs::metadata(outside.join("x")).unwrap();
            prop_assert_eq!(std::os::unix::fs::MetadataExt::nlink(&meta), 1, "hard-linked from the root");
        }

        /// Any bytes as an archive: an error or a result, never a panic.
        #[test]
        fn any_bytes_are_unpacked_or_refused(bytes in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let dir = tempfile::tempdir().unwrap();
            let _ = unpack(&bytes[..], dir.path(), false);
        }
    }
}
