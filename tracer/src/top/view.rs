//! Drawing `tcpstate top`: four panels on an 80×24 terminal or larger, the sockets and leak
//! panels alone on a smaller one, one line saying so on a tiny one. Never more than the
//! frame: every size, however small, draws without panicking.

use ratatui::{
    Frame,
    layout::{Constraint, Layout, Rect},
    style::{Color, Modifier, Style},
    text::{Line, Span},
    widgets::{Block, Cell, Paragraph, Row, Table, Wrap},
};

use super::screen::{History, SortKey, StateRow};
use crate::leaks::human_age;

/// The smallest terminal for the four panels.
pub(super) const FULL_SIZE: (u16, u16) = (80, 20);
/// Below this, only a line saying the terminal is too small.
pub(super) const MIN_SIZE: (u16, u16) = (30, 6);

/// Styles; all plain when colour is off (`NO_COLOR`, or not a terminal).
#[derive(Clone, Copy, Debug)]
pub(super) struct Palette {
    pub color: bool,
}

impl Palette {
    fn heading(self) -> Style {
        Style::new().add_modifier(Modifier::BOLD)
    }

    fn title(self) -> Style {
        self.colored(Color::Cyan).add_modifier(Modifier::BOLD)
    }

    /// Something is wrong: leaks, lost events, failures, an unreachable daemon.
    fn alert(self) -> Style {
        self.colored(Color::Red).add_modifier(Modifier::BOLD)
    }

    fn rising(self) -> Style {
        self.colored(Color::Yellow)
    }

    fn colored(self, color: Color) -> Style {
        if self.color { Style::new().fg(color) } else { Style::new() }
    }
}

/// What the frame says besides the panels.
pub(super) struct Status<'a> {
    /// Where the numbers come from: the daemon's URL, or "kernel".
    pub source: &'a str,
    pub sort: SortKey,
    /// Local wall-clock time of the last refresh.
    pub clock: &'a str,
    /// Why the last refresh failed, while it does.
    pub error: Option<&'a str>,
    /// The latest warning the tracer logged.
    pub warning: Option<&'a str>,
}

pub(super) fn draw(frame: &mut Frame, history: &History, status: &Status, palette: Palette) {
    let area = frame.area();
    if area.width < MIN_SIZE.0 || area.height < MIN_SIZE.1 {
        let text = format!(
            "tcpstate top: terminal too small ({}×{}); needs {}×{}, {}×{} for every panel",
            area.width, area.height, MIN_SIZE.0, MIN_SIZE.1, FULL_SIZE.0, FULL_SIZE.1
        );
        frame.render_widget(Paragraph::new(text).wrap(Wrap { trim: true }), area);
        return;
    }
    let [header, body, footer] =
        Layout::vertical([Constraint::Length(1), Constraint::Fill(1), Constraint::Length(1)])
            .areas(area);
    frame.render_widget(header_line(status, palette), header);
    frame.render_widget(footer_line(history, status, palette), footer);
    if area.width >= FULL_SIZE.0 && area.height >= FULL_SIZE.1 {
        let [top, bottom] =
            Layout::vertical([Constraint::Percentage(60), Constraint::Percentage(40)]).areas(body);
        let [states, transitions] =
            Layout::horizontal([Constraint::Length(44), Constraint::Fill(1)]).areas(top);
        let [leaks, failures] =
            Layout::horizontal([Constraint::Percentage(55), Constraint::Fill(1)]).areas(bottom);
        draw_states(frame, states, history, status.sort, palette);
        draw_transitions(frame, transitions, history, status.sort, palette);
        draw_leaks(frame, leaks, history, status.sort, palette);
        draw_failures(frame, failures, history, status.sort, palette);
    } else {
        let [states, leaks] =
            Layout::vertical([Constraint::Fill(1), Constraint::Percentage(35)]).areas(body);
        draw_states(frame, states, history, status.sort, palette);
        draw_leaks(frame, leaks, history, status.sort, palette);
    }
}

