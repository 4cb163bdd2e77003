//! The load generator: a loopback connection storm with its own server, run inside the
//! benchmark's network namespace (`ip netns exec NS xtask loadgen ...`).
//!
//! Clients connect and close at once (the client closes first, as most short requests do);
//! the server accepts, reads to EOF and closes. Clients bind to many addresses in 127.0.0.0/8
//! with IP_BIND_ADDRESS_NO_PORT, so hundreds of thousands of TIME_WAIT sockets never exhaust
//! the ephemeral ports.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::{Args, Subcommand};

#[derive(Subcommand, Debug)]
pub enum LoadCommand {
    /// Connect and close as fast as possible (or at --rate), for --seconds or --max connections;
    /// prints `connections seconds` when done.
    Storm(StormArgs),
    /// Open --connections connections and hold them until stdin closes; prints `ready N`.
    Hold(HoldArgs),
    /// Start --sockets connects at once to --to, an address whose packets are lost, and wait
    /// until every one has given up after its SYN retries; prints `timed_out N`.
    SynRetries(SynRetriesArgs),
}

#[derive(Args, Debug)]
pub struct StormArgs {
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    #[arg(long, default_value_t = u64::MAX)]
    pub max: u64,
    #[arg(long, default_value_t = 2)]
    pub clients: usize,
    /// Connections per second over all clients; 0: as fast as possible.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    #[arg(long)]
    pub port: u16,
}

#[derive(Args, Debug)]
pub struct HoldArgs {
    #[arg(long)]
    pub connections: usize,
    #[arg(long)]
    pub port: u16,
}

#[derive(Args, Debug)]
pub struct SynRetriesArgs {
    #[arg(long)]
    pub sockets: usize,
    #[arg(long)]
    pub to: SocketAddr,
}

/// Client source addresses: 127.0.1.1 .. 127.0.250.250.
fn source(i: u64) -> IpAddr {
    let n = i % (250 * 250);
    IpAddr::V4(Ipv4Addr::new(127, 0, (n / 250 + 1) as u8, (n % 250 + 1) as u8))
}

fn connect_from(source: IpAddr, target: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    let on: libc::c_int = 1;
    // SAFETY: a valid socket and an int option of the right size.
    let ret = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&raw const on).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if ret != 0 {
        return Err(std::io::Error::last_os_error());
    }
    socket.bind(&SocketAddr::new(source, 0).into())?;
    socket.connect(&target.into())?;
    Ok(socket.into())
}

fn listen(port: u16) -> anyhow::Result<TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&SocketAddr::from(([127, 0, 0, 1], port)).into())?;
    socket.listen(65_535)?;
    Ok(socket.into())
}

/// Accepts until `stop`; each connection is read to EOF and closed and counted in `served`
/// (`hold` keeps them instead).
/// Accepts connections and reads each to its end, until `stop`.
fn serve(listener: TcpListener, stop: Arc<AtomicBool>, served: Arc<AtomicU64>) {
    listener.set_nonblocking(true).expect("nonblocking listener");
    let mut buf = [0u8; 64];
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((mut stream, _)) => {
                stream.set_nonblocking(false).ok();
                while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
                drop(stream);
                served.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_micros(50));
            }
            Err(e) => eprintln!("loadgen: accept: {e}"),
        }
    }
}

/// Accepts `count` connections and returns them. Blocking: once they are all in, nothing
/// polls (an acceptor polling while the connections are held took a few percent of a CPU
/// per holder, and 50 holders starved the daemon being measured).
fn accept_all(listener: TcpListener, count: usize) -> std::io::Result<Vec<TcpStream>> {
    (0..count).map(|_| listener.accept().map(|(stream, _)| stream)).collect()
}

pub fn run(command: LoadCommand) -> anyhow::Result<()> {
    match command {
        LoadCommand::Storm(args) => storm(&args),
        LoadCommand::Hold(args) => hold(&args),
        LoadCommand::SynRetries(args) => syn_retries(&args),
    }
}

