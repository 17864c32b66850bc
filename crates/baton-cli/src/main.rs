//! `baton`: distributed locks, leader election and fencing tokens for shell scripts and cron
//! jobs, on etcd or Redis (the embedded store for `baton demo` and `baton bench`). See
//! `baton --help`.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::panic))]

use std::process::ExitCode;

use cli::Command;
use exit::CliError;

mod barrier;
mod bench;
mod cli;
mod demo;
mod elect;
mod exit;
mod kv;
mod leader;
mod lock;
mod observe;
mod output;
mod queue;
mod sem;
mod status;
mod supervisor;

/// Counts heap bytes in use, for `baton bench scale`.
#[global_allocator]
static ALLOCATOR: bench::alloc::Counting = bench::alloc::Counting;

fn main() -> ExitCode {
    let mut args = std::env::args_os();
    if args.nth(1).as_deref() == Some(std::ffi::OsStr::new(supervisor::GUARDIAN_ARG)) {
        let rest: Vec<String> = args
            .take(4)
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        supervisor::guardian_main(&rest);
    }
    quiet_panics();
    let code = match cli::parse(std::env::args_os()) {
        Ok(cli) => {
            init_tracing();
            run(cli)
        }
        Err(e) => e,
    };
    code.report();
    ExitCode::from(code.code())
}

/// Run a command on a single-threaded runtime (CMD is forked from the main thread; see
/// `supervisor`), and turn its result into an exit code. `bench` runs on a multi-threaded
/// runtime, as a service using the library would; it forks nothing.
fn run(cli: cli::Cli) -> CliError {
    let runtime = if matches!(cli.command, Command::Bench(_)) {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => return CliError::failed(format!("cannot start the runtime: {e}")),
    };
    let global = cli.global;
    let result = runtime.block_on(async {
        match cli.command {
            Command::Lock(args) => lock::run(&global, args).await,
            Command::Elect(args) => elect::run(&global, args).await,
            Command::Observe(args) => observe::run(&global, args).await,
            Command::Leader(args) => leader::run(&global, args).await,
            Command::Status(args) => status::run(&global, args).await,
            Command::Demo(args) => demo::run(&global, args).await,
            Command::Bench(args) => bench::run(&global, args).await,
            Command::Sem(args) => sem::run(&global, args).await,
            Command::Barrier(args) => barrier::run(&global, args).await,
            Command::Queue(args) => queue::run(&global, args).await,
            Command::Get(args) => kv::get(&global, args).await,
            Command::Set(args) => kv::set(&global, args).await,
            Command::Watch(args) => kv::watch(&global, args).await,
        }
    });
    // Background tasks (keep-alives, watches) are dropped, not awaited.
    runtime.shutdown_background();
    match result {
        Ok(code) => CliError::quiet(code),
        Err(e) => e,
    }
}

/// Trace to stderr, only when `RUST_LOG` is set (e.g. `RUST_LOG=baton=debug`).
fn init_tracing() {
    if std::env::var_os("RUST_LOG").is_none() {
        return;
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .try_init();
}

/// A panic is a bug in baton: report it as one line on stderr, without a backtrace, and exit
/// 125.
fn quiet_panics() {
    std::panic::set_hook(Box::new(|info| {
        let what = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".to_string());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        exit::print_error(&format!("internal error (a bug): {what}{at}"));
        std::process::exit(i32::from(exit::FAILED));
    }));
}