fn header_line<'a>(status: &Status<'a>, palette: Palette) -> Line<'a> {
    let mut spans = vec![
        Span::styled("tcpstate top", palette.title()),
        Span::raw(format!(
            "  {}  {}  sort: {} (s)  q quits",
            status.source,
            status.clock,
            status.sort.label()
        )),
    ];
    if let Some(error) = status.error {
        spans.push(Span::styled(format!("  {error}"), palette.alert()));
    }
    Line::from(spans)
}

fn footer_line<'a>(history: &History, status: &Status<'a>, palette: Palette) -> Line<'a> {
    let (lost, lost_rate) = history.lost();
    let lost_style = if lost > 0.0 { palette.alert() } else { Style::new() };
    let tracked = history.latest().map_or(0.0, |s| s.tracked);
    let mut spans = vec![
        Span::styled(format!("lost events {lost:.0} ({lost_rate:.1}/s)"), lost_style),
        Span::raw(format!("  tracked sockets {tracked:.0}")),
    ];
    if let Some(warning) = status.warning {
        spans.push(Span::styled(format!("  {warning}"), palette.rising()));
    }
    Line::from(spans)
}

fn panel(title: String, palette: Palette) -> Block<'static> {
    Block::bordered().title(Span::styled(title, palette.title()))
}

fn right(text: String) -> Cell<'static> {
    Cell::new(Line::from(text).right_aligned())
}

fn draw_states(frame: &mut Frame, area: Rect, history: &History, sort: SortKey, palette: Palette) {
    let window = history.span().as_secs();
    let rows = history.states(sort).into_iter().map(|row| {
        let change_style = if row.change > 0.0 { palette.rising() } else { Style::new() };
        let leak = row.state == "CLOSE_WAIT" && row.now > 0.0;
        Row::new([
            Cell::new(row.state.clone()).style(if leak { palette.alert() } else { Style::new() }),
            right(format!("{:.0}", row.now)),
            right(format!("{:+.0}", row.change)).style(change_style),
            Cell::new(sparkline(&row)),
            right(row.oldest_seconds.map(human_age).unwrap_or_default()),
        ])
    });
    let header = Row::new([
        Cell::new("STATE"),
        right("NOW".into()),
        right(format!("Δ{window}s")),
        Cell::new("TREND"),
        right("OLDEST".into()),
    ])
    .style(palette.heading());
    let widths = [
        Constraint::Length(12),
        Constraint::Length(6),
        Constraint::Length(5),
        Constraint::Length(8),
        Constraint::Length(7),
    ];
    let table =
        Table::new(rows, widths).header(header).block(panel("Sockets by state".into(), palette));
    frame.render_widget(table, area);
}

/// The trend as block characters, scaled between the window's smallest and largest count.
fn sparkline(row: &StateRow) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let low = row.trend.iter().copied().fold(f64::INFINITY, f64::min);
    let high = row.trend.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    row.trend
        .iter()
        .map(|&v| {
            if high > low {
                BARS[(((v - low) / (high - low)) * 7.0).round() as usize % BARS.len()]
            } else {
                BARS[0]
            }
        })
        .collect()
}

fn draw_transitions(
    frame: &mut Frame,
    area: Rect,
    history: &History,
    sort: SortKey,
    palette: Palette,
) {
    // The total only where the pair's names still fit beside it.
    let with_total = area.width >= 50;
    let rows = history.transitions(sort).into_iter().map(|row| {
        let mut cells = vec![
            Cell::new(format!("{}→{}", row.from, row.to)),
            right(format!("{:.1}", row.per_second)),
        ];
        if with_total {
            cells.push(right(format!("{:.0}", row.total)));
        }
        Row::new(cells)
    });
    let mut header = vec![Cell::new("FROM→TO"), right("/s".into())];
    let mut widths = vec![Constraint::Fill(1), Constraint::Length(7)];
    if with_total {
        header.push(right("TOTAL".into()));
        widths.push(Constraint::Length(8));
    }
    let table = Table::new(rows, widths)
        .header(Row::new(header).style(palette.heading()))
        .block(panel("Transitions".into(), palette));
    frame.render_widget(table, area);
}

