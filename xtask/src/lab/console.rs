//! `lab vm console`: a target's serial console, read-write. QEMU serves the serial port on a
//! Unix socket in `run/` and logs it at the same time (see `qemu::console_chardev`), so
//! attaching never stops the log, and it works the same for a rootless lab (a path-named
//! socket does not belong to a network namespace).

use std::{
    io::{IsTerminal, Read, Write},
    net::Shutdown,
    os::{fd::AsRawFd, unix::net::UnixStream},
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::{bail, Context, Result};

use super::home::{Lab, VmFile};
use crate::process::pid;

/// Ctrl-] detaches (as telnet and `virsh console`); every other byte, Ctrl-C included, goes to
/// the VM.
pub const DETACH: u8 = 0x1d;

/// How a console session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// Ctrl-], or the end of the input.
    Detached,
    /// QEMU closed the console: the VM stopped.
    Closed,
}

/// Attaches the terminal (raw mode when it is one) to `name`'s serial console until Ctrl-]
/// or until the VM stops.
pub fn attach(lab: &Lab, name: &str) -> Result<()> {
    let socket = connect(lab, name)?;
    eprintln!(
        "attached to the serial console of {name}; Ctrl-] detaches (press Enter for a prompt)\r"
    );
    let ended = {
        let _raw = RawTerminal::enter();
        relay(socket, std::io::stdin(), std::io::stdout())?
    };
    match ended {
        Ended::Detached => eprintln!("\ndetached from {name}'s console"),
        Ended::Closed => eprintln!("\nthe console of {name} closed: its QEMU stopped"),
    }
    Ok(())
}

/// The console socket of a running `name`.
pub fn connect(lab: &Lab, name: &str) -> Result<UnixStream> {
    if pid::read(&lab.vm_file(name, VmFile::Pid)).is_none() {
        bail!("{name} is not running: `cargo xtask lab vm start {name}` first (its console log: `cargo xtask lab vm console {name} --log`)");
    }
    let path = lab.vm_file(name, VmFile::ConsoleSocket);
    if !path.exists() {
        bail!(
            "{name} was started without a console socket (by an older pxelab): `cargo xtask lab vm stop {name}` and start it again, or read its log with --follow"
        );
    }
    UnixStream::connect(&path).with_context(|| format!("connecting to {}", path.display()))
}

/// Copies `input` to the console and the console to `output` until [`DETACH`] or the end of
/// `input` (detached) or until QEMU closes the socket (closed).
pub fn relay(
    socket: UnixStream,
    input: impl Read + Send + 'static,
    mut output: impl Write,
) -> Result<Ended> {
    let detached = std::sync::Arc::new(AtomicBool::new(false));
    let mut to_vm = socket.try_clone()?;
    let flag = detached.clone();
    // Left blocked in its read when QEMU closes the console; the command then ends anyway.
    std::thread::spawn(move || {
        let mut input = input;
        let mut buf = [0u8; 1024];
        loop {
            let n = match input.read(&mut buf) {
                Ok(0) | Err(_) => 0,
                Ok(n) => n,
            };
            let chunk = &buf[..n];
            let end = chunk.iter().position(|b| *b == DETACH);
            let send = &chunk[..end.unwrap_or(n)];
            if !send.is_empty() && to_vm.write_all(send).is_err() {
                return;
            }
            if n == 0 || end.is_some() {
                flag.store(true, Ordering::SeqCst);
                let _ = to_vm.shutdown(Shutdown::Both);
                return;
            }
        }
    });
    let mut from_vm = socket;
    let mut buf = [0u8; 4096];
    loop {
        let n = match from_vm.read(&mut buf) {
            Ok(n) => n,
            Err(_) if detached.load(Ordering::SeqCst) => 0,
            Err(e) => return Err(e).context("reading the console"),
        };
        if n == 0 {
            break;
        }
        output
            .write_all(&buf[..n])
            .context("writing the console out")?;
        output.flush()?;
    }
    Ok(if detached.load(Ordering::SeqCst) {
        Ended::Detached
    } else {
        Ended::Closed
    })
}

/// The terminal on stdin in raw mode (every key, Ctrl-C included, goes to the VM unchanged)
/// until dropped; nothing when stdin is not a terminal.
struct RawTerminal(Option<libc::termios>);

