//! The `covd` command line: one subcommand per task, each a thin use of the library.
//! `push` (with its `--watch` mode) lives in `push`, the HTML report's files in `html`.

mod attribution;
mod differential;
mod flaky;
mod history;
mod html;
mod impact;
mod lines;
mod patch;
mod push;
mod token;

use std::fs::File;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, anyhow};
use clap::{Args, Parser, Subcommand};
use covd::admission::AdmissionLimits;
use covd::client::{Client, ClientError};
use covd::formats::Format;
use covd::model::Totals;
use covd::server::{self, Settings};
use covd::service::{ExportFormat, ExportHeader, RunParams, RunStatus, ShardState};

const EXIT_CODES: &str = "\
Exit codes:
  0  success (also: push could not reach the daemon, without --fail-on-error)
  1  an unexpected error
  2  bad input: a malformed file, bad arguments, or the daemon refused the request
  3  the daemon is unreachable or unavailable
  4  fetch --wait, patch --watch: the deadline passed before the run was complete (the
     output is written)
  5  tests-for: no test covers the change (nothing to run)
  6  tests-for: covd cannot tell which tests the change affects (run every test)
  7  patch --fail-under: the changed lines' coverage is below the bar";

/// covd: merges coverage from parallel CI shards while they run.
#[derive(Debug, Parser)]
#[command(version, about, after_help = EXIT_CODES)]
pub(crate) struct Cli {
    #[command(subcommand)]
    command: Command,
    /// How log lines are written to standard error: `text`, or `json` (one object per line,
    /// for a log collector). Which lines: `COVD_LOG` (e.g. `info`, `covd=debug`).
    #[arg(long, global = true, env = "COVD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub(crate) log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon (loopback only unless told otherwise; data in --data-dir).
    Serve(Box<ServeArgs>),
    /// Open a run and declare the shards it expects.
    Open(OpenArgs),
    /// Stream a shard's coverage files into a run (or, with --watch, those a test command
    /// writes), then finish the shard.
    Push(Box<PushArgs>),
    /// Write the merged coverage of a run, optionally waiting until every shard finished.
    Fetch(FetchArgs),
    /// Show a run's shards and totals.
    Status(StatusArgs),
    /// Show one file's merged line coverage.
    File(FileArgs),
    /// Show coverage totals of a directory and its children.
    Dir(DirArgs),
    /// Per-test attribution: the tests that covered some lines (one name per line of output,
    /// ready for a test runner), the lines one test covered, or every test a run named.
    Tests(attribution::TestsArgs),
    /// Test impact: the tests of a base run that a diff affects (one per line, ready for a
    /// test runner); exit code 5 when none does, 6 when covd cannot tell (run everything).
    TestsFor(impact::TestsForArgs),
    /// Patch coverage: how many of the lines a diff adds the run covered (text, Markdown for a
    /// pull request, JSON); exit code 7 below --fail-under; --watch follows a streaming run.
    Patch(patch::PatchArgs),
    /// Differential coverage: a run against a base run, every line in lcov 2's categories
    /// (new code covered or not, unchanged code that gained, lost or kept coverage, deleted
    /// code), the base's lines carried through --diff when the commits differ.
    Diff(differential::DiffArgs),
    /// Set algebra over covered lines: `covered:integration - covered:unit`, `test:T -
    /// tests-except:T` (the lines only test T covers), with `|`, `&`, `-` and parentheses.
    Lines(lines::LinesArgs),
    /// The trend of a project's runs per day, week or month: coverage, tests, duration,
    /// memory (kept after the runs' raw data expires; old months down-sampled).
    History(history::HistoryArgs),
    /// Flaky tests (failed and passed on one commit) and broken ones (failing every time) of
    /// a branch, each with its failures in its latest runs; with --run, a run's retried
    /// shards: the tests that flipped and what each attempt covered that the other did not.
    Flaky(flaky::FlakyArgs),
    /// List the runs the daemon holds.
    Runs(ServerArg),
    /// Delete a run.
    Delete(RunArg),
    /// Access tokens: create, list, revoke (see Tokens in the README).
    Token(token::TokenArgs),
}

#[derive(Debug, Args)]
struct ServerArg {
    /// The daemon's address; or the nodes of a cluster, comma-separated (a push whose node
    /// becomes unreachable resumes on the next).
    #[arg(
        long,
        env = "COVD_SERVER",
        default_value = "http://127.0.0.1:8417",
        global = true
    )]
    server: String,
    /// The token to call the daemon with (`covd token create`), when it requires one.
    #[arg(long, env = "COVD_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// For an https:// daemon: the CA certificate (PEM) its certificate must chain to, instead
    /// of the system's.
    #[arg(long, env = "COVD_CA_FILE", global = true)]
    ca_file: Option<PathBuf>,
    /// For a daemon that requires client certificates: this one (PEM), with --client-key.
    #[arg(long, env = "COVD_CLIENT_CERT", global = true, requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// The key of --client-cert (PEM).
    #[arg(long, env = "COVD_CLIENT_KEY", global = true, requires = "client_cert")]
    client_key: Option<PathBuf>,
    /// How long a call may take to be answered (a stream: to begin); 0: no deadline.
    #[arg(long, env = "COVD_REQUEST_TIMEOUT", default_value = "5m",
          value_parser = humantime::parse_duration, global = true)]
    request_timeout: Duration,
}

#[derive(Debug, Args)]
struct RunArg {
    #[command(flatten)]
    server: ServerArg,
    /// The run (e.g. the CI pipeline id). In CI, by default, the pipeline run of the provider's
    /// environment (see the README's table).
    #[arg(long, env = "COVD_RUN", default_value_t = from_ci(ci_run),
          hide_default_value = true, value_parser = given("--run or COVD_RUN", ci_run))]
    run: String,
}