fn storm(args: &StormArgs) -> anyhow::Result<()> {
    let listener = listen(args.port)?;
    let target = listener.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    // Two acceptors, so one slow close never stalls the accept queue.
    let servers: Vec<_> = (0..2)
        .map(|_| {
            let listener = listener.try_clone().expect("listener clone");
            let (stop, served) = (stop.clone(), served.clone());
            thread::spawn(move || serve(listener, stop, served))
        })
        .collect();
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.seconds);
    let per_client_interval =
        (args.rate > 0).then(|| Duration::from_secs_f64(args.clients as f64 / args.rate as f64));
    let clients: Vec<_> = (0..args.clients)
        .map(|c| {
            let done = done.clone();
            let max = args.max;
            thread::spawn(move || {
                let mut i = c as u64 * 1_000_003;
                let mut next = Instant::now();
                while Instant::now() < deadline && done.load(Ordering::Relaxed) < max {
                    if let Some(interval) = per_client_interval {
                        next += interval;
                        if let Some(wait) = next.checked_duration_since(Instant::now()) {
                            thread::sleep(wait);
                        }
                    }
                    match connect_from(source(i), target) {
                        Ok(stream) => {
                            drop(stream);
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => eprintln!("loadgen: connect: {e}"),
                    }
                    i += 1;
                }
            })
        })
        .collect();
    for client in clients {
        client.join().expect("client thread");
    }
    let elapsed = started.elapsed().as_secs_f64();
    // Every connection completes its close before the listener goes away: a connection still
    // in the accept queue then would be reset, with other transitions than the rest.
    let total = done.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(10);
    while served.load(Ordering::Relaxed) < total && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::Relaxed);
    for server in servers {
        server.join().expect("server thread");
    }
    println!("{} {elapsed:.3}", done.load(Ordering::Relaxed));
    Ok(())
}

/// Connections one `hold` process can keep: both ends of each are its descriptors, and only
/// the soft limit can be raised (to the hard one) without CAP_SYS_RESOURCE.
pub fn max_held_connections() -> usize {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: a valid rlimit to fill.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    (limit.rlim_max.min(1 << 20) as usize).saturating_sub(256) / 2
}

fn hold(args: &HoldArgs) -> anyhow::Result<()> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: valid rlimit structs.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    limit.rlim_cur = limit.rlim_max;
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(std::io::Error::last_os_error()).context("raising RLIMIT_NOFILE");
    }
    if args.connections > max_held_connections() {
        anyhow::bail!("one process can hold at most {} connections", max_held_connections());
    }
    let listener = listen(args.port)?;
    let target = listener.local_addr()?;
    let connections = args.connections;
    let server = thread::spawn(move || accept_all(listener, connections));
    let mut clients = Vec::with_capacity(args.connections);
    for i in 0..args.connections as u64 {
        clients.push(connect_from(source(i), target).context("connecting")?);
    }
    let held = server.join().expect("server thread").context("accepting")?;
    println!("ready {}", clients.len());
    std::io::stdout().flush()?;
    // Hold until the parent closes our stdin.
    let _ = std::io::stdin().read(&mut [0u8; 1]);
    drop(held);
    drop(clients);
    Ok(())
}

fn syn_retries(args: &SynRetriesArgs) -> anyhow::Result<()> {
    let mut pending = Vec::with_capacity(args.sockets);
    for _ in 0..args.sockets {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        socket.set_nonblocking(true)?;
        match socket.connect(&args.to.into()) {
            Err(error) if error.raw_os_error() == Some(libc::EINPROGRESS) => pending.push(socket),
            other => anyhow::bail!("connect to {} did not stay in progress: {other:?}", args.to),
        }
    }
    // Each gives up after its last SYN retry times out (net.ipv4.tcp_syn_retries).
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut timed_out = 0;
    while !pending.is_empty() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(200));
        let mut still = Vec::with_capacity(pending.len());
        for socket in pending {
            match socket.take_error()? {
                Some(error) if error.raw_os_error() == Some(libc::ETIMEDOUT) => timed_out += 1,
                Some(error) => anyhow::bail!("connect to {} failed otherwise: {error}", args.to),
                None => still.push(socket),
            }
        }
        pending = still;
    }
    anyhow::ensure!(pending.is_empty(), "{} connects never gave up", pending.len());
    println!("timed_out {timed_out}");
    Ok(())
}
