//! The domain service: runs, shard ingest, queries and export. It knows nothing of gRPC; the
//! `rpc` module adapts it to the wire.
//!
//! - `run`: one run's state and the locking discipline;
//! - `ingest`: shard streams (header, deltas, finish), attempts and resume;
//! - `export`: rendering the aggregate in a format, optionally after waiting for completeness;
//! - `query`: per-file and per-directory reads, per-test attribution;
//! - `impact`: test impact, the tests a diff affects;
//! - `patch`: patch coverage, how much of the lines a diff adds ran;
//! - `differential`: a run against a base run, in lcov 2's line categories;
//! - `line_sets`: union, intersection and difference of covered lines across runs and tests;
//! - `history`: trends of a project's runs, and the down-sampling of old ones into months;
//! - `flaky`: flaky and broken tests on a branch, and the attempts of a run's shards;
//! - `reopen`: a complete run reopened by a retried shard, within the reopen window;
//! - `sources`: source texts pushed with a run, for the dashboard.

mod cache;
mod differential;
mod durable;
mod error;
mod export;
mod flaky;
mod history;
mod impact;
mod ingest;
mod line_sets;
mod patch;
mod query;
mod reopen;
mod run;
mod shared;
mod sources;
mod types;

use std::sync::Arc;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

pub use differential::{Category, Differential, DifferentialFile};
pub use durable::Recovery;
pub use error::{Error, Result};
pub use export::Export;
pub use flaky::{AttemptSummary, CoverageDifference, FlippedTest, ShardAttempts, TestStanding};
pub use impact::{ImpactFile, ImpactState, SelectedTest, TestImpact};
pub use ingest::ShardSession;
pub use line_sets::{LineSet, MAX_OPERANDS};
pub use patch::{PatchCoverage, PatchFile};
pub use sources::{SourceFile, digest_of};
pub use types::{
    Applied, Delta, DirectoryEntry, DirectorySummary, ExportFormat, ExportHeader, Limits, MAX_TAGS,
    MAX_UNKNOWN_REPORTED, RunParams, RunStatus, ShardHeader, ShardState, ShardStatus,
    TestTelemetry, TestsForLines,
};

use crate::aggregate::{Aggregate, PathInterner};
use crate::persist::{MemoryStore, Storage, StoreError, Write};
use run::Run;

/// The coverage service. Cheap to clone: every clone shares the same runs.
#[derive(Debug, Clone)]
pub struct CoverageService {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    runs: DashMap<String, Arc<Run>>,
    interner: PathInterner,
    limits: Limits,
    /// Where runs are committed before anything is acknowledged.
    storage: Arc<dyn Storage>,
    /// Which complete runs keep their aggregate in memory.
    cache: cache::Cache,
    /// Slots for deltas being decoded and applied ([`Limits::max_deltas_in_flight`]).
    deltas_in_flight: Arc<tokio::sync::Semaphore>,
    /// Settled runs evicted at `--max-runs` since the daemon started (read by the metrics).
    runs_evicted: std::sync::atomic::AtomicU64,
    /// Estimated bytes of coverage in memory, when they were last summed over the runs, and
    /// that sum with the deltas taken since (see [`CoverageService::take_memory`]).
    memory: std::sync::Mutex<(std::time::Instant, usize)>,
}

/// How often the memory of all runs is summed again (see [`CoverageService::take_memory`]).
const MEMORY_RESCAN: std::time::Duration = std::time::Duration::from_millis(100);

impl CoverageService {
    /// A service that keeps everything in memory (a [`MemoryStore`] without a cap).
    pub fn new(limits: Limits) -> CoverageService {
        CoverageService::with_storage(limits, Arc::new(MemoryStore::new(None)))
    }

    fn with_storage(limits: Limits, storage: Arc<dyn Storage>) -> CoverageService {
        CoverageService {
            shared: Arc::new(Shared {
                runs: DashMap::new(),
                interner: PathInterner::default(),
                deltas_in_flight: Arc::new(tokio::sync::Semaphore::new(
                    limits.max_deltas_in_flight.max(1),
                )),
                cache: cache::Cache::new(limits.memory_budget_bytes),
                limits,
                storage,
                runs_evicted: std::sync::atomic::AtomicU64::new(0),
                memory: std::sync::Mutex::new((std::time::Instant::now(), 0)),
            }),
        }
    }

