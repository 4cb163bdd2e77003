//! The HTTP endpoint under hostile clients: idle connections and clients that trickle their
//! headers cannot keep the liveness probe or a scrape from being served.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use serial_test::serial;

use crate::common::{Daemon, http_get, require_root};

/// Connects and sends `GET /metrics HTTP/1.1\r\n...` one byte a second, forever; reconnects
/// when the server closes. Counts the server's closes.
fn slowloris(addr: SocketAddr, running: Arc<AtomicBool>, closed: Arc<AtomicU64>) {
    const REQUEST: &[u8] = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Padding: aaaaaaaaaaaaaaaaaaaa";
    while running.load(Ordering::Relaxed) {
        let Ok(mut stream) = TcpStream::connect(addr) else {
            thread::sleep(Duration::from_millis(100));
            continue;
        };
        for byte in REQUEST.iter().cycle() {
            if !running.load(Ordering::Relaxed) || stream.write_all(&[*byte]).is_err() {
                break;
            }
            thread::sleep(Duration::from_secs(1));
        }
        closed.fetch_add(1, Ordering::Relaxed);
        thread::sleep(Duration::from_millis(100));
    }
}

/// 99th percentile of 100 timed requests for `path`, each on a fresh connection.
fn p99(addr: SocketAddr, path: &str) -> Duration {
    let mut times: Vec<Duration> = (0..100)
        .map(|_| {
            let started = Instant::now();
            let response = http_get(addr, path);
            assert_eq!(response.status, 200, "{path}: {}", response.body);
            started.elapsed()
        })
        .collect();
    times.sort();
    times[98]
}

/// Before: 64 trickling clients took every slot and /healthz timed out for a minute, so a
/// liveness probe restarted the pod in a loop. Now a newcomer takes the slot of whoever
/// waited longest without a request in progress, and headers have a deadline.
#[test]
#[serial]
fn idle_and_trickling_clients_do_not_starve_the_health_check() {
    require_root();
    let daemon = Daemon::start(&[]);
    let addr = daemon.addr;
    let idle: Vec<TcpStream> = (0..500).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let running = Arc::new(AtomicBool::new(true));
    let closed = Arc::new(AtomicU64::new(0));
    let attackers: Vec<_> = (0..64)
        .map(|_| {
            let (running, closed) = (running.clone(), closed.clone());
            thread::spawn(move || slowloris(addr, running, closed))
        })
        .collect();
    thread::sleep(Duration::from_secs(2));

    let healthz = p99(addr, "/healthz");
    let metrics = p99(addr, "/metrics");
    eprintln!(
        "with 500 idle and 64 trickling clients: /healthz p99 {:.1} ms, /metrics p99 {:.1} ms",
        healthz.as_secs_f64() * 1e3,
        metrics.as_secs_f64() * 1e3
    );
    // The targets are 100 ms and 1 s (measured here: a few ms); the bounds leave room for a
    // loaded machine while still failing the minute-long starvation this guards against.
    assert!(healthz < Duration::from_millis(500), "/healthz p99 {healthz:?}");
    assert!(metrics < Duration::from_secs(2), "/metrics p99 {metrics:?}");

    running.store(false, Ordering::Relaxed);
    for attacker in attackers {
        attacker.join().unwrap();
    }
    drop(idle);
    assert!(closed.load(Ordering::Relaxed) > 0, "the trickling clients were never cut");

    // Alone now (nothing to make room for), a client that never finishes its headers is cut within the header deadline (5 s), not
    // kept alive by each byte.
    let mut trickler = TcpStream::connect(addr).unwrap();
    trickler.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let started = Instant::now();
    let mut cut = false;
    for byte in b"GET /healthz HTTP/1.1\r\nX: ".iter().cycle().take(14) {
        if trickler.write_all(&[*byte]).is_err() {
            cut = true;
            break;
        }
        let mut buf = [0; 512];
        trickler.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        if trickler.read(&mut buf).is_ok() {
            cut = true;
            break;
        }
    }
    assert!(cut, "a client trickling headers was still connected after {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(8), "cut after {:?}", started.elapsed());

    let finished = daemon.stop();
    assert!(finished.status.success(), "{:?}", finished.stderr);
}

/// Peak and current resident memory of a process, in bytes.
fn memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib = |key: &str| -> u64 {
        let line = status.lines().find(|l| l.starts_with(key)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
    };
    (kib("VmHWM:"), kib("VmRSS:"))
}

/// Raises this process's open-file limit to at least `wanted` (root may).
fn allow_open_files(wanted: u64) {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        if limit.rlim_cur < wanted {
            limit.rlim_cur = wanted.min(limit.rlim_max.max(wanted));
            limit.rlim_max = limit.rlim_max.max(wanted);
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0, "raising RLIMIT_NOFILE");
        }
    }
}

