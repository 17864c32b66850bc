//! The command line: global options, the commands, value parsers, and connecting.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::exit::CliError;
use crate::{barrier, bench, demo, elect, kv, leader, lock, observe, queue, sem, status};

/// The default endpoint, as in etcdctl.
pub(crate) const DEFAULT_ENDPOINTS: &str = "http://127.0.0.1:2379";

const ABOUT: &str =
    "Distributed locks, leader election and fencing tokens for shell scripts and cron jobs, \
on etcd or Redis.";

const LONG_ABOUT: &str = "\
Distributed locks, leader election and fencing tokens for shell scripts and cron jobs, \
on etcd or Redis (the embedded store, mem://, serves baton demo and baton bench).

baton runs a command while it holds a lock (or leads an election), hands it a fencing \
token, and ends it when the lock is lost: SIGTERM at once, SIGKILL after --grace (the next \
holder may start in between: keep --grace short, or have the protected resource check the \
token). If baton itself dies, the command is SIGKILLed before the lock can pass to another. Its keys are those of etcdctl lock \
and etcdctl elect, so baton, etcdctl and Go services share one lock.";

const EXIT_CODES: &str = "\
Exit codes:
  0        success, or CMD's own exit code (passed through)
  1        baton leader: the election has no leader; baton get: no such key;
           baton set --if-revision: the key changed (nothing written)
  122      the lock, leadership or permit was lost while held (CMD may have run
           without it)
  124      not acquired: --try found the lock held (or no permit free), or --timeout
           passed (also baton barrier, baton queue pop)
  125      baton itself failed: bad input, unreachable backend, the session lost (or
           only the waiter's key deleted) while still waiting (nothing held, CMD never
           ran), or a result (get, set, queue, leader, status, barrier, demo, bench)
           that could not be written to stdout; but watch, observe and demo end with
           0 when the reader of stdout goes away (baton demo | head -1)
  126/127  CMD could not be executed / was not found
  128+N    interrupted by signal N while waiting (queue pop: or by a second signal,
           0.5 s or more after the first, while its claim is in flight), or CMD
           killed by signal N

Examples:
  baton lock reports/nightly -- ./make-report.sh
  baton --endpoints http://10.0.0.5:2379 lock --try backup -- ./backup.sh
  baton elect scheduler 10.0.0.7:8080 -- ./scheduler
  baton observe scheduler
  baton sem encoders --permits 4 -- ./encode.sh
  baton barrier bench/start --count 3
  baton queue push jobs img-1.png; baton queue pop --timeout 30s jobs
  baton set --if-revision 0 config/x on; baton watch --prefix config/
  baton status
  baton demo
  baton bench contended --workers 8 --peer etcd-lock-api";

/// `baton`: the command line.
#[derive(Debug, Parser)]
#[command(
    name = "baton",
    version,
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_help = EXIT_CODES,
    propagate_version = true,
    disable_help_subcommand = true
)]
pub(crate) struct Cli {
    #[command(flatten)]
    pub(crate) global: Global,
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// Options every command takes.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Global {
    /// Backend URLs: http://h:p[,http://h:p…] or etcd://h:p,h:p for etcd, https://… for
    /// etcd over TLS, redis://h:p (rediss:// with TLS) for one Redis server,
    /// redlock://h1:p1,h2:p2,h3:p3 for Redlock over N ≥ 3 masters (lock, elect, observe,
    /// leader, status and bench only), mem:// for the embedded store (demo and bench only:
    /// it lives inside the one baton process). A password in the URL (http://user:pass@h:p)
    /// is visible in `ps`: prefer --password-file or $BATON_PASSWORD.
    #[arg(
        long,
        global = true,
        env = "BATON_ENDPOINTS",
        hide_env_values = true,
        value_name = "URLS",
        default_value = DEFAULT_ENDPOINTS
    )]
    pub(crate) endpoints: String,

    /// Print machine-readable JSON lines instead of human text.
    #[arg(long, global = true)]
    pub(crate) json: bool,

    /// How long to wait for the backend to answer when connecting.
    #[arg(
        long,
        global = true,
        value_name = "DUR",
        default_value = "5s",
        value_parser = positive_duration
    )]
    pub(crate) dial_timeout: Duration,

    /// Authenticate as this etcd user (or Redis ACL user). The password comes from --password-file, else
    /// $BATON_PASSWORD, else the URL (never give it on the command line: `ps` shows it).
    #[arg(long, global = true, env = "BATON_USER", value_name = "NAME")]
    pub(crate) user: Option<String>,

    /// Read the password from this file (its first line; a trailing newline is dropped).
    #[arg(long, global = true, value_name = "FILE")]
    pub(crate) password_file: Option<PathBuf>,

    /// Verify https:// servers with this CA certificate (PEM) instead of the system's roots,
    /// as etcdctl's --cacert.
    #[arg(long, global = true, value_name = "FILE")]
    pub(crate) cacert: Option<PathBuf>,

    /// Present this client certificate (PEM) to https:// servers that require one (mutual
    /// TLS); needs --key.
    #[arg(long, global = true, value_name = "FILE", requires = "key")]
    pub(crate) cert: Option<PathBuf>,

    /// The private key (PEM) of --cert.
    #[arg(long, global = true, value_name = "FILE", requires = "cert")]
    pub(crate) key: Option<PathBuf>,

    /// Confine every key baton creates or reads to this prefix (such as team-a/), so that
    /// teams share one etcd without colliding; an etcd role may then cover only the prefix.
    /// End it with a separator: team-a (no slash) is a prefix of team-ab's namespace, and
    /// sees its keys.
    #[arg(
        long,
        global = true,
        env = "BATON_NAMESPACE",
        value_name = "PREFIX",
        default_value = ""
    )]
    pub(crate) namespace: String,

    /// Set by `parse` from where `--endpoints` came from: true if given on the command line
    /// or in $BATON_ENDPOINTS, false if it is the default.
    #[arg(skip)]
    pub(crate) endpoints_given: bool,

    /// Set by `parse` for the commands that may run on `mem://` (`demo`, `bench`): every
    /// other command works between processes, which the embedded store cannot serve.
    #[arg(skip)]
    pub(crate) embedded_allowed: bool,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run CMD while holding a lock (or hold it until interrupted).
    Lock(lock::Args),
    /// Campaign in an election; run CMD while leader (or lead until interrupted).
    Elect(elect::Args),
    /// Print every leader change and proclaimed value of an election until interrupted.
    Observe(observe::Args),
    /// Print the current leader's value.
    Leader(leader::Args),
    /// Show the locks, elections, semaphores, barriers and read-write locks under a prefix
    /// (holders, token, TTL, waiters), and the queues (items waiting).
    Status(status::Args),
    /// Watch workers share a lock with fencing, and an election fail over, in seconds.
    Demo(demo::Args),
    /// Measure locks, handover, loss detection and scale, against a peer in the same run.
    Bench(bench::Args),
    /// Run CMD while holding one of N permits of a semaphore (or hold until interrupted).
    Sem(sem::Args),
    /// A double barrier: enter, wait until N have entered, leave, wait until all have left.
    Barrier(barrier::Args),
    /// A FIFO work queue: push, pop (waiting for an item), len.
    Queue(queue::Args),
    /// Print a key's value.
    Get(kv::GetArgs),
    /// Write a key's value, or with --if-revision compare-and-set it.
    Set(kv::SetArgs),
    /// Print every change of a key (or of the keys under a prefix) until interrupted.
    Watch(kv::WatchArgs),
}

