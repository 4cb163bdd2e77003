//! The Helm chart (`deploy/helm/tcpstate`): checked as a cluster would take it, packaged for
//! `dist`, and the source of `deploy/kubernetes/daemonset.yaml`.
//!
//! The checks: `helm lint --strict`; `helm template` with each values file in the chart's
//! `ci/`, every manifest validated against the Kubernetes API schemas of the oldest and newest
//! versions the chart supports; the rendered PrometheusRule's groups through `promtool check
//! rules`; the rendered dashboard equal to `deploy/grafana/`'s; the plain manifest equal to the
//! chart's rendering with default values.

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail, ensure};
use serde::Deserialize as _;

use crate::cmd::{capture, run_logged};

const CHART: &str = "deploy/helm/tcpstate";
const MANIFEST: &str = "deploy/kubernetes/daemonset.yaml";
const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The oldest and newest Kubernetes versions the chart is validated against (its
/// `kubeVersion` says the oldest; the newest is the newest the validator ships).
const KUBERNETES_VERSIONS: [&str; 2] = ["1.25.0", "1.33.0"];

/// The chart's tools.
pub struct Tools {
    pub installed: crate::setup::ChartTools,
    /// Where promtool is.
    pub bin: PathBuf,
}

/// Checks the Prometheus Operator's objects in a JSON list of manifests with the validators
/// generated from its CRDs; prints one line per object, exits 1 if any is invalid.
const OPERATOR_CHECK: &str = r#"import { readFileSync } from 'node:fs';
const [schemas, file] = process.argv.slice(2);
const prefix = 'ComGithubPrometheusOperatorPrometheusOperatorPkgApisMonitoringV1';
let failed = 0;
for (const doc of JSON.parse(readFileSync(file, 'utf8'))) {
  if (doc.apiVersion !== 'monitoring.coreos.com/v1') continue;
  const { validate } = await import(`${schemas}/${prefix}${doc.kind}.js`);
  if (validate(doc)) {
    console.log(`valid ${doc.kind}`);
  } else {
    failed++;
    console.log(`invalid ${doc.kind}: ${JSON.stringify(validate.errors)}`);
  }
}
process.exit(failed ? 1 : 0);
"#;

/// Every check of the chart; fails naming the values file and what was wrong.
pub fn check(root: &Path, tools: &Tools) -> anyhow::Result<()> {
    let chart = root.join(CHART);
    eprintln!("xtask: checking the Helm chart (lint, render, validate, promtool)");
    run_logged(
        Command::new(&tools.installed.helm).args(["lint", "--strict"]).arg(&chart),
        "helm-lint",
    )?;
    let mut values: Vec<PathBuf> = fs::read_dir(chart.join("ci"))?
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|e| e == "yaml"))
        .collect();
    values.sort();
    ensure!(values.len() >= 4, "the chart's ci/ has {} values files, expected 4", values.len());
    let scratch = root.join("target/chart-check");
    let _ = fs::remove_dir_all(&scratch);
    fs::create_dir_all(&scratch)?;
    for file in &values {
        let name = file.file_stem().unwrap_or_default().to_string_lossy().into_owned();
        let rendered = render(tools, &chart, Some(file))?;
        let path = scratch.join(format!("{name}.yaml"));
        fs::write(&path, &rendered)?;
        for version in KUBERNETES_VERSIONS {
            validate(tools, &path, version).with_context(|| format!("ci/{name}.yaml"))?;
        }
        let documents = documents(&rendered).with_context(|| format!("ci/{name}.yaml"))?;
        validate_operator_objects(tools, &documents, &scratch, &name)
            .with_context(|| format!("ci/{name}.yaml"))?;
        check_rules(root, tools, &documents, &scratch.join(format!("{name}-rules.yml")))
            .with_context(|| format!("ci/{name}.yaml"))?;
        check_dashboard(root, &documents).with_context(|| format!("ci/{name}.yaml"))?;
    }
    let manifest = fs::read_to_string(root.join(MANIFEST))?;
    if manifest != plain_manifest(tools, &chart)? {
        bail!("{MANIFEST} differs from the chart's rendering: run `cargo xtask chart` to write it");
    }
    Ok(())
}

