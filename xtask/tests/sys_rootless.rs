//! A lab run by a normal user, without sudo: the namespace is held from a user namespace the
//! user owns, the stack runs there, a target PXE-boots to its iPXE script, following a VM
//! whose definition the stack rejects stops with the stack's reason, and `lab down` leaves no
//! process behind.
//!
//! The test runs as root (to prepare a lab home and a user-readable copy of itself) and then
//! runs its own binary again as `nobody`, which does the lab part through the same library
//! calls `lab up` makes. It passes from a checkout nobody can enter (root's 0700 home) and with
//! `TMPDIR` set to a private directory.

use std::{
    io::Read,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use pxelab_contract::{Arch, BootMode, Phase};
use xshell::cmd;
use xtask::{
    lab::{
        artifacts, down,
        home::{Lab, VmFile},
        net,
        qemu::{Accel, Firmware},
        ssh, stack,
        stack::timeline,
        targets, vms,
    },
    process::{self, pid},
};

/// Set in the environment of the unprivileged run: the lab home it works in.
const CHILD: &str = "PXELAB_ROOTLESS_TEST_HOME";
const NOBODY: u32 = 65534;

#[test]
fn sys_rootless_lab_boots_a_target_to_its_ipxe_script() {
    if let Ok(home) = std::env::var(CHILD) {
        return unprivileged(PathBuf::from(home));
    }
    assert!(
        process::is_root(),
        "this test needs root (it prepares a lab for the user nobody): run it through `cargo xtask test`"
    );
    for tool in ["setpriv", "unshare", "nsenter", "pgrep"] {
        let package = if tool == "pgrep" {
            "procps"
        } else {
            "util-linux"
        };
        assert!(
            xtask::hostdeps::find_bin(tool).is_some(),
            "{tool} not found: apt-get install {package}"
        );
    }
    xtask::hostdeps::ensure(&targets::LAB_TOOLS).unwrap();

    // Everything nobody needs lives in one directory it owns: its lab home (with the stack's
    // files, as `lab up` installs them) and a copy of this test binary.
    let dir = tempfile::Builder::new()
        .prefix("pxelab-rootless-")
        .tempdir_in(temp_dir_for(NOBODY))
        .unwrap();
    let guard = Cleanup(dir.path().join("lab"));
    let lab = Lab::at(guard.0.clone()).unwrap();
    lab.create_dirs().unwrap();
    artifacts::prepare_stack(&lab, Arch::X86_64, &xtask::ui::Ui::new()).unwrap();
    stack::stack_binary(&lab).unwrap();
    let exe = dir.path().join("test-bin");
    std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let sh = process::shell().unwrap();
    let (owner, top) = (format!("{NOBODY}:{NOBODY}"), dir.path());
    process::output(cmd!(sh, "chown -R {owner} {top}")).unwrap();
    let _tun = TunMode::world_usable();

    // nobody starts in its own directory: the checkout this runs from may be one it cannot
    // enter, and every command it runs would inherit that.
    sh.change_dir(dir.path());
    let path = std::env::var_os("PATH").unwrap_or_default();
    let (uid, gid) = (format!("--reuid={NOBODY}"), format!("--regid={NOBODY}"));
    let out = process::command(
        cmd!(
            sh,
            "setpriv {uid} {gid} --clear-groups -- {exe}
                sys_rootless_lab_boots_a_target_to_its_ipxe_script --exact --nocapture"
        )
        .env_clear()
        .env("PATH", path)
        .env("HOME", &guard.0)
        .env("PXELAB_HOME", &guard.0)
        .env(CHILD, &guard.0),
    )
    .output()
    .unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the rootless run failed:\n{log}");
    assert!(log.contains("reached LocalBoot"), "{log}");
    assert!(log.contains("console attached in a rootless lab"), "{log}");
    // Nothing the user started is left: no process of nobody runs from this lab home.
    let (user, home) = (NOBODY.to_string(), &guard.0);
    let left = cmd!(sh, "pgrep -u {user} -a -f {home}")
        .quiet()
        .ignore_status()
        .read()
        .unwrap();
    assert!(left.is_empty(), "left running: {left}");
}

/// The temp dir if `uid` can reach it, else `/tmp`: `TMPDIR` may be a private (0700) directory.
fn temp_dir_for(uid: u32) -> PathBuf {
    use std::os::unix::fs::MetadataExt;
    let temp = std::env::temp_dir();
    let reachable = temp.ancestors().all(|dir| {
        std::fs::metadata(dir).is_ok_and(|m| {
            let mode = m.mode();
            mode & 0o001 != 0 || (m.uid() == uid && mode & 0o100 != 0)
        })
    });
    if reachable {
        temp
    } else {
        PathBuf::from("/tmp")
    }
}

/// The part `nobody` runs: namespace, stack, one BIOS target to its iPXE script, lab down.
fn unprivileged(home: PathBuf) {
    assert!(!process::is_root(), "the child must run without root");
    let lab = Lab::at(home).unwrap();
    lab.save_config().unwrap();
    let net = lab.net().unwrap();
    net.create().unwrap();
    assert!(net.exists());
    // Diskless targets and the container stack stay root-only, and say so.
    let err = process::require_root("a diskless target", net::NO_ROOTLESS_NFS).unwrap_err();
    assert!(err.to_string().contains("CAP_DAC_READ_SEARCH"), "{err}");

    assert!(stack::start(&lab).unwrap());
    stack::wait_healthy(&lab, Duration::from_secs(30)).unwrap();
    // A new build in the lab home makes the running stack stale (`lab up` then restarts it).
    assert!(!stack::is_stale(&lab));
    let binary = lab.stack_binary();
    let built = std::fs::read(&binary).unwrap();
    let mut rebuilt = built.clone();
    rebuilt.extend_from_slice(b"\0");
    xtask::store::write_atomic(&binary, &rebuilt).unwrap();
    assert!(
        stack::is_stale(&lab),
        "a changed stack binary went unnoticed"
    );
    xtask::store::write_atomic(&binary, &built).unwrap();

    let key = ssh::ensure_key(&lab).unwrap();
    let request = vms::VmRequest {
        name: "target-1".into(),
        distro: "debian-12".into(),
        arch: Arch::X86_64,
        mac: None,
        ip: None,
        boot: BootMode::Install,
    };
    let vm = vms::define(
        &lab.vms_dir(),
        &request,
        lab.subnet().unwrap(),
        &key,
        |vm| {
            // Told to boot from its (blank) disk, the target needs no distro pulled: DHCP, iPXE
            // and the stack's "boot from the local disk" script are the whole network path.
            vm.pxeboot = false;
            targets::create_disk(&lab, &vm.name, "1G")
        },
    )
    .unwrap();
    // The stack sees the definition within a second; the reservation must be in place
    // before the target's first DHCP request.
    std::thread::sleep(Duration::from_secs(2));
    targets::start_vm(&lab, &vm, Firmware::Bios, Accel::Tcg).unwrap();
    // The serial console is a socket the user can attach to from outside the namespaces:
    // iPXE's banner comes through it (read, then let go: an unread console stalls the VM).
    let mut attached = xtask::lab::console::connect(&lab, &vm.name).unwrap();
    attached
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&seen).contains("iPXE") {
        let n = attached.read(&mut buf).unwrap();
        assert!(n > 0, "the console closed: {seen:?}");
        seen.extend_from_slice(&buf[..n]);
    }
    drop(attached);
    println!("target-1's console attached in a rootless lab");

    let deadline = Instant::now() + Duration::from_secs(120);
    let reached = loop {
        let phases: Vec<Phase> = timeline(&lab, &vm.name)
            .unwrap_or_default()
            .iter()
            .map(|e| e.event.phase)
            .collect();
        if phases.contains(&Phase::LocalBoot) {
            assert!(phases.contains(&Phase::Dhcp), "no DHCP event: {phases:?}");
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let rejected = follows_a_rejected_definition_no_further(&lab, &vm);
    let console =
        std::fs::read_to_string(lab.vm_file(&vm.name, VmFile::Console)).unwrap_or_default();
    let stack_log = std::fs::read_to_string(lab.stack_log()).unwrap_or_default();
    let vm_pid = pid::read(&lab.vm_file(&vm.name, VmFile::Pid));
    let stack_pid = pid::read(&lab.stack_pidfile());
    down(&lab, true).unwrap();
    assert!(
        reached,
        "target-1 never fetched its iPXE script; console:\n{console}\nstack log:\n{stack_log}"
    );
    println!("target-1 reached LocalBoot in a rootless lab");
    rejected.unwrap();
    assert!(!net.exists(), "the namespace holder survived lab down");
    for pid in [vm_pid, stack_pid].into_iter().flatten() {
        assert!(!pid.is_running(), "pid {} survived lab down", pid.id());
    }
}

/// A hand-written definition that takes target-1's address is rejected by the stack (the later
/// file of a clash loses): following it stops at once with the stack's reason, where it used to
/// wait out the whole follow timeout for a lease that could never come.
fn follows_a_rejected_definition_no_further(
    lab: &Lab,
    taken: &pxelab_contract::VmDefinition,
) -> Result<(), String> {
    let clash = pxelab_contract::VmDefinition {
        name: "u-clash".into(),
        mac: "52:54:00:00:00:99".parse().unwrap(),
        ..taken.clone()
    };
    std::fs::write(lab.vms_dir().join("u-clash.json"), clash.to_json()).unwrap();
    std::thread::sleep(Duration::from_secs(3)); // the stack re-reads definitions within 2 s
    let took = Instant::now();
    let started = [(clash.name.clone(), xtask::lab::follow::now_ms())].into();
    let followed = xtask::lab::follow::wait_all(
        lab,
        std::slice::from_ref(&clash),
        &started,
        Duration::from_secs(60),
    );
    let _ = std::fs::remove_file(lab.vms_dir().join("u-clash.json"));
    let err = match followed {
        Ok(_) => return Err("following a rejected definition succeeded".into()),
        Err(e) => format!("{e:#}"),
    };
    let ip = taken.ip.unwrap();
    if !(err.starts_with("the stack rejects u-clash's definition (vms/u-clash.json)")
        && err.contains(&format!("IP {ip} is already used by target-1.json")))
    {
        return Err(format!(
            "following u-clash did not stop with the stack's reason: {err}"
        ));
    }
    if took.elapsed() > Duration::from_secs(10) {
        return Err(format!(
            "following u-clash took {:?} to give up",
            took.elapsed()
        ));
    }
    println!("following u-clash stopped with: {err}");
    Ok(())
}

/// Takes whatever the unprivileged run left (holder, stack, QEMU) down, even when it failed.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let Ok(lab) = Lab::at(self.0.clone()) else {
            return;
        };
        for file in lab.pidfiles() {
            if let Some(pid) = pid::read(&file) {
                let _ = pid.kill();
            }
        }
    }
}

/// On a standard host udev makes /dev/net/tun 0666 (a rootless lab needs that); a machine
/// without udev may have 0600. The test makes it usable and puts the old mode back.
struct TunMode(Option<u32>);

impl TunMode {
    fn world_usable() -> TunMode {
        let path = Path::new("/dev/net/tun");
        let mode = std::fs::metadata(path)
            .expect("/dev/net/tun missing: the kernel needs CONFIG_TUN")
            .permissions()
            .mode()
            & 0o7777;
        if mode & 0o666 == 0o666 {
            return TunMode(None);
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).unwrap();
        TunMode(Some(mode))
    }
}

impl Drop for TunMode {
    fn drop(&mut self) {
        if let Some(mode) = self.0 {
            let _ = std::fs::set_permissions("/dev/net/tun", std::fs::Permissions::from_mode(mode));
        }
    }
}
