//! The bench's results: every sample in `results.json`, and the table in `RESULTS.md`.
//!
//! A row keeps its raw samples; median, min and max are derived from them when the row is made,
//! so the JSON says exactly what was measured. A rerun of one group replaces that group only, so
//! each group records the commit and the machine it was measured on.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// Bump when the JSON layout changes incompatibly (an older file is then replaced, not merged).
const VERSION: u32 = 2;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Results {
    pub version: u32,
    /// In the order of [`super::Figure::ALL`].
    pub groups: Vec<Group>,
}

/// Facts about the machine the numbers come from.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub os: String,
    pub memory_gib: f64,
    /// The QEMU accelerator QEMU figures ran with (`kvm` or `tcg`), when the group ran QEMU.
    pub accel: Option<String>,
}

/// One figure group as measured by one run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Group {
    pub name: String,
    pub title: String,
    /// Unix seconds when the group finished.
    pub measured_at: u64,
    /// `git rev-parse HEAD` of the checkout that measured it, `-dirty` when it had changes.
    pub commit: String,
    pub machine: Machine,
    pub quick: bool,
    pub elapsed_s: f64,
    /// Why the group stopped early (its rows hold what was measured before).
    pub error: Option<String>,
    /// Context for the numbers (peer versions, file sizes, accelerator…).
    pub facts: BTreeMap<String, String>,
    pub rows: Vec<Row>,
}

/// Which direction is good for a figure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Better {
    Lower,
    Higher,
}

/// One figure: our samples and, where one exists, the peer's.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Row {
    pub figure: String,
    pub unit: String,
    pub better: Better,
    pub samples: Vec<f64>,
    pub median: Option<f64>,
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub peer: Option<Peer>,
    /// Our median / the peer's median.
    pub ratio: Option<f64>,
    pub notes: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Peer {
    pub name: String,
    pub samples: Vec<f64>,
    pub median: Option<f64>,
    pub min: Option<f64>,
    pub max: Option<f64>,
}

/// (median, min, max) of the samples; `None`s for no samples.
pub fn stats(samples: &[f64]) -> (Option<f64>, Option<f64>, Option<f64>) {
    if samples.is_empty() {
        return (None, None, None);
    }
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let median = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    (Some(median), Some(s[0]), Some(s[n - 1]))
}

impl Row {
    pub fn new(figure: impl Into<String>, unit: &str, better: Better, samples: Vec<f64>) -> Row {
        let (median, min, max) = stats(&samples);
        Row {
            figure: figure.into(),
            unit: unit.into(),
            better,
            samples,
            median,
            min,
            max,
            peer: None,
            ratio: None,
            notes: String::new(),
        }
    }

    /// A size or other single exact value.
    pub fn single(figure: impl Into<String>, unit: &str, value: f64) -> Row {
        Row::new(figure, unit, Better::Lower, vec![value])
    }

    pub fn peer(mut self, name: impl Into<String>, samples: Vec<f64>) -> Row {
        let (median, min, max) = stats(&samples);
        self.ratio = match (self.median, median) {
            (Some(ours), Some(theirs)) if theirs > 0.0 => Some(ours / theirs),
            _ => None,
        };
        self.peer = Some(Peer {
            name: name.into(),
            samples,
            median,
            min,
            max,
        });
        self
    }

    pub fn note(mut self, note: impl AsRef<str>) -> Row {
        if !self.notes.is_empty() {
            self.notes.push_str("; ");
        }
        self.notes.push_str(note.as_ref());
        self
    }
}

impl Group {
    pub fn new(name: &str, title: &str, quick: bool) -> Group {
        Group {
            name: name.into(),
            title: title.into(),
            quick,
            ..Group::default()
        }
    }

    pub fn push(&mut self, ui: &crate::ui::Ui, row: Row) {
        ui.println(format!("bench {}: {}", self.name, row_line(&row)));
        self.rows.push(row);
    }

    pub fn fact(&mut self, key: &str, value: impl ToString) {
        self.facts.insert(key.into(), value.to_string());
    }
}

