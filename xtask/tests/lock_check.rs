//! `cargo xtask lock --check` against recipes and locks written by the test (no network).

use std::fs;
use std::path::Path;

use xtask::lock::{self, Lock};
use xtask::pin::{DebFacts, Pin};
use xtask::recipe;

const URL_RECIPE: &str = r#"
description = "firmware blobs"
[[url]]
name = "fw"
arch.amd64 = { url = "http://127.0.0.1:9/fw-amd64.bin", sha256 = "1111111111111111111111111111111111111111111111111111111111111111", size = 10 }
arch.arm64 = { url = "http://127.0.0.1:9/fw-arm64.bin", sha256 = "2222222222222222222222222222222222222222222222222222222222222222", size = 20 }
"#;

fn check(dir: &Path) -> anyhow::Result<()> {
    xtask::lock_cmd::run(xtask::lock_cmd::Args {
        check: true,
        recipes: Some(dir.to_path_buf()),
        lock: None,
    })
}

/// A recipes dir with one URL recipe and a lock resolved from it (URL inputs with a size need
/// no network to resolve).
fn setup() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("fw.toml"), URL_RECIPE).unwrap();
    xtask::lock_cmd::run(xtask::lock_cmd::Args {
        check: false,
        recipes: Some(dir.path().to_path_buf()),
        lock: None,
    })
    .unwrap();
    dir
}

#[test]
fn lock_written_from_recipes_passes_check() {
    let dir = setup();
    check(dir.path()).unwrap();
    let lock = Lock::load(&dir.path().join("pxelab.lock")).unwrap();
    assert_eq!(lock.inputs.len(), 2);
    assert_eq!(lock.get("fw", "arm64", "fw").unwrap().pin.size, 20);
    // Writing is deterministic: same recipes, same bytes.
    let before = fs::read(dir.path().join("pxelab.lock")).unwrap();
    xtask::lock_cmd::run(xtask::lock_cmd::Args {
        check: false,
        recipes: Some(dir.path().to_path_buf()),
        lock: None,
    })
    .unwrap();
    assert_eq!(fs::read(dir.path().join("pxelab.lock")).unwrap(), before);
}

#[test]
fn check_fails_when_a_recipe_names_something_the_lock_lacks() {
    let dir = setup();
    fs::write(
        dir.path().join("more.toml"),
        r#"
description = "more"
[[url]]
name = "extra"
arch.amd64 = { url = "http://127.0.0.1:9/extra", sha256 = "3333333333333333333333333333333333333333333333333333333333333333", size = 5 }
"#,
    )
    .unwrap();
    let err = format!("{:#}", check(dir.path()).unwrap_err());
    assert!(
        err.contains("more/extra/amd64: in the recipes but not in the lock"),
        "{err}"
    );
    assert!(err.contains("cargo xtask lock"), "{err}");
}

#[test]
fn check_fails_on_an_edited_recipe_a_new_arch_or_an_extra_lock_entry() {
    let dir = setup();
    fs::write(
        dir.path().join("fw.toml"),
        URL_RECIPE.replace("1111", "4444"),
    )
    .unwrap();
    let err = format!("{:#}", check(dir.path()).unwrap_err());
    assert!(err.contains("fw/fw/amd64: the recipe changed"), "{err}");

    let dir = setup();
    let mut lock = Lock::load(&dir.path().join("pxelab.lock")).unwrap();
    let mut extra = lock.inputs[0].clone();
    extra.set = "gone".into();
    lock.inputs.push(extra);
    lock.save(&dir.path().join("pxelab.lock")).unwrap();
    let err = format!("{:#}", check(dir.path()).unwrap_err());
    assert!(
        err.contains("fw/gone/amd64: in the lock but no recipe names it"),
        "{err}"
    );

    let dir = setup();
    let mut lock = Lock::load(&dir.path().join("pxelab.lock")).unwrap();
    lock.inputs.retain(|i| i.arch != "arm64");
    lock.save(&dir.path().join("pxelab.lock")).unwrap();
    let err = format!("{:#}", check(dir.path()).unwrap_err());
    assert!(err.contains("fw/fw/arm64: the lock pins no files"), "{err}");
}

