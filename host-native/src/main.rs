//! The `tidemark` command: argument parsing and wiring only.

use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tidemark::core::Millis;
use tidemark::core::replay::Retention;
use tidemark::demo::{self, DemoOptions};
use tidemark::follow::{self, FollowOptions, RedisFollow};
use tidemark::mcp::{self, McpOptions};
use tidemark::proxy::{
    self, FileLog, FleetOptions, LogStorage, MemoryLog, ProxyConfig, ProxyLimits, ProxyOptions,
    RedisLog,
};

/// What a `--log` URL of Redis starts with (anything else is a directory).
const REDIS_SCHEMES: [&str; 3] = ["redis://", "rediss://", "redis+unix://"];
use tidemark::{RedisConfig, ServerConfig, default_state_dir, server};

/// Resumable Server-Sent-Events streams.
#[derive(Parser)]
#[command(name = "tidemark", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Follow one SSE stream, resuming across drops and restarts; print each
    /// fresh event as a JSON line.
    Follow {
        /// The stream's URL (http://).
        url: String,
        /// State directory for the cursor and the dedup window (default: a
        /// per-user state directory); created 0700, its files 0600. An
        /// existing directory open to other users gets a warning (fix:
        /// chmod 700 DIR).
        #[arg(long, conflicts_with = "redis")]
        state: Option<PathBuf>,
        /// Name of the stream; cursors are kept per URL and name.
        #[arg(long, default_value = "default")]
        stream: String,
        /// Extra request header, as 'Name: value' (repeatable); like a
        /// credential, it is not sent after a redirect to another origin.
        #[arg(short = 'H', long = "header", value_parser = HeaderParser)]
        headers: Vec<(String, String)>,
        /// Exit after this many fresh events.
        #[arg(long)]
        max_events: Option<u64>,
        /// Serve Prometheus metrics on GET /metrics at this address (port 0
        /// picks a free port; the address is said on stderr).
        #[arg(long, value_name = "ADDR")]
        metrics_listen: Option<SocketAddr>,
        #[command(flatten)]
        redis: RedisArgs,
    },
    /// Call a tool of an MCP server (Streamable HTTP) and print every message
    /// of the call's stream as a JSON line, resuming across dropped streams
    /// and restarts: run the same command again to resume an unfinished call.
    Mcp {
        /// The MCP endpoint, e.g. http://127.0.0.1:3000/mcp.
        url: String,
        /// The tool to call.
        #[arg(long)]
        tool: String,
        /// The tool's arguments, a JSON object.
        #[arg(long, default_value = "{}", value_parser = parse_arguments)]
        arguments: serde_json::Value,
        /// State directory for cursors, dedup windows and unfinished calls
        /// (default: a per-user state directory); created 0700, its files
        /// 0600, as the records hold the Mcp-Session-Id. An existing
        /// directory open to other users gets a warning (fix: chmod 700 DIR).
        #[arg(long)]
        state: Option<PathBuf>,
        /// Name of the call: a run with the same URL and name resumes it.
        #[arg(long, default_value = "default")]
        name: String,
        /// Extra request header, as 'Name: value' (repeatable); like a
        /// credential, it is not sent after a redirect to another origin.
        #[arg(short = 'H', long = "header", value_parser = HeaderParser)]
        headers: Vec<(String, String)>,
        /// Forget an unfinished call of this name and start a new one.
        #[arg(long)]
        new: bool,
    },
    /// Serve GET /events: ids 1..N, replay after Last-Event-ID, keep-alives.
    Serve {
        /// Address to listen on; port 0 picks a free port (printed on stdout).
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Last event id (default: endless).
        #[arg(long)]
        count: Option<u64>,
        /// Milliseconds between events.
        #[arg(long, default_value_t = 100)]
        interval_ms: u64,
        /// Close each connection after this many events.
        #[arg(long)]
        drop_every: Option<u64>,
        /// The `retry:` hint sent to clients, in milliseconds.
        #[arg(long, default_value_t = 1000)]
        retry_ms: u64,
        /// On reconnect, replay this many events before Last-Event-ID.
        #[arg(long, default_value_t = 0)]
        rewind: u64,
        /// Also serve static files from this directory.
        #[arg(long)]
        www: Option<PathBuf>,
    },
    /// Put any SSE service behind a replay log: every client (a browser's
    /// own EventSource, curl, tidemark) resumes its streams with nothing
    /// lost or repeated, even from servers that cannot replay.
    ///
    /// Requests are forwarded to the upstream with their path, query and
    /// headers; answers that are not text/event-stream pass through
    /// unchanged. Event streams are logged and served from the log with the
    /// proxy's own ids: GET streams shared by path, query, Origin and identity
    /// (Authorization, Cookie, Mcp-Session-Id, --identity-header), POST
    /// answers resumable at their Content-Location. MCP Streamable HTTP is
    /// recognised by its headers: a session resumes any of its streams by
    /// Last-Event-ID alone.
    Proxy(ProxyArgs),
    /// Run a chaotic server and a resumable follower together, with a live
    /// display and a final verdict: events expected, received, lost, duplicated.
    Demo {
        /// Events to send.
        #[arg(long, default_value_t = 20_000)]
        events: u64,
    },
}

