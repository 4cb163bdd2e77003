//! Helpers shared by the integration tests: they load the real program into the running
//! kernel and drive real loopback TCP traffic, so they need root.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use socket2::{Domain, Socket, Type};
use tracer_common::{TcpState, TcpState as S};

pub const V4: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
pub const V6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);

/// The binary under test: the one cargo built with these tests, or the release binary
/// `TCPSTATE_TEST_BINARY` names (the arm64 kernel matrix runs the one the tarball ships).
pub fn tcpstate_bin() -> &'static str {
    static BINARY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BINARY.get_or_init(|| {
        std::env::var("TCPSTATE_TEST_BINARY")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_tcpstate").to_owned())
    })
}

/// The `comm` of this test process (its main thread), as `ps` shows it.
pub fn process_comm() -> String {
    std::fs::read_to_string("/proc/self/comm").unwrap().trim().to_owned()
}

/// The `comm` of the calling thread.
pub fn thread_comm() -> String {
    std::fs::read_to_string("/proc/thread-self/comm").unwrap().trim().to_owned()
}

/// A client socket bound to `source` (any port) before connecting: spreading clients over
/// 127.0.0.0/8 keeps bursts clear of ephemeral-port exhaustion.
pub fn connect_from(source: IpAddr, target: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(target), Type::STREAM, None)?;
    if source.is_ipv4() {
        set_bind_address_no_port(&socket)?;
    }
    socket.bind(&SocketAddr::new(source, 0).into())?;
    socket.connect(&target.into())?;
    Ok(socket.into())
}

/// `IP_BIND_ADDRESS_NO_PORT`: bind picks the address only; connect picks the port per
/// 4-tuple, so thousands of clients can share a source address.
fn set_bind_address_no_port(socket: &Socket) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let on: libc::c_int = 1;
    // SAFETY: a valid socket fd and a c_int option value of the right size.
    let ret = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&raw const on).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if ret == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// An old and a new state.
pub type Transition = (TcpState, TcpState);

/// What the tracepoint reports of the connecting side of one connection, by who closes
/// first (the active closer's TIME_WAIT is a separate socket the tracepoint does not report).
pub fn client_side(closer: Closer) -> [Transition; 5] {
    let opening = [(S::CLOSE, S::SYN_SENT), (S::SYN_SENT, S::ESTABLISHED)];
    join(opening, closing(closer == Closer::Client))
}

/// What the tracepoint reports of the accepted side: cloned from the listener, so its first
/// record leaves LISTEN.
pub fn server_side(closer: Closer) -> [Transition; 5] {
    let opening = [(S::LISTEN, S::SYN_RECV), (S::SYN_RECV, S::ESTABLISHED)];
    join(opening, closing(closer == Closer::Server))
}

/// The three transitions of a close, for the side that closes first or for its peer.
fn closing(first: bool) -> [Transition; 3] {
    if first {
        [(S::ESTABLISHED, S::FIN_WAIT1), (S::FIN_WAIT1, S::FIN_WAIT2), (S::FIN_WAIT2, S::CLOSE)]
    } else {
        [(S::ESTABLISHED, S::CLOSE_WAIT), (S::CLOSE_WAIT, S::LAST_ACK), (S::LAST_ACK, S::CLOSE)]
    }
}

fn join(opening: [Transition; 2], closing: [Transition; 3]) -> [Transition; 5] {
    [opening[0], opening[1], closing[0], closing[1], closing[2]]
}

/// Who closes a connection first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Closer {
    Client,
    Server,
}

/// One complete connection to `listener`: connect (from `source`), the `closer` closes first,
/// the peer sees EOF and closes too. Returns the client's local address.
pub fn one_connection(listener: &TcpListener, source: IpAddr, closer: Closer) -> SocketAddr {
    let target = listener.local_addr().unwrap();
    let client = connect_from(source, target).expect("connect");
    let (server, _) = listener.accept().expect("accept");
    let local = client.local_addr().unwrap();
    let (first, second) = match closer {
        Closer::Client => (client, server),
        Closer::Server => (server, client),
    };
    drop(first);
    wait_for_eof(&second);
    drop(second);
    local
}

