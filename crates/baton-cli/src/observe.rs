//! `baton observe NAME`: print every leader change and proclaimed value.

use baton::LeaderEvent;
use futures::StreamExt;
use serde_json::json;

use crate::cli::{self, Global};
use crate::exit::CliError;
use crate::output::Output;
use crate::supervisor::Signals;

const EXAMPLES: &str = "\
Examples:
  baton observe scheduler
  baton --json observe scheduler | jq -r .value

Each line shows the value, the leader's key, the revision of the change and the leader's
fencing token (its key's create revision):
  10.0.0.7:8080 (key scheduler/694d7f3a2c1b, revision 12, token 10)

On Redis, the revision counts the values published in the leader's term, and the token is
the lock's counter (`none` on redlock://).

Control characters in the value are shown escaped (\\n, \\t, \\x1b...): one line per
change; --json gives them exactly.

The first line is the current leader, if there is one. Lines follow as leaders change or
proclaim new values; a leader that leaves with no candidate waiting prints nothing (as Go's
Observe): the last line names it until the next leader comes. With --vacancies, a line
`no leader` (with --json, an object with \"event\": \"no_leader\") says so instead: when
observe starts with no leader, and each time a leader leaves with no candidate to follow
it at once (on Redis, where candidates do not queue, also between a leader that resigns and
the one that takes over).

observe runs until SIGINT or SIGTERM (exit 0), or until the reader closes the pipe (exit 0;
another failure to write exits 125).
Failures are retried (a line on stderr says when observing stops working, and another when
it works again), except one that retrying cannot fix (permission denied: the etcd role or
Redis ACL does not cover the election; on redlock://, on so many masters that no quorum can
answer): it ends observe with 125 and the error on stderr.";

/// How often `baton observe` checks whether observing fails (and says so on stderr).
const OUTAGE_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// `baton observe`.
#[derive(Debug, clap::Args)]
#[command(after_help = EXAMPLES)]
pub(crate) struct Args {
    /// The election's name.
    #[arg(value_parser = cli::name)]
    pub(crate) name: String,

    /// Also print a line `no leader` when there is none: at the start, and each time a
    /// leader leaves with no candidate to follow it.
    #[arg(long)]
    pub(crate) vacancies: bool,
}

/// Run `baton observe`: until a signal, an error, or the reader of stdout is gone.
pub(crate) async fn run(global: &Global, args: Args) -> Result<u8, CliError> {
    crate::output::until_reader_gone(|connected| follow(global, args, connected)).await
}

/// Print every leader change until a signal or an error.
async fn follow(
    global: &Global,
    args: Args,
    connected: crate::output::Connected,
) -> Result<u8, CliError> {
    let out = Output::new(global.json);
    let mut signals = Signals::new()?;
    let redis = cli::is_redis(&global.endpoints);
    // On etcd, observing needs only a client, no session (no lease); on Redis, the
    // coordinator holds no session either. It is kept alive while observing.
    // Without --vacancies, the plain streams: they also skip a leader read again after a
    // vacancy (on Redlock, a read that could not tell), which is no news to them.
    let (mut events, _coordinator) = if redis {
        let coordinator = signals
            .interruptible(cli::coordinator(global, baton::DEFAULT_TTL))
            .await?;
        let leaders = coordinator.election(&args.name)?.observe();
        let events = if args.vacancies {
            Events::Vacancies(leaders.with_vacancies())
        } else {
            Events::Redis(leaders)
        };
        (events, Some(coordinator))
    } else {
        let client = signals
            .interruptible(cli::connect(global, &global.endpoints))
            .await?;
        let leaders = baton::Election::observe_with(&client, &args.name)?;
        let events = if args.vacancies {
            Events::Vacancies(leaders.with_vacancies())
        } else {
            Events::Etcd(leaders)
        };
        (events, None)
    };
    connected.now();
    // Observing retries by itself; tell the operator when it stops working, and when it
    // works again.
    let mut outage = crate::output::Outage::new("observe");
    let mut check = tokio::time::interval(OUTAGE_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = check.tick() => match events.retrying() {
                Some(e) => outage.failing(&e),
                None => outage.working(),
            },
            event = events.next() => {
                let Some(event) = event else {
                    if let Some(e) = events.take_error() {
                        return Err(CliError::failed(e));
                    }
                    return Err(CliError::failed("observing the election ended unexpectedly"));
                };
                let printed = match event {
                    LeaderEvent::Leader(leader) => print_leader(&out, &args.name, &leader, redis),
                    LeaderEvent::Vacant => out.emit(
                        "no leader",
                        &json!({"event": "no_leader", "name": args.name}),
                    ),
                    _ => Ok(()),
                };
                if let Err(e) = printed {
                    return crate::output::follow_ended(&e);
                }
            }
            _ = signals.recv() => return Ok(0),
        }
    }
}

/// What observe follows: the leaders, on either family, or the events with vacancies.
enum Events {
    Etcd(baton::Observe),
    Redis(baton::coordinator::LeaderStream),
    Vacancies(baton::LeaderEvents),
}

impl Events {
    async fn next(&mut self) -> Option<LeaderEvent> {
        match self {
            Events::Etcd(s) => s.next().await.map(LeaderEvent::Leader),
            Events::Redis(s) => s.next().await.map(LeaderEvent::Leader),
            Events::Vacancies(s) => s.next().await,
        }
    }

    fn take_error(&mut self) -> Option<baton::Error> {
        match self {
            Events::Etcd(s) => s.take_error(),
            Events::Redis(s) => s.take_error(),
            Events::Vacancies(s) => s.take_error(),
        }
    }

    fn retrying(&self) -> Option<String> {
        match self {
            Events::Etcd(s) => s.retrying(),
            Events::Redis(s) => s.retrying(),
            Events::Vacancies(s) => s.retrying(),
        }
    }
}

/// One leader line (shared with `baton leader --json`). On Redis, `revision` counts the
/// values published in the leader's term, the token is the lock's counter (none on
/// Redlock, which reports 0), and there is no lease.
pub(crate) fn leader_json(name: &str, leader: &baton::Leader, redis: bool) -> serde_json::Value {
    let token = (!redis || leader.create_revision > 0).then_some(leader.create_revision);
    let lease = (!redis).then(|| crate::output::lease_hex(leader.lease));
    // A value that is not UTF-8 comes as value_base64, as in every --json output.
    crate::output::with_bytes(
        json!({
            "event": "leader",
            "name": name,
            "value": null,
            "key": leader.key,
            "revision": leader.mod_revision,
            "fencing_token": token,
            "lease": lease,
        }),
        "value",
        &leader.value,
    )
}

fn print_leader(
    out: &Output,
    name: &str,
    leader: &baton::Leader,
    redis: bool,
) -> std::io::Result<()> {
    let token = match (redis, leader.create_revision) {
        (true, 0) => "none".to_string(),
        (_, token) => token.to_string(),
    };
    out.emit(
        &format!(
            "{} (key {}, revision {}, token {token})",
            crate::output::escape_controls(&leader.value_str()),
            crate::output::escape_controls(&leader.key),
            leader.mod_revision,
        ),
        &leader_json(name, leader, redis),
    )
}
