//! The bench's results: every sample in `results.json`, and the table in `RESULTS.md`.
//!
//! A row keeps its raw samples; median, min and max are derived from them when the row is made,
//! so the JSON says exactly what was measured. A rerun of one group replaces that group only.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// Bump when the JSON layout changes incompatibly (an older file is then replaced, not merged).
const VERSION: u32 = 1;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Results {
    pub version: u32,
    pub machine: Machine,
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
    /// The QEMU accelerator the provisioning figures ran with (`kvm` or `tcg`).
    pub accel: Option<String>,
}

/// One figure group as measured by one run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Group {
    pub name: String,
    pub title: String,
    /// Unix seconds when the group finished.
    pub measured_at: u64,
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
    /// This machine; `accel` is carried over from earlier results until provisioning runs.
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

    /// Replace (or add) the group of the same name, keeping the figure order.
    pub fn put(&mut self, mut group: Group) {
        group.measured_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
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
        let m = &self.machine;
        let mut s = String::from("# pxelab benchmarks\n\n");
        s += "Generated by `cargo xtask bench` (rerun it to update; `--only <group>` reruns one group). \
              Each timing is the median of the runs listed in `results.json`, with min and max; \
              *ratio* is our median divided by the peer's median, measured in the same run.\n\n";
        s += &format!(
            "Machine: {} cores, {}, {:.1} GiB RAM, {}, kernel {}; QEMU accelerator: {}.\n",
            m.cores,
            m.cpu_model,
            m.memory_gib,
            m.os,
            m.kernel,
            m.accel.as_deref().unwrap_or("not measured")
        );
        for g in &self.groups {
            s += &format!("\n## {}\n\n", g.title);
            let when = format_unix(g.measured_at);
            s += &format!(
                "Measured {when} in {:.0} s{}.",
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
        res.put(install);
        let mut http = Group::new("http", "HTTP", false);
        http.rows.push(Row::single("b", "s", 2.0));
        res.put(http);
        let mut http2 = Group::new("http", "HTTP", true);
        http2.error = Some("wrk\nfailed | badly".into());
        res.put(http2);
        let names: Vec<&str> = res.groups.iter().map(|g| g.name.as_str()).collect();
        assert_eq!(names, ["http", "install"]);
        assert!(res.groups[0].rows.is_empty());
        let md = res.markdown();
        assert!(md.contains("**Failed:** wrk failed | badly"), "{md}");
        assert!(md.contains("| a | 1.00 | 1.00 | 1.00 | s |"), "{md}");
    }

    #[test]
    fn dates_are_civil_utc() {
        assert_eq!(format_unix(0), "1970-01-01 00:00 UTC");
        assert_eq!(format_unix(1_686_355_200), "2023-06-10 00:00 UTC");
    }
}
