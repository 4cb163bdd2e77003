//! `tcpstate explain [STATE]`: what each state the tracepoint reports means for a person on
//! call, one screen each: who is in it, what leads in and out, what a pile-up usually means,
//! what to check, which kernel settings matter, and where tcpstate shows it. With no state,
//! the state diagram. The CLOSE_WAIT text is also what `tcpstate leaks` prints under a leak
//! and what the leak alerts in `deploy/prometheus/alerts.yml` say (a test keeps them equal).

use tracer_common::TcpState;

/// One state, explained.
pub(crate) struct Explanation {
    pub state: TcpState,
    /// One line: what the state is.
    pub summary: &'static str,
    /// Which end of a connection is in it.
    pub side: &'static str,
    pub enters: &'static str,
    pub leaves: &'static str,
    /// What many sockets in it usually mean.
    pub pile_up: &'static str,
    /// What to look at first.
    pub check: &'static str,
    /// Kernel settings that change how long sockets stay or how many there can be.
    pub settings: &'static [&'static str],
    /// Where tcpstate shows it.
    pub in_tcpstate: &'static str,
}

/// Every state the tracepoint reports, in the kernel's order.
pub(crate) const EXPLANATIONS: [Explanation; 12] = [
    Explanation {
        state: TcpState::ESTABLISHED,
        summary: "the connection is open; data flows both ways",
        side: "both ends, after the handshake",
        enters: "SYN_SENT on the SYN-ACK (client); SYN_RECV on the final ACK (server)",
        leaves: "FIN_WAIT1 when this side calls close() or shutdown(); CLOSE_WAIT when the peer's \
                 FIN arrives; CLOSE on a reset",
        pile_up: "many open connections: normal for busy servers and connection pools, a \
                  problem when the count only grows or nears the file descriptor limit. An \
                  open connection can also stall: its process stopped reading (Recv-Q holds \
                  data that does not shrink), or its peer stopped reading (zero window) or is \
                  gone (retransmits), and Send-Q does not drain",
        check: "who holds them (`ss -tnp state established`) and whether the count follows the \
                load; for stalls, `tcpstate leaks` names the process and sockets (one `ss` \
                cannot tell a stall from a busy transfer)",
        settings: &["net.ipv4.tcp_keepalive_time", "ulimit -n of the process", "TCP_USER_TIMEOUT"],
        in_tcpstate: "tcpstate_sockets{state=\"ESTABLISHED\"}; /api/sockets?state=ESTABLISHED; \
                      tcpstate_retransmits_total{state=\"ESTABLISHED\"}; stalls: \
                      tcpstate_stalled_sockets{kind,reason} (--stall-threshold)",
    },
    Explanation {
        state: TcpState::SYN_SENT,
        summary: "this side sent a SYN (connect()) and waits for the SYN-ACK",
        side: "the client",
        enters: "CLOSE on connect()",
        leaves: "ESTABLISHED on the SYN-ACK; CLOSE on a reset (refused), an ICMP error \
                 (unreachable) or after the SYN retries time out",
        pile_up: "nothing answers the SYNs: the destination is down or overloaded, or a \
                  firewall drops them silently (a reject would end them at once)",
        check: "the destinations (`ss -tn state syn-sent`), whether they listen and are \
                reachable, firewalls and security groups on the path",
        settings: &["net.ipv4.tcp_syn_retries (about 127 s at the default 6)"],
        in_tcpstate: "tcpstate_sockets{state=\"SYN_SENT\"}; `tcpstate watch --state SYN_SENT`; \
                      how long connects take: tcpstate_handshake_duration_seconds{role=\"client\"}; \
                      SYN retries (each one adds 1 s, then 2 s, 4 s, ...): \
                      tcpstate_retransmits_total{state=\"SYN_SENT\"}; the destinations that \
                      refuse or time out most: tcpstate_connect_failures_by_destination, \
                      /api/destinations, `tcpstate top`",
    },
    Explanation {
        state: TcpState::SYN_RECV,
        summary: "a listener's SYN was answered with a SYN-ACK; the final ACK is awaited",
        side: "the server (a socket being accepted)",
        enters: "LISTEN when the handshake's SYN arrives (the kernel keeps most of these as \
                 NEW_SYN_RECV request sockets instead)",
        leaves: "ESTABLISHED on the final ACK; CLOSE after the SYN-ACK retries time out",
        pile_up: "handshakes that do not complete: clients that vanish, a path that loses the \
                  final ACK, or a SYN flood",
        check: "the listen queue (`ss -ltn`: Recv-Q against Send-Q), `nstat -az TcpExtListenDrops \
                TcpExtListenOverflows`, the sources of the SYNs",
        settings: &[
            "net.ipv4.tcp_max_syn_backlog",
            "net.core.somaxconn",
            "net.ipv4.tcp_synack_retries",
            "net.ipv4.tcp_syncookies",
        ],
        in_tcpstate: "tcpstate_sockets{state=\"SYN_RECV\"} and {state=\"NEW_SYN_RECV\"}; the \
                      clients' round trips: tcpstate_handshake_duration_seconds{role=\"server\"}; \
                      SYN-ACKs sent again: tcpstate_synack_retransmits_total",
    },
    Explanation {
        state: TcpState::FIN_WAIT1,
        summary: "this side closed and sent a FIN; the peer has not acknowledged it yet",
        side: "the side that closes first",
        enters: "ESTABLISHED on close() or shutdown()",
        leaves: "FIN_WAIT2 when the FIN is acknowledged; CLOSING when the peer's FIN crosses \
                 ours; CLOSE on a reset or a timeout",
        pile_up: "the peer does not acknowledge: it is gone, unreachable, or its receive \
                  window is full (data still queued to it)",
        check: "the peers (`ss -tn state fin-wait-1`), unsent data (Send-Q), reachability",
        settings: &["net.ipv4.tcp_orphan_retries", "net.ipv4.tcp_max_orphans"],
        in_tcpstate: "tcpstate_sockets{state=\"FIN_WAIT1\"}; tcpstate_state_duration_seconds; \
                      a FIN (or the data before it) the peer does not acknowledge: \
                      tcpstate_retransmits_total{state=\"FIN_WAIT1\"}",
    },
    Explanation {
        state: TcpState::FIN_WAIT2,
        summary: "this side closed, the peer acknowledged, and its own FIN is awaited",
        side: "the side that closes first",
        enters: "FIN_WAIT1 when our FIN is acknowledged",
        leaves: "TIME_WAIT on the peer's FIN (the tracepoint shows FIN_WAIT2 -> CLOSE: a small \
                 time-wait socket takes over); CLOSE after tcp_fin_timeout once the program \
                 has closed",
        pile_up: "the peer has not closed its side: it keeps the connection half-open \
                  (often its own CLOSE_WAIT leak)",
        check: "the peers (`ss -tno state fin-wait-2`): the program on the other end probably \
                never calls close()",
        settings: &["net.ipv4.tcp_fin_timeout (60 s)"],
        in_tcpstate: "tcpstate_sockets{state=\"FIN_WAIT2\"}; on the peer: `tcpstate leaks`",
    },
    Explanation {
        state: TcpState::TIME_WAIT,
        summary: "the connection is closed; the address pair is held to absorb late packets",
        side: "the side that closed first",
        enters: "FIN_WAIT2 on the peer's FIN, or CLOSING on the last ACK (the tracepoint shows \
                 those as -> CLOSE: the full socket is replaced by a small time-wait one)",
        leaves: "gone after 60 s (fixed in Linux)",
        pile_up: "normal on the side that closes first; a problem only when it runs short of \
                  ports: many short connections to the same destination address and port",
        check: "`tcpstate leaks` names connection churn: the process that opens (or the service \
                that accepts) many connections a second that live milliseconds, and where to; \
                keep connections alive or pooled, or let the server close first",
        settings: &[
            "net.ipv4.ip_local_port_range",
            "net.ipv4.tcp_tw_reuse",
            "net.ipv4.tcp_max_tw_buckets",
        ],
        in_tcpstate: "tcpstate_sockets{state=\"TIME_WAIT\"} (counted from sock_diag at each \
                      reconciliation: the tracepoint does not report TIME_WAIT sockets); \
                      tcpstate_connection_churn and tcpstate_connection_lifetime_seconds; \
                      `tcpstate watch --closed --port PORT` shows each connection's lifetime",
    },
    Explanation {
        state: TcpState::CLOSE,
        summary: "the socket is closed (or not yet connected)",
        side: "any",
        enters: "connect() and listen() start from it; every connection ends in it",
        leaves: "SYN_SENT on connect(), LISTEN on listen()",
        pile_up: "never: a closed socket leaves the tables (tcpstate counts the transitions \
                  into it, not sockets in it)",
        check: "how connections end: resets and timeouts show as transitions into CLOSE from \
                SYN_SENT, SYN_RECV or ESTABLISHED",
        settings: &[],
        in_tcpstate: "tcpstate_transitions_total{to=\"CLOSE\"} by from",
    },
    Explanation {
        state: TcpState::CLOSE_WAIT,
        summary: "the peer closed its side; this side has not",
        side: "the side that closes second",
        enters: "ESTABLISHED when the peer's FIN arrives",
        leaves: "LAST_ACK when the local program calls close()",
        pile_up: "the local program has not called close() after the peer hung up: a leak in \
                  its connection handling (an error path that skips close, a pool that never \
                  notices dead connections); it ends when the process runs out of file \
                  descriptors",
        check: "which process holds them (`tcpstate leaks`: pid, command line, container, \
                peers) and the code path that reads EOF without closing",
        settings: &["none: no kernel timeout ends CLOSE_WAIT; only close() or the process's exit"],
        in_tcpstate: "`tcpstate leaks`; tcpstate_close_wait_leaked_sockets by comm; \
                      tcpstate_close_wait_oldest_age_seconds",
    },
    Explanation {
        state: TcpState::LAST_ACK,
        summary: "both sides closed; this side's FIN awaits its acknowledgement",
        side: "the side that closes second",
        enters: "CLOSE_WAIT on close()",
        leaves: "CLOSE on the ACK, or after the FIN retries time out",
        pile_up: "the peer is gone before acknowledging: it crashed, or a middlebox dropped \
                  the connection",
        check: "the peers (`ss -tn state last-ack`), their reachability",
        settings: &["net.ipv4.tcp_retries2"],
        in_tcpstate: "tcpstate_sockets{state=\"LAST_ACK\"}",
    },
    Explanation {
        state: TcpState::LISTEN,
        summary: "a server socket waiting for connections",
        side: "the server",
        enters: "CLOSE on listen()",
        leaves: "CLOSE when the program closes the listener",
        pile_up: "one per listening port and address (more with SO_REUSEPORT); growth means a \
                  program opening listeners it does not close",
        check: "`ss -ltnp`; a full accept queue (Recv-Q near Send-Q) means the program accepts \
                too slowly or not at all: look at its threads (a stuck event loop, a full \
                worker pool, a lock), e.g. with `top -H -p PID` or a stack dump",
        settings: &["net.core.somaxconn", "the backlog the program passes to listen()"],
        in_tcpstate: "tcpstate_sockets{state=\"LISTEN\"}; each listener's accept queue: \
                      tcpstate_listen_queue_length against tcpstate_listen_queue_limit; \
                      handshakes dropped because it was full: tcpstate_listen_overflows_total; \
                      listeners full for longer than --listen-queue-threshold, with the \
                      process holding them: `tcpstate leaks`",
    },
    Explanation {
        state: TcpState::CLOSING,
        summary: "both sides closed at the same time; the last ACK is awaited",
        side: "both ends, briefly",
        enters: "FIN_WAIT1 when the peer's FIN arrives before the ACK of ours",
        leaves: "TIME_WAIT on the ACK",
        pile_up: "rare: simultaneous closes whose final ACKs are lost",
        check: "packet loss between the peers",
        settings: &["net.ipv4.tcp_orphan_retries"],
        in_tcpstate: "tcpstate_sockets{state=\"CLOSING\"}",
    },
    Explanation {
        state: TcpState::NEW_SYN_RECV,
        summary: "a handshake in progress, kept as a small request socket on the listener",
        side: "the server",
        enters: "a SYN to a listener (Linux keeps SYN_RECV handshakes in this lighter form)",
        leaves: "becomes a full socket in SYN_RECV then ESTABLISHED on the final ACK; dropped \
                 after the SYN-ACK retries",
        pile_up: "handshakes that do not complete, or a SYN flood",
        check: "`nstat -az TcpExtListenDrops TcpExtSyncookiesSent`, the sources of the SYNs",
        settings: &[
            "net.ipv4.tcp_max_syn_backlog",
            "net.ipv4.tcp_synack_retries",
            "net.ipv4.tcp_syncookies",
        ],
        in_tcpstate: "tcpstate_sockets{state=\"NEW_SYN_RECV\"} (counted from sock_diag)",
    },
];

