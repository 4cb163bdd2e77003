//! Containers, for real: the image `cargo xtask image` builds, run by podman the way the
//! DaemonSet runs it; a leaking process inside a podman container; and a process placed in a
//! cgroup laid out the way the kubelet lays out a pod. Host only (the VMs have no podman).

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use crate::common::{self, Closer, Metrics, Tcpstate, V4};
use crate::leaks::{Helper, hang_up_on, leaks_until};
use serde_json::Value;
use serial_test::parallel;

/// podman's flags for this machine: runc (crun refuses its hybrid cgroup layout), cgroupfs
/// (no systemd session), and the file limits runc needs under this sandbox's cap.
const PODMAN: [&str; 4] = ["--runtime", "runc", "--cgroup-manager", "cgroupfs"];
const LIMITS: [&str; 4] = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"];

fn podman(args: &[&str]) -> Output {
    Command::new("podman")
        .args(PODMAN)
        .args(args)
        .output()
        .expect("podman (installed by cargo xtask test)")
}

/// A detached container, removed when dropped.
struct Container {
    id: String,
}

impl Container {
    fn run(args: &[&str]) -> Self {
        let mut full = vec!["run", "--detach"];
        full.extend(LIMITS);
        full.extend(args);
        let output = podman(&full);
        assert!(
            output.status.success(),
            "podman run {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Self { id: String::from_utf8_lossy(&output.stdout).trim().to_owned() }
    }

    fn logs(&self) -> String {
        let output = podman(&["logs", &self.id]);
        String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr)
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman(&["rm", "--force", "--time", "0", &self.id]);
    }
}

/// The image under test: `cargo xtask test` builds it and names it in TCPSTATE_TEST_IMAGE.
fn image_under_test() -> Option<String> {
    let image = std::env::var("TCPSTATE_TEST_IMAGE").ok();
    if image.is_none() {
        eprintln!(
            "SKIPPED: TCPSTATE_TEST_IMAGE is not set; `cargo xtask test` builds the image with \
             `cargo xtask image` and sets it"
        );
    }
    image
}

/// The image, run as the DaemonSet runs it (host PID and network, the capabilities it lists,
/// the host's tracefs), counts a scripted workload exactly, seen from the host.
#[test]
#[parallel]
fn the_image_run_by_podman_counts_a_workload_exactly() {
    let Some(image) = image_under_test() else { return };
    let _paranoid = common::Sysctl::at_most("kernel/perf_event_paranoid", 2);
    let listener = TcpListener::bind((V4, 0)).unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    let listen_port = common::ReservedPort::new();
    let listen = listen_port.addr().to_string();
    let env = format!("TCPSTATE_LISTEN={listen}");
    let container = Container::run(&[
        "--pid",
        "host",
        "--network",
        "host",
        "--cap-drop",
        "all",
        "--cap-add",
        "bpf,perfmon,sys_admin,sys_ptrace,dac_read_search,sys_resource",
        "--volume",
        "/sys/kernel/tracing:/sys/kernel/tracing",
        "--read-only",
        "--env",
        &env,
        &image,
        "run",
        "--port-label",
        &port,
    ]);
    let addr: std::net::SocketAddr = listen.parse().unwrap();
    common::eventually(Duration::from_secs(30), || {
        std::net::TcpStream::connect(addr)
            .map(drop)
            .map_err(|e| format!("{addr}: {e}; the container says:\n{}", container.logs()))
    });
    // The port is bound before the programs attach; it answers once they are attached.
    let health = common::http_get(addr, "/healthz");
    assert_eq!(health.status, 200, "{}\n{}", health.body, container.logs());
    const CONNECTIONS: usize = 5;
    for _ in 0..CONNECTIONS {
        common::one_connection(&listener, V4, Closer::Client);
    }
    // The server side of each, on the labelled port.
    let expected = [
        ("LISTEN", "SYN_RECV"),
        ("SYN_RECV", "ESTABLISHED"),
        ("ESTABLISHED", "CLOSE_WAIT"),
        ("CLOSE_WAIT", "LAST_ACK"),
        ("LAST_ACK", "CLOSE"),
    ];
    common::eventually(Duration::from_secs(10), || {
        let metrics = Metrics::parse(&common::http_get(addr, "/metrics").body);
        for (from, to) in expected {
            let labels = [("from", from), ("to", to), ("port", port.as_str())];
            let count = metrics.value("tcpstate_transitions_total", &labels);
            if count != CONNECTIONS as f64 {
                return Err(format!("{from} -> {to} on :{port}: {count}"));
            }
        }
        Ok(())
    });
    let metrics = Metrics::parse(&common::http_get(addr, "/metrics").body);
    assert_eq!(metrics.sum("tcpstate_events_lost_total", &[]), 0.0);
}

