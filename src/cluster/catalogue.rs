//! The catalogue in PostgreSQL: shards' attempts and acknowledged sequences, and the segments
//! with the deltas each holds. Publishing a segment advances its deltas' shards in one
//! transaction, so a delta counts once however nodes fail or race (see `docs/cluster.md`).

use std::ops::Range;
use std::time::Duration;

use tokio::sync::{Mutex, MutexGuard};
use tokio_postgres::{Client, NoTls};

use super::ClusterError;

/// Taken while the schema is made, so that nodes starting together do not race on it.
const SCHEMA_LOCK: i64 = 0x636f_7664;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS covd_shards (
    run_id TEXT NOT NULL,
    shard_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    acked_seq BIGINT NOT NULL,
    PRIMARY KEY (run_id, shard_id)
);
CREATE TABLE IF NOT EXISTS covd_segments (
    id BIGSERIAL PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    node TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('staged', 'published', 'swept')),
    staged_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS covd_segment_deltas (
    segment_id BIGINT NOT NULL REFERENCES covd_segments (id) ON DELETE CASCADE,
    run_id TEXT NOT NULL,
    shard_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    seq BIGINT NOT NULL,
    start_offset BIGINT NOT NULL,
    length BIGINT NOT NULL,
    published BOOLEAN NOT NULL DEFAULT false,
    PRIMARY KEY (segment_id, run_id, shard_id, seq)
);
CREATE INDEX IF NOT EXISTS covd_segment_deltas_published
    ON covd_segment_deltas (run_id, shard_id, seq) WHERE published;
ALTER TABLE covd_shards ADD COLUMN IF NOT EXISTS record BYTEA;
CREATE TABLE IF NOT EXISTS covd_runs (
    run_id TEXT PRIMARY KEY,
    record BYTEA NOT NULL,
    files BYTEA,
    compacted BOOLEAN NOT NULL DEFAULT false
);
CREATE TABLE IF NOT EXISTS covd_attempts (
    run_id TEXT NOT NULL,
    shard_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    record BYTEA NOT NULL,
    PRIMARY KEY (run_id, shard_id, attempt)
);
CREATE TABLE IF NOT EXISTS covd_merged (
    run_id TEXT NOT NULL,
    part INTEGER NOT NULL,
    segment_id BIGINT NOT NULL REFERENCES covd_segments (id),
    start_offset BIGINT NOT NULL,
    length BIGINT NOT NULL,
    PRIMARY KEY (run_id, part)
);
CREATE TABLE IF NOT EXISTS covd_shard_lines (
    run_id TEXT NOT NULL,
    shard_id TEXT NOT NULL,
    part INTEGER NOT NULL,
    segment_id BIGINT NOT NULL REFERENCES covd_segments (id),
    start_offset BIGINT NOT NULL,
    length BIGINT NOT NULL,
    PRIMARY KEY (run_id, shard_id, part)
);
CREATE TABLE IF NOT EXISTS covd_summaries (
    run_id TEXT PRIMARY KEY,
    project TEXT NOT NULL,
    branch TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    record BYTEA NOT NULL
);
CREATE TABLE IF NOT EXISTS covd_months (
    project TEXT NOT NULL,
    branch TEXT NOT NULL,
    month_start_ms BIGINT NOT NULL,
    record BYTEA NOT NULL,
    PRIMARY KEY (project, branch, month_start_ms)
);
CREATE TABLE IF NOT EXISTS covd_tests (
    project TEXT NOT NULL,
    branch TEXT NOT NULL,
    test TEXT NOT NULL,
    last_seen_ms BIGINT NOT NULL,
    record BYTEA NOT NULL,
    PRIMARY KEY (project, branch, test)
);
CREATE TABLE IF NOT EXISTS covd_sources (
    digest BYTEA PRIMARY KEY,
    body BYTEA NOT NULL
);
CREATE TABLE IF NOT EXISTS covd_source_names (
    run_id TEXT NOT NULL,
    path TEXT NOT NULL,
    digest BYTEA NOT NULL,
    PRIMARY KEY (run_id, path)
);
";

/// A connection to PostgreSQL at `url`, with the schema made if it is not there.
pub(super) async fn connect(url: &str) -> Result<Client, ClusterError> {
    let (mut client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::error!("the PostgreSQL connection ended: {e}");
        }
    });
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
        .await?;
    tx.batch_execute(SCHEMA).await?;
    tx.commit().await?;
    Ok(client)
}

/// The channel a publish notifies, with `node\nrun` for each run it changed.
pub(super) const CHANGES: &str = "covd_changes";