impl RawTerminal {
    fn enter() -> RawTerminal {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return RawTerminal(None);
        }
        let fd = stdin.as_raw_fd();
        // SAFETY: tcgetattr/tcsetattr on the stdin terminal with a termios it filled in.
        unsafe {
            let mut saved: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(fd, &mut saved) != 0 {
                return RawTerminal(None);
            }
            let mut raw = saved;
            libc::cfmakeraw(&mut raw);
            if libc::tcsetattr(fd, libc::TCSANOW, &raw) != 0 {
                return RawTerminal(None);
            }
            RawTerminal(Some(saved))
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            // SAFETY: restores the settings read in `enter` on the same descriptor.
            unsafe { libc::tcsetattr(std::io::stdin().as_raw_fd(), libc::TCSANOW, saved) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::qemu;
    use std::time::{Duration, Instant};

    /// A boot sector that echoes every byte the serial port receives, and QEMU running it
    /// with the lab's console backend (killed when dropped).
    struct EchoVm(std::process::Child);

    impl EchoVm {
        fn start(dir: &std::path::Path) -> EchoVm {
            assert!(
                crate::hostdeps::find_bin("qemu-system-x86_64").is_some(),
                "qemu-system-x86_64 not found: apt-get install qemu-system-x86"
            );
            // Print "R" (ready), then loop: wait for a received byte (LSR bit 0), read it,
            // write it back.
            let mut sector = vec![
                0xba, 0xf8, 0x03, 0xb0, b'R', 0xee, // mov dx,0x3f8; mov al,'R'; out dx,al
                0xba, 0xfd, 0x03, 0xec, 0xa8, 0x01, 0x74, 0xf8, // mov dx,0x3fd; in; test; jz
                0xba, 0xf8, 0x03, 0xec, 0xee, 0xeb, 0xf1, // mov dx,0x3f8; in; out; jmp
            ];
            sector.resize(510, 0);
            sector.extend([0x55, 0xaa]);
            let image = dir.join("echo.img");
            std::fs::write(&image, &sector).unwrap();
            let chardev = qemu::console_chardev(&dir.join("console"), &dir.join("console.log"));
            let drive = format!("file={},format=raw,if=ide", image.display());
            let sh = xshell::Shell::new().unwrap();
            let child = crate::process::command(xshell::cmd!(
                sh,
                "qemu-system-x86_64 -accel tcg -display none -vga none -monitor none
                    -chardev {chardev} -serial chardev:console -drive {drive}"
            ))
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
            // The log fills while nobody is attached.
            let deadline = Instant::now() + Duration::from_secs(30);
            while std::fs::read(dir.join("console.log")).unwrap_or_default() != b"R" {
                assert!(
                    Instant::now() < deadline,
                    "the guest never printed R on its console"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            EchoVm(child)
        }
    }

    impl Drop for EchoVm {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// Types `text` into the console at `socket`, waits until `expect` came back, then
    /// detaches with Ctrl-].
    fn session(socket: &std::path::Path, text: &str, expect: &str) {
        let (reader, mut writer) = std::io::pipe().unwrap();
        let (mut seen_reader, seen_writer) = std::io::pipe().unwrap();
        let stream = UnixStream::connect(socket).unwrap();
        let relay = std::thread::spawn(move || relay(stream, reader, seen_writer));
        writer.write_all(text.as_bytes()).unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 256];
        while !String::from_utf8_lossy(&seen).contains(expect) {
            let n = seen_reader.read(&mut buf).unwrap();
            assert!(n > 0, "the console ended before {expect:?}: {seen:?}");
            seen.extend_from_slice(&buf[..n]);
        }
        writer.write_all(&[DETACH]).unwrap();
        assert_eq!(relay.join().unwrap().unwrap(), Ended::Detached);
    }

    #[test]
    fn sys_lab_console_types_into_the_serial_port_and_keeps_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let mut vm = EchoVm::start(dir.path());
        let socket = dir.path().join("console");
        session(&socket, "typed-one\r", "typed-one");
        // Detaching leaves the VM running, and the console can be attached again.
        assert!(
            matches!(vm.0.try_wait(), Ok(None)),
            "detaching stopped QEMU"
        );
        session(&socket, "typed-two\r", "typed-two");
        // QEMU writes the log beside the socket, not before it: under load it can trail.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = std::fs::read_to_string(dir.path().join("console.log")).unwrap();
            if log.contains("typed-one") && log.contains("typed-two") {
                break;
            }
            assert!(Instant::now() < deadline, "{log:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