/// A root filesystem with a static busybox and the applets the container's script uses; one
/// per test, which removes it when done (a shared one vanished under a running container).
fn busybox_rootfs() -> PathBuf {
    static MADE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("tcpstate-rootfs-{}-{n}", std::process::id()));
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let busybox = bin.join("busybox");
    if !busybox.exists() {
        std::fs::copy("/bin/busybox", &busybox).expect("busybox-static (installed by xtask)");
    }
    for applet in ["sh", "nc", "sleep", "timeout"] {
        let link = bin.join(applet);
        if !link.exists() {
            std::os::unix::fs::symlink("busybox", &link).unwrap();
        }
    }
    for empty in ["proc", "sys", "dev", "etc", "tmp"] {
        std::fs::create_dir_all(dir.join(empty)).unwrap();
    }
    dir
}

/// A container of the busybox root filesystem, in a network namespace of its own, running
/// `script` with `sh`; `options` go to `podman run` before the image.
fn busybox_container(rootfs: &Path, options: &[&str], script: &str) -> Container {
    let mut args = vec!["--network", "none"];
    args.extend(options);
    args.extend(["--rootfs", rootfs.to_str().unwrap(), "/bin/sh", "-c", script]);
    Container::run(&args)
}

/// A server that hands each accepted socket on port 7000 to `sleep`, which never reads or
/// closes it, and a client that hangs up after a second: one socket leaked in CLOSE_WAIT.
const LEAK_SCRIPT: &str =
    "nc -l -p 7000 -e sleep 600 & sleep 1; timeout 1 nc 127.0.0.1 7000 </dev/null; sleep 600";

/// The leak entries of `report` whose container is `id`.
fn of_container<'a>(report: &'a Value, id: &str) -> Vec<&'a Value> {
    let processes = report["processes"].as_array().unwrap();
    processes.iter().filter(|p| p["container_id"] == id).collect()
}

/// A process in a podman container (its own network namespace) that never closes a socket
/// its peer hung up on: the daemon on the host names the container, the process's host pid
/// and its comm.
#[test]
#[parallel]
fn a_leak_inside_a_podman_container_names_the_container_and_the_process() {
    let daemon = common::Daemon::start(&["--close-wait-threshold", "1"]);
    let rootfs = busybox_rootfs();
    let container = busybox_container(&rootfs, &[], LEAK_SCRIPT);
    let report = leaks_until(&daemon, Duration::from_secs(20), |r| {
        of_container(r, &container.id).iter().any(|p| p["count"] == 1)
    });
    let found = of_container(&report, &container.id);
    assert_eq!(found.len(), 1, "{report:#}\n{}", container.logs());
    let leak = found[0];
    assert_eq!(leak["comm"], "sleep", "{leak:#}");
    let pid = leak["pid"].as_u64().expect("a pid");
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(cgroup.contains(&container.id), "pid {pid} as the host sees it: {cgroup}");
    assert_eq!(leak["sockets"][0]["local_port"], 7000);
    let _ = std::fs::remove_dir_all(&rootfs);
    daemon.stop();
}

/// Every cgroup mount (v1 hierarchies and v2): where runc makes a container's parent cgroup.
fn cgroup_mounts() -> Vec<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    mounts
        .lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let fs_type = after.split(' ').next()?;
            matches!(fs_type, "cgroup" | "cgroup2")
                .then(|| before.split(' ').nth(4).map(PathBuf::from))?
        })
        .collect()
}

