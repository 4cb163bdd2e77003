//! `tcpstate top` in a real terminal: tmux runs it, `send-keys` types, `capture-pane` reads
//! the screen, while a scripted workload (refused connects, a leaking process) runs.

use std::{
    io::{BufRead as _, BufReader, Read as _},
    net::TcpStream,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use serial_test::{parallel, serial};

use crate::{
    common::{self, Daemon, run_tcpstate, tcpstate_bin},
    leaks::{Helper, hang_up_on},
};

/// A tmux server of its own (`-L`), with one session running one command.
struct Tmux {
    socket: String,
    /// Where the shell around the command writes its exit status (tmux's own
    /// `pane_dead_status` is sometimes never filled in: tmux 3.3a can leave the child a zombie).
    status_file: std::path::PathBuf,
}

impl Tmux {
    /// Runs `command` (a shell command line) in a detached session of `width`×`height`.
    fn start(name: &str, command: &str, width: u16, height: u16) -> Self {
        let socket = format!("tcpstate-test-{}-{name}", std::process::id());
        let status_file = common::temp_file(&format!("{name}.status"), "");
        std::fs::remove_file(&status_file).unwrap();
        let tmux = Self { socket, status_file };
        let shell = format!("{command}; echo $? > {}", tmux.status_file.display());
        let (width, height) = (width.to_string(), height.to_string());
        tmux.run(&["new-session", "-d", "-s", "top", "-x", &width, "-y", &height, &shell]);
        tmux
    }

    fn run(&self, args: &[&str]) -> String {
        let output = Command::new("tmux")
            .args(["-L", &self.socket, "-f", "/dev/null"])
            .args(args)
            .output()
            .expect("tmux runs (cargo xtask setup installs it)");
        assert!(
            output.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "top"])
    }

    /// The screen with its colours and attributes as escape sequences.
    fn screen_with_escapes(&self) -> String {
        self.run(&["capture-pane", "-p", "-e", "-t", "top"])
    }

    fn keys(&self, keys: &str) {
        self.run(&["send-keys", "-t", "top", keys]);
    }

    fn resize(&self, width: u16, height: u16) {
        self.run(&[
            "resize-window",
            "-t",
            "top",
            "-x",
            &width.to_string(),
            "-y",
            &height.to_string(),
        ]);
    }

    /// Polls the screen until `done` holds; panics with the last screen after `timeout`.
    fn wait_for(&self, timeout: Duration, what: &str, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let screen = self.screen();
            if done(&screen) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "{what} not on screen within {timeout:?}:\n{screen}"
            );
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// `Some(status)` once the command has exited.
    fn exit_status(&self) -> Option<i32> {
        let status = std::fs::read_to_string(&self.status_file).ok()?;
        Some(status.trim().parse().unwrap_or_else(|_| panic!("exit status `{status}`")))
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux").args(["-L", &self.socket, "kill-server"]).output();
    }
}

/// The numbers right after `label` on the screen line that holds it.
fn numbers_after<'a>(screen: &'a str, label: &str) -> Vec<&'a str> {
    screen
        .lines()
        .find_map(|line| line.split_once(label).map(|(_, rest)| rest))
        .map(|rest| rest.split(['│', ' ']).filter(|t| !t.is_empty()).collect())
        .unwrap_or_default()
}

/// SGR parameters that set a colour (30-38, 40-48, 90-97, 100-107) in escaped screen text.
fn colour_codes(escaped: &str) -> Vec<String> {
    escaped
        .split("\x1b[")
        .skip(1)
        .filter_map(|rest| rest.split_once('m').map(|(params, _)| params))
        .flat_map(|params| params.split(';'))
        .filter(|p| {
            p.parse::<u32>().is_ok_and(|n| matches!(n, 30..=38 | 40..=48 | 90..=97 | 100..=107))
        })
        .map(str::to_owned)
        .collect()
}

