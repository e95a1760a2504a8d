//! The [`Storage`] of cluster mode: what a node commits goes to PostgreSQL and object storage
//! by the stage, upload, publish protocol (see `docs/cluster.md`), grouped as the embedded
//! store groups its commits.
//!
//! A group of calls becomes at most one segment: the bytes of its deltas, of a compacted run's
//! merged parts and of shards' lines, one after the other in one object. The segment is staged,
//! uploaded, then published in one transaction that applies every call's writes, each call
//! under a savepoint of its own: a call whose delta another node acknowledged first (or whose
//! attempt another node replaced) is refused alone, with nothing of it applied, and the others
//! commit. Only then are the calls answered.
//!
//! Unlike the embedded store, a failure does not latch: a transaction that did not commit
//! changed nothing, and the next may succeed once PostgreSQL or object storage is back. A
//! commit whose outcome is unknown (the connection dropped during it) is answered as failed;
//! the client resends, and the catalogue says whether it had counted.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use roaring::RoaringBitmap;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::{Client, GenericClient, IsolationLevel};

use super::{ClusterError, Node};
use crate::model::{FileBatch, FileCoverage};
use crate::persist::codec::{self, WireDecoder};
use crate::persist::records::FileListRecord;
use crate::persist::{
    AttemptRecord, CommitStats, Digest, HistoryQuery, LoadedRun, MonthRecord, RunRecord,
    ShardRecord, Storage, StoreError, SummaryRecord, TestHistoryRecord, Write,
};

/// Most calls in one group (one segment, one transaction).
const MAX_GROUP: usize = 256;

/// How often a node sweeps, and how long a segment may stay staged before it is taken for
/// abandoned (a node's upload and publish take seconds; this leaves room for a slow store).
const SWEEP_EVERY: Duration = Duration::from_secs(60);
const ABANDONED_AFTER: Duration = Duration::from_secs(600);

/// The shared store of a cluster node.
#[derive(Debug)]
pub struct ClusterStore {
    node: Arc<Node>,
    calls: mpsc::UnboundedSender<Call>,
    runtime: tokio::runtime::Handle,
    stats: Arc<CommitStats>,
    wire: Option<WireDecoder>,
    sweeper: tokio::task::AbortHandle,
    /// What other nodes change, until the service takes it.
    changes: std::sync::Mutex<Option<mpsc::UnboundedReceiver<Option<String>>>>,
    listener: tokio::task::AbortHandle,
}

/// A caller's writes on their way to the writer, and where its answer goes.
struct Call {
    writes: Vec<Write>,
    /// The parts of each `Compact` among `writes`, in order, taken before the call was sent.
    merged: Vec<Vec<Vec<u8>>>,
    done: oneshot::Sender<Result<(), StoreError>>,
}

impl ClusterStore {
    /// A node named `name` over the catalogue at `postgres` and the segments in `segments`.
    /// Connects twice: one connection commits, the other reads (and sweeps).
    pub async fn connect(
        name: &str,
        postgres: &str,
        segments: super::Segments,
    ) -> Result<ClusterStore, ClusterError> {
        let catalogue = super::Catalogue::connect(postgres).await?;
        let writer = Writer {
            url: postgres.to_owned(),
            client: Some(super::catalogue::connect(postgres).await?),
        };
        let node = Arc::new(Node::new(name, catalogue, segments));
        let stats = Arc::new(CommitStats::default());
        let (calls, queue) = mpsc::unbounded_channel();
        tokio::spawn(write_loop(writer, node.clone(), stats.clone(), queue));
        let sweeping = node.clone();
        let sweeper = tokio::spawn(async move {
            loop {
                tokio::time::sleep(SWEEP_EVERY).await;
                match sweeping.sweep(ABANDONED_AFTER).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!("swept {n} segments nothing refers to"),
                    Err(e) => tracing::warn!("sweeping segments failed: {e}"),
                }
            }
        })
        .abort_handle();
        let (changes, listener) = super::catalogue::listen(postgres.to_owned(), name.to_owned());
        Ok(ClusterStore {
            node,
            calls,
            runtime: tokio::runtime::Handle::current(),
            stats,
            wire: None,
            sweeper,
            changes: std::sync::Mutex::new(Some(changes)),
            listener,
        })
    }

    /// Gives the store the protocol's decoder for deltas kept in wire form (see
    /// [`crate::persist::SqliteStore::with_wire_decoder`]).
    pub fn with_wire_decoder(mut self, decode: WireDecoder) -> ClusterStore {
        self.wire = Some(decode);
        self
    }

    /// The node's side of the two stores.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// Runs `f` to its end from a blocking caller (a blocking thread, or a test's async body
    /// on the multi-threaded runtime: the trait's reads are blocking).
    fn block<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::task::block_in_place(|| self.runtime.block_on(f))
        } else {
            self.runtime.block_on(f)
        }
    }

    fn send(
        &self,
        writes: Vec<Write>,
    ) -> Result<oneshot::Receiver<Result<(), StoreError>>, StoreError> {
        let mut merged = Vec::new();
        for w in &writes {
            if let Write::Compact { parts, .. } = w {
                let mut all = Vec::new();
                parts.for_each(|_, part| {
                    all.push(part);
                    Ok::<(), StoreError>(())
                })?;
                merged.push(all);
            }
        }
        let (done, answer) = oneshot::channel();
        self.calls
            .send(Call {
                writes,
                merged,
                done,
            })
            .map_err(|_| StoreError::Failed("the cluster store's writer has stopped".into()))?;
        Ok(answer)
    }

    async fn reads(&self) -> Result<tokio::sync::MutexGuard<'_, Client>, StoreError> {
        Ok(self.node.catalogue().client().await?)
    }
}

impl Drop for ClusterStore {
    fn drop(&mut self) {
        self.sweeper.abort();
        self.listener.abort();
    }
}

