//! The fetcher and the store against a loopback fixture server that cuts connections, ignores
//! `Range`, serves wrong bytes, or is slow; plus the action cache and `lock --check`.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pxelab_tests::{sha256_hex, Behavior, FixtureServer};
use xtask::fetch::{Fetch, Fetcher};
use xtask::lock::{Lock, LockedInput};
use xtask::pin::{DebFacts, Pin};
use xtask::store::{BlobState, Store};
use xtask::ui::Ui;

/// Deterministic, non-repeating test content.
fn content(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u32)
                .wrapping_mul(2654435761)
                .rotate_left(seed as u32 % 32) as u8
                ^ seed
        })
        .collect()
}

fn fetcher(store: &Store) -> Fetcher<'_> {
    let mut f = Fetcher::new(store, Ui::plain()).unwrap();
    f.backoff = Duration::from_millis(10);
    f
}

fn item(server: &FixtureServer, path: &str, body: &[u8]) -> Fetch {
    Fetch {
        label: path.trim_start_matches('/').to_string(),
        url: server.url(path),
        sha256: sha256_hex(body),
        size: Some(body.len() as u64),
        gone_hint: None,
    }
}

fn blob_count(root: &Path) -> usize {
    let base = root.join("blobs/sha256");
    fs::read_dir(&base)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| fs::read_dir(e.path()).map(|r| r.count()).unwrap_or(0))
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn hash_mismatch_names_url_expected_and_actual() {
    let server = FixtureServer::start();
    let body = content(100_000, 1);
    server.serve("/f.bin", body.clone(), Behavior::Normal);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut wrong = item(&server, "/f.bin", &body);
    wrong.sha256 = sha256_hex(b"something else");
    let err = format!(
        "{:#}",
        fetcher(&store).fetch_all(&[wrong.clone()]).unwrap_err()
    );
    assert!(err.contains(&wrong.url), "{err}");
    assert!(err.contains(&format!("expected {}", wrong.sha256)), "{err}");
    assert!(err.contains(&format!("got {}", sha256_hex(&body))), "{err}");
    assert_eq!(blob_count(dir.path()), 0);
    assert_eq!(
        server.hits("/f.bin"),
        1,
        "a full download with the wrong hash is not retried"
    );

    // A server sending wrong bytes of the right length is caught the same way.
    server.serve("/bad.bin", body.clone(), Behavior::Corrupt);
    let err = format!(
        "{:#}",
        fetcher(&store)
            .fetch_all(&[item(&server, "/bad.bin", &body)])
            .unwrap_err()
    );
    assert!(
        err.contains("sha256 mismatch") && err.contains(&sha256_hex(&body)),
        "{err}"
    );
    assert_eq!(blob_count(dir.path()), 0);
    assert!(!store.has(&sha256_hex(&body)).unwrap());
}

#[test]
fn size_mismatch_is_an_error() {
    let server = FixtureServer::start();
    let body = content(5000, 2);
    server.serve("/s.bin", body.clone(), Behavior::Normal);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut it = item(&server, "/s.bin", &body);
    it.size = Some(4000);
    let err = format!(
        "{:#}",
        fetcher(&store)
            .fetch_all(std::slice::from_ref(&it))
            .unwrap_err()
    );
    assert!(
        err.contains(&it.url)
            && err.contains("size mismatch")
            && err.contains("4000")
            && err.contains("5000"),
        "{err}"
    );
}

#[test]
fn cut_download_resumes_with_range_and_verifies() {
    let server = FixtureServer::start();
    let body = content(3 << 20, 3);
    server.serve("/big.bin", body.clone(), Behavior::CutOnceAfter(1 << 20));
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let it = item(&server, "/big.bin", &body);
    let summary = fetcher(&store)
        .fetch_all(std::slice::from_ref(&it))
        .unwrap();
    assert_eq!(summary.downloaded.len(), 1);
    assert_eq!(fs::read(store.blob_path(&it.sha256)).unwrap(), body);
    let reqs = server.requests();
    assert_eq!(reqs.len(), 2, "one cut request and one resumed request");
    assert_eq!(reqs[0].header("range"), None);
    assert_eq!(
        reqs[1].header("range"),
        Some(format!("bytes={}-", 1 << 20).as_str())
    );
}