/// Serial: the failure panel counts every refused connect on the host, so no other test's
/// may land in it.
#[test]
#[serial]
fn top_shows_a_scripted_workloads_failures_and_leaks_as_they_happen() {
    let daemon = Daemon::start(&["--close-wait-threshold", "1"]);
    let command = format!("env -u NO_COLOR {} top --daemon http://{}", tcpstate_bin(), daemon.addr);
    let tmux = Tmux::start("workload", &command, 80, 24);
    let screen = tmux.wait_for(Duration::from_secs(10), "every panel", |s| {
        s.contains("Sockets by state")
            && s.contains("No failed connections")
            && s.contains("No leaks")
    });
    assert!(screen.contains("sort: count"), "{screen}");

    const REFUSED: usize = 3;
    let nothing_listens = common::ReservedPort::new();
    for _ in 0..REFUSED {
        let error = TcpStream::connect(nothing_listens.addr()).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::ConnectionRefused);
    }
    let leaky = Helper::start("leak", "top-leaker", &[]);
    hang_up_on(leaky.port, 2);
    let screen = tmux.wait_for(Duration::from_secs(15), "the refused connects and the leak", |s| {
        numbers_after(s, "connect refused").get(1) == Some(&"3")
            && numbers_after(s, "top-leaker").first() == Some(&"2")
    });
    // The destination, under its kind.
    let destination = format!("│ {} ", nothing_listens.addr());
    let below = screen.lines().skip_while(|l| !l.contains("connect refused")).nth(1);
    assert!(
        below.is_some_and(|l| l.contains(&destination)),
        "{destination} under the refused connects:\n{screen}"
    );
    let pid = leaky.pid().to_string();
    assert!(
        screen.lines().any(|l| l.contains("top-leaker") && l.contains(&format!("│{pid:>7} "))),
        "the leak row names pid {pid}:\n{screen}"
    );
    let close_wait: f64 = numbers_after(&screen, "│CLOSE_WAIT ")[0].parse().unwrap();
    assert!(close_wait >= 2.0, "{screen}");
    assert!(!colour_codes(&tmux.screen_with_escapes()).is_empty(), "colour on a terminal");

    // `s` cycles the order: by change, then by state, as the kernel numbers them (count
    // order puts the states holding sockets, CLOSE_WAIT among them, first).
    tmux.keys("s");
    tmux.wait_for(Duration::from_secs(5), "sort: change", |s| s.contains("sort: change"));
    tmux.keys("s");
    let screen = tmux.wait_for(Duration::from_secs(5), "sort: name", |s| s.contains("sort: name"));
    // The rows of the first panel: below its heading, above its bottom border.
    let states: Vec<&str> = screen
        .lines()
        .skip(3)
        .take_while(|l| !l.starts_with('└'))
        .filter_map(|l| l.strip_prefix('│')?.split_whitespace().next())
        .collect();
    let in_kernel_order = [
        "ESTABLISHED",
        "SYN_SENT",
        "SYN_RECV",
        "FIN_WAIT1",
        "FIN_WAIT2",
        "TIME_WAIT",
        "CLOSE_WAIT",
        "LAST_ACK",
        "LISTEN",
        "CLOSING",
    ];
    assert_eq!(states, in_kernel_order, "{screen}");

    // Smaller: the states and leaks alone; tiny: one line saying so; back: every panel.
    tmux.resize(50, 14);
    tmux.wait_for(Duration::from_secs(5), "the narrow layout", |s| {
        s.contains("Sockets by state") && s.contains("top-leaker") && !s.contains("Transitions")
    });
    tmux.resize(20, 4);
    tmux.wait_for(Duration::from_secs(5), "the too-small line", |s| s.contains("too small"));
    tmux.resize(80, 24);
    tmux.wait_for(Duration::from_secs(5), "every panel again", |s| {
        s.contains("Transitions") && s.contains("connect refused")
    });
    assert_eq!(tmux.exit_status(), None, "resizing never ends it");

    tmux.keys("q");
    common::eventually(Duration::from_secs(5), || {
        tmux.exit_status().ok_or("still running after q".to_owned())
    });
    assert_eq!(tmux.exit_status(), Some(0));
    daemon.stop();
}