fn answered(
    answer: Result<Result<(), StoreError>, oneshot::error::RecvError>,
) -> Result<(), StoreError> {
    answer.unwrap_or_else(|_| {
        Err(StoreError::Failed(
            "the cluster store's writer has stopped".into(),
        ))
    })
}

impl From<ClusterError> for StoreError {
    fn from(e: ClusterError) -> StoreError {
        StoreError::Shared(e.to_string())
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> StoreError {
        ClusterError::from(e).into()
    }
}

/// The writer's connection, made anew when the last one ended.
struct Writer {
    url: String,
    client: Option<Client>,
}

impl Writer {
    async fn client(&mut self) -> Result<&mut Client, ClusterError> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            self.client = None;
            self.client = Some(super::catalogue::connect(&self.url).await?);
        }
        Ok(self.client.as_mut().expect("connected above"))
    }
}

/// Takes calls as they come and commits each group of those waiting together.
async fn write_loop(
    mut writer: Writer,
    node: Arc<Node>,
    stats: Arc<CommitStats>,
    mut queue: mpsc::UnboundedReceiver<Call>,
) {
    while let Some(first) = queue.recv().await {
        let mut calls = vec![first];
        while calls.len() < MAX_GROUP {
            match queue.try_recv() {
                Ok(call) => calls.push(call),
                Err(_) => break,
            }
        }
        let n: u64 = calls.iter().map(|c| c.writes.len() as u64).sum();
        let mut answers = Vec::with_capacity(calls.len());
        let mut group = Vec::with_capacity(calls.len());
        for call in calls {
            answers.push(call.done);
            group.push((call.writes, call.merged));
        }
        let committed = match writer.client().await {
            Ok(client) => commit_group(client, &node, group).await,
            Err(e) => Err(e),
        };
        match committed {
            Ok(results) => {
                stats.commits.fetch_add(1, Ordering::Relaxed);
                stats.writes.fetch_add(n, Ordering::Relaxed);
                for (done, result) in answers.into_iter().zip(results) {
                    let _ = done.send(result.map_err(StoreError::Conflict));
                }
            }
            Err(e) => {
                tracing::warn!("a commit to the cluster's stores failed: {e}");
                for done in answers {
                    let _ = done.send(Err(StoreError::Shared(e.to_string())));
                }
            }
        }
    }
}

/// A call's writes, and the parts of each of its compactions.
type Group = (Vec<Write>, Vec<Vec<Vec<u8>>>);

/// Where the bytes of each write that has any are in the group's segment (a range per delta
/// or part), in the order `apply` takes them.
type Places = std::collections::VecDeque<Vec<Range<u64>>>;