/// Blocks until the peer's FIN arrives.
pub fn wait_for_eof(stream: &TcpStream) {
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 64];
    loop {
        match (&*stream).read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(error) => panic!("waiting for the peer's FIN: {error}"),
        }
    }
}

/// A running `tcpstate` process whose stdout is collected line by line.
pub struct Tcpstate {
    child: Child,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
    stderr_seen: Vec<String>,
}

impl Tcpstate {
    /// Starts `tcpstate ARGS` and waits until it has attached its program (or fails).
    pub fn start(args: &[&str]) -> Self {
        Self::start_with_env(args, &[])
    }

    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_under(&[], args, env)
    }

    /// Starts tcpstate through `wrapper` (a program and its options that execs it, e.g.
    /// `setpriv --bounding-set=-sys_admin`), or directly when `wrapper` is empty.
    pub fn start_under(wrapper: &[&str], args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut command = match wrapper.split_first() {
            Some((program, options)) => {
                let mut command = Command::new(program);
                command.args(options).arg(tcpstate_bin());
                command
            }
            None => Command::new(tcpstate_bin()),
        };
        let mut child = command
            .args(args)
            .env("TCPSTATE_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting tcpstate");
        let stdout = lines_of(child.stdout.take().unwrap());
        let stderr = lines_of(child.stderr.take().unwrap());
        let mut this = Self { child, stdout, stderr, stderr_seen: Vec::new() };
        // Generous: under software emulation (the kernel matrix) attaching took over 30 s
        // once on 5.10, after the previous test's process had just detached its programs.
        let started = this.wait_for_stderr("attached to tracepoint", Duration::from_secs(90));
        // The program speaks as itself, not as its crate's modules.
        assert!(started.contains(" tcpstate] "), "the start line names tcpstate: {started}");
        this
    }

    /// Waits for a stderr line containing `needle`; panics with everything seen on timeout.
    pub fn wait_for_stderr(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.stderr_seen.iter().find(|l| l.contains(needle)) {
                return line.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) => self.stderr_seen.push(line),
                Err(_) => {
                    let status = self.child.try_wait().ok().flatten();
                    panic!(
                        "tcpstate never printed `{needle}` (exit status {status:?}); stderr:\n{}",
                        self.stderr_seen.join("\n")
                    );
                }
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGINT (Ctrl-C) and waits for the exit.
    pub fn interrupt(self) -> Finished {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        self.finish()
    }

    /// Waits for the process to end by itself.
    pub fn finish(mut self) -> Finished {
        let status = wait_timeout(&mut self.child, Duration::from_secs(20));
        let stdout: Vec<String> = self.stdout.iter().collect();
        self.stderr_seen.extend(self.stderr.iter());
        Finished { status, stdout, stderr: std::mem::take(&mut self.stderr_seen) }
    }

    /// Stdout lines received so far, waiting up to `timeout` for at least `count` of them.
    pub fn stdout_lines(&mut self, count: usize, timeout: Duration, into: &mut Vec<String>) {
        let deadline = Instant::now() + timeout;
        while into.len() < count {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout.recv_timeout(left) {
                Ok(line) => into.push(line),
                Err(_) => return,
            }
        }
    }
}

impl Drop for Tcpstate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How a `tcpstate` process ended.
pub struct Finished {
    pub status: std::process::ExitStatus,
    pub stdout: Vec<String>,
    pub stderr: Vec<String>,
}

