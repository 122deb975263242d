//! `cargo xtask build-stack` end to end, on the real pinned inputs: reproducibility from empty
//! stores and a cold compile elsewhere, the no-op rerun, the installer-only rebuild, the
//! initrd's content and budget, the image under skopeo/umoci/podman, and the initrd booting as
//! PID 1 under QEMU.
//!
//! Every test here is `sys_`: they need the network (Debian's mirror), root, and host tools.
//! The first build is shared by the tests of this file (it takes minutes); each test still
//! checks one thing a user would notice.

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use pxelab_tests::cmd::{checked, require, require_root};
use pxelab_tests::deploy::{readme_command, Placement, TargetNet};
use pxelab_tests::NetNs;
use xtask::stack::{self, archive, INITRD_BUDGET};

/// Fail loudly when a host tool is missing.
fn need_root() {
    require_root("the build-stack sys tests (network namespaces, chroot, podman, QEMU)");
}

/// `cargo xtask build-stack` of the workspace at `root` into `out`, with its own store.
fn build_stack(root: &Path, store: &Path, out: &Path) -> (String, Duration) {
    build_stack_with(root, store, out, |_| {})
}

/// [`build_stack`], with the environment changed by `env`.
fn build_stack_with(
    root: &Path,
    store: &Path,
    out: &Path,
    env: impl FnOnce(&mut Command),
) -> (String, Duration) {
    let t = Instant::now();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_xtask"));
    cmd.args(["build-stack", "--out"])
        .arg(out)
        .arg("--workspace-root")
        .arg(root)
        .env("PXELAB_CACHE", store)
        .env_remove("SOURCE_DATE_EPOCH");
    env(&mut cmd);
    let o = checked(&mut cmd);
    (String::from_utf8_lossy(&o.stdout).into_owned(), t.elapsed())
}

/// Scratch space for this file's tests, at a fixed place under the cargo target directory: it
/// is wiped piece by piece at the start of a run (nothing accumulates), and the static builds
/// of the snapshots below stay warm from one run to the next.
fn scratch_base() -> std::path::PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| xtask::util::project_root().join("target"));
    let base = target.join("stack-test");
    std::fs::create_dir_all(&base).unwrap();
    base
}

/// An empty directory `name` in the scratch space.
fn scratch(name: &str) -> std::path::PathBuf {
    let dir = scratch_base().join(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).unwrap_or_else(|e| panic!("clearing {}: {e}", dir.display()));
    }
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A copy of the workspace sources in `dest`: the builds compare like with like even while
/// someone edits the checkout.
fn snapshot(from: &Path, dest: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("target") || [".git", "build", "bench"].contains(&name.as_str()) {
            continue;
        }
        checked(Command::new("cp").arg("-a").arg(entry.path()).arg(dest));
    }
}

struct First {
    root: std::path::PathBuf,
    store: std::path::PathBuf,
    out: std::path::PathBuf,
    cold: Duration,
    /// Held for the life of the test process: two runs of this file at once would wipe each
    /// other's scratch space.
    _lock: std::fs::File,
}

/// The first build from an empty store, shared by every test in this file.
fn first() -> &'static First {
    static FIRST: OnceLock<First> = OnceLock::new();
    FIRST.get_or_init(|| {
        let lock = std::fs::File::create(scratch_base().join("run.lock")).unwrap();
        lock.lock().unwrap();
        let root = scratch("workspace");
        snapshot(&xtask::util::project_root(), &root);
        let (store, out) = (scratch("store-a"), scratch("out-a"));
        let (stdout, cold) = build_stack(&root, &store, &out);
        eprintln!(
            "build-stack from an empty store: {:.1} s\n{stdout}",
            cold.as_secs_f64()
        );
        First {
            root,
            store,
            out,
            cold,
            _lock: lock,
        }
    })
}

fn manifest(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
}

fn sha256_file(p: &Path) -> String {
    pxelab_tests::sha256_hex(
        &std::fs::read(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display())),
    )
}

