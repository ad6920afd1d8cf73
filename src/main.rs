//! The `fanout` command: parse arguments, load the config, run.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// mimalloc: measured in BENCHMARKS.md (glibc malloc/free were ~8 % of the server's CPU).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use fanout::cli::output::line;
use fanout::config::Config;
use fanout::queue::DeadLetters;

#[derive(Parser)]
#[command(version, about = "Segment-compatible event proxy")]
struct Cli {
    /// Configuration file.
    #[arg(long, global = true, default_value = "config.toml")]
    config: PathBuf,
    /// Log format on standard error.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    /// On start, drop the queued data of destinations no longer in the config (it is
    /// kept otherwise, in case they come back).
    #[arg(long)]
    purge: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the configuration and exit (non-zero, naming key and line, on error).
    Check {
        /// The file to check (instead of `--config`).
        file: Option<PathBuf>,
    },
    /// Inspect or replay messages destinations refused or gave up on.
    DeadLetters {
        #[command(subcommand)]
        action: DeadLetterAction,
    },
    /// Read one message (with its `type`) or a `{"batch":[…]}` on standard input and print,
    /// as JSON, which destinations it would go to and what each would receive. Sends nothing.
    Route {
        /// The source it comes from (default: the first `[[sources]]`).
        #[arg(long)]
        source: Option<String>,
    },
    /// Make a running fanout deliver to one destination again what its retained log holds
    /// from the first message accepted at or after `--since` (`POST /admin/replay`).
    Replay {
        #[arg(long)]
        destination: String,
        /// RFC 3339, e.g. 2026-11-29T10:00:00Z.
        #[arg(long)]
        since: String,
        /// RFC 3339; messages accepted later are not sent again.
        #[arg(long)]
        until: Option<String>,
        /// The server, e.g. `http://10.0.0.5:8088` (default: from the config).
        #[arg(long)]
        url: Option<String>,
    },
    /// Print what a running fanout does, live, as JSON lines (its `/debugger/events`):
    /// messages accepted, duplicates, refusals, and each destination's outcome.
    Tap {
        /// The server, e.g. `http://10.0.0.5:8088` (default: from the config).
        #[arg(long)]
        url: Option<String>,
        #[arg(long)]
        source: Option<String>,
        #[arg(long)]
        destination: Option<String>,
        /// A message type (track, identify, …).
        #[arg(long = "type")]
        message_type: Option<String>,
    },
    /// Privacy regulations of a running fanout (`/admin/regulations`).
    Regulations {
        #[command(subcommand)]
        action: fanout::cli::regulations::Action,
    },
    /// Work on Segment Functions files without a config or a server.
    Fn {
        #[command(subcommand)]
        action: FnAction,
    },
    /// List the destination presets shipped in the binary (`preset = "NAME"` in a
    /// `[[destinations]]` table), or print one's file.
    Presets {
        #[command(subcommand)]
        action: Option<PresetAction>,
    },
}

#[derive(Subcommand)]
enum PresetAction {
    /// Print the preset's TOML: its settings and every key a destination may override.
    Show { name: String },
}

#[derive(Subcommand)]
enum FnAction {
    /// Run a function file once, with the runtime's default limits, and print JSON lines.
    ///
    /// With `--event`, calls the handler for the message's `type` (onTrack, onIdentify,
    /// …) with the message and the settings, and prints `{"returned": …}`. With
    /// `--request` (a JSON file `{"method","url","headers":{},"body":…}`), calls
    /// `onRequest` as a source function and prints `{"emitted": message}` for each
    /// `Segment.track(…)` and friends (and `{"sets": n}` for `Segment.set`). A throw prints
    /// `{"threw": {"name","message","stack"}}`. Each `fetch` it made is printed before
    /// these, as `{"fetched": {"method","url","sent_to","status"|"error"|"refused"}}`
    /// (`sent_to` only when `--fetch-host` remapped it). Exit code: 0 when it returned, 1
    /// when it threw or could not load, 2 on bad arguments.
    Test {
        /// The function's JavaScript file.
        file: PathBuf,
        /// A message (JSON, with its `type`) to call the handler of its type with.
        #[arg(long, conflicts_with = "request", required_unless_present = "request")]
        event: Option<PathBuf>,
        /// A webhook request (JSON `{"method","url","headers":{},"body":…}`) for onRequest.
        #[arg(long)]
        request: Option<PathBuf>,
        /// `KEY=VALUE` handed over in `settings` (repeatable); a key ending in `_env`
        /// names an environment variable, passed as the key without `_env`.
        #[arg(long = "settings", value_name = "KEY=VALUE", num_args = 1..)]
        settings: Vec<String>,
        /// A host `fetch` may reach (repeatable), as a destination's `allow_hosts`; without
        /// any, only public hosts.
        #[arg(long = "allow-host", value_name = "HOST")]
        allow_hosts: Vec<String>,
        /// `fetch` requests to HOST go to the base URL instead (repeatable), as a
        /// destination's `fetch_hosts`.
        #[arg(long = "fetch-host", value_name = "HOST=URL")]
        fetch_hosts: Vec<String>,
    },
}

