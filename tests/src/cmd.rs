//! Host commands in tests: check that a tool is installed (naming its Debian package), run a
//! command, and fail with one format that shows everything needed to see why — the command, the
//! directory it ran in, its status, stdout and stderr — so nobody has to re-run a test to debug it.

use std::path::PathBuf;
use std::process::{Command, Output};

/// Fails the test unless `tool` is on PATH (or in /usr/sbin or /sbin), naming the package.
pub fn require(tool: &str, package: &str) {
    let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .any(|d| d.join(tool).is_file());
    assert!(found, "{tool} not found: apt-get install {package}");
}

/// Fails the test unless it runs as root, saying what needs root.
pub fn require_root(what: &str) {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "{what} needs root: run the test as root");
}

/// `args[0]` with the rest as arguments.
pub fn command(args: &[&str]) -> Command {
    let mut c = Command::new(args[0]);
    c.args(&args[1..]);
    c
}

/// Runs `args` and returns its output whatever its status (it must start, though).
pub fn run(args: &[&str]) -> Output {
    output(&mut command(args))
}

/// Runs `args`; fails the test unless it succeeds; returns its stdout.
pub fn must(args: &[&str]) -> String {
    check(&mut command(args))
}

/// Runs `cmd` and returns its output whatever its status (it must start, though).
pub fn output(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", describe(cmd)))
}

/// Runs `cmd`; fails the test unless it succeeds; returns its stdout.
pub fn check(cmd: &mut Command) -> String {
    String::from_utf8_lossy(&checked(cmd).stdout).into_owned()
}

/// Runs `cmd`; fails the test unless it succeeds; returns its whole output.
pub fn checked(cmd: &mut Command) -> Output {
    let out = output(cmd);
    assert!(out.status.success(), "{}", failure(cmd, &out));
    out
}

/// The one failure format.
pub fn failure(cmd: &Command, out: &Output) -> String {
    let cwd = cmd
        .get_current_dir()
        .map(|d| d.to_path_buf())
        .or_else(|| std::env::current_dir().ok())
        .map(|d| d.display().to_string())
        .unwrap_or_else(|| "?".into());
    format!(
        "`{}` (in {cwd}) failed: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        describe(cmd),
        out.status,
        String::from_utf8_lossy(&out.stdout).trim_end(),
        String::from_utf8_lossy(&out.stderr).trim_end()
    )
}

/// `program arg …` as typed in a shell.
pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| {
            let a = a.to_string_lossy();
            if a.is_empty() || a.contains(|c: char| c.is_whitespace() || "'\"$;&|".contains(c)) {
                format!("'{}'", a.replace('\'', r"'\''"))
            } else {
                a.into_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_shows_command_directory_status_and_both_streams() {
        let mut cmd = command(&["sh", "-c", "echo out; echo err >&2; exit 4"]);
        cmd.current_dir("/");
        let out = output(&mut cmd);
        let text = failure(&cmd, &out);
        assert!(
            text.starts_with(
                "`sh -c 'echo out; echo err >&2; exit 4'` (in /) failed: exit status: 4"
            ),
            "{text}"
        );
        assert!(
            text.contains("--- stdout ---\nout\n--- stderr ---\nerr"),
            "{text}"
        );
    }

    #[test]
    #[should_panic(expected = "definitely-not-a-tool not found: apt-get install some-package")]
    fn a_missing_tool_names_its_package() {
        require("definitely-not-a-tool", "some-package");
    }
}