/// `helm template` of the chart as release `tcpstate` in namespace `tcpstate`.
fn render(tools: &Tools, chart: &Path, values: Option<&Path>) -> anyhow::Result<String> {
    let mut helm = Command::new(&tools.installed.helm);
    helm.args(["template", "tcpstate"]).arg(chart).args(["--namespace", "tcpstate"]);
    if let Some(values) = values {
        helm.arg("--values").arg(values);
    }
    let output = capture(&mut helm).context("running helm")?;
    ensure!(
        output.status.success(),
        "helm template failed: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(String::from_utf8(output.stdout)?)
}

/// The rendered manifests, each as a value.
fn documents(rendered: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut found = Vec::new();
    for document in serde_norway::Deserializer::from_str(rendered) {
        let value = serde_json::Value::deserialize(document).context("reading helm's output")?;
        if !value.is_null() {
            found.push(value);
        }
    }
    Ok(found)
}

fn of_kind<'a>(documents: &'a [serde_json::Value], kind: &str) -> Vec<&'a serde_json::Value> {
    documents.iter().filter(|d| d["kind"] == kind).collect()
}

/// Every manifest against Kubernetes `version`'s API schemas; the Prometheus Operator's
/// kinds, which the validator has no schema for, are left to the operator.
fn validate(tools: &Tools, rendered: &Path, version: &str) -> anyhow::Result<()> {
    let output = capture(
        Command::new("python3")
            .args(["-m", "kubernetes_validate", "--strict", "-k", version])
            .arg(rendered)
            .env("PYTHONPATH", &tools.installed.python),
    )
    .context("running kubernetes-validate")?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    let unknown = text
        .lines()
        .filter(|l| l.contains("Couldn't find schema"))
        .filter(|l| !l.contains("monitoring.coreos.com"));
    let unknown: Vec<&str> = unknown.collect();
    ensure!(
        output.status.success() && unknown.is_empty() && text.contains("passed"),
        "not valid for Kubernetes {version}:\n{text}"
    );
    Ok(())
}

/// The Prometheus Operator's objects against the schemas of its CRDs.
fn validate_operator_objects(
    tools: &Tools,
    documents: &[serde_json::Value],
    scratch: &Path,
    name: &str,
) -> anyhow::Result<()> {
    let objects: Vec<_> =
        documents.iter().filter(|d| d["apiVersion"] == "monitoring.coreos.com/v1").collect();
    if objects.is_empty() {
        return Ok(());
    }
    let script = scratch.join("operator-check.mjs");
    fs::write(&script, OPERATOR_CHECK)?;
    let list = scratch.join(format!("{name}-operator.json"));
    fs::write(&list, serde_json::to_string(&objects)?)?;
    let output = capture(
        Command::new("node").arg(&script).arg(&tools.installed.operator_schemas).arg(&list),
    )
    .context("running node")?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    let valid = text.lines().filter(|l| l.starts_with("valid ")).count();
    ensure!(
        output.status.success() && valid == objects.len(),
        "Prometheus Operator objects not valid against its CRD schemas:\n{text}"
    );
    Ok(())
}

/// The PrometheusRule's groups, where rendered, pass promtool and are deploy/prometheus's.
fn check_rules(
    root: &Path,
    tools: &Tools,
    documents: &[serde_json::Value],
    scratch: &Path,
) -> anyhow::Result<()> {
    let Some(rule) = of_kind(documents, "PrometheusRule").first().copied() else { return Ok(()) };
    let groups = &rule["spec"]["groups"];
    let source: serde_json::Value =
        serde_norway::from_str(&fs::read_to_string(root.join("deploy/prometheus/alerts.yml"))?)?;
    ensure!(*groups == source["groups"], "the PrometheusRule's groups are not alerts.yml's");
    fs::write(scratch, serde_json::to_string(&serde_json::json!({ "groups": groups }))?)?;
    run_logged(
        Command::new(tools.bin.join("promtool")).args(["check", "rules"]).arg(scratch),
        "promtool-chart-rules",
    )
}

/// The dashboard's ConfigMap, where rendered, carries deploy/grafana's file as it is.
fn check_dashboard(root: &Path, documents: &[serde_json::Value]) -> anyhow::Result<()> {
    let maps = of_kind(documents, "ConfigMap");
    let Some(map) = maps.iter().find(|m| m["data"].get("tcpstate-dashboard.json").is_some()) else {
        return Ok(());
    };
    let dashboard = fs::read_to_string(root.join("deploy/grafana/tcpstate-dashboard.json"))?;
    ensure!(
        map["data"]["tcpstate-dashboard.json"].as_str() == Some(dashboard.trim_end()),
        "the dashboard ConfigMap differs from deploy/grafana/tcpstate-dashboard.json"
    );
    ensure!(map["metadata"]["labels"]["grafana_dashboard"] == "1", "no grafana_dashboard label");
    Ok(())
}

