//! `baton observe NAME`: print every leader change and proclaimed value.

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

The first line is the current leader, if there is one. Lines follow as leaders change or
proclaim new values, until SIGINT or SIGTERM (exit 0).";

/// `baton observe`.
#[derive(Debug, clap::Args)]
#[command(after_help = EXAMPLES)]
pub(crate) struct Args {
    /// The election's name.
    #[arg(value_parser = cli::name)]
    pub(crate) name: String,
}

/// Run `baton observe`.
pub(crate) async fn run(global: &Global, args: Args) -> Result<u8, CliError> {
    let out = Output::new(global.json);
    let mut signals = Signals::new()?;
    let client = signals
        .interruptible(cli::connect(global, &global.endpoints))
        .await?;
    let mut leaders = baton::Election::observe_with(&client, &args.name)?;
    loop {
        tokio::select! {
            leader = leaders.next() => {
                let Some(leader) = leader else {
                    if let Some(e) = leaders.take_error() {
                        return Err(CliError::failed(e));
                    }
                    return Err(CliError::failed("observing the election ended unexpectedly"));
                };
                if print_leader(&out, &args.name, &leader).is_err() {
                    // stdout is closed: nobody is reading any more.
                    return Ok(0);
                }
            }
            _ = signals.recv() => return Ok(0),
        }
    }
}

/// One leader line (shared with `baton leader --json`).
pub(crate) fn leader_json(name: &str, leader: &baton::Leader) -> serde_json::Value {
    json!({
        "event": "leader",
        "name": name,
        "value": leader.value_str(),
        "key": leader.key,
        "revision": leader.mod_revision,
        "fencing_token": leader.create_revision,
        "lease": crate::output::lease_hex(leader.lease),
    })
}

fn print_leader(out: &Output, name: &str, leader: &baton::Leader) -> std::io::Result<()> {
    out.emit(
        &format!(
            "{} (key {}, revision {}, token {})",
            leader.value_str(),
            leader.key,
            leader.mod_revision,
            leader.create_revision
        ),
        &leader_json(name, leader),
    )
}