/// [`RunArg`] for `push`, whose `--flush-spool` takes runs from the spool: checked when used.
#[derive(Debug, Args)]
struct PushRunArg {
    #[command(flatten)]
    server: ServerArg,
    /// The run (e.g. the CI pipeline id). In CI, by default, the pipeline run of the provider's
    /// environment (see the README's table).
    #[arg(long, env = "COVD_RUN", default_value_t = from_ci(ci_run),
          hide_default_value = true, value_parser = or_ci(ci_run))]
    run: String,
}

/// The CI job this process runs in, read from the provider's variables once.
fn ci() -> Option<&'static covd::ci::Ci> {
    static CI: std::sync::LazyLock<Option<covd::ci::Ci>> =
        std::sync::LazyLock::new(covd::ci::from_env);
    CI.as_ref()
}

/// A default read from the CI job, or empty.
fn from_ci(field: impl Fn(&covd::ci::Ci) -> Option<String>) -> String {
    ci().and_then(field).unwrap_or_default()
}

/// A value that must not be empty: an empty one (`COVD_RUN=`) is the CI job's; outside a CI
/// covd recognises, the flag must be given.
fn given(
    what: &'static str,
    field: fn(&covd::ci::Ci) -> Option<String>,
) -> impl Fn(&str) -> Result<String, String> + Clone {
    move |v: &str| match or_ci(field)(v)? {
        v if v.is_empty() => Err(format!(
            "give {what}: covd found no CI job in the environment to take it from"
        )),
        v => Ok(v),
    }
}

/// A value whose empty form (`COVD_COMMIT=`) is the CI job's, as if not given.
fn or_ci(
    field: fn(&covd::ci::Ci) -> Option<String>,
) -> impl Fn(&str) -> Result<String, String> + Clone {
    move |v: &str| {
        Ok(if v.is_empty() {
            from_ci(field)
        } else {
            v.to_owned()
        })
    }
}

fn ci_run(c: &covd::ci::Ci) -> Option<String> {
    Some(c.run.clone())
}