fn lines_of(stream: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

pub fn wait_timeout(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("process {} did not exit within {timeout:?}", child.id());
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `tcpstate ARGS` to completion (for commands that fail fast).
pub fn run_tcpstate(args: &[&str]) -> Finished {
    let mut child = Command::new(tcpstate_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting tcpstate");
    let status = wait_timeout(&mut child, Duration::from_secs(30));
    let mut stdout = String::new();
    let mut stderr = String::new();
    child.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    Finished {
        status,
        stdout: stdout.lines().map(str::to_owned).collect(),
        stderr: stderr.lines().map(str::to_owned).collect(),
    }
}

/// Writes `text` to a fresh temporary file and returns its path.
pub fn temp_file(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tcpstate-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::File::create(&path).unwrap().write_all(text.as_bytes()).unwrap();
    path
}

/// A minimal HTTP/1.1 response.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// Sends one request and reads the whole response (the server closes: `Connection: close`).
/// Reading to EOF before closing makes each request's own TCP transitions deterministic.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> HttpResponse {
    let mut stream = TcpStream::connect(addr).expect("connecting to the HTTP endpoint");
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("reading the response");
    let text = String::from_utf8(raw).expect("UTF-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("a complete response");
    let mut lines = head.lines();
    let status = lines.next().unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let body = if headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v == "chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    HttpResponse { status, headers, body }
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").expect("chunk size");
        let size = usize::from_str_radix(size.trim(), 16).expect("hex chunk size");
        if size == 0 {
            return out;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
}

pub fn http_get(addr: SocketAddr, path: &str) -> HttpResponse {
    http_request(addr, "GET", path, &[])
}

/// A running `tcpstate run`, serving on a port the kernel picked.
pub struct Daemon {
    pub process: Tcpstate,
    pub addr: SocketAddr,
}

impl Daemon {
    pub fn start(args: &[&str]) -> Self {
        Self::start_with_env(args, &[])
    }

    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_under(&[], args, env)
    }

    /// Starts the daemon through `wrapper` (see `Tcpstate::start_under`).
    pub fn start_under(wrapper: &[&str], args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut full = vec!["run"];
        if !args.contains(&"--listen") && !env.iter().any(|(k, _)| *k == "TCPSTATE_LISTEN") {
            full.extend(["--listen", "127.0.0.1:0"]);
        }
        full.extend(args);
        let mut process = Tcpstate::start_under(wrapper, &full, env);
        let line = process.wait_for_stderr("serving http://", Duration::from_secs(30));
        let addr = line
            .split("serving http://")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| panic!("no address in `{line}`"));
        Self { process, addr }
    }

    pub fn get(&self, path: &str) -> HttpResponse {
        http_get(self.addr, path)
    }

    /// Scrapes /metrics (Prometheus text format) and parses it with a real exposition parser.
    pub fn scrape(&self) -> Metrics {
        let response = self.get("/metrics");
        assert_eq!(response.status, 200, "{}", response.body);
        Metrics::parse(&response.body)
    }

    /// Waits until `count` more reconciliations than now have completed (the daemon counts
    /// them in `tcpstate_reconciliations_total`), and returns a scrape taken after them.
    pub fn after_reconciliations(&self, count: u32) -> Metrics {
        const RECONCILIATIONS: &str = "tcpstate_reconciliations_total";
        let wanted = self.scrape().value(RECONCILIATIONS, &[]) + f64::from(count);
        eventually(Duration::from_secs(60), || {
            let metrics = self.scrape();
            let done = metrics.value(RECONCILIATIONS, &[]);
            (done >= wanted).then_some(metrics).ok_or(format!("{done} of {wanted} reconciliations"))
        })
    }

    pub fn stop(self) -> Finished {
        self.process.interrupt()
    }
}

/// A parsed scrape.
pub struct Metrics {
    pub text: String,
    pub scrape: prometheus_parse::Scrape,
}

impl Metrics {
    pub fn parse(text: &str) -> Self {
        let lines = text.lines().map(|l| Ok(l.to_owned()));
        let scrape = prometheus_parse::Scrape::parse(lines).expect("valid exposition format");
        Self { text: text.to_owned(), scrape }
    }

    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a prometheus_parse::Sample> {
        self.scrape.samples.iter().filter(move |s| {
            s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
        })
    }

    /// The value of the one sample with these labels; 0 when absent (a counter not yet seen).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<_> = self.matching(name, labels).collect();
        assert!(found.len() <= 1, "{name}{labels:?} matches {} samples", found.len());
        found.first().map_or(0.0, |s| match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            other => panic!("{name} is not a plain value: {other:?}"),
        })
    }

    /// Sum over every sample of `name` with these labels.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels)
            .map(|s| match &s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => *v,
                _ => 0.0,
            })
            .sum()
    }

    /// (count, sum, cumulative buckets) of a histogram series.
    pub fn histogram(&self, name: &str, labels: &[(&str, &str)]) -> (f64, f64, Vec<(f64, f64)>) {
        let count = self.value(&format!("{name}_count"), labels);
        let sum = self.value(&format!("{name}_sum"), labels);
        let buckets = self
            .matching(name, labels)
            .find_map(|s| match &s.value {
                prometheus_parse::Value::Histogram(h) => {
                    Some(h.iter().map(|b| (b.less_than, b.count)).collect())
                }
                _ => None,
            })
            .unwrap_or_default();
        (count, sum, buckets)
    }
}

