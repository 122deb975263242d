//! Running host programs. Every program xtask runs is written as `xshell::cmd!(sh, "…")`, which
//! quotes each interpolated value as one argument; this module is for what xshell cannot do on
//! its own: keep a process running after the call (a daemon, QEMU), hook the child before `exec`,
//! or capture a failing command's output into the error.
//!
//! It is the only module that turns an `xshell::Cmd` into a `std::process::Command` (the tidy
//! test holds the rest of xtask to that), so every failure reads the same: the command, the
//! directory it ran in, its status, and the tail of what it printed. Processes found again
//! later through pid files, and signals to them, are [`pid`]'s.

pub mod pid;

use std::path::Path;
use std::process::{Command, ExitStatus, Output, Stdio};

use anyhow::{bail, Context, Result};

/// A shell whose commands run in `/`, for commands given only absolute paths (the lab's). They
/// then work wherever the caller stands, also in a directory that the user they run as cannot
/// enter: xshell changes into its shell's directory before every command, and `cargo xtask
/// test` runs the rootless lab as `nobody` from a checkout that may be in root's 0700 home.
pub fn shell() -> Result<xshell::Shell> {
    let sh = xshell::Shell::new()?;
    sh.change_dir("/");
    Ok(sh)
}

/// Whether this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// What needs root, with the reason: a one-line error otherwise.
pub fn require_root(what: &str, why: &str) -> Result<()> {
    if !is_root() {
        bail!("{what} needs root ({why}): run as root, e.g. `sudo -E cargo xtask …`");
    }
    Ok(())
}

/// How much of a failed command's stdout and stderr an error quotes.
const TAIL_BYTES: usize = 4000;

/// The command as a `std::process::Command`, for spawning in the background or a `pre_exec`
/// hook. Stdio defaults are std's (inherited); set them before spawning.
pub fn command(cmd: xshell::Cmd<'_>) -> Command {
    Command::from(cmd)
}

/// Runs to completion with stdout and stderr captured; a non-zero status is an error that quotes
/// both. The stdin of the child is empty.
pub fn output(cmd: xshell::Cmd<'_>) -> Result<Output> {
    let mut command = command(cmd);
    let out = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", describe(&command)))?;
    if !out.status.success() {
        anyhow::bail!(
            "{}",
            failure(&command, out.status, &out.stdout, &out.stderr)
        );
    }
    Ok(out)
}

/// [`output`]'s stdout as text, trimmed.
pub fn read(cmd: xshell::Cmd<'_>) -> Result<String> {
    let out = output(cmd)?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Runs with output to `log` (created or appended to) and returns the status without judging
/// it: for best-effort clean-up commands (`umount -l`, `losetup -d`) whose failure is reported
/// by what the caller checks next.
pub fn status_logged(cmd: xshell::Cmd<'_>, log: Option<&Path>) -> Result<ExitStatus> {
    let mut command = command(cmd);
    command.stdin(Stdio::null());
    match log {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            command.stdout(file.try_clone()?).stderr(file);
        }
        None => {
            command.stdout(Stdio::null()).stderr(Stdio::null());
        }
    }
    command
        .status()
        .with_context(|| format!("cannot run {}", describe(&command)))
}

/// `program arg …` as a user would type it, for messages.
pub fn describe(command: &Command) -> String {
    let mut line = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        let arg = arg.to_string_lossy();
        if arg.is_empty() || arg.contains(|c: char| c.is_whitespace() || c == '\'' || c == '"') {
            line.push_str(&format!(" '{}'", arg.replace('\'', r"'\''")));
        } else {
            line.push(' ');
            line.push_str(&arg);
        }
    }
    line
}

/// The one failure format: command, directory, status, and the tails of stdout and stderr.
pub fn failure(command: &Command, status: ExitStatus, stdout: &[u8], stderr: &[u8]) -> String {
    let cwd = command
        .get_current_dir()
        .map(Path::to_path_buf)
        .or_else(|| std::env::current_dir().ok())
        .map(|d| d.display().to_string())
        .unwrap_or_else(|| "?".into());
    let mut text = format!("`{}` (in {cwd}) failed: {status}", describe(command));
    for (name, bytes) in [("stdout", stdout), ("stderr", stderr)] {
        let shown = tail(bytes);
        if !shown.is_empty() {
            text.push_str(&format!("\n--- {name} ---\n{shown}"));
        }
    }
    text
}

fn tail(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim_end();
    if text.len() <= TAIL_BYTES {
        return text.to_string();
    }
    let mut start = text.len() - TAIL_BYTES;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &text[start..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_names_the_command_its_directory_status_and_output() {
        let sh = xshell::Shell::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        sh.change_dir(dir.path());
        let script = "echo out; echo err >&2; exit 3";
        let err = output(xshell::cmd!(sh, "sh -c {script}")).unwrap_err();
        let text = format!("{err:#}");
        assert!(
            text.contains("`sh -c 'echo out; echo err >&2; exit 3'`"),
            "{text}"
        );
        assert!(text.contains(&dir.path().display().to_string()), "{text}");
        assert!(text.contains("exit status: 3"), "{text}");
        assert!(text.contains("--- stdout ---\nout"), "{text}");
        assert!(text.contains("--- stderr ---\nerr"), "{text}");
    }

    #[test]
    fn read_trims_stdout() {
        let sh = xshell::Shell::new().unwrap();
        assert_eq!(read(xshell::cmd!(sh, "echo '  hi  '")).unwrap(), "hi");
    }

    #[test]
    fn long_output_keeps_its_end() {
        let long = "x".repeat(TAIL_BYTES * 2) + "END";
        let shown = tail(long.as_bytes());
        assert!(shown.ends_with("END") && shown.len() <= TAIL_BYTES + 4);
    }
}
