//! `tcpstate check` on the running kernel: what it finds is what the daemon then gets.

use serde_json::Value;
use serial_test::parallel;

use crate::common::run_tcpstate;

/// The kernel matrix says which programs must run; on other kernels whatever loads.
fn expected_parts() -> Option<String> {
    std::env::var("TCPSTATE_TEST_EXPECT_PARTS").ok()
}

/// The optional programs the kernel matrix says this kernel must refuse (comma-separated).
pub fn refused_parts() -> Vec<String> {
    let parts = std::env::var("TCPSTATE_TEST_REFUSED_PARTS").unwrap_or_default();
    parts.split(',').filter(|p| !p.is_empty()).map(str::to_owned).collect()
}

#[test]
#[parallel]
fn check_loads_every_program_and_says_what_runs() {
    let checked = run_tcpstate(&["check", "--json"]);
    let report: Value = serde_json::from_str(&checked.stdout.join("\n"))
        .unwrap_or_else(|e| panic!("{e}: {:?} {:?}", checked.stdout, checked.stderr));
    let findings = report["findings"].as_array().unwrap();
    let verdict_of = |check: &str| {
        findings
            .iter()
            .find(|f| f["check"] == check)
            .unwrap_or_else(|| panic!("no `{check}` finding: {report:#}"))["verdict"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    for required in ["kernel", "privileges", "btf", "tracefs", "tracepoint", "ring buffer", "main"]
    {
        assert_eq!(verdict_of(required), "ok", "{required}: {report:#}");
    }
    if let Some(parts) = expected_parts() {
        for part in parts.split(',') {
            assert_eq!(verdict_of(part), "ok", "{part} must run on this kernel: {report:#}");
        }
    }
    let refused = refused_parts();
    for part in &refused {
        assert_eq!(verdict_of(part), "degraded", "{part} must be refused here: {report:#}");
    }
    let code = checked.status.code();
    if !refused.is_empty() {
        assert_eq!(report["verdict"], "degraded", "{report:#}");
    }
    match report["verdict"].as_str().unwrap() {
        "ok" => assert_eq!(code, Some(0), "{report:#}"),
        "degraded" => assert_eq!(code, Some(3), "{report:#}"),
        other => panic!("verdict {other} with every required check ok: {report:#}"),
    }
    // The report says it all: the probe's own warnings are not repeated on stderr.
    assert!(checked.stderr.is_empty(), "{:?}", checked.stderr);

    let human = run_tcpstate(&["check"]);
    let text = human.stdout.join("\n");
    assert_eq!(human.status.code(), code, "{text}");
    assert!(text.starts_with("tcpstate check on Linux "), "{text}");
    assert!(text.contains("tcpstate can run here"), "{text}");
}
