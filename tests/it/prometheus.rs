//! A real Prometheus (Debian's `prometheus`) scrapes two in-process gateways with the
//! repository's scrape config and rules: what an SRE pointing Prometheus at imgate sees.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::alerts::{imgate_names, repo, rules, yaml};
use crate::common::TestGateway;

/// How long Prometheus may take to start, scrape twice and evaluate its rules on a busy
/// machine.
const PROM_WAIT: Duration = Duration::from_secs(60);

/// A Prometheus process with its own config and storage; killed, and its directory
/// removed, when the test ends (passed or failed).
struct Prometheus {
    /// In a mutex so that waits, which borrow the guard, can ask whether it exited.
    child: std::sync::Mutex<Child>,
    dir: PathBuf,
    addr: SocketAddr,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|p| p.into_inner());
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Prometheus {
    /// Start it on the repository's dashboards/prometheus.yml, with the gateways' ops
    /// addresses as the targets, the rules read from the repository, and one-second
    /// intervals so the test waits for seconds, not minutes.
    fn start(targets: &[SocketAddr]) -> Prometheus {
        let mut cfg = yaml("dashboards/prometheus.yml");
        cfg["global"]["scrape_interval"] = json!("1s");
        cfg["global"]["evaluation_interval"] = json!("1s");
        // The copy lives elsewhere: name the repository's rule files by absolute path.
        let rule_files: Vec<String> = cfg["rule_files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                repo(&format!("dashboards/{}", f.as_str().unwrap()))
                    .display()
                    .to_string()
            })
            .collect();
        cfg["rule_files"] = json!(rule_files);
        let jobs = cfg["scrape_configs"].as_array_mut().unwrap();
        assert_eq!(jobs.len(), 1, "one scrape job");
        assert_eq!(
            jobs[0]["job_name"], "imgate",
            "the rules select job=\"imgate\""
        );
        let targets: Vec<String> = targets.iter().map(|a| a.to_string()).collect();
        jobs[0]["static_configs"] = json!([{ "targets": targets }]);
        let dir = std::env::temp_dir().join(format!("imgate-prometheus-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // JSON is YAML: Prometheus reads it as is.
        let config = dir.join("prometheus.yml");
        std::fs::write(&config, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();

        // A free port: bound and released at once (nothing else here picks ports at random
        // in that range between the two).
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = match Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
        {
            Ok(child) => child,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                if e.kind() == std::io::ErrorKind::NotFound {
                    panic!(
                        "prometheus is not installed: apt-get install prometheus \
                         (scripts/test installs it when missing)"
                    );
                }
                panic!("cannot start prometheus: {e}");
            }
        };
        Prometheus {
            child: std::sync::Mutex::new(child),
            dir,
            addr,
        }
    }

    /// The end of its log, for failure messages.
    fn log(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// GET an API path; `None` while Prometheus is not answering yet.
    async fn api(&self, path: &str) -> Option<Value> {
        let (status, body) = get(self.addr, path).await?;
        let v: Value = serde_json::from_str(&body).ok()?;
        assert!(
            status == 200 && v["status"] == "success",
            "{path}: {status} {body}"
        );
        Some(v["data"].clone())
    }

    async fn query(&self, promql: &str) -> Option<Vec<Value>> {
        let data = self
            .api(&format!("/api/v1/query?query={}", encode(promql)))
            .await?;
        Some(data["result"].as_array().unwrap().clone())
    }

    /// Ask `check` every 200 ms until it answers `Ok`, for at most PROM_WAIT; `what`, its last
    /// `Err` and Prometheus' log are the failure message.
    async fn until<T, F, Fut>(&self, what: &str, mut check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, String>>,
    {
        let deadline = tokio::time::Instant::now() + PROM_WAIT;
        loop {
            let last = match check().await {
                Ok(v) => return v,
                Err(e) => e,
            };
            let exited = self.child.lock().unwrap().try_wait().ok().flatten();
            if let Some(status) = exited {
                panic!(
                    "prometheus exited ({status}) while waiting for {what}:\n{}",
                    self.log()
                );
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "{what}: still not so after {PROM_WAIT:?}: {last}\nprometheus log:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A raw HTTP/1.0 GET: Go's server then answers without chunked encoding and closes.
/// `None` when nothing listens yet.
async fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(crate::common::WAIT, s.read_to_end(&mut buf))
        .await
        .expect("prometheus answers in time")
        .ok()?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text.get(9..12)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}

/// Percent-encode a query parameter.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A dashboard expression as Grafana sends it: variables filled in.
fn as_grafana_sends(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$job", "imgate")
        .replace("$instance", ".*")
}

#[tokio::test]
async fn prometheus_scrapes_two_gateways_and_loads_the_rules() {
    let a = TestGateway::start().await;
    let b = TestGateway::start().await;
    let prom = Prometheus::start(&[a.ops, b.ops]);

    // Both targets up, as Prometheus' target page would show.
    let wanted: BTreeSet<String> = [a.ops, b.ops].iter().map(|a| a.to_string()).collect();
    prom.until("both gateways are scraped and up", || async {
        let data = prom
            .api("/api/v1/targets?state=active")
            .await
            .ok_or("not answering")?;
        let up: BTreeSet<String> = data["activeTargets"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["health"] == "up" && t["labels"]["job"] == "imgate")
            .map(|t| t["labels"]["instance"].as_str().unwrap().to_string())
            .collect();
        if up == wanted {
            Ok(())
        } else {
            Err(format!("up: {up:?}"))
        }
    })
    .await;

    // Every series the dashboards and the rules read is scraped.
    let mut used = BTreeSet::new();
    let mut dash_exprs = Vec::new();
    for (_, dash) in crate::grafana::dashboards() {
        for e in crate::grafana::exprs(&dash) {
            used.extend(imgate_names(&e));
            dash_exprs.push(e);
        }
    }
    for rule in rules() {
        used.extend(imgate_names(rule["expr"].as_str().unwrap()));
    }
    assert!(used.len() > 15, "{used:?}");
    let scraped = prom
        .until("every imgate series is in Prometheus", || async {
            let result = prom
                .query(r#"group by (__name__) ({job="imgate", __name__=~"imgate_.*"})"#)
                .await
                .ok_or("not answering")?;
            let names: BTreeSet<String> = result
                .iter()
                .map(|r| r["metric"]["__name__"].as_str().unwrap().to_string())
                .collect();
            let missing: Vec<&String> = used
                .iter()
                .filter(|n| !names.contains(*n) && !names.contains(&format!("{n}_bucket")))
                .collect();
            if missing.is_empty() {
                Ok(names)
            } else {
                Err(format!("not scraped: {missing:?}"))
            }
        })
        .await;
    assert!(
        scraped.contains("imgate_push_delivery_seconds_bucket"),
        "{scraped:?}"
    );

    // Every dashboard panel shows data once two scrapes are in (a rate needs two).
    prom.until("every dashboard query returns series", || async {
        let mut empty = Vec::new();
        for e in &dash_exprs {
            if e.starts_with("label_values(") {
                continue; // a Grafana function, not PromQL
            }
            let q = as_grafana_sends(e);
            if prom.query(&q).await.ok_or("not answering")?.is_empty() {
                empty.push(q);
            }
        }
        if empty.is_empty() {
            Ok(())
        } else {
            Err(format!("no data for {empty:?}"))
        }
    })
    .await;

    // The rules loaded and evaluate without error.
    let expected = rules().len();
    prom.until("every rule is evaluated and healthy", || async {
        let data = prom.api("/api/v1/rules").await.ok_or("not answering")?;
        let all: Vec<Value> = data["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap().clone())
            .collect();
        for r in &all {
            assert_ne!(
                r["health"], "err",
                "rule {} fails: {}",
                r["name"], r["lastError"]
            );
        }
        let ok = all.iter().filter(|r| r["health"] == "ok").count();
        if all.len() == expected && ok == expected {
            Ok(())
        } else {
            Err(format!(
                "{ok} of {} rules healthy, {expected} in alerts.yml",
                all.len()
            ))
        }
    })
    .await;

    // The expected-instances recording rule counts both targets (once an evaluation comes
    // after both first scrapes).
    prom.until("imgate:instances:expected is 2", || async {
        let r = prom
            .query(r#"imgate:instances:expected{job="imgate"}"#)
            .await
            .ok_or("not answering")?;
        match r.as_slice() {
            [one] if one["value"][1] == "2" => Ok(()),
            _ => Err(format!("{r:?}")),
        }
    })
    .await;
}
