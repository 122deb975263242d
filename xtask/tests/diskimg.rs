//! The disk image step (`xtask::distro::diskimg::build`) on a small synthetic rootfs with every
//! kind of entry a rootfs has and names debugfs's parser could trip on: two builds from two empty
//! scratch directories are byte-identical, and the image, mounted read-only by the kernel, holds
//! exactly the tar's tree. Needs root (loop device) and e2fsprogs.

#[path = "common/tree.rs"]
mod tree;

use std::fs;
use std::io;
use std::path::Path;

use pxelab_tests::cmd::{require, require_root};
use pxelab_tests::LoopDisk;
use xtask::distro::diskimg;

const EPOCH: u64 = 1_686_355_200;
const INITRD: &str = "boot/initrd.img-6.1.0-9-cloud-amd64";

fn header(kind: tar::EntryType, mode: u32, owner: (u64, u64), mtime: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(owner.0);
    h.set_gid(owner.1);
    h.set_mtime(mtime);
    h.set_size(0);
    h
}

/// A rootfs tarball as mmdebstrap writes them (`./` first, parents before children).
fn rootfs(path: &Path) {
    let mut b = tar::Builder::new(Vec::new());
    let dir = |b: &mut tar::Builder<Vec<u8>>, p: &str, mode: u32, owner: (u64, u64)| {
        let mut h = header(tar::EntryType::Directory, mode, owner, EPOCH - 10);
        b.append_data(&mut h, p, io::empty()).unwrap();
    };
    let file = |b: &mut tar::Builder<Vec<u8>>, p: &str, mode: u32, owner, data: &[u8]| {
        let mut h = header(tar::EntryType::Regular, mode, owner, EPOCH - 1000);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, p, data).unwrap();
    };
    dir(&mut b, "./", 0o755, (0, 0));
    dir(&mut b, "./boot/", 0o755, (0, 0));
    file(
        &mut b,
        &format!("./{INITRD}"),
        0o644,
        (0, 0),
        b"initramfs bytes",
    );
    dir(&mut b, "./dev/", 0o755, (0, 0));
    for (name, kind, major, minor) in [
        ("null", tar::EntryType::Char, 1, 3),
        ("loop0", tar::EntryType::Block, 7, 0),
        ("initctl", tar::EntryType::Fifo, 0, 0),
    ] {
        let mut h = header(kind, 0o660, (0, 6), EPOCH);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        b.append_data(&mut h, format!("./dev/{name}"), io::empty())
            .unwrap();
    }
    dir(&mut b, "./tmp/", 0o1777, (0, 0));
    dir(&mut b, "./var/", 0o755, (0, 0));
    // A POSIX ACL (as setfacl writes it through the VFS) and a group-owned setgid directory.
    let acl: Vec<u8> = [
        2u32,
        0x0007_0001,
        u32::MAX,
        0x0005_0004,
        u32::MAX,
        0x0005_0008,
        4,
    ]
    .iter()
    .flat_map(|w| w.to_le_bytes())
    .chain([
        0x10, 0, 5, 0, 0xff, 0xff, 0xff, 0xff, 0x20, 0, 5, 0, 0xff, 0xff, 0xff, 0xff,
    ])
    .collect();
    b.append_pax_extensions([("SCHILY.xattr.system.posix_acl_access", &acl[..])])
        .unwrap();
    dir(&mut b, "./var/journal/", 0o2755, (0, 101));
    dir(&mut b, "./usr/", 0o755, (0, 0));
    dir(&mut b, "./usr/bin/", 0o755, (0, 0));
    file(&mut b, "./usr/bin/su", 0o4755, (0, 0), b"#!/bin/sh\n");
    file(&mut b, "./usr/bin/empty", 0o600, (100_000, 100_001), b"");
    // Zero blocks become holes; the bytes read back must not change.
    let mut sparse = vec![0u8; 3 * 4096];
    sparse.extend_from_slice(b"tail");
    file(&mut b, "./usr/bin/sparse", 0o644, (0, 0), &sparse);
    let big: Vec<u8> = (0..(3u32 << 18)).flat_map(|i| i.to_le_bytes()).collect();
    b.append_pax_extensions([(
        "SCHILY.xattr.security.capability",
        &[
            1u8, 0, 0, 2, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ][..],
    )])
    .unwrap();
    file(&mut b, "./usr/bin/ping", 0o755, (0, 0), &big);
    let mut h = header(tar::EntryType::Link, 0o755, (0, 0), EPOCH);
    b.append_link(&mut h, "./usr/bin/ping4", "./usr/bin/ping")
        .unwrap();
    let mut h = header(tar::EntryType::Symlink, 0o777, (0, 0), EPOCH - 5);
    b.append_link(&mut h, "./bin", "usr/bin").unwrap();
    let long = format!("/usr/{}/target", "long-".repeat(20));
    let mut h = header(tar::EntryType::Symlink, 0o777, (0, 0), EPOCH - 6);
    b.append_link(&mut h, "./usr/long-link", &long).unwrap();
    // Names debugfs's parser could split, quote or comment out.
    dir(&mut b, "./usr/lib/", 0o755, (0, 0));
    for name in [
        "with space",
        "q\"uote",
        "\"",
        "back\\x2dslash",
        "#hash",
        "-dash",
        "semi;colon",
        "ünïcode",
        "tab\tname",
        "'single'",
    ] {
        dir(&mut b, &format!("./usr/lib/{name}/"), 0o750, (0, 4));
        file(
            &mut b,
            &format!("./usr/lib/{name}/{name}"),
            0o640,
            (1000, 1000),
            name.as_bytes(),
        );
        let mut h = header(tar::EntryType::Symlink, 0o777, (0, 0), EPOCH);
        b.append_link(&mut h, format!("./usr/lib/{name}/link {name}"), name)
            .unwrap();
        let mut h = header(tar::EntryType::Link, 0o640, (1000, 1000), EPOCH);
        b.append_link(
            &mut h,
            format!("./usr/{name}"),
            format!("./usr/lib/{name}/{name}"),
        )
        .unwrap();
    }
    // Enough entries for a directory of several blocks (an htree).
    dir(&mut b, "./usr/share/", 0o755, (0, 0));
    for i in 0..400 {
        file(
            &mut b,
            &format!("./usr/share/file-with-a-long-name-{i:04}"),
            0o644,
            (0, 0),
            &[i as u8],
        );
    }
    let tar = b.into_inner().unwrap();
    fs::write(path, zstd::encode_all(&tar[..], 3).unwrap()).unwrap();
}

