//! Against Debian's real mirror (network; `sys_` tier): signed indexes, closures, downloads
//! checked against the index, and extraction of real binaries.

use pxelab_debian::{Archive, Deb, DebPin, EntryKind, Index, ResolveOptions, Source, Trust};
use std::path::{Path, PathBuf};
use std::time::Instant;

fn archive() -> Archive {
    Archive::new(Trust::default()).expect("building the HTTP client")
}

fn download(pin: &DebPin, dir: &Path) -> PathBuf {
    let path = dir.join(format!("{}_{}.deb", pin.package, pin.arch));
    let response = reqwest::blocking::get(&pin.url)
        .and_then(|r| r.error_for_status())
        .unwrap_or_else(|e| panic!("downloading {}: {e}", pin.url));
    std::fs::write(&path, response.bytes().expect("reading the body")).unwrap();
    pin.verify_file(&path)
        .unwrap_or_else(|e| panic!("{} does not match the signed index: {e}", pin.url));
    path
}

fn pin<'a>(pins: &'a [DebPin], name: &str) -> &'a DebPin {
    pins.iter()
        .find(|p| p.package == name)
        .unwrap_or_else(|| panic!("{name} missing from the closure"))
}

/// Every relationship field of a real archive must parse: a parser gap would surface later as
/// a failed resolve of some unrelated package.
fn assert_all_relations_parse(index: &Index) {
    for package in index.packages() {
        package
            .dependencies()
            .unwrap_or_else(|e| panic!("real index field does not parse: {e}"));
    }
}

fn open_timed(sources: &[Source]) -> Index {
    let start = Instant::now();
    let index = archive()
        .open_all(sources)
        .unwrap_or_else(|e| panic!("reading {sources:?}: {e}"));
    eprintln!(
        "indexes {:?}: {} packages in {:.2}s",
        sources.iter().map(|s| s.suite.as_str()).collect::<Vec<_>>(),
        index.packages().len(),
        start.elapsed().as_secs_f64()
    );
    assert_all_relations_parse(&index);
    index
}

#[test]
fn sys_bookworm_busybox_and_dnsmasq_closure_download_and_extract() {
    let index = open_timed(&[
        Source::debian("bookworm", "amd64"),
        Source::debian("bookworm-updates", "amd64"),
        Source::debian("bookworm-security", "amd64"),
    ]);
    let start = Instant::now();
    let pins = index
        .resolve(
            &["busybox-static", "dnsmasq-base"],
            &ResolveOptions::default(),
        )
        .unwrap();
    let full = start.elapsed();
    let slim = index
        .resolve(
            &["busybox-static", "dnsmasq-base"],
            &ResolveOptions { skip_base: true },
        )
        .unwrap();
    eprintln!(
        "closure: {} packages ({} without Essential/required) in {:.1} ms: {}",
        pins.len(),
        slim.len(),
        full.as_secs_f64() * 1000.0,
        pins.iter()
            .map(|p| format!("{}={}", p.package, p.version))
            .collect::<Vec<_>>()
            .join(" ")
    );
    assert!(
        pins.windows(2).all(|w| w[0].package < w[1].package),
        "sorted by name"
    );
    assert!(
        pins.iter().any(|p| p.package == "libc6"),
        "dnsmasq-base needs libc6"
    );
    assert!(slim.len() < pins.len());
    // The same request gives the same answer.
    assert_eq!(
        index
            .resolve(
                &["dnsmasq-base", "busybox-static"],
                &ResolveOptions::default()
            )
            .unwrap(),
        pins
    );

    // A whole-system closure (what a rootfs build asks for): base packages plus a kernel and
    // boot stack; this exercises virtual packages (awk, debconf-2.0, …) across three suites.
    let mut rootfs: Vec<&str> = index
        .packages()
        .iter()
        .filter(|p| p.is_base())
        .map(|p| p.name.as_str())
        .collect();
    rootfs.sort();
    rootfs.dedup();
    rootfs.extend([
        "linux-image-cloud-amd64",
        "systemd",
        "udev",
        "grub-efi-amd64",
        "initramfs-tools",
        "cloud-init",
        "openssh-server",
        "ifupdown",
        "isc-dhcp-client",
    ]);
    let start = Instant::now();
    let system = index.resolve(&rootfs, &ResolveOptions::default()).unwrap();
    eprintln!(
        "rootfs-like closure of {} requests: {} packages, {:.1} MB of .debs, in {:.1} ms",
        rootfs.len(),
        system.len(),
        system.iter().map(|p| p.size).sum::<u64>() as f64 / 1e6,
        start.elapsed().as_secs_f64() * 1000.0
    );
    for name in [
        "systemd",
        "linux-image-cloud-amd64",
        "grub-efi-amd64-bin",
        "openssh-server",
        "mawk",
    ] {
        pin(&system, name);
    }
    let kernel = system
        .iter()
        .find(|p| p.package.starts_with("linux-image-6."))
        .expect("the cloud kernel metapackage pulls a versioned kernel image");
    eprintln!(
        "kernel: {} {} from {}",
        kernel.package, kernel.version, kernel.suite
    );
    let overrides = index.ftparchive_override(&system);
    assert_eq!(overrides.lines().count(), system.len());
    assert!(
        overrides.lines().any(|l| l == "apt required admin"),
        "{overrides}"
    );

    let tmp = tempfile::tempdir().unwrap();
    for (name, member) in [
        ("busybox-static", "bin/busybox"),
        ("dnsmasq-base", "usr/sbin/dnsmasq"),
    ] {
        let pin = pin(&pins, name);
        assert_eq!(pin.arch, "amd64");
        assert!(
            pin.url.starts_with("http://deb.debian.org/debian"),
            "{}",
            pin.url
        );
        let deb = Deb::open(download(pin, tmp.path())).unwrap();
        assert_eq!(deb.control().unwrap().get("Package"), Some(name));
        let bytes = deb.read_data_file(member).unwrap();
        assert_eq!(
            &bytes[..4],
            b"\x7fELF",
            "{member} of {name} is not an ELF file"
        );
        let root = tmp.path().join(name);
        deb.extract_to(&root).unwrap();
        let on_disk = std::fs::read(root.join(member)).unwrap();
        assert_eq!(on_disk, bytes);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(root.join(member))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o111, 0o111, "{member} must stay executable");
    }
}