/// The kernel names each socket's owner with its cgroup: `watch --cgroup` shows only the
/// transitions of a container's processes (with their `cgroup` and `container_id`), and
/// `/api/sockets` lists the container's sockets with the container named.
#[test]
#[parallel]
fn the_kernel_names_the_cgroup_watch_filters_on_and_listings_show() {
    let parent = format!("/tcpstate-test-{}", std::process::id());
    let daemon = common::Daemon::start(&[]);
    let mut watch = Tcpstate::start(&["watch", "--json", "--cgroup", &parent]);
    let rootfs = busybox_rootfs();
    let container = busybox_container(&rootfs, &["--cgroup-parent", &parent], LEAK_SCRIPT);
    // Meanwhile, traffic of this (host) process, which the filter must leave out.
    let listener = TcpListener::bind((V4, 0)).unwrap();
    common::one_connection(&listener, V4, Closer::Client);
    // The container's listener, then its client's connect, at least.
    let mut lines = Vec::new();
    let connect = |line: &String| {
        let line: Value = serde_json::from_str(line).unwrap();
        line["old"] == "CLOSE" && line["new"] == "SYN_SENT" && line["dport"] == 7000
    };
    while !lines.iter().any(connect) {
        let seen = lines.len();
        watch.stdout_lines(seen + 1, Duration::from_secs(15), &mut lines);
        if lines.len() == seen {
            let logs = container.logs();
            let finished = watch.interrupt();
            let daemon_said = daemon.stop().stderr;
            panic!(
                "no connect from the container in {lines:#?}\nwatch: {:#?}\ncontainer: {logs}\n\
                 daemon: {daemon_said:#?}",
                finished.stderr
            );
        }
    }
    let listed = common::eventually(Duration::from_secs(10), || {
        let sockets = daemon.get("/api/sockets").json();
        let ours: Vec<Value> = sockets
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["container_id"] == container.id.as_str())
            .cloned()
            .collect();
        (!ours.is_empty()).then_some(ours).ok_or(format!("no socket of {}", container.id))
    });
    let finished = watch.interrupt();
    let shown: Vec<Value> = finished
        .stdout
        .iter()
        .chain(&lines)
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    for line in &shown {
        assert_eq!(line["container_id"], container.id.as_str(), "{line}");
        let cgroup = line["cgroup"].as_str().unwrap();
        assert!(cgroup.starts_with(&format!("{parent}/")), "{line}");
    }
    for socket in &listed {
        assert_eq!(socket["remote_port"], 7000, "the client's socket: {socket}");
        assert!(socket["cgroup"].as_str().unwrap().ends_with(&container.id), "{socket}");
    }
    drop(container);
    daemon.stop();
    let _ = std::fs::remove_dir_all(&rootfs);
    for mount in cgroup_mounts() {
        let _ = std::fs::remove_dir(mount.join(parent.trim_start_matches('/')));
    }
}

/// `--group-by container` splits the socket gauges and the leaked-sockets gauge by the
/// owner's container (`container` is the id's first 12 digits outside Kubernetes), and each
/// state's series still sum to its exact count.
#[test]
#[parallel]
fn group_by_container_labels_the_gauges_with_the_container() {
    let daemon = common::Daemon::start(&["--group-by", "container", "--close-wait-threshold", "1"]);
    let rootfs = busybox_rootfs();
    // One socket leaked in CLOSE_WAIT (held by sleep), one connection kept established.
    let script = "nc -l -p 7000 -e sleep 600 & nc -l -p 7001 -e sleep 600 & sleep 1; \
                  timeout 1 nc 127.0.0.1 7000 </dev/null; sleep 600 | nc 127.0.0.1 7001";
    let container = busybox_container(&rootfs, &[], script);
    let short = &container.id[..12];
    let ours = [("namespace", ""), ("pod", ""), ("container", short)];
    let accept_hook = daemon
        .scrape()
        .value("tcpstate_probe_info", &[("program", "accept_owner"), ("active", "true")]);
    // The client's socket has its owner from connect(); the accepted one only where the
    // kernel's accept hook runs.
    let established = 1.0 + accept_hook;
    let metrics = common::eventually(Duration::from_secs(20), || {
        let metrics = daemon.scrape();
        let leaked = metrics.value(
            "tcpstate_close_wait_leaked_sockets",
            &[("comm", "sleep"), ours[0], ours[1], ours[2]],
        );
        let sockets = metrics.value("tcpstate_sockets", &[("state", "ESTABLISHED"), ours[2]]);
        (leaked == 1.0 && sockets == established)
            .then_some(metrics)
            .ok_or(format!("leaked {leaked}, ESTABLISHED {sockets}:\n{}", container.logs()))
    });
    for sample in &metrics.scrape.samples {
        if sample.metric == "tcpstate_sockets" {
            let prometheus_parse::Value::Gauge(value) = sample.value else { continue };
            assert!(value >= 0.0, "{sample:?}");
            assert!(sample.labels.get("container").is_some(), "every series is grouped");
        }
    }
    drop(container);
    daemon.stop();
    let _ = std::fs::remove_dir_all(&rootfs);
}