fn draw_leaks(frame: &mut Frame, area: Rect, history: &History, sort: SortKey, palette: Palette) {
    let threshold = history.latest().and_then(|s| s.leaks.as_ref()).map_or(String::new(), |r| {
        format!(" (CLOSE_WAIT over {})", human_age(r.threshold_seconds))
    });
    let leaks = history.leaks(sort);
    let any_listener = leaks.iter().any(|row| row.listener.is_some());
    let any_finding = leaks.iter().any(|row| row.kind.is_some());

    // Where the process runs, only where its pod's name has room.
    let with_container = area.width >= 60;
    let rows: Vec<Row> = leaks
        .into_iter()
        .map(|row| {
            // A stuck listener's port and queue: beside its container where there is room,
            // else its port before its name.
            let (comm, container) = match (row.listener, with_container) {
                // Another diagnosis's finding: its kind where the container goes.
                (None, true) if row.kind.is_some() => {
                    (row.comm, format!("{} {}", row.kind.unwrap_or_default(), row.container))
                }
                (None, _) => (row.comm, row.container),
                (Some((port, limit)), true) => {
                    (row.comm, format!(":{port} full {}/{limit} {}", row.sockets, row.container))
                }
                (Some((port, _)), false) => (format!(":{port} {}", row.comm), row.container),
            };
            let mut cells = vec![
                right(row.pid.map_or_else(|| "?".to_owned(), |p| p.to_string())),
                Cell::new(comm),
                right(row.sockets.to_string()),
                right(human_age(row.oldest_seconds)),
            ];
            if with_container {
                cells.push(Cell::new(container));
            }
            Row::new(cells).style(palette.alert())
        })
        .collect();
    let title = if rows.is_empty() {
        format!("No leaks{threshold}")
    } else if any_listener {
        // No room for the threshold beside it.
        "Leaks, listeners not accepting".to_owned()
    } else if any_finding {
        "Leaks and stuck sockets".to_owned()
    } else {
        format!("Leaks{threshold}")
    };
    let mut header =
        vec![right("PID".into()), Cell::new("COMM"), right("SOCKS".into()), right("OLDEST".into())];
    let mut widths = vec![
        Constraint::Length(7),
        Constraint::Length(15),
        Constraint::Length(5),
        Constraint::Length(7),
    ];
    if with_container {
        header.push(Cell::new("POD/CONTAINER"));
        widths.push(Constraint::Fill(1));
    }
    let header = Row::new(header).style(palette.heading());
    frame.render_widget(Table::new(rows, widths).header(header).block(panel(title, palette)), area);
}