/// `tidemark proxy`'s flags.
#[derive(clap::Args)]
struct ProxyArgs {
    /// The service to front, e.g. http://127.0.0.1:3000 (a request's path
    /// and query are joined to it).
    #[arg(long)]
    upstream: url::Url,
    /// Address to listen on; port 0 picks a free port (printed on stdout).
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: SocketAddr,
    /// Keep the replay log on disk in this directory, crash-safe: after a
    /// kill -9 and a restart on it, every event a client was sent is still
    /// served. Or in Redis Streams, with a redis://[:PASSWORD@]HOST:PORT/[DB]
    /// (rediss:// for TLS) or redis+unix:///PATH URL, as safe and outliving
    /// the machine; during a Redis outage live streams go on from memory and
    /// the log catches up when Redis is back (default: in memory). A
    /// directory is created 0700 and its files 0600 (they hold events and
    /// the identity key); an existing one open to other users gets a
    /// warning (fix: chmod 700 DIR).
    #[arg(long, value_name = "DIR|URL")]
    log: Option<PathBuf>,
    /// Prefix of the Redis keys of --log redis://... (several proxies or
    /// deployments can share one Redis under different prefixes).
    #[arg(
        long,
        value_name = "PREFIX",
        default_value = "tidemark:",
        requires = "log"
    )]
    redis_prefix: String,
    /// With --log redis://, time to live of a stream's lease in Redis: the
    /// instance holding it follows the upstream (or reads a POST answer),
    /// the others of the fleet serve their clients from Redis, and take
    /// over this long after it died.
    #[arg(long, default_value_t = 10_000)]
    lease_ms: u64,
    /// Most events kept per stream.
    #[arg(long, default_value_t = 10_000)]
    retain: usize,
    /// How long a stream is kept after its last event, in seconds; ended
    /// streams are dropped after that.
    #[arg(long, default_value_t = 300)]
    retain_secs: u64,
    /// A keep-alive comment to every client this often, in seconds.
    #[arg(long, default_value_t = 15)]
    keep_alive_secs: u64,
    /// How long a GET stream stays open upstream after its last client
    /// left, in seconds (a reloading page loses nothing).
    #[arg(long, default_value_t = 60)]
    linger_secs: u64,
    /// The `retry:` hint sent to clients, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    retry_ms: u64,
    /// A request header that is part of the identity a stream belongs to,
    /// beside Authorization, Cookie and Mcp-Session-Id (repeatable).
    #[arg(long = "identity-header", value_name = "NAME")]
    identity_headers: Vec<hyper::header::HeaderName>,
    /// Most logged streams at once; more are refused with 503.
    #[arg(long, default_value_t = 10_000)]
    max_streams: usize,
    /// Most clients of logged streams at once; more are refused with 503.
    #[arg(long, default_value_t = 50_000)]
    max_clients: usize,
    /// Most bytes of events kept per stream; the oldest go first.
    #[arg(long, default_value_t = 64 << 20)]
    max_stream_bytes: usize,
    /// Largest upstream event (and line), in bytes; a larger one is dropped
    /// and a tidemark-gap event with reason too_large logged in its place.
    #[arg(long, default_value_t = 1 << 20)]
    max_event_bytes: usize,
    /// Largest request head, in bytes (at least 8192); larger ones get 431.
    #[arg(long, default_value_t = 64 << 10, value_parser = clap::value_parser!(u32).range(8192..))]
    max_header_bytes: u32,
    /// Largest request body, in bytes; larger ones get 413.
    #[arg(long, default_value_t = 1 << 20)]
    max_body_bytes: usize,
    /// Threads that run connections and upstream streams (default: one per
    /// core).
    #[arg(long)]
    threads: Option<usize>,
    /// Serve Prometheus metrics on GET /metrics at this address (port 0
    /// picks a free port, said on stderr).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// How long the upstream may take to answer a request's head, in
    /// seconds (a POST answered with JSON only once its work is done).
    #[arg(long, default_value_t = 300)]
    upstream_timeout_secs: u64,
}

