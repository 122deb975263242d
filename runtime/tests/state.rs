//! The machines' state across restarts, crashes and damaged journals: what is durable stays.

mod common;

use std::{
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use common::{Stack, MAC};
use pxelab_contract::{Event, Phase, VmDefinition, VmState};
use pxelab_runtime::{events::EventStore, journal::TIMELINE_KEEP};

fn vm() -> VmDefinition {
    VmDefinition::from_json(&format!(
        r#"{{"name":"t1","arch":"x86_64","distro":"debian-12","mac":"{MAC}"}}"#
    ))
    .unwrap()
}

fn event(phase: Phase, message: &str) -> Event {
    Event {
        phase,
        message: message.into(),
        ..Event::default()
    }
}

fn segments(state: &Path) -> Vec<std::path::PathBuf> {
    let mut found: Vec<_> = std::fs::read_dir(state)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("journal-"))
        })
        .collect();
    found.sort();
    found
}

#[test]
fn a_restart_keeps_state_and_timeline() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = EventStore::open(dir.path()).unwrap();
        for phase in [Phase::Ipxe, Phase::Installing, Phase::Installed] {
            store.append(&vm(), event(phase, "m")).unwrap();
        }
    }
    let store = EventStore::open(dir.path()).unwrap();
    assert_eq!(store.state(&vm()).unwrap(), VmState::Installed);
    let phases: Vec<Phase> = store.timeline("t1").iter().map(|e| e.event.phase).collect();
    assert_eq!(phases, [Phase::Ipxe, Phase::Installing, Phase::Installed]);
    // A redefined VM (another MAC) starts over.
    let mut other = vm();
    other.mac = "52:54:00:aa:bb:99".parse().unwrap();
    assert_eq!(store.state(&other).unwrap(), VmState::New);
}

/// A crash that cuts the journal inside a line (the append of an event whose reply was never
/// sent) recovers to the events before it.
#[test]
fn a_journal_cut_mid_line_recovers_to_the_last_whole_event() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = EventStore::open(dir.path()).unwrap();
        store.append(&vm(), event(Phase::Ipxe, "boot")).unwrap();
        store
            .append(&vm(), event(Phase::Installed, "done"))
            .unwrap();
        store
            .append(&vm(), event(Phase::LocalBoot, "a long message to cut"))
            .unwrap();
    }
    let [segment] = segments(dir.path()).try_into().unwrap();
    let text = std::fs::read(&segment).unwrap();
    let last_line = text[..text.len() - 1]
        .iter()
        .rposition(|b| *b == b'\n')
        .unwrap()
        + 1;
    let cut = text.len() - 20;
    assert!(cut > last_line, "the cut must fall inside the last line");
    std::fs::write(&segment, &text[..cut]).unwrap();
    let store = EventStore::open(dir.path()).unwrap();
    assert_eq!(store.state(&vm()).unwrap(), VmState::Installed);
    let phases: Vec<Phase> = store.timeline("t1").iter().map(|e| e.event.phase).collect();
    assert_eq!(phases, [Phase::Ipxe, Phase::Installed]);
    // The damaged segment was folded into the snapshot at start; new events append cleanly.
    store
        .append(&vm(), event(Phase::LocalBoot, "again"))
        .unwrap();
    drop(store);
    let store = EventStore::open(dir.path()).unwrap();
    assert_eq!(store.timeline("t1").len(), 3);
}

#[test]
fn timelines_keep_their_last_entries() {
    let dir = tempfile::tempdir().unwrap();
    let store = EventStore::open(dir.path()).unwrap();
    for i in 0..TIMELINE_KEEP + 40 {
        store
            .append(&vm(), event(Phase::Rootfs, &i.to_string()))
            .unwrap();
    }
    let check = |store: &EventStore| {
        let t = store.timeline("t1");
        assert_eq!(t.len(), TIMELINE_KEEP);
        assert_eq!(t[0].event.message, "40");
        assert_eq!(
            t.last().unwrap().event.message,
            (TIMELINE_KEEP + 39).to_string()
        );
    };
    check(&store);
    store.compact().unwrap();
    store.append(&vm(), event(Phase::Installed, "x")).unwrap();
    drop(store);
    let store = EventStore::open(dir.path()).unwrap();
    assert_eq!(store.state(&vm()).unwrap(), VmState::Installed);
    assert_eq!(
        store.timeline("t1").last().unwrap().event.phase,
        Phase::Installed
    );
    assert_eq!(segments(dir.path()).len(), 1, "old segments left behind");
}

