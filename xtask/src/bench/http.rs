//! Figure 2: the boot handler (`pxelab-stack --no-dnsmasq`) against nginx on loopback, both
//! driven by `wrk` in the same run, runs interleaved so drift hits both alike.
//!
//! - `/ipxe?mac=…` for a defined VM: requests/s and p99 latency with 16 clients. nginx serves
//!   the exact bytes our handler answered, as a static file. Our handler does more per request:
//!   it reads the VM's state and appends an `ipxe` event to its timeline, as on a real boot.
//! - `/boot.ipxe` (a fixed chain script, no VM lookup, no event) the same way: the handler's
//!   HTTP path alone, so the cost of recording events is visible as the difference.
//! - A 256 MiB file with 1 and with 16 clients: MiB/s (all bytes read by wrk over the run).
//! - Many installers resuming: 1, 8 and 32 clients each asking the 256 MiB file from a random
//!   MiB boundary (`Range: bytes=N-`, as an installer does after a cut), aggregate MiB/s.
//!
//! Both servers run unprivileged-style from a temp dir (nginx with its own config, pid file and
//! logs there, no system service), on free loopback ports, with access logs off.

use std::path::Path;

use anyhow::{ensure, Context, Result};
use pxelab_contract::{Arch, BootMode, Mac, VmDefinition};
use xshell::cmd;

use super::guards::Server;
use super::report::{Better, Group, Row};
use super::wrk::{self, Wrk, REPORT_LUA};
use super::{free_port, mib, Ctx};
use crate::hostdeps::{HostDep, Probe};
use crate::process;

const MAC: &str = "52:54:00:be:4c:01";
const FILE_SIZE: u64 = 256 << 20;
const FILE_PATH: &str = "/images/bench/x86_64/file-256m.bin";