fn ci_shard(c: &covd::ci::Ci) -> Option<String> {
    Some(c.shard.clone())
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Address to listen on. Loopback by default: covd has no authentication yet.
    #[arg(long, default_value = "127.0.0.1:8417")]
    listen: SocketAddr,
    /// Address of the HTTP port: Prometheus metrics at `/metrics`. Loopback by default.
    #[arg(long, default_value = "127.0.0.1:8418", conflicts_with = "no_http")]
    http_listen: SocketAddr,
    /// No HTTP port.
    #[arg(long)]
    no_http: bool,
    /// Where runs are stored (SQLite); acknowledged coverage survives a crash.
    #[arg(long, env = "COVD_DATA_DIR", default_value = "covd-data")]
    data_dir: PathBuf,
    /// The token store (`covd token`; default: `tokens.sqlite3` in the data directory). Once
    /// it holds a token, every call but health needs one.
    #[arg(long)]
    tokens: Option<PathBuf>,
    /// TLS on both ports: the certificate chain (PEM, leaf first), with --tls-key. Read again
    /// on SIGHUP.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require client certificates that chain to this CA (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Listen beyond loopback with no tokens: anybody who reaches the daemon may read, write
    /// and delete every run.
    #[arg(long)]
    insecure_no_auth: bool,
    /// Cap the data directory (database and delta logs) at this many bytes; past it the daemon
    /// stops acknowledging. With --in-memory: cap the coverage held, refusing deltas beyond it.
    #[arg(long)]
    max_db_bytes: Option<u64>,
    /// Bytes of memory for complete runs' coverage; beyond it the least recently read leave
    /// memory and are read back from storage when asked for (open runs always stay).
    #[arg(long, default_value_t = Settings::default().limits.memory_budget_bytes)]
    memory_budget: usize,
    /// Keep everything in memory instead (lost when the daemon stops).
    #[arg(long, conflicts_with = "data_dir")]
    in_memory: bool,
    /// Serve as one node of several over PostgreSQL (--postgres) and S3-compatible object
    /// storage (--object-store) instead of the data directory, which keeps only this node's
    /// tokens and pseudonym key (see docs/cluster.md). Needs a build with `--features cluster`.
    #[arg(
        long,
        requires_all = ["postgres", "object_store"],
        conflicts_with_all = ["in_memory", "max_db_bytes"]
    )]
    cluster: bool,
    /// The cluster's PostgreSQL: `postgres://user:password@host:port/database`.
    #[arg(
        long,
        env = "COVD_POSTGRES",
        hide_env_values = true,
        requires = "cluster"
    )]
    postgres: Option<String>,
    /// The cluster's object storage: `s3://bucket/prefix`. Credentials and region come from
    /// the usual AWS_* environment variables.
    #[arg(long, requires = "cluster")]
    object_store: Option<String>,
    /// An option of the object store's client, KEY=VALUE (`aws_endpoint=http://…`,
    /// `aws_allow_http=true`, …); repeatable.
    #[arg(long = "object-store-option", value_name = "KEY=VALUE", requires = "cluster", value_parser = key_value)]
    object_store_options: Vec<(String, String)>,
    /// Drop a run's raw data this long after it was opened (its summary stays); 0 keeps runs
    /// until deleted.
    #[arg(long, default_value = "30days", value_parser = humantime::parse_duration)]
    retention: Duration,
    /// History keeps every run this long, then only per month (counts, least, mean, greatest
    /// and latest value of each metric); whole months are folded. 0 never folds.
    #[arg(long, default_value = "90days", value_parser = humantime::parse_duration)]
    history_full_for: Duration,
    /// A complete run accepts a retried shard (a higher attempt: CI's "re-run failed jobs")
    /// this long after it completed, and keeps its deltas on disk that long for it; 0 refuses
    /// every attempt once a run is complete.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    reopen_window: Duration,
    /// How project names are kept at the least: `plain`, `pseudonym` (the vendor part plain,
    /// the rest a keyed pseudonym: `acme/3f9c…`; queries may still name projects plainly) or
    /// `anonymous`. A client may ask for stricter (`--project-as`).
    #[arg(long, value_enum, default_value_t = NamesArg::Plain)]
    project_names: NamesArg,
    /// The pseudonyms' key (at least 16 bytes). Default: `pseudonym.key` in the data
    /// directory, made at first start; keep it with the data, or pseudonyms change.
    #[arg(long)]
    pseudonym_key_file: Option<PathBuf>,
    /// On SIGTERM/SIGINT, wait this long for open calls before stopping; a second signal
    /// stops at once.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    shutdown_grace: Duration,
    /// Largest gRPC message accepted, in bytes.
    #[arg(long, default_value_t = Settings::default().max_message_bytes)]
    max_message_bytes: usize,
    /// Largest line number accepted (at most 10,000,000, the largest covd stores).
    #[arg(
        long,
        default_value_t = Settings::default().limits.max_line,
        value_parser = clap::value_parser!(u32).range(1..=i64::from(covd::model::MAX_LINE))
    )]
    max_line: u32,
    /// Most distinct files in one run.
    #[arg(long, default_value_t = Settings::default().limits.max_files_per_run)]
    max_files_per_run: usize,
    /// Most distinct tests one run's per-test coverage names.
    #[arg(
        long,
        default_value_t = Settings::default().limits.max_tests_per_run as u32,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    max_tests_per_run: u32,
    /// Most distinct executable lines in one run, over its files.
    #[arg(long, default_value_t = Settings::default().limits.max_lines_per_run)]
    max_lines_per_run: u64,
    /// Most bytes of deltas one run takes in, over its shards and their attempts.
    #[arg(long, default_value_t = Settings::default().limits.max_run_bytes)]
    max_run_bytes: u64,
    /// Most branch arms of one line (in one file of a delta).
    #[arg(long, default_value_t = Settings::default().limits.max_branches_per_line)]
    max_branches_per_line: usize,
    /// Most bytes of one run's coverage in memory, estimated from its counts before each
    /// delta is applied.
    #[arg(long, default_value_t = Settings::default().limits.max_run_memory_bytes)]
    max_run_memory: usize,
    /// Most bytes of coverage in memory over all runs (open ones, and complete ones held),
    /// estimated before each delta is applied [default: three quarters of the machine's
    /// memory].
    #[arg(long)]
    max_memory: Option<usize>,
    /// Most shards in one run.
    #[arg(long, default_value_t = Settings::default().limits.max_shards_per_run)]
    max_shards_per_run: usize,
    /// Most runs held at once; at the limit, the run settled longest ago gives up its raw
    /// data (its summary stays in history) for a new one.
    #[arg(long, default_value_t = Settings::default().limits.max_runs)]
    max_runs: usize,
    /// New runs one token (without tokens: one client address) may open per hour; 0: no limit.
    #[arg(long, default_value_t = Settings::default().limits.max_runs_per_token_per_hour)]
    max_runs_per_token_per_hour: u32,
    /// Deltas decoded and applied at once, over all streams (bounds memory; default: twice the
    /// cores, and 2).
    #[arg(long, default_value_t = Settings::default().limits.max_deltas_in_flight)]
    max_deltas_in_flight: usize,
    /// Most files in one delta.
    #[arg(long, default_value_t = Settings::default().limits.max_files_per_delta)]
    max_files_per_delta: usize,
    /// Largest source text a push may send with a run (`covd push --sources`), in bytes.
    #[arg(long, default_value_t = Settings::default().limits.max_source_bytes)]
    max_source_bytes: usize,
    /// Longest function name, branch label or test name in a delta, in bytes.
    #[arg(long, default_value_t = Settings::default().limits.max_name_bytes)]
    max_name_bytes: usize,
    /// Longest run id, in bytes.
    #[arg(long, default_value_t = Settings::default().limits.max_run_id_bytes)]
    max_run_id_bytes: usize,
    /// Longest shard id, in bytes.
    #[arg(long, default_value_t = Settings::default().limits.max_shard_id_bytes)]
    max_shard_id_bytes: usize,
    /// Longest project, commit, branch or flag of a run, in bytes.
    #[arg(long, default_value_t = Settings::default().limits.max_run_field_bytes)]
    max_run_field_bytes: usize,
    /// Most test cases one shard reports.
    #[arg(long, default_value_t = Settings::default().limits.max_tests_per_shard)]
    max_tests_per_shard: usize,
    /// Longest test name, suite or platform a shard reports, in bytes.
    #[arg(long, default_value_t = Settings::default().limits.max_test_field_bytes)]
    max_test_field_bytes: usize,
    /// Runs a list answers with, at most.
    #[arg(long, default_value_t = Settings::default().limits.runs_listed)]
    runs_listed: usize,
    /// Lines of a file one query answer holds (larger files are read in pages).
    #[arg(
        long,
        default_value_t = Settings::default().limits.file_page_lines,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
    )]
    file_page_lines: usize,
    /// Concurrent HTTP/2 streams per connection.
    #[arg(long, default_value_t = Settings::default().max_concurrent_streams)]
    max_concurrent_streams: u32,
    /// How much of one stream the daemon buffers before it reads it (HTTP/2 stream window),
    /// in bytes.
    #[arg(long, default_value_t = Settings::default().stream_window_bytes)]
    stream_window_bytes: u32,
    /// Most gRPC connections open at once. Past it every call of a new connection is refused
    /// (RESOURCE_EXHAUSTED); past twice it new connections are closed as they come.
    #[arg(long, default_value_t = AdmissionLimits::default().max_connections)]
    max_connections: usize,
    /// Most connections open at once from one address (CI runners behind a NAT share one).
    #[arg(long, default_value_t = AdmissionLimits::default().max_connections_per_client)]
    max_connections_per_client: usize,
    /// A connection with no call open this long is closed (HTTP/2 pings do not count).
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    connection_idle_timeout: Duration,
    /// Most calls (HTTP/2 streams) open at once from one address; health checks are not
    /// counted.
    #[arg(long, default_value_t = AdmissionLimits::default().max_streams_per_client)]
    max_streams_per_client: usize,
    /// Bytes of messages being received at once, over all clients. A message's share is taken
    /// from its length before its body is read, and held until the next message of its stream.
    #[arg(long, default_value_t = AdmissionLimits::default().receiving_bytes)]
    max_receiving_bytes: usize,
    /// Bytes of messages being received at once from one address.
    #[arg(long, default_value_t = AdmissionLimits::default().receiving_bytes_per_client)]
    max_receiving_bytes_per_client: usize,
    /// How long a message waits for room in the receive budgets before it is refused.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    receive_wait: Duration,
    /// How long a message's body may keep the daemon waiting once its length came.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    read_timeout: Duration,
    /// How long an ingest stream may send nothing between messages (`push --watch` closes
    /// its stream while it has nothing to send).
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    stream_idle_timeout: Duration,
    /// How many times its size a compressed message may inflate to (at most
    /// --max-message-bytes).
    #[arg(long, default_value_t = AdmissionLimits::default().max_inflation,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_inflation: u32,
    /// How often an HTTP/2 ping checks that a client is still there (a connection whose
    /// client does not answer within 20 s is closed); 0: never.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    keepalive_interval: Duration,
}

