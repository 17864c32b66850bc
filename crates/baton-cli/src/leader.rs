//! `baton leader NAME`: print the current leader's value.

use crate::cli::{self, Global};
use crate::exit::{self, CliError};
use crate::observe::leader_json;
use crate::output::Output;

const EXAMPLES: &str = "\
Examples:
  baton leader scheduler                 # prints e.g. 10.0.0.7:8080
  curl \"http://$(baton leader scheduler)/status\"
  baton --json leader scheduler          # value, key, revision, fencing token, lease

Exits 1 with a message on stderr if the election has no leader.

On etcd a lock and an election of one name share their keys (the layout of Go's
concurrency package and of etcdctl): the holder of `baton lock NAME` is NAME's leader,
with an empty value. On Redis an election's leader is only a candidate that `elect`ed.";

/// `baton leader`.
#[derive(Debug, clap::Args)]
#[command(after_help = EXAMPLES)]
pub(crate) struct Args {
    /// The election's name.
    #[arg(value_parser = cli::name)]
    pub(crate) name: String,
}

/// Run `baton leader`.
pub(crate) async fn run(global: &Global, args: Args) -> Result<u8, CliError> {
    let out = Output::new(global.json);
    let redis = cli::is_redis(&global.endpoints);
    let leader = if redis {
        let coordinator = cli::coordinator(global, baton::DEFAULT_TTL).await?;
        let leader = coordinator.election(&args.name)?.leader().await;
        cli::close_coordinator(&coordinator).await;
        leader
    } else {
        let client = cli::connect(global, &global.endpoints).await?;
        baton::Election::leader_with(&client, &args.name).await
    };
    match leader {
        Ok(leader) => {
            // The value as is (it may not be UTF-8), then a newline, as `baton get`.
            let printed = if out.is_json() {
                out.json_line(&leader_json(&args.name, &leader, redis))
            } else {
                let mut value = leader.value.clone();
                value.push(b'\n');
                crate::queue::write_stdout(&value)
            };
            printed.map_err(|e| crate::output::not_written(None, &e))?;
            Ok(0)
        }
        Err(baton::Error::NoLeader { .. }) => Err(CliError::new(
            exit::NO_LEADER,
            format!("election {:?} has no leader", args.name),
        )),
        Err(e) => Err(CliError::failed(e)),
    }
}
