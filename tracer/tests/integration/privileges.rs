//! Least privilege, one test per row of the README's privilege table: what each missing
//! capability costs, said in words that name it and the fix (with this binary's real path),
//! and the capabilities the running daemon keeps.

use std::{
    net::TcpListener,
    os::unix::fs::PermissionsExt as _,
    process::{Command, Output},
};

use caps::{CapSet, Capability};

use crate::common::{self, Daemon, Metrics, NetNs, V4};
use serial_test::parallel;

/// Runs the binary under `wrapper` (e.g. `setpriv ...`) and waits for it to end.
fn run_under(wrapper: &[&str], args: &[&str]) -> Output {
    Command::new(wrapper[0])
        .args(&wrapper[1..])
        .arg(common::tcpstate_bin())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {wrapper:?}: {e}"))
}

#[test]
#[parallel]
fn without_privileges_the_error_says_what_is_missing() {
    // A copy the unprivileged user can execute wherever the checkout lives.
    let dir = std::env::temp_dir().join(format!("tcpstate-unprivileged-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let binary = dir.join("tcpstate");
    std::fs::copy(common::tcpstate_bin(), &binary).unwrap();
    std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
    let unprivileged = |args: &[&str]| {
        std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"])
            .arg(&binary)
            .args(args)
            .output()
            .expect("setpriv (util-linux) runs the binary unprivileged")
    };
    let output = unprivileged(&["watch", "--duration", "1"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("CAP_BPF") && stderr.contains("sudo"), "{stderr}");
    // The fix names this very binary, wherever it lives.
    assert!(stderr.contains(&format!("+ep {}", binary.display())), "{stderr}");
    // With the two capabilities that load programs but not root's access to a tracefs that
    // only root may read (mode 0700, as on this machine): the cause is said, not "not mounted".
    let tracing_mode = std::fs::metadata("/sys/kernel/tracing").map(|m| m.permissions().mode());
    if tracing_mode.is_ok_and(|mode| mode & 0o005 == 0) {
        let output = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .args(["--inh-caps=+bpf,+perfmon", "--ambient-caps=+bpf,+perfmon"])
            .arg(&binary)
            .args(["watch", "--duration", "1"])
            .output()
            .expect("setpriv (util-linux) runs the binary with two capabilities");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("readable by root only"), "{stderr}");
        assert!(
            stderr.contains("CAP_DAC_READ_SEARCH") && !stderr.contains("not mounted"),
            "{stderr}"
        );
    } else {
        eprintln!("/sys/kernel/tracing is readable by others here: the 0700 case is not checked");
    }
    // The missing privileges are the cause, not the busy port the daemon would also meet.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let output = unprivileged(&["run", "--listen", &busy.local_addr().unwrap().to_string()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("CAP_BPF") && !stderr.contains("in use"), "{stderr}");
    // `check` says the same, as a finding, and exits 1: tcpstate cannot run like this.
    let output = unprivileged(&["check"]);
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    let privileges = stdout.lines().find(|l| l.contains("privileges")).unwrap_or_default();
    assert!(privileges.contains("FAILS") && privileges.contains("CAP_BPF"), "{stdout}");
    assert!(stdout.contains("tcpstate cannot run here"), "{stdout}");
}

/// Once attached, every thread of the daemon holds only CAP_BPF (read its counters),
/// CAP_SYS_ADMIN (enter namespaces), CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH (other processes'
/// /proc), in every set, the bounding set included; and it still does its work.
#[test]
#[parallel]
fn the_running_daemon_keeps_only_the_capabilities_it_needs() {
    const DAC_READ_SEARCH: u32 = 2;
    const SYS_PTRACE: u32 = 19;
    const SYS_ADMIN: u32 = 21;
    const BPF: u32 = 39;
    let kept: u64 = (1 << DAC_READ_SEARCH) | (1 << SYS_PTRACE) | (1 << SYS_ADMIN) | (1 << BPF);
    let daemon = Daemon::start(&["--reconcile-interval", "1"]);
    // A reconciliation (which enters namespaces) and a scrape ran with them.
    daemon.after_reconciliations(1);
    let tasks = std::fs::read_dir(format!("/proc/{}/task", daemon.process.pid())).unwrap();
    let mut threads = 0;
    for task in tasks {
        let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
        for set in ["CapEff:", "CapPrm:", "CapBnd:"] {
            let line = status.lines().find(|l| l.starts_with(set)).unwrap();
            let value = u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap();
            assert_eq!(value, kept, "{set} {value:#x} in\n{status}");
        }
        threads += 1;
    }
    assert!(threads >= 3, "the runtime's threads were checked too ({threads})");
    let finished = daemon.stop();
    assert!(finished.status.success(), "{:?}", finished.stderr);
}

/// Without CAP_SYS_ADMIN the daemon cannot enter other network namespaces: it says so once,
/// naming the capability, and exports how many it skipped, instead of quietly partial gauges.
#[test]
#[parallel]
fn namespaces_it_cannot_enter_are_a_warning_and_a_metric() {
    // Debian's kernels default to perf_event_paranoid 3, at which their 5.10 lets only
    // CAP_SYS_ADMIN open perf events; 2 is the upstream default and lets CAP_PERFMON do it.
    let _paranoid = common::Sysctl::at_most("kernel/perf_event_paranoid", 2);
    let _ns = NetNs::create("unentered");
    let no_admin = ["setpriv", "--bounding-set=-sys_admin", "--inh-caps=-sys_admin"];
    let daemon = Daemon::start_under(&no_admin, &["--reconcile-interval", "1"], &[]);
    let scraped = std::panic::catch_unwind(|| daemon.get("/metrics"));
    let Ok(metrics) = scraped else {
        let finished = daemon.stop();
        panic!("no answer from the daemon: {:?}\n{}", finished.status, finished.stderr.join("\n"));
    };
    let skipped = Metrics::parse(&metrics.body).value("tcpstate_netns_skipped", &[]);
    assert!(skipped >= 1.0, "tcpstate_netns_skipped {skipped}");
    // Reconciliations keep finding it; the warning stays one line.
    daemon.after_reconciliations(2);
    let finished = daemon.stop();
    let log = finished.stderr.join("\n");
    let warning = "cannot enter network namespace";
    assert_eq!(log.matches(warning).count(), 1, "{log}");
    assert!(log.contains("CAP_SYS_ADMIN"), "{log}");
}

/// Where nothing mounted tracefs, tcpstate mounts it, which needs CAP_SYS_ADMIN: without it
/// the error names the capability and the mount command. Run in a mount namespace of its own
/// where tracefs is unmounted, so the host's stays.
#[test]
#[parallel]
fn an_unmounted_tracefs_without_cap_sys_admin_is_named_with_the_fix() {
    let _paranoid = common::Sysctl::at_most("kernel/perf_event_paranoid", 2);
    let unmount_tracefs = "umount -l /sys/kernel/tracing 2>/dev/null; \
        umount -l /sys/kernel/debug/tracing 2>/dev/null; exec \"$@\"";
    let wrapper = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        unmount_tracefs,
        "sh",
        "setpriv",
        "--bounding-set=-sys_admin",
        "--inh-caps=-sys_admin",
    ];
    let output = run_under(&wrapper, &["watch", "--duration", "1"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("tracefs is not mounted"), "{stderr}");
    assert!(stderr.contains("CAP_SYS_ADMIN"), "the missing capability: {stderr}");
    assert!(stderr.contains("mount -t tracefs nodev /sys/kernel/tracing"), "the fix: {stderr}");
    // With CAP_SYS_ADMIN, the same unmounted tracefs is mounted and tracing starts.
    let output = run_under(&wrapper[..8], &["watch", "--duration", "1"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
}

/// A port below `net.ipv4.ip_unprivileged_port_start` needs CAP_NET_BIND_SERVICE: the error
/// names it, `--listen`, and this binary.
#[test]
#[parallel]
fn a_privileged_port_without_cap_net_bind_service_is_named_with_the_fix() {
    let start: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .map_or(1024, |s| s.trim().parse().unwrap_or(1024));
    let Some(port) = (1..start).rev().find(|&port| TcpListener::bind((V4, port)).is_ok()) else {
        panic!("no free port below ip_unprivileged_port_start ({start}) to try");
    };
    let wrapper = ["setpriv", "--bounding-set=-net_bind_service", "--inh-caps=-net_bind_service"];
    let listen = format!("127.0.0.1:{port}");
    let output = run_under(&wrapper, &["run", "--listen", &listen]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("CAP_NET_BIND_SERVICE"), "the missing capability: {stderr}");
    assert!(stderr.contains("--listen"), "the flag: {stderr}");
    assert!(stderr.contains(common::tcpstate_bin()), "this binary, for setcap: {stderr}");
}

/// `keep_only` as the daemon calls it, on a thread of its own: capabilities are per thread,
/// and the test runner's other threads keep theirs. Dropping from the bounding set takes
/// CAP_SETPCAP, which is why this runs here, as root, and not among the unit tests.
#[test]
#[parallel]
fn only_what_is_kept_remains_and_cannot_come_back() {
    let outcome = std::thread::spawn(|| {
        let before = caps::read(None, CapSet::Permitted).unwrap();
        let kept = tracer::capabilities::keep_only(&[Capability::CAP_SYS_PTRACE]).unwrap();
        let after = caps::read(None, CapSet::Effective).unwrap();
        let raise = caps::raise(None, CapSet::Effective, Capability::CAP_BPF);
        (before, kept, after, raise.is_err())
    })
    .join()
    .unwrap();
    let (before, kept, after, raise_refused) = outcome;
    assert_eq!(kept, after);
    assert!(after.iter().all(|cap| *cap == Capability::CAP_SYS_PTRACE), "{after:?}");
    assert_eq!(
        after.contains(&Capability::CAP_SYS_PTRACE),
        before.contains(&Capability::CAP_SYS_PTRACE)
    );
    assert!(raise_refused, "a dropped capability came back");
}