/// Parse the command line. On a usage error, print it as one line and give 125; for
/// `--help` and `--version`, print them and give 0.
pub(crate) fn parse<I, T>(args: I) -> Result<Cli, CliError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let parsed = Cli::command()
        .try_get_matches_from(&args)
        .and_then(|matches| Cli::from_arg_matches(&matches).map(|cli| (cli, matches)));
    match parsed {
        Ok((mut cli, matches)) => {
            if let Some(e) = option_like_value(&args) {
                return Err(e);
            }
            cli.global.endpoints_given = endpoints_given(&matches);
            cli.global.embedded_allowed =
                matches!(cli.command, Command::Demo(_) | Command::Bench(_));
            Ok(cli)
        }
        Err(e) => {
            use clap::error::ErrorKind;
            match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                    let _ = e.print();
                    Err(CliError::quiet(0))
                }
                ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand | ErrorKind::MissingSubcommand
                    if e.render().to_string().contains("baton queue") =>
                {
                    Err(CliError::failed(
                        "no queue command given: use push, pop or len (see baton queue --help)",
                    ))
                }
                ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand | ErrorKind::MissingSubcommand => Err(CliError::failed(
                    "no command given: use lock, elect, observe, leader, status, demo, bench, sem, barrier, queue, get, set or watch (see baton --help)",
                )),
                _ => Err(option_like_value(&args)
                    .or_else(|| negative_value(&args, &e))
                    .or_else(|| single_dash_long_option(&args, &e))
                    .or_else(|| command_without_separator(&args, &e))
                    .unwrap_or_else(|| CliError::failed(usage_line(&e)))),
            }
        }
    }
}

/// The error for a free-form VALUE (elect, set, queue push) that starts with `--` and was
/// not given after a `--`: a misspelt option (`--if-revison=0`) that clap took for the
/// value, as VALUE may start with `-` (`-5`, `-`). It names the option meant, if clap finds
/// a similar one, and says how to give such a value on purpose. Also when the rest of the
/// command line failed to parse because of it (`set k --if-revison=0 v`: 'v' is then one
/// word too many).
fn option_like_value(args: &[OsString]) -> Option<CliError> {
    const ELECT: &str =
        "a VALUE to proclaim cannot start with '--' (baton elect's '--' starts CMD)";
    const SET: &str =
        "to set a value that starts with '--', put '--' before it: baton set KEY -- VALUE";
    const PUSH: &str = "to push an item that starts with '--', put '--' before it: \
                        baton queue push NAME -- VALUE";
    let partial = Cli::command()
        .ignore_errors(true)
        .try_get_matches_from(args)
        .ok()?;
    let (path, how, matches): (&[&str], _, _) = match partial.subcommand()? {
        ("elect", m) => (&["elect"], ELECT, m),
        ("set", m) => (&["set"], SET, m),
        ("queue", m) => match m.subcommand()? {
            ("push", m) => (&["queue", "push"], PUSH, m),
            _ => return None,
        },
        _ => return None,
    };
    let value = matches.try_get_one::<String>("value").ok()??;
    if !value.starts_with("--") {
        return None;
    }
    // After `--` every word is a value: given there, it is meant. Whether VALUE came before
    // the `--` is told by parsing the words before it alone, not by looking for the word
    // there: it may also be a real option there (`--json set k -- --json`).
    if let Some(separator) = args.iter().position(|a| a == "--") {
        let before = Cli::command()
            .ignore_errors(true)
            .try_get_matches_from(&args[..separator])
            .ok()?;
        let mut m = &before;
        for name in path {
            m = m.subcommand_matches(name)?;
        }
        if m.try_get_one::<String>("value").ok()?? != value {
            return None;
        }
    }
    // Parsed again without hyphen values, the word is an unknown argument, for which clap
    // suggests the most similar option.
    fn strict(cmd: clap::Command, path: &[&str]) -> clap::Command {
        match path.split_first() {
            Some((name, rest)) => cmd.mut_subcommand(*name, |sub| strict(sub, rest)),
            // In place: `mut_arg` would move VALUE after CMD.
            None => cmd.mut_args(|arg| {
                if arg.get_id() == "value" {
                    arg.allow_hyphen_values(false)
                } else {
                    arg
                }
            }),
        }
    }
    let suggested = strict(Cli::command(), path)
        .try_get_matches_from(args)
        .err()
        .and_then(|e| match e.get(clap::error::ContextKind::SuggestedArg) {
            Some(clap::error::ContextValue::String(s)) => Some(format!(" (did you mean '{s}'?)")),
            _ => None,
        })
        .unwrap_or_default();
    // Only the word up to `=`: what follows may be a value not meant for stderr.
    let word = value.split('=').next().unwrap_or(value);
    Some(CliError::failed(format!(
        "unknown option '{word}'{suggested} in VALUE's place: {how}"
    )))
}