#[derive(Debug, Args)]
struct RunMeta {
    /// The project the run belongs to (in CI, by default, the repository).
    #[arg(long, env = "COVD_PROJECT", default_value_t = from_ci(|c| c.project.clone()),
          hide_default_value = true, value_parser = or_ci(|c| c.project.clone()))]
    project: String,
    /// The commit tested (in CI, by default, the provider's).
    #[arg(long, env = "COVD_COMMIT", default_value_t = from_ci(|c| c.commit.clone()),
          hide_default_value = true, value_parser = or_ci(|c| c.commit.clone()))]
    commit: String,
    /// The branch tested (in CI, by default, the provider's; a pull request's source branch).
    #[arg(long, env = "COVD_BRANCH", default_value_t = from_ci(|c| c.branch.clone()),
          hide_default_value = true, value_parser = or_ci(|c| c.branch.clone()))]
    branch: String,
    /// A label such as `unit` (repeatable).
    #[arg(long = "flag")]
    flags: Vec<String>,
    /// How the daemon is to keep the project's name: `plain`, `pseudonym` (the vendor part
    /// plain, the rest a pseudonym only the daemon's key makes: `acme/3f9c…`) or `anonymous`
    /// (none). The daemon may insist on a stricter way (`serve --project-names`).
    #[arg(long, env = "COVD_PROJECT_AS", value_enum, default_value_t = NamesArg::Plain)]
    project_as: NamesArg,
}

/// How project names are kept (see `covd::privacy`).
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum NamesArg {
    Plain,
    Pseudonym,
    Anonymous,
}

impl From<NamesArg> for covd::privacy::ProjectNames {
    fn from(a: NamesArg) -> Self {
        match a {
            NamesArg::Plain => covd::privacy::ProjectNames::Plain,
            NamesArg::Pseudonym => covd::privacy::ProjectNames::Pseudonym,
            NamesArg::Anonymous => covd::privacy::ProjectNames::Anonymous,
        }
    }
}

impl RunMeta {
    fn params(&self, expected_shards: Vec<String>) -> RunParams {
        RunParams {
            project: self.project.clone(),
            commit: self.commit.clone(),
            branch: self.branch.clone(),
            flags: self.flags.iter().cloned().collect(),
            expected_shards,
            project_as: self.project_as.into(),
        }
    }
}

#[derive(Debug, Args)]
struct OpenArgs {
    #[command(flatten)]
    run: RunArg,
    /// Expect shards named 0..N-1.
    #[arg(
        long,
        conflicts_with = "shard_ids",
        required_unless_present = "shard_ids"
    )]
    shards: Option<u32>,
    /// Expect shards with these names.
    #[arg(long, value_delimiter = ',')]
    shard_ids: Vec<String>,
    /// The repository's files, one path per line (`git ls-files > files.txt`; `-` reads
    /// standard input): pushes are then told which of their paths match none.
    #[arg(long)]
    files_from: Option<PathBuf>,
    #[command(flatten)]
    meta: RunMeta,
}