/// Stages, uploads and publishes one group: each call's outcome (a refusal says why), or the
/// group's failure (nothing of it committed).
async fn commit_group(
    client: &mut Client,
    node: &Node,
    group: Vec<Group>,
) -> Result<Vec<Result<(), String>>, ClusterError> {
    // The segment: every byte the group stores, in the order of its writes.
    let mut object: Vec<Bytes> = Vec::new();
    let mut at = 0u64;
    let mut calls = Vec::with_capacity(group.len());
    for (mut writes, merged) in group {
        let mut places = Places::new();
        let mut merged = merged.into_iter();
        for w in &mut writes {
            let bytes: Vec<Bytes> = match w {
                Write::AppendDelta { body, .. } => {
                    // One range over the record's pieces.
                    let len: u64 = body.iter().map(|b| b.len() as u64).sum();
                    object.extend(body.iter().cloned());
                    places.push_back(std::iter::once(at..at + len).collect());
                    at += len;
                    continue;
                }
                Write::Compact { .. } => merged
                    .next()
                    .unwrap_or_default()
                    .into_iter()
                    .map(Bytes::from)
                    .collect(),
                Write::PutShardLines { parts, .. } => {
                    std::mem::take(parts).into_iter().map(Bytes::from).collect()
                }
                _ => continue,
            };
            let mut ranges = Vec::with_capacity(bytes.len());
            for b in bytes {
                let len = b.len() as u64;
                ranges.push(at..at + len);
                at += len;
                object.push(b);
            }
            places.push_back(ranges);
        }
        calls.push((writes, places));
    }
    let segment = if object.is_empty() {
        None
    } else {
        Some(node.stage_object(object).await?)
    };
    let mut tx = client.transaction().await?;
    if let Some(id) = segment {
        let published = tx
            .execute(
                "UPDATE covd_segments SET state = 'published' WHERE id = $1 AND state = 'staged'",
                &[&id],
            )
            .await?;
        if published != 1 {
            return Err(ClusterError::Swept(id));
        }
    }
    let mut results = Vec::with_capacity(calls.len());
    let mut changed = std::collections::BTreeSet::new();
    for (writes, mut places) in calls {
        let runs: Vec<String> = writes.iter().filter_map(changed_run).collect();
        let mut sp = tx.savepoint("call").await?;
        let mut outcome = Ok(());
        for w in writes {
            match apply(&mut sp, segment, w, &mut places).await {
                Ok(()) => {}
                Err(Fail::Refused(why)) => {
                    outcome = Err(why);
                    break;
                }
                // PostgreSQL refused a statement of this call (a deadlock with another node,
                // a value it does not take): this call is rolled back, the others go on.
                Err(Fail::Store(ClusterError::Postgres(e))) if e.as_db_error().is_some() => {
                    outcome = Err(format!("the cluster's PostgreSQL refused it: {e}"));
                    break;
                }
                Err(Fail::Store(e)) => return Err(e),
            }
        }
        match outcome {
            Ok(()) => {
                sp.commit().await?;
                changed.extend(runs);
            }
            Err(_) => sp.rollback().await?,
        }
        results.push(outcome);
    }
    // Heard by the other nodes once this commits (see `catalogue::listen`).
    for run in changed {
        tx.execute(
            "SELECT pg_notify($1, $2)",
            &[
                &super::catalogue::CHANGES,
                &format!("{}\n{run}", node.name()),
            ],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(results)
}

/// The run a write changes, that other nodes holding it must hear of.
fn changed_run(w: &Write) -> Option<String> {
    match w {
        Write::PutRun(r) | Write::UpdateRun(r) => Some(r.run_id.clone()),
        Write::PutShard { run_id, .. }
        | Write::AppendDelta { run_id, .. }
        | Write::StartAttempt { run_id, .. }
        | Write::Compact { run_id, .. }
        | Write::Reopen { run_id }
        | Write::PutFiles { run_id, .. }
        | Write::DeleteRun { run_id, .. } => Some(run_id.clone()),
        Write::PutShardLines { .. }
        | Write::DropDeltas { .. }
        | Write::DownSample { .. }
        | Write::PutSources { .. }
        | Write::RecordTests { .. } => None,
    }
}

/// Why a write was not applied: the call is refused (another node got there first), or the
/// group fails.
enum Fail {
    Refused(String),
    Store(ClusterError),
}

impl From<tokio_postgres::Error> for Fail {
    fn from(e: tokio_postgres::Error) -> Fail {
        Fail::Store(e.into())
    }
}

impl From<ClusterError> for Fail {
    fn from(e: ClusterError) -> Fail {
        Fail::Store(e)
    }
}

impl From<crate::persist::CodecError> for Fail {
    fn from(e: crate::persist::CodecError) -> Fail {
        Fail::Store(ClusterError::Config(format!(
            "a stored record is unreadable: {e}"
        )))
    }
}

fn big(n: u64) -> Result<i64, ClusterError> {
    i64::try_from(n).map_err(|_| ClusterError::Config(format!("{n} is beyond PostgreSQL's bigint")))
}

/// Whether the run is stored, holding it so that no other node deletes it before the call
/// commits.
async fn stored(tx: &impl GenericClient, run_id: &str) -> Result<bool, Fail> {
    Ok(tx
        .query_opt(
            "SELECT 1 FROM covd_runs WHERE run_id = $1 FOR KEY SHARE",
            &[&run_id],
        )
        .await?
        .is_some())
}

/// Inserts the rows that place `parts` (ranges of the segment) in `table` for the run (and
/// the shard, for shards' lines).
async fn place_parts(
    tx: &impl GenericClient,
    segment: Option<i64>,
    sql: &str,
    run_id: &str,
    shard_id: Option<&str>,
    parts: impl Iterator<Item = Range<u64>>,
) -> Result<(), Fail> {
    let Some(segment) = segment else {
        return Ok(());
    };
    for (i, r) in parts.enumerate() {
        let (part, start, len) = (i as i32, big(r.start)?, big(r.end - r.start)?);
        match shard_id {
            Some(shard) => {
                tx.execute(sql, &[&run_id, &shard, &part, &segment, &start, &len])
                    .await?
            }
            None => {
                tx.execute(sql, &[&run_id, &part, &segment, &start, &len])
                    .await?
            }
        };
    }
    Ok(())
}

/// Applies one write, as the embedded store does: a write for a run that is not stored is
/// dropped. What a shard's progress depends on is checked against the catalogue: a delta
/// advances its shard only from the sequence before it, at its attempt; an attempt starts
/// only over a lower one; a shard's record never goes back.
async fn apply(
    tx: &mut tokio_postgres::Transaction<'_>,
    segment: Option<i64>,
    w: Write,
    places: &mut Places,
) -> Result<(), Fail> {
    match w {
        Write::PutRun(mut run) => {
            let old = tx
                .query_opt(
                    "SELECT record FROM covd_runs WHERE run_id = $1 FOR UPDATE",
                    &[&run.run_id],
                )
                .await?;
            // Completion and kept deltas are `UpdateRun`'s to say.
            if let Some(old) = old {
                let old = codec::decode::<RunRecord>(old.get::<_, &[u8]>(0))?;
                run.completed_at_ms = old.completed_at_ms;
                run.deltas_kept = old.deltas_kept;
            }
            tx.execute(
                "INSERT INTO covd_runs (run_id, record) VALUES ($1, $2)
                 ON CONFLICT (run_id) DO UPDATE SET record = EXCLUDED.record",
                &[&run.run_id, &codec::encode(&run)],
            )
            .await?;
        }
        Write::UpdateRun(run) => {
            tx.execute(
                "UPDATE covd_runs SET record = $2 WHERE run_id = $1",
                &[&run.run_id, &codec::encode(&run)],
            )
            .await?;
        }
        Write::PutShard { run_id, shard } => {
            if stored(tx, &run_id).await? {
                put_shard(tx, &run_id, &shard, "record", NEVER_BACK).await?;
            }
        }
        Write::AppendDelta { run_id, shard, .. } => {
            let place = places.pop_front().expect("a place for each delta")[0].clone();
            if !stored(tx, &run_id).await? {
                return Ok(());
            }
            let (attempt, seq) = (shard.attempt as i32, big(shard.last_seq)?);
            let record = codec::encode(&shard);
            let advanced = tx
                .execute(
                    "UPDATE covd_shards SET acked_seq = $4::bigint, record = $5
                     WHERE run_id = $1 AND shard_id = $2 AND attempt = $3
                       AND acked_seq = $4::bigint - 1",
                    &[&run_id, &shard.shard_id, &attempt, &seq, &record],
                )
                .await?
                == 1
                || (seq == 1
                    && tx
                        .execute(
                            "INSERT INTO covd_shards (run_id, shard_id, attempt, acked_seq, record)
                             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                            &[&run_id, &shard.shard_id, &attempt, &seq, &record],
                        )
                        .await?
                        == 1);
            if !advanced {
                return Err(Fail::Refused(refusal(tx, &run_id, &shard, "delta").await?));
            }
            let segment = segment.expect("a segment holds the group's deltas");
            tx.execute(
                "INSERT INTO covd_segment_deltas
                 (segment_id, run_id, shard_id, attempt, seq, start_offset, length, published)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, true)",
                &[
                    &segment,
                    &run_id,
                    &shard.shard_id,
                    &attempt,
                    &seq,
                    &big(place.start)?,
                    &big(place.end - place.start)?,
                ],
            )
            .await?;
        }
        Write::StartAttempt {
            run_id,
            shard,
            replaced,
        } => {
            if !stored(tx, &run_id).await? {
                return Ok(());
            }
            put_shard(tx, &run_id, &shard, "attempt", STARTS_LATER).await?;
            if let Some(a) = replaced {
                tx.execute(
                    "INSERT INTO covd_attempts (run_id, shard_id, attempt, record)
                     VALUES ($1, $2, $3, $4)
                     ON CONFLICT (run_id, shard_id, attempt) DO UPDATE SET record = EXCLUDED.record",
                    &[&run_id, &a.shard_id, &(a.attempt as i32), &codec::encode(&a)],
                )
                .await?;
            }
            tx.execute(
                "DELETE FROM covd_segment_deltas WHERE run_id = $1 AND shard_id = $2 AND attempt < $3",
                &[&run_id, &shard.shard_id, &(shard.attempt as i32)],
            )
            .await?;
        }
        Write::PutShardLines {
            run_id, shard_id, ..
        } => {
            let taken = places.pop_front().expect("places for each write of parts");
            if !stored(tx, &run_id).await? {
                return Ok(());
            }
            tx.execute(
                "DELETE FROM covd_shard_lines WHERE run_id = $1 AND shard_id = $2",
                &[&run_id, &shard_id],
            )
            .await?;
            place_parts(
                &*tx,
                segment,
                "INSERT INTO covd_shard_lines
                 (run_id, shard_id, part, segment_id, start_offset, length)
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &run_id,
                Some(&shard_id),
                taken.into_iter(),
            )
            .await?;
        }
        Write::Compact {
            run_id,
            summary,
            keep_deltas,
            ..
        } => {
            let taken = places.pop_front().expect("places for each write of parts");
            if !stored(tx, &run_id).await? {
                return Ok(());
            }
            tx.execute("DELETE FROM covd_merged WHERE run_id = $1", &[&run_id])
                .await?;
            place_parts(
                &*tx,
                segment,
                "INSERT INTO covd_merged (run_id, part, segment_id, start_offset, length)
                 VALUES ($1, $2, $3, $4, $5)",
                &run_id,
                None,
                taken.into_iter(),
            )
            .await?;
            put_summary(tx, &summary).await?;
            if !keep_deltas {
                drop_deltas(tx, &run_id).await?;
            }
        }
        Write::DropDeltas { run_id } => drop_deltas(tx, &run_id).await?,
        Write::Reopen { run_id } => {
            tx.execute("DELETE FROM covd_merged WHERE run_id = $1", &[&run_id])
                .await?;
        }
        Write::PutFiles { run_id, files } => {
            tx.execute(
                "UPDATE covd_runs SET files = $2 WHERE run_id = $1",
                &[&run_id, &codec::encode(&FileListRecord { paths: files })],
            )
            .await?;
        }
        Write::DeleteRun { run_id, summary } => delete_run(tx, &run_id, summary).await?,
        Write::DownSample {
            before_ms,
            tests_before_ms,
        } => down_sample(tx, before_ms, tests_before_ms).await?,
        Write::PutSources {
            run_id,
            texts,
            names,
        } => {
            if !stored(tx, &run_id).await? {
                return Ok(());
            }
            for (digest, body) in &texts {
                tx.execute(
                    "INSERT INTO covd_sources (digest, body) VALUES ($1, $2)
                     ON CONFLICT (digest) DO NOTHING",
                    &[&&digest[..], body],
                )
                .await?;
            }
            // A name whose text is not stored is left out, as the embedded store does.
            for (path, digest) in &names {
                tx.execute(
                    "INSERT INTO covd_source_names (run_id, path, digest)
                     SELECT $1, $2, $3 WHERE EXISTS (SELECT 1 FROM covd_sources WHERE digest = $3)
                     ON CONFLICT (run_id, path) DO UPDATE SET digest = EXCLUDED.digest",
                    &[&run_id, path, &&digest[..]],
                )
                .await?;
            }
        }
        Write::RecordTests {
            run_id,
            project,
            branch,
            outcomes,
        } => {
            if !stored(tx, &run_id).await? {
                return Ok(());
            }
            // Nodes recording the same branch's tests one after the other: a test seen for
            // the first time has no row to lock yet.
            tx.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended($1, 1))",
                &[&format!("tests\n{project}\n{branch}")],
            )
            .await?;
            for (test, outcome) in outcomes {
                let old = tx
                    .query_opt(
                        "SELECT record FROM covd_tests
                         WHERE project = $1 AND branch = $2 AND test = $3 FOR UPDATE",
                        &[&project, &branch, &test],
                    )
                    .await?
                    .map(|r| codec::decode_later::<TestHistoryRecord>(r.get::<_, &[u8]>(0)))
                    .transpose()?;
                let new = crate::flaky::record(old, outcome);
                tx.execute(
                    "INSERT INTO covd_tests (project, branch, test, last_seen_ms, record)
                     VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (project, branch, test) DO UPDATE
                     SET last_seen_ms = EXCLUDED.last_seen_ms, record = EXCLUDED.record",
                    &[
                        &project,
                        &branch,
                        &test,
                        &big(new.last_seen_ms)?,
                        &codec::encode(&new),
                    ],
                )
                .await?;
            }
        }
    }
    Ok(())
}