/// The error for an option's value that starts with `-` and a digit (`--timeout -1s`), or
/// that clap took for flags (`--user -bob`): clap takes it for flags, and its tip ("to pass '-1' as a value, use '-- -1'") would make
/// it CMD. Says which option's value it is, and that it cannot be negative; or, for one that
/// takes text or a path (`--user -1`), to give it as `--user=-1`.
fn negative_value(args: &[OsString], e: &clap::Error) -> Option<CliError> {
    use clap::error::ErrorKind;
    if e.kind() != ErrorKind::UnknownArgument {
        return None;
    }
    let before_cmd = before_command(args);
    let takes_value = |long: &str| {
        let cmd = Cli::command();
        let found = cmd
            .get_arguments()
            .chain(cmd.get_subcommands().flat_map(|c| {
                c.get_arguments()
                    .chain(c.get_subcommands().flat_map(|c| c.get_arguments()))
                    .collect::<Vec<_>>()
            }))
            .any(|a| a.get_long() == Some(long) && a.get_action().takes_values());
        found
    };
    // The word clap found unexpected: `-b` of `--user -bob`.
    let unexpected = match e.get(clap::error::ContextKind::InvalidArg) {
        Some(clap::error::ContextValue::String(word)) => word.clone(),
        _ => String::new(),
    };
    before_cmd.windows(2).enumerate().find_map(|(i, pair)| {
        let (option, value) = (pair[0].to_str()?, pair[1].to_str()?);
        let long = option.strip_prefix("--").filter(|l| !l.contains('='))?;
        let negative =
            value.starts_with('-') && value[1..].starts_with(|c: char| c.is_ascii_digit());
        // A value such as `-bob` or `-t/`, taken for flags: the word clap did not expect.
        let hyphen = value.starts_with('-')
            && value != "--"
            && !unexpected.is_empty()
            && value.starts_with(unexpected.as_str());
        if !((negative || hyphen) && takes_value(long)) {
            return None;
        }
        // Given as `--option=value`, is it refused? A duration or a count is; a name or a
        // path (`--user -1`, `--cacert -1.pem`) is fine written that way.
        let mut joined = args.to_vec();
        joined.splice(i..i + 2, [OsString::from(format!("{option}={value}"))]);
        let refusal = Cli::command()
            .try_get_matches_from(&joined)
            .err()
            .filter(|e| {
                matches!(
                    e.kind(),
                    ErrorKind::ValueValidation | ErrorKind::InvalidValue
                ) && matches!(
                    e.get(clap::error::ContextKind::InvalidArg),
                    Some(clap::error::ContextValue::String(a))
                        if a == option || a.starts_with(&format!("{option} "))
                )
            });
        let refused = refusal.is_some();
        if refused && !negative {
            // `--ttl -x`: no option's value, and no duration either.
            return Some(CliError::failed(format!(
                "invalid value '{value}' for '{option}' (see baton --help)"
            )));
        }
        Some(CliError::failed(if refused {
            // `-0s` is refused for its sign (see `duration`).
            let signed = refusal
                .as_ref()
                .and_then(std::error::Error::source)
                .is_some_and(|why| why.to_string() == NO_SIGN);
            let reason = if signed { NO_SIGN } else { NEGATIVE };
            format!("invalid value '{value}' for '{option}': {reason} (see baton --help)")
        } else {
            format!(
                "'{value}' was taken for an option, not as the value of '{option}': to give a \
                 value that starts with '-', give it as '{option}={value}' (see baton --help)"
            )
        }))
    })
}

/// The words before the first `--` (after it, every word is CMD's or a value).
fn before_command(args: &[OsString]) -> &[OsString] {
    args.iter()
        .position(|a| a == "--")
        .map_or(args, |i| &args[..i])
}

/// The subcommand a command line names (`lock`, `queue pop`), found by a parse that ignores
/// errors, with its clap command.
fn subcommand_of(args: &[OsString]) -> Option<(String, clap::Command)> {
    let partial = Cli::command()
        .ignore_errors(true)
        .try_get_matches_from(args)
        .ok()?;
    let (name, sub) = partial.subcommand()?;
    let mut cmd = Cli::command().find_subcommand(name)?.clone();
    let mut path = name.to_string();
    if let Some((inner, _)) = sub.subcommand() {
        cmd = cmd.find_subcommand(inner)?.clone();
        path = format!("{path} {inner}");
    }
    Some((path, cmd))
}

/// The subcommand named by the first word that is one (`lock`, `queue pop`), wherever it
/// stands: for a command line that clap could not parse up to it.
fn named_subcommand(words: &[OsString]) -> Option<(String, clap::Command)> {
    let top = Cli::command();
    let at = words.iter().position(|w| {
        w.to_str()
            .is_some_and(|w| top.get_subcommands().any(|c| c.get_name() == w))
    })?;
    let mut cmd = top.find_subcommand(words[at].to_str()?)?.clone();
    let mut path = cmd.get_name().to_string();
    if cmd.has_subcommands() {
        let inner = words.get(at + 1).and_then(|w| w.to_str())?;
        cmd = cmd.find_subcommand(inner)?.clone();
        path = format!("{path} {inner}");
    }
    Some((path, cmd))
}

/// The error for a long option given with one dash (`baton lock NAME -ttl 5s`): clap finds
/// `-t` unexpected, and its message names neither the word nor the option meant.
fn single_dash_long_option(args: &[OsString], e: &clap::Error) -> Option<CliError> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if e.kind() != ErrorKind::UnknownArgument {
        return None;
    }
    let Some(ContextValue::String(flag)) = e.get(ContextKind::InvalidArg) else {
        return None;
    };
    if flag.starts_with("--") || !flag.starts_with('-') {
        return None;
    }
    let before_cmd = before_command(args);
    let word = before_cmd
        .iter()
        .filter_map(|a| a.to_str())
        .find(|a| !a.starts_with("--") && a.len() > 2 && a.starts_with(flag.as_str()))?;
    // Only up to `=`: what follows may be a value not meant for stderr.
    let long = word[1..].split('=').next()?;
    // Before the subcommand (`baton -endpoints URL lock ...`, where the README puts global
    // options), no subcommand is found: the global options alone are known there.
    let (path, sub) = match subcommand_of(args) {
        Some((path, sub)) => (format!("baton {path}"), Some(sub)),
        None => ("baton".to_string(), None),
    };
    let top = Cli::command();
    let known = top
        .get_arguments()
        .chain(sub.iter().flat_map(|s| s.get_arguments()))
        .any(|a| a.get_long() == Some(long));
    if !known {
        // A subcommand's option before the subcommand (`baton -ttl 5s lock ...`): say
        // whose option it is, and where it goes.
        let (named, _) = named_subcommand(before_cmd)
            .filter(|(_, sub)| sub.get_arguments().any(|a| a.get_long() == Some(long)))?;
        return Some(CliError::failed(format!(
            "unknown option '-{long}' of 'baton': '--{long}' (two dashes) is an option of \
             'baton {named}', and goes after '{named}' (see baton --help)"
        )));
    }
    Some(CliError::failed(format!(
        "unknown option '-{long}' of '{path}': a long option takes two dashes: \
         '--{long}' (see baton --help)"
    )))
}