#[test]
fn sys_build_stack_is_reproducible_and_a_noop_rerun_does_nothing() {
    let a = first();
    let m = manifest(a.out.as_path());
    let outputs = m["outputs"].as_array().unwrap();
    for o in outputs {
        let name = o["name"].as_str().unwrap();
        assert_eq!(
            sha256_file(&a.out.as_path().join(name)),
            o["sha256"].as_str().unwrap(),
            "{name} matches the manifest"
        );
    }
    for name in [
        "pxelab-stack",
        "pxelab-installer",
        "initrd-x86_64.img",
        "pxeboot-stack.oci.tar",
        "pxeboot-stack.docker.tar",
        "tftp/boot.ipxe",
        "tftp/ipxe.efi",
        "tftp/snponly.efi",
        "tftp/undionly.kpxe",
        "tftp/ipxe-arm64.efi",
    ] {
        assert!(
            outputs.iter().any(|o| o["name"] == name),
            "{name} is in the manifest"
        );
    }

    // A second build from another empty store, of a copy of the sources at another path, with
    // the static binaries compiled from scratch in a cargo target directory of their own (the
    // first build's is warm from earlier runs, and cargo would hand its binaries back
    // unchanged), gives the same bytes: nothing of where the tree or the build lives gets in.
    let root_b = scratch("workspace-b");
    snapshot(&a.root, &root_b);
    let (store_b, out_b, target_b) = (scratch("store-b"), scratch("out-b"), scratch("target-b"));
    let (_, second) = build_stack_with(&root_b, &store_b, &out_b, |cmd| {
        cmd.env("CARGO_TARGET_DIR", &target_b);
    });
    eprintln!(
        "second build, static binaries compiled from scratch: {:.1} s",
        second.as_secs_f64()
    );
    let compiled: Vec<_> = std::fs::read_dir(&target_b)
        .unwrap()
        .flatten()
        .map(|e| e.path().join("x86_64-unknown-linux-gnu/release"))
        .filter(|release| {
            ["pxelab-stack", "pxelab-installer"]
                .iter()
                .all(|bin| release.join(bin).is_file())
        })
        .collect();
    assert_eq!(
        compiled.len(),
        1,
        "the second build compiled both binaries in {}",
        target_b.display()
    );
    assert_eq!(
        std::fs::read_to_string(a.out.as_path().join("manifest.json")).unwrap(),
        std::fs::read_to_string(out_b.as_path().join("manifest.json")).unwrap(),
        "manifest.json (every output's sha256 and the image digest) differs between two clean builds"
    );
    for o in outputs {
        let name = o["name"].as_str().unwrap();
        assert_eq!(
            sha256_file(&out_b.as_path().join(name)),
            o["sha256"].as_str().unwrap(),
            "{name} is reproducible"
        );
    }

    // Nothing changed: nothing is built or copied.
    let (stdout, noop) = build_stack(&a.root, &a.store, &a.out);
    assert!(
        stdout.contains("nothing to do"),
        "the no-op rerun must say so:\n{stdout}"
    );
    assert!(
        !stdout.contains(" built "),
        "the no-op rerun built something:\n{stdout}"
    );
    eprintln!(
        "cold build: {:.1} s, no-op rerun: {:.3} s",
        a.cold.as_secs_f64(),
        noop.as_secs_f64()
    );
    assert!(noop < Duration::from_secs(3), "no-op rerun took {noop:?}");
}

