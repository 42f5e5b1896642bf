//! The Grafana side: every dashboard under dashboards/ and the provisioning files that make
//! `grafana-server` load them at start. Grafana is not run here (it is not a Debian
//! package): the files are parsed and every path and datasource they name is resolved.

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde_json::Value;

use crate::alerts::{repo, yaml};

/// Every dashboard JSON of dashboards/, by file name.
pub fn dashboards() -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(repo("dashboards")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            let text = std::fs::read_to_string(&path).unwrap();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            let v = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{name} is not valid JSON: {e}"));
            out.push((name, v));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Every panel of a dashboard, those inside collapsed rows included.
fn panels(dash: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in dash["panels"].as_array().into_iter().flatten() {
        out.push(p);
        out.extend(p["panels"].as_array().into_iter().flatten());
    }
    out
}

/// Every PromQL expression of a dashboard: panel targets and template variable queries.
pub fn exprs(dash: &Value) -> Vec<String> {
    let mut out: Vec<String> = panels(dash)
        .iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter_map(|t| t["expr"].as_str().map(String::from))
        .collect();
    for var in dash["templating"]["list"].as_array().into_iter().flatten() {
        if var["type"] == "query" {
            out.push(var["query"].as_str().unwrap().to_string());
        }
    }
    out
}

/// Every `datasource` object anywhere in a JSON tree.
fn datasource_refs<'v>(v: &'v Value, out: &mut Vec<&'v Value>) {
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                if k == "datasource" && child.is_object() {
                    out.push(child);
                }
                datasource_refs(child, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|c| datasource_refs(c, out)),
        _ => {}
    }
}

/// `${NAME}` references in a provisioning file: Grafana substitutes environment variables.
fn env_refs(text: &str) -> Vec<String> {
    text.split("${")
        .skip(1)
        .filter_map(|s| s.split_once('}').map(|(name, _)| name.to_string()))
        .collect()
}

#[test]
fn provisioning_loads_every_dashboard_with_a_datasource_it_names() {
    let ops_doc = std::fs::read_to_string(repo("docs/operations.md")).unwrap();

    // Datasources: a default Prometheus the dashboards' $datasource variable resolves to.
    let ds_file = "dashboards/provisioning/datasources/prometheus.yml";
    let ds = yaml(ds_file);
    assert_eq!(ds["apiVersion"], 1, "{ds_file}");
    let sources = ds["datasources"].as_array().expect("datasources");
    let uids: BTreeSet<&str> = sources.iter().filter_map(|s| s["uid"].as_str()).collect();
    let types: BTreeSet<&str> = sources.iter().filter_map(|s| s["type"].as_str()).collect();
    assert!(types.contains("prometheus"), "{ds_file}: no prometheus");
    assert_eq!(
        sources.iter().filter(|s| s["isDefault"] == true).count(),
        1,
        "{ds_file}: exactly one default datasource"
    );
    for s in sources {
        let url = s["url"].as_str().unwrap_or_default();
        assert!(
            url.starts_with("http") || url.starts_with("${"),
            "{ds_file}: url {url}"
        );
    }

    // Dashboards: the provider's path is this repository's dashboards/ directory.
    let prov_file = "dashboards/provisioning/dashboards/imgate.yml";
    let prov = yaml(prov_file);
    assert_eq!(prov["apiVersion"], 1, "{prov_file}");
    let providers = prov["providers"].as_array().expect("providers");
    assert!(!providers.is_empty());
    let mut loaded = BTreeSet::new();
    for p in providers {
        assert_eq!(p["type"], "file", "{prov_file}");
        let path = p["options"]["path"].as_str().expect("options.path");
        // The one variable the docs tell the SRE to set: the dashboards directory.
        let dir = PathBuf::from(path.replace(
            "${IMGATE_DASHBOARDS}",
            &repo("dashboards").display().to_string(),
        ));
        assert!(
            dir.is_dir(),
            "{prov_file}: {path} resolves to {}, not a directory",
            dir.display()
        );
        for entry in std::fs::read_dir(&dir).unwrap() {
            let name = entry.unwrap().file_name().to_string_lossy().to_string();
            if name.ends_with(".json") {
                loaded.insert(name);
            }
        }
    }
    let dashboards = dashboards();
    let names: BTreeSet<String> = dashboards.iter().map(|(n, _)| n.clone()).collect();
    assert!(
        names.contains("imgate.json") && names.contains("cluster.json"),
        "{names:?}"
    );
    assert_eq!(
        loaded, names,
        "the provider loads every dashboard, and nothing else"
    );

    // Every environment variable the provisioning files use is explained in the docs.
    for file in [ds_file, prov_file] {
        let text = std::fs::read_to_string(repo(file)).unwrap();
        for var in env_refs(&text) {
            assert!(
                ops_doc.contains(&var),
                "{file} uses ${{{var}}}, which docs/operations.md does not explain"
            );
        }
    }

    let mut dash_uids = BTreeSet::new();
    for (name, dash) in &dashboards {
        assert!(
            dash_uids.insert(dash["uid"].as_str().unwrap()),
            "{name}: uid taken"
        );
        let vars = dash["templating"]["list"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let var = |n: &str| vars.iter().find(|v| v["name"] == n);
        // Every datasource a panel names is provisioned, directly or through a variable.
        let mut refs = Vec::new();
        datasource_refs(dash, &mut refs);
        assert!(!refs.is_empty(), "{name} names no datasource");
        for r in refs {
            let uid = r["uid"].as_str().unwrap_or_default();
            if let Some(v) = uid.strip_prefix("${").and_then(|u| u.strip_suffix('}')) {
                let def = var(v).unwrap_or_else(|| panic!("{name}: no variable {v}"));
                assert_eq!(def["type"], "datasource", "{name}: ${v}");
                let wanted = def["query"].as_str().unwrap();
                assert!(
                    types.contains(wanted),
                    "{name}: no provisioned {wanted} datasource"
                );
            } else {
                assert!(
                    uids.contains(uid),
                    "{name}: datasource {uid} is not provisioned"
                );
            }
            assert_eq!(r["type"], "prometheus", "{name}: {r}");
        }
        // Every variable an expression uses is defined (or one of Grafana's own).
        for expr in exprs(dash) {
            for part in expr.split('$').skip(1) {
                let v: String = part
                    .trim_start_matches('{')
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                assert!(
                    v.starts_with("__") || var(&v).is_some(),
                    "{name}: {expr} uses ${v}, which is not defined"
                );
            }
        }
    }
}