/// The image and its compressed form.
fn build(tar: &Path, dir: &Path) -> (Vec<u8>, Vec<u8>) {
    let (scratch, out) = (dir.join("scratch"), dir.join("out"));
    fs::create_dir_all(&scratch).unwrap();
    fs::create_dir_all(&out).unwrap();
    let digest = pxelab_tests::sha256_hex(&fs::read(tar).unwrap());
    diskimg::build(tar, &digest, Some(INITRD), EPOCH, &scratch, &out)
        .unwrap_or_else(|e| panic!("building the image failed: {e:#}"));
    assert_eq!(
        fs::read(out.join(diskimg::INITRD)).unwrap(),
        b"initramfs bytes"
    );
    let image = fs::read(out.join(diskimg::IMAGE)).unwrap();
    let streamed = fs::read(out.join(diskimg::IMAGE_ZST)).unwrap();
    assert!(
        zstd::decode_all(&streamed[..]).unwrap() == image,
        "{} is not {} compressed",
        diskimg::IMAGE_ZST,
        diskimg::IMAGE
    );
    // Frames of DISK_IMAGE_FRAME bytes, each saying its size: the installer decompresses
    // them in parallel.
    let frame = pxelab_contract::DISK_IMAGE_FRAME;
    let (mut at, mut sizes) = (0, Vec::new());
    while at < streamed.len() {
        let rest = &streamed[at..];
        sizes.push(
            zstd::zstd_safe::get_frame_content_size(rest)
                .unwrap()
                .unwrap() as usize,
        );
        at += zstd::zstd_safe::find_frame_compressed_size(rest).unwrap();
    }
    let mut expected = vec![frame; image.len() / frame];
    expected.extend((image.len() % frame != 0).then_some(image.len() % frame));
    assert!(expected.len() >= 2, "an image of one frame tests nothing");
    assert_eq!(sizes, expected);
    (image, streamed)
}

#[test]
fn sys_disk_images_are_reproducible_and_hold_exactly_their_tar() {
    require_root("mounting the image on a loop device");
    for tool in ["mke2fs", "debugfs", "e2fsck"] {
        require(tool, "e2fsprogs");
    }
    let work = tempfile::tempdir().unwrap();
    let tar = work.path().join("rootfs.tar.zst");
    rootfs(&tar);
    let (one, one_zst) = build(&tar, &work.path().join("one"));
    // Another time of day and another umask must not show.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    // SAFETY: umask has no preconditions.
    let old = unsafe { libc::umask(0o077) };
    let (two, two_zst) = build(&tar, &work.path().join("two"));
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    assert!(
        one == two,
        "two builds differ: sha256 {} vs {}",
        pxelab_tests::sha256_hex(&one),
        pxelab_tests::sha256_hex(&two)
    );
    assert!(one_zst == two_zst, "the two compressed images differ");

    let disk = LoopDisk::new(one.len() as u64);
    fs::write(disk.image(), &one).unwrap();
    let root = disk.mount_whole_ro("root");
    tree::assert_same(&tree::from_tar(&tar), &tree::from_dir(&root));
}