impl Machine {
    /// This machine, with the accelerator its QEMU figures used, if any.
    pub fn probe(accel: Option<String>) -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")
                    .and_then(|r| r.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_kib: f64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0.0);
        let os = std::fs::read_to_string("/etc/os-release")
            .unwrap_or_default()
            .lines()
            .find_map(|l| {
                l.strip_prefix("PRETTY_NAME=")
                    .map(|v| v.trim_matches('"').to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        Machine {
            cores: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            cpu_model,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
            os,
            memory_gib: (mem_kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
            accel,
        }
    }
}

impl Results {
    /// The previous results at `path` if they are readable and of this version, else empty.
    pub fn load_or_new(path: &Path) -> Results {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|t| serde_json::from_str::<Results>(&t).ok())
            .filter(|r| r.version == VERSION)
            .unwrap_or(Results {
                version: VERSION,
                ..Results::default()
            })
    }

    /// Replace (or add) the group of the same name, keeping the figure order, stamped with
    /// the time, the commit and `machine`.
    pub fn put(&mut self, mut group: Group, machine: Machine) {
        group.measured_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        group.commit = commit();
        group.machine = machine;
        self.groups.retain(|g| g.name != group.name);
        self.groups.push(group);
        let order = |g: &Group| {
            super::Figure::ALL
                .iter()
                .position(|f| f.name() == g.name)
                .unwrap_or(usize::MAX)
        };
        self.groups.sort_by_key(order);
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        let mut json = serde_json::to_string_pretty(self).context("encoding the results")?;
        json.push('\n');
        crate::store::write_atomic(&dir.join("results.json"), json.as_bytes())?;
        crate::store::write_atomic(&dir.join("RESULTS.md"), self.markdown().as_bytes())
    }

    pub fn markdown(&self) -> String {
        let mut s = String::from("# pxelab benchmarks\n\n");
        s += "Generated by `cargo xtask bench` (rerun it to update; `--only <group>` reruns one group). \
              Each timing is the median of the runs listed in `results.json`, with min and max; \
              *ratio* is our median divided by the peer's median, measured in the same run. \
              Each group says the commit and the machine it was measured on.\n";
        for g in &self.groups {
            s += &format!("\n## {}\n\n", g.title);
            let when = format_unix(g.measured_at);
            let m = &g.machine;
            s += &format!(
                "Measured {when} at commit {} on {} cores, {}, {:.1} GiB RAM, {}, kernel {}{}; in {:.0} s{}.",
                short_commit(&g.commit),
                m.cores,
                m.cpu_model,
                m.memory_gib,
                m.os,
                m.kernel,
                m.accel
                    .as_deref()
                    .map(|a| format!(", QEMU accelerator {a}"))
                    .unwrap_or_default(),
                g.elapsed_s,
                if g.quick {
                    " with `--quick` (fewer, shorter runs: indicative only)"
                } else {
                    ""
                }
            );
            if !g.facts.is_empty() {
                let facts: Vec<String> = g.facts.iter().map(|(k, v)| format!("{k}: {v}")).collect();
                s += &format!(" {}.", facts.join("; "));
            }
            s += "\n\n";
            if let Some(e) = &g.error {
                let mut e = one_line(e);
                if e.chars().count() > 600 {
                    e = e.chars().take(600).collect::<String>()
                        + "… (the whole message is in results.json)";
                }
                s += &format!("**Failed:** {e}\n\n");
            }
            if g.rows.is_empty() {
                continue;
            }
            s += "| figure | median | min | max | unit | peer | ratio | notes |\n";
            s += "|---|---:|---:|---:|---|---|---:|---|\n";
            for r in &g.rows {
                let peer = r
                    .peer
                    .as_ref()
                    .map(|p| {
                        format!(
                            "{}: {} ({}–{})",
                            p.name,
                            num(p.median),
                            num(p.min),
                            num(p.max)
                        )
                    })
                    .unwrap_or_default();
                let ratio = r
                    .ratio
                    .map(|x| {
                        format!(
                            "{x:.2}× ({} is better)",
                            if r.better == Better::Lower {
                                "lower"
                            } else {
                                "higher"
                            }
                        )
                    })
                    .unwrap_or_default();
                let runs = if r.samples.len() > 1 {
                    format!("{} runs", r.samples.len())
                } else {
                    String::new()
                };
                let notes = [runs, r.notes.clone()]
                    .into_iter()
                    .filter(|x| !x.is_empty())
                    .collect::<Vec<_>>()
                    .join("; ");
                s += &format!(
                    "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
                    cell(&r.figure),
                    num(r.median),
                    num(r.min),
                    num(r.max),
                    r.unit,
                    cell(&peer),
                    ratio,
                    cell(&notes)
                );
            }
        }
        s
    }
}

/// The checkout's commit, `-dirty` when tracked files differ from it; `unknown` outside git.
fn commit() -> String {
    commit_of(&crate::util::project_root())
}

/// The bench's own output in the checkout: writing it after one group must not make the next
/// group's code look changed.
const OWN_OUTPUT: [&str; 2] = ["bench/results.json", "bench/RESULTS.md"];

fn commit_of(checkout: &Path) -> String {
    let sh = match xshell::Shell::new() {
        Ok(sh) => sh,
        Err(_) => return "unknown".into(),
    };
    sh.change_dir(checkout);
    let head = crate::process::read(xshell::cmd!(sh, "git rev-parse HEAD"));
    let excluded = OWN_OUTPUT.map(|f| format!(":(exclude){f}"));
    let dirty = crate::process::read(xshell::cmd!(
        sh,
        "git status --porcelain --untracked-files=no -- . {excluded...}"
    ));
    match (head, dirty) {
        (Ok(head), Ok(dirty)) if dirty.is_empty() => head,
        (Ok(head), Ok(_)) => format!("{head}-dirty"),
        _ => "unknown".into(),
    }
}

/// `0a1b2c3d4e5f` (12 hex digits) plus `-dirty` if so.
fn short_commit(commit: &str) -> String {
    match commit.split_once('-') {
        Some((hash, rest)) => format!("{}-{rest}", &hash[..hash.len().min(12)]),
        None => commit[..commit.len().min(12)].to_string(),
    }
}

/// One progress line for a finished row.
fn row_line(r: &Row) -> String {
    let mut line = format!(
        "{}: {} {} (min {}, max {})",
        r.figure,
        num(r.median),
        r.unit,
        num(r.min),
        num(r.max)
    );
    if let (Some(p), Some(ratio)) = (&r.peer, r.ratio) {
        line += &format!(
            "; {} {} {}, ratio {ratio:.2}",
            p.name,
            num(p.median),
            r.unit
        );
    }
    line
}

/// Three significant digits or so; `-` for nothing.
fn num(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(x) if x.abs() >= 100.0 => format!("{x:.0}"),
        Some(x) if x.abs() >= 10.0 => format!("{x:.1}"),
        Some(x) => format!("{x:.2}"),
    }
}

fn cell(s: &str) -> String {
    one_line(s).replace('|', "\\|")
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `2026-11-22 01:02 UTC` (civil from days, Howard Hinnant).
fn format_unix(secs: u64) -> String {
    let t = crate::util::utc(secs);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02} UTC",
        t.year, t.month, t.day, t.hour, t.minute
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every group of one `cargo xtask bench` run carries the commit it ran at, not
    /// `-dirty` because an earlier group wrote its results; a changed source file still shows.
    #[test]
    fn the_commit_stamp_ignores_the_benchs_own_output_only() {
        let dir = tempfile::tempdir().unwrap();
        let sh = xshell::Shell::new().unwrap();
        sh.change_dir(dir.path());
        std::fs::create_dir(dir.path().join("bench")).unwrap();
        for f in OWN_OUTPUT.iter().chain(&["main.rs"]) {
            std::fs::write(dir.path().join(f), "before\n").unwrap();
        }
        let git = |args: &[&str]| {
            crate::process::read(xshell::cmd!(
                sh,
                "git -c user.name=t -c user.email=t@t -c commit.gpgsign=false {args...}"
            ))
            .unwrap()
        };
        git(&["init", "-q"]);
        git(&["add", "."]);
        git(&["commit", "-q", "-m", "x"]);
        let head = git(&["rev-parse", "HEAD"]);
        for f in OWN_OUTPUT {
            std::fs::write(dir.path().join(f), "after\n").unwrap();
        }
        assert_eq!(commit_of(dir.path()), head);
        std::fs::write(dir.path().join("main.rs"), "after\n").unwrap();
        assert_eq!(commit_of(dir.path()), format!("{head}-dirty"));
    }

    #[test]
    fn median_min_max_and_ratio() {
        assert_eq!(stats(&[3.0, 1.0, 2.0]), (Some(2.0), Some(1.0), Some(3.0)));
        assert_eq!(
            stats(&[4.0, 1.0, 2.0, 3.0]),
            (Some(2.5), Some(1.0), Some(4.0))
        );
        assert_eq!(stats(&[]), (None, None, None));
        let r = Row::new("x", "s", Better::Lower, vec![2.0, 4.0, 3.0]).peer("p", vec![6.0]);
        assert_eq!(r.ratio, Some(0.5));
    }

    #[test]
    fn a_rerun_replaces_only_its_group_and_keeps_figure_order() {
        let mut res = Results {
            version: VERSION,
            ..Results::default()
        };
        let mut install = Group::new("install", "Install", false);
        install.rows.push(Row::single("a", "s", 1.0));
        res.put(install, Machine::default());
        let mut http = Group::new("http", "HTTP", false);
        http.rows.push(Row::single("b", "s", 2.0));
        res.put(http, Machine::default());
        let mut http2 = Group::new("http", "HTTP", true);
        http2.error = Some("wrk\nfailed | badly".into());
        res.put(http2, Machine::default());
        let names: Vec<&str> = res.groups.iter().map(|g| g.name.as_str()).collect();
        assert_eq!(names, ["http", "install"]);
        assert!(res.groups[0].rows.is_empty());
        let md = res.markdown();
        assert!(md.contains("**Failed:** wrk failed | badly"), "{md}");
        assert!(md.contains("| a | 1.00 | 1.00 | 1.00 | s |"), "{md}");
    }

    #[test]
    fn each_group_names_the_commit_it_was_measured_at() {
        let mut res = Results::default();
        res.put(Group::new("http", "HTTP", false), Machine::probe(None));
        let commit = &res.groups[0].commit;
        let hash = commit.trim_end_matches("-dirty");
        assert!(
            hash.len() == 40 && hash.chars().all(|c| c.is_ascii_hexdigit()),
            "not a commit: {commit:?}"
        );
        assert!(res.groups[0].machine.cores >= 1);
        let md = res.markdown();
        assert!(md.contains(&format!("at commit {}", &hash[..12])), "{md}");
    }

    #[test]
    fn dates_are_civil_utc() {
        assert_eq!(format_unix(0), "1970-01-01 00:00 UTC");
        assert_eq!(format_unix(1_686_355_200), "2023-06-10 00:00 UTC");
    }
}
