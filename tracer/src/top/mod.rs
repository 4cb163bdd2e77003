//! `tcpstate top`: a live view, refreshed each second, of what the daemon knows: sockets per
//! state with their trend, transitions per second, leaking processes and stuck listeners,
//! failed connections and retransmits with the destinations behind them, lost events.
//!
//! It always reads a daemon's `/metrics` and `/api/leaks`: the one given with `--daemon`, or,
//! without it, one it runs itself inside this process on a loopback port of its own (which
//! attaches to the kernel, as `tcpstate run` does). So the numbers on screen are the ones
//! Prometheus would scrape, computed by the same code. On a terminal it draws with ratatui;
//! otherwise it prints one plain screen per refresh, like `top -b`.

mod sample;
mod screen;
mod view;

use std::{
    io::{self, IsTerminal as _, Write},
    process::ExitCode,
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use ratatui::{
    Terminal,
    backend::TestBackend,
    crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers},
};
use tokio::{sync::mpsc, task::JoinHandle};

pub(crate) use self::screen::SortKey;
use self::{
    screen::History,
    view::{Palette, Status},
};
use crate::{
    client::{Connection, DaemonTls, DaemonUrl, Endpoint, FetchError},
    daemon,
};

/// What `tcpstate top` shows and where it reads it.
#[derive(Debug)]
pub struct Config {
    pub(crate) source: Source,
    /// The order of every panel's rows at start.
    pub(crate) sort: SortKey,
    /// When the output is not a terminal: stop after this many screens.
    pub(crate) count: Option<u64>,
}

/// Where the figures come from.
#[derive(Debug)]
pub(crate) enum Source {
    /// A running daemon's endpoints.
    Daemon { url: DaemonUrl, tls: DaemonTls },
    /// A daemon run inside this process, attached to the kernel, on a loopback port.
    Kernel(Box<daemon::Config>),
}

const REFRESH: Duration = Duration::from_secs(1);
/// Screen size when printing to something that is not a terminal (unless COLUMNS/LINES say).
const PLAIN_SIZE: (u16, u16) = (80, 24);

/// The latest warning logged while the screen is up: shown in its bottom line rather than
/// written over the panels. `main` points the logger here for `top`.
static LAST_WARNING: Mutex<Option<String>> = Mutex::new(None);

/// The logger's target under `top`.
pub struct WarningLine;

impl Write for WarningLine {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        if let Some(line) = text.lines().rfind(|l| !l.trim().is_empty()) {
            *LAST_WARNING.lock().unwrap_or_else(PoisonError::into_inner) = Some(line.to_owned());
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn last_warning() -> Option<String> {
    LAST_WARNING.lock().unwrap_or_else(PoisonError::into_inner).clone()
}

/// Exit status: 0 after `q`, 1 when there is nothing to show (no daemon answers at
/// `--daemon`, or attaching to the kernel failed).
pub async fn run(config: Config) -> ExitCode {
    match show(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tcpstate: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn show(config: Config) -> anyhow::Result<()> {
    let (endpoint, source, local) = match config.source {
        Source::Daemon { url, tls } => (Endpoint::new(url.clone(), &tls)?, url.to_string(), None),
        Source::Kernel(daemon) => {
            let (url, daemon) = start_local_daemon(*daemon)?;
            (Endpoint::plain(url), "kernel".to_owned(), Some(daemon))
        }
    };
    let mut connection = Connection::new(endpoint);
    let first = match sample::fetch(&mut connection).await {
        Ok(sample) => sample,
        Err(FetchError::Unreachable(reason)) => anyhow::bail!(
            "no daemon answers at {} ({reason}): start one with `tcpstate run`, or leave out \
             --daemon to read the kernel directly (as root)",
            connection.url()
        ),
        Err(FetchError::Failed(error)) => return Err(error),
    };
    let mut refresher = Refresher { connection, history: History::default(), error: None, local };
    refresher.history.push(Instant::now(), first);
    if io::stdout().is_terminal() {
        interactive(&mut refresher, &source, config.sort).await
    } else {
        plain(&mut refresher, &source, config.sort, config.count).await
    }
}

/// Runs a daemon inside this process and returns where it answers (its `listen` names a
/// loopback address, port 0 for any free one).
fn start_local_daemon(
    config: daemon::Config,
) -> anyhow::Result<(DaemonUrl, JoinHandle<anyhow::Result<()>>)> {
    let attached = daemon::attach(&config)?;
    let port = attached.local_addr()?.port();
    let daemon = tokio::spawn(daemon::run(config, attached));
    Ok((DaemonUrl::loopback(port), daemon))
}

/// Takes a sample each refresh and keeps the last minute of them.
struct Refresher {
    connection: Connection,
    history: History,
    /// Why the last refresh failed, until one succeeds.
    error: Option<String>,
    /// The daemon this process runs, if it runs one.
    local: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Refresher {
    /// Takes the next sample; false when the daemon this process runs stopped on a signal
    /// (SIGINT, SIGTERM): time to end, quietly.
    async fn refresh(&mut self) -> anyhow::Result<bool> {
        if let Some(daemon) = &mut self.local
            && daemon.is_finished()
        {
            let ended = daemon.await;
            self.local = None;
            return match ended {
                Ok(Ok(())) => Ok(false),
                Ok(Err(error)) => Err(error.context("the tracer stopped")),
                Err(error) => Err(anyhow::anyhow!("the tracer stopped: {error}")),
            };
        }
        match sample::fetch(&mut self.connection).await {
            Ok(sample) => {
                self.history.push(Instant::now(), sample);
                self.error = None;
            }
            // Shown, and tried again next refresh: a restarting daemon comes back.
            Err(FetchError::Unreachable(reason)) => {
                self.error = Some(format!("daemon unreachable: {reason}"));
            }
            Err(FetchError::Failed(error)) => self.error = Some(format!("{error:#}")),
        }
        Ok(true)
    }

    fn status<'a>(
        &'a self,
        source: &'a str,
        sort: SortKey,
        clock: &'a str,
        warning: Option<&'a str>,
    ) -> Status<'a> {
        Status { source, sort, clock, error: self.error.as_deref(), warning }
    }
}

/// What a key asks for.
enum Action {
    Quit,
    NextSort,
    Redraw,
}

fn action(event: &Event) -> Option<Action> {
    match event {
        Event::Key(key) if key.kind != KeyEventKind::Release => match key.code {
            KeyCode::Char('q') | KeyCode::Esc => Some(Action::Quit),
            KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => {
                Some(Action::Quit)
            }
            KeyCode::Char('s') => Some(Action::NextSort),
            _ => None,
        },
        Event::Resize(..) => Some(Action::Redraw),
        _ => None,
    }
}

/// Terminal events, read on a thread of their own (crossterm's read blocks).
fn terminal_events() -> mpsc::UnboundedReceiver<Event> {
    let (sender, receiver) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        while let Ok(event) = event::read() {
            if sender.send(event).is_err() {
                break;
            }
        }
    });
    receiver
}

async fn interactive(
    refresher: &mut Refresher,
    source: &str,
    mut sort: SortKey,
) -> anyhow::Result<()> {
    let palette = Palette { color: std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()) };
    let mut terminal = ratatui::try_init()?;
    let mut events = terminal_events();
    let mut tick = tokio::time::interval(REFRESH);
    tick.tick().await;
    let result = async {
        loop {
            let clock = local_clock();
            let warning = last_warning();
            terminal.draw(|frame| {
                let status = refresher.status(source, sort, &clock, warning.as_deref());
                view::draw(frame, &refresher.history, &status, palette);
            })?;
            tokio::select! {
                _ = tick.tick() => {
                    if !refresher.refresh().await? {
                        return Ok(());
                    }
                }
                Some(event) = events.recv() => match action(&event) {
                    Some(Action::Quit) => return Ok(()),
                    Some(Action::NextSort) => sort = sort.next(),
                    Some(Action::Redraw) | None => {}
                },
            }
        }
    }
    .await;
    ratatui::try_restore()?;
    result
}