/// Directories made for a test, removed (deepest first) when dropped.
struct Made(Vec<PathBuf>);

impl Drop for Made {
    fn drop(&mut self) {
        for dir in self.0.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// A process moved into a cgroup laid out as the kubelet (systemd driver) and containerd lay
/// out a pod's container, with the pod's log directory where the kubelet keeps it: its leak
/// names the container, the pod uid, and the pod's namespace and name.
#[test]
#[parallel]
fn a_leak_in_a_kubelet_pod_cgroup_names_the_pod() {
    const UID: &str = "7d3c1f0e-52b4-4c1e-9a6f-0b2d4e6f8a1c";
    let id = format!("{:064x}", 0x7c57_a7e5_u64 + u64::from(std::process::id()));
    let root = tracer::cgroups::cgroup2_mount().expect("a cgroup2 mount");
    let pod = format!("kubepods-burstable-pod{}.slice", UID.replace('-', "_"));
    let mut made = Made(Vec::new());
    let mut dir = root.clone();
    for part in
        ["kubepods.slice", "kubepods-burstable.slice", &pod, &format!("cri-containerd-{id}.scope")]
    {
        dir = dir.join(part);
        if std::fs::create_dir(&dir).is_ok() {
            made.0.push(dir.clone());
        }
    }
    let logs = Path::new("/var/log/pods").join(format!("shop_checkout-7f9c_{UID}"));
    std::fs::create_dir_all(&logs).unwrap();
    // An entry named against the convention is skipped, not fatal.
    let odd = Path::new("/var/log/pods").join("not-a-pod-directory");
    std::fs::create_dir_all(&odd).unwrap();
    let daemon = common::Daemon::start(&["--close-wait-threshold", "1"]);
    let leaky = Helper::start("leak", "pod-leaker", &[]);
    std::fs::write(dir.join("cgroup.procs"), leaky.pid().to_string()).unwrap();
    hang_up_on(leaky.port, 2);
    let report = leaks_until(&daemon, Duration::from_secs(10), |r| {
        crate::leaks::process(r, leaky.pid()).is_some_and(|p| p["count"] == 2)
    });
    let leak = crate::leaks::process(&report, leaky.pid()).cloned();
    // Out of the pod's cgroup before it is removed.
    std::fs::write(root.join("cgroup.procs"), leaky.pid().to_string()).unwrap();
    drop(leaky);
    let _ = std::fs::remove_dir(&logs);
    let _ = std::fs::remove_dir(&odd);
    daemon.stop();
    let leak = leak.unwrap_or_else(|| panic!("no leak reported: {report:#}"));
    assert_eq!(leak["container_id"], id.as_str(), "{leak:#}");
    assert_eq!(leak["pod_uid"], UID, "{leak:#}");
    assert_eq!(leak["pod_namespace"], "shop", "{leak:#}");
    assert_eq!(leak["pod_name"], "checkout-7f9c", "{leak:#}");
    assert!(leak["cgroup"].as_str().unwrap().ends_with(&format!("cri-containerd-{id}.scope")));
}