    /// Waits for a slot to decode and apply a delta in: a stream holds one from before it
    /// decodes a delta until the delta is applied ([`Limits::max_deltas_in_flight`]).
    pub async fn delta_slot(&self) -> tokio::sync::OwnedSemaphorePermit {
        self.shared
            .deltas_in_flight
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed")
    }

    /// A service over `storage`, with every run it holds recovered. Blocking.
    pub fn open(
        limits: Limits,
        storage: Arc<dyn Storage>,
    ) -> Result<(CoverageService, Recovery), StoreError> {
        let service = CoverageService::with_storage(limits, storage);
        let recovery = service.recover()?;
        service.follow_changes();
        Ok((service, recovery))
    }

    /// How many handles to this service exist (the daemon waits for its own to be the last
    /// one before it stops, so the store closes and its lock is released).
    pub fn handles(&self) -> usize {
        Arc::strong_count(&self.shared)
    }

    /// Whether acknowledgements mean "on disk".
    pub fn is_durable(&self) -> bool {
        self.shared.storage.is_durable()
    }

    /// Why the store refuses writes, if it does.
    pub fn store_failure(&self) -> Option<String> {
        self.shared.storage.failure()
    }

    /// Writes the run's record as it is now. Serialized per run so the newest lands last.
    async fn persist_run(&self, run: &Run) -> Result<()> {
        let _order = run.record_lock.lock().await;
        let record = durable::run_record(run, &run.state());
        self.shared
            .storage
            .write(vec![Write::PutRun(record)])
            .await?;
        run.stored.store(true, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    pub fn limits(&self) -> &Limits {
        &self.shared.limits
    }

    /// Opens a run, or confirms an existing one. Returns whether it was created.
    pub async fn open_run(&self, run_id: &str, params: RunParams) -> Result<(bool, RunStatus)> {
        self.open_run_with_files(run_id, params, Vec::new()).await
    }

    /// [`CoverageService::open_run`], also giving the repository's files (`git ls-files`),
    /// which replace any list given before. Delta paths outside the list are reported back.
    pub async fn open_run_with_files(
        &self,
        run_id: &str,
        params: RunParams,
        known_files: Vec<String>,
    ) -> Result<(bool, RunStatus)> {
        self.open_run_as(run_id, params, known_files, &anyone).await
    }

    /// [`CoverageService::open_run_with_files`] for a caller that may write only some
    /// projects: `owner` is asked about the project of the run when it exists already (it
    /// answers why not, or nothing), at the moment the run is found, so no other open can
    /// slip in between.
    pub async fn open_run_as(
        &self,
        run_id: &str,
        params: RunParams,
        known_files: Vec<String>,
        owner: Owner<'_>,
    ) -> Result<(bool, RunStatus)> {
        let limits = &self.shared.limits;
        if known_files.len() > limits.max_files_per_run {
            return Err(limits.exceeded(
                format!("{} known files", known_files.len()),
                "max-files-per-run",
                limits.max_files_per_run,
            ));
        }
        let known_files: Vec<String> = known_files
            .into_iter()
            .map(|f| crate::model::path::normalize(&f).into_owned())
            .collect();
        for (i, f) in known_files.iter().enumerate() {
            crate::model::path::check(f)
                .map_err(|e| Error::invalid(format!("known_files[{i}]"), e.to_string()))?;
        }
        check_run_id(limits, "run_id", run_id)?;
        let params = normalize_params(limits, params)?;
        if params.expected_shards.len() > limits.max_shards_per_run {
            return Err(limits.exceeded(
                format!("{} expected shards", params.expected_shards.len()),
                "max-shards-per-run",
                limits.max_shards_per_run,
            ));
        }
        self.make_room(run_id).await?;
        self.refreshed(run_id).await?;
        let (created, run) = self.get_or_create(run_id, &params, owner)?;
        if !created {
            reconcile(&run, &params)?;
        }
        // Every open stores the record: an open that was answered is on disk, even if an
        // earlier one's write failed.
        self.persist_run(&run).await?;
        if !known_files.is_empty() {
            self.shared
                .storage
                .write(vec![Write::PutFiles {
                    run_id: run.id.clone(),
                    files: known_files.clone(),
                }])
                .await?;
            run.state().known_files =
                Some(Arc::new(crate::model::path::RepoFiles::new(known_files)));
        }
        Ok((created, run.status()))
    }

    pub fn run_status(&self, run_id: &str) -> Result<RunStatus> {
        Ok(self.run(run_id)?.status())
    }

    /// The project a run belongs to (as kept), without building its whole status: every call
    /// that names a run asks it, for its token's reach.
    pub fn run_project(&self, run_id: &str) -> Result<String> {
        // A run's project never changes: one held here answers without asking a shared store
        // (the call itself brings the run up to date right after).
        let held = self.shared.runs.get(run_id).map(|r| r.value().clone());
        let run = match held {
            Some(run) => run,
            None => self.run(run_id)?,
        };
        Ok(run.state().params.project.clone())
    }

    /// A receiver that changes whenever the run does.
    pub fn watch_run(&self, run_id: &str) -> Result<tokio::sync::watch::Receiver<u64>> {
        Ok(self.run(run_id)?.subscribe())
    }

    /// A value that changes whenever a run is opened, changes or goes (for the dashboard's
    /// live updates: cheap enough to read a few times a second).
    pub fn runs_fingerprint(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut all: Vec<(String, u64)> = self
            .shared
            .runs
            .iter()
            .map(|e| (e.key().clone(), *e.value().subscribe().borrow()))
            .collect();
        all.sort_unstable();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        all.hash(&mut h);
        h.finish()
    }

    /// Runs, newest first: at most `limit`, or `--runs-listed` when `limit` is 0 or more.
    pub fn list_runs(&self, limit: usize, project: Option<&str>) -> Vec<RunStatus> {
        self.list_runs_where(limit, project, |_, _| true)
    }

    /// [`CoverageService::list_runs`] of the runs `keep` (given a run's id and project) keeps.
    pub fn list_runs_where(
        &self,
        limit: usize,
        project: Option<&str>,
        keep: impl Fn(&str, &str) -> bool,
    ) -> Vec<RunStatus> {
        let most = self.shared.limits.runs_listed;
        let limit = if limit == 0 { most } else { limit.min(most) };
        let mut runs: Vec<Arc<Run>> = self.shared.runs.iter().map(|e| e.value().clone()).collect();
        runs.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(a.id.cmp(&b.id)));
        runs.into_iter()
            .filter(|r| {
                let state = r.state();
                project.is_none_or(|p| state.params.project == p)
                    && keep(&r.id, &state.params.project)
            })
            .take(limit)
            .map(|r| r.status())
            .collect()
    }

    /// How many runs the daemon holds, and how many of them are not complete.
    pub fn run_counts(&self) -> (usize, usize) {
        // The runs first, then each one's state: no run lock is taken inside the map's.
        let runs: Vec<Arc<Run>> = self.shared.runs.iter().map(|e| e.value().clone()).collect();
        let open = runs.iter().filter(|r| !r.state().is_complete()).count();
        (runs.len(), open)
    }

    /// Settled runs that gave up their raw data early for a new run at `--max-runs`, since the
    /// daemon started.
    pub fn runs_evicted(&self) -> u64 {
        self.shared
            .runs_evicted
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Deletes a run, its data and its summary.
    pub async fn delete_run(&self, run_id: &str) -> Result<()> {
        self.run(run_id)?;
        self.shared
            .storage
            .write(vec![Write::DeleteRun {
                run_id: run_id.to_owned(),
                summary: None,
            }])
            .await?;
        if let Some((_, run)) = self.shared.runs.remove(run_id) {
            run.state().deleted = true;
            run.notify();
        }
        self.shared.cache.forget(run_id);
        self.shared.interner.prune();
        Ok(())
    }

    fn run(&self, run_id: &str) -> Result<Arc<Run>> {
        self.refresh(run_id)?;
        self.shared
            .runs
            .get(run_id)
            .map(|r| r.value().clone())
            .ok_or_else(|| Error::RunNotFound(run_id.to_owned()))
    }

    /// The run's aggregate, read back from storage if the run left memory. Blocking: call
    /// from a blocking thread.
    fn resident(&self, run: &Arc<Run>) -> Result<Arc<Aggregate>> {
        let (aggregate, loaded) = run.load(&self.shared.interner, &*self.shared.storage)?;
        if loaded {
            self.shared.cache.admit(run, aggregate.heap_bytes());
        } else {
            self.shared.cache.touch(run);
        }
        Ok(aggregate)
    }

    /// Takes `adding` estimated bytes of coverage from `--max-memory`, or refuses. The runs'
    /// estimates are summed at most every [`MEMORY_RESCAN`]: a sum over thousands of runs for
    /// each delta would cost as much as merging it. Between sums, each delta's estimate is
    /// added, so a burst of deltas is counted before the next sum sees it merged.
    pub(super) fn take_memory(&self, adding: usize) -> Result<()> {
        let limits = self.limits();
        let mut memory = self.shared.memory.lock().unwrap_or_else(|e| e.into_inner());
        if memory.0.elapsed() >= MEMORY_RESCAN {
            *memory = (std::time::Instant::now(), self.memory_held());
        }
        let total = memory.1.saturating_add(adding);
        if total > limits.max_memory_bytes {
            return Err(limits.exceeded(
                format!(
                    "the daemon would hold about {} MiB of coverage in memory",
                    total >> 20
                ),
                "max-memory",
                limits.max_memory_bytes,
            ));
        }
        memory.1 = total;
        Ok(())
    }

    /// Gives back what [`CoverageService::take_memory`] took for a delta that was not stored.
    pub(super) fn release_memory(&self, adding: usize) {
        let mut memory = self.shared.memory.lock().unwrap_or_else(|e| e.into_inner());
        memory.1 = memory.1.saturating_sub(adding);
    }

    /// Estimated bytes of coverage in memory: every run's aggregate that is in memory (open
    /// runs, complete runs the cache holds or has yet to take).
    fn memory_held(&self) -> usize {
        // The runs first, then each one's state: no run lock is taken inside the map's.
        let runs: Vec<Arc<Run>> = self.shared.runs.iter().map(|e| e.value().clone()).collect();
        runs.iter()
            .filter_map(|r| r.aggregate())
            .map(|a| a.estimated_bytes())
            .fold(0usize, usize::saturating_add)
    }

    /// Bytes of complete runs' aggregates in memory, and how many such runs.
    pub fn cached_bytes(&self) -> (usize, usize) {
        self.shared.cache.usage()
    }

    fn get_or_create(
        &self,
        run_id: &str,
        params: &RunParams,
        owner: Owner<'_>,
    ) -> Result<(bool, Arc<Run>)> {
        // The run's lock is taken after the map's guard is let go.
        let owned = |run: Arc<Run>| {
            let project = run.state().params.project.clone();
            match owner(&project) {
                Some(why) => Err(Error::PermissionDenied(why)),
                None => Ok((false, run)),
            }
        };
        let found = self.shared.runs.get(run_id).map(|r| r.value().clone());
        if let Some(run) = found {
            return owned(run);
        }
        // Checked before the entry lock: `len` visits every map shard, including the one the
        // entry would hold. A race can overshoot the limit by the number of concurrent opens.
        let limits = &self.shared.limits;
        if self.shared.runs.len() >= limits.max_runs {
            return Err(limits.exceeded(
                format!(
                    "a new run `{run_id}` while the daemon holds {}, none of them settled",
                    self.shared.runs.len()
                ),
                "max-runs",
                limits.max_runs,
            ));
        }
        let existing = match self.shared.runs.entry(run_id.to_owned()) {
            Entry::Occupied(e) => e.get().clone(),
            Entry::Vacant(e) => {
                let run = Arc::new(Run::new(run_id.to_owned(), params.clone()));
                e.insert(run.clone());
                return Ok((true, run));
            }
        };
        owned(existing)
    }
}

/// Asked about an existing run's project before a caller writes to it: why the caller may not,
/// or nothing (see [`CoverageService::open_run_as`]).
pub type Owner<'a> = &'a (dyn Fn(&str) -> Option<String> + Sync);

/// The owner check of a caller who may write every run.
pub fn anyone(_project: &str) -> Option<String> {
    None
}

/// A run id: a name within `--max-run-id-bytes`.
fn check_run_id(limits: &Limits, field: &str, id: &str) -> Result<()> {
    check_name(
        limits,
        field,
        id,
        "max-run-id-bytes",
        limits.max_run_id_bytes,
    )
}

/// A shard id: a name within `--max-shard-id-bytes`.
fn check_shard_id(limits: &Limits, field: &str, id: &str) -> Result<()> {
    check_name(
        limits,
        field,
        id,
        "max-shard-id-bytes",
        limits.max_shard_id_bytes,
    )
}

/// Run and shard names: printable ASCII without spaces, so they are safe in logs, file names
/// and URLs.
fn check_name(limits: &Limits, field: &str, name: &str, setting: &str, max: usize) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if name.len() > max {
        return Err(limits.exceeded(
            format!("{field} is {} bytes long", name.len()),
            setting,
            max,
        ));
    }
    if let Some(c) = name.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(Error::invalid(
            field,
            format!("contains {c:?}; only printable ASCII without spaces is allowed"),
        ));
    }
    Ok(())
}

