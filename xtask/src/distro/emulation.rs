//! Running another architecture's programs during a pull: mmdebstrap runs the rootfs's maintainer
//! scripts in a chroot, so an aarch64 rootfs built on an x86_64 host needs qemu-user reached
//! through binfmt_misc.
//!
//! The interpreter must be registered with the `F` flag: the kernel then opens it once, at
//! registration, so it also runs inside a chroot that holds no qemu binary. As root, what is
//! missing is set up the way systemd-binfmt does it at boot (mount binfmt_misc, write the
//! distro's `binfmt.d` line to `register`), with one log line per step; otherwise the error names
//! the one command to run. The decision ([`plan`]) reads only world-readable files, so it is
//! tested without root.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use pxelab_contract::Arch;

use crate::ui::Ui;

const BINFMT: &str = "/proc/sys/fs/binfmt_misc";
/// Where systemd-binfmt looks for registrations, in its order of precedence.
const CONF_DIRS: [&str; 3] = ["/etc/binfmt.d", "/run/binfmt.d", "/usr/lib/binfmt.d"];

/// `arch` is not the architecture this program runs on.
pub fn is_foreign(arch: Arch) -> bool {
    arch.as_str() != std::env::consts::ARCH
}

/// Makes sure programs of the foreign `arch` run here, or fails with the command that makes
/// them run. The packages ([`crate::hostdeps::emulation_deps`]) are the caller's to ensure, with
/// the pull's other tools in one apt run.
pub fn ensure(arch: Arch, ui: &Ui) -> Result<()> {
    let name = entry_name(arch);
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    // Each step changes what the next probe sees (after mounting, an entry registered earlier
    // reappears), so plan again after each one; there are at most four.
    for _ in 0..5 {
        let steps = plan(&name, &State::probe(&name))?;
        let Some(step) = steps.first() else {
            return check_runs(arch);
        };
        if !root {
            bail!(fix_it_yourself(arch, &steps));
        }
        ui.println(format!(
            "{arch} emulation: {}; running `{}` (as systemd-binfmt does at boot)",
            step.problem(&name),
            step.command(&name)
        ));
        step.apply(&name)?;
    }
    bail!("binfmt_misc did not take the {name} registration: check `cat {BINFMT}/{name}`")
}

/// The error for a user who is not root: what is wrong and the one command that fixes it.
fn fix_it_yourself(arch: Arch, steps: &[Step]) -> String {
    let name = entry_name(arch);
    let commands: Vec<String> = steps.iter().map(|s| s.command(&name)).collect();
    format!(
        "{arch} programs cannot run here ({}; mmdebstrap runs the rootfs's maintainer scripts): \
         run `sudo sh -c \"{}\"`, or pull as root to have it done",
        steps.first().map_or(String::new(), |s| s.problem(&name)),
        commands.join(" && ")
    )
}

/// `qemu-aarch64`: the entry name Debian's qemu-user-static (and every distro's) registers.
fn entry_name(arch: Arch) -> String {
    format!("qemu-{}", arch.as_str())
}

/// mmdebstrap's own check, run before it so a failure names the cause: a real program of `arch`.
fn check_runs(arch: Arch) -> Result<()> {
    let arch_test = crate::hostdeps::ARCH_TEST.path()?;
    let deb_arch = arch.debian();
    let sh = xshell::Shell::new()?;
    let out = xshell::cmd!(sh, "{arch_test} {deb_arch}")
        .quiet()
        .ignore_status()
        .output()
        .context("cannot run arch-test")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || text.trim() != format!("{}: ok", arch.debian()) {
        bail!(
            "{} is registered but an {arch} program does not run (`arch-test {}` said {:?}): check its interpreter in {BINFMT}/{}",
            entry_name(arch),
            arch.debian(),
            text.trim(),
            entry_name(arch)
        );
    }
    Ok(())
}

/// What the host looks like, read without privileges.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct State {
    /// `binfmt_misc` is in /proc/filesystems (built in or module loaded).
    kernel_has_it: bool,
    mounted: bool,
    /// The global switch (`status`) is on.
    all_enabled: bool,
    /// The entry's state; None when it is not registered (or binfmt_misc is not mounted).
    entry: Option<Entry>,
    /// The binfmt.d file registering the entry, and its registration line.
    conf: Option<(PathBuf, String)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    enabled: bool,
    interpreter: String,
    flags: String,
}