/// A state directory of an older stack keeps its machines installed.
#[test]
fn an_old_state_directory_is_imported() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("t1.state"),
        format!(r#"{{"mac":"{MAC}","state":"installed","since_ms":1700000000000}}"#),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("t1.timeline.jsonl"),
        "{\"at_ms\":1700000000000,\"phase\":\"installed\"}\n",
    )
    .unwrap();
    let store = EventStore::open(dir.path()).unwrap();
    let record = store.record(&vm()).unwrap().unwrap();
    assert_eq!(
        (record.state, record.since_ms),
        (VmState::Installed, 1_700_000_000_000)
    );
    assert_eq!(store.timeline("t1").len(), 1);
    assert!(!dir.path().join("t1.state").exists());
}

/// `installed` is acknowledged only once durable, so a `kill -9` right after the reply loses
/// nothing: the restarted stack boots the machine from its disk.
#[test]
fn kill_9_after_installed_keeps_the_machine_installed() {
    let s = Stack::new();
    let root = s.root().to_path_buf();
    let start = |n: u32| {
        let log = root.join(format!("stack-{n}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_pxelab-stack"))
            .arg("--data-dir")
            .arg(&root)
            .args(["--no-dnsmasq", "--no-nfs", "--listen", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let stack = common::StackProcess {
            child: Some(child),
            log: log.clone(),
        };
        let t = std::time::Instant::now();
        let addr: SocketAddr = loop {
            let text = std::fs::read_to_string(&log).unwrap();
            let listening = text
                .lines()
                .find_map(|l| l.strip_prefix("pxelab-stack: listening on http://"));
            if let Some(rest) = listening {
                break rest.split(' ').next().unwrap().parse().unwrap();
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "not listening: {text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        (stack, addr)
    };
    let send = |addr: SocketAddr, method: &str, target: &str, body: &str| {
        common::raw_bytes(
            addr,
            format!(
                "{method} {target} HTTP/1.1\r\nHost: pxe.test\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
    };
    let (mut stack, addr) = start(1);
    let script = send(addr, "GET", &format!("/ipxe?mac={MAC}"), "").text();
    let events = format!("/events/{MAC}?token={}", common::token_in(&script).unwrap());
    send(addr, "POST", &events, r#"{"phase":"installing"}"#);
    let r = send(addr, "POST", &events, r#"{"phase":"installed"}"#);
    assert_eq!(r.json()["state"], "installed");
    // SIGKILL at once: no chance to write anything more.
    let mut child = stack.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();

    let (_stack, addr) = start(2);
    let t = send(addr, "GET", &format!("/ipxe?mac={MAC}"), "").text();
    assert!(t.contains("sanboot"), "installed lost to kill -9: {t}");
    let control = root.join("state").join(pxelab_contract::CONTROL_SOCKET);
    let timeline = common::control(&control, "GET", "/vms/t1/timeline").json();
    assert_eq!(timeline[2]["phase"], "installed", "{timeline}");
}

#[test]
fn boot_tokens_survive_a_restart_and_a_reprovision_drops_them() {
    let dir = tempfile::tempdir().unwrap();
    let token = {
        let store = EventStore::open(dir.path()).unwrap();
        store
            .begin_boot(&vm(), event(Phase::Ipxe, "boot"), true)
            .unwrap()
    };
    let store = EventStore::open(dir.path()).unwrap();
    assert_eq!(store.token(&vm()).unwrap(), Some(token));
    store
        .append(&vm(), event(Phase::Reprovision, "reset"))
        .unwrap();
    drop(store);
    let store = EventStore::open(dir.path()).unwrap();
    assert_eq!(store.token(&vm()).unwrap(), None);
}