/// Without --daemon it reads the kernel itself, and NO_COLOR turns every colour off.
#[test]
#[parallel]
fn top_without_a_daemon_reads_the_kernel_and_honours_no_color() {
    let command = format!("env NO_COLOR=1 {} top --close-wait-threshold 1", tcpstate_bin());
    let tmux = Tmux::start("kernel", &command, 80, 24);
    let leaky = Helper::start("leak", "top-kernel", &[]);
    hang_up_on(leaky.port, 1);
    let screen = tmux.wait_for(Duration::from_secs(20), "the leak", |s| {
        numbers_after(s, "top-kernel").first() == Some(&"1")
    });
    assert!(screen.starts_with("tcpstate top  kernel"), "{screen}");
    assert_eq!(colour_codes(&tmux.screen_with_escapes()), Vec::<String>::new());
    tmux.keys("q");
    common::eventually(Duration::from_secs(5), || {
        tmux.exit_status().ok_or("still running after q".to_owned())
    });
    assert_eq!(tmux.exit_status(), Some(0));
}

#[test]
#[parallel]
fn top_without_a_terminal_prints_plain_screens() {
    let daemon = Daemon::start(&[]);
    let url = format!("http://{}", daemon.addr);
    let finished = run_tcpstate(&["top", "--daemon", &url, "--count", "2"]);
    assert!(finished.status.success(), "{:?}", finished.stderr);
    let text = finished.stdout.join("\n");
    assert_eq!(text.matches("Sockets by state").count(), 2, "{text}");
    assert!(!text.contains('\x1b'), "no escape sequences: {text}");
    daemon.stop();
}

/// Reading the kernel itself into a pipe, a Ctrl-C ends it quietly, with status 0.
#[test]
#[parallel]
fn top_reading_the_kernel_into_a_pipe_ends_on_ctrl_c() {
    let mut top = Command::new(tcpstate_bin())
        .arg("top")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Kept open until it exits: a closed pipe would end it too.
    let mut lines = BufReader::new(top.stdout.take().unwrap()).lines().map_while(Result::ok);
    let header = lines.find(|l| l.starts_with("tcpstate top"));
    assert!(header.is_some_and(|h| h.starts_with("tcpstate top  kernel")), "no screen");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(top.id() as i32, libc::SIGINT) };
    let status = common::wait_timeout(&mut top, Duration::from_secs(10));
    let mut stderr = String::new();
    top.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(status.success(), "{status:?}: {stderr}");
    assert!(!stderr.contains("error"), "{stderr}");
    drop(lines);
}

/// `tcpstate top | head`: the reader going away ends it quietly.
#[test]
#[parallel]
fn top_into_a_closed_pipe_ends_quietly() {
    let daemon = Daemon::start(&[]);
    let command = format!(
        "{} top --daemon http://{} | head -1; exit ${{PIPESTATUS[0]}}",
        tcpstate_bin(),
        daemon.addr
    );
    let output = Command::new("bash").args(["-c", &command]).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.starts_with("tcpstate top  http://"), "{stdout}");
    assert!(
        output.status.success(),
        "{:?}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    daemon.stop();
}

#[test]
#[parallel]
fn top_with_an_unreachable_daemon_says_so_and_exits_1() {
    let no_daemon = common::ReservedPort::new();
    let url = format!("http://{}", no_daemon.addr());
    let finished = run_tcpstate(&["top", "--daemon", &url]);
    assert_eq!(finished.status.code(), Some(1), "{:?}", finished.stderr);
    let stderr = finished.stderr.join("\n");
    assert!(stderr.contains("no daemon answers at") && stderr.contains("tcpstate run"), "{stderr}");

    let finished = run_tcpstate(&["top", "--sort", "bogus"]);
    assert_eq!(finished.status.code(), Some(2), "{:?}", finished.stderr);
    assert!(finished.stderr.join("\n").contains("count, change, name"), "{:?}", finished.stderr);
}