#[derive(Debug, Args)]
pub(crate) struct PushArgs {
    #[command(flatten)]
    run: PushRunArg,
    /// This shard's name. In CI, by default, the job's name (and its index when the provider
    /// splits the job).
    #[arg(long, env = "COVD_SHARD", default_value_t = from_ci(ci_shard),
          hide_default_value = true, value_parser = or_ci(ci_shard))]
    shard: String,
    /// An environment tag of this shard's test run, sent with its results (repeatable; beside
    /// `os`, `arch` and `ci`, which push adds, and which a tag of the same key replaces).
    #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = parse_tag)]
    tags: Vec<(String, String)>,
    /// Also send the source text of each file the coverage names, for the dashboard's file
    /// page: read where the coverage says it is, else at its path in the run (after the path
    /// rules) under --source-root; only files under the source root are read. The daemon keeps
    /// each text once, under its SHA-256, for every run naming it: a text it has is not sent
    /// again.
    #[arg(long, conflicts_with = "flush_spool")]
    sources: bool,
    /// Where --sources finds files by their path in the run (default: the current directory).
    #[arg(long, value_name = "DIR", requires = "sources")]
    source_root: Option<PathBuf>,
    /// When the daemon cannot be reached, keep what the push would have sent in DIR (a file
    /// per shard attempt) and exit 0; `--flush-spool DIR` sends it later.
    #[arg(long, value_name = "DIR")]
    spool: Option<PathBuf>,
    /// Send what pushes kept in DIR (`--spool`), each as the push it was: flushed twice, or by
    /// two processes at once, it is counted once. Sent files are removed.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["spool", "watch", "files"])]
    flush_spool: Option<PathBuf>,
    /// The attempt: a higher one replaces what earlier attempts of the shard sent. In CI, by
    /// default, the provider's retry count (see the README's table); else 1.
    #[arg(long, env = "COVD_ATTEMPT", default_value_t = ci().and_then(|c| c.attempt).unwrap_or(1))]
    attempt: u32,
    /// Remove this prefix from source paths (repeatable; the first that matches applies).
    #[arg(long)]
    strip_prefix: Vec<String>,
    /// Replace the prefix FROM with TO in source paths (repeatable).
    #[arg(long, value_name = "FROM=TO", value_parser = parse_mapping)]
    map_prefix: Vec<(String, String)>,
    /// Make source paths under this directory relative to it.
    #[arg(long)]
    root: Option<String>,
    /// Fail (exit 3) when the daemon cannot be reached; by default a push warns and exits 0
    /// so that coverage never fails a test suite.
    #[arg(long)]
    fail_on_error: bool,
    /// Reconnection attempts after failures.
    #[arg(long, default_value_t = 5)]
    retries: u32,
    #[command(flatten)]
    meta: RunMeta,
    #[command(flatten)]
    filter: FilterArgs,
    /// The input format; detected from each file's content when not given.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(Format::NAMES))]
    format: Option<String>,
    /// Run the command after `--` and send every coverage file that appears in DIR as soon as
    /// it is complete; finish the shard when the command exits, and exit with its exit code.
    #[arg(long, value_name = "DIR", requires = "command")]
    watch: Option<PathBuf>,
    /// With --watch: a file is complete once its size and time stay unchanged this long.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    settle: Duration,
    /// Coverage files to send (any format of --format; JUnit XML files are the shard's test
    /// results; a directory is PHPUnit's XML coverage report, `--coverage-xml DIR`, whose
    /// tests of each line go on the Clover report of the same run, pushed with it).
    #[arg(required_unless_present_any = ["watch", "flush_spool"], conflicts_with = "watch")]
    files: Vec<PathBuf>,
    /// With --watch: the test command and its arguments.
    #[arg(last = true)]
    command: Vec<String>,
}

#[derive(Debug, Args)]
struct FetchArgs {
    #[command(flatten)]
    run: RunArg,
    /// Wait until every expected shard has finished.
    #[arg(long)]
    wait: bool,
    /// How long --wait waits at most (e.g. 90s, 10m).
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Output format: lcov, lcov1 (for lcov/genhtml 1.x readers), cobertura (XML, for
    /// GitLab/Jenkins), json (covd's schema), markdown (a summary for a pull-request comment),
    /// or html (a report directory: needs --output DIR).
    #[arg(long, default_value = "lcov", value_parser = ["lcov", "lcov1", "cobertura", "json", "markdown", "html"])]
    format: String,
    /// With --format html: the checkout the sources are read from, to show them marked.
    #[arg(long)]
    source_root: Option<PathBuf>,
    /// With --format html: compare with this base run, each line's category in a column (see
    /// `covd diff`).
    #[arg(long)]
    base: Option<String>,
    /// With --base: the unified diff from the base's commit to the run's, or `-`.
    #[arg(long, requires = "base", value_name = "FILE|-")]
    diff: Option<PathBuf>,
    /// With --diff: leading path components to drop (like `patch -p`).
    #[arg(long, short = 'p', requires = "diff", value_name = "N")]
    strip: Option<u32>,
    /// Write here instead of standard output.
    #[arg(long, short)]
    output: Option<PathBuf>,
    #[command(flatten)]
    filter: FilterArgs,
}

#[derive(Debug, Args)]
struct FilterArgs {
    /// Only source paths matching this glob (repeatable; `src/**/*.rs`).
    #[arg(long)]
    include: Vec<String>,
    /// Leave out source paths matching this glob (repeatable).
    #[arg(long)]
    exclude: Vec<String>,
}

#[derive(Debug, Args)]
struct StatusArgs {
    #[command(flatten)]
    run: RunArg,
    /// Keep printing the status as it changes, until the run is complete.
    #[arg(long)]
    watch: bool,
}

#[derive(Debug, Args)]
struct FileArgs {
    #[command(flatten)]
    run: RunArg,
    /// Also list the tests that covered each line (per-test attribution).
    #[arg(long)]
    tests: bool,
    /// The file's path as the run knows it.
    path: String,
}

#[derive(Debug, Args)]
struct DirArgs {
    #[command(flatten)]
    run: RunArg,
    /// The directory; the root when omitted.
    #[arg(default_value = "")]
    path: String,
}

/// `KEY=VALUE` of `--tag`: a key of printable ASCII without spaces or `=`.
fn parse_tag(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() && k.chars().all(|c| c.is_ascii_graphic()) => {
            Ok((k.to_owned(), v.to_owned()))
        }
        _ => Err(format!(
            "`{s}` is not KEY=VALUE (a key of printable ASCII, no spaces)"
        )),
    }
}

fn parse_mapping(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
        .ok_or_else(|| format!("`{s}` is not FROM=TO"))
}

