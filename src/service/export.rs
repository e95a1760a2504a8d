//! Export: wait (optionally) for a run to settle, then render its aggregate in a format as a
//! stream of byte chunks, produced on a blocking thread and handed over a bounded channel so a
//! slow reader slows the writer instead of filling memory.

use std::io::{self, Write};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::durable;
use super::run::Run;
use super::{CoverageService, Error, ExportFormat, ExportHeader, Result};
use crate::aggregate::Aggregate;
use crate::formats::{cobertura, json, lcov, markdown};
use crate::model::path::PathFilter;

/// Chunks of rendered output; the channel holds at most this many at once.
const CHUNKS_IN_FLIGHT: usize = 8;
const CHUNK_BYTES: usize = 256 * 1024;
/// The longest an export waits for completeness, whatever it asks.
const MAX_WAIT: Duration = Duration::from_secs(24 * 3600);

/// An export in progress: its header, then its data.
#[derive(Debug)]
pub struct Export {
    pub header: ExportHeader,
    pub chunks: mpsc::Receiver<Result<Bytes>>,
}

impl CoverageService {
    /// Exports a run. With `wait`, first waits until the run settles (complete, or every shard
    /// of a run without expectations finished) or the timeout passes.
    pub async fn export(
        &self,
        run_id: &str,
        format: ExportFormat,
        wait: Option<Duration>,
        filter: PathFilter,
    ) -> Result<Export> {
        let run = self.run(run_id)?;
        let mut timed_out = false;
        if let Some(timeout) = wait {
            // A timeout from the wire can be absurd; a day is more than any CI job waits.
            let deadline = tokio::time::Instant::now() + timeout.min(MAX_WAIT);
            let mut changes = run.subscribe();
            while !run.state().settled() {
                run.state().check_live(run_id)?;
                match tokio::time::timeout_at(deadline, changes.changed()).await {
                    Ok(Ok(())) => {}
                    // The run was dropped (deleted) while waiting.
                    Ok(Err(_)) => return Err(Error::RunNotFound(run_id.to_owned())),
                    Err(_) => {
                        timed_out = !run.state().settled();
                        break;
                    }
                }
            }
        }
        let (header_tx, header_rx) = oneshot::channel();
        let (tx, rx) = mpsc::channel(CHUNKS_IN_FLIGHT);
        let service = self.clone();
        tokio::task::spawn_blocking(move || match service.resident(&run) {
            Ok(aggregate) => render(&run, &aggregate, format, &filter, timed_out, header_tx, tx),
            // Reported where the header is awaited.
            Err(e) => tracing::warn!(run = %run.id, "reading a stored run failed: {e}"),
        });
        let header = header_rx
            .await
            .map_err(|_| Error::Unavailable("the export stopped before its header".into()))?;
        Ok(Export { header, chunks: rx })
    }
}

/// Takes a consistent view of the run, sends the header, then the rendered data.
fn render(
    run: &Run,
    aggregate: &Aggregate,
    format: ExportFormat,
    filter: &PathFilter,
    timed_out: bool,
    header_tx: oneshot::Sender<ExportHeader>,
    tx: mpsc::Sender<Result<Bytes>>,
) {
    // A complete run changes no more: render it in place. Otherwise copy it under the
    // exclusive gate, so that every delta is in the export whole or not at all.
    let gate = run.gate_exclusive();
    let (complete, missing, declared) = {
        let state = run.state();
        (state.is_complete(), state.missing(), state.declared())
    };
    let snapshot: Option<Aggregate> = (!complete).then(|| aggregate.snapshot());
    drop(gate);
    let aggregate = snapshot.as_ref().unwrap_or(aggregate);
    let totals = aggregate.totals_of(filter);
    let header = ExportHeader {
        complete,
        missing_shards: missing.clone(),
        expectations_declared: declared,
        timed_out,
        totals,
        content_type: format.content_type(),
    };
    if header_tx.send(header).is_err() {
        return;
    }
    let mut out = ChunkWriter {
        buf: Vec::with_capacity(CHUNK_BYTES),
        tx: tx.clone(),
    };
    let result = match format {
        ExportFormat::Lcov => aggregate.for_each_sorted(filter, |path, file| {
            lcov::write_record(&mut out, path, file)
        }),
        ExportFormat::Lcov1 => aggregate.for_each_sorted(filter, |path, file| {
            lcov::write_record_as(&mut out, path, file, lcov::Dialect::Lcov1)
        }),
        ExportFormat::Cobertura => {
            let packages = cobertura::package_totals(
                aggregate
                    .file_totals(filter)
                    .iter()
                    .map(|(p, t)| (&**p, *t)),
            );
            let now = durable::to_ms(std::time::SystemTime::now());
            cobertura::Writer::begin(&mut out, totals, packages, now).and_then(|mut w| {
                aggregate.for_each_sorted(filter, |path, file| w.file(path, file))?;
                w.finish().map(drop)
            })
        }
        ExportFormat::Json => {
            json::Writer::begin(&mut out, totals, complete, &missing).and_then(|mut w| {
                aggregate.for_each_sorted(filter, |path, file| w.file(path, file))?;
                w.finish().map(drop)
            })
        }
        ExportFormat::Markdown => {
            let completeness = markdown::Completeness {
                complete,
                declared,
                missing: missing.clone(),
            };
            markdown::write(
                &mut out,
                &run.id,
                totals,
                &completeness,
                &aggregate.file_totals(filter),
            )
        }
    }
    .and_then(|()| out.flush());
    if let Err(e) = result
        && e.kind() != io::ErrorKind::BrokenPipe
    {
        let _ = tx.blocking_send(Err(Error::Unavailable(format!("export failed: {e}"))));
    }
}

/// Buffers output into chunks and sends each over the channel, blocking while it is full.
struct ChunkWriter {
    buf: Vec<u8>,
    tx: mpsc::Sender<Result<Bytes>>,
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK_BYTES {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.send()?;
        }
        Ok(())
    }
}

impl ChunkWriter {
    fn send(&mut self) -> io::Result<()> {
        let chunk = Bytes::from(std::mem::replace(
            &mut self.buf,
            Vec::with_capacity(CHUNK_BYTES),
        ));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the reader went away"))
    }
}