#[derive(Subcommand)]
enum DeadLetterAction {
    /// Print dead letters as JSON lines, oldest first (all of them, a page at a time).
    List {
        /// Only this destination's.
        #[arg(long)]
        destination: Option<String>,
        /// At most this many (default: all).
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Mark a destination's dead letters for delivery again; a running fanout sends
    /// them within a second (or at its next start). `--destination tracking_plan` asks
    /// the running fanout to take the messages tracking plans blocked in again, through
    /// the plans as they are now.
    Replay {
        #[arg(long)]
        destination: String,
        /// The running fanout, for `tracking_plan` (default: from the config).
        #[arg(long)]
        url: Option<String>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    // Needs no config: a function is tried before it goes in one.
    if let Some(Command::Fn { action }) = &cli.command {
        return fn_command(action);
    }
    if let Some(Command::Presets { action }) = &cli.command {
        return exit_code(match action {
            None => fanout::cli::presets::list(),
            Some(PresetAction::Show { name }) => fanout::cli::presets::show(name),
        });
    }
    let path = match &cli.command {
        Some(Command::Check { file: Some(file) }) => file.clone(),
        _ => cli.config.clone(),
    };
    let config = match Config::load(&path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("fanout: invalid config: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(Command::DeadLetters { action }) = &cli.command {
        return block_on(dead_letters_on(&config, action));
    }
    if let Some(Command::Regulations { action }) = &cli.command {
        return block_on(fanout::cli::regulations::run(&config, action));
    }
    if let Some(Command::Route { source }) = &cli.command {
        return route(&config, source.as_deref());
    }
    if let Some(Command::Tap {
        url,
        source,
        destination,
        message_type,
    }) = &cli.command
    {
        let filter = fanout::live::Filter {
            source: source.clone(),
            destination: destination.clone(),
            message_type: message_type.clone(),
        };
        return block_on(fanout::cli::tap::tap(&config, url.as_deref(), &filter));
    }
    if let Some(Command::Replay {
        destination,
        since,
        until,
        url,
    }) = &cli.command
    {
        let escape = fanout::cli::admin::escape;
        let mut path = format!(
            "/admin/replay?destination={}&since={}",
            escape(destination),
            escape(since)
        );
        if let Some(until) = until {
            path.push_str(&format!("&until={}", escape(until)));
        }
        return block_on(async {
            let server = fanout::cli::admin::Server::new(&config, url.as_deref())?;
            line(server.post(&path).await?)
        });
    }
    if let Some(Command::Check { .. }) = cli.command {
        // The plans and keys a start would take, the environment's included (shared by
        // two sources?).
        if let Err(e) = fanout::auth::Sources::from_config(&config.sources, &config.dir) {
            eprintln!("fanout: invalid config: {}: {e:#}", path.display());
            return ExitCode::from(2);
        }
        return exit_code(line(format_args!(
            "{}: ok ({} sources, {} destinations)",
            path.display(),
            config.sources.len(),
            config.destinations.len()
        )));
    }
    // A bad plan or write key stops the start as `fanout check` would.
    let sources = match fanout::auth::Sources::from_config(&config.sources, &config.dir) {
        Ok(sources) => sources,
        Err(e) => {
            eprintln!("fanout: invalid config: {}: {e:#}", path.display());
            return ExitCode::from(2);
        }
    };
    // Ingest and delivery on runtimes of their own: 64 busy connections must not starve
    // the delivery engines of polls (the queue would grow without end), and a burst of
    // deliveries must not delay acknowledgements. The OS shares the cores between them.
    let runtimes = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_park(return_idle_memory)
        .on_thread_stop(return_thread_memory)
        .build()
        .and_then(|ingest| {
            // Its blocking pool (large queue reads, file writes and syncs, dead letters)
            // is capped: a disk stall would otherwise start a thread per waiting call,
            // each keeping a heap of its own.
            let delivery = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .max_blocking_threads(8)
                .thread_name("delivery")
                .on_thread_start(no_wakeup_preemption)
                .enable_all()
                .on_thread_park(return_idle_memory)
                .on_thread_stop(return_thread_memory)
                .build()?;
            Ok((ingest, delivery))
        });
    let (runtime, delivery) = match runtimes {
        Ok(rts) => rts,
        Err(e) => {
            eprintln!("fanout: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let options = fanout::server::Options {
        config_path: cli.config,
        purge: cli.purge,
        delivery: delivery.handle().clone(),
        clock: fanout::clock::Clock::system(),
    };
    match runtime.block_on(fanout::server::run(config, sources, options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fanout: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a command's work on a runtime of its own; an error is printed and fails it.
fn block_on(work: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let done = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(work));
    exit_code(done)
}

/// A command's outcome as its exit code; the error is printed, unless it is standard
/// output closing (`fanout … | head`), which ends the command quietly.
fn exit_code(done: anyhow::Result<()>) -> ExitCode {
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if fanout::cli::output::is_closed(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fanout: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn fn_command(action: &FnAction) -> ExitCode {
    use fanout::cli::fn_test::{host_policy, run, Ended, Input};
    let FnAction::Test {
        file,
        event,
        request,
        settings,
        allow_hosts,
        fetch_hosts,
    } = action;
    let input = match (event, request) {
        (Some(event), _) => Input::Event(event.clone()),
        (None, Some(request)) => Input::Request(request.clone()),
        (None, None) => unreachable!("clap requires --event or --request"),
    };
    let done = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| {
            let hosts = host_policy(allow_hosts, fetch_hosts)?;
            rt.block_on(run(file, &input, settings, hosts))
        });
    match done {
        Ok(Ended::Returned) => ExitCode::SUCCESS,
        Ok(Ended::Threw) => ExitCode::FAILURE,
        Err(e) if fanout::cli::output::is_closed(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fanout: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Works on the dead-letter store directly: SQLite handles a running server beside us,
/// and the shared store is the same for every instance.
async fn dead_letters_on(config: &Config, action: &DeadLetterAction) -> anyhow::Result<()> {
    let store = DeadLetters::for_config(
        &config.queue,
        &config.server.data_dir,
        config.queue_bytes(),
        config.dead_letter_bounds(),
    )
    .await?;
    let known = |name: &str| {
        let reserved = name == fanout::tracking_plan::DEAD_LETTER_NAME;
        if !reserved && !config.destinations.iter().any(|d| d.name == name) {
            eprintln!("fanout: note: no destination `{name}` in the config");
        }
    };
    match action {
        DeadLetterAction::List { destination, limit } => {
            if let Some(name) = destination {
                known(name);
            }
            let mut left = limit.unwrap_or(usize::MAX);
            let mut after = 0;
            while left > 0 {
                let page = store.list(destination.as_deref(), after, left).await?;
                left -= page.dead_letters.len();
                for letter in &page.dead_letters {
                    line(serde_json::to_string(letter)?)?;
                }
                match page.next {
                    Some(next) => after = next,
                    None => break,
                }
            }
        }
        DeadLetterAction::Replay { destination, url }
            if destination == fanout::tracking_plan::DEAD_LETTER_NAME =>
        {
            let server = fanout::cli::admin::Server::new(config, url.as_deref())?;
            let path = format!("/admin/dead-letters/replay?destination={destination}");
            line(server.post(&path).await?)?;
        }
        DeadLetterAction::Replay { destination, .. } => {
            known(destination);
            let replayed = store
                .request_replay(destination, fanout::clock::Clock::system().now())
                .await?;
            line(serde_json::json!({ "replayed": replayed }))?;
        }
    }
    Ok(())
}

/// `fanout route`: exit 2 on input it cannot route (the message says why).
fn route(config: &Config, source: Option<&str>) -> ExitCode {
    use std::io::Read;
    let mut input = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut input) {
        eprintln!("fanout: cannot read standard input: {e}");
        return ExitCode::from(2);
    }
    let report =
        match fanout::cli::route::explain(config, source, &input, fanout::clock::Clock::system()) {
            Ok(report) => report,
            Err(e) => {
                eprintln!("fanout: {e:#}");
                return ExitCode::from(2);
            }
        };
    exit_code(
        serde_json::to_string_pretty(&report)
            .map_err(anyhow::Error::from)
            .and_then(line),
    )
}

/// mimalloc gives freed memory back to the OS lazily, during later allocations on the
/// thread that freed it: a worker that goes idle after a burst (a flood of connections,
/// a delivery backlog) would keep its peak for ever. When a worker parks, at most once a
/// second, it hands back what it has free.
fn return_idle_memory() {
    use std::cell::Cell;
    use std::time::{Duration, Instant};
    thread_local!(static LAST: Cell<Option<Instant>> = const { Cell::new(None) });
    let due = LAST.with(|last| {
        let due = last
            .get()
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
        if due {
            last.set(Some(Instant::now()));
        }
        due
    });
    if due {
        // SAFETY: mi_collect takes no pointers; it walks the calling thread's own heap.
        unsafe { libmimalloc_sys::mi_collect(true) }
    }
}

/// Delivery threads run under `SCHED_BATCH`: the same share of the CPU as any other
/// thread (delivery keeps up under a saturated core), but waking one for newly stored data
/// does not preempt the thread that is answering requests; it runs at the next tick or
/// when that thread waits. On one shared core this takes the delivery wakeups out of the
/// answers' latency. If the policy cannot be set, the default stays.
#[cfg(target_os = "linux")]
fn no_wakeup_preemption() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param for the call; pid 0 names the calling thread.
    let _ = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
}

/// `SCHED_BATCH` is Linux's; elsewhere delivery threads keep the default policy.
#[cfg(not(target_os = "linux"))]
fn no_wakeup_preemption() {}

/// A thread that ends (a blocking-pool thread after its idle time) hands back its free
/// memory first: mimalloc would otherwise keep its pages as an abandoned heap until some
/// other thread happens to take them over.
fn return_thread_memory() {
    // SAFETY: as in `return_idle_memory`.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FANOUT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().init(),
    }
}
