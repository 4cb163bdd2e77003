//! The kernel's per-socket map: sized for the host at start, and when it holds fewer sockets
//! than there are, the kernel forgets the least recently changed ones, the daemon says so
//! once and measures their stays from its own table.

use std::{
    net::{TcpListener, TcpStream},
    time::Duration,
};

use crate::common::{self, Daemon, V4};
use serial_test::{parallel, serial};

const CONNECTIONS: usize = 3000;
const WARNING: &str = "over 80 % of the kernel's per-socket map";

/// Completed ESTABLISHED stays the daemon measured, and its untracked sightings by cause.
fn established_stays(daemon: &Daemon) -> (f64, f64) {
    let metrics = daemon.scrape();
    let (count, _, _) =
        metrics.histogram("tcpstate_state_duration_seconds", &[("state", "ESTABLISHED")]);
    let evicted =
        metrics.value("tcpstate_kernel_untracked_sightings_total", &[("cause", "evicted")]);
    (count, evicted)
}

/// Serial: the stay histogram has no label to tell this test's sockets from others'.
#[test]
#[serial]
fn stays_are_exact_when_the_kernel_map_overflows() {
    common::allow_open_files(4 * CONNECTIONS as u64);
    let mut daemon = Daemon::start(&["--kernel-sockets", "1024"]);
    let started = daemon.process.wait_for_stderr("kernel map: ", Duration::ZERO);
    assert!(started.contains("kernel map: 1024 sockets (--kernel-sockets)"), "{started}");
    let listener = TcpListener::bind((V4, 0)).unwrap();
    let target = listener.local_addr().unwrap();
    let held: Vec<(TcpStream, TcpStream)> = (0..CONNECTIONS)
        .map(|_| {
            let client = TcpStream::connect(target).unwrap();
            (client, listener.accept().unwrap().0)
        })
        .collect();
    daemon.process.wait_for_stderr(WARNING, Duration::from_secs(10));
    let (before, evicted_before) = established_stays(&daemon);
    // The client closes first: each connection ends two ESTABLISHED stays, most of them of
    // sockets the kernel's map of 1024 slots has long forgotten.
    for (client, _) in &held {
        client.shutdown(std::net::Shutdown::Both).unwrap();
    }
    drop(held);
    // Each scrape's own connection ends two more stays, counted by the next scrape.
    let mut scrapes = 1.0;
    let (grown, evicted) = common::eventually(Duration::from_secs(20), || {
        let (count, evicted) = established_stays(&daemon);
        let grown = count - before;
        let wanted = (2 * CONNECTIONS) as f64 + 2.0 * scrapes;
        scrapes += 1.0;
        (grown == wanted)
            .then_some((grown, evicted))
            .ok_or(format!("{grown} ESTABLISHED stays, {wanted} wanted"))
    });
    assert!(grown >= (2 * CONNECTIONS) as f64);
    assert!(
        evicted - evicted_before >= (2 * CONNECTIONS - 1024) as f64,
        "the kernel cannot have held more than 1024 of {} sockets: {} evicted",
        2 * CONNECTIONS,
        evicted - evicted_before
    );
    let finished = daemon.stop();
    let warnings = finished.stderr.iter().filter(|line| line.contains(WARNING)).count();
    assert_eq!(warnings, 1, "the warning comes once: {:?}", finished.stderr);
    assert!(finished.stderr.iter().any(|l| l.contains("--kernel-sockets")), "it names the flag");
}

/// Without --kernel-sockets the daemon sizes the map for the sockets present, and says so.
#[test]
#[parallel]
fn the_kernel_map_is_sized_for_the_sockets_present() {
    let listener = TcpListener::bind((V4, 0)).unwrap();
    let target = listener.local_addr().unwrap();
    let _held: Vec<(TcpStream, TcpStream)> = (0..500)
        .map(|_| (TcpStream::connect(target).unwrap(), listener.accept().unwrap().0))
        .collect();
    let mut daemon = Daemon::start(&[]);
    let started = daemon.process.wait_for_stderr("kernel map: ", Duration::ZERO);
    let sized = started.split("kernel map: ").nth(1).unwrap_or_else(|| panic!("{started}"));
    let numbers: Vec<u64> =
        sized.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse().ok()).collect();
    let [slots, present] = numbers[..] else { panic!("{sized}") };
    assert!(present >= 1000, "the 1000 sockets held are counted: {sized}");
    assert!(slots >= 2 * present && slots >= 262_144 && slots.is_power_of_two(), "{sized}");
    let metrics = daemon.scrape();
    let bytes = metrics.value("tcpstate_kernel_map_bytes", &[("map", "SOCKETS")]);
    // At least the key and value per slot (kernels account the element header differently).
    assert!(bytes >= slots as f64 * 32.0, "{bytes} bytes for {slots} slots");
    daemon.stop();
}