/// `deploy/kubernetes/daemonset.yaml`: the chart with default values, for clusters without
/// Helm, with the Namespace it goes in.
fn plain_manifest(tools: &Tools, chart: &Path) -> anyhow::Result<String> {
    let rendered = render(tools, chart, None)?;
    let mut manifest = String::new();
    let _ = writeln!(
        manifest,
        "# Generated from {CHART} with default values by `cargo xtask chart`: change the chart,\n\
         # not this file. tcpstate on every node; Prometheus scrapes each pod on port 9977.\n\
         # The image is what `cargo xtask dist` builds (target/dist/tcpstate-{VERSION}.oci.tar):\n\
         # import it on each node (ctr -n k8s.io images import ...), or push it to your\n\
         # registry and change image:.\n\
         apiVersion: v1\nkind: Namespace\nmetadata:\n  name: tcpstate"
    );
    for document in rendered.split("\n---\n").map(str::trim).filter(|d| !d.is_empty()) {
        let document = document.trim_start_matches("---").trim_start();
        let _ = writeln!(manifest, "---\n{document}");
    }
    Ok(manifest)
}

/// podman's settings for the chart's pod on this machine: runc (crun refuses its hybrid cgroup
/// layout), cgroupfs, and limits under the sandbox's RLIMIT_NOFILE cap.
const CONTAINERS_CONF: &str = "[containers]\ndefault_ulimits = [\"nofile=1024:1024\", \
                               \"nproc=1024:1024\"]\n[engine]\nruntime = \"runc\"\n\
                               cgroup_manager = \"cgroupfs\"\n";
const POD: &str = "tcpstate-chart";

/// The chart's DaemonSet, as its pod, run for real with `podman kube play` from `image` on
/// this host: `/metrics` answers on the node's port and `tcpstate check` in the pod says ok
/// or degraded. podman 4.3 takes Pods, not DaemonSets; on host networking it refuses port
/// declarations, and it knows no `spec.nodeName` field reference: those alone are changed.
pub fn run_pod(root: &Path, tools: &Tools, image: &str) -> anyhow::Result<()> {
    let (repository, tag) = image.rsplit_once(':').context("an image name with a tag")?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut helm = Command::new(&tools.installed.helm);
    helm.args(["template", "tcpstate"])
        .arg(root.join(CHART))
        .args(["--namespace", "tcpstate", "--show-only", "templates/daemonset.yaml"])
        .args(["--set", &format!("image.repository={repository},image.tag={tag},port={port}")]);
    let output = capture(&mut helm).context("running helm")?;
    ensure!(output.status.success(), "helm template: {}", String::from_utf8_lossy(&output.stderr));
    let daemonset = documents(&String::from_utf8(output.stdout)?)?
        .into_iter()
        .next()
        .context("no DaemonSet rendered")?;
    let mut spec = daemonset["spec"]["template"]["spec"].clone();
    for container in spec["containers"].as_array_mut().into_iter().flatten() {
        container.as_object_mut().map(|c| c.remove("ports"));
        for variable in container["env"].as_array_mut().into_iter().flatten() {
            if variable["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName" {
                *variable = serde_json::json!({ "name": variable["name"], "value": "this-node" });
            }
        }
    }
    let pod = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": POD, "labels": daemonset["spec"]["template"]["metadata"]["labels"] },
        "spec": spec,
    });
    let scratch = root.join("target/chart-check");
    fs::create_dir_all(&scratch)?;
    let manifest = scratch.join("pod.json");
    fs::write(&manifest, serde_json::to_string_pretty(&pod)?)?;
    let conf = scratch.join("containers.conf");
    fs::write(&conf, CONTAINERS_CONF)?;
    let podman = |args: &[&str]| {
        let mut command = Command::new("podman");
        command.args(args).env("CONTAINERS_CONF", &conf);
        command
    };
    eprintln!("xtask: running the chart's pod with podman kube play (port {port})");
    run_logged(podman(&["kube", "play", "--replace"]).arg(&manifest), "podman-kube-play")?;
    // As NOTES.txt says to run it: by name, as `kubectl exec POD -- tcpstate ...` does.
    let checked = pod_answers(port).and_then(|()| {
        let output =
            capture(&mut podman(&["exec", &format!("{POD}-tcpstate"), "tcpstate", "check"]))
                .context("running podman exec")?;
        let code = output.status.code();
        ensure!(
            matches!(code, Some(0 | 3)),
            "`tcpstate check` in the chart's pod exited {code:?}:\n{}",
            String::from_utf8_lossy(&output.stdout)
        );
        Ok(())
    });
    let logs = capture(&mut podman(&["logs", &format!("{POD}-tcpstate")]));
    let _ = capture(podman(&["kube", "down"]).arg(&manifest));
    checked.with_context(|| {
        let logs =
            logs.map(|o| String::from_utf8_lossy(&o.stderr).into_owned()).unwrap_or_default();
        format!("the chart's pod; its log:\n{logs}")
    })
}