/// When a shard's stored record may be replaced: a new attempt only over an earlier one ...
const STARTS_LATER: &str = "covd_shards.attempt < EXCLUDED.attempt";
/// ... and any other record unless the catalogue holds a later attempt, or more of this one.
const NEVER_BACK: &str = "covd_shards.attempt < EXCLUDED.attempt
    OR (covd_shards.attempt = EXCLUDED.attempt AND covd_shards.acked_seq <= EXCLUDED.acked_seq)";

/// Stores a shard's record (its attempt and acknowledged sequence in their columns) where
/// `only` ([`STARTS_LATER`], [`NEVER_BACK`]) allows it; refuses the call otherwise, saying
/// what the catalogue holds.
async fn put_shard(
    tx: &impl GenericClient,
    run_id: &str,
    shard: &ShardRecord,
    what: &str,
    only: &str,
) -> Result<(), Fail> {
    let put = tx
        .execute(
            &format!(
                "INSERT INTO covd_shards (run_id, shard_id, attempt, acked_seq, record)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (run_id, shard_id) DO UPDATE
                 SET attempt = EXCLUDED.attempt, acked_seq = EXCLUDED.acked_seq,
                     record = EXCLUDED.record
                 WHERE {only}"
            ),
            &[
                &run_id,
                &shard.shard_id,
                &(shard.attempt as i32),
                &big(shard.last_seq)?,
                &codec::encode(shard),
            ],
        )
        .await?;
    if put != 1 {
        return Err(Fail::Refused(refusal(tx, run_id, shard, what).await?));
    }
    Ok(())
}