impl State {
    fn probe(name: &str) -> State {
        let read = |p: &str| fs::read_to_string(p).unwrap_or_default();
        let mounted = Path::new(BINFMT).join("register").exists();
        State {
            kernel_has_it: read("/proc/filesystems")
                .lines()
                .any(|l| l.split_whitespace().last() == Some("binfmt_misc")),
            mounted,
            all_enabled: read(&format!("{BINFMT}/status")).trim() == "enabled",
            entry: mounted
                .then(|| fs::read_to_string(Path::new(BINFMT).join(name)).ok())
                .flatten()
                .map(|t| parse_entry(&t)),
            conf: find_conf(name, &CONF_DIRS.map(PathBuf::from)),
        }
    }
}

/// Parses `/proc/sys/fs/binfmt_misc/<name>` (`enabled`, `interpreter …`, `flags: …`, …).
fn parse_entry(text: &str) -> Entry {
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    Entry {
        enabled: text.lines().next() == Some("enabled"),
        interpreter: field("interpreter "),
        flags: field("flags:"),
    }
}

/// The first `*.conf` in `dirs` with a registration line for `name` (`:name:type:…:flags`; the
/// first character is the line's delimiter).
fn find_conf(name: &str, dirs: &[PathBuf]) -> Option<(PathBuf, String)> {
    dirs.iter().find_map(|dir| {
        let mut files: Vec<PathBuf> = fs::read_dir(dir)
            .ok()?
            .filter_map(|e| Some(e.ok()?.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "conf"))
            .collect();
        files.sort();
        files.into_iter().find_map(|path| {
            let text = fs::read_to_string(&path).ok()?;
            let line = text
                .lines()
                .find(|l| registration_name(l) == Some(name))?
                .to_string();
            Some((path, line))
        })
    })
}

fn registration_name(line: &str) -> Option<&str> {
    let delim = line
        .chars()
        .next()
        .filter(|c| !c.is_alphanumeric() && *c != '#' && *c != ';')?;
    line[delim.len_utf8()..].split(delim).next()
}

/// The flags field of a registration line (after its last delimiter).
fn registration_flags(line: &str) -> &str {
    let delim = line.chars().next().unwrap_or(':');
    line.rsplit(delim).next().unwrap_or("")
}

/// One change to the host's binfmt_misc setup.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Step {
    LoadModule,
    Mount,
    EnableAll,
    Register { conf: PathBuf, line: String },
    Enable,
}

/// What must change for `name` to run programs inside a chroot, in order; an error when no
/// change of ours can fix it.
fn plan(name: &str, s: &State) -> Result<Vec<Step>> {
    let mut steps = Vec::new();
    if !s.kernel_has_it {
        steps.push(Step::LoadModule);
    }
    if !s.mounted {
        steps.push(Step::Mount);
    }
    if s.mounted && !s.all_enabled {
        steps.push(Step::EnableAll);
    }
    let dirs = CONF_DIRS.join(", ");
    match &s.entry {
        None => {
            let (conf, line) = s.conf.clone().with_context(|| {
                format!(
                    "no binfmt registration for {name} in {dirs}: apt-get install qemu-user-static"
                )
            })?;
            if !registration_flags(&line).contains('F') {
                bail!("{} registers {name} without the F flag, so it cannot run inside mmdebstrap's chroot: add F to its flags", conf.display());
            }
            steps.push(Step::Register { conf, line });
        }
        Some(e) if !e.flags.contains('F') => {
            let fix = match &s.conf {
                Some((conf, line)) if registration_flags(line).contains('F') => format!(
                    "re-register it: `sudo sh -c \"echo -1 > {BINFMT}/{name} && {}\"`",
                    Step::Register { conf: conf.clone(), line: line.clone() }.command(name)
                ),
                _ => format!("re-register it with F (Debian: apt-get install qemu-user-static, then `echo -1 > {BINFMT}/{name}` and register its {name}.conf)"),
            };
            bail!(
                "{name} is registered without the F flag (flags {:?}, interpreter {}), so it cannot run inside mmdebstrap's chroot: {fix}",
                e.flags,
                e.interpreter
            );
        }
        Some(e) if !e.enabled => steps.push(Step::Enable),
        Some(_) => {}
    }
    Ok(steps)
}