impl ProxyArgs {
    fn config(&self) -> ProxyConfig {
        let mut config = ProxyConfig {
            retention: Retention {
                max_events: self.retain.max(1),
                max_bytes: self.max_stream_bytes,
                idle: Millis::from_secs(self.retain_secs),
            },
            keep_alive: Duration::from_secs(self.keep_alive_secs.max(1)),
            linger: Duration::from_secs(self.linger_secs),
            retry_ms: self.retry_ms,
            identity_headers: self.identity_headers.clone(),
            upstream_timeout: Duration::from_secs(self.upstream_timeout_secs),
            limits: ProxyLimits {
                max_streams: self.max_streams,
                max_clients: self.max_clients,
                max_event_bytes: self.max_event_bytes,
                max_header_bytes: self.max_header_bytes as usize,
                max_body_bytes: self.max_body_bytes,
            },
            ..ProxyConfig::new(self.upstream.clone())
        };
        if let Some(threads) = self.threads {
            config.threads = threads.max(1);
        }
        config
    }
}

/// `follow`'s Redis flags.
#[derive(clap::Args)]
struct RedisArgs {
    /// Keep the cursor in Redis (redis://HOST:PORT/[DB], rediss:// for TLS) instead of a state
    /// directory, shared with other instances: only the holder of the
    /// stream's lease follows it, the others wait as standbys.
    #[arg(long, value_name = "URL")]
    redis: Option<String>,
    /// Prefix of the Redis keys.
    #[arg(long, default_value = "tidemark:", requires = "redis")]
    redis_prefix: String,
    /// Let Redis expire a stream's cursor this many seconds after its last
    /// write (default: never).
    #[arg(long, requires = "redis")]
    redis_ttl_secs: Option<u64>,
    /// Keep the stream's dedup window in Redis too, beside the cursor: a
    /// restarted instance, or a standby taking over, then drops what the
    /// server replays from before its Last-Event-ID, instead of printing it
    /// again. Each flush appends the window's new ids in the same round
    /// trip as the cursor (a few bytes per event). The windows of every
    /// instance with the same --redis-prefix share one random key kept in
    /// Redis. Without it only the cursor is kept, as before.
    #[arg(long, requires = "redis")]
    redis_window: bool,
    /// Time to live of the stream's lease in Redis, renewed every third of
    /// it; a standby takes over at most this long after the holder dies.
    #[arg(long, default_value_t = 10_000, requires = "redis")]
    lease_ms: u64,
    /// Follow without a lease: for one consumer per stream and no standby.
    /// It keeps following through Redis outages of any length.
    #[arg(long, requires = "redis", conflicts_with = "lease_ms")]
    no_lease: bool,
}

impl RedisArgs {
    fn into_options(self) -> Option<RedisFollow> {
        let url = self.redis?;
        Some(RedisFollow {
            store: RedisConfig {
                prefix: self.redis_prefix,
                ttl: self.redis_ttl_secs.map(Duration::from_secs),
                windows: self.redis_window,
                ..RedisConfig::new(url)
            },
            lease_ttl: (!self.no_lease).then(|| Duration::from_millis(self.lease_ms)),
        })
    }
}

/// Parses `--header 'Name: value'`. Unlike clap's usual message, a refusal
/// does not repeat the argument: it may be a credential.
#[derive(Clone)]
struct HeaderParser;

