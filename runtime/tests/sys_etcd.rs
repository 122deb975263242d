//! Two stacks sharing one etcd cluster (`--store etcd://…`, README's "Deploying the stack",
//! topology 3), run as processes in a network namespace of their own (loopback only, routed
//! nowhere): a 3-member etcd cluster from Debian's `etcd-server`, stacks A and B started with
//! README's `pxelab-stack --store` line (its network flags replaced by a loopback `--listen`, its
//! paths by a temporary directory), and a target that speaks the installer's protocol over HTTP
//! (`/ipxe`, `/config`, `/events`, retrying 5xx and refused connections as the installer does).
//! A second test races two stores of the library against one member, so a change of state that
//! is not a transaction on the revision read is caught.
//! Needs root, iproute2 and etcd-server; fails loudly without them.

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use pxelab_tests::cmd::{require, require_root};
use pxelab_tests::deploy::readme_command;
use pxelab_tests::NetNs;

const TOKEN: &str = "operator-s3cret";
const STACK_A: &str = "http://127.0.0.2:8080";
const STACK_B: &str = "http://127.0.0.3:8080";

/// A process the test killed or kills when it ends (its log shown if the test fails).
struct Daemon {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    fn start(ns: &NetNs, name: &str, program: &str, args: &[String], log: PathBuf) -> Daemon {
        let file = std::fs::File::create(&log).unwrap();
        let child = ns
            .command(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        Daemon {
            name: name.to_string(),
            child: Some(child),
            log,
        }
    }

