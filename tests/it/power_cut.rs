//! A power cut under a daemon: the storage seam is given a backend whose writes reach its
//! "disk" only when they are synced, and a cut loses every write not synced yet (the way redb's
//! crash tests model a disk). Each cut comes while at least one write is waiting for its sync,
//! so a daemon that acknowledged a delta before its write was durable loses an acknowledged
//! delta at the first cut, and the shard that saw the acknowledgement fails the test.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use covd::persist::{CommitStats, LoadedRun, MemoryStore, Storage, StoreError, Write};
use covd::server::{self, Settings};
use covd::service::RunParams;
use futures_util::future::BoxFuture;
use tokio::sync::{oneshot, watch};

use crate::durability::{
    Crashes, DELTAS, SHARDS, acknowledged, expected, finished, shard_client, xorshift,
};
use crate::support::*;

/// Writes that reached the store but not its disk; with `holding`, writes wait here for a
/// sync that never comes before the cut.
#[derive(Debug, Default)]
struct Cache {
    holding: bool,
    cut: bool,
    /// Waiting writes: each is answered only if it is synced.
    unsynced: Vec<(Vec<Write>, oneshot::Sender<()>)>,
}

#[derive(Debug)]
struct PowerCut {
    disk: Arc<MemoryStore>,
    cache: Mutex<Cache>,
    waiting: watch::Sender<usize>,
}

impl PowerCut {
    fn new(disk: Arc<MemoryStore>) -> Arc<PowerCut> {
        Arc::new(PowerCut {
            disk,
            cache: Mutex::default(),
            waiting: watch::channel(0).0,
        })
    }

    fn cache(&self) -> MutexGuard<'_, Cache> {
        self.cache.lock().unwrap()
    }

    /// Writes through to the disk, unless the store holds writes back: then the write waits
    /// in the cache, answered never (the disk is cut before it syncs).
    fn accept(&self, writes: Vec<Write>) -> Result<(), oneshot::Receiver<()>> {
        // The disk is written under the cache's lock, so that nothing reaches it after a cut.
        let mut cache = self.cache();
        if !cache.holding && !cache.cut {
            self.disk
                .write_blocking(writes)
                .expect("the disk takes the write");
            return Ok(());
        }
        let (synced, wait) = oneshot::channel();
        cache.unsynced.push((writes, synced));
        self.waiting.send_replace(cache.unsynced.len());
        Err(wait)
    }

    /// Stops syncing, and returns once some write waits for a sync.
    async fn hold(&self) {
        self.cache().holding = true;
        let mut waiting = self.waiting.subscribe();
        tokio::time::timeout(Duration::from_secs(120), waiting.wait_for(|n| *n > 0))
            .await
            .expect("a write arrives")
            .unwrap();
    }

    /// The power goes: the waiting writes never reach the disk. (Their callers stay blocked
    /// until [`PowerCut::release`]; the daemon they belong to is gone.)
    fn cut(&self) -> usize {
        let mut cache = self.cache();
        cache.cut = true;
        cache.unsynced.len()
    }

    /// Lets the dead daemon's blocked threads end (their writes fail).
    fn release(&self) {
        self.cache().unsynced.clear();
    }
}

impl Storage for PowerCut {
    fn is_durable(&self) -> bool {
        true
    }

    fn failure(&self) -> Option<String> {
        None
    }

    fn write(&self, writes: Vec<Write>) -> BoxFuture<'_, Result<(), StoreError>> {
        let accepted = self.accept(writes);
        Box::pin(async move {
            if let Err(wait) = accepted {
                let _ = wait.await;
                std::future::pending::<()>().await;
            }
            Ok(())
        })
    }

    fn write_blocking(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        if let Err(wait) = self.accept(writes) {
            let _ = wait.blocking_recv();
            return Err(StoreError::Failed("the power is off".into()));
        }
        Ok(())
    }

    fn load_runs(&self) -> Result<Vec<LoadedRun>, StoreError> {
        self.disk.load_runs()
    }

    fn for_each_delta(
        &self,
        run_id: &str,
        attempts: &[(String, u32, u64)],
        f: &mut dyn FnMut(&str, covd::model::FileBatch),
    ) -> Result<(), StoreError> {
        self.disk.for_each_delta(run_id, attempts, f)
    }

    fn for_each_merged(
        &self,
        run_id: &str,
        f: &mut dyn FnMut(Vec<(Arc<str>, covd::model::FileCoverage)>),
    ) -> Result<(), StoreError> {
        self.disk.for_each_merged(run_id, f)
    }

    fn for_each_shard_lines(
        &self,
        run_id: &str,
        shard_id: &str,
        f: &mut dyn FnMut(Vec<(Arc<str>, roaring::RoaringBitmap)>),
    ) -> Result<bool, StoreError> {
        self.disk.for_each_shard_lines(run_id, shard_id, f)
    }

    fn summaries(
        &self,
        query: &covd::persist::HistoryQuery,
    ) -> Result<Vec<covd::persist::SummaryRecord>, StoreError> {
        self.disk.summaries(query)
    }

    fn history(
        &self,
        query: &covd::persist::HistoryQuery,
    ) -> Result<
        (
            Vec<covd::persist::SummaryRecord>,
            Vec<covd::persist::MonthRecord>,
        ),
        StoreError,
    > {
        self.disk.history(query)
    }

    fn attempts(&self, run_id: &str) -> Result<Vec<covd::persist::AttemptRecord>, StoreError> {
        self.disk.attempts(run_id)
    }

    fn test_histories(
        &self,
        project: &str,
        branch: &str,
    ) -> Result<Vec<(String, covd::persist::TestHistoryRecord)>, StoreError> {
        self.disk.test_histories(project, branch)
    }

    fn usage(&self) -> Result<Option<(u64, u64)>, StoreError> {
        self.disk.usage()
    }

    fn missing_sources(&self, digests: &[covd::persist::Digest]) -> Result<Vec<bool>, StoreError> {
        self.disk.missing_sources(digests)
    }

    fn source_digests(
        &self,
        run_id: &str,
        paths: &[String],
    ) -> Result<Vec<Option<covd::persist::Digest>>, StoreError> {
        self.disk.source_digests(run_id, paths)
    }

    fn source(
        &self,
        run_id: &str,
        path: &str,
    ) -> Result<Option<(covd::persist::Digest, Vec<u8>)>, StoreError> {
        self.disk.source(run_id, path)
    }

    fn stats(&self) -> &CommitStats {
        self.disk.stats()
    }
}

