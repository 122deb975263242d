//! Running the initrd's tools (sfdisk, mke2fs, mkfs.fat) and chrooted commands, with errors that
//! name the tool, its exit status and the tail of its output.

use std::ffi::CString;
use std::io::ErrorKind;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::error::{err, Context, Result};

/// Runs `cmd` to completion with `stdin` as its input; returns stdout. `hint` says where the
/// tool should come from, for the "not found" error.
pub fn run(cmd: &mut Command, stdin: Option<&[u8]>, hint: &str) -> Result<String> {
    use std::io::Write;
    let program = cmd.get_program().to_string_lossy().into_owned();
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| match e.kind() {
        ErrorKind::NotFound => err(format!("{program} not found ({hint})")),
        _ => err(format!("cannot run {program}: {e}")),
    })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input)
            .map_err(|e| err(format!("writing to {program}: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| err(format!("waiting for {program}: {e}")))?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stdout));
    let tail: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = tail[tail.len().saturating_sub(3)..].join(" | ");
    Err(err(format!("{program} failed ({}): {tail}", out.status)))
}

/// Runs `program` (a path inside `root`) chrooted into `root`, with a clean environment.
pub fn chroot_run(root: &Path, program: &str, args: &[&str]) -> Result<String> {
    let root_c =
        CString::new(root.as_os_str().as_bytes()).map_err(|_| err("root path contains NUL"))?;
    let mut c = Command::new(program);
    c.args(args)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("LC_ALL", "C")
        .env("HOME", "/root");
    // SAFETY: chroot and chdir are async-signal-safe; root_c lives until the closure is dropped.
    unsafe {
        c.pre_exec(move || {
            if libc::chroot(root_c.as_ptr()) != 0 || libc::chdir(c"/".as_ptr()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    run(&mut c, None, "not in the rootfs")
        .context(|| format!("chroot {program} {}", args.join(" ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_missing_tools_and_failures_clearly() {
        let e = run(&mut Command::new("pxelab-no-such-tool"), None, "install it")
            .unwrap_err()
            .0;
        assert_eq!(e, "pxelab-no-such-tool not found (install it)");
        let e = run(
            Command::new("sh").args(["-c", "echo one >&2; echo two >&2; exit 3"]),
            None,
            "",
        )
        .unwrap_err()
        .0;
        assert_eq!(e, "sh failed (exit status: 3): one | two");
        let out = run(&mut Command::new("cat"), Some(b"hello"), "").unwrap();
        assert_eq!(out, "hello");
    }
}