/// The error for `baton lock NAME CMD` (also elect, sem) without the `--` before CMD, as
/// `etcdctl lock NAME CMD` takes it: clap finds CMD's first word unexpected, and the
/// message then says where the command goes.
///
/// A word that starts with `-` (`baton lock NAME -5`) is an unknown option there: clap's
/// tip, to put `--` before it, would make it the command, so that tip is dropped, and the
/// message says where the command goes (or keeps clap's tip of a similar option).
fn command_without_separator(args: &[OsString], e: &clap::Error) -> Option<CliError> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if e.kind() != ErrorKind::UnknownArgument {
        return None;
    }
    let Some(ContextValue::String(word)) = e.get(ContextKind::InvalidArg) else {
        return None;
    };
    let hyphen = word.starts_with('-');
    if !hyphen && args.iter().any(|a| a == "--") {
        return None;
    }
    let partial = Cli::command()
        .ignore_errors(true)
        .try_get_matches_from(args)
        .ok()?;
    let usage = match partial.subcommand()?.0 {
        "lock" => "baton lock NAME -- CMD",
        "elect" => "baton elect NAME VALUE -- CMD",
        "sem" => "baton sem NAME --permits N -- CMD",
        _ if hyphen => return stray_hyphen_word(args, e, word),
        _ => return None,
    };
    if hyphen {
        let line = usage_line(e);
        let tip = format!("; tip: to pass '{word}' as a value, use '-- {word}'");
        let (text, _) = line.split_once(&tip)?;
        if text.contains("tip:") {
            return Some(CliError::failed(format!("{text} (see baton --help)")));
        }
        let sub = usage.split(' ').take(2).collect::<Vec<_>>().join(" ");
        return Some(CliError::failed(format!(
            "{text}: not an option of '{sub}'; the command to run goes after '--': {usage} \
             (see baton --help)"
        )));
    }
    Some(CliError::failed(format!(
        "unexpected argument '{word}': the command to run goes after '--': {usage} (see baton --help)"
    )))
}

/// The error for a word that starts with `-` where a command that runs no CMD takes no
/// such option (`baton barrier NAME -5`): clap's tip, to pass it after `--`, is dropped
/// when the command line would not parse that way either.
fn stray_hyphen_word(args: &[OsString], e: &clap::Error, word: &str) -> Option<CliError> {
    let line = usage_line(e);
    let tip = format!("; tip: to pass '{word}' as a value, use '-- {word}'");
    let (text, _) = line.split_once(&tip)?;
    let at = args
        .iter()
        .position(|a| a.to_str().is_some_and(|a| a.starts_with(word)))?;
    let mut separated = args.to_vec();
    separated.insert(at, OsString::from("--"));
    if Cli::command().try_get_matches_from(&separated).is_ok() {
        // The tip works (`baton set k -- -5`): keep it.
        return None;
    }
    let (path, _) = subcommand_of(args)?;
    Some(CliError::failed(format!(
        "{text}: not an option of 'baton {path}' (see baton --help)"
    )))
}

/// A clap error on one line: its text up to the usage, without the `error: ` prefix, plus a
/// pointer to --help.
fn usage_line(e: &clap::Error) -> String {
    let rendered = e.render().to_string();
    let text = rendered
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .filter(|l| !l.is_empty())
        .fold(String::new(), |mut text, line| {
            if !text.is_empty() {
                text.push_str(if line.starts_with("tip:") { "; " } else { " " });
            }
            text.push_str(line);
            text
        });
    let text = text.strip_prefix("error: ").unwrap_or(&text);
    if text.is_empty() {
        "invalid arguments (see baton --help)".to_string()
    } else {
        format!("{text} (see baton --help)")
    }
}

/// True if `--endpoints` came from the command line or the environment, at any level.
fn endpoints_given(matches: &clap::ArgMatches) -> bool {
    let given = |m: &clap::ArgMatches| {
        matches!(
            m.value_source("endpoints"),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        )
    };
    given(matches) || matches.subcommand().is_some_and(|(_, sub)| given(sub))
}

/// Why `--timeout -5s` is refused.
const NEGATIVE: &str = "it cannot be negative";
/// Why `--timeout -0s` is refused.
const NO_SIGN: &str = "a duration is written without a sign";

/// A duration in humantime syntax: `500ms`, `10s`, `2m`, `1h 30m`.
pub(crate) fn duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    // As `--timeout -5s` is told (see `negative_value`), not humantime's "expected number
    // at 0".
    if let Some(rest) = s
        .strip_prefix('-')
        .filter(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
    {
        // `-0s` is no negative duration, but no duration is written with a sign.
        return Err(match humantime::parse_duration(rest) {
            Ok(d) if d.is_zero() => NO_SIGN.to_string(),
            _ => NEGATIVE.to_string(),
        });
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("{e} (write a duration such as 500ms, 10s or 2m)"))
}

/// A duration greater than zero.
/// An error if the command line ends with `--` and nothing after it (an empty `$CMD` in a
/// script): holding until a signal is what a command line without `--` asks for.
pub(crate) fn require_command_after_dash_dash(
    command: &[std::ffi::OsString],
) -> Result<(), CliError> {
    if command.is_empty() && std::env::args_os().last().is_some_and(|a| a == "--") {
        return Err(CliError::failed(
            "no command after `--` (to hold until a signal, leave out `--`)",
        ));
    }
    Ok(())
}

pub(crate) fn positive_duration(s: &str) -> Result<Duration, String> {
    match duration(s)? {
        d if d.is_zero() => Err("must be greater than zero".to_string()),
        d => Ok(d),
    }
}

/// A lock or election name: not empty, at most [`baton::MAX_NAME_LEN`] bytes. Checked
/// before connecting, so bad input never waits for the network.
pub(crate) fn name(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("the name is empty".to_string());
    }
    if s.len() > baton::MAX_NAME_LEN {
        return Err(format!(
            "the name is {} bytes long; the limit is {}",
            s.len(),
            baton::MAX_NAME_LEN
        ));
    }
    Ok(s.to_string())
}

/// TLS settings and credentials from the global options, checked; none for `mem://` (the
/// embedded store has no TLS or users: a $BATON_USER meant for etcd must not break `baton
/// demo`).
#[derive(Default)]
struct Security {
    tls: Option<baton::TlsConfig>,
    user: Option<(String, String)>,
    password: Option<String>,
    /// The endpoints to connect to, if not those given: with the credentials of the
    /// options in place of the URL's (see [`with_url_user`]). They may hold the URL's
    /// password, as the given ones did: the library redacts URLs wherever it shows them.
    endpoints: Option<String>,
}

