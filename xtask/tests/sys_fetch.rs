//! `cargo xtask fetch` of the project's real lock against Debian's mirror (network: `sys_` tier).

use std::process::Command;
use std::time::{Duration, Instant};

use xtask::lock::Lock;
use xtask::store::{hash_file, Store};

fn xtask(cache: &std::path::Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .env("PXELAB_CACHE", cache)
        .env_remove("PXELAB_DEBIAN_MIRROR")
        .output()
        .expect("running the xtask binary");
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.success(), text)
}

#[test]
fn sys_fetch_of_the_real_lock_downloads_verifies_and_then_does_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path();
    // The iPXE package and the amd64 initrd tools: every code path, 14 MB instead of 125.
    let subsets = [["--recipe", "ipxe"], ["--recipe", "initrd"]];
    for s in &subsets {
        let args = [
            "fetch",
            s[0],
            s[1],
            "--arch",
            if s[1] == "ipxe" { "all" } else { "amd64" },
        ];
        let (ok, log) = xtask(cache, &args);
        assert!(ok, "cargo xtask {} failed (Debian's mirror must be reachable; a 404 means the lock is stale: run `cargo xtask lock`):\n{log}", args.join(" "));
    }
    let lock = Lock::load_default().unwrap();
    let mut wanted: Vec<_> = lock.select("ipxe", "all").unwrap();
    wanted.extend(lock.select("initrd", "amd64").unwrap());
    let store = Store::open(cache).unwrap();
    for input in &wanted {
        let path = store.blob_path(&input.pin.sha256);
        assert_eq!(
            hash_file(&path).unwrap(),
            input.pin.sha256,
            "{}",
            input.label()
        );
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            input.pin.size,
            "{}",
            input.label()
        );
    }
    drop(store);

    let t = Instant::now();
    let (ok, log) = xtask(cache, &["fetch", "--recipe", "initrd", "--arch", "amd64"]);
    let warm = t.elapsed();
    assert!(ok && log.contains("nothing needed downloading"), "{log}");
    assert!(warm < Duration::from_secs(1), "warm fetch took {warm:?}");
    let (ok, log) = xtask(cache, &["fetch", "--offline", "--recipe", "ipxe"]);
    assert!(ok, "{log}");
    let (ok, log) = xtask(
        cache,
        &[
            "fetch",
            "--offline",
            "--recipe",
            "kernel",
            "--arch",
            "amd64",
        ],
    );
    assert!(
        !ok && log.contains("linux-image-cloud-amd64") && log.contains("not in the store"),
        "{log}"
    );
}