/// An error with the exit code it maps to.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) code: u8,
    pub(crate) error: anyhow::Error,
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Failure {
        let code = if let Some(refused) = e.auth_refusal() {
            if refused == tonic::Code::Unauthenticated {
                8
            } else {
                9
            }
        } else if e.is_unavailable() {
            3
        } else if e.is_invalid_input() {
            2
        } else {
            1
        };
        Failure {
            code,
            error: e.into(),
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Failure {
        Failure { code: 1, error }
    }
}

fn bad_input(error: anyhow::Error) -> Failure {
    Failure { code: 2, error }
}

impl Cli {
    pub(crate) async fn run(self) -> Result<ExitCode, Failure> {
        match self.command {
            Command::Serve(a) => serve(*a).await,
            Command::Open(a) => open(a).await,
            Command::Push(a) => push::run(*a).await,
            Command::Fetch(a) => fetch(a).await,
            Command::Status(a) => status(a).await,
            Command::File(a) => file(a).await,
            Command::Dir(a) => dir(a).await,
            Command::Tests(a) => attribution::tests(a).await,
            Command::TestsFor(a) => impact::tests_for(a).await,
            Command::Patch(a) => patch::patch(a).await,
            Command::Diff(a) => differential::diff(a).await,
            Command::Lines(a) => lines::lines(a).await,
            Command::History(a) => history::history(a).await,
            Command::Flaky(a) => flaky::flaky(a).await,
            Command::Runs(a) => runs(a).await,
            Command::Token(a) => token::token(a),
            Command::Delete(a) => {
                client(&a.server)?.delete_run(&a.run).await?;
                eprintln!("deleted run {}", a.run);
                Ok(ExitCode::SUCCESS)
            }
        }
    }
}

/// A unified diff from a file, or from standard input for `-`.
fn read_diff(path: &std::path::Path) -> Result<Vec<u8>, Failure> {
    if path.as_os_str() == "-" {
        let mut diff = Vec::new();
        io::Read::read_to_end(&mut io::stdin(), &mut diff)
            .context("reading the diff from standard input")?;
        return Ok(diff);
    }
    std::fs::read(path)
        .with_context(|| format!("reading {}", path.display()))
        .map_err(bad_input)
}

fn client(server: &ServerArg) -> Result<Client, Failure> {
    let read = |path: &PathBuf| {
        std::fs::read(path)
            .with_context(|| format!("reading {}", path.display()))
            .map_err(bad_input)
    };
    let identity = match (&server.client_cert, &server.client_key) {
        (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
        _ => None,
    };
    let how = covd::client::Connect {
        token: server.token.clone(),
        ca_pem: server.ca_file.as_ref().map(read).transpose()?,
        identity,
        request_timeout: (!server.request_timeout.is_zero()).then_some(server.request_timeout),
        ..covd::client::Connect::default()
    };
    Client::connect_using(&server.server, &how).map_err(|e| bad_input(e.into()))
}

/// `KEY=VALUE`.
fn key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("`{s}` is not KEY=VALUE"))
}

async fn serve(a: ServeArgs) -> Result<ExitCode, Failure> {
    let mut settings = Settings {
        max_message_bytes: a.max_message_bytes,
        data_dir: (!a.in_memory).then(|| a.data_dir.clone()),
        retention: (!a.retention.is_zero()).then_some(a.retention),
        history_full_for: (!a.history_full_for.is_zero()).then_some(a.history_full_for),
        project_names: a.project_names.into(),
        pseudonym_key_file: a.pseudonym_key_file.clone(),
        tokens: a.tokens.clone(),
        insecure_no_auth: a.insecure_no_auth,
        shutdown_grace: a.shutdown_grace,
        max_db_bytes: a.max_db_bytes,
        max_concurrent_streams: a.max_concurrent_streams,
        stream_window_bytes: a.stream_window_bytes,
        admission: AdmissionLimits {
            max_connections: a.max_connections,
            max_connections_per_client: a.max_connections_per_client,
            connection_idle: a.connection_idle_timeout,
            max_streams_per_client: a.max_streams_per_client,
            receiving_bytes: a.max_receiving_bytes,
            receiving_bytes_per_client: a.max_receiving_bytes_per_client,
            receive_wait: a.receive_wait,
            read_timeout: a.read_timeout,
            stream_idle: a.stream_idle_timeout,
            max_inflation: a.max_inflation,
            max_message_bytes: a.max_message_bytes,
        },
        keepalive_interval: (!a.keepalive_interval.is_zero()).then_some(a.keepalive_interval),
        tls: match (&a.tls_cert, &a.tls_key) {
            (Some(cert), Some(key)) => Some(covd::tls::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: a.tls_client_ca.clone(),
            }),
            _ => None,
        },
        http_listen: (!a.no_http).then_some(a.http_listen),
        cluster: match (a.cluster, &a.postgres, &a.object_store) {
            (true, Some(postgres), Some(object_store)) => Some(covd::server::ClusterSettings {
                postgres: postgres.clone(),
                object_store: object_store.clone(),
                object_store_options: a.object_store_options.clone(),
            }),
            _ => None,
        },
        ..Settings::default()
    };
    if settings.cluster.is_some() {
        // The node's own files: its tokens and pseudonym key.
        std::fs::create_dir_all(&a.data_dir)
            .with_context(|| format!("cannot make {}", a.data_dir.display()))?;
    }
    settings.limits.max_line = a.max_line;
    settings.limits.max_files_per_run = a.max_files_per_run;
    settings.limits.max_tests_per_run = a.max_tests_per_run as usize;
    settings.limits.max_lines_per_run = a.max_lines_per_run;
    settings.limits.max_branches_per_line = a.max_branches_per_line;
    settings.limits.max_run_bytes = a.max_run_bytes;
    settings.limits.max_run_memory_bytes = a.max_run_memory;
    if let Some(max) = a.max_memory {
        settings.limits.max_memory_bytes = max;
    }
    settings.limits.max_shards_per_run = a.max_shards_per_run;
    settings.limits.max_runs = a.max_runs;
    settings.limits.max_runs_per_token_per_hour = a.max_runs_per_token_per_hour;
    settings.limits.max_deltas_in_flight = a.max_deltas_in_flight;
    settings.limits.memory_budget_bytes = a.memory_budget;
    settings.limits.reopen_window = (!a.reopen_window.is_zero()).then_some(a.reopen_window);
    settings.limits.max_files_per_delta = a.max_files_per_delta;
    settings.limits.max_source_bytes = a.max_source_bytes;
    settings.limits.max_name_bytes = a.max_name_bytes;
    settings.limits.max_run_id_bytes = a.max_run_id_bytes;
    settings.limits.max_shard_id_bytes = a.max_shard_id_bytes;
    settings.limits.max_run_field_bytes = a.max_run_field_bytes;
    settings.limits.max_tests_per_shard = a.max_tests_per_shard;
    settings.limits.max_test_field_bytes = a.max_test_field_bytes;
    settings.limits.runs_listed = a.runs_listed;
    settings.limits.file_page_lines = a.file_page_lines;
    match server::raise_descriptor_limit() {
        Some((before, after)) if after > before => {
            tracing::info!("open files: soft limit raised from {before} to {after}");
        }
        Some(_) => {}
        None => tracing::warn!("cannot read or raise the limit of open files"),
    }
    // Checked before anything binds (the daemon checks again once it has its tokens open).
    let tokens = settings.tokens.clone().or_else(|| {
        settings
            .data_dir
            .as_ref()
            .map(|d| d.join(covd::auth::TOKENS_FILE))
    });
    let has_tokens = tokens.as_ref().is_some_and(|p| {
        p.exists()
            && covd::auth::TokenStore::open(p)
                .and_then(|s| s.list())
                .is_ok_and(|l| !l.is_empty())
    });
    let exposed = std::iter::once(("--listen", a.listen))
        .chain(settings.http_listen.map(|h| ("--http-listen", h)))
        .find(|(_, addr)| !addr.ip().is_loopback());
    if let Some((flag, addr)) = exposed
        && !has_tokens
        && !a.insecure_no_auth
    {
        return Err(bad_input(anyhow!(
            "{flag} {addr} is beyond loopback and the daemon has no tokens, so anybody there \
             could read, write and delete every run: create one first (`covd token create \
             --data-dir {} --project '*' --scope admin`), or pass --insecure-no-auth",
            a.data_dir.display()
        )));
    }
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("cannot listen on {}", a.listen))?;
    let addr = listener.local_addr().context("no local address")?;
    let (ready_tx, ready) = tokio::sync::oneshot::channel::<server::Ready>();
    let storage = match (&settings.cluster, &settings.data_dir) {
        (Some(c), _) => format!("a cluster node over {}", c.object_store),
        (None, Some(dir)) => format!("data in {}", dir.display()),
        (None, None) => "in memory".to_owned(),
    };
    // Announce the address once recovery is done and the port answers.
    let scheme = if settings.tls.is_some() {
        "https"
    } else {
        "http"
    };
    tokio::spawn(async move {
        if let Ok(ready) = ready.await {
            let http = ready
                .http
                .map(|h| format!("; metrics on {scheme}://{h}/metrics"))
                .unwrap_or_default();
            eprintln!("covd listening on {scheme}://{addr} ({storage}){http}");
        }
    });
    let shutdown = async move {
        shutdown_signal().await;
        eprintln!("covd: stopping (a second signal stops at once)");
        tokio::spawn(async {
            shutdown_signal().await;
            eprintln!("covd: stopped at once");
            std::process::exit(130);
        });
    };
    server::run_with_ready(listener, settings, shutdown, ready_tx)
        .await
        .context("the server failed")?;
    eprintln!("covd stopped");
    Ok(ExitCode::SUCCESS)
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
}