#[test]
fn debian_set_check_needs_every_named_package_pinned() {
    let dir = tempfile::tempdir().unwrap();
    let text = r#"
description = "tools"
[[debian]]
name = "tools"
suites = ["bookworm"]
arches = ["amd64"]
packages = ["busybox-static", "kmod"]
"#;
    fs::write(dir.path().join("t.toml"), text).unwrap();
    let reqs = recipe::load_dir(dir.path()).unwrap();
    let pin = |name: &str| lock::LockedInput {
        recipe: "t".into(),
        set: "tools".into(),
        arch: "amd64".into(),
        pin: Pin {
            name: name.into(),
            url: format!("http://deb.debian.org/debian/pool/main/x/{name}.deb"),
            size: 1,
            sha256: "5555555555555555555555555555555555555555555555555555555555555555".into(),
            deb: Some(DebFacts {
                version: "1.0".into(),
                arch: "amd64".into(),
                suite: "bookworm".into(),
                filename: format!("pool/main/x/{name}.deb"),
                priority: None,
            }),
        },
    };
    let lock = Lock {
        version: 1,
        sets: vec![lock::LockedSet {
            recipe: "t".into(),
            set: "tools".into(),
            arch: "amd64".into(),
            fingerprint: reqs[0].fingerprint(),
        }],
        inputs: vec![pin("busybox-static"), pin("libc6")],
    };
    assert_eq!(
        lock.check(&reqs),
        vec!["t/tools/amd64: package kmod is not pinned".to_string()]
    );
}

#[test]
fn the_projects_lock_matches_its_recipes() {
    check(&xtask::util::project_root().join("recipes")).unwrap();
}

#[test]
fn url_input_without_size_is_sized_with_head_when_locking() {
    let server = pxelab_tests::FixtureServer::start();
    let body = vec![7u8; 12345];
    server.serve("/fw.bin", body.clone(), pxelab_tests::Behavior::Normal);
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "description = \"fw\"\n[[url]]\nname = \"fw\"\narch.amd64 = {{ url = \"{}\", sha256 = \"{}\" }}\n",
        server.url("/fw.bin"),
        pxelab_tests::sha256_hex(&body)
    );
    fs::write(dir.path().join("fw.toml"), text).unwrap();
    xtask::lock_cmd::run(xtask::lock_cmd::Args {
        check: false,
        recipes: Some(dir.path().to_path_buf()),
        lock: None,
    })
    .unwrap();
    let lock = Lock::load(&dir.path().join("pxelab.lock")).unwrap();
    assert_eq!(lock.get("fw", "amd64", "fw").unwrap().pin.size, 12345);
    let reqs = server.requests();
    assert_eq!(
        (reqs.len(), reqs[0].method.as_str()),
        (1, "HEAD"),
        "locking a URL input downloads nothing"
    );
}

#[test]
fn debian_mirror_override_redirects_pinned_debs() {
    // The only test in this binary that reads PXELAB_DEBIAN_MIRROR, so setting it is race-free.
    let server = pxelab_tests::FixtureServer::start();
    let body = b"!<arch>\nnot really a deb".to_vec();
    let filename = "pool/main/h/hello/hello_2.10-3_amd64.deb";
    server.serve(
        &format!("/snapshot/debian/{filename}"),
        body.clone(),
        pxelab_tests::Behavior::Normal,
    );
    let input = lock::LockedInput {
        recipe: "r".into(),
        set: "s".into(),
        arch: "amd64".into(),
        pin: Pin {
            name: "hello".into(),
            url: format!("http://deb.debian.org/debian/{filename}"),
            size: body.len() as u64,
            sha256: pxelab_tests::sha256_hex(&body),
            deb: Some(DebFacts {
                version: "2.10-3".into(),
                arch: "amd64".into(),
                suite: "bookworm".into(),
                filename: filename.into(),
                priority: None,
            }),
        },
    };
    std::env::set_var("PXELAB_DEBIAN_MIRROR", server.url("/snapshot/debian/"));
    let fetch = input.to_fetch();
    // Security updates are another archive: the override (a mirror of the main one) keeps off.
    let security =
        "http://deb.debian.org/debian-security/pool/updates/main/a/apt/apt_2.6.2_amd64.deb";
    let kept = xtask::pin::Mirror::rebase(xtask::pin::Mirror::debian_from_env().as_ref(), security);
    std::env::remove_var("PXELAB_DEBIAN_MIRROR");
    assert_eq!(kept, security);
    assert_eq!(
        fetch.url,
        server.url(&format!("/snapshot/debian/{filename}"))
    );
    let dir = tempfile::tempdir().unwrap();
    let store = xtask::store::Store::open(dir.path()).unwrap();
    let paths = {
        let f = xtask::fetch::Fetcher::new(&store, xtask::ui::Ui::plain()).unwrap();
        f.fetch_all(&[fetch]).unwrap();
        store.blob_path(&input.pin.sha256)
    };
    assert_eq!(fs::read(paths).unwrap(), body);
}