/// Why the catalogue refused a shard's progress: what it holds of the shard.
async fn refusal(
    tx: &impl GenericClient,
    run_id: &str,
    shard: &ShardRecord,
    what: &str,
) -> Result<String, Fail> {
    let row = tx
        .query_opt(
            "SELECT attempt, acked_seq FROM covd_shards WHERE run_id = $1 AND shard_id = $2",
            &[&run_id, &shard.shard_id],
        )
        .await?;
    let held = row.map_or("nothing".to_owned(), |r| {
        format!(
            "attempt {} with {} deltas acknowledged",
            r.get::<_, i32>(0),
            r.get::<_, i64>(1)
        )
    });
    Ok(format!(
        "another node changed shard `{}` of run `{run_id}` first: the cluster's catalogue holds \
         {held}, so this {what} (attempt {}, sequence {}) was not stored; reconnect to resume \
         from what it holds",
        shard.shard_id, shard.attempt, shard.last_seq
    ))
}

async fn put_summary(tx: &impl GenericClient, s: &SummaryRecord) -> Result<(), Fail> {
    tx.execute(
        "INSERT INTO covd_summaries (run_id, project, branch, created_at_ms, record)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (run_id) DO UPDATE
         SET project = EXCLUDED.project, branch = EXCLUDED.branch,
             created_at_ms = EXCLUDED.created_at_ms, record = EXCLUDED.record",
        &[
            &s.run_id,
            &s.project,
            &s.branch,
            &big(s.created_at_ms)?,
            &codec::encode(s),
        ],
    )
    .await?;
    Ok(())
}

async fn drop_deltas(tx: &impl GenericClient, run_id: &str) -> Result<(), Fail> {
    tx.execute(
        "DELETE FROM covd_segment_deltas WHERE run_id = $1",
        &[&run_id],
    )
    .await?;
    Ok(())
}

async fn delete_run(
    tx: &impl GenericClient,
    run_id: &str,
    summary: Option<SummaryRecord>,
) -> Result<(), Fail> {
    let record = tx
        .query_opt(
            "DELETE FROM covd_runs WHERE run_id = $1 RETURNING record",
            &[&run_id],
        )
        .await?;
    if let Some(record) = record {
        for table in [
            "covd_shards",
            "covd_attempts",
            "covd_merged",
            "covd_shard_lines",
            "covd_segment_deltas",
        ] {
            tx.execute(
                &format!("DELETE FROM {table} WHERE run_id = $1"),
                &[&run_id],
            )
            .await?;
        }
        // The texts it named that no other run names.
        tx.execute(
            "WITH named AS (DELETE FROM covd_source_names WHERE run_id = $1 RETURNING digest)
             DELETE FROM covd_sources s
             WHERE s.digest IN (SELECT digest FROM named)
               AND NOT EXISTS (SELECT 1 FROM covd_source_names n
                               WHERE n.digest = s.digest AND n.run_id <> $1)",
            &[&run_id],
        )
        .await?;
        if summary.is_none() {
            let run = codec::decode::<RunRecord>(record.get::<_, &[u8]>(0))?;
            forget_tests_of(tx, run_id, &run).await?;
        }
    }
    match summary {
        Some(s) => put_summary(tx, &s).await?,
        None => {
            tx.execute("DELETE FROM covd_summaries WHERE run_id = $1", &[&run_id])
                .await?;
        }
    }
    Ok(())
}

/// Takes a deleted run's outcomes out of the test histories of its branch.
async fn forget_tests_of(
    tx: &impl GenericClient,
    run_id: &str,
    run: &RunRecord,
) -> Result<(), Fail> {
    let run_key = crc32fast::hash(run_id.as_bytes());
    let rows = tx
        .query(
            "SELECT test, record FROM covd_tests WHERE project = $1 AND branch = $2 FOR UPDATE",
            &[&run.project, &run.branch],
        )
        .await?;
    for row in rows {
        let mut h = codec::decode_later::<TestHistoryRecord>(row.get::<_, &[u8]>(1))?;
        let before = h.recent.len();
        h.recent.retain(|r| r.run_key != run_key);
        if h.recent.len() != before {
            tx.execute(
                "UPDATE covd_tests SET record = $4 WHERE project = $1 AND branch = $2 AND test = $3",
                &[&run.project, &run.branch, &row.get::<_, &str>(0), &codec::encode(&h)],
            )
            .await?;
        }
    }
    Ok(())
}