impl clap::builder::TypedValueParser for HeaderParser {
    type Value = (String, String);

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<Self::Value, clap::Error> {
        let parsed = value
            .to_str()
            .and_then(|value| value.split_once(':'))
            .filter(|(name, _)| !name.trim().is_empty());
        let Some((name, value)) = parsed else {
            let arg = arg.map_or_else(|| "--header".to_owned(), |arg| arg.to_string());
            let message = format!(
                "invalid value for '{arg}': expected 'Name: value' (the value given is not \
                 shown: it may be a credential)\n"
            );
            return Err(
                clap::Error::raw(clap::error::ErrorKind::ValueValidation, message).with_cmd(cmd),
            );
        };
        Ok((name.trim().to_owned(), value.trim().to_owned()))
    }
}

fn parse_arguments(value: &str) -> Result<serde_json::Value, String> {
    match serde_json::from_str(value) {
        Ok(object @ serde_json::Value::Object(_)) => Ok(object),
        Ok(_) => Err("expected a JSON object".into()),
        Err(e) => Err(format!("not JSON: {e}")),
    }
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Demo { events } => {
            let options = DemoOptions {
                events,
                ..DemoOptions::default()
            };
            demo::exit_code(&smol::block_on(demo::demo(options)))
        }
        Command::Follow {
            url,
            state,
            stream,
            headers,
            max_events,
            metrics_listen,
            redis,
        } => {
            let options = FollowOptions {
                url,
                state: state.unwrap_or_else(default_state_dir),
                stream,
                headers,
                max_events,
                redis: redis.into_options(),
                metrics_listen,
            };
            // The client loop writes a received chunk's lines in one write.
            let mut stdout = std::io::stdout().lock();
            follow::exit_code(&smol::block_on(follow::follow(options, &mut stdout)))
        }
        Command::Mcp {
            url,
            tool,
            arguments,
            state,
            name,
            headers,
            new,
        } => {
            let options = McpOptions {
                url,
                state: state.unwrap_or_else(default_state_dir),
                name,
                tool,
                arguments,
                headers,
                new,
            };
            // The client loop writes a received chunk's lines in one write.
            let mut stdout = std::io::stdout().lock();
            mcp::exit_code(&smol::block_on(mcp::call(options, &mut stdout)))
        }
        Command::Proxy(args) => {
            let config = args.config();
            let redis_url = args
                .log
                .as_deref()
                .and_then(|log| log.to_str())
                .filter(|log| REDIS_SCHEMES.iter().any(|s| log.starts_with(s)));
            let (storage, log_name): (Box<dyn LogStorage>, String) = match (&args.log, redis_url) {
                (_, Some(url)) => {
                    let redis = RedisConfig {
                        prefix: args.redis_prefix.clone(),
                        ..RedisConfig::new(url)
                    };
                    let shown = redis.redacted_url();
                    match RedisLog::new(redis, config.retention) {
                        Ok(log) => (Box::new(log), shown),
                        Err(e) => {
                            eprintln!("tidemark: cannot open the log in {shown}: {e}");
                            return ExitCode::FAILURE;
                        }
                    }
                }
                (Some(dir), None) => match FileLog::open(dir) {
                    Ok(log) => (Box::new(log), dir.display().to_string()),
                    Err(e) => {
                        eprintln!("tidemark: cannot open the log in {}: {e}", dir.display());
                        return ExitCode::FAILURE;
                    }
                },
                (None, None) => (Box::new(MemoryLog), "memory".into()),
            };
            let fleet = redis_url.map(|url| FleetOptions {
                redis: RedisConfig {
                    prefix: args.redis_prefix.clone(),
                    ..RedisConfig::new(url)
                },
                lease_ttl: Duration::from_millis(args.lease_ms),
            });
            let options = ProxyOptions {
                listen: args.listen,
                metrics_listen: args.metrics_listen,
                storage,
                log_name,
                fleet,
            };
            server::exit_code(&smol::block_on(proxy::proxy_until_signal(config, options)))
        }
        Command::Serve {
            listen,
            count,
            interval_ms,
            drop_every,
            retry_ms,
            rewind,
            www,
        } => {
            let config = ServerConfig {
                count,
                interval: Duration::from_millis(interval_ms),
                drop_every,
                rewind,
                retry_ms: Some(retry_ms),
                www,
                ..ServerConfig::default()
            };
            server::exit_code(&smol::block_on(server::serve_until_signal(listen, config)))
        }
    }
}