#[test]
fn sys_changing_only_the_installer_rebuilds_installer_initrd_and_image() {
    need_root();
    let a = first();
    // Another copy of the first build's snapshot, in which one installer file changes.
    let copy = scratch("workspace-incremental");
    snapshot(&a.root, &copy);
    let store = xtask::store::Store::open(a.store.as_path()).unwrap();
    let build = |out: &Path| {
        let args = stack::Args {
            arch: pxelab_contract::Arch::X86_64,
            compression: stack::Compression::Zstd,
            out: Some(out.to_path_buf()),
            offline: true,
            root: Some(copy.clone()),
        };
        stack::build(&store, &args, &xtask::ui::Ui::plain()).unwrap()
    };
    // Baseline: the copy as it is (normally all cached from the first build).
    let out = scratch("out-incremental");
    let before = build(&out);
    // A change that must reach the binary: a string the optimizer cannot drop.
    let main = copy.join("installer/src/main.rs");
    let text = std::fs::read_to_string(&main).unwrap();
    let at = text
        .find("fn main(")
        .and_then(|i| text[i..].find('{').map(|j| i + j + 1))
        .expect("installer/src/main.rs has fn main");
    let text = format!(
        "{}\n    std::hint::black_box(\"build-stack incremental test\");{}",
        &text[..at],
        &text[at..]
    );
    std::fs::write(&main, text).unwrap();
    let after = build(&out);
    let built: Vec<&str> = after
        .artifacts
        .iter()
        .filter(|a| !a.cached)
        .map(|a| a.name.as_str())
        .collect();
    assert_eq!(
        built,
        [
            "pxelab-installer",
            "initrd-x86_64.img",
            "pxeboot-stack.oci.tar",
            "pxeboot-stack.docker.tar"
        ],
        "only the installer's chain may rebuild"
    );
    assert_ne!(before.image_digest, after.image_digest);
    assert!(
        after.copied,
        "the new outputs were copied to the output directory"
    );
}

fn initrd_listing() -> (Vec<archive::Listed>, u64) {
    let path = first().out.as_path().join("initrd-x86_64.img");
    let bytes = std::fs::read(&path).unwrap();
    (
        archive::list(&archive::decompress(&bytes).unwrap()).unwrap(),
        bytes.len() as u64,
    )
}