/// A network namespace for one test, removed when dropped.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn create(tag: &str) -> Self {
        let name = format!("tcpstate-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).stderr(Stdio::null()).status();
        let ok = |args: &[&str]| {
            let status = Command::new("ip").args(args).status().expect("ip (iproute2)");
            assert!(status.success(), "ip {args:?} failed");
        };
        ok(&["netns", "add", &name]);
        ok(&["-n", &name, "link", "set", "lo", "up"]);
        Self { name }
    }

    /// Runs `ip -n NS ARGS`.
    pub fn ip(&self, args: &str) {
        let status = Command::new("ip")
            .args(["-n", &self.name])
            .args(args.split_whitespace())
            .status()
            .expect("ip (iproute2)");
        assert!(status.success(), "ip -n {} {args}", self.name);
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, setting: &str) {
        let status = Command::new("ip")
            .args(["netns", "exec", &self.name, "sysctl", "-q", "-w", setting])
            .status()
            .expect("sysctl (procps)");
        assert!(status.success(), "sysctl -w {setting} in {}", self.name);
    }

    /// The namespace's own TCP counter `name` (`RetransSegs`, `TCPSynRetrans`, ...), as
    /// `nstat` reads it from `/proc/net/snmp` and `/proc/net/netstat`.
    pub fn tcp_counter(&self, name: &str) -> u64 {
        let text = self.run(|| {
            // thread-self: /proc/self/net is the namespace of the process's first thread.
            ["snmp", "netstat"]
                .map(|file| std::fs::read_to_string(format!("/proc/thread-self/net/{file}")))
                .map(Result::unwrap)
                .concat()
        });
        let lines: Vec<&str> = text.lines().collect();
        lines
            .windows(2)
            .filter(|pair| {
                pair[0].starts_with("Tcp") && pair[0].split(':').next() == pair[1].split(':').next()
            })
            .find_map(|pair| {
                let names = pair[0].split_whitespace().skip(1);
                let mut values = pair[1].split_whitespace().skip(1);
                names.zip(&mut values).find(|(n, _)| *n == name).map(|(_, v)| v.parse().unwrap())
            })
            .unwrap_or_else(|| panic!("no TCP counter {name} in {}", self.name))
    }

    /// Runs `f` on a thread inside the namespace; sockets it creates live there.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        use std::os::fd::AsRawFd as _;
        let file = std::fs::File::open(format!("/run/netns/{}", self.name)).unwrap();
        thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: setns on a valid namespace fd; only this thread moves.
                    let ret = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(ret, 0, "setns: {}", std::io::Error::last_os_error());
                    f()
                })
                .join()
                .unwrap()
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// Runs a real Prometheus (scraping every second) with `scrape_configs` entries `scrape`,
/// until the instant query `query` returns a first value for which `done` holds, or 60 s
/// pass. Returns that value, or the last answer and Prometheus's log.
pub fn prometheus_query_until(
    scrape: &str,
    query: &str,
    done: impl Fn(&str) -> bool,
) -> Result<String, String> {
    static RUNS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir =
        std::env::temp_dir().join(format!("tcpstate-prometheus-{}-{run}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("prometheus.yml");
    let global = "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n";
    std::fs::write(&config, format!("{global}{scrape}")).unwrap();
    let web_port = ReservedPort::new();
    let web = web_port.addr();
    let mut prometheus = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address={web}"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("prometheus (Debian package prometheus; `cargo xtask test` installs it)");
    let encoded: String = query
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let path = format!("/api/v1/query?query={encoded}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = String::new();
    let found = loop {
        if Instant::now() > deadline {
            break None;
        }
        thread::sleep(Duration::from_millis(500));
        if TcpStream::connect(web).is_err() {
            continue;
        }
        let response = http_get(web, &path);
        last = response.body.clone();
        if response.status != 200 {
            continue;
        }
        if let Some(value) = response.json()["data"]["result"][0]["value"][1].as_str()
            && done(value)
        {
            break Some(value.to_owned());
        }
    };
    let _ = prometheus.kill();
    let mut log = String::new();
    let _ = prometheus.stderr.take().unwrap().read_to_string(&mut log);
    let _ = prometheus.wait();
    let _ = std::fs::remove_dir_all(&dir);
    found.ok_or_else(|| format!("last answer: {last}\nprometheus log:\n{log}"))
}

/// Raises this process's open-file limit to at least `wanted` (root may).
pub fn allow_open_files(wanted: u64) {
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

/// A numeric sysctl lowered for one test, restored when dropped.
pub struct Sysctl {
    path: String,
    previous: Option<String>,
}

impl Sysctl {
    /// Sets `/proc/sys/<name>` to `value` when it is higher.
    pub fn at_most(name: &str, value: i64) -> Self {
        let path = format!("/proc/sys/{name}");
        let current = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let previous = match current.trim().parse::<i64>() {
            Ok(level) if level > value => {
                std::fs::write(&path, value.to_string()).unwrap();
                Some(current)
            }
            _ => None,
        };
        Self { path, previous }
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        if let Some(previous) = &self.previous {
            let _ = std::fs::write(&self.path, previous.trim());
        }
    }
}

/// A loopback port held for one test: bound (with `SO_REUSEADDR`) but not listening, so no
/// other test's bind or connect picks it while this lives, connecting to it is refused, and
/// the test's own sockets and daemons (which set `SO_REUSEADDR` too, as std's and Go's
/// listeners do) can still bind it.
pub struct ReservedPort {
    _socket: Socket,
    pub port: u16,
}

impl ReservedPort {
    pub fn new() -> Self {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        socket.set_reuse_address(true).unwrap();
        socket.bind(&SocketAddr::new(V4, 0).into()).unwrap();
        let port = socket.local_addr().unwrap().as_socket().unwrap().port();
        Self { _socket: socket, port }
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(V4, self.port)
    }
}

/// Retries `attempt` until it succeeds or `timeout` passes, then panics with its last
/// complaint. Kernel work (the last ACK of a close, a retransmission) can land after the
/// test's own calls return; a fixed sleep would make such a test flaky.
pub fn eventually<T>(timeout: Duration, mut attempt: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match attempt() {
            Ok(value) => return value,
            Err(complaint) if Instant::now() > deadline => panic!("{complaint}"),
            Err(_) => thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Runs `promtool ARGS` (`cargo xtask test` puts Debian's on the PATH); its stdout, once it
/// succeeded.
pub fn promtool(args: &[&std::ffi::OsStr]) -> String {
    let output = Command::new("promtool")
        .args(args)
        .output()
        .expect("promtool (Debian package prometheus; `cargo xtask test` installs it)");
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}