/// Waits up to a minute for the pod's `/metrics` to answer 200 with tcpstate's families.
fn pod_answers(port: u16) -> anyhow::Result<()> {
    use std::io::{Read as _, Write as _};
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut last = String::new();
    while std::time::Instant::now() < deadline {
        if let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(5)));
            let request = "GET /metrics HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n";
            let mut answer = String::new();
            if stream.write_all(request.as_bytes()).is_ok()
                && stream.read_to_string(&mut answer).is_ok()
            {
                if answer.starts_with("HTTP/1.1 200") && answer.contains("tcpstate_sockets") {
                    return Ok(());
                }
                last = answer.lines().next().unwrap_or_default().to_owned();
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    bail!("/metrics on the node's port {port} did not answer within a minute (last: {last:?})")
}

/// `cargo xtask chart`: writes the plain manifest from the chart.
pub fn write_manifest(root: &Path, tools: &Tools) -> anyhow::Result<()> {
    let manifest = plain_manifest(tools, &root.join(CHART))?;
    fs::write(root.join(MANIFEST), manifest)?;
    eprintln!("xtask: wrote {MANIFEST}");
    Ok(())
}

/// `helm package` with this version as the chart's version and appVersion (the image tag the
/// OCI archive carries); returns the `.tgz`.
pub fn package(tools: &Tools, root: &Path, dist: &Path) -> anyhow::Result<PathBuf> {
    run_logged(
        Command::new(&tools.installed.helm)
            .arg("package")
            .arg(root.join(CHART))
            .args(["--version", VERSION, "--app-version", VERSION, "--destination"])
            .arg(dist),
        "helm-package",
    )?;
    let package = dist.join(format!("tcpstate-{VERSION}.tgz"));
    ensure!(package.is_file(), "helm package left no {}", package.display());
    Ok(package)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// The values the chart's README documents, against `values.yaml`'s keys.
    fn documented_values(root: &Path) -> anyhow::Result<(Vec<String>, Vec<String>)> {
        let values: serde_json::Value =
            serde_norway::from_str(&fs::read_to_string(root.join(CHART).join("values.yaml"))?)?;
        let mut keys = Vec::new();
        leaf_keys(&values, "", &mut keys);
        let readme = fs::read_to_string(root.join(CHART).join("README.md"))?;
        let documented: Vec<String> = readme
            .lines()
            .filter_map(|line| line.strip_prefix("| `"))
            .filter_map(|rest| rest.split('`').next())
            .map(str::to_owned)
            .collect();
        Ok((keys, documented))
    }

    /// `image.repository`, ...: maps are walked, anything else (lists too) is a leaf.
    fn leaf_keys(value: &serde_json::Value, prefix: &str, out: &mut Vec<String>) {
        match value.as_object() {
            Some(map)
                if !map.is_empty()
                    && !prefix.ends_with("labels")
                    && !prefix.ends_with("tlsConfig") =>
            {
                let sorted: BTreeMap<_, _> = map.iter().collect();
                for (key, inner) in sorted {
                    let path =
                        if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
                    leaf_keys(inner, &path, out);
                }
            }
            _ => out.push(prefix.to_owned()),
        }
    }

    fn root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
    }

    /// The chart's README has a row for every value, and no row for a value that is gone.
    #[test]
    fn the_chart_readme_documents_every_value() {
        let (keys, documented) = documented_values(&root()).unwrap();
        let missing: Vec<_> = keys.iter().filter(|k| !documented.contains(k)).collect();
        let stale: Vec<_> = documented.iter().filter(|d| !keys.contains(d)).collect();
        assert!(
            missing.is_empty() && stale.is_empty(),
            "deploy/helm/tcpstate/README.md: values not documented {missing:?}, rows for values \
             that do not exist {stale:?}"
        );
    }

    #[test]
    fn leaf_keys_walk_maps_but_not_lists_or_labels() {
        let value = serde_json::json!({"a": {"b": 1, "c": [1]}, "labels": {"x": "y"}, "d": {}});
        let mut keys = Vec::new();
        leaf_keys(&value, "", &mut keys);
        assert_eq!(keys, ["a.b", "a.c", "d", "labels"]);
    }
}