async fn down_sample(
    tx: &impl GenericClient,
    before_ms: u64,
    tests_before_ms: u64,
) -> Result<(), Fail> {
    // One node folds at a time: a month made for the first time has no row to lock yet.
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended('months', 1))",
        &[],
    )
    .await?;
    // A run still held keeps its summary: it answers for itself until it expires.
    let rows = tx
        .query(
            "DELETE FROM covd_summaries s
             WHERE s.created_at_ms < $1
               AND NOT EXISTS (SELECT 1 FROM covd_runs r WHERE r.run_id = s.run_id)
             RETURNING record",
            &[&big(before_ms)?],
        )
        .await?;
    let old = rows
        .iter()
        .map(|r| codec::decode::<SummaryRecord>(r.get::<_, &[u8]>(0)))
        .collect::<Result<Vec<_>, _>>()?;
    let months = tx
        .query("SELECT record FROM covd_months FOR UPDATE", &[])
        .await?
        .iter()
        .map(|r| codec::decode_later::<MonthRecord>(r.get::<_, &[u8]>(0)))
        .collect::<Result<Vec<_>, _>>()?;
    let folded = crate::history::fold_into_months(&old, |project, branch, start| {
        months
            .iter()
            .find(|m| m.project == project && m.branch == branch && m.month_start_ms == start)
            .cloned()
    });
    for m in folded {
        tx.execute(
            "INSERT INTO covd_months (project, branch, month_start_ms, record)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (project, branch, month_start_ms) DO UPDATE SET record = EXCLUDED.record",
            &[
                &m.project,
                &m.branch,
                &big(m.month_start_ms)?,
                &codec::encode(&m),
            ],
        )
        .await?;
    }
    tx.execute(
        "DELETE FROM covd_tests WHERE last_seen_ms < $1",
        &[&big(tests_before_ms)?],
    )
    .await?;
    Ok(())
}

/// The object places of a read: each row's key and range, in order.
fn placed(rows: &[tokio_postgres::Row]) -> Vec<(String, Range<u64>)> {
    rows.iter()
        .map(|r| {
            let at = r.get::<_, i64>(1) as u64;
            (r.get(0), at..at + r.get::<_, i64>(2) as u64)
        })
        .collect()
}

impl ClusterStore {
    /// The bytes at each place, in order, reading the ranges of one object together.
    async fn fetch(&self, places: &[(String, Range<u64>)]) -> Result<Vec<Bytes>, StoreError> {
        let mut out = Vec::with_capacity(places.len());
        let mut i = 0;
        while i < places.len() {
            let key = &places[i].0;
            let n = places[i..].iter().take_while(|(k, _)| k == key).count();
            let ranges: Vec<Range<u64>> = places[i..i + n].iter().map(|(_, r)| r.clone()).collect();
            out.extend(self.node.segments().read_ranges(key, &ranges).await?);
            i += n;
        }
        Ok(out)
    }

    /// The bytes the rows of `sql` place (key, offset, length), in the rows' order. Blocking.
    fn read_placed(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<Bytes>, StoreError> {
        self.block(async {
            let rows = self.query(sql, params).await?;
            self.fetch(&placed(&rows)).await
        })
    }

    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        Ok(self.reads().await?.query(sql, params).await?)
    }

    /// Every stored run, or the one named.
    async fn load(&self, only: Option<&str>) -> Result<Vec<LoadedRun>, StoreError> {
        let mut client = self.reads().await?;
        let tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        let runs = tx
            .query(
                "SELECT r.run_id, r.record, r.files,
                        EXISTS (SELECT 1 FROM covd_merged m WHERE m.run_id = r.run_id),
                        s.record
                 FROM covd_runs r LEFT JOIN covd_summaries s ON s.run_id = r.run_id
                 WHERE $1::text IS NULL OR r.run_id = $1
                 ORDER BY r.run_id COLLATE \"C\"",
                &[&only],
            )
            .await?;
        let shards = tx
            .query(
                "SELECT run_id, record FROM covd_shards
                 WHERE record IS NOT NULL AND ($1::text IS NULL OR run_id = $1)
                 ORDER BY run_id COLLATE \"C\", shard_id COLLATE \"C\"",
                &[&only],
            )
            .await?;
        tx.commit().await?;
        let mut by_run: std::collections::HashMap<String, Vec<ShardRecord>> = Default::default();
        for r in &shards {
            by_run
                .entry(r.get(0))
                .or_default()
                .push(codec::decode::<ShardRecord>(r.get::<_, &[u8]>(1))?);
        }
        runs.iter()
            .map(|r| {
                let run_id: &str = r.get(0);
                Ok(LoadedRun {
                    run: codec::decode::<RunRecord>(r.get::<_, &[u8]>(1))?,
                    shards: by_run.remove(run_id).unwrap_or_default(),
                    compacted: r.get(3),
                    files: r
                        .get::<_, Option<&[u8]>>(2)
                        .map(|f| codec::decode::<FileListRecord>(f).map(|l| l.paths))
                        .transpose()?,
                    summary: r
                        .get::<_, Option<&[u8]>>(4)
                        .map(codec::decode::<SummaryRecord>)
                        .transpose()?,
                })
            })
            .collect()
    }
}

impl Storage for ClusterStore {
    fn is_durable(&self) -> bool {
        true
    }

    fn failure(&self) -> Option<String> {
        None
    }