pub fn run(ctx: &mut Ctx, group: &mut Group) -> Result<()> {
    crate::hostdeps::ensure(&[
        HostDep {
            probe: Probe::Bin("wrk"),
            package: "wrk",
        },
        HostDep {
            probe: Probe::Bin("nginx"),
            package: "nginx-light",
        },
    ])?;
    let stack_bin = ctx.stack_dir()?.join("pxelab-stack");
    let dir = ctx.scratch("http")?;
    // nginx's workers run as nobody: they must be able to reach the served files.
    chmod_755(&dir)?;
    if let Some(parent) = dir.parent() {
        chmod_755(parent)?;
    }
    let data = dir.join("data");
    write_fixture(&data)?;

    let sh = process::shell()?;
    let ours_port = free_port()?;
    let listen = format!("127.0.0.1:{ours_port}");
    let mut ours = Server::spawn(
        "pxelab-stack",
        &mut process::command(cmd!(
            sh,
            "{stack_bin} --data-dir {data} --no-dnsmasq --no-access-log --no-ip-check --listen {listen}"
        )),
        &dir.join("pxelab-stack.log"),
    )?;
    let ours_base = format!("http://127.0.0.1:{ours_port}");
    ours.wait_ready(&format!("{ours_base}/healthz"))?;
    let script = ours.wait_ready(&format!("{ours_base}/ipxe?mac={MAC}"))?;
    ensure!(
        script.starts_with(b"#!ipxe"),
        "/ipxe did not answer an iPXE script: {}",
        String::from_utf8_lossy(&script)
    );
    let chain = ours.wait_ready(&format!("{ours_base}/boot.ipxe"))?;
    std::fs::create_dir_all(dir.join("www"))?;
    std::fs::write(dir.join("www/ipxe.txt"), &script)?;
    std::fs::write(dir.join("www/boot.ipxe.txt"), &chain)?;

    let nginx_port = free_port()?;
    let conf = write_nginx_conf(&dir, &data, nginx_port)?;
    let (prefix, error_log) = (dir.join("nginx"), dir.join("nginx/error.log"));
    let mut nginx = Server::spawn(
        "nginx",
        &mut process::command(cmd!(sh, "nginx -p {prefix} -c {conf} -e {error_log}")),
        &dir.join("nginx.log"),
    )?;
    let nginx_base = format!("http://127.0.0.1:{nginx_port}");
    let same = nginx.wait_ready(&format!("{nginx_base}/ipxe?mac={MAC}"))?;
    ensure!(
        same == script,
        "nginx does not serve the same /ipxe script as the boot handler"
    );
    let same = nginx.wait_ready(&format!("{nginx_base}/boot.ipxe"))?;
    ensure!(
        same == chain,
        "nginx does not serve the same /boot.ipxe script as the boot handler"
    );
    let peer = wrk::nginx_version();
    group.fact("peer", &peer);
    group.fact("wrk", wrk::wrk_version());
    group.fact(
        "setup",
        "both on 127.0.0.1 with access logs off; nginx worker_processes auto, sendfile on; \
         wrk -t 2 (-t 1 for 1 client), same machine as the servers",
    );

    let runs = ctx.runs(3, 1);
    let secs = if ctx.quick { 2 } else { 5 };
    group.fact(
        "runs",
        format!("{runs} × {secs} s per server and workload, interleaved"),
    );
    let workloads = [
        ("/ipxe?mac= (16 clients)", format!("/ipxe?mac={MAC}"), 16),
        ("/boot.ipxe (16 clients)", "/boot.ipxe".to_string(), 16),
        ("256 MiB download, 1 client", FILE_PATH.to_string(), 1),
        ("256 MiB download, 16 clients", FILE_PATH.to_string(), 16),
        (
            "256 MiB resumed at random offsets, 1 installer",
            FILE_PATH.to_string(),
            1,
        ),
        (
            "256 MiB resumed at random offsets, 8 installers",
            FILE_PATH.to_string(),
            8,
        ),
        (
            "256 MiB resumed at random offsets, 32 installers",
            FILE_PATH.to_string(),
            32,
        ),
    ];
    for (label, path, clients) in workloads {
        let ranged = label.contains("resumed");
        let mut us = Vec::new();
        let mut them = Vec::new();
        for i in 0..runs {
            ctx.ui
                .println(format!("bench http: {label}, run {}/{runs}", i + 1));
            // Alternate who goes first: a machine slowing down over the run hurts both alike.
            let order: [bool; 2] = if i % 2 == 0 {
                [true, false]
            } else {
                [false, true]
            };
            for mine in order {
                let (server, base) = if mine {
                    (&mut ours, &ours_base)
                } else {
                    (&mut nginx, &nginx_base)
                };
                let r = wrk(&dir, &format!("{base}{path}"), clients, secs, ranged)
                    .with_context(|| format!("wrk against {} ({label})", server.name))?;
                server.check_alive()?;
                if mine {
                    us.push(r)
                } else {
                    them.push(r)
                }
            }
        }
        let errors = |v: &[Wrk]| v.iter().map(|r| r.errors).sum::<u64>();
        let err_note = format!("errors: ours {}, nginx {}", errors(&us), errors(&them));
        if !path.starts_with("/images/") {
            let rps = |v: &[Wrk]| {
                v.iter()
                    .map(|r| r.requests as f64 / r.secs())
                    .collect::<Vec<_>>()
            };
            let p99 = |v: &[Wrk]| {
                v.iter()
                    .map(|r| r.p99_us as f64 / 1000.0)
                    .collect::<Vec<_>>()
            };
            let what = if path.contains('?') {
                "ours also records an ipxe event per GET (state and timeline in memory, a journal line written in batches)"
            } else {
                "a fixed script: no VM lookup, no event"
            };
            group.push(
                &ctx.ui,
                Row::new(
                    format!("{label}: requests/s"),
                    "req/s",
                    Better::Higher,
                    rps(&us),
                )
                .peer(&peer, rps(&them))
                .note(what)
                .note(&err_note),
            );
            group.push(
                &ctx.ui,
                Row::new(
                    format!("{label}: p99 latency"),
                    "ms",
                    Better::Lower,
                    p99(&us),
                )
                .peer(&peer, p99(&them)),
            );
        } else {
            let rate = |v: &[Wrk]| {
                v.iter()
                    .map(|r| mib(r.bytes) / r.secs())
                    .collect::<Vec<_>>()
            };
            group.push(
                &ctx.ui,
                Row::new(label, "MiB/s", Better::Higher, rate(&us))
                    .peer(&peer, rate(&them))
                    .note(if ranged {
                        "both answer 206 with sendfile from the asked offset"
                    } else {
                        "both use sendfile"
                    })
                    .note(&err_note),
            );
        }
    }
    Ok(())
}