impl Step {
    /// What is wrong, for the log line or the error.
    fn problem(&self, name: &str) -> String {
        match self {
            Step::LoadModule => "the kernel has no binfmt_misc loaded".into(),
            Step::Mount => format!("binfmt_misc is not mounted on {BINFMT}"),
            Step::EnableAll => "binfmt_misc is disabled".into(),
            Step::Register { .. } => format!("{name} is not registered with binfmt_misc"),
            Step::Enable => format!("{name} is registered but disabled"),
        }
    }

    /// The shell command that makes the change (what a user runs as root).
    fn command(&self, name: &str) -> String {
        match self {
            Step::LoadModule => "modprobe binfmt_misc".into(),
            Step::Mount => format!("mount -t binfmt_misc binfmt_misc {BINFMT}"),
            Step::EnableAll => format!("echo 1 > {BINFMT}/status"),
            Step::Register { conf, line } => {
                let d = line.chars().next().unwrap_or(':');
                format!(
                    "grep '^{d}{name}{d}' {} > {BINFMT}/register",
                    conf.display()
                )
            }
            Step::Enable => format!("echo 1 > {BINFMT}/{name}"),
        }
    }

    fn apply(&self, name: &str) -> Result<()> {
        let run = |program: &str, args: &[&str]| -> Result<()> {
            let sh = xshell::Shell::new()?;
            xshell::cmd!(sh, "{program} {args...}")
                .run()
                .with_context(|| format!("`{}` failed", self.command(name)))
        };
        let write = |file: &str, bytes: &str| {
            fs::write(Path::new(BINFMT).join(file), bytes)
                .with_context(|| format!("`{}` failed", self.command(name)))
        };
        match self {
            Step::LoadModule => run("modprobe", &["binfmt_misc"]),
            Step::Mount => run("mount", &["-t", "binfmt_misc", "binfmt_misc", BINFMT]),
            Step::EnableAll => write("status", "1"),
            // One registration per write, without the newline (as systemd-binfmt writes it).
            Step::Register { line, .. } => write("register", line.trim_end()),
            Step::Enable => write(name, "1"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEBIAN_CONF: &str = r":qemu-aarch64:M::\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:/usr/libexec/qemu-binfmt/aarch64-binfmt-P:OPF";

    fn conf() -> Option<(PathBuf, String)> {
        Some((
            PathBuf::from("/usr/lib/binfmt.d/qemu-aarch64.conf"),
            DEBIAN_CONF.into(),
        ))
    }

    fn entry(enabled: bool, flags: &str) -> Option<Entry> {
        Some(Entry {
            enabled,
            interpreter: "/usr/libexec/qemu-binfmt/aarch64-binfmt-P".into(),
            flags: flags.into(),
        })
    }

    fn host(mounted: bool, entry: Option<Entry>) -> State {
        State {
            kernel_has_it: true,
            mounted,
            all_enabled: mounted,
            entry,
            conf: conf(),
        }
    }

    fn commands(steps: &[Step]) -> Vec<String> {
        steps.iter().map(|s| s.command("qemu-aarch64")).collect()
    }

    #[test]
    fn this_containers_case_mounts_and_registers_from_binfmt_d() {
        let steps = plan("qemu-aarch64", &host(false, None)).unwrap();
        assert_eq!(
            commands(&steps),
            [
                "mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc",
                "grep '^:qemu-aarch64:' /usr/lib/binfmt.d/qemu-aarch64.conf > /proc/sys/fs/binfmt_misc/register",
            ]
        );
    }

    #[test]
    fn a_user_who_is_not_root_gets_one_line_with_the_command() {
        let steps = plan("qemu-aarch64", &host(false, None)).unwrap();
        assert_eq!(
            fix_it_yourself(Arch::Aarch64, &steps),
            "aarch64 programs cannot run here (binfmt_misc is not mounted on /proc/sys/fs/binfmt_misc; \
             mmdebstrap runs the rootfs's maintainer scripts): run `sudo sh -c \"mount -t binfmt_misc binfmt_misc \
             /proc/sys/fs/binfmt_misc && grep '^:qemu-aarch64:' /usr/lib/binfmt.d/qemu-aarch64.conf > \
             /proc/sys/fs/binfmt_misc/register\"`, or pull as root to have it done"
        );
    }

    #[test]
    fn a_working_registration_needs_nothing_and_a_disabled_one_is_enabled() {
        assert_eq!(
            plan("qemu-aarch64", &host(true, entry(true, "POF"))).unwrap(),
            []
        );
        assert_eq!(
            plan("qemu-aarch64", &host(true, entry(false, "OCF"))).unwrap(),
            [Step::Enable]
        );
        let mut off = host(true, entry(true, "F"));
        off.all_enabled = false;
        assert_eq!(plan("qemu-aarch64", &off).unwrap(), [Step::EnableAll]);
    }

    #[test]
    fn a_registration_without_f_is_refused_with_the_fix() {
        let err = plan("qemu-aarch64", &host(true, entry(true, "OC")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("without the F flag"), "{err}");
        assert!(
            err.contains("echo -1 > /proc/sys/fs/binfmt_misc/qemu-aarch64 && grep '^:qemu-aarch64:' /usr/lib/binfmt.d/qemu-aarch64.conf > /proc/sys/fs/binfmt_misc/register"),
            "{err}"
        );
        assert!(!err.contains('\n'), "one line: {err}");
    }

    #[test]
    fn without_qemu_user_static_the_error_names_the_package() {
        let mut s = host(true, None);
        s.conf = None;
        let err = plan("qemu-aarch64", &s).unwrap_err().to_string();
        assert!(err.ends_with("apt-get install qemu-user-static"), "{err}");

        let mut no_f = host(true, None);
        no_f.conf = Some((
            PathBuf::from("/etc/binfmt.d/q.conf"),
            ":qemu-aarch64:M::x::/q:OC".into(),
        ));
        let err = plan("qemu-aarch64", &no_f).unwrap_err().to_string();
        assert!(
            err.contains("/etc/binfmt.d/q.conf registers qemu-aarch64 without the F flag"),
            "{err}"
        );
    }

    #[test]
    fn reads_the_kernels_entry_and_binfmt_d_files() {
        let e = parse_entry(
            "enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: POF\noffset 0\nmagic 7f454c46\nmask ffffffff\n",
        );
        assert_eq!(e, entry(true, "POF").unwrap());
        assert!(!parse_entry("disabled\ninterpreter /q\nflags: F\n").enabled);

        let dir = tempfile::tempdir().unwrap();
        let (etc, usr) = (dir.path().join("etc"), dir.path().join("usr"));
        fs::create_dir_all(&etc).unwrap();
        fs::create_dir_all(&usr).unwrap();
        fs::write(
            usr.join("qemu-aarch64.conf"),
            format!("# comment\n{DEBIAN_CONF}\n"),
        )
        .unwrap();
        fs::write(usr.join("qemu-arm.conf"), ":qemu-arm:M::x::/arm:F\n").unwrap();
        let found = find_conf("qemu-aarch64", &[etc.clone(), usr.clone()]).unwrap();
        assert_eq!(
            found,
            (usr.join("qemu-aarch64.conf"), DEBIAN_CONF.to_string())
        );
        assert_eq!(registration_flags(&found.1), "OPF");
        // An override in /etc wins, as with systemd-binfmt.
        fs::write(etc.join("local.conf"), ",qemu-aarch64,M,,x,,/mine,F\n").unwrap();
        let found = find_conf("qemu-aarch64", &[etc.clone(), usr]).unwrap();
        assert_eq!(found.0, etc.join("local.conf"));
        assert!(find_conf("qemu-riscv64", &[etc]).is_none());
    }

    #[test]
    fn the_host_arch_is_not_foreign() {
        assert!(!is_foreign(if cfg!(target_arch = "aarch64") {
            Arch::Aarch64
        } else {
            Arch::X86_64
        }));
    }
}