    fn write(&self, writes: Vec<Write>) -> BoxFuture<'_, Result<(), StoreError>> {
        let has_parts = writes.iter().any(|w| matches!(w, Write::Compact { .. }));
        Box::pin(async move {
            let answer = if has_parts {
                // Taking a compaction's parts blocks on their producer.
                tokio::task::block_in_place(|| self.send(writes))?
            } else {
                self.send(writes)?
            };
            answered(answer.await)
        })
    }

    fn write_blocking(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        let answer = self.send(writes)?;
        answered(self.block(answer))
    }

    fn load_runs(&self) -> Result<Vec<LoadedRun>, StoreError> {
        self.block(self.load(None))
    }

    fn for_each_delta(
        &self,
        run_id: &str,
        attempts: &[(String, u32, u64)],
        f: &mut dyn FnMut(&str, FileBatch),
    ) -> Result<(), StoreError> {
        for (shard, attempt, last_seq) in attempts {
            if *last_seq == 0 {
                continue;
            }
            let bodies = self.read_placed(
                "SELECT g.key, d.start_offset, d.length
                 FROM covd_segment_deltas d JOIN covd_segments g ON g.id = d.segment_id
                 WHERE d.run_id = $1 AND d.shard_id = $2 AND d.attempt = $3
                   AND d.published AND d.seq BETWEEN 1 AND $4
                 ORDER BY d.seq",
                &[&run_id, shard, &(*attempt as i32), &big(*last_seq)?],
            )?;
            for body in bodies {
                f(shard, codec::decode_delta(&body, self.wire)?);
            }
        }
        Ok(())
    }

    /// One query for every shard, and the deltas read a segment at a time (a node catching up
    /// with another reads each of its segments once, not once per shard in it).
    fn for_each_delta_after(
        &self,
        run_id: &str,
        ranges: &[(String, u32, u64, u64)],
        f: &mut dyn FnMut(&str, FileBatch),
    ) -> Result<(), StoreError> {
        let ranges: Vec<&(String, u32, u64, u64)> = ranges
            .iter()
            .filter(|(_, _, after, last)| last > after)
            .collect();
        if ranges.is_empty() {
            return Ok(());
        }
        let shards: Vec<&str> = ranges.iter().map(|r| r.0.as_str()).collect();
        let attempts: Vec<i32> = ranges.iter().map(|r| r.1 as i32).collect();
        let afters = ranges
            .iter()
            .map(|r| big(r.2))
            .collect::<Result<Vec<i64>, _>>()?;
        let lasts = ranges
            .iter()
            .map(|r| big(r.3))
            .collect::<Result<Vec<i64>, _>>()?;
        let rows = self.block(self.query(
            "SELECT g.key, d.shard_id, d.start_offset, d.length
             FROM covd_segment_deltas d
             JOIN covd_segments g ON g.id = d.segment_id
             JOIN unnest($2::text[], $3::int[], $4::bigint[], $5::bigint[])
                  AS w(shard_id, attempt, after_seq, last_seq)
               ON d.shard_id = w.shard_id AND d.attempt = w.attempt
              AND d.seq > w.after_seq AND d.seq <= w.last_seq
             WHERE d.run_id = $1 AND d.published
             ORDER BY g.key, d.start_offset",
            &[&run_id, &shards, &attempts, &afters, &lasts],
        ))?;
        // All of them or none: fewer means they left meanwhile (the run was compacted, or the
        // attempt replaced), and a merge of part would look whole.
        for (shard, _, after, last) in &ranges {
            let held = rows
                .iter()
                .filter(|r| r.get::<_, &str>(1) == shard.as_str())
                .count() as u64;
            if held != last - after {
                return Err(StoreError::Shared(format!(
                    "the catalogue holds {held} of the {} deltas of shard `{shard}` of run \
                     `{run_id}` after {after}: the run changed meanwhile",
                    last - after
                )));
            }
        }
        let mut i = 0;
        while i < rows.len() {
            let key: &str = rows[i].get(0);
            let n = rows[i..]
                .iter()
                .take_while(|r| r.get::<_, &str>(0) == key)
                .count();
            let of_key = &rows[i..i + n];
            let ranges: Vec<Range<u64>> = of_key
                .iter()
                .map(|r| {
                    let at = r.get::<_, i64>(2) as u64;
                    at..at + r.get::<_, i64>(3) as u64
                })
                .collect();
            let bodies = self.block(self.node.segments().read_ranges(key, &ranges))?;
            for (row, body) in of_key.iter().zip(bodies) {
                f(row.get(1), codec::decode_delta(&body, self.wire)?);
            }
            i += n;
        }
        Ok(())
    }

    fn is_shared(&self) -> bool {
        true
    }

    fn load_run(&self, run_id: &str) -> Result<Option<LoadedRun>, StoreError> {
        Ok(self.block(self.load(Some(run_id)))?.pop())
    }

    fn take_changes(&self) -> Option<mpsc::UnboundedReceiver<Option<String>>> {
        self.changes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    fn for_each_merged(
        &self,
        run_id: &str,
        f: &mut dyn FnMut(Vec<(Arc<str>, FileCoverage)>),
    ) -> Result<(), StoreError> {
        let parts = self.read_placed(
            "SELECT g.key, m.start_offset, m.length
             FROM covd_merged m JOIN covd_segments g ON g.id = m.segment_id
             WHERE m.run_id = $1 ORDER BY m.part",
            &[&run_id],
        )?;
        for part in parts {
            f(codec::decode_files(&part)?);
        }
        Ok(())
    }

    fn for_each_shard_lines(
        &self,
        run_id: &str,
        shard_id: &str,
        f: &mut dyn FnMut(Vec<(Arc<str>, RoaringBitmap)>),
    ) -> Result<bool, StoreError> {
        let parts = self.read_placed(
            "SELECT g.key, l.start_offset, l.length
             FROM covd_shard_lines l JOIN covd_segments g ON g.id = l.segment_id
             WHERE l.run_id = $1 AND l.shard_id = $2 ORDER BY l.part",
            &[&run_id, &shard_id],
        )?;
        for part in &parts {
            f(codec::decode_shard_lines(part)?);
        }
        Ok(!parts.is_empty())
    }

    fn summaries(&self, q: &HistoryQuery) -> Result<Vec<SummaryRecord>, StoreError> {
        self.block(async {
            let mut client = self.reads().await?;
            let tx = client.transaction().await?;
            let out = select_summaries(&tx, q).await?;
            tx.commit().await?;
            Ok(out)
        })
    }

    fn history(
        &self,
        q: &HistoryQuery,
    ) -> Result<(Vec<SummaryRecord>, Vec<MonthRecord>), StoreError> {
        self.block(async {
            let mut client = self.reads().await?;
            let tx = client
                .build_transaction()
                .isolation_level(IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await?;
            let runs = select_summaries(&tx, q).await?;
            let rows = tx
                .query(
                    "SELECT record FROM covd_months
                     WHERE ($1::text IS NULL OR project = $1) AND ($2::text IS NULL OR branch = $2)",
                    &[&q.project, &q.branch],
                )
                .await?;
            tx.commit().await?;
            let mut months = Vec::new();
            for r in &rows {
                let m = codec::decode_later::<MonthRecord>(r.get::<_, &[u8]>(0))?;
                if q.selects_month(&m) {
                    months.push(m);
                }
            }
            crate::persist::oldest_month_first(&mut months);
            Ok((runs, months))
        })
    }

    fn attempts(&self, run_id: &str) -> Result<Vec<AttemptRecord>, StoreError> {
        let rows = self.block(self.query(
            "SELECT record FROM covd_attempts WHERE run_id = $1
             ORDER BY shard_id COLLATE \"C\", attempt",
            &[&run_id],
        ))?;
        rows.iter()
            .map(|r| Ok(codec::decode_later::<AttemptRecord>(r.get::<_, &[u8]>(0))?))
            .collect()
    }

    fn test_histories(
        &self,
        project: &str,
        branch: &str,
    ) -> Result<Vec<(String, TestHistoryRecord)>, StoreError> {
        let rows = self.block(self.query(
            "SELECT test, record FROM covd_tests WHERE project = $1 AND branch = $2
             ORDER BY test COLLATE \"C\"",
            &[&project, &branch],
        ))?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.get::<_, String>(0),
                    codec::decode_later::<TestHistoryRecord>(r.get::<_, &[u8]>(1))?,
                ))
            })
            .collect()
    }

    fn usage(&self) -> Result<Option<(u64, u64)>, StoreError> {
        // The bucket's and the database's quotas are their operators'; covd sets none.
        Ok(None)
    }

    fn missing_sources(&self, digests: &[Digest]) -> Result<Vec<bool>, StoreError> {
        let keys: Vec<&[u8]> = digests.iter().map(|d| &d[..]).collect();
        let rows = self.block(self.query(
            "SELECT digest FROM covd_sources WHERE digest = ANY($1)",
            &[&keys],
        ))?;
        let held: std::collections::HashSet<Vec<u8>> =
            rows.iter().map(|r| r.get::<_, Vec<u8>>(0)).collect();
        Ok(digests.iter().map(|d| !held.contains(&d[..])).collect())
    }

    fn source_digests(
        &self,
        run_id: &str,
        paths: &[String],
    ) -> Result<Vec<Option<Digest>>, StoreError> {
        let rows = self.block(self.query(
            "SELECT path, digest FROM covd_source_names WHERE run_id = $1 AND path = ANY($2)",
            &[&run_id, &paths],
        ))?;
        let named: std::collections::HashMap<String, Digest> = rows
            .iter()
            .filter_map(|r| {
                let d: &[u8] = r.get(1);
                Some((r.get::<_, String>(0), d.try_into().ok()?))
            })
            .collect();
        Ok(paths.iter().map(|p| named.get(p).copied()).collect())
    }

    fn source(&self, run_id: &str, path: &str) -> Result<Option<(Digest, Vec<u8>)>, StoreError> {
        let rows = self.block(self.query(
            "SELECT s.digest, s.body FROM covd_source_names n
             JOIN covd_sources s ON s.digest = n.digest
             WHERE n.run_id = $1 AND n.path = $2",
            &[&run_id, &path],
        ))?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let digest: Digest = row
            .get::<_, &[u8]>(0)
            .try_into()
            .map_err(|_| StoreError::Shared("a source digest is not 32 bytes".into()))?;
        Ok(Some((
            digest,
            codec::decode_source(row.get::<_, &[u8]>(1))?,
        )))
    }

    fn stats(&self) -> &CommitStats {
        &self.stats
    }
}

async fn select_summaries(
    tx: &impl GenericClient,
    q: &HistoryQuery,
) -> Result<Vec<SummaryRecord>, StoreError> {
    let limit = i64::try_from(q.limit).unwrap_or(i64::MAX);
    let until = q.until_ms.map(big).transpose()?;
    let rows = tx
        .query(
            "SELECT record FROM covd_summaries
             WHERE ($1::text IS NULL OR project = $1) AND ($2::text IS NULL OR branch = $2)
               AND created_at_ms >= $3 AND ($4::bigint IS NULL OR created_at_ms < $4)
             ORDER BY created_at_ms DESC, run_id COLLATE \"C\" LIMIT $5",
            &[&q.project, &q.branch, &big(q.since_ms)?, &until, &limit],
        )
        .await?;
    rows.iter()
        .map(|r| Ok(codec::decode::<SummaryRecord>(r.get::<_, &[u8]>(0))?))
        .collect()
}
