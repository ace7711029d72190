//! `mailroom keys generate`: a fresh sealing key line.

use anyhow::Context as _;
use clap::Subcommand;
use mailroom_core::seal::SealKey;
use time::OffsetDateTime;

/// `mailroom keys ...`
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Print a fresh `kid:base64` key line for MAILROOM__SEAL__KEYS or a keys file.
    Generate {
        /// Key id; `k` and today's date when not given (e.g. `k20261123`).
        #[arg(long, value_name = "NAME")]
        kid: Option<String>,
    },
}

/// Runs a `keys` subcommand.
pub fn run(command: &KeysCommand) -> anyhow::Result<()> {
    match command {
        KeysCommand::Generate { kid } => {
            let kid = kid.clone().unwrap_or_else(default_kid);
            let key = SealKey::generate(&kid)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("--kid {kid:?}"))?;
            // The key goes to stdout alone, so it can be piped into a secret store.
            println!("{}", key.to_line().as_str());
            eprintln!(
                "mailroom: new key {kid}: add the line to MAILROOM__SEAL__KEYS (comma separated) or to the keys file, then set MAILROOM__SEAL__ACTIVE={kid} on every producer once every worker has it"
            );
            Ok(())
        }
    }
}

fn default_kid() -> String {
    let today = OffsetDateTime::now_utc().date();
    format!(
        "k{:04}{:02}{:02}",
        today.year(),
        u8::from(today.month()),
        today.day()
    )
}
