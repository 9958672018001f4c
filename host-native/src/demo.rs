//! `tidemark demo`: a chaotic server and a resumable follower in one process,
//! with a live display and a final lost/duplicated verdict.

use crate::{FileStore, HttpConnector, ServerConfig, SmolClock, SseServer};
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::HashSet;
use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tidemark_core::reconnect::ReconnectConfig;
use tidemark_core::{
    Backoff, Clock, Config, Millis, ResumableStream, StreamConfig, StreamKey, persistence,
};

/// What the demo runs.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Events the server sends (ids `1..=events`).
    pub events: u64,
    /// Time between two events.
    pub interval: Duration,
    /// The server drops each connection after this many events.
    pub drop_every: u64,
    /// On reconnect the server replays this many events too many.
    pub rewind: u64,
    /// Give up after this long.
    pub limit: Duration,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            events: 20_000,
            interval: Duration::from_micros(200),
            drop_every: 1_500,
            rewind: 40,
            limit: Duration::from_secs(60),
        }
    }
}

/// The outcome of a demo run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// Events the server had to deliver.
    pub expected: u64,
    /// Distinct events the application received.
    pub received: u64,
    /// Events never received.
    pub lost: u64,
    /// Events received more than once.
    pub duplicated: u64,
    /// Reconnects the follower made.
    pub reconnects: u64,
    /// Replayed events the tracker dropped.
    pub duplicates_dropped: u64,
    /// Store writes (`save_batch` calls).
    pub store_writes: u64,
}

impl Verdict {
    /// Every event once, none twice.
    pub fn is_perfect(&self) -> bool {
        self.lost == 0 && self.duplicated == 0
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "expected {}, received {}, lost {}, duplicated {} ({} reconnects, {} replays dropped, \
             {} store writes)",
            self.expected,
            self.received,
            self.lost,
            self.duplicated,
            self.reconnects,
            self.duplicates_dropped,
            self.store_writes
        )
    }
}

/// The exit status of `tidemark demo`: prints the verdict on stdout;
/// success only when nothing was lost or duplicated.
pub fn exit_code(result: &io::Result<Verdict>) -> std::process::ExitCode {
    match result {
        Ok(verdict) => {
            println!("verdict: {verdict}");
            if verdict.is_perfect() {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("tidemark demo: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs the demo, drawing progress on stderr.
pub async fn demo(options: DemoOptions) -> io::Result<Verdict> {
    let server = SseServer::bind(
        "127.0.0.1:0".parse().expect("valid address"),
        ServerConfig {
            count: Some(options.events),
            interval: options.interval,
            drop_every: Some(options.drop_every),
            rewind: options.rewind,
            retry_ms: Some(20),
            ..ServerConfig::default()
        },
    )
    .await?;
    let url = format!("http://{}/events", server.local_addr()?);
    let (stop, stopped) = async_channel::bounded::<()>(1);
    let server = smol::spawn(server.run(async move {
        let _ = stopped.recv().await;
    }));

    let state = std::env::temp_dir().join(format!("tidemark-demo-{}", std::process::id()));
    let clock = SmolClock::new();
    let store = Arc::new(FileStore::open(&state).map_err(io::Error::other)?);
    let (registry, worker) = persistence(store, clock, Config::default());
    let worker = smol::spawn(worker.run());
    let tracker = registry
        .open(StreamKey::new(&url, "demo"))
        .await
        .map_err(io::Error::other)?;
    let config = StreamConfig {
        reconnect: ReconnectConfig {
            backoff: Backoff {
                initial: Millis(10),
                max: Millis(1000),
            },
            ..ReconnectConfig::default()
        },
        ..StreamConfig::default()
    };
    let mut stream = ResumableStream::new(HttpConnector::default(), clock, &url, tracker, config);

    eprintln!(
        "tidemark demo: {} events from {url}, connections dropped every {} events, {} events \
         replayed on each reconnect",
        options.events, options.drop_every, options.rewind
    );
    let bar = ProgressBar::new(options.events);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}").expect("valid template"),
    );
    let started = Instant::now();
    let mut seen = HashSet::new();
    let mut delivered = 0u64;
    while (seen.len() as u64) < options.events && started.elapsed() < options.limit {
        let next = smol::future::or(async { Some(stream.next_event().await) }, async {
            async_io::Timer::at(started + options.limit).await;
            None
        })
        .await;
        let Some(event) = next else { break };
        let event = event.map_err(io::Error::other)?;
        delivered += 1;
        if let Ok(id) = event.data.parse::<u64>() {
            seen.insert(id);
        }
        bar.set_position(seen.len() as u64);
        if delivered.is_multiple_of(250) {
            let writes = registry.stats().worker.batches.max(1);
            bar.set_message(format!(
                "{:.0} events/s, reconnects {}, replays dropped {}, store writes {}, {} events/write",
                delivered as f64 / started.elapsed().as_secs_f64().max(1e-3),
                stream.stats().reconnects,
                stream.stats().duplicates,
                writes,
                delivered / writes
            ));
        }
    }
    stream.commit();
    bar.finish();
    let stats = stream.stats().clone();
    drop(stream);
    let report = registry
        .shutdown(clock.now() + Millis::from_secs(5))
        .await
        .map_err(io::Error::other)?;
    if !report.is_complete() {
        eprintln!("tidemark demo: the final cursor was not saved: {report:?}");
    }
    worker.await;
    drop(stop);
    server.await?;
    let _ = std::fs::remove_dir_all(&state);
    let received = seen.len() as u64;
    Ok(Verdict {
        expected: options.events,
        received,
        lost: options.events - received,
        duplicated: delivered - received,
        reconnects: stats.reconnects,
        duplicates_dropped: stats.duplicates,
        store_writes: registry.stats().worker.batches,
    })
}