#[test]
fn sys_initrd_lists_the_expected_paths_and_fits_the_budget() {
    require("cpio", "cpio");
    let (list, size) = initrd_listing();
    assert!(
        size <= INITRD_BUDGET,
        "initrd is {size} bytes, over the {INITRD_BUDGET} budget"
    );
    let m = manifest(first().out.as_path());
    let epoch = m["source_date_epoch"].as_u64().unwrap() as u32;
    let get = |p: &str| {
        list.iter()
            .find(|l| l.path == p)
            .unwrap_or_else(|| panic!("{p} missing from the initrd"))
    };
    assert_eq!(get("/init").mode, 0o100755);
    assert_eq!(get("/bin/pxelab-installer").mode, 0o100755);
    assert_eq!(
        (get("/dev/console").mode, get("/dev/console").rdev),
        (0o020600, (5, 1))
    );
    assert_eq!(
        (get("/dev/null").mode, get("/dev/null").rdev),
        (0o020666, (1, 3))
    );
    // The loader every dynamic tool names, and the three filesystem tools.
    assert!(list
        .iter()
        .any(|l| l.path.ends_with("/ld-linux-x86-64.so.2") && l.mode & 0o170000 == 0o100000));
    for tool in ["mke2fs", "mkfs.fat", "sfdisk", "busybox"] {
        assert!(
            list.iter().any(|l| l.path.ends_with(&format!("/{tool}"))),
            "{tool} missing"
        );
    }
    assert!(
        !list.iter().any(|l| l.path.contains("/lib/modules/")),
        "no kernel modules in the installer initrd"
    );
    for l in &list {
        assert_eq!(
            (l.uid, l.gid, l.mtime),
            (0, 0, epoch),
            "{} has owner/mtime leaking from the host",
            l.path
        );
    }
    let paths: Vec<&str> = list.iter().map(|l| l.path.as_str()).collect();
    let mut sorted = paths.clone();
    sorted.sort();
    assert_eq!(paths, sorted, "entries are written sorted");

    // An independent reader (GNU cpio) agrees on the member list.
    let mut child = Command::new("cpio")
        .args(["-it", "--quiet"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let raw = archive::decompress(
        &std::fs::read(first().out.as_path().join("initrd-x86_64.img")).unwrap(),
    )
    .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(&raw));
    let mut text = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    writer.join().unwrap().unwrap();
    assert!(child.wait().unwrap().success());
    let gnu: Vec<String> = text.lines().map(|l| format!("/{l}")).collect();
    assert_eq!(gnu, paths);
}

/// Unpack the OCI archive into a layout directory (what umoci reads).
fn oci_layout(dir: &Path) {
    let f = std::fs::File::open(first().out.as_path().join("pxeboot-stack.oci.tar")).unwrap();
    tar::Archive::new(f).unpack(dir).unwrap();
}

#[test]
fn sys_image_passes_skopeo_and_umoci_and_its_dnsmasq_runs() {
    need_root();
    require("skopeo", "skopeo");
    require("umoci", "umoci");
    let out = first().out.as_path();
    let m = manifest(out);
    let digest = m["image_digest"].as_str().unwrap();
    let oci = checked(Command::new("skopeo").arg("inspect").arg(format!(
        "oci-archive:{}",
        out.join("pxeboot-stack.oci.tar").display()
    )));
    let oci: serde_json::Value = serde_json::from_slice(&oci.stdout).unwrap();
    assert_eq!(oci["Digest"], digest, "skopeo sees the digest we recorded");
    assert_eq!(oci["Architecture"], "amd64");
    assert_eq!(oci["Layers"].as_array().unwrap().len(), 3);
    let docker = checked(Command::new("skopeo").arg("inspect").arg(format!(
        "docker-archive:{}",
        out.join("pxeboot-stack.docker.tar").display()
    )));
    let docker: serde_json::Value = serde_json::from_slice(&docker.stdout).unwrap();
    assert_eq!(docker["Architecture"], "amd64");
    let cfg = checked(
        Command::new("skopeo")
            .arg("inspect")
            .arg("--config")
            .arg(format!(
                "oci-archive:{}",
                out.join("pxeboot-stack.oci.tar").display()
            )),
    );
    let cfg: serde_json::Value = serde_json::from_slice(&cfg.stdout).unwrap();
    assert_eq!(
        cfg["config"]["Entrypoint"],
        serde_json::json!(["/usr/bin/pxelab-stack"])
    );
    for port in ["67/udp", "69/udp", "80/tcp"] {
        assert!(
            cfg["config"]["ExposedPorts"].get(port).is_some(),
            "{port} not exposed"
        );
    }

    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    oci_layout(&layout);
    let bundle = work.path().join("bundle");
    checked(
        Command::new("umoci")
            .arg("unpack")
            .arg("--image")
            .arg(format!("{}:latest", layout.display()))
            .arg(&bundle),
    );
    let rootfs = bundle.join("rootfs");
    // What a container runtime provides and dnsmasq needs (it seeds its RNG from /dev/urandom).
    std::fs::create_dir_all(rootfs.join("dev")).unwrap();
    for (name, minor) in [("null", 3), ("urandom", 9)] {
        let p = std::ffi::CString::new(rootfs.join("dev").join(name).to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        let rc = unsafe { libc::mknod(p.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, minor)) };
        assert_eq!(rc, 0, "mknod /dev/{name} in the unpacked rootfs");
    }
    for p in [
        "usr/bin/pxelab-stack",
        "usr/bin/pxelab-installer",
        "var/lib/pxelab/initrds/x86_64/initrd.img",
        "var/lib/pxelab/tftp/undionly.kpxe",
        "var/lib/pxelab/tftp/boot.ipxe",
    ] {
        assert!(
            rootfs.join(p).is_file(),
            "{p} missing from the unpacked image"
        );
    }
    let v = checked(
        Command::new("chroot")
            .arg(&rootfs)
            .args(["/usr/sbin/dnsmasq", "--version"]),
    );
    assert!(
        String::from_utf8_lossy(&v.stdout).starts_with("Dnsmasq version"),
        "{}",
        String::from_utf8_lossy(&v.stdout)
    );
    let v = checked(
        Command::new("chroot")
            .arg(&rootfs)
            .args(["/usr/bin/pxelab-stack", "--version"]),
    );
    assert!(String::from_utf8_lossy(&v.stdout).contains("pxelab-stack"));
    ganesha_serves_from(&rootfs);
}

/// nfs-ganesha runs from the image's files alone: with a one-export NFSv4 config (the shape
/// the stack renders) in a network namespace of its own, it initializes and listens on 2049.
fn ganesha_serves_from(rootfs: &Path) {
    std::fs::create_dir_all(rootfs.join("proc")).unwrap();
    std::fs::create_dir_all(rootfs.join("export/etc")).unwrap();
    std::fs::create_dir_all(rootfs.join("work/recovery")).unwrap();
    std::fs::write(rootfs.join("export/etc/hostname"), "exported\n").unwrap();
    std::fs::write(
        rootfs.join("work/ganesha.conf"),
        "NFS_CORE_PARAM { Protocols = 4; NFS_Port = 2049; Enable_NLM = false; Enable_RQUOTA = false; Enable_UDP = false; }\n\
         NFSV4 { Graceless = true; Only_Numeric_Owners = true; RecoveryBackend = fs; RecoveryRoot = \"/work/recovery\"; }\n\
         NFS_KRB5 { Active_krb5 = false; }\n\
         EXPORT { Export_Id = 7; Path = \"/export\"; Pseudo = \"/export\"; Access_Type = RO; Squash = No_Root_Squash;\n\
         Protocols = 4; Transports = TCP; SecType = sys; FSAL { Name = VFS; } }\n",
    )
    .unwrap();
    let script = format!(
        "mount -t proc proc {root}/proc && ip link set lo up && exec chroot {root} /usr/bin/ganesha.nfsd \
         -F -f /work/ganesha.conf -L /work/ganesha.log -p /work/ganesha.pid -N NIV_EVENT",
        root = rootfs.display()
    );
    // unshare and sh exec in place: the child's pid is ganesha's.
    let mut child = Command::new("unshare")
        .args(["--net", "--mount", "sh", "-c", &script])
        .spawn()
        .unwrap();
    let log = rootfs.join("work/ganesha.log");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut listening = false;
    while Instant::now() < deadline && !listening {
        std::thread::sleep(Duration::from_millis(300));
        if child.try_wait().unwrap().is_some() {
            break;
        }
        let tables = ["tcp", "tcp6"].map(|t| {
            std::fs::read_to_string(format!("/proc/{}/net/{t}", child.id())).unwrap_or_default()
        });
        // Local address column `…:0801` (2049) in state 0A (LISTEN).
        listening = tables.iter().flat_map(|t| t.lines()).any(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            cols.len() > 3 && cols[1].ends_with(":0801") && cols[3] == "0A"
        });
    }
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        listening && text.contains("NFS SERVER INITIALIZED"),
        "ganesha from the image did not serve NFS:\n{text}"
    );
}

