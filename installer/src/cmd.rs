//! Running the initrd's tools (sfdisk, mke2fs, mkfs.fat) and chrooted commands, with errors that
//! name the tool, its exit status and the tail of its output.

use std::io::ErrorKind;
use std::process::{Command, Stdio};

use crate::error::{err, Result};

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
