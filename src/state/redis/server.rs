//! `redis-server` processes for tests: started on a free port in a temp dir, never the
//! machine's 6379, killed on drop. A three-master Redis Cluster the same way. On a machine
//! without `redis-server` the tests fail with a message saying how to install it.
//!
//! Self-contained (std only) so the behaviour tests include it with `#[path]`.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const START_WAIT: Duration = Duration::from_secs(10);

fn missing() -> ! {
    panic!(
        "redis-server is not installed: the Redis tests start their own. Install it with \
         `apt-get install redis-server` (scripts/test does this), or put redis-server and \
         redis-cli on PATH"
    )
}

/// A port nothing listens on now (and, for a cluster node, neither on port + 10000, its
/// bus port). redis-server cannot be handed a bound socket, so a start that loses the port
/// to someone else is retried on another.
fn free_port(cluster: bool) -> u16 {
    loop {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
        let port = l.local_addr().unwrap().port();
        if !cluster {
            return port;
        }
        if port < 55000 && TcpListener::bind(("127.0.0.1", port + 10000)).is_ok() {
            return port;
        }
    }
}

fn temp_dir() -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "imgate-redis-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("create a temp dir");
    dir
}

/// Send one inline command, return the raw reply (enough for PING and CLUSTER INFO).
pub fn command(port: u16, cmd: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(format!("{cmd}\r\n").as_bytes()).ok()?;
    let mut buf = vec![0u8; 8192];
    let n = s.read(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

pub struct RedisServer {
    pub port: u16,
    dir: PathBuf,
    cluster: bool,
    /// Serve TLS only, with these PEM files: certificate, key, CA.
    tls: Option<[PathBuf; 3]>,
    /// Append-only file fsynced on every write: a killed server restarts with its data
    /// (how a deployment without replicas keeps a master restart from losing its shard).
    persistent: bool,
    child: Option<Child>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        Self::start_with(false)
    }

    /// TLS only (`rediss://`), with a certificate, its key and the CA that signed it.
    pub fn start_tls(cert: PathBuf, key: PathBuf, ca: PathBuf) -> RedisServer {
        Self::start_inner(false, Some([cert, key, ca]))
    }

    fn start_with(cluster: bool) -> RedisServer {
        Self::start_inner(cluster, None)
    }

    fn start_inner(cluster: bool, tls: Option<[PathBuf; 3]>) -> RedisServer {
        for _ in 0..5 {
            let mut s = RedisServer {
                port: free_port(cluster),
                dir: temp_dir(),
                cluster,
                tls: tls.clone(),
                persistent: false,
                child: None,
            };
            if s.spawn() {
                return s;
            }
        }
        panic!("redis-server did not start on any of 5 free ports");
    }

    /// Start the process on `self.port`; false if it exited (port taken meanwhile).
    fn spawn(&mut self) -> bool {
        let mut cmd = Command::new("redis-server");
        match &self.tls {
            None => cmd.arg("--port").arg(self.port.to_string()),
            Some([cert, key, ca]) => cmd
                .args(["--port", "0", "--tls-auth-clients", "no", "--tls-port"])
                .arg(self.port.to_string())
                .arg("--tls-cert-file")
                .arg(cert)
                .arg("--tls-key-file")
                .arg(key)
                .arg("--tls-ca-cert-file")
                .arg(ca),
        };
        cmd.arg("--bind")
            .arg("127.0.0.1")
            .arg("--dir")
            .arg(&self.dir)
            .arg("--save")
            .arg("")
            .arg("--appendonly")
            .arg(if self.persistent { "yes" } else { "no" })
            .arg("--appendfsync")
            .arg("always")
            .arg("--logfile")
            .arg(self.dir.join("redis.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if self.cluster {
            cmd.args(["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"])
                .arg("--cluster-config-file")
                .arg(self.dir.join("nodes.conf"));
        }
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => missing(),
            Err(e) => panic!("cannot start redis-server: {e}"),
        };
        self.child = Some(child);
        let deadline = Instant::now() + START_WAIT;
        while Instant::now() < deadline {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                return false;
            }
            let ready = match self.tls {
                // A TLS port cannot be probed in plain text: listening is enough.
                Some(_) => TcpStream::connect(("127.0.0.1", self.port)).is_ok(),
                None => command(self.port, "PING").is_some_and(|r| r.starts_with("+PONG")),
            };
            if ready {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("redis-server on port {} did not answer PING", self.port);
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The directory the server runs in (removed on drop).
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// Kill the process (SIGKILL: a crash, not a shutdown); the port stays reserved for
    /// `restart`.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Freeze the process (SIGSTOP): connections stay open and nothing answers, like a
    /// server stuck or a network that drops packets.
    pub fn freeze(&self, frozen: bool) {
        if let Some(c) = &self.child {
            let sig = if frozen { "-STOP" } else { "-CONT" };
            let ok = Command::new("kill")
                .arg(sig)
                .arg(c.id().to_string())
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "kill {sig} redis-server");
        }
    }

    /// Start again on the same port (empty: nothing was saved).
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + START_WAIT;
        while !self.spawn() {
            assert!(
                Instant::now() < deadline,
                "port {} was taken while redis-server was down",
                self.port
            );
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Three masters, no replicas, all slots assigned.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        Self::start_with(false)
    }

    /// Every node keeps an append-only file: a killed master restarts with its data.
    pub fn start_persistent() -> RedisCluster {
        Self::start_with(true)
    }

    fn start_with(persistent: bool) -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                let mut n = RedisServer::start_with(true);
                if persistent {
                    n.persistent = true;
                    // Turned on live, then rewritten at once, so the file exists before
                    // the cluster holds any data.
                    let _ = command(n.port, "CONFIG SET appendonly yes");
                }
                n
            })
            .collect();
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for n in &nodes {
            create.arg(format!("127.0.0.1:{}", n.port));
        }
        let out = match create
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
        {
            Ok(o) => o,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => missing(),
            Err(e) => panic!("cannot run redis-cli: {e}"),
        };
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        // Every node must see the whole cluster before a client maps the slots.
        let deadline = Instant::now() + START_WAIT;
        for n in &nodes {
            while !command(n.port, "CLUSTER INFO").is_some_and(|r| r.contains("cluster_state:ok")) {
                assert!(Instant::now() < deadline, "the cluster did not form");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        RedisCluster { nodes }
    }

    /// The seed URLs, as `state.redis_url` takes them.
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.url())
            .collect::<Vec<_>>()
            .join(",")
    }
}
