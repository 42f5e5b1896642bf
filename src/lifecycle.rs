//! The gateway's life as every long-lived task sees it: whether the drain has begun, whether
//! the state store answers, and the trackers the drain waits on. Built once by the
//! composition root (`app.rs`) and shared as an `Arc`; nothing here knows what it tracks.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub struct Lifecycle {
    draining: AtomicBool,
    state_up: AtomicBool,
    /// Cancelled when the drain begins: accept loops stop, unauthenticated sessions end,
    /// push streams stop reading.
    pub shutdown: CancellationToken,
    /// Every session task and the tasks a session owns (its upstream worker), and every
    /// push stream: the drain waits for them, bounded by `shutdown.timeout`.
    pub sessions: TaskTracker,
    /// Listeners, upkeep and the per-connection tasks of the HTTP and ops servers: stopped
    /// after the sessions, once nothing is left to serve.
    background: TaskTracker,
    stop_background: CancellationToken,
}

impl Lifecycle {
    pub fn new(state_up: bool) -> Lifecycle {
        Lifecycle {
            draining: AtomicBool::new(false),
            state_up: AtomicBool::new(state_up),
            shutdown: CancellationToken::new(),
            sessions: TaskTracker::new(),
            background: TaskTracker::new(),
            stop_background: CancellationToken::new(),
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Ready: started and not draining (`/readyz`).
    pub fn is_ready(&self) -> bool {
        !self.is_draining()
    }

    pub fn state_up(&self) -> bool {
        self.state_up.load(Ordering::Relaxed)
    }

    /// Record the state store's health; returns the previous value.
    pub fn set_state_up(&self, up: bool) -> bool {
        self.state_up.swap(up, Ordering::Relaxed)
    }

    /// Cancelled once the sessions are done (or the drain gave up on them): background
    /// services stop on it.
    pub fn stop_background(&self) -> CancellationToken {
        self.stop_background.clone()
    }

    /// Run a background task the drain stops and waits for. The one place a long-lived
    /// service (a listener, an upkeep loop, later the cluster bus) is started.
    pub fn spawn_background<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.background.spawn(task);
    }

    /// The tracker of background tasks, for a service that spawns its own.
    pub fn background(&self) -> &TaskTracker {
        &self.background
    }

    /// The drain's first step: not ready, accept loops stop, no new session is waited for.
    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.shutdown.cancel();
        self.sessions.close();
    }

    /// The drain's last step: stop the background services and wait for them, bounded.
    pub async fn stop_background_tasks(&self, limit: std::time::Duration) {
        self.stop_background.cancel();
        self.background.close();
        let _ = tokio::time::timeout(limit, self.background.wait()).await;
    }
}