#[test]
fn connection_cut_every_time_still_completes_through_resumes() {
    let server = FixtureServer::start();
    let body = content(400_000, 4);
    server.serve("/c.bin", body.clone(), Behavior::CutEveryAfter(100_000));
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let it = item(&server, "/c.bin", &body);
    fetcher(&store)
        .fetch_all(std::slice::from_ref(&it))
        .unwrap();
    assert_eq!(store.read(&it.sha256).unwrap(), body);
    assert_eq!(server.hits("/c.bin"), 4);
}

#[test]
fn retries_are_bounded() {
    let server = FixtureServer::start();
    let body = content(1000, 5);
    server.serve("/down.bin", body.clone(), Behavior::Status(503));
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut f = fetcher(&store);
    f.retries = 2;
    let err = format!(
        "{:#}",
        f.fetch_all(&[item(&server, "/down.bin", &body)])
            .unwrap_err()
    );
    assert!(
        err.contains("HTTP 503") && err.contains("giving up after 3 attempts"),
        "{err}"
    );
    assert_eq!(server.hits("/down.bin"), 3);
}

#[test]
fn server_ignoring_range_still_ends_with_the_right_file() {
    let server = FixtureServer::start();
    let body = content(1 << 20, 6);
    server.serve("/ign.bin", body.clone(), Behavior::IgnoreRange);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let it = item(&server, "/ign.bin", &body);
    // A partial download left by an earlier run, with bytes that do not even match: appending
    // a full 200 body to it would be wrong in two ways.
    fs::write(
        store.tmp_dir().join(format!("{}.part", it.sha256)),
        vec![0xAA; 300_000],
    )
    .unwrap();
    fetcher(&store)
        .fetch_all(std::slice::from_ref(&it))
        .unwrap();
    assert_eq!(fs::read(store.blob_path(&it.sha256)).unwrap(), body);
    let reqs = server.requests();
    assert_eq!(
        reqs[0].header("range"),
        Some("bytes=300000-"),
        "the client did try to resume"
    );
}