async fn open(a: OpenArgs) -> Result<ExitCode, Failure> {
    let expected = match a.shards {
        Some(0) => return Err(bad_input(anyhow!("--shards must be at least 1"))),
        Some(n) => (0..n).map(|i| i.to_string()).collect(),
        None => a.shard_ids.clone(),
    };
    let known_files = match &a.files_from {
        None => Vec::new(),
        Some(path) => {
            let text = if path.as_os_str() == "-" {
                io::read_to_string(io::stdin()).context("cannot read standard input")?
            } else {
                std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read {}", path.display()))
                    .map_err(bad_input)?
            };
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
                .collect()
        }
    };
    let (created, status) = client(&a.run.server)?
        .open_run_with_files(&a.run.run, a.meta.params(expected), known_files)
        .await?;
    eprintln!(
        "run {} {} expecting {} shards",
        status.run_id,
        if created { "opened," } else { "already open," },
        status.params.expected_shards.len()
    );
    Ok(ExitCode::SUCCESS)
}

async fn fetch(a: FetchArgs) -> Result<ExitCode, Failure> {
    if a.format == "html" {
        return html::fetch(a).await;
    }
    if a.base.is_some() {
        return Err(bad_input(anyhow!(
            "--base adds a column to --format html; for a comparison alone, see `covd diff`"
        )));
    }
    let mut c = client(&a.run.server)?;
    let wait = a.wait.then_some(a.timeout);
    let format = match a.format.as_str() {
        "cobertura" => ExportFormat::Cobertura,
        "json" => ExportFormat::Json,
        "markdown" => ExportFormat::Markdown,
        "lcov1" => ExportFormat::Lcov1,
        _ => ExportFormat::Lcov,
    };
    let header = match &a.output {
        Some(path) => {
            // Written beside the target and renamed, so a reader never sees half a file.
            let tmp = path.with_extension("covd-partial");
            let mut out = io::BufWriter::new(
                File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?,
            );
            let header = c
                .export_filtered(
                    &a.run.run,
                    format,
                    wait,
                    &a.filter.include,
                    &a.filter.exclude,
                    &mut out,
                )
                .await;
            drop(out);
            match header {
                Ok(h) => {
                    std::fs::rename(&tmp, path)
                        .with_context(|| format!("cannot write {}", path.display()))?;
                    h
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(e.into());
                }
            }
        }
        None => {
            let stdout = io::stdout();
            let mut out = io::BufWriter::new(stdout.lock());
            c.export_filtered(
                &a.run.run,
                format,
                wait,
                &a.filter.include,
                &a.filter.exclude,
                &mut out,
            )
            .await?
        }
    };
    Ok(conclude(&a, &header))
}

