//! The iPXE set served over TFTP: binaries taken unchanged from Debian's `ipxe` package (trixie,
//! which also ships arm64), and the chain script every iPXE fetches first.

/// Output name → path inside the `ipxe` package. The output names are the ones the runtime's
/// dnsmasq configuration hands out (see `runtime/`).
pub const BINARIES: &[(&str, &str)] = &[
    ("ipxe.efi", "/usr/lib/ipxe/ipxe-amd64.efi"),
    ("snponly.efi", "/usr/lib/ipxe/snponly.efi"),
    ("undionly.kpxe", "/usr/lib/ipxe/undionly.kpxe"),
    ("ipxe-arm64.efi", "/usr/lib/ipxe/ipxe-arm64.efi"),
];

/// The name of the chain script in the TFTP root.
pub const CHAIN_SCRIPT: &str = "boot.ipxe";

/// The first script an iPXE runs when it is pointed at TFTP (the runtime also serves an
/// equivalent `/boot.ipxe` over HTTP, which its own dnsmasq hands out): hand over to the boot
/// handler, which knows the machine by its MAC. If that fails (an iPXE NIC ROM without HTTP, or
/// the handler is not up yet), a BIOS machine reloads our own full build over TFTP once; after
/// five failed tries the script exits so the firmware moves on to its next boot device.
///
/// The loop guard tests `${net0/chip}`, not `${net0/bustype}`: under undionly.kpxe the bus type
/// still reads PCI, so only the driver name (`undionly`) shows that our build already runs.
pub fn chain_script() -> String {
    "#!ipxe
# pxelab chain script: the boot handler picks what this machine boots, by MAC.
:handler
chain --autofree http://${next-server}/ipxe?mac=${mac} ||
# Still here: this iPXE cannot speak HTTP (some NIC ROMs) or the handler did not answer.
# Loop guard: undionly.kpxe reports bustype PCI too, so test the driver name instead.
iseq ${net0/chip} undionly && goto wait ||
iseq ${platform} pcbios && chain --autofree undionly.kpxe ||
:wait
set pxelab-tries ${pxelab-tries}x
iseq ${pxelab-tries} xxxxx && goto giveup ||
echo pxelab: no answer from http://${next-server}/ipxe?mac=${mac} - retrying in 5 s
sleep 5
goto handler
:giveup
echo pxelab: no boot instructions after 5 tries; leaving network boot
exit 1
"
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_script_chains_to_the_handler_with_the_mac_and_guards_the_undi_loop() {
        let s = chain_script();
        assert!(s.starts_with("#!ipxe\n"));
        let lines: Vec<&str> = s.lines().collect();
        let first_cmd = lines
            .iter()
            .find(|l| !l.starts_with('#') && !l.starts_with(':'))
            .unwrap();
        assert_eq!(
            *first_cmd,
            "chain --autofree http://${next-server}/ipxe?mac=${mac} ||"
        );
        // Loop guard: when undionly already runs, never chain undionly again.
        let guard = s
            .find("iseq ${net0/chip} undionly && goto wait")
            .expect("loop guard present");
        let reload = s
            .find("chain --autofree undionly.kpxe")
            .expect("BIOS reload present");
        assert!(guard < reload, "the guard must run before the reload");
        assert!(
            !s.contains("${net0/bustype}"),
            "bustype reads PCI under undionly and cannot guard"
        );
        assert!(BINARIES.iter().any(|(n, _)| *n == "undionly.kpxe"));
        // Every label that is jumped to exists, and the retry loops back to the handler.
        for label in ["handler", "wait", "giveup"] {
            assert!(lines.contains(&format!(":{label}").as_str()), "{label}");
        }
        // Bounded: the retry counter gives up and hands back to the firmware with a failure.
        assert!(s.contains("iseq ${pxelab-tries} xxxxx && goto giveup"));
        assert_eq!(lines.last(), Some(&"exit 1"));
    }
}