impl Security {
    fn from_global(global: &Global, endpoints: &str) -> Result<Security, CliError> {
        let mut security = Security::default();
        if scheme(endpoints) == Some("mem") {
            return Ok(security);
        }
        if global.cacert.is_some() || global.cert.is_some() {
            let mut tls = baton::TlsConfig::new();
            if let Some(ca) = &global.cacert {
                tls = tls.with_ca_file(ca);
            }
            if let (Some(cert), Some(key)) = (&global.cert, &global.key) {
                tls = tls.with_client_cert(cert, key);
            }
            security.tls = Some(tls);
        }
        // As docs/security.md says, on every backend: the user of --user, else the URL's;
        // the password of --password-file or $BATON_PASSWORD, else the URL's.
        match (&global.user, password(global)?) {
            // The Redis builder lets a URL's credentials win over its options: take them
            // out of the URLs (keeping the URL's user when no --user replaces it).
            (user, Some(password)) if is_redis(endpoints) => {
                security.endpoints = Some(with_url_user(endpoints, user.as_deref(), true).0);
                security.password = Some(password);
            }
            // etcd's `with_user` replaces the URL's credentials.
            (Some(user), Some(password)) => security.user = Some((user.clone(), password)),
            (Some(user), None) => {
                // The user of the option, the password of the URL.
                let (rewritten, has_password) = with_url_user(endpoints, Some(user), false);
                if !has_password {
                    return Err(CliError::failed(format!(
                        "--user {user} needs a password: give it with --password-file FILE or \
                         $BATON_PASSWORD"
                    )));
                }
                security.endpoints = Some(rewritten);
            }
            // A URL's user without a password anywhere (etcd): say which options give it,
            // not the library's builder method.
            (None, None)
                if !is_redis(endpoints)
                    && endpoints.split(',').any(|e| !url_parts(e).1.is_empty())
                    && !with_url_user(endpoints, None, false).1 =>
            {
                return Err(CliError::failed(
                    "the user in --endpoints needs a password: give it with --password-file \
                     FILE or $BATON_PASSWORD",
                ));
            }
            // A password with no user to go with it (etcd): say where the password came
            // from, which an operator who exported $BATON_PASSWORD for another cluster may
            // not think of.
            (None, Some(_))
                if !is_redis(endpoints)
                    && endpoints.split(',').all(|e| url_parts(e).1.is_empty()) =>
            {
                let source = if global.password_file.is_some() {
                    "--password-file is given"
                } else {
                    "$BATON_PASSWORD is set"
                };
                return Err(CliError::failed(format!(
                    "{source} but no user is named: give --user NAME (or $BATON_USER), or \
                     leave the password out (a client certificate needs none)"
                )));
            }
            (None, password) => security.password = password,
        }
        Ok(security)
    }
}

/// `endpoints` with the credentials of each URL of the list (`user:password@` after the
/// scheme, on every entry: `redlock://` masters after the first may have their own) made to
/// follow the options: `user` (if any) replaces each URL's user, and with `drop_password`
/// (a password option is given, to be handed to the builder) each URL's password is
/// removed. An entry left with no password keeps its credentials as they were (the members
/// of one etcd cluster must agree). Also true if some entry keeps a password of its URL.
fn with_url_user(endpoints: &str, user: Option<&str>, drop_password: bool) -> (String, bool) {
    let mut has_password = false;
    let entries: Vec<String> = endpoints
        .split(',')
        .map(|entry| {
            let (scheme, url_user, url_password, host) = url_parts(entry);
            let password = if drop_password { "" } else { url_password };
            if user.is_some() && password.is_empty() && !drop_password {
                return entry.to_string();
            }
            has_password |= !password.is_empty();
            let user = user.map_or_else(|| url_user.to_string(), percent_encode);
            match (user.is_empty(), password.is_empty()) {
                (true, true) => format!("{scheme}{host}"),
                (_, true) => format!("{scheme}{user}@{host}"),
                _ => format!("{scheme}{user}:{password}@{host}"),
            }
        })
        .collect();
    (entries.join(","), has_password)
}

/// One entry of `--endpoints`, split: the scheme with its `://` (empty for a Redlock
/// master after the first that has none; `redlock://rediss://` for a first master with its
/// own scheme, which the library accepts, as it does on the others), the user and the
/// password of the URL (empty if none), and the rest (host, port, path).
fn url_parts(entry: &str) -> (&str, &str, &str, &str) {
    let (mut scheme, mut rest) = match entry.split_once("://") {
        Some((scheme, rest)) => (&entry[..scheme.len() + 3], rest),
        None => ("", entry),
    };
    // The first Redlock master's own scheme belongs to the scheme: read as a user, it
    // made a `rediss://` master plaintext (and sent its password in clear).
    // Spaces before it and its case do not matter, as to the library.
    if scheme.trim_start().eq_ignore_ascii_case("redlock://") {
        let spaces = rest.len() - rest.trim_start().len();
        let inner = &rest[spaces..];
        if let Some(len) = ["rediss://", "redis://"].into_iter().find_map(|s| {
            inner
                .get(..s.len())
                .filter(|p| p.eq_ignore_ascii_case(s))
                .map(|_| s.len())
        }) {
            scheme = &entry[..scheme.len() + spaces + len];
            rest = &inner[len..];
        }
    }
    let (info, host) = rest.rsplit_once('@').unwrap_or(("", rest));
    let (user, password) = info.split_once(':').unwrap_or((info, ""));
    (scheme, user, password, host)
}

/// `s` with every byte but letters, digits and `-._~` percent-encoded, for a URL's user.
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `$builder` (a `ClientBuilder` or a `CoordinatorBuilder`, which share these methods) with
/// the TLS settings and credentials of `$security`.
macro_rules! apply_security {
    ($builder:expr, $security:expr) => {{
        let (mut builder, security) = ($builder, $security);
        if let Some(tls) = security.tls {
            builder = builder.with_tls(tls);
        }
        if let Some((user, password)) = security.user {
            builder = builder.with_user(user, password);
        }
        if let Some(password) = security.password {
            builder = builder.with_password(password);
        }
        builder
    }};
}

/// The scheme of the (first) endpoint URL, if it has one.
fn scheme(endpoints: &str) -> Option<&str> {
    endpoints.trim().split_once("://").map(|(scheme, _)| scheme)
}

/// True for `redis://`, `rediss://` and `redlock://` endpoints.
pub(crate) fn is_redis(endpoints: &str) -> bool {
    matches!(scheme(endpoints), Some("redis" | "rediss" | "redlock"))
}