impl Explanation {
    /// The pile-up's first clause: the one-line hint under `tcpstate leaks` and in the leak
    /// alerts' descriptions.
    pub(crate) fn hint(&self) -> &'static str {
        self.pile_up.split(':').next().unwrap_or(self.pile_up)
    }
}

/// The explanation of `state`, if this build knows it.
pub(crate) fn of(state: TcpState) -> Option<&'static Explanation> {
    EXPLANATIONS.iter().find(|e| e.state == state)
}

/// The state diagram, for `tcpstate explain` without a state.
pub(crate) const DIAGRAM: &str = "\
TCP states as the kernel reports them (RFC 793, plus Linux's NEW_SYN_RECV)

  client                                server
  CLOSE --connect()--> SYN_SENT         CLOSE --listen()--> LISTEN
  SYN_SENT --SYN-ACK--> ESTABLISHED     LISTEN --SYN--> NEW_SYN_RECV, SYN_RECV
                                        SYN_RECV --ACK--> ESTABLISHED

  closing first                         closing second
  ESTABLISHED --close()--> FIN_WAIT1    ESTABLISHED --peer's FIN--> CLOSE_WAIT
  FIN_WAIT1 --ACK--> FIN_WAIT2          CLOSE_WAIT --close()--> LAST_ACK
  FIN_WAIT2 --peer's FIN--> TIME_WAIT   LAST_ACK --ACK--> CLOSE
  TIME_WAIT --60 s--> (gone)
  FIN_WAIT1 --peer's FIN--> CLOSING --ACK--> TIME_WAIT   (simultaneous close)

  A reset or a timeout takes any state to CLOSE.

