//! What ships in deploy/ is checked against the real thing: the dashboard's queries are valid
//! PromQL over metrics the daemon really exports, and the systemd unit verifies.

use std::process::Command;

use crate::common::{self, Closer, Daemon, V4};
use serde_json::Value;
use serial_test::parallel;

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");

fn collect_exprs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, inner) in map {
                match (key.as_str(), inner) {
                    ("expr", Value::String(expr)) => out.push(expr.clone()),
                    _ => collect_exprs(inner, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|item| collect_exprs(item, out)),
        _ => {}
    }
}

#[test]
#[parallel]
fn dashboard_queries_are_valid_promql_over_exported_metrics() {
    let text =
        std::fs::read_to_string(format!("{DEPLOY}/grafana/tcpstate-dashboard.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    collect_exprs(&dashboard["panels"], &mut exprs);
    assert!(exprs.len() >= 10, "{exprs:?}");

    // promtool checks PromQL in rule files: each query becomes a recording rule, with
    // Grafana's variables given values.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, expr) in exprs.iter().enumerate() {
        let expr = expr.replace("$__rate_interval", "5m").replace("$instance", ".*");
        rules.push_str(&format!(
            "      - record: dashboard:query{i}\n        expr: '{}'\n",
            expr.replace('\'', "''")
        ));
    }
    let path = common::temp_file("dashboard-rules.yml", &rules);
    let output =
        Command::new("promtool").args(["check", "rules"]).arg(&path).output().expect("promtool");
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );

    // Every metric the dashboard reads is one the daemon exports.
    let listener = std::net::TcpListener::bind((V4, 0)).unwrap();
    let daemon = Daemon::start(&[]);
    common::one_connection(&listener, V4, Closer::Client);
    let exposition = daemon.scrape().text;
    for expr in &exprs {
        for name in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if name.starts_with("tcpstate_") {
                assert!(
                    exposition.contains(name),
                    "the dashboard reads {name}, which is not exported"
                );
            }
        }
    }
    daemon.stop();
}

#[test]
#[parallel]
fn systemd_unit_verifies() {
    let unit = std::fs::read_to_string(format!("{DEPLOY}/systemd/tcpstate.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/tcpstate run"));
    // Verify it against the binary just built, where the unit expects the installed one.
    let unit = unit.replace("/usr/local/bin/tcpstate", common::tcpstate_bin());
    let path = common::temp_file("tcpstate.service", &unit);
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (Debian package systemd)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success() && said.trim().is_empty(), "systemd-analyze verify: {said}");
}