/// The refusal of `mem://` for a command other than `demo` and `bench`: the embedded store
/// lives in this one process, so what a command writes there no other process sees (a
/// lock excludes nobody, a barrier of 2 is never met, a key set is gone at exit). Checked
/// when connecting, so that bad input is told first.
fn refuse_embedded(global: &Global, endpoints: &str) -> Result<(), CliError> {
    if scheme(endpoints) == Some("mem") && !global.embedded_allowed {
        return Err(CliError::failed(
            "mem:// is a store inside this one baton process: nothing in it is shared with \
             other processes, and it is gone when baton exits; use etcd (http://, https://, \
             etcd://) or, for lock, elect, observe, leader and status, Redis (redis://, \
             rediss://, redlock://); mem:// serves baton demo, baton bench and the library",
        ));
    }
    Ok(())
}

/// Connect to the store named by `--endpoints` (etcd; the embedded store for `demo` and
/// `bench`), within `--dial-timeout`. Redis has no store: commands that work on Redis use
/// [`coordinator`].
pub(crate) async fn connect(global: &Global, endpoints: &str) -> Result<baton::Client, CliError> {
    tracing::debug!(dial_timeout = ?global.dial_timeout, "connecting");
    if is_redis(endpoints) {
        return Err(CliError::failed(format!(
            "{}:// endpoints have no key-value store, which this command needs: use etcd \
             (http://, https://, etcd://); on Redis, baton supports lock, elect, observe, \
             leader, status and bench",
            scheme(endpoints).unwrap_or("redis")
        )));
    }
    refuse_embedded(global, endpoints)?;
    let mut security = Security::from_global(global, endpoints)?;
    let rewritten = security.endpoints.take();
    let builder = baton::Client::builder(rewritten.as_deref().unwrap_or(endpoints))
        .with_dial_timeout(global.dial_timeout)
        .with_namespace(global.namespace.clone());
    apply_security!(builder, security)
        .connect()
        .await
        .map_err(CliError::failed)
}

/// Connect to any backend named by `--endpoints` (etcd, Redis, Redlock; the embedded store
/// for `demo` and `bench`) within `--dial-timeout`; on etcd and the embedded store, start a
/// session with this TTL; on Redis, it is each lock's expiry.
pub(crate) async fn coordinator(
    global: &Global,
    ttl: Duration,
) -> Result<baton::Coordinator, CliError> {
    coordinator_fifo(global, ttl, true).await
}

/// [`coordinator`], with lock waiters queueing on one Redis (`fifo`) or not.
pub(crate) async fn coordinator_fifo(
    global: &Global,
    ttl: Duration,
    fifo: bool,
) -> Result<baton::Coordinator, CliError> {
    tracing::debug!(dial_timeout = ?global.dial_timeout, "connecting");
    refuse_embedded(global, &global.endpoints)?;
    let mut security = Security::from_global(global, &global.endpoints)?;
    let rewritten = security.endpoints.take();
    let builder = baton::Coordinator::builder(rewritten.as_deref().unwrap_or(&global.endpoints))
        .with_ttl(ttl)
        .with_dial_timeout(global.dial_timeout)
        .with_namespace(global.namespace.clone());
    let builder = if fifo {
        builder
    } else {
        builder.without_fifo()
    };
    apply_security!(builder, security)
        .connect()
        .await
        .map_err(CliError::from)
}

/// `--endpoints` for code that talks to Redis without a Baton client (the bench's own
/// connections, the rslock peer), with the credentials in each URL in the order
/// docs/security.md gives, as the Baton client gets them: the user of `--user`, else the
/// URL's; the password of `--password-file` or `$BATON_PASSWORD`, else the URL's.
pub(crate) fn redis_endpoints(global: &Global) -> Result<String, CliError> {
    let endpoints = &global.endpoints;
    Ok(match (&global.user, password(global)?) {
        (user, Some(password)) => with_password(endpoints, user.as_deref(), &password),
        (Some(user), None) => with_url_user(endpoints, Some(user), false).0,
        (None, None) => endpoints.clone(),
    })
}