fn normalize_params(limits: &Limits, mut params: RunParams) -> Result<RunParams> {
    for (i, s) in params.expected_shards.iter().enumerate() {
        check_shard_id(limits, &format!("params.expected_shards[{i}]"), s)?;
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = params.expected_shards.iter().find(|s| !seen.insert(*s)) {
        return Err(Error::invalid(
            "params.expected_shards",
            format!("shard `{dup}` is listed twice"),
        ));
    }
    let fields = [
        ("params.project".to_owned(), &params.project),
        ("params.commit".to_owned(), &params.commit),
        ("params.branch".to_owned(), &params.branch),
    ];
    let flags = params
        .flags
        .iter()
        .enumerate()
        .map(|(i, f)| (format!("params.flags[{i}]"), f));
    for (field, value) in fields.into_iter().chain(flags) {
        if value.len() > limits.max_run_field_bytes {
            return Err(limits.exceeded(
                format!("{field} is {} bytes long", value.len()),
                "max-run-field-bytes",
                limits.max_run_field_bytes,
            ));
        }
        if value.chars().any(char::is_control) {
            return Err(Error::invalid(field, "must not contain control characters"));
        }
    }
    params.expected_shards.sort_by(|a, b| natural_cmp(a, b));
    Ok(params)
}

/// Orders `2` before `10`, so `--shards 16` lists shards as people count them.
fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(x), Ok(y)) => x.cmp(&y),
        _ => a.cmp(b),
    }
}