/// Not a terminal: one plain screen per refresh, `count` of them or until interrupted.
async fn plain(
    refresher: &mut Refresher,
    source: &str,
    sort: SortKey,
    count: Option<u64>,
) -> anyhow::Result<()> {
    let size = |name: &str, default: u16| {
        std::env::var(name).ok().and_then(|v| v.parse().ok()).filter(|&n| n > 0).unwrap_or(default)
    };
    let mut terminal = Terminal::new(TestBackend::new(
        size("COLUMNS", PLAIN_SIZE.0),
        size("LINES", PLAIN_SIZE.1),
    ))?;
    let mut tick = tokio::time::interval(REFRESH);
    tick.tick().await;
    let mut printed = 0;
    loop {
        let clock = local_clock();
        let warning = last_warning();
        terminal.draw(|frame| {
            let status = refresher.status(source, sort, &clock, warning.as_deref());
            view::draw(frame, &refresher.history, &status, Palette { color: false });
        })?;
        let buffer = terminal.backend().buffer();
        let mut screen = String::new();
        for y in 0..buffer.area.height {
            let line: String = (0..buffer.area.width).map(|x| buffer[(x, y)].symbol()).collect();
            screen.push_str(line.trim_end());
            screen.push('\n');
        }
        let mut out = io::stdout().lock();
        match writeln!(out, "{screen}").and_then(|()| out.flush()) {
            // The reader is gone (`tcpstate top | head`): done.
            Err(error) if error.kind() == io::ErrorKind::BrokenPipe => return Ok(()),
            written => written?,
        }
        printed += 1;
        if count.is_some_and(|count| printed >= count) {
            return Ok(());
        }
        tick.tick().await;
        if !refresher.refresh().await? {
            return Ok(());
        }
    }
}

/// The local time of day, HH:MM:SS.
fn local_clock() -> String {
    // SAFETY: time(NULL) and localtime_r with valid pointers have no other preconditions.
    unsafe {
        let now = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&now, &mut tm).is_null() {
            return String::new();
        }
        format!("{:02}:{:02}:{:02}", tm.tm_hour, tm.tm_min, tm.tm_sec)
    }
}

#[cfg(test)]
mod tests {
    use ratatui::crossterm::event::KeyEvent;

    use super::*;

    #[test]
    fn q_escape_and_ctrl_c_quit_s_sorts_and_a_resize_redraws() {
        let key = |code, modifiers| Event::Key(KeyEvent::new(code, modifiers));
        let quits = [
            key(KeyCode::Char('q'), KeyModifiers::NONE),
            key(KeyCode::Esc, KeyModifiers::NONE),
            key(KeyCode::Char('c'), KeyModifiers::CONTROL),
        ];
        for event in quits {
            assert!(matches!(action(&event), Some(Action::Quit)), "{event:?}");
        }
        assert!(matches!(
            action(&key(KeyCode::Char('s'), KeyModifiers::NONE)),
            Some(Action::NextSort)
        ));
        assert!(matches!(action(&Event::Resize(10, 3)), Some(Action::Redraw)));
        assert!(action(&key(KeyCode::Char('c'), KeyModifiers::NONE)).is_none());
    }

    #[test]
    fn warnings_keep_their_last_line() {
        let mut line = WarningLine;
        line.write_all(b"[WARN] first\n[WARN] second\n\n").unwrap();
        assert_eq!(last_warning().as_deref(), Some("[WARN] second"));
    }
}
