//! Figure: a boot storm. A room of machines powers on at once and every one asks
//! `/ipxe?mac=<its MAC>`; the boot handler (`pxelab-stack --no-dnsmasq`) answers each with its
//! install script (a new boot token in each) and records the boot, against nginx serving the
//! same bytes as a static file, both driven by `wrk` in the same run, runs interleaved.
//!
//! - 1,000 and 10,000 defined machines; wrk's Lua script rotates the MAC of every request over
//!   all of them (each wrk thread from its own offset), so no lookup is the previous one.
//! - 16 and 64 connections: requests/s, p50 and p99 latency.
//! - nginx answers every request with machine 0's script (every script has the same length: the
//!   names and MACs are fixed-width), with `open_file_cache` off as shipped.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{ensure, Context, Result};
use pxelab_contract::VmDefinition;
use xshell::{cmd, Shell};

use super::guards::Server;
use super::report::{Better, Group, Row};
use super::wrk::{self, Wrk};
use super::{free_port, Ctx};
use crate::hostdeps::{HostDep, Probe};
use crate::process;

const SIZES: [usize; 2] = [1_000, 10_000];
const CLIENTS: [u32; 2] = [16, 64];

/// Rotates the MAC over `MACHINES` machines ([`wrk::REPORT_LUA`] follows it).
const WRK_SCRIPT: &str = r#"local n = tonumber(os.getenv("MACHINES"))
local counter = 0
local threads = 0
setup = function(thread) thread:set("offset", threads * 7919); threads = threads + 1 end
init = function(args) counter = offset end
request = function()
  counter = counter + 1
  local i = counter % n
  return wrk.format("GET", string.format("/ipxe?mac=52:54:10:%02x:%02x:%02x",
    math.floor(i / 65536) % 256, math.floor(i / 256) % 256, i % 256))
end
"#;

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
    let dir = ctx.scratch("storm")?;
    // nginx's workers run as nobody: they must be able to reach the served file.
    for d in [dir.parent(), Some(dir.as_path())].into_iter().flatten() {
        wrk::chmod(d, 0o755)?;
    }
    let sh = Shell::new()?;
    let script = dir.join("storm.lua");
    std::fs::write(&script, format!("{WRK_SCRIPT}{}", wrk::REPORT_LUA))?;
    let www = dir.join("www");
    std::fs::create_dir_all(&www)?;
    wrk::chmod(&www, 0o755)?;

    let nginx_port = free_port()?;
    let conf = write_nginx_conf(&dir, nginx_port)?;
    let prefix = dir.join("nginx");
    let error_log = prefix.join("error.log");
    let mut nginx = Server::spawn(
        "nginx",
        &mut process::command(cmd!(sh, "nginx -p {prefix} -c {conf} -e {error_log}")),
        &dir.join("nginx.log"),
    )?;
    let nginx_base = format!("http://127.0.0.1:{nginx_port}");
    let peer = wrk::nginx_version();
    group.fact("peer", &peer);
    group.fact(
        "setup",
        "both on 127.0.0.1, access logs off; nginx worker_processes auto; wrk -t 2 on the same \
         2-core machine as the servers; ours records an ipxe event per request (state kept, \
         timeline appended, the first boot of each machine made durable before its reply)",
    );
    let runs = ctx.runs(3, 1);
    let secs = if ctx.quick { 2 } else { 5 };
    group.fact(
        "runs",
        format!("{runs} × {secs} s per server, size and connection count, interleaved"),
    );

    for machines in SIZES {
        let data = dir.join(format!("data-{machines}"));
        write_fixture(&data, machines)?;
        let port = free_port()?;
        let listen = format!("127.0.0.1:{port}");
        let mut ours = Server::spawn(
            "pxelab-stack",
            &mut process::command(cmd!(
                sh,
                "{stack_bin} --data-dir {data} --no-dnsmasq --no-nfs --no-access-log --no-ip-check --listen {listen}"
            )),
            &dir.join(format!("pxelab-stack-{machines}.log")),
        )?;
        let ours_base = format!("http://{listen}");
        ours.wait_ready(&format!("{ours_base}/healthz"))?;
        let first = format!("/ipxe?mac={}", mac(0));
        let reply = ours.wait_ready(&format!("{ours_base}{first}"))?;
        ensure!(
            reply.starts_with(b"#!ipxe") && reply.windows(11).any(|w| w == b"config_url="),
            "/ipxe did not answer an install script (kernel with its config URL): {}",
            String::from_utf8_lossy(&reply)
        );
        std::fs::write(www.join("ipxe.txt"), &reply)?;
        let same = nginx.wait_ready(&format!("{nginx_base}{first}"))?;
        ensure!(
            same == reply,
            "nginx does not serve the boot handler's script"
        );

        for clients in CLIENTS {
            let label = format!("{machines} machines, {clients} connections");
            let mut samples: BTreeMap<bool, Vec<Wrk>> = BTreeMap::new();
            for i in 0..runs {
                ctx.ui
                    .println(format!("bench storm: {label}, run {}/{runs}", i + 1));
                // Alternate who goes first: a machine slowing down over the run hurts both alike.
                for mine in [i % 2 == 0, i % 2 != 0] {
                    let (server, base) = if mine {
                        (&mut ours, &ours_base)
                    } else {
                        (&mut nginx, &nginx_base)
                    };
                    let r = wrk(&sh, &script, base, machines, clients, secs)
                        .with_context(|| format!("wrk against {} ({label})", server.name))?;
                    server.check_alive()?;
                    samples.entry(mine).or_default().push(r);
                }
            }
            let (us, them) = (&samples[&true], &samples[&false]);
            let errors = |v: &[Wrk]| v.iter().map(|r| r.errors).sum::<u64>();
            let err_note = format!("errors: ours {}, nginx {}", errors(us), errors(them));
            let rps = |v: &[Wrk]| v.iter().map(Wrk::rps).collect::<Vec<_>>();
            let ms = |v: &[Wrk], f: fn(&Wrk) -> u64| {
                v.iter().map(|r| f(r) as f64 / 1000.0).collect::<Vec<_>>()
            };
            group.push(
                &ctx.ui,
                Row::new(
                    format!("{label}: requests/s"),
                    "req/s",
                    Better::Higher,
                    rps(us),
                )
                .peer(&peer, rps(them))
                .note(&err_note),
            );
            for (what, f) in [
                ("p50", (|w: &Wrk| w.p50_us) as fn(&Wrk) -> u64),
                ("p99", |w: &Wrk| w.p99_us),
            ] {
                group.push(
                    &ctx.ui,
                    Row::new(
                        format!("{label}: {what} latency"),
                        "ms",
                        Better::Lower,
                        ms(us, f),
                    )
                    .peer(&peer, ms(them, f)),
                );
            }
        }
    }
    Ok(())
}