Sockets that pile up and what it usually means:
  CLOSE_WAIT   the local program never called close() after the peer hung up
  FIN_WAIT2    the peer never closed its side
  SYN_SENT     nothing answers, often a firewall that drops
  SYN_RECV     handshakes not completed: backlog, lost ACKs, SYN flood
  TIME_WAIT    normal for the closing side; a problem only when ports run short

`tcpstate explain STATE` says more about one: `tcpstate explain CLOSE_WAIT`.";

/// Width the text is wrapped to: one screen of a default terminal.
const WIDTH: usize = 80;

/// One state's screen.
pub(crate) fn render(e: &Explanation) -> String {
    let mut out = String::new();
    wrap_into(&mut out, "", &format!("{} - {}", e.state, e.summary));
    out.push('\n');
    let settings = if e.settings.is_empty() { "none".to_owned() } else { e.settings.join(", ") };
    for (label, text) in [
        ("Who", e.side),
        ("Enters from", e.enters),
        ("Leaves to", e.leaves),
        ("A pile-up", e.pile_up),
        ("Check", e.check),
        ("Settings", &settings),
        ("In tcpstate", e.in_tcpstate),
    ] {
        wrap_into(&mut out, &format!("{label:<12}"), text);
    }
    out
}

/// Appends `text` wrapped at `WIDTH`, the first line after `lead`, the others indented as far.
fn wrap_into(out: &mut String, lead: &str, text: &str) {
    let indent = " ".repeat(lead.len());
    let mut line = lead.to_owned();
    let mut empty = true;
    for word in text.split_whitespace() {
        if !empty && line.len() + 1 + word.len() > WIDTH {
            out.push_str(line.trim_end());
            out.push('\n');
            line = indent.clone();
            empty = true;
        }
        if !empty {
            line.push(' ');
        }
        line.push_str(word);
        empty = false;
    }
    out.push_str(line.trim_end());
    out.push('\n');
}