/// Says what a fetch got, and maps an incomplete wait to exit code 4.
fn conclude(a: &FetchArgs, header: &ExportHeader) -> ExitCode {
    let t = header.totals;
    eprintln!(
        "run {}: {} files, lines {}, branches {}, functions {}",
        a.run.run,
        t.files,
        ratio(t.lines_covered, t.lines),
        ratio(t.branches_taken, t.branches),
        ratio(t.functions_hit, t.functions)
    );
    if header.complete {
        eprintln!("complete: every expected shard finished");
    } else if !header.expectations_declared {
        eprintln!("completeness unknown: the run declared no expected shards (use `covd open`)");
    } else {
        eprintln!(
            "INCOMPLETE: missing shards {}",
            header.missing_shards.join(", ")
        );
    }
    if a.wait && header.timed_out {
        return ExitCode::from(4);
    }
    ExitCode::SUCCESS
}

fn ratio(part: u64, whole: u64) -> String {
    if whole == 0 {
        return "0/0".into();
    }
    format!(
        "{part}/{whole} ({:.1}%)",
        part as f64 * 100.0 / whole as f64
    )
}

fn completeness(s: &RunStatus) -> String {
    if s.complete {
        "complete".into()
    } else if !s.expectations_declared {
        "has no expected shards declared".into()
    } else {
        format!("waits for {} shards", s.missing_shards.len())
    }
}

async fn status(a: StatusArgs) -> Result<ExitCode, Failure> {
    let mut c = client(&a.run.server)?;
    if a.watch {
        c.watch(&a.run.run, |s| {
            print_status(s);
            println!();
        })
        .await?;
    } else {
        print_status(&c.status(&a.run.run).await?);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_status(s: &RunStatus) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "run {}: {}", s.run_id, completeness(s));
    if !s.params.project.is_empty() || !s.params.commit.is_empty() {
        let _ = writeln!(
            out,
            "  project {} commit {} branch {}",
            s.params.project, s.params.commit, s.params.branch
        );
    }
    for sh in &s.shards {
        let state = match sh.state {
            ShardState::Pending => "missing (nothing received)",
            ShardState::Streaming => "streaming",
            ShardState::Interrupted => "interrupted (stream closed without finish)",
            ShardState::Finished => "finished",
        };
        let tests = sh
            .telemetry
            .as_ref()
            .map(|t| {
                let results = if t.duration.is_some() || !t.tests.is_empty() || t.tags.is_empty() {
                    use std::fmt::Write as _;
                    let mut r = format!(
                        "  tests {} passed, {} failed, {} skipped, {} errored",
                        t.passed, t.failed, t.skipped, t.errored
                    );
                    if t.incomplete > 0 {
                        let _ = write!(r, ", {} incomplete", t.incomplete);
                    }
                    if let Some(n) = t.assertions {
                        let _ = write!(r, ", {n} assertions");
                    }
                    r
                } else {
                    String::new()
                };
                let tags: Vec<String> = t.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
                if tags.is_empty() {
                    results
                } else {
                    format!("{results}  tags {}", tags.join(","))
                }
            })
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  shard {:<12} {:<44} attempt {} deltas {}{}{tests}",
            sh.shard_id,
            state,
            sh.attempt,
            sh.last_seq,
            if sh.expected { "" } else { " (not declared)" }
        );
    }
    print_totals(&mut out, &s.totals);
}

fn print_totals(out: &mut impl Write, t: &Totals) {
    let _ = writeln!(
        out,
        "  files {}  lines {}  branches {}  functions {}",
        t.files,
        ratio(t.lines_covered, t.lines),
        ratio(t.branches_taken, t.branches),
        ratio(t.functions_hit, t.functions)
    );
}

async fn file(a: FileArgs) -> Result<ExitCode, Failure> {
    let f = client(&a.run.server)?.file(&a.run.run, &a.path).await?;
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{}", a.path);
    print_totals(&mut out, &f.totals());
    let branches = f.branches();
    for (line, hits) in f.line_hits() {
        let on_line: Vec<_> = branches.iter().filter(|(k, _)| k.line == line).collect();
        let taken = on_line
            .iter()
            .filter(|(_, t)| t.is_some_and(|n| n > 0))
            .count();
        let mark = if hits == 0 {
            "uncovered"
        } else if taken < on_line.len() {
            "partial"
        } else {
            "covered"
        };
        let branch_note = if on_line.is_empty() {
            String::new()
        } else {
            format!("  branches {taken}/{}", on_line.len())
        };
        let _ = writeln!(out, "{line:>7}  {hits:>10}  {mark}{branch_note}");
        if a.tests {
            for t in f.tests_of(line) {
                let _ = writeln!(out, "{:>21}{t}", "");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn dir(a: DirArgs) -> Result<ExitCode, Failure> {
    let d = client(&a.run.server)?
        .directory(&a.run.run, &a.path)
        .await?;
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{}", if d.path.is_empty() { "/" } else { &d.path });
    print_totals(&mut out, &d.totals);
    for e in &d.entries {
        let t = e.totals;
        let _ = writeln!(
            out,
            "  {:<60} lines {}",
            format!("{}{}", e.path, if e.is_directory { "/" } else { "" }),
            ratio(t.lines_covered, t.lines)
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn runs(a: ServerArg) -> Result<ExitCode, Failure> {
    let runs = client(&a)?.list_runs(100).await?;
    for r in &runs {
        println!(
            "{:<32} {:<28} shards {:>3}  lines {}",
            r.run_id,
            completeness(r),
            r.shards.len(),
            ratio(r.totals.lines_covered, r.totals.lines)
        );
    }
    Ok(ExitCode::SUCCESS)
}