    /// SIGKILL: a crash, not a shutdown.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- {} log (tail)", self.name);
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// One request; `Err` when no answer came (refused, timed out).
fn http(method: &str, url: &str, body: Option<&str>) -> Result<(u16, String), String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    // The operator token goes with every request: only the API reads it.
    let bearer = format!("Bearer {TOKEN}");
    let resp = match (method, body) {
        ("GET", _) => agent.get(url).header("Authorization", &bearer).call(),
        ("PUT", b) => agent
            .put(url)
            .header("Authorization", &bearer)
            .send(b.unwrap_or_default()),
        (_, b) => agent.post(url).send(b.unwrap_or_default()),
    };
    let mut resp = resp.map_err(|e| format!("{method} {url}: {e}"))?;
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    Ok((status, text))
}

fn get(url: &str) -> (u16, String) {
    http("GET", url, None).unwrap_or_else(|e| panic!("{e}"))
}

/// Polls `f` every 100 ms for `secs`; the last value it gave when it never said done.
fn wait_for<T: std::fmt::Debug>(secs: u64, what: &str, mut f: impl FnMut() -> (bool, T)) -> T {
    let end = Instant::now() + Duration::from_secs(secs);
    loop {
        let (done, value) = f();
        if done {
            return value;
        }
        assert!(Instant::now() < end, "{what} within {secs} s: {value:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn member_url(i: usize, port: u16) -> String {
    format!("http://127.0.1.{i}:{port}")
}

/// One member `name` of the cluster `cluster` (`name=peer-url,…`), serving on `host`'s ports
/// 2379 (clients) and 2380 (peers), its data under `dir`.
fn etcd_args(name: &str, dir: &Path, host: &str, cluster: &str) -> Vec<String> {
    let (client, peer) = (format!("http://{host}:2379"), format!("http://{host}:2380"));
    let data = dir.join(name).display().to_string();
    [
        "--name",
        name,
        "--data-dir",
        &data,
        "--listen-client-urls",
        &client,
        "--advertise-client-urls",
        &client,
        "--listen-peer-urls",
        &peer,
        "--initial-advertise-peer-urls",
        &peer,
        "--initial-cluster",
        cluster,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Which member (1 to 3) leads the cluster, by its own status.
fn leader() -> usize {
    (1..=3)
        .find(|i| {
            let url = format!("{}/v3/maintenance/status", member_url(*i, 2379));
            let Ok((200, text)) = http("POST", &url, Some("{}")) else {
                return false;
            };
            let status: serde_json::Value = serde_json::from_str(&text).unwrap();
            status["leader"] == status["header"]["member_id"]
        })
        .expect("the cluster has a leader")
}

fn etcd_member(ns: &NetNs, dir: &Path, i: usize) -> Daemon {
    let cluster: Vec<String> = (1..=3)
        .map(|j| format!("e{j}={}", member_url(j, 2380)))
        .collect();
    let mut args = etcd_args(
        &format!("e{i}"),
        dir,
        &format!("127.0.1.{i}"),
        &cluster.join(","),
    );
    // A dead leader is replaced within about a second.
    args.extend(["--heartbeat-interval", "50", "--election-timeout", "500"].map(String::from));
    Daemon::start(
        ns,
        &format!("etcd e{i}"),
        "etcd",
        &args,
        dir.join(format!("e{i}.log")),
    )
}

/// README's `pxelab-stack --store` line for a stack under `root` listening on `listen`: its
/// interface and address (this namespace has only loopback, so no dnsmasq) replaced by
/// `--no-dnsmasq --listen`, its paths by the test's, its cluster by the test's.
fn stack_args(root: &Path, listen: &str, store: &str) -> Vec<String> {
    let line = readme_command(&["pxelab-stack", "--store"]);
    let mut args = Vec::new();
    let mut words = line[1..].iter();
    while let Some(flag) = words.next() {
        let placed = match flag.as_str() {
            "--interface" | "--server-ip" => {
                words.next();
                continue;
            }
            "--data-dir" => root.display().to_string(),
            "--api-token-file" => root.join("api-token").display().to_string(),
            "--store" => {
                let documented = words.next().expect("--store has a value");
                let members = documented.strip_prefix("etcd://").unwrap_or_default();
                assert_eq!(
                    members.split(',').count(),
                    3,
                    "README's --store names a 3-member cluster: {documented}"
                );
                args.extend([flag.clone(), store.to_string()]);
                continue;
            }
            _ => {
                args.push(flag.clone());
                continue;
            }
        };
        words.next();
        args.extend([flag.clone(), placed]);
    }
    args.extend(["--no-dnsmasq".into(), "--listen".into(), listen.into()]);
    args
}

fn start_stack(ns: &NetNs, dir: &Path, name: &str, listen: &str, store: &str) -> Daemon {
    use std::os::unix::fs::PermissionsExt;
    let root = dir.join(name);
    common::fill_root(&root);
    let token = root.join("api-token");
    std::fs::write(&token, TOKEN).unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let args = stack_args(&root, listen, store);
    Daemon::start(
        ns,
        &format!("stack {name}"),
        env!("CARGO_BIN_EXE_pxelab-stack"),
        &args,
        dir.join(format!("{name}.log")),
    )
}

/// What `/ipxe` told the machine.
#[derive(Debug, PartialEq)]
enum Told {
    Install(String),
    Disk,
    Retry(String),
}

fn ipxe(stack: &str, mac: &str) -> Told {
    let (status, text) = get(&format!("{stack}/ipxe?mac={mac}"));
    assert_eq!(status, 200, "{text}");
    if text.contains("sanboot") {
        return Told::Disk;
    }
    if text.contains("sleep") && text.contains("chain --replace") {
        return Told::Retry(text);
    }
    let token = common::token_in(&text).unwrap_or_else(|| panic!("neither of three: {text}"));
    assert!(text.contains("kernel "), "{text}");
    Told::Install(token)
}

/// Posts `phase` as the installer does: 5xx and no answer are retried (here for 15 s, against
/// whichever stack `stacks` names first that answers).
fn post(stacks: &[&str], mac: &str, token: &str, phase: &str) -> (u16, String) {
    let body = format!(r#"{{"phase":"{phase}","message":"test"}}"#);
    wait_for(15, &format!("event {phase} acknowledged"), || {
        let mut last = (0, String::new());
        for stack in stacks {
            let url = format!("{stack}/events/{mac}?token={token}");
            match http("POST", &url, Some(&body)) {
                Ok((status, text)) if status < 500 => return (true, (status, text)),
                Ok(answer) => last = answer,
                Err(e) => last = (0, e),
            }
        }
        (false, last)
    })
}

fn define(stack: &str, name: &str, mac: &str) {
    let vm = serde_json::json!({
        "name": name, "arch": "x86_64", "distro": "debian-12", "mac": mac,
        "ssh_key": format!("{}\n", common::KEY), "pxeboot": true,
    });
    let url = format!("{stack}/api/machines/{name}");
    let (status, text) = http("PUT", &url, Some(&vm.to_string())).unwrap();
    assert!(status == 200 || status == 201, "{status} {text}");
}

fn prerequisites() {
    require_root("the etcd sys tests (network namespaces)");
    require("ip", "iproute2");
    require("etcd", "etcd-server");
}

#[test]
fn sys_etcd_two_stacks_install_each_machine_once() {
    prerequisites();
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let ns = NetNs::new("etcd");
    ns.within(|| scenario(&ns, dir.path()));
    eprintln!("whole scenario {:.1} s", t0.elapsed().as_secs_f64());
}

fn scenario(ns: &NetNs, dir: &Path) {
    let mut members: Vec<Daemon> = (1..=3).map(|i| etcd_member(ns, dir, i)).collect();
    for i in 1..=3 {
        let _ = wait_for(20, &format!("etcd e{i} healthy"), || {
            let answer = http("GET", &format!("{}/health", member_url(i, 2379)), None);
            let healthy = matches!(&answer, Ok((200, t)) if t.contains("\"true\""));
            (healthy, answer)
        });
    }
    let store = format!(
        "etcd://{}",
        (1..=3)
            .map(|i| format!("127.0.1.{i}:2379"))
            .collect::<Vec<_>>()
            .join(",")
    );
    let mut a = start_stack(ns, dir, "a", "127.0.0.2:8080", &store);
    let _b = start_stack(ns, dir, "b", "127.0.0.3:8080", &store);
    for stack in [STACK_A, STACK_B] {
        let _ = wait_for(10, &format!("{stack} serving"), || {
            let answer = http("GET", &format!("{stack}/healthz"), None);
            (matches!(answer, Ok((200, _))), answer)
        });
    }

    // Enrolled through A, known to B within its poll.
    let (m1, m2) = ("52:54:00:e7:cd:01", "52:54:00:e7:cd:02");
    define(STACK_A, "web-1", m1);
    define(STACK_A, "web-2", m2);
    wait_for(5, "B sees A's definitions", || {
        let answer = get(&format!("{STACK_B}/api/machines/web-2"));
        (answer.0 == 200, answer)
    });

    // Install 1 through A; an etcd member dies half-way.
    let t = Instant::now();
    let Told::Install(token) = ipxe(STACK_A, m1) else {
        panic!("web-1 was not told to install")
    };
    // The token A handed out is the cluster's: B serves the config for it.
    assert_eq!(get(&format!("{STACK_B}/config/{m1}?token={token}")).0, 200);
    assert_eq!(post(&[STACK_A], m1, &token, "partition").0, 200);
    // The leader: the stacks' writes then wait for an election too.
    let leader = leader();
    eprintln!("killing etcd e{leader}, the leader");
    members[leader - 1].kill();
    for phase in ["mkfs", "rootfs", "seed", "bootloader"] {
        assert_eq!(post(&[STACK_A], m1, &token, phase).0, 200, "{phase}");
    }
    let (status, text) = post(&[STACK_A], m1, &token, "installed");
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("\"installed\""), "{text}");
    eprintln!(
        "install with an etcd member killed: {:.2} s",
        t.elapsed().as_secs_f64()
    );
    // Installed through A: B boots it from its disk, and so does A.
    assert_eq!(ipxe(STACK_B, m1), Told::Disk);
    assert_eq!(ipxe(STACK_A, m1), Told::Disk);

    // Install 2 through A, which dies half-way; the target carries on against B.
    let t = Instant::now();
    let Told::Install(token) = ipxe(STACK_A, m2) else {
        panic!("web-2 was not told to install")
    };
    assert_eq!(post(&[STACK_A], m2, &token, "partition").0, 200);
    a.kill();
    for phase in ["mkfs", "rootfs", "seed", "bootloader"] {
        assert_eq!(post(&[STACK_A, STACK_B], m2, &token, phase).0, 200);
    }
    let (status, text) = post(&[STACK_A, STACK_B], m2, &token, "installed");
    assert_eq!(status, 200, "{text}");
    // Exactly once: a second `installed` (the installer's retry of a lost answer) is
    // acknowledged but not recorded (B's timeline below has one), and no stack hands out an
    // install again.
    let (status, text) = post(&[STACK_B], m2, &token, "installed");
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("\"installed\""), "{text}");
    assert_eq!(ipxe(STACK_B, m2), Told::Disk);
    eprintln!(
        "install with stack A killed: {:.2} s",
        t.elapsed().as_secs_f64()
    );
    // B's own timeline has the events it saw and no install decision: that was A's alone.
    let phases = common::phases(&dir.join("b/state/control.sock"), "web-2");
    assert_eq!(
        phases,
        [
            "mkfs",
            "rootfs",
            "seed",
            "bootloader",
            "installed",
            "local-boot"
        ]
    );

    // Quorum lost (one member left, answering but unable to read), then etcd gone: B cannot
    // know the machine's state, so it says so and asks again.
    let told_to_retry = |mac: &str, how: &str| match ipxe(STACK_B, mac) {
        Told::Retry(text) => assert!(text.contains("etcd"), "{text}"),
        other => panic!("with {how}, {mac} was told {other:?}"),
    };
    let alive = (1..=3).find(|i| *i != leader).unwrap_or_default();
    members[alive - 1].kill();
    let t = Instant::now();
    told_to_retry(m1, "etcd's quorum lost");
    eprintln!("/ipxe without quorum: {:.2} s", t.elapsed().as_secs_f64());
    for m in &mut members {
        m.kill();
    }
    told_to_retry(m2, "etcd down");
    // A stack started while etcd is down has no definitions: it does not call the machine
    // unknown either.
    let _c = start_stack(ns, dir, "c", "127.0.0.4:8080", &store);
    let _ = wait_for(10, "C serving", || {
        let answer = http("GET", "http://127.0.0.4:8080/healthz", None);
        (matches!(answer, Ok((200, _))), answer)
    });
    match ipxe("http://127.0.0.4:8080", m1) {
        Told::Retry(text) => assert!(
            text.contains("cannot read the machine definitions from etcd"),
            "{text}"
        ),
        other => panic!("a stack without etcd told {m1} {other:?}"),
    }
    let (status, text) = http(
        "POST",
        &format!("{STACK_B}/events/{m2}?token={token}"),
        Some(r#"{"phase":"rootfs"}"#),
    )
    .unwrap();
    assert!(
        status >= 500,
        "with etcd down an event got {status}: {text}"
    );
}

/// The library's side of the sharing, two stores in one process against a 1-member cluster:
/// the revision swap, tokens and states seen by both, and races between them that must have
/// exactly one winner.
#[test]
fn sys_etcd_transactions_give_each_change_of_state_one_winner() {
    use pxelab_contract::{Event, Phase, VmDefinition, VmState};
    use pxelab_runtime::{
        etcd::Etcd,
        events::{EventStore, Refused},
        vms::{VmStore, WriteError},
    };
    use std::sync::Arc;

    prerequisites();
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let ns = NetNs::new("etcdtx");
    let args = etcd_args("one", dir.path(), "127.0.0.1", "one=http://127.0.0.1:2380");
    let _etcd = Daemon::start(&ns, "etcd", "etcd", &args, dir.path().join("etcd.log"));
    let event = |phase| Event {
        phase,
        message: "test".into(),
        ..Event::default()
    };
    ns.within(|| {
        let etcd = Arc::new(Etcd::new(vec!["http://127.0.0.1:2379".into()]));
        let _ = wait_for(20, "etcd answers", || {
            let answer = etcd.get("/pxelab/none");
            (answer.is_ok(), format!("{answer:?}"))
        });

        // The swap writes only at the revision it names (0: the key must not exist).
        assert!(etcd.swap("/t/k", 0, b"a").unwrap());
        assert!(!etcd.swap("/t/k", 0, b"b").unwrap());
        let (value, revision) = etcd.get("/t/k").unwrap();
        assert_eq!(value.as_deref(), Some(&b"a"[..]));
        assert!(etcd.swap("/t/k", revision, b"c").unwrap());
        assert!(!etcd.swap("/t/k", revision, b"d").unwrap());
        assert_eq!(etcd.get("/t/k").unwrap().0.as_deref(), Some(&b"c"[..]));
        assert!(etcd.delete("/t/k").unwrap());
        assert_eq!(etcd.get("/t/k").unwrap(), (None, 0));

        // Definitions written through one store are the other's at its next poll; a MAC
        // clash is refused there.
        let roots = [dir.path().join("a"), dir.path().join("b")];
        for r in &roots {
            std::fs::create_dir_all(r.join("vms")).unwrap();
            std::fs::create_dir_all(r.join("state")).unwrap();
        }
        let vms_a = VmStore::shared(roots[0].join("vms"), etcd.clone());
        let vms_b = VmStore::shared(roots[1].join("vms"), etcd.clone());
        let json = |name: &str| {
            format!(
                r#"{{"name":"{name}","arch":"x86_64","distro":"debian-12","mac":"52:54:00:e7:aa:01","ssh_key":"{}"}}"#,
                common::KEY
            )
        };
        let vm = VmDefinition::from_json(&json("tx-1")).unwrap();
        assert!(vms_a.put(&vm).unwrap());
        assert!(vms_b.current().by_name("tx-1").is_none());
        vms_b.rescan();
        assert_eq!(vms_b.current().by_mac(vm.mac), Some(&vm));
        let clash = VmDefinition::from_json(&json("tx-2")).unwrap();
        assert!(matches!(vms_b.put(&clash), Err(WriteError::Conflict(_))));

        let a = Arc::new(EventStore::open(&roots[0].join("state")).unwrap().share(etcd.clone()));
        let b = Arc::new(EventStore::open(&roots[1].join("state")).unwrap().share(etcd.clone()));
        // A boot handed out by A: B knows its token and the state it started.
        let token = a.begin_boot(&vm, event(Phase::Ipxe), true).unwrap();
        assert_eq!(b.token(&vm).unwrap().as_deref(), Some(token.as_str()));
        assert_eq!(b.state(&vm).unwrap(), VmState::Booting);
        b.post(&vm, event(Phase::Rootfs), Some(&token)).unwrap();
        assert_eq!(a.state(&vm).unwrap(), VmState::Installing);
        assert!(matches!(
            a.post(&vm, event(Phase::Rootfs), Some("0123")),
            Err(Refused::Token)
        ));

        // Eight reports of `installed` at once, half to each stack: one enters it.
        let outcomes: Vec<bool> = std::thread::scope(|s| {
            let posts: Vec<_> = (0..8)
                .map(|i| {
                    let (store, vm, token) = (if i % 2 == 0 { &a } else { &b }, &vm, &token);
                    s.spawn(move || match store.post(vm, event(Phase::Installed), Some(token)) {
                        Ok(_) => true,
                        // A post that finds it installed by another: acknowledged, not recorded.
                        Err(Refused::Repeated) => false,
                        Err(other) => panic!("{other:?}"),
                    })
                })
                .collect();
            posts.into_iter().map(|p| p.join().unwrap()).collect()
        });
        assert_eq!(outcomes.iter().filter(|won| **won).count(), 1, "{outcomes:?}");
        // Installed: neither stack hands out an install any more.
        for store in [&a, &b] {
            assert_eq!(store.state(&vm).unwrap(), VmState::Installed);
            let e = store.begin_boot(&vm, event(Phase::Ipxe), true).unwrap_err();
            assert!(e.0.contains("installed meanwhile"), "{e}");
        }

        // Reprovisioned through B: A hands out the nonce. Then eight boots at once: each gets
        // its own token, and only the last one written is the machine's.
        b.reprovision(&vm, event(Phase::Reprovision)).unwrap();
        assert!(a.wipe(&vm).unwrap().is_some());
        let tokens: Vec<String> = std::thread::scope(|s| {
            let boots: Vec<_> = (0..8)
                .map(|i| {
                    let (store, vm) = (if i % 2 == 0 { &a } else { &b }, &vm);
                    s.spawn(move || store.begin_boot(vm, event(Phase::Ipxe), true).unwrap())
                })
                .collect();
            boots.into_iter().map(|p| p.join().unwrap()).collect()
        });
        let current = a.token(&vm).unwrap().unwrap();
        let accepted: Vec<&String> = tokens
            .iter()
            .filter(|t| b.post(&vm, event(Phase::Disk), Some(t)).is_ok())
            .collect();
        assert_eq!(accepted, [&current], "{tokens:?}");
        assert!(a.wipe(&vm).unwrap().is_some(), "the nonce lasts until installed");
    });
    eprintln!("whole test {:.1} s", t0.elapsed().as_secs_f64());
}
