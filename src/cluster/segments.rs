//! Segments in object storage: immutable objects, written once under a key never reused, read
//! by ranges, deleted only once nothing refers to them (see `docs/cluster.md`).

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path;
use object_store::{BackoffConfig, ObjectStore, ObjectStoreExt as _, PutPayload, RetryConfig};

use super::ClusterError;

/// A bucket (and a prefix in it) that holds segments.
#[derive(Debug, Clone)]
pub struct Segments {
    store: Arc<dyn ObjectStore>,
    prefix: String,
}

impl Segments {
    /// The object store at `url` (`s3://bucket[/prefix]`), configured from the usual `AWS_*`
    /// environment variables and then `options` (`aws_endpoint`, `aws_allow_http`, …: the
    /// `object_store` crate's keys).
    pub fn connect<'a>(
        url: &str,
        options: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Segments, ClusterError> {
        let bad = |why: String| ClusterError::Config(format!("object store `{url}`: {why}"));
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| bad("only s3:// URLs are served".into()))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(bad("no bucket".into()));
        }
        // A store that is down is told within seconds: an ingest stream waits on it, and
        // its client resends to another node rather than wait minutes (the crate's default).
        let retry = RetryConfig {
            backoff: BackoffConfig::default(),
            max_retries: 3,
            retry_timeout: Duration::from_secs(10),
        };
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_retry(retry);
        for (key, value) in options {
            let key: AmazonS3ConfigKey = key.parse().map_err(|e| bad(format!("{e}")))?;
            builder = builder.with_config(key, value);
        }
        let store = builder.build().map_err(|e| bad(e.to_string()))?;
        Ok(Segments {
            store: Arc::new(store),
            prefix: prefix.trim_matches('/').to_owned(),
        })
    }

    fn path(&self, key: &str) -> Path {
        if self.prefix.is_empty() {
            Path::from(key)
        } else {
            Path::from(format!("{}/{key}", self.prefix))
        }
    }

    /// Writes the object `key` whole (atomically: no reader sees part of it).
    pub async fn put(&self, key: &str, parts: Vec<Bytes>) -> Result<(), ClusterError> {
        let payload: PutPayload = parts.into_iter().collect();
        self.store.put(&self.path(key), payload).await?;
        Ok(())
    }

    /// The bytes `range` of the object `key`.
    pub async fn read(&self, key: &str, range: Range<u64>) -> Result<Bytes, ClusterError> {
        Ok(self.store.get_range(&self.path(key), range).await?)
    }

    /// The bytes of each of `ranges` of the object `key` (fetched together where the store
    /// can: adjacent ranges in one request).
    pub async fn read_ranges(
        &self,
        key: &str,
        ranges: &[Range<u64>],
    ) -> Result<Vec<Bytes>, ClusterError> {
        Ok(self.store.get_ranges(&self.path(key), ranges).await?)
    }

    /// Deletes the object `key`; one already gone is no error.
    pub async fn delete(&self, key: &str) -> Result<(), ClusterError> {
        match self.store.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Whether the object `key` exists.
    pub async fn exists(&self, key: &str) -> Result<bool, ClusterError> {
        match self.store.head(&self.path(key)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}