/// Listens to what other nodes than `node` publish: a run's id for each run one changed, and
/// `None` after the connection was lost and made anew (what was published meanwhile was not
/// heard). Ends when the receiver is dropped.
pub(super) fn listen(
    url: String,
    node: String,
) -> (
    tokio::sync::mpsc::UnboundedReceiver<Option<String>>,
    tokio::task::AbortHandle,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let mut lost = false;
        while !tx.is_closed() {
            if let Err(e) = listen_once(&url, &node, &tx, lost).await {
                tracing::warn!("listening to other nodes' changes failed (again in 1 s): {e}");
            }
            lost = true;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    (rx, task.abort_handle())
}

async fn listen_once(
    url: &str,
    node: &str,
    tx: &tokio::sync::mpsc::UnboundedSender<Option<String>>,
    lost: bool,
) -> Result<(), ClusterError> {
    use futures_util::StreamExt as _;
    let (client, mut connection) = tokio_postgres::connect(url, NoTls).await?;
    let (heard, mut notes) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                    if heard.send(n.payload().to_owned()).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    });
    client.batch_execute(&format!("LISTEN {CHANGES}")).await?;
    if lost && tx.send(None).is_err() {
        return Ok(());
    }
    while let Some(payload) = notes.recv().await {
        let Some((from, run)) = payload.split_once('\n') else {
            continue;
        };
        if from != node && tx.send(Some(run.to_owned())).is_err() {
            break;
        }
    }
    drop(client);
    match driver.await {
        Ok(Err(e)) => Err(e.into()),
        _ => Ok(()),
    }
}

/// One delta of a segment: whose it is, and where its bytes are in the segment's object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaEntry {
    pub run_id: String,
    pub shard_id: String,
    pub attempt: u32,
    pub seq: u64,
    pub range: Range<u64>,
}

/// A published delta: its entry, and the key of the object that holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedDelta {
    pub key: String,
    pub entry: DeltaEntry,
}

/// The catalogue, over one connection (a node's commits are already grouped).
#[derive(Debug)]
pub struct Catalogue {
    url: String,
    client: Mutex<Client>,
}

fn int(n: u64, what: &str) -> Result<i64, ClusterError> {
    i64::try_from(n)
        .map_err(|_| ClusterError::Config(format!("{what} {n} is beyond PostgreSQL's bigint")))
}

impl Catalogue {
    /// Connects to PostgreSQL at `url` (`postgres://user@host:port/db`) and makes the schema
    /// if it is not there.
    pub async fn connect(url: &str) -> Result<Catalogue, ClusterError> {
        Ok(Catalogue {
            url: url.to_owned(),
            client: Mutex::new(connect(url).await?),
        })
    }