fn draw_failures(
    frame: &mut Frame,
    area: Rect,
    history: &History,
    sort: SortKey,
    palette: Palette,
) {
    let rows: Vec<Row> = history
        .failures(sort)
        .into_iter()
        .map(|row| {
            let style = if row.per_second > 0.0 { palette.alert() } else { Style::new() };
            Row::new([
                Cell::new(row.what),
                right(format!("{:.1}", row.per_second)),
                right(row.total.map_or_else(String::new, |total| format!("{total:.0}"))),
            ])
            .style(style)
        })
        .collect();
    let title = if rows.is_empty() { "No failed connections" } else { "Failures and retransmits" };
    let header = Row::new([Cell::new("WHAT"), right("/s".into()), right("TOTAL".into())])
        .style(palette.heading());
    let widths = [Constraint::Fill(1), Constraint::Length(7), Constraint::Length(8)];
    frame.render_widget(
        Table::new(rows, widths).header(header).block(panel(title.into(), palette)),
        area,
    );
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use ratatui::{Terminal, backend::TestBackend};

    use super::*;
    use crate::top::sample::Sample;

    fn history() -> History {
        let mut sample = Sample::default();
        sample.sockets.insert("ESTABLISHED".into(), 12.0);
        sample.sockets.insert("CLOSE_WAIT".into(), 3.0);
        sample.connect_failures.insert("refused".into(), 4.0);
        sample.transitions.insert(("ESTABLISHED".into(), "CLOSE_WAIT".into()), 3.0);
        sample.lost.insert("ring_full".into(), 0.0);
        let mut history = History::default();
        let now = Instant::now();
        history.push(now, sample.clone());
        sample.connect_failures.insert("refused".into(), 6.0);
        history.push(now + Duration::from_secs(1), sample);
        history
    }

    fn screen(width: u16, height: u16, palette: Palette) -> (String, TestBackend) {
        screen_of(&history(), width, height, palette)
    }

    fn screen_of(
        history: &History,
        width: u16,
        height: u16,
        palette: Palette,
    ) -> (String, TestBackend) {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
        let status = Status {
            source: "kernel",
            sort: SortKey::Count,
            clock: "12:00:00",
            error: None,
            warning: None,
        };
        terminal.draw(|frame| draw(frame, history, &status, palette)).unwrap();
        let buffer = terminal.backend().buffer().clone();
        let text = (0..buffer.area.height)
            .map(|y| (0..buffer.area.width).map(|x| buffer[(x, y)].symbol()).collect::<String>())
            .collect::<Vec<_>>()
            .join("\n");
        (text, terminal.backend().clone())
    }

    #[test]
    fn every_panel_fits_in_80_by_24() {
        let (text, _) = screen(80, 24, Palette { color: true });
        for expected in [
            "Sockets by state",
            "ESTABLISHED→CLOSE_WAIT",
            "connect refused",
            "2.0",
            "No leaks",
            "lost events 0",
        ] {
            assert!(text.contains(expected), "{expected:?} missing from:\n{text}");
        }
    }

    #[test]
    fn a_stuck_listener_shows_among_the_leaks_with_its_port_and_queue() {
        use crate::leaks::{LeakReport, Source, stuck_listeners::StuckListener};
        let report = LeakReport {
            stuck_listeners: vec![StuckListener::example()],
            ..LeakReport::empty(Source::Daemon, Duration::from_secs(60))
        };
        let mut sample = Sample { leaks: Some(report), ..Sample::default() };
        sample.sockets.insert("LISTEN".into(), 1.0);
        let mut history = History::default();
        history.push(Instant::now(), sample);
        // Narrow: the port before the name; wide: the queue beside the container.
        for (width, shown) in [(80, ":8080 server"), (160, ":8080 full 129/128")] {
            let (text, _) = screen_of(&history, width, 24, Palette { color: false });
            for expected in ["Leaks, listeners not accepting", shown, "1m 35s"] {
                assert!(text.contains(expected), "{expected:?} missing at width {width}:\n{text}");
            }
        }
    }

    #[test]
    fn another_diagnosis_finding_shows_among_the_leaks_with_its_kind() {
        use crate::leaks::{Finding, LeakReport, Source};
        let report = LeakReport {
            findings: vec![Finding::example()],
            ..LeakReport::empty(Source::Daemon, Duration::from_secs(60))
        };
        let mut history = History::default();
        history.push(Instant::now(), Sample { leaks: Some(report), ..Sample::default() });
        let (text, _) = screen_of(&history, 160, 24, Palette { color: false });
        for expected in ["Leaks and stuck sockets", "4242", "client", "connection churn", "3000"] {
            assert!(text.contains(expected), "{expected:?} missing:\n{text}");
        }
    }

    #[test]
    fn a_smaller_terminal_keeps_the_states_and_a_tiny_one_says_so() {
        let (text, _) = screen(60, 12, Palette { color: false });
        assert!(text.contains("CLOSE_WAIT") && !text.contains("Transitions"), "{text}");
        let (text, _) = screen(20, 4, Palette { color: false });
        assert!(text.starts_with("tcpstate top:"), "{text}");
    }

    #[test]
    fn every_size_draws_without_panicking() {
        for width in 0..=90 {
            for height in [0, 1, 2, 5, 6, 7, 12, 19, 20, 24, 40] {
                screen(width, height, Palette { color: true });
            }
        }
    }

    #[test]
    fn no_colour_means_no_colour_anywhere() {
        let (_, backend) = screen(80, 24, Palette { color: false });
        let buffer = backend.buffer();
        for cell in buffer.content() {
            assert_eq!((cell.fg, cell.bg), (Color::Reset, Color::Reset), "{cell:?}");
        }
        let (_, backend) = screen(80, 24, Palette { color: true });
        assert!(backend.buffer().content().iter().any(|c| c.fg == Color::Red), "CLOSE_WAIT in red");
    }
}
