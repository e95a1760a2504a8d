//! Cluster mode's storage: segments of deltas in object storage, their catalogue in
//! PostgreSQL, and the protocol that makes a delta count exactly once across nodes: stage,
//! upload, publish (see `docs/cluster.md`). Built with the cargo feature `cluster`: its
//! clients (tokio-postgres, object_store with its S3 client) add about 90 crates to the build,
//! which the embedded default does not need.

mod catalogue;
mod segments;
mod store;

use std::time::Duration;

use bytes::Bytes;

pub use catalogue::{Catalogue, DeltaEntry, PublishedDelta};
pub use segments::Segments;
pub use store::ClusterStore;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("PostgreSQL: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("object storage: {0}")]
    ObjectStore(#[from] object_store::Error),
    #[error("{0}")]
    Config(String),
    #[error("segment {0} was swept before it was published: nothing of it counts")]
    Swept(i64),
}

/// One delta a node commits: whose it is, and its record (the delta log's form).
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub run_id: String,
    pub shard_id: String,
    pub attempt: u32,
    pub seq: u64,
    pub body: Vec<Bytes>,
}

/// One node's side of the two stores.
#[derive(Debug)]
pub struct Node {
    name: String,
    catalogue: Catalogue,
    segments: Segments,
}

impl Node {
    pub fn new(name: impl Into<String>, catalogue: Catalogue, segments: Segments) -> Node {
        Node {
            name: name.into(),
            catalogue,
            segments,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn catalogue(&self) -> &Catalogue {
        &self.catalogue
    }

    pub fn segments(&self) -> &Segments {
        &self.segments
    }

    /// Stages `deltas` as one segment and uploads it; the segment's id and key, and the
    /// deltas' entries. Nothing counts until [`Node::publish`].
    pub async fn stage(
        &self,
        deltas: Vec<Outgoing>,
    ) -> Result<(i64, String, Vec<DeltaEntry>), ClusterError> {
        let key = format!("segments/{}/{}", self.name, unique()?);
        let mut entries = Vec::with_capacity(deltas.len());
        let mut parts = Vec::new();
        let mut at = 0u64;
        for d in deltas {
            let len: u64 = d.body.iter().map(|b| b.len() as u64).sum();
            entries.push(DeltaEntry {
                run_id: d.run_id,
                shard_id: d.shard_id,
                attempt: d.attempt,
                seq: d.seq,
                range: at..at + len,
            });
            at += len;
            parts.extend(d.body);
        }
        let id = self.catalogue.stage(&key, &self.name, &entries).await?;
        self.segments.put(&key, parts).await?;
        Ok((id, key, entries))
    }

    /// Stages one segment of `parts` that no delta row names yet, and uploads it: its id. What
    /// refers to it is written by the transaction that publishes it.
    pub(super) async fn stage_object(&self, parts: Vec<Bytes>) -> Result<i64, ClusterError> {
        let key = format!("segments/{}/{}", self.name, unique()?);
        let id = self.catalogue.stage(&key, &self.name, &[]).await?;
        self.segments.put(&key, parts).await?;
        Ok(id)
    }

    /// Publishes a staged segment: whether each of its deltas counts.
    pub async fn publish(
        &self,
        id: i64,
        entries: &[DeltaEntry],
    ) -> Result<Vec<bool>, ClusterError> {
        self.catalogue.publish(id, entries).await
    }

    /// Stage, upload, publish: whether each delta counts (and so may be acknowledged).
    pub async fn commit(&self, deltas: Vec<Outgoing>) -> Result<Vec<bool>, ClusterError> {
        let (id, _, entries) = self.stage(deltas).await?;
        self.publish(id, &entries).await
    }

    /// The deltas of run `run_id` that count, with their records, by shard and sequence.
    pub async fn read_run(&self, run_id: &str) -> Result<Vec<(DeltaEntry, Bytes)>, ClusterError> {
        let published = self.catalogue.published(run_id).await?;
        let mut out = Vec::with_capacity(published.len());
        for p in published {
            let bytes = self.segments.read(&p.key, p.entry.range.clone()).await?;
            out.push((p.entry, bytes));
        }
        Ok(out)
    }

    /// Removes the segments staged longer ago than `older_than` and never published (and
    /// finishes an earlier sweep): claimed in the catalogue first, so that none of them can be
    /// published meanwhile, then the object, then the row. How many went.
    pub async fn sweep(&self, older_than: Duration) -> Result<usize, ClusterError> {
        let claimed = self.catalogue.sweep(older_than).await?;
        for (id, key) in &claimed {
            self.segments.delete(key).await?;
            self.catalogue.forget(*id).await?;
        }
        Ok(claimed.len())
    }
}

/// A name for this node: the host's, and 32 random bits, so that two nodes on one host (or a
/// node restarted) never take each other's changes for their own.
pub fn node_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".to_owned());
    let suffix = unique().map_or_else(|_| std::process::id().to_string(), |u| u[..8].to_owned());
    format!("{host}-{suffix}")
}

/// A key part no other segment has: 128 random bits.
fn unique() -> Result<String, ClusterError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)
        .map_err(|e| ClusterError::Config(format!("the system's random source failed: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}
