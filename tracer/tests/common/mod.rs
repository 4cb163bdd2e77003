//! Helpers shared by the integration tests: they load the real program into the running
//! kernel and drive real loopback TCP traffic, so they need root.
#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use socket2::{Domain, Socket, Type};

pub const V4: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
pub const V6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);

/// Fails the test, loudly, when it cannot load eBPF programs.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this integration test loads the real eBPF program and must run as root: use `cargo xtask test`"
    );
}

pub fn tcpstate_bin() -> &'static str {
    env!("CARGO_BIN_EXE_tcpstate")
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
        let mut child = Command::new(tcpstate_bin())
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
        this.wait_for_stderr("attached to tracepoint", Duration::from_secs(30));
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

/// Keeps `stream` open but signals EOF to the peer.
pub fn half_close(stream: &TcpStream) {
    stream.shutdown(Shutdown::Write).unwrap();
}