/// `endpoints` with `password` in every URL of the list, and `user` (if any) in place of
/// each URL's user.
fn with_password(endpoints: &str, user: Option<&str>, password: &str) -> String {
    endpoints
        .split(',')
        .map(|entry| {
            let (scheme, url_user, _, host) = url_parts(entry);
            let user = user.map_or_else(|| url_user.to_string(), percent_encode);
            format!("{scheme}{user}:{}@{host}", percent_encode(password))
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The password from --password-file, else $BATON_PASSWORD (if not empty). Never printed.
fn password(global: &Global) -> Result<Option<String>, CliError> {
    if let Some(path) = &global.password_file {
        let text = std::fs::read_to_string(path).map_err(|e| {
            CliError::failed(format!(
                "cannot read the password file {}: {e}",
                path.display()
            ))
        })?;
        let first = text.lines().next().unwrap_or_default();
        if first.is_empty() {
            return Err(CliError::failed(format!(
                "the password file {} is empty",
                path.display()
            )));
        }
        return Ok(Some(first.to_string()));
    }
    Ok(std::env::var("BATON_PASSWORD")
        .ok()
        .filter(|p| !p.is_empty()))
}

/// A session's TTL in range ([`baton::MIN_TTL`] to [`baton::MAX_TTL`]), checked before
/// connecting (as `lock` and `elect` check theirs), so bad input never waits for the network.
pub(crate) fn session_ttl(ttl: Duration) -> Result<(), CliError> {
    if ttl < baton::MIN_TTL {
        return Err(CliError::failed(format!(
            "invalid argument: ttl {} is below the minimum of {}",
            crate::output::duration(ttl),
            crate::output::duration(baton::MIN_TTL)
        )));
    }
    if ttl > baton::MAX_TTL {
        return Err(CliError::failed(format!(
            "invalid argument: ttl {} is above the maximum of {}",
            crate::output::duration(ttl),
            crate::output::duration(baton::MAX_TTL)
        )));
    }
    Ok(())
}

/// Start a session (a lease kept alive) with this TTL.
pub(crate) async fn session(
    client: &baton::Client,
    ttl: Duration,
) -> Result<baton::Session, CliError> {
    baton::Session::builder(client)
        .with_ttl(ttl)
        .build()
        .await
        .map_err(CliError::from)
}

/// How long releasing (unlock, resign, revoke) may take before `baton` gives up and lets
/// the lease expire.
pub(crate) const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long closing may take after a wait that got nothing (`--timeout` passed, `--try`
/// found the lock held): nothing is held then, only the waiter's key is left to remove, and
/// the user asked for an answer by a deadline. If the backend does not answer in time, the
/// key goes with the lease (at most the TTL later), and a line on stderr says so.
pub(crate) const CLEANUP_TIMEOUT: Duration = Duration::from_secs(1);

/// Close a coordinator (on etcd, revoking its session's lease, which deletes its keys; on
/// Redis, releasing what it holds), within [`RELEASE_TIMEOUT`]; a failure is only traced,
/// since the lease (or the keys' TTL) expires anyway.
pub(crate) async fn close_coordinator(coordinator: &baton::Coordinator) {
    close_within(RELEASE_TIMEOUT, coordinator.close()).await;
}

/// Close a session (revoking its lease, which deletes its keys), within
/// [`RELEASE_TIMEOUT`]; a failure is only traced, since the lease expires anyway.
pub(crate) async fn close(session: &baton::Session) {
    close_within(RELEASE_TIMEOUT, session.close()).await;
}

/// Run `closing` (a coordinator's or a session's close) within `budget`; false if it failed
/// or timed out (only traced: what it would remove expires anyway).
async fn close_within(
    budget: Duration,
    closing: impl std::future::Future<Output = baton::Result<()>>,
) -> bool {
    match tokio::time::timeout(budget, closing).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "closing failed; what it holds expires");
            false
        }
        Err(_) => {
            tracing::warn!("closing timed out; what it holds expires");
            false
        }
    }
}

/// Close after a wait (`lock`, `elect`, `sem`, `barrier`) ended with `result`, by `closing`, and return
/// the result to exit with. Within [`RELEASE_TIMEOUT`], or within [`CLEANUP_TIMEOUT`] if
/// nothing was acquired (exit 124: only our waiter key is left, and the user asked for an
/// answer by a deadline) or the hold was lost (exit 122: its lease is gone or about to
/// expire, and a backend we were cut off from would make the exit wait the whole
/// [`RELEASE_TIMEOUT`] after CMD is gone). If that cleanup does not finish, the result's error is printed,
/// then a line saying that our place in the queue expires by itself: within the TTL on
/// etcd (it is a key of our lease), the waiter window on Redis (three fallback polls).
pub(crate) async fn close_after_wait<F>(
    result: Result<u8, CliError>,
    global: &Global,
    ttl: Duration,
    closing: F,
) -> Result<u8, CliError>
where
    F: std::future::Future<Output = baton::Result<()>>,
{
    let not_acquired = matches!(&result, Err(e) if e.code() == crate::exit::NOT_ACQUIRED);
    let lost = matches!(&result, Err(e) if e.code() == crate::exit::LOST);
    let budget = if not_acquired || lost {
        CLEANUP_TIMEOUT
    } else {
        RELEASE_TIMEOUT
    };
    let closed = close_within(budget, closing).await;
    match result {
        Err(e) if !closed && not_acquired => {
            e.report();
            let expiry = if is_redis(&global.endpoints) {
                3 * baton::redis::DEFAULT_POLL_INTERVAL
            } else {
                ttl
            };
            crate::output::notice(&format!(
                "the backend did not confirm within {} that our place in the queue was \
                 removed; it expires by itself within {}",
                crate::output::duration(CLEANUP_TIMEOUT),
                crate::output::duration(expiry)
            ));
            Err(CliError::quiet(e.code()))
        }
        result => result,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn the_user_option_replaces_each_urls_user() {
        let rewrite = |e: &str, u: Option<&str>, drop: bool| with_url_user(e, u, drop);
        assert_eq!(
            rewrite("http://app:pw@h:1,http://app:pw@h:2", Some("root"), false),
            ("http://root:pw@h:1,http://root:pw@h:2".into(), true)
        );
        assert_eq!(
            rewrite("http://h:1", Some("root"), false),
            ("http://h:1".into(), false)
        );
        assert_eq!(
            rewrite("redis://:pw@h:1/2", Some("a@b:c"), false),
            ("redis://a%40b%3Ac:pw@h:1/2".into(), true)
        );
        assert_eq!(
            rewrite("redlock://u:1@a:1, redis://:2@b:2,rediss://c:3", None, true),
            ("redlock://u@a:1, redis://b:2,rediss://c:3".into(), false)
        );
        assert_eq!(
            rewrite("redlock://u:1@a:1,b:2", Some("v"), true),
            ("redlock://v@a:1,v@b:2".into(), false)
        );
    }

    /// The first Redlock master may carry its own scheme (`redlock://rediss://…`): it is
    /// kept, not taken for a user (which turned a TLS master into a plaintext one).
    #[test]
    fn redlock_first_master_with_scheme() {
        assert_eq!(
            with_url_user(
                "redlock://rediss://a:1,rediss://b:2,rediss://c:3",
                Some("app"),
                true
            )
            .0,
            "redlock://rediss://app@a:1,rediss://app@b:2,rediss://app@c:3"
        );
        assert_eq!(
            with_url_user(
                "redlock://redis://app:pw@a:1,redis://app:pw@b:2,redis://app:pw@c:3",
                Some("app"),
                false
            )
            .0,
            "redlock://redis://app:pw@a:1,redis://app:pw@b:2,redis://app:pw@c:3"
        );
        assert_eq!(
            with_password("redlock://rediss://u:x@a:1,rediss://b:2,c:3", None, "p@"),
            "redlock://rediss://u:p%40@a:1,rediss://:p%40@b:2,:p%40@c:3"
        );
        assert_eq!(
            with_password("redlock://redis://a:1,b:2,c:3", Some("app"), "p"),
            "redlock://redis://app:p@a:1,app:p@b:2,app:p@c:3"
        );
        // Spaces before the first master's scheme, and its case, do not make it a user.
        assert_eq!(
            with_url_user(
                "redlock:// rediss://app@a:1,rediss://app@b:2,rediss://app@c:3",
                None,
                true
            )
            .0,
            "redlock:// rediss://app@a:1,rediss://app@b:2,rediss://app@c:3"
        );
        assert_eq!(
            with_url_user(
                "redlock://REDISS://a:1,rediss://b:2,rediss://c:3",
                Some("app"),
                true
            )
            .0,
            "redlock://REDISS://app@a:1,rediss://app@b:2,rediss://app@c:3"
        );
        assert_eq!(
            with_url_user("redlock://rediss://u:p@a:1,b:2,c:3", None, true),
            ("redlock://rediss://u@a:1,b:2,c:3".into(), false)
        );
    }

    #[test]
    fn durations() {
        assert_eq!(duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(duration("2m"), Ok(Duration::from_secs(120)));
        assert!(duration("10").is_err());
        assert!(duration("soon").is_err());
        assert!(positive_duration("0s").is_err());
    }

    #[test]
    fn names() {
        assert!(name("").is_err());
        assert!(name(&"x".repeat(baton::MAX_NAME_LEN + 1)).is_err());
        assert_eq!(name("jobs/nightly"), Ok("jobs/nightly".to_string()));
    }

    #[test]
    fn usage_errors_are_one_line_with_code_125() {
        let err = parse(["baton", "lock"]).unwrap_err();
        assert_eq!(err.code(), exit::FAILED);
        let err = parse(["baton", "lock", "x", "--ttl", "soon"]).unwrap_err();
        assert_eq!(err.code(), exit::FAILED);
        let err = parse(["baton", "lock", ""]).unwrap_err();
        assert_eq!(err.code(), exit::FAILED);
    }

    #[test]
    fn endpoints_source_is_recorded() {
        let cli = parse(["baton", "demo"]).unwrap();
        assert!(!cli.global.endpoints_given || std::env::var_os("BATON_ENDPOINTS").is_some());
        let cli = parse(["baton", "demo", "--endpoints", "mem://x"]).unwrap();
        assert!(cli.global.endpoints_given);
        let cli = parse(["baton", "--endpoints", "mem://x", "demo"]).unwrap();
        assert!(cli.global.endpoints_given);
    }

    #[test]
    fn security_options() {
        let cli = parse([
            "baton",
            "--user",
            "app",
            "--cacert",
            "ca.pem",
            "--namespace",
            "team-a/",
            "status",
        ])
        .unwrap();
        assert_eq!(cli.global.user.as_deref(), Some("app"));
        assert_eq!(cli.global.namespace, "team-a/");
        // --cert and --key go together.
        assert!(parse(["baton", "--cert", "c.pem", "status"]).is_err());
        assert!(parse(["baton", "--cert", "c.pem", "--key", "k.pem", "status"]).is_ok());
    }

    #[test]
    fn command_after_double_dash() {
        let cli = parse([
            "baton", "lock", "n", "--ttl", "5s", "--", "sh", "-c", "exit 3",
        ])
        .unwrap();
        let Command::Lock(args) = cli.command else {
            panic!("not lock")
        };
        assert_eq!(args.command, ["sh", "-c", "exit 3"]);
    }

    /// A free-form VALUE may start with `-` (a negative number, `-x`): it is taken as the
    /// value, while options before and after it, and `-- CMD`, still parse.
    #[test]
    fn values_may_start_with_a_hyphen() {
        let elect = |argv: &[&str]| -> elect::Args {
            let cli = parse(argv.iter().copied()).unwrap_or_else(|e| panic!("{argv:?}: {e:?}"));
            let Command::Elect(args) = cli.command else {
                panic!("not elect")
            };
            args
        };
        let args = elect(&["baton", "elect", "x", "-5", "--", "true"]);
        assert_eq!(args.value, "-5");
        assert_eq!(args.command, ["true"]);
        let args = elect(&[
            "baton",
            "elect",
            "--timeout",
            "1m",
            "x",
            "-v",
            "--ttl",
            "5s",
            "--json",
            "--",
            "sh",
            "-c",
            "exit 3",
        ]);
        assert_eq!(args.value, "-v");
        assert_eq!(args.timeout, Some(Duration::from_secs(60)));
        assert_eq!(args.ttl, Duration::from_secs(5));
        assert_eq!(args.command, ["sh", "-c", "exit 3"]);
        let args = elect(&["baton", "elect", "x", "--timeout=2s", "-"]);
        assert_eq!(args.value, "-");
        assert_eq!(args.timeout, Some(Duration::from_secs(2)));
        assert!(args.command.is_empty());
        // One that starts with `--` is taken for a misspelt option (see
        // a_value_like_an_option_is_refused).
        assert!(parse(["baton", "elect", "x", "--timeout=2s", "--not-an-option"]).is_err());
        // `--` before VALUE still starts CMD: VALUE is then missing.
        assert!(parse(["baton", "elect", "x", "--", "-5"]).is_err());

        let cli = parse(["baton", "set", "k", "-1", "--if-revision", "3"]).unwrap();
        let Command::Set(args) = cli.command else {
            panic!("not set")
        };
        assert_eq!(
            (args.value.as_deref(), args.if_revision),
            (Some("-1"), Some(3))
        );
        let cli = parse(["baton", "queue", "push", "q", "-json-ish", "--json"]).unwrap();
        assert!(cli.global.json);
        let Command::Queue(queue::Args {
            command: queue::QueueCommand::Push { value, .. },
        }) = cli.command
        else {
            panic!("not queue push")
        };
        assert_eq!(value.as_deref(), Some("-json-ish"));
    }

    /// A VALUE that starts with `--` is a misspelt option unless it comes after `--`: it
    /// is refused (naming the option meant), also when the words after it then fail to
    /// parse; after `--` (set, queue push) it is the value.
    #[test]
    fn a_value_like_an_option_is_refused() {
        let refused = |argv: &[&str]| -> String {
            match parse(argv.iter().copied()) {
                Ok(cli) => panic!("{argv:?} parsed: {cli:?}"),
                Err(e) => {
                    assert_eq!(e.code(), 125, "{argv:?}");
                    e.message().unwrap_or_default().to_string()
                }
            }
        };
        let msg = refused(&["baton", "set", "k", "--if-revison=0"]);
        assert!(msg.contains("did you mean '--if-revision'?"), "{msg}");
        assert!(msg.contains("baton set KEY -- VALUE"), "{msg}");
        let msg = refused(&["baton", "set", "k", "--if-revison=0", "v"]);
        assert!(msg.contains("'--if-revison'"), "{msg}");
        assert!(!msg.contains("'v'"), "{msg}");
        let msg = refused(&["baton", "elect", "x", "--timout=1s", "--", "true"]);
        assert!(msg.contains("did you mean '--timeout'?"), "{msg}");
        let msg = refused(&["baton", "queue", "push", "q", "--jsn"]);
        assert!(msg.contains("did you mean '--json'?"), "{msg}");
        assert!(msg.contains("baton queue push NAME -- VALUE"), "{msg}");

        let cli = parse(["baton", "set", "k", "--", "--if-revison=0"]).unwrap();
        let Command::Set(args) = cli.command else {
            panic!("not set")
        };
        assert_eq!(
            (args.value.as_deref(), args.if_revision),
            (Some("--if-revison=0"), None)
        );
        let cli = parse(["baton", "queue", "push", "--", "q", "--jsn"]).unwrap();
        assert!(!cli.global.json);
        let Command::Queue(queue::Args {
            command: queue::QueueCommand::Push { value, .. },
        }) = cli.command
        else {
            panic!("not queue push")
        };
        assert_eq!(value.as_deref(), Some("--jsn"));
    }
}