/// A daemon in a runtime of its own, reached through a proxy, so that a power cut takes it
/// down at once: the proxy drops every connection first (nothing the dying daemon says gets
/// out), then every task of the daemon is dropped.
struct Machine {
    /// Always there but in `drop`: a runtime may not be dropped in an async context, only
    /// shut down in the background.
    runtime: Option<tokio::runtime::Runtime>,
    store: Arc<PowerCut>,
    proxy: tokio::task::JoinHandle<()>,
    url: String,
}

/// Forwards every connection made to `listener` to `to`, until aborted (which drops them all).
async fn proxy(listener: tokio::net::TcpListener, to: std::net::SocketAddr) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (mut inbound, _) = listener.accept().await.unwrap();
        connections.spawn(async move {
            if let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
}

impl Machine {
    async fn boot(disk: &Arc<MemoryStore>) -> Machine {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let store = PowerCut::new(disk.clone());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let daemon = listener.local_addr().unwrap();
        let (ready, started) = oneshot::channel();
        let storage: Arc<dyn Storage> = store.clone();
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let forever = std::future::pending::<()>();
            server::run_on(listener, Settings::default(), storage, forever, ready).await
        });
        started.await.expect("the daemon starts over the disk");
        let front = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", front.local_addr().unwrap());
        Machine {
            runtime: Some(runtime),
            store,
            proxy: tokio::spawn(proxy(front, daemon)),
            url,
        }
    }

    /// Cuts the power while a write waits for its sync; returns the writes lost, and the
    /// store (whose blocked callers are released when it is dropped, after the daemon).
    async fn cut(mut self) -> (usize, Arc<PowerCut>) {
        self.store.hold().await;
        let lost = self.store.cut();
        self.proxy.abort();
        let _ = (&mut self.proxy).await;
        (lost, self.store.clone())
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.proxy.abort();
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_cut_loses_no_acknowledged_delta() {
    let disk =
        Arc::new(MemoryStore::new(None).with_wire_decoder(covd::rpc::convert::wire_delta_files));
    let mut machine = Machine::boot(&disk).await;
    let mut client = covd::client::Client::connect(&machine.url).unwrap();
    let params = RunParams {
        expected_shards: (0..SHARDS).map(|s| s.to_string()).collect(),
        ..RunParams::default()
    };
    client.open_run("crash", params).await.unwrap();

    let (booted, url) = watch::channel(machine.url.clone());
    let (acked, _) = watch::channel(0u64);
    let crashes = Crashes {
        url,
        acked: acked.clone(),
    };
    let clients: Vec<_> = (0..SHARDS)
        .map(|s| tokio::spawn(shard_client(s, crashes.clone())))
        .collect();
    let mut progress = acked.subscribe();
    let mut dead = Vec::new();
    let mut lost = 0;
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..6 {
        acknowledged(&mut progress, 20 + xorshift(&mut rng) % 81).await;
        let (writes, store) = machine.cut().await;
        assert!(writes > 0);
        lost += writes;
        dead.push(store);
        machine = Machine::boot(&disk).await;
        booted.send_replace(machine.url.clone());
    }
    let last_cut = *progress.borrow();
    let resumes = finished(clients).await;
    assert!(
        last_cut < SHARDS as u64 * DELTAS,
        "the last cut came after {last_cut} acknowledgements, before the shards finished"
    );
    let mut client = covd::client::Client::connect(&machine.url).unwrap();
    let (header, merged) = fetch(&mut client, "crash").await;
    assert!(header.complete);
    assert_eq!(
        merged,
        expected(),
        "after 6 power cuts that lost {lost} writes, and {resumes} resumes"
    );
    for store in dead {
        store.release();
    }
}