/// A network namespace with a lab interface `lab0` at `addr` (a veth whose peer stays inside:
/// carrier and no way out).
fn lab_netns(addr: &str) -> NetNs {
    let ns = NetNs::new("stack");
    ns.ip("link add lab0 type veth peer name lab1");
    ns.ip(&format!("addr add {addr} dev lab0"));
    ns.ip("link set lab1 up");
    ns.ip("link set lab0 up");
    ns
}

/// Removes the container and the image on drop.
struct Podman {
    container: String,
    image: String,
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = Command::new("podman")
            .args(["rm", "-f", "-v", &self.container])
            .output();
        let _ = Command::new("podman")
            .args(["rmi", "-f", &self.image])
            .output();
    }
}

fn http_get(addr: &str, path: &str) -> Option<String> {
    let mut s =
        std::net::TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    Some(text)
}

/// One podman test at a time: the image they load is the same, and the first one's clean-up
/// would remove it under the other's container.
static PODMAN: Mutex<()> = Mutex::new(());

#[test]
fn sys_podman_runs_the_supervisor_and_stops_within_two_seconds() {
    need_root();
    require("podman", "podman");
    require("runc", "runc");
    require("ip", "iproute2");
    let _alone = PODMAN.lock().unwrap_or_else(|e| e.into_inner());
    let out = first().out.as_path();
    // podman names an image by the sha256 of its config, which the docker archive is named after.
    let image_id = {
        let f = std::fs::File::open(out.join("pxeboot-stack.docker.tar")).unwrap();
        let mut ar = tar::Archive::new(f);
        let mut e = ar
            .entries()
            .unwrap()
            .map(Result::unwrap)
            .find(|e| e.path().unwrap().as_os_str() == "manifest.json")
            .unwrap();
        let mut text = String::new();
        e.read_to_string(&mut text).unwrap();
        let m: serde_json::Value = serde_json::from_str(&text).unwrap();
        m[0]["Config"]
            .as_str()
            .unwrap()
            .trim_end_matches(".json")
            .to_string()
    };
    let guard = Podman {
        container: format!("pxelab-stack-test-{}", std::process::id()),
        image: image_id.clone(),
    };
    checked(
        Command::new("podman")
            .arg("load")
            .arg("-q")
            .arg("-i")
            .arg(out.join("pxeboot-stack.docker.tar")),
    );
    let ns = lab_netns("10.213.0.1/24");
    checked(Command::new("podman").args([
        "run",
        "-d",
        "--name",
        &guard.container,
        "--runtime",
        "runc",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1000:1000",
        "--network",
        &format!("ns:/run/netns/{}", ns.name()),
        "--cap-add",
        "NET_ADMIN",
        "--cap-add",
        "NET_RAW",
        "-e",
        "PXELAB_INTERFACE=lab0",
        "-e",
        "PXELAB_SERVER_IP=10.213.0.1/24",
        // The default listens on the lab address only; loopback too for this check.
        "-e",
        "PXELAB_LISTEN=0.0.0.0:80",
        &image_id,
    ]));
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = None;
    while Instant::now() < deadline {
        last = ns.within(|| http_get("127.0.0.1:80", "/healthz"));
        if last
            .as_deref()
            .is_some_and(|r| r.starts_with("HTTP/1.1 200") || r.starts_with("HTTP/1.0 200"))
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let logs = |c: &str| {
        String::from_utf8_lossy(
            &Command::new("podman")
                .args(["logs", c])
                .output()
                .unwrap()
                .stderr,
        )
        .into_owned()
    };
    assert!(
        last.as_deref().is_some_and(|r| r.contains(" 200 ")),
        "/healthz did not answer 200 on loopback: {last:?}\ncontainer log:\n{}",
        logs(&guard.container)
    );
    // dnsmasq (supervised) has the DHCP port open in the namespace. The stack logs the spawn,
    // not the bind, so give dnsmasq a moment to open it.
    let has_dhcp = |udp: &str| {
        udp.lines().any(|l| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|a| a.ends_with(":0043"))
        })
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    let udp = loop {
        let udp = ns.within(|| std::fs::read_to_string("/proc/thread-self/net/udp").unwrap());
        if has_dhcp(&udp) || Instant::now() > deadline {
            break udp;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        has_dhcp(&udp),
        "no UDP :67 socket after 15 s:\n{udp}\n{}",
        logs(&guard.container)
    );

    let t = Instant::now();
    checked(Command::new("podman").args(["stop", "-t", "10", &guard.container]));
    let stop = t.elapsed();
    let code = checked(Command::new("podman").args([
        "inspect",
        "--format",
        "{{.State.ExitCode}}",
        &guard.container,
    ]));
    eprintln!("podman stop took {:.2} s", stop.as_secs_f64());
    assert!(
        stop < Duration::from_secs(2),
        "podman stop took {stop:?}: PID 1 must handle SIGTERM"
    );
    assert_eq!(
        String::from_utf8_lossy(&code.stdout).trim(),
        "0",
        "exit code after SIGTERM\n{}",
        logs(&guard.container)
    );
}

/// Removes the container on drop, and the image unless something else uses it (a lab's stack).
struct HostContainer {
    name: String,
    image: String,
}

impl Drop for HostContainer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let logs = Command::new("podman").args(["logs", &self.name]).output();
            if let Ok(l) = logs {
                eprintln!("--- container log\n{}", String::from_utf8_lossy(&l.stderr));
            }
        }
        let _ = Command::new("podman")
            .args(["rm", "-f", "-v", &self.name])
            .output();
        let _ = Command::new("podman").args(["rmi", &self.image]).output();
    }
}