/// Machine `i`'s MAC, as the Lua script spells it.
fn mac(i: usize) -> String {
    format!(
        "52:54:10:{:02x}:{:02x}:{:02x}",
        (i >> 16) & 255,
        (i >> 8) & 255,
        i & 255
    )
}

fn wrk(
    sh: &Shell,
    script: &Path,
    base: &str,
    machines: usize,
    clients: u32,
    secs: u32,
) -> Result<Wrk> {
    wrk::run(
        sh,
        script,
        &format!("{base}/"),
        clients,
        secs,
        &[("MACHINES", machines.to_string())],
    )
}

/// `machines` VM definitions (fixed-width names and MACs) and small stand-ins for the files an
/// install script names (nothing boots them here).
fn write_fixture(data: &Path, machines: usize) -> Result<()> {
    let images = data.join("images/storm/x86_64");
    for d in [
        data.join("vms"),
        images.clone(),
        data.join("initrds/x86_64"),
        data.join("state"),
    ] {
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    }
    for i in 0..machines {
        let json = format!(
            r#"{{"name":"m{i:06}","arch":"x86_64","distro":"storm","mac":"{}","pxeboot":true}}"#,
            mac(i)
        );
        let vm = VmDefinition::from_json(&json).map_err(|e| anyhow::anyhow!("{e}"))?;
        std::fs::write(data.join(format!("vms/{}.json", vm.name)), vm.to_json())?;
    }
    std::fs::write(images.join("vmlinuz"), b"stand-in kernel\n")?;
    std::fs::write(images.join("modules.cpio.zst"), b"stand-in modules\n")?;
    std::fs::write(data.join("initrds/x86_64/initrd.img"), b"stand-in initrd\n")?;
    Ok(())
}

fn write_nginx_conf(dir: &Path, port: u16) -> Result<std::path::PathBuf> {
    wrk::nginx_conf(
        dir,
        port,
        &format!(
            "\x20   location = /ipxe {{ default_type \"text/plain; charset=utf-8\"; alias {}/ipxe.txt; }}\n",
            dir.join("www").display()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_are_fixed_width_and_match_the_lua_rotation() {
        assert_eq!(mac(0), "52:54:10:00:00:00");
        assert_eq!(mac(9_999), "52:54:10:00:27:0f");
        assert!(WRK_SCRIPT.contains("/ipxe?mac=52:54:10:%02x:%02x:%02x"));
        let dir = tempfile::tempdir().unwrap();
        write_fixture(dir.path(), 3).unwrap();
        let vm = std::fs::read_to_string(dir.path().join("vms/m000002.json")).unwrap();
        assert!(vm.contains(&mac(2)), "{vm}");
        // A storm of machines to install: without `pxeboot` a machine boots its disk, and the
        // storm would measure the shorter local-boot reply without a token.
        let vm = VmDefinition::from_json(&vm).unwrap();
        assert!(vm.pxeboot, "{vm:?}");
    }
}
