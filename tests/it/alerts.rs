//! The alert rules (dashboards/alerts.yml): promtool accepts them and their unit tests
//! (dashboards/alerts.test.yml) pass, and every alert carries what the SRE it wakes needs:
//! a severity, a summary, and a runbook paragraph in docs/operations.md.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// A file of the repository.
pub fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// A YAML file of the repository, as JSON values.
pub fn yaml(path: &str) -> Value {
    let text = std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{path} is not valid YAML: {e}"))
}

/// Every rule (recording and alerting) of dashboards/alerts.yml.
pub fn rules() -> Vec<Value> {
    let file = yaml("dashboards/alerts.yml");
    file["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules").clone())
        .collect()
}

/// The `imgate_*` metric names a PromQL expression reads (histogram suffixes removed).
/// Recorded series (`imgate:…`) are not exported, and not matched.
pub fn imgate_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("imgate_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[i + name.len()..];
        let base = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name)
            .to_string();
        names.push(base);
    }
    names
}

/// Run promtool with `args` from the repository root; its output is the failure message.
fn promtool(args: &[&str]) {
    let out = match Command::new("promtool")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "promtool is not installed: it comes with Debian's prometheus package \
             (apt-get install prometheus; scripts/test installs it when missing)"
        ),
        Err(e) => panic!("cannot run promtool: {e}"),
    };
    assert!(
        out.status.success(),
        "promtool {} failed ({}):\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn promtool_checks_the_rules_and_their_unit_tests_pass() {
    promtool(&["check", "rules", "dashboards/alerts.yml"]);
    promtool(&["check", "config", "dashboards/prometheus.yml"]);
    promtool(&["test", "rules", "dashboards/alerts.test.yml"]);
}

/// GitHub's anchor for a `### Heading` made of letters only.
fn anchor(heading: &str) -> String {
    heading.to_lowercase()
}

#[test]
fn every_alert_has_a_severity_a_summary_a_runbook_and_unit_tests() {
    let doc = std::fs::read_to_string(repo("docs/operations.md")).unwrap();
    let tests = yaml("dashboards/alerts.test.yml");
    let cases: Vec<&Value> = tests["tests"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_array().unwrap())
        .collect();
    let mut alerts = 0;
    for rule in rules() {
        let Some(name) = rule["alert"].as_str() else {
            continue;
        };
        alerts += 1;
        let severity = rule["labels"]["severity"].as_str();
        assert!(
            matches!(severity, Some("page" | "ticket")),
            "{name}: severity {severity:?}, expected page or ticket"
        );
        let summary = rule["annotations"]["summary"].as_str().unwrap_or_default();
        assert!(!summary.is_empty(), "{name} has no summary");
        let runbook = rule["annotations"]["runbook"].as_str().unwrap_or_default();
        assert_eq!(
            runbook,
            format!("docs/operations.md#{}", anchor(name)),
            "{name}: runbook annotation"
        );
        // The runbook: a heading named after the alert, then at least a paragraph.
        let at = doc
            .find(&format!("\n### {name}\n"))
            .unwrap_or_else(|| panic!("docs/operations.md has no runbook heading ### {name}"));
        let body: String = doc[at..]
            .lines()
            .skip(2)
            .take_while(|l| !l.starts_with('#'))
            .collect();
        assert!(
            body.len() > 200,
            "the runbook of {name} is too short: {body}"
        );
        // Unit tests: at least one case where it fires and one where it stays quiet.
        let of_this: Vec<_> = cases.iter().filter(|c| c["alertname"] == name).collect();
        assert!(
            of_this
                .iter()
                .any(|c| c["exp_alerts"].as_array().is_some_and(|a| !a.is_empty())),
            "alerts.test.yml never makes {name} fire"
        );
        assert!(
            of_this
                .iter()
                .any(|c| c["exp_alerts"].as_array().is_some_and(|a| a.is_empty())),
            "alerts.test.yml never checks that {name} stays quiet"
        );
    }
    assert!(alerts >= 15, "{alerts} alerts");
}

/// A recorded series an alert reads (`imgate:…`) is recorded by a rule of the same file:
/// an alert on a series nobody records never fires.
#[test]
fn recorded_series_the_alerts_read_are_recorded() {
    let rules = rules();
    let recorded: Vec<&str> = rules.iter().filter_map(|r| r["record"].as_str()).collect();
    let mut read = 0;
    for rule in &rules {
        let expr = rule["expr"].as_str().unwrap();
        for (i, _) in expr.match_indices("imgate:") {
            let name: String = expr[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            assert!(
                recorded.contains(&name.as_str()),
                "{} reads {name}, which no rule records",
                rule["alert"]
            );
            read += 1;
        }
    }
    assert!(
        read > 0,
        "ImgateInstancesBelowExpected reads imgate:instances:expected"
    );
}