/// README's `podman load` and `podman run --network host` lines, word for word, run in a
/// namespace standing in for the provisioning host (the archive is this build's, the host
/// paths of the volumes are under a scratch directory, the interface and address are the
/// test's): a DHCP client on the other end of a veth pair gets the defined address, TFTP the
/// image's first stage, `/ipxe?mac=` the machine's script, and the API answers the token.
#[test]
fn sys_podman_host_network_as_documented() {
    need_root();
    require("podman", "podman");
    require("ip", "iproute2");
    require("busybox", "busybox-static");
    require("nsenter", "util-linux");
    let _alone = PODMAN.lock().unwrap_or_else(|e| e.into_inner());
    let out = first().out.as_path();
    let tmp = scratch("podman-host");
    let net = TargetNet::new("p", "10.235.0.1/24");
    let placed = net.placement(&tmp.join("root"));

    let load = readme_command(&["podman", "load"]);
    let archive = |w: &String| match w.strip_prefix("build/stack/x86_64/") {
        Some(name) => out.join(name).display().to_string(),
        None => w.clone(),
    };
    checked(Command::new("podman").args(load[1..].iter().map(archive)));

    let run = readme_command(&["podman", "run"]);
    let at = run
        .iter()
        .position(|w| w.contains("pxeboot-stack:"))
        .unwrap();
    let container = HostContainer {
        name: format!("pxelab-host-test-{}", std::process::id()),
        image: run[at].clone(),
    };
    let (mut vms, mut token) = (None, None);
    let documented_token = Placement::value(&run[at..], "--api-token-file").unwrap();
    let mut words = vec![];
    let mut prev = "";
    for w in &run[1..at] {
        words.push(match prev {
            "--name" => container.name.clone(),
            "-v" => {
                let (host, inside) = w.split_once(':').unwrap();
                let host = placed.path(host);
                let inside = inside.split(':').next().unwrap();
                if inside == "/var/lib/pxelab/vms" {
                    vms = Some(host.clone());
                } else if inside == documented_token {
                    token = Some(host.clone());
                } else {
                    std::fs::create_dir_all(&host).unwrap();
                }
                w.replacen(w.split(':').next().unwrap(), &host.display().to_string(), 1)
            }
            _ => w.clone(),
        });
        prev = w;
    }
    placed.prepare(
        &vms.expect("a volume for the VM definitions"),
        None,
        &token.expect("the token file as a volume"),
        "52:54:00:d1:e2:02",
        "10.235.0.50",
    );
    // Root here cannot raise rlimits (a container itself), and podman's defaults ask for
    // more: host configuration, as README says, not a change to the command line.
    let conf = tmp.join("containers.conf");
    std::fs::write(
        &conf,
        "[containers]\ndefault_ulimits = [\"nofile=1024:1024\", \"nproc=1000:1000\"]\n",
    )
    .unwrap();
    let t = Instant::now();
    // nsenter, not `ip netns exec`: that mounts a sysfs of the namespace over /sys, which
    // hides the cgroup mounts runc needs.
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{}", net.host.name()))
        .arg("podman")
        .env("CONTAINERS_CONF", &conf)
        .args(&words)
        .arg(&run[at])
        .args(placed.container_flags(&run[at + 1..]));
    checked(&mut cmd);
    let logs = || {
        let l = Command::new("podman")
            .args(["logs", &container.name])
            .output()
            .unwrap();
        String::from_utf8_lossy(&l.stderr).into_owned()
    };
    net.wait_ready(30, &logs);
    eprintln!(
        "container serving {:.1} s after podman run",
        t.elapsed().as_secs_f64()
    );
    net.assert_serves(&tmp, "52:54:00:d1:e2:02", "10.235.0.50");
}