/// `tcpstate explain [STATE]`.
pub fn run(state: Option<TcpState>) {
    match state.and_then(of) {
        Some(explanation) => print!("{}", render(explanation)),
        None => println!("{DIAGRAM}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_is_explained_in_one_screen() {
        for state in TcpState::ALL {
            let explanation = of(state).unwrap_or_else(|| panic!("{state} is not explained"));
            let text = render(explanation);
            let lines: Vec<&str> = text.lines().collect();
            assert!(lines.len() <= 23, "{state}: {} lines\n{text}", lines.len());
            assert!(lines.iter().all(|l| l.chars().count() <= WIDTH), "{state}:\n{text}");
        }
        let diagram: Vec<&str> = DIAGRAM.lines().collect();
        assert!(diagram.len() <= 30 && diagram.iter().all(|l| l.chars().count() <= WIDTH));
    }

    #[test]
    fn close_wait_says_what_to_do() {
        let close_wait = of(TcpState::CLOSE_WAIT).unwrap();
        let text = render(close_wait);
        assert!(text.starts_with("CLOSE_WAIT - the peer closed its side; this side has not"));
        assert_eq!(
            close_wait.hint(),
            "the local program has not called close() after the peer hung up"
        );
        assert!(text.contains("close()") && text.contains("tcpstate leaks"), "{text}");
    }

    /// The leak alerts describe CLOSE_WAIT with this text, not a second copy of it.
    #[test]
    fn the_leak_alerts_say_what_explain_says() {
        let rules = include_str!("../../deploy/prometheus/alerts.yml");
        let hint = of(TcpState::CLOSE_WAIT).unwrap().hint();
        for alert in ["TcpCloseWaitLeak", "TcpCloseWaitStale"] {
            let rule = rules.split("- alert: ").find(|r| r.starts_with(&format!("{alert}\n")));
            let rule = rule.unwrap_or_else(|| panic!("no rule {alert}"));
            let description: String = rule
                .split("description:")
                .nth(1)
                .unwrap_or_else(|| panic!("{alert} has no description"))
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
            assert!(description.contains(hint), "{alert}: {description}");
            assert!(description.contains("tcpstate explain CLOSE_WAIT"), "{alert}");
        }
    }
}