#[test]
fn killed_process_leaves_no_store_entry_and_the_next_run_resumes() {
    let server = FixtureServer::start();
    let body = content(4 << 20, 7);
    server.serve(
        "/slow.bin",
        body.clone(),
        Behavior::Slow {
            bytes_per_sec: 1 << 20,
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let lock_path = dir.path().join("test.lock");
    let lock = Lock {
        version: 1,
        sets: vec![],
        inputs: vec![LockedInput {
            recipe: "t".into(),
            set: "slow".into(),
            arch: "amd64".into(),
            pin: Pin {
                name: "slow".into(),
                url: server.url("/slow.bin"),
                size: body.len() as u64,
                sha256: sha256_hex(&body),
                deb: None,
            },
        }],
    };
    lock.save(&lock_path).unwrap();
    let xtask = env!("CARGO_BIN_EXE_xtask");
    let mut child = Command::new(xtask)
        .args(["fetch", "--lock"])
        .arg(&lock_path)
        .env("PXELAB_CACHE", &cache)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let part = cache
        .join("tmp")
        .join(format!("{}.part", sha256_hex(&body)));
    let deadline = Instant::now() + Duration::from_secs(20);
    while fs::metadata(&part).map(|m| m.len()).unwrap_or(0) < (1 << 20) {
        assert!(Instant::now() < deadline, "the download never got going");
        std::thread::sleep(Duration::from_millis(50));
    }
    // SIGKILL: no destructor, no cleanup, exactly like a crash or the OOM killer.
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(
        blob_count(&cache),
        0,
        "a killed download must not leave a store entry"
    );
    let kept = fs::metadata(&part).unwrap().len();
    assert!(kept > 0 && kept < body.len() as u64);

    server.serve("/slow.bin", body.clone(), Behavior::Normal);
    let out = Command::new(xtask)
        .args(["fetch", "--lock"])
        .arg(&lock_path)
        .env("PXELAB_CACHE", &cache)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "second run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let store = Store::open(&cache).unwrap();
    assert_eq!(fs::read(store.blob_path(&sha256_hex(&body))).unwrap(), body);
    let last = server.requests().pop().unwrap();
    let range = last
        .header("range")
        .expect("the second run resumed with Range");
    let from: u64 = range
        .trim_start_matches("bytes=")
        .trim_end_matches('-')
        .parse()
        .unwrap();
    assert!(
        from > 0 && from <= kept,
        "resumed from {from}, part had {kept}"
    );
    assert!(!part.exists(), "the part file became the blob");
}

#[test]
fn corrupted_store_blob_is_detected_and_fetched_again() {
    let server = FixtureServer::start();
    let body = content(200_000, 8);
    server.serve("/c.bin", body.clone(), Behavior::Normal);
    let dir = tempfile::tempdir().unwrap();
    let it = item(&server, "/c.bin", &body);
    {
        let store = Store::open(dir.path()).unwrap();
        fetcher(&store)
            .fetch_all(std::slice::from_ref(&it))
            .unwrap();
        // Bit rot in place: same inode, same size.
        let p = store.blob_path(&it.sha256);
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        let mut bytes = fs::read(&p).unwrap();
        bytes[1234] ^= 0x01;
        fs::write(&p, bytes).unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    let summary = fetcher(&store)
        .fetch_all(std::slice::from_ref(&it))
        .unwrap();
    assert_eq!(
        summary.downloaded.len(),
        1,
        "the corrupt blob must be fetched again"
    );
    assert_eq!(server.hits("/c.bin"), 2);
    assert_eq!(store.check(&it.sha256).unwrap(), BlobState::Good);
    assert_eq!(fs::read(store.blob_path(&it.sha256)).unwrap(), body);
}

#[test]
fn concurrent_fetches_of_one_input_download_once() {
    let server = FixtureServer::start();
    let body = content(2 << 20, 9);
    server.serve(
        "/shared.bin",
        body.clone(),
        Behavior::Slow {
            bytes_per_sec: 4 << 20,
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let it = item(&server, "/shared.bin", &body);
    // Two stores opened separately behave like two processes: separate lock file handles. The
    // barrier makes both start while the (half-second) download is under way.
    let barrier = std::sync::Barrier::new(2);
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    let store = Store::open(dir.path()).unwrap();
                    barrier.wait();
                    let r = fetcher(&store)
                        .fetch_all(std::slice::from_ref(&it))
                        .map(|_| ());
                    r.map(|_| fs::read(store.blob_path(&it.sha256)).unwrap())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in results {
        assert_eq!(r.unwrap(), body);
    }
    assert_eq!(server.hits("/shared.bin"), 1);
}

#[test]
fn warm_fetch_of_many_inputs_is_fast_and_downloads_nothing() {
    let server = FixtureServer::start();
    let items: Vec<Fetch> = (0..40u8)
        .map(|i| {
            let body = content(50_000 + i as usize, i);
            let path = format!("/many/{i}.bin");
            server.serve(&path, body.clone(), Behavior::Normal);
            item(&server, &path, &body)
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(
        fetcher(&store).fetch_all(&items).unwrap().downloaded.len(),
        40
    );
    let hits = server.requests().len();
    let store = Store::open(dir.path()).unwrap();
    let t = Instant::now();
    let s = fetcher(&store).fetch_all(&items).unwrap();
    assert!(s.downloaded.is_empty() && s.present == 40);
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "warm check took {:?}",
        t.elapsed()
    );
    assert_eq!(
        server.requests().len(),
        hits,
        "a warm run makes no requests"
    );
}

#[test]
fn offline_lists_exactly_what_is_missing() {
    let server = FixtureServer::start();
    let a = content(1000, 10);
    let b = content(1000, 11);
    server.serve("/a", a.clone(), Behavior::Normal);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let (ia, ib) = (item(&server, "/a", &a), item(&server, "/b", &b));
    fetcher(&store)
        .fetch_all(std::slice::from_ref(&ia))
        .unwrap();
    let f = fetcher(&store);
    let items = [ia.clone(), ib.clone()];
    let missing = f.missing(&items).unwrap();
    assert_eq!(missing.len(), 1);
    let report = xtask::fetch::offline_report(&missing);
    assert!(
        report.contains(&ib.sha256) && report.contains("b") && !report.contains(&ia.sha256),
        "{report}"
    );
}

#[test]
fn vanished_debian_pin_says_which_package_and_how_to_refresh() {
    let server = FixtureServer::start();
    let input = LockedInput {
        recipe: "initrd".into(),
        set: "tools".into(),
        arch: "amd64".into(),
        pin: Pin {
            name: "busybox-static".into(),
            url: server.url("/debian/pool/main/b/busybox/busybox-static_1.35.0-4+b3_amd64.deb"),
            size: 10,
            sha256: sha256_hex(b"0123456789"),
            deb: Some(DebFacts {
                version: "1:1.35.0-4+b3".into(),
                arch: "amd64".into(),
                suite: "bookworm".into(),
                filename: "pool/main/b/busybox/busybox-static_1.35.0-4+b3_amd64.deb".into(),
                priority: None,
            }),
        },
    };
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let err = format!(
        "{:#}",
        fetcher(&store).fetch_all(&[input.to_fetch()]).unwrap_err()
    );
    assert!(
        err.contains("404")
            && err.contains("busybox-static 1:1.35.0-4+b3")
            && err.contains("cargo xtask lock"),
        "{err}"
    );
    assert_eq!(
        server.hits("/debian/pool/main/b/busybox/busybox-static_1.35.0-4+b3_amd64.deb"),
        1,
        "404 is not retried"
    );
}

#[test]
fn action_cache_hits_misses_and_rebuilds_corrupt_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let input = store.insert_bytes(b"busybox bytes").unwrap();
    let runs = std::cell::Cell::new(0);
    let build = |out: &Path| {
        runs.set(runs.get() + 1);
        fs::create_dir_all(out.join("sub"))?;
        fs::write(out.join("initrd.img"), b"an initrd")?;
        fs::write(out.join("sub/notes.txt"), b"notes")?;
        Ok(())
    };
    let step = || {
        store
            .step("initrd", 1)
            .input("busybox", &input)
            .param("compress", "zstd")
    };
    let first = step().run(build).unwrap();
    assert!(!first.cached);
    assert_eq!(
        first
            .files
            .iter()
            .map(|f| f.name.as_str())
            .collect::<Vec<_>>(),
        ["initrd.img", "sub/notes.txt"]
    );
    let second = step().run(build).unwrap();
    assert!(second.cached);
    assert_eq!(runs.get(), 1, "a hit does not run the step");
    assert_eq!(
        second.get("initrd.img").unwrap().digest,
        first.get("initrd.img").unwrap().digest
    );

    // Another parameter is another key.
    let other = store
        .step("initrd", 1)
        .input("busybox", &input)
        .param("compress", "xz")
        .run(build)
        .unwrap();
    assert!(!other.cached);
    assert_ne!(other.key, first.key);
    // So is a new step version.
    assert!(
        !store
            .step("initrd", 2)
            .input("busybox", &input)
            .param("compress", "zstd")
            .run(build)
            .unwrap()
            .cached
    );
    assert_eq!(runs.get(), 3);

    // A corrupted output is detected on the next lookup and the step runs again.
    let out = first.get("initrd.img").unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&out.path, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(&out.path, b"an inXrd").unwrap();
    let store = Store::open(dir.path()).unwrap();
    let again = store
        .step("initrd", 1)
        .input("busybox", &input)
        .param("compress", "zstd")
        .run(build)
        .unwrap();
    assert!(!again.cached);
    assert_eq!(runs.get(), 4);
    assert_eq!(
        fs::read(&again.get("initrd.img").unwrap().path).unwrap(),
        b"an initrd"
    );
    let dest = dir.path().join("out");
    again.materialize_all(&store, &dest).unwrap();
    assert_eq!(fs::read(dest.join("sub/notes.txt")).unwrap(), b"notes");

    // A failing step leaves no record: the next run tries again.
    let failing = store
        .step("broken", 1)
        .run(|_| anyhow::bail!("compiler exploded"));
    assert!(format!("{:#}", failing.unwrap_err()).contains("compiler exploded"));
    assert!(!store.step("broken", 1).run(build).unwrap().cached);
}

#[test]
fn gc_keeps_locked_and_reachable_outputs_and_drops_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let pinned = store.insert_bytes(b"pinned input").unwrap();
    let stale = store.insert_bytes(b"input of an old lock").unwrap();
    let built = store
        .step("s", 1)
        .input("in", &pinned)
        .run(|o| Ok(fs::write(o.join("out"), b"built")?))
        .unwrap();
    let chained = store
        .step("t", 1)
        .input("s-out", &built.files[0].digest)
        .run(|o| Ok(fs::write(o.join("out2"), b"from built")?))
        .unwrap();
    let old = store
        .step("s", 1)
        .input("in", &stale)
        .run(|o| Ok(fs::write(o.join("out"), b"old")?))
        .unwrap();
    drop(store);
    let lock = Lock {
        version: 1,
        sets: vec![],
        inputs: vec![LockedInput {
            recipe: "r".into(),
            set: "s".into(),
            arch: "amd64".into(),
            pin: Pin {
                name: "pinned".into(),
                url: "http://127.0.0.1:9/pinned".into(),
                size: 12,
                sha256: pinned.clone(),
                deb: None,
            },
        }],
    };
    let nothing = dir.path().join("nothing");
    let roots = xtask::cache_cmd::roots(&lock, &nothing, &nothing).unwrap();
    let store = Store::open_exclusive(dir.path()).unwrap();
    let report = xtask::store::gc(&store, &roots, false).unwrap();
    assert_eq!((report.kept_blobs, report.removed_blobs), (3, 2));
    assert_eq!((report.kept_actions, report.removed_actions), (2, 1));
    assert_eq!(
        report.freed_bytes,
        (b"input of an old lock".len() + b"old".len()) as u64
    );
    assert!(store.has(&pinned).unwrap() && store.has(&chained.files[0].digest).unwrap());
    assert!(!store.has(&stale).unwrap() && !store.has(&old.files[0].digest).unwrap());
}

/// A build chain keyed on a digest that is not a blob (as a static binary is keyed on a hash of
/// its source files): gc can keep it only by walking back from what is published.
fn build_chain(store: &Store, sources: &str) -> (bool, bool, String) {
    let bin = store
        .step("bin", 1)
        .input("sources", sources)
        .run(|o| Ok(fs::write(o.join("bin"), b"binary")?))
        .unwrap();
    let image = store
        .step("image", 1)
        .input("bin", &bin.files[0].digest)
        .run(|o| Ok(fs::write(o.join("rootfs.tar.zst"), b"image")?))
        .unwrap();
    (bin.cached, image.cached, image.files[0].digest.clone())
}

#[test]
fn gc_keeps_published_lab_artifacts_and_the_records_that_built_them() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let home = dir.path().join("home");
    let sources = sha256_hex(b"source files");
    let store = Store::open(&cache).unwrap();
    let (_, _, image) = build_chain(&store, &sources);
    let unused = store
        .step("image", 1)
        .input("bin", &sha256_hex(b"an older binary"))
        .run(|o| Ok(fs::write(o.join("rootfs.tar.zst"), b"an older image")?))
        .unwrap();
    let disk = store
        .step("disk", 1)
        .input("rootfs.tar.zst", &image)
        .run(|o| Ok(fs::write(o.join("rootfs.img"), b"an ext4 image")?))
        .unwrap();
    let disk = disk.files[0].digest.clone();
    drop(store);
    // What `distro pull` publishes into the lab home.
    let published = home.join("images/d/x86_64");
    fs::create_dir_all(&published).unwrap();
    let manifest = pxelab_contract::DistroManifest {
        rootfs: pxelab_contract::ManifestFile {
            file: "rootfs.tar.zst".into(),
            sha256: image.clone(),
            size: 5,
        },
        kernel_version: "6.1.0-1-amd64".into(),
        kernel: None,
        modules: None,
        disk_image: Some(pxelab_contract::ManifestFile {
            file: "rootfs.img".into(),
            sha256: disk.clone(),
            size: 13,
        }),
        disk_image_zst: None,
        initramfs: None,
    };
    fs::write(
        published.join("manifest.json"),
        serde_json::to_vec(&manifest).unwrap(),
    )
    .unwrap();
    let lock = dir.path().join("empty.lock");
    Lock {
        version: 1,
        ..Lock::default()
    }
    .save(&lock)
    .unwrap();

    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["cache", "gc", "--lock"])
        .arg(&lock)
        .env("PXELAB_CACHE", &cache)
        .env("PXELAB_HOME", &home)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");

    let store = Store::open(&cache).unwrap();
    assert_eq!(
        build_chain(&store, &sources),
        (true, true, image),
        "after gc, rebuilding what the lab publishes is a cache hit: {stderr}"
    );
    assert!(
        !store.has(&unused.files[0].digest).unwrap(),
        "an output nothing publishes is freed: {stderr}"
    );
    assert!(
        store.has(&disk).unwrap(),
        "the published disk image is kept: {stderr}"
    );
    assert!(stderr.contains("1 records"), "{stderr}");
}

#[test]
fn gc_keeps_what_build_stack_copied_to_the_checkout() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let sources = sha256_hex(b"source files");
    let store = Store::open(&cache).unwrap();
    let (_, _, image) = build_chain(&store, &sources);
    drop(store);
    // `build-stack`'s manifest in a checkout: every output with its digest.
    let workspace = dir.path().join("checkout");
    let out = workspace.join("build/stack/x86_64");
    fs::create_dir_all(&out).unwrap();
    let manifest = serde_json::json!({
        "arch": "x86_64",
        "outputs": [{"name": "rootfs.tar.zst", "size": 5, "sha256": image}],
    });
    fs::write(out.join("manifest.json"), manifest.to_string()).unwrap();
    let lock = Lock {
        version: 1,
        ..Lock::default()
    };
    let roots =
        xtask::cache_cmd::roots(&lock, &workspace, &dir.path().join("no-lab/images")).unwrap();
    assert!(roots.published.contains(&image));
    let store = Store::open_exclusive(&cache).unwrap();
    let report = xtask::store::gc(&store, &roots, false).unwrap();
    assert_eq!((report.kept_actions, report.removed_actions), (2, 0));
    assert_eq!(build_chain(&store, &sources), (true, true, image));

    // Without the manifest the chain is unreferenced, and gc frees it.
    fs::remove_file(out.join("manifest.json")).unwrap();
    let roots =
        xtask::cache_cmd::roots(&lock, &workspace, &dir.path().join("no-lab/images")).unwrap();
    let report = xtask::store::gc(&store, &roots, false).unwrap();
    assert_eq!((report.kept_actions, report.removed_actions), (0, 2));
}
