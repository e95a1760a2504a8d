//! `covd token create|list|revoke`: the daemon's access tokens, in its data directory.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use covd::auth::{NewToken, Scope, TOKENS_FILE, TokenStore};
use covd::persist::records::TokenRecord;

use super::{Failure, bad_input};

#[derive(Debug, Args)]
pub(super) struct TokenArgs {
    #[command(subcommand)]
    command: TokenCommand,
    /// The daemon's data directory, where its tokens are kept (`tokens.sqlite3`).
    #[arg(
        long,
        env = "COVD_DATA_DIR",
        default_value = "covd-data",
        global = true
    )]
    data_dir: PathBuf,
    /// The token store itself, when the daemon was given one (`covd serve --tokens FILE`).
    #[arg(long, global = true)]
    tokens: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Make a token and print it, once, alone on standard output; only its hash is kept.
    Create(CreateArgs),
    /// Every token: its id, scope, projects, run, and whether it expired or was revoked.
    List,
    /// Revoke a token (by its id, or the whole token): the daemon refuses it from its next
    /// call on.
    Revoke {
        /// The token's id (`covd_<id>_…`), as `list` shows it.
        id: String,
    },
}

#[derive(Debug, Args)]
struct CreateArgs {
    /// The projects it reaches: a name (`acme/shop`) or a glob (`acme/*`, `*` for all).
    #[arg(long)]
    project: String,
    /// `read` (query, watch, export), `push` (open and write runs, and read them), or
    /// `admin` (everything, deleting runs included).
    #[arg(long, value_enum)]
    scope: ScopeArg,
    /// The one run it reaches.
    #[arg(long)]
    run: Option<String>,
    /// How long it is valid (`30d`, `12h`); forever when not given.
    #[arg(long, value_parser = humantime::parse_duration)]
    expires: Option<Duration>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ScopeArg {
    Read,
    Push,
    Admin,
}

impl From<ScopeArg> for Scope {
    fn from(s: ScopeArg) -> Scope {
        match s {
            ScopeArg::Read => Scope::Read,
            ScopeArg::Push => Scope::Push,
            ScopeArg::Admin => Scope::Admin,
        }
    }
}

pub(super) fn token(a: TokenArgs) -> Result<ExitCode, Failure> {
    let path = a
        .tokens
        .clone()
        .unwrap_or_else(|| a.data_dir.join(TOKENS_FILE));
    if a.tokens.is_none() {
        std::fs::create_dir_all(&a.data_dir)
            .with_context(|| format!("creating {}", a.data_dir.display()))
            .map_err(bad_input)?;
    }
    let store = TokenStore::open(&path).map_err(|e| bad_input(e.into()))?;
    match a.command {
        TokenCommand::Create(c) => {
            let (token, record) = store
                .create(&NewToken {
                    project: c.project,
                    scope: c.scope.into(),
                    run: c.run,
                    expires_in: c.expires,
                })
                .map_err(|e| bad_input(e.into()))?;
            println!("{token}");
            eprintln!("made {}", describe(&record));
        }
        TokenCommand::List => {
            for record in store.list().map_err(|e| bad_input(e.into()))? {
                println!("{}", describe(&record));
            }
        }
        TokenCommand::Revoke { id } => {
            let record = store.revoke(&id).map_err(|e| bad_input(e.into()))?;
            eprintln!("revoked {}", describe(&record));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One line about a token, without its secret.
fn describe(r: &TokenRecord) -> String {
    let at = |ms: u64| {
        humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + Duration::from_millis(ms))
            .to_string()
    };
    let scope = match r.scope {
        1 => "read",
        2 => "push",
        3 => "admin",
        _ => "unknown",
    };
    let mut line = format!("token {}  {scope} of {}", r.id, r.project);
    if !r.run.is_empty() {
        line.push_str(&format!(", run {}", r.run));
    }
    line.push_str(&format!(", made {}", at(r.created_at_ms)));
    if let Some(ms) = r.expires_at_ms {
        line.push_str(&format!(", expires {}", at(ms)));
    }
    if let Some(ms) = r.revoked_at_ms {
        line.push_str(&format!(", revoked {}", at(ms)));
    }
    line
}