/// The `Release` + `Release.gpg` fallback path, on Debian's real detached signature. (Not
/// bookworm-updates: its mirrored Release.gpg has been seen lagging its Release by weeks, a
/// BAD signature that InRelease, tried first, cannot have.)
#[test]
fn sys_detached_release_signature_verifies_and_detects_tampering() {
    let base = "http://deb.debian.org/debian/dists/bookworm/Release";
    let get = |url: &str| {
        reqwest::blocking::get(url)
            .and_then(|r| r.error_for_status())
            .and_then(|r| r.bytes())
            .unwrap_or_else(|e| panic!("downloading {url}: {e}"))
            .to_vec()
    };
    let release = get(base);
    let signature = get(&format!("{base}.gpg"));
    let keyring = Path::new(pxelab_debian::DEBIAN_KEYRING);
    let signature_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(signature_file.path(), &signature).unwrap();
    let signature = signature_file.path();
    pxelab_debian::release::verify_detached(&release, signature, keyring, base)
        .unwrap_or_else(|e| panic!("Debian's own Release.gpg must verify: {e}"));
    let mut tampered = release.clone();
    let at = tampered.len() / 2;
    tampered[at] ^= 0x20;
    let err = pxelab_debian::release::verify_detached(&tampered, signature, keyring, base)
        .expect_err("a modified Release must not verify");
    assert!(err.to_string().contains("no good signature"), "{err}");
}

#[test]
fn sys_trixie_ipxe_is_arch_all_and_ships_arm64_efi() {
    let index = open_timed(&[Source::debian("trixie", "amd64")]);
    let start = Instant::now();
    let pins = index
        .resolve(&["ipxe"], &ResolveOptions::default())
        .unwrap();
    eprintln!(
        "trixie ipxe closure: {} packages in {:.1} ms: {}",
        pins.len(),
        start.elapsed().as_secs_f64() * 1000.0,
        pins.iter()
            .map(|p| format!("{}={}", p.package, p.version))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let ipxe = pin(&pins, "ipxe");
    assert_eq!(ipxe.arch, "all");
    assert_eq!(ipxe.suite, "trixie");

    let tmp = tempfile::tempdir().unwrap();
    let deb = Deb::open(download(ipxe, tmp.path())).unwrap();
    let entries = deb.data_entries().unwrap();
    let efi = entries
        .iter()
        .find(|e| e.path.ends_with("/ipxe-arm64.efi"))
        .unwrap_or_else(|| {
            let paths: Vec<_> = entries.iter().map(|e| e.path.as_str()).collect();
            panic!("no ipxe-arm64.efi in {paths:?}")
        });
    eprintln!("found {} ({:?}, {} bytes)", efi.path, efi.kind, efi.size);
    let bytes = match &efi.kind {
        EntryKind::Symlink(target) => panic!("{} is a symlink to {target}", efi.path),
        _ => deb.read_data_file(&efi.path).unwrap(),
    };
    assert_eq!(&bytes[..2], b"MZ", "an EFI binary is a PE file");
}