/// Checks a second open against the run's parameters; may declare expectations on a run a
/// push opened implicitly.
fn reconcile(run: &Run, params: &RunParams) -> Result<()> {
    let mut state = run.state();
    let current = &mut state.params;
    for (field, have, want) in [
        ("project", &current.project, &params.project),
        ("commit", &current.commit, &params.commit),
        ("branch", &current.branch, &params.branch),
    ] {
        if !have.is_empty() && !want.is_empty() && have != want {
            return Err(Error::AlreadyExists(format!(
                "run `{}` exists with {field} `{have}`, not `{want}`",
                run.id
            )));
        }
    }
    if !current.flags.is_empty() && !params.flags.is_empty() && current.flags != params.flags {
        return Err(Error::AlreadyExists(format!(
            "run `{}` exists with different flags ({:?})",
            run.id, current.flags
        )));
    }
    let declare = current.expected_shards.is_empty() && !params.expected_shards.is_empty();
    if !current.expected_shards.is_empty()
        && !params.expected_shards.is_empty()
        && current.expected_shards != params.expected_shards
    {
        return Err(Error::AlreadyExists(format!(
            "run `{}` exists expecting shards ({}), not ({})",
            run.id,
            run::abbreviate(&current.expected_shards),
            run::abbreviate(&params.expected_shards)
        )));
    }
    if declare
        && let Some(stray) = state
            .shards
            .keys()
            .find(|s| !params.expected_shards.contains(s))
    {
        return Err(Error::AlreadyExists(format!(
            "run `{}` already received shard `{stray}`, which the expected shards ({}) \
                 do not include",
            run.id,
            run::abbreviate(&params.expected_shards)
        )));
    }
    let current = &mut state.params;
    for (have, want) in [
        (&mut current.project, &params.project),
        (&mut current.commit, &params.commit),
        (&mut current.branch, &params.branch),
    ] {
        if have.is_empty() {
            have.clone_from(want);
        }
    }
    if current.flags.is_empty() {
        current.flags.clone_from(&params.flags);
    }
    if declare {
        current.expected_shards.clone_from(&params.expected_shards);
        for id in &params.expected_shards {
            state.shards.entry(id.clone()).or_default().expected = true;
        }
        state.update_completion();
    }
    drop(state);
    run.notify();
    Ok(())
}