/// 64 clients asking for the whole socket list at once: at most `MAX_LISTINGS` answers are
/// built and held, the others are told to retry (503 with Retry-After), and memory stays
/// bounded instead of growing with the number of clients.
#[test]
#[serial]
fn parallel_listings_take_turns_and_memory_stays_bounded() {
    require_root();
    const CONNECTIONS: usize = 3000;
    allow_open_files(4 * CONNECTIONS as u64);
    let daemon = Daemon::start(&[]);
    let addr = daemon.addr;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target = listener.local_addr().unwrap();
    let mut held = Vec::with_capacity(2 * CONNECTIONS);
    for _ in 0..CONNECTIONS {
        held.push(TcpStream::connect(target).unwrap());
        held.push(listener.accept().unwrap().0);
    }
    // Every one of them tracked before measuring.
    let expected = 2 * CONNECTIONS;
    crate::common::eventually(Duration::from_secs(10), || {
        let listing = http_get(addr, &format!("/api/sockets?state=ESTABLISHED&limit={expected}"));
        let total: usize = listing.header("x-total-count").unwrap().parse().unwrap();
        (total >= expected).then_some(()).ok_or(format!("{total} tracked"))
    });
    let pid = daemon.process.pid();
    let (_, idle_rss) = memory(pid);
    let one = http_get(addr, "/api/sockets?state=ESTABLISHED").body.len();

    let clients: Vec<_> = (0..64)
        .map(|_| thread::spawn(move || http_get(addr, "/api/sockets?state=ESTABLISHED")))
        .collect();
    let responses: Vec<_> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let served = responses.iter().filter(|r| r.status == 200).count();
    let told_to_retry = responses.iter().filter(|r| r.status == 503).count();
    assert_eq!(served + told_to_retry, 64, "only 200 or 503");
    assert!(served >= 2, "{served} served");
    for retry in responses.iter().filter(|r| r.status == 503) {
        assert_eq!(retry.header("retry-after"), Some("1"));
    }
    let (peak, _) = memory(pid);
    let growth = peak.saturating_sub(idle_rss);
    eprintln!(
        "64 parallel listings of {expected}+ sockets ({:.1} MiB each): {served} served, \
         {told_to_retry} told to retry, peak RSS {:.1} MiB above idle",
        one as f64 / (1 << 20) as f64,
        growth as f64 / (1 << 20) as f64
    );
    // Unbounded, 64 answers at once would need 64 times one answer.
    assert!(growth < 16 * one as u64 + (16 << 20), "peak grew by {growth} bytes");

    // Paging walks the same list: offset and limit, with the total in a header.
    let first = http_get(addr, "/api/sockets?state=ESTABLISHED&limit=10");
    let second = http_get(addr, "/api/sockets?state=ESTABLISHED&offset=10&limit=10");
    let ports = |r: &crate::common::HttpResponse| -> Vec<u64> {
        r.json().as_array().unwrap().iter().map(|s| s["local_port"].as_u64().unwrap()).collect()
    };
    assert_eq!(ports(&first).len(), 10);
    assert_eq!(ports(&second).len(), 10);
    let all = http_get(addr, "/api/sockets?state=ESTABLISHED&limit=20");
    assert_eq!([ports(&first), ports(&second)].concat(), ports(&all), "pages follow each other");
    drop(held);
    daemon.stop();
}