/// vmlinuz from the pinned kernel package (the default store doubles as a download cache).
fn pinned_vmlinuz(dest: &Path) {
    let lock = xtask::lock::Lock::load_default().unwrap();
    let store = xtask::store::Store::open_default().unwrap();
    let pins = lock.select("kernel", "amd64").unwrap();
    for pin in &pins {
        let paths = xtask::fetch::ensure_all(&store, &[pin.to_fetch()], false).unwrap();
        let deb = pxelab_debian::Deb::open(&paths[0]).unwrap();
        let entries = deb.data_entries().unwrap();
        if let Some(e) = entries.iter().find(|e| e.path.starts_with("boot/vmlinuz-")) {
            std::fs::write(dest, deb.read_data_file(&e.path).unwrap()).unwrap();
            return;
        }
    }
    panic!("no pinned kernel package has boot/vmlinuz-*: check recipes/kernel.toml and run `cargo xtask lock`");
}

/// Kills QEMU on drop.
struct Qemu(std::process::Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What `initrd/init` prints once it runs as PID 1, and what it prints in debug mode
/// (`pxelab.mode=shell`) before it starts the console shell.
const INIT_MARKER: &str = "pxelab-init: started";
const SHELL_MARKER: &str = "pxelab-init: console shell";

#[test]
fn sys_qemu_boots_the_initrd_and_its_tools_run_as_pid_1s_children() {
    require("qemu-system-x86_64", "qemu-system-x86");
    let work = tempfile::tempdir().unwrap();
    let vmlinuz = work.path().join("vmlinuz");
    pinned_vmlinuz(&vmlinuz);
    let initrd = first().out.as_path().join("initrd-x86_64.img");
    let t = Instant::now();
    let mut qemu = Qemu(
        Command::new("qemu-system-x86_64")
            .args([
                "-accel",
                "tcg",
                "-cpu",
                "max",
                "-m",
                "512",
                "-smp",
                "1",
                "-nodefaults",
                "-no-reboot",
            ])
            .args(["-display", "none", "-serial", "stdio", "-kernel"])
            .arg(&vmlinuz)
            .arg("-initrd")
            .arg(&initrd)
            .args(["-append", "console=ttyS0 panic=-1 pxelab.mode=shell"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("starting qemu-system-x86_64"),
    );
    // The console, collected by a reader thread.
    let console = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let mut stdout = qemu.0.stdout.take().unwrap();
    let sink = console.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    let text = || String::from_utf8_lossy(&console.lock().unwrap()).into_owned();
    let wait_for = |what: &str, until: Instant| {
        while Instant::now() < until {
            if text().contains(what) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    };
    let deadline = t + Duration::from_secs(90);
    assert!(
        wait_for(INIT_MARKER, deadline),
        "no {INIT_MARKER:?} on the serial console within 90 s:\n{}",
        text()
    );
    eprintln!(
        "/init running as PID 1 after {:.1} s under TCG",
        t.elapsed().as_secs_f64()
    );
    assert!(
        wait_for(SHELL_MARKER, deadline),
        "no debug shell:\n{}",
        text()
    );
    // The dynamic tools start: their loader and libraries are where the ELF headers say.
    // Full paths: busybox's shell prefers its own applets (it has a mke2fs too).
    std::thread::sleep(Duration::from_millis(500));
    let stdin = qemu.0.stdin.as_mut().unwrap();
    stdin
        .write_all(b"/sbin/mke2fs -V; /sbin/sfdisk --version; /sbin/mkfs.fat --help | head -1; /bin/pxelab-installer; echo TOOLS\"\"-DONE\n")
        .unwrap();
    stdin.flush().unwrap();
    assert!(
        wait_for("TOOLS-DONE", deadline),
        "the tools did not finish:\n{}",
        text()
    );
    let out = text();
    for expect in [
        "mke2fs 1.47",
        "sfdisk from util-linux",
        "mkfs.fat 4.2",
        "pxelab-installer",
    ] {
        assert!(
            out.contains(expect),
            "{expect:?} missing from the console:\n{out}"
        );
    }
    assert!(
        !out.contains("error while loading shared libraries"),
        "{out}"
    );
}