/// Asks the file from a random MiB boundary on: an installer resuming after a cut.
const RANGE_LUA: &str = r#"local mib = 1048576
local chunks = math.floor(tonumber(os.getenv("FILE_SIZE")) / mib)
local seeded = false
request = function()
  if not seeded then math.randomseed(os.time() + math.floor(os.clock() * 1e6)); seeded = true end
  local from = math.random(0, chunks - 1) * mib
  return wrk.format("GET", nil, { ["Range"] = "bytes=" .. from .. "-" })
end
"#;

/// `url` under wrk with the plain reporter, or (`ranged`) with random `Range` requests.
fn wrk(dir: &Path, url: &str, clients: u32, secs: u32, ranged: bool) -> Result<Wrk> {
    let (name, body) = if ranged {
        ("range.lua", format!("{RANGE_LUA}{REPORT_LUA}"))
    } else {
        ("report.lua", REPORT_LUA.to_string())
    };
    let script = dir.join(name);
    if !script.exists() {
        std::fs::write(&script, body)?;
    }
    let env = [("FILE_SIZE", FILE_SIZE.to_string())];
    wrk::run(&process::shell()?, &script, url, clients, secs, &env)
}

/// The handler's data dir: one VM, the files its install script needs to exist (small stand-ins:
/// this figure measures HTTP, nothing boots them) and the 256 MiB download.
fn write_fixture(data: &Path) -> Result<()> {
    let vm = VmDefinition {
        name: "bench-http".into(),
        role: None,
        arch: Arch::X86_64,
        distro: "bench".into(),
        mac: MAC.parse::<Mac>().map_err(|e| anyhow::anyhow!("{e}"))?,
        ssh_key: String::new(),
        kernel: None,
        initrd: None,
        pxeboot: true,
        ip: None,
        ipv6: None,
        hostname: None,
        disk: None,
        boot: BootMode::Install,
        installer_shell: false,
        no_reboot: false,
        firmware_reboot: false,
    };
    let images = data.join("images/bench/x86_64");
    for d in [
        data.join("vms"),
        images.clone(),
        data.join("initrds/x86_64"),
        data.join("state"),
    ] {
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        chmod_755(&d)?;
    }
    std::fs::write(data.join("vms/bench-http.json"), vm.to_json())?;
    std::fs::write(images.join("vmlinuz"), b"bench stand-in for a kernel\n")?;
    std::fs::write(
        images.join("modules.cpio.zst"),
        b"bench stand-in for modules\n",
    )?;
    std::fs::write(
        data.join("initrds/x86_64/initrd.img"),
        b"bench stand-in for the initrd\n",
    )?;
    for d in ["images", "images/bench", "initrds"] {
        chmod_755(&data.join(d))?;
    }
    chmod_755(data)?;
    write_pseudo_random(&data.join(FILE_PATH.trim_start_matches('/')), FILE_SIZE)
}

/// Incompressible bytes (xorshift), so nothing on the path can shortcut them.
fn write_pseudo_random(path: &Path, size: u64) -> Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..size / buf.len() as u64 {
        for chunk in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&buf)?;
    }
    f.flush()?;
    Ok(())
}

fn write_nginx_conf(dir: &Path, data: &Path, port: u16) -> Result<std::path::PathBuf> {
    let www = dir.join("www");
    wrk::nginx_conf(
        dir,
        port,
        &format!(
            "\x20   location = /ipxe {{ default_type \"text/plain; charset=utf-8\"; alias {www}/ipxe.txt; }}\n\
             \x20   location = /boot.ipxe {{ default_type \"text/plain; charset=utf-8\"; alias {www}/boot.ipxe.txt; }}\n\
             \x20   location /images/ {{ root {data}; }}\n",
            www = www.display(),
            data = data.display()
        ),
    )
}

fn chmod_755(p: &Path) -> Result<()> {
    wrk::chmod(p, 0o755)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nginx_serves_the_ipxe_script_and_images_from_the_fixture() {
        let dir = tempfile::tempdir().unwrap();
        let conf = write_nginx_conf(dir.path(), &dir.path().join("data"), 8099).unwrap();
        let text = std::fs::read_to_string(conf).unwrap();
        assert!(text.contains("listen 127.0.0.1:8099;"), "{text}");
        assert!(
            text.contains(&format!("alias {}/www/ipxe.txt;", dir.path().display())),
            "{text}"
        );
        assert!(text.contains("access_log off;"));
    }
}