    /// The connection, made anew if the last one ended (PostgreSQL restarted, or a network
    /// between them failed): what a node does after PostgreSQL was unavailable.
    pub(super) async fn client(&self) -> Result<MutexGuard<'_, Client>, ClusterError> {
        let mut client = self.client.lock().await;
        if client.is_closed() {
            *client = connect(&self.url).await?;
        }
        Ok(client)
    }

    /// Makes `attempt` the shard's current attempt, its sequence back at 0, unless the shard
    /// is at that attempt or a higher one already. Returns the shard's attempt and
    /// acknowledged sequence after it.
    pub async fn start_attempt(
        &self,
        run_id: &str,
        shard_id: &str,
        attempt: u32,
    ) -> Result<(u32, u64), ClusterError> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO covd_shards (run_id, shard_id, attempt, acked_seq)
                 VALUES ($1, $2, $3, 0)
                 ON CONFLICT (run_id, shard_id) DO UPDATE
                 SET attempt = EXCLUDED.attempt, acked_seq = 0
                 WHERE covd_shards.attempt < EXCLUDED.attempt",
                &[&run_id, &shard_id, &(attempt as i32)],
            )
            .await?;
        let row = client
            .query_one(
                "SELECT attempt, acked_seq FROM covd_shards WHERE run_id = $1 AND shard_id = $2",
                &[&run_id, &shard_id],
            )
            .await?;
        Ok((row.get::<_, i32>(0) as u32, row.get::<_, i64>(1) as u64))
    }

    /// The shard's current attempt and acknowledged sequence, if it has begun.
    pub async fn shard(
        &self,
        run_id: &str,
        shard_id: &str,
    ) -> Result<Option<(u32, u64)>, ClusterError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT attempt, acked_seq FROM covd_shards WHERE run_id = $1 AND shard_id = $2",
                &[&run_id, &shard_id],
            )
            .await?;
        Ok(row.map(|r| (r.get::<_, i32>(0) as u32, r.get::<_, i64>(1) as u64)))
    }

    /// Records the segment `key` of `node` as staged, with its deltas: nothing refers to it
    /// yet. Its id.
    pub async fn stage(
        &self,
        key: &str,
        node: &str,
        deltas: &[DeltaEntry],
    ) -> Result<i64, ClusterError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let id: i64 = tx
            .query_one(
                "INSERT INTO covd_segments (key, node, state) VALUES ($1, $2, 'staged') RETURNING id",
                &[&key, &node],
            )
            .await?
            .get(0);
        let insert = tx
            .prepare(
                "INSERT INTO covd_segment_deltas
                 (segment_id, run_id, shard_id, attempt, seq, start_offset, length)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .await?;
        for d in deltas {
            tx.execute(
                &insert,
                &[
                    &id,
                    &d.run_id,
                    &d.shard_id,
                    &(d.attempt as i32),
                    &int(d.seq, "sequence")?,
                    &int(d.range.start, "offset")?,
                    &int(d.range.end - d.range.start, "length")?,
                ],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(id)
    }

    /// Publishes the staged segment `id`, in one transaction: each of its `deltas` (in
    /// order) advances its shard from `seq - 1` to `seq` if the shard is still at the delta's
    /// attempt, and counts from then on; the others never will (another node published that
    /// sequence first, or a higher attempt began). Whether each delta counts. Refused if the
    /// segment is no longer staged (a sweep took it: nothing of it counts).
    pub async fn publish(&self, id: i64, deltas: &[DeltaEntry]) -> Result<Vec<bool>, ClusterError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let claimed = tx
            .execute(
                "UPDATE covd_segments SET state = 'published' WHERE id = $1 AND state = 'staged'",
                &[&id],
            )
            .await?;
        if claimed != 1 {
            return Err(ClusterError::Swept(id));
        }
        let advance = tx
            .prepare(
                "UPDATE covd_shards SET acked_seq = $4::bigint
                 WHERE run_id = $1 AND shard_id = $2 AND attempt = $3
                   AND acked_seq = $4::bigint - 1",
            )
            .await?;
        let mark = tx
            .prepare(
                "UPDATE covd_segment_deltas SET published = true
                 WHERE segment_id = $1 AND run_id = $2 AND shard_id = $3 AND seq = $4",
            )
            .await?;
        let mut counted = Vec::with_capacity(deltas.len());
        for d in deltas {
            let seq = int(d.seq, "sequence")?;
            let advanced = tx
                .execute(
                    &advance,
                    &[&d.run_id, &d.shard_id, &(d.attempt as i32), &seq],
                )
                .await?
                == 1;
            if advanced {
                tx.execute(&mark, &[&id, &d.run_id, &d.shard_id, &seq])
                    .await?;
            }
            counted.push(advanced);
        }
        tx.commit().await?;
        Ok(counted)
    }

    /// The deltas of run `run_id` that count: published, of each shard's current attempt,
    /// by shard and sequence.
    pub async fn published(&self, run_id: &str) -> Result<Vec<PublishedDelta>, ClusterError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT s.key, d.shard_id, d.attempt, d.seq, d.start_offset, d.length
                 FROM covd_segment_deltas d
                 JOIN covd_segments s ON s.id = d.segment_id
                 JOIN covd_shards h ON h.run_id = d.run_id AND h.shard_id = d.shard_id
                 WHERE d.run_id = $1 AND d.published AND d.attempt = h.attempt
                   AND d.seq <= h.acked_seq
                 ORDER BY d.shard_id, d.seq",
                &[&run_id],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                let start = r.get::<_, i64>(4) as u64;
                PublishedDelta {
                    key: r.get(0),
                    entry: DeltaEntry {
                        run_id: run_id.to_owned(),
                        shard_id: r.get(1),
                        attempt: r.get::<_, i32>(2) as u32,
                        seq: r.get::<_, i64>(3) as u64,
                        range: start..start + r.get::<_, i64>(5) as u64,
                    },
                }
            })
            .collect())
    }

    /// Claims the segments staged longer ago than `older_than` (a node died between staging
    /// and publishing, or gave up), the published ones nothing refers to any more (their
    /// deltas lost a race, belonged to a replaced attempt or a deleted run, or were compacted
    /// away), and those an earlier sweep claimed and did not finish: from now on none of them
    /// can be published or read. Their ids and keys.
    pub async fn sweep(&self, older_than: Duration) -> Result<Vec<(i64, String)>, ClusterError> {
        let client = self.client().await?;
        // A reference to a segment is only ever made by the transaction that publishes it,
        // so one unreferenced once published stays so.
        // The unreferenced ones are chosen from what the statement's snapshot shows as
        // published: a segment being published right now is `staged` there, so a sweep that
        // waits for its row lock never claims it (rechecking `published` against references
        // its snapshot cannot see).
        let rows = client
            .query(
                "WITH unreferenced AS (
                     SELECT g.id FROM covd_segments g
                     WHERE g.state = 'published'
                       AND g.staged_at < now() - make_interval(secs => $1)
                       AND NOT EXISTS (SELECT 1 FROM covd_segment_deltas d
                                       WHERE d.segment_id = g.id AND d.published)
                       AND NOT EXISTS (SELECT 1 FROM covd_merged m WHERE m.segment_id = g.id)
                       AND NOT EXISTS (SELECT 1 FROM covd_shard_lines l
                                       WHERE l.segment_id = g.id))
                 UPDATE covd_segments g SET state = 'swept'
                 WHERE g.state = 'swept'
                    OR (g.state = 'staged' AND g.staged_at < now() - make_interval(secs => $1))
                    OR (g.state = 'published' AND g.id IN (SELECT id FROM unreferenced))
                 RETURNING g.id, g.key",
                &[&older_than.as_secs_f64()],
            )
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Forgets a swept segment (its object deleted first).
    pub async fn forget(&self, id: i64) -> Result<(), ClusterError> {
        let client = self.client().await?;
        client
            .execute(
                "DELETE FROM covd_segments WHERE id = $1 AND state = 'swept'",
                &[&id],
            )
            .await?;
        Ok(())
    }
}
