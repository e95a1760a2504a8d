//! The daemon as a child process, so that the CPU and memory a benchmark reports are the
//! daemon's own and not its clients': the benchmark's executable runs itself again with
//! `__daemon [DATA_DIR]`, and reads the child's figures from /proc.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Serves (and never returns) if this process was started as the daemon; `settings` makes
/// the daemon's settings from its data directory. Returns false in the benchmark itself.
pub(crate) fn serve_if_asked(settings: impl FnOnce(Option<PathBuf>) -> covd::Settings) -> bool {
    if std::env::args().nth(1).as_deref() != Some("__daemon") {
        return false;
    }
    let settings = settings(std::env::args().nth(2).map(PathBuf::from));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (ready, is_ready) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            if let Ok(ready) = is_ready.await {
                // The metrics URL second, when the settings open an HTTP port.
                let metrics: covd::server::Ready = ready;
                match metrics.http {
                    Some(http) => println!("http://{addr} http://{http}/metrics"),
                    None => println!("http://{addr}"),
                }
                std::io::stdout().flush().unwrap();
            }
        });
        covd::server::run_with_ready(listener, settings, std::future::pending(), ready)
            .await
            .unwrap();
    });
    true
}

/// Starts the daemon child; returns it, its URL, and how long it took to be ready (its
/// metrics URL, when it has an HTTP port: [`metrics_url`]).
///
/// `COVD_BENCH_WRAP` runs it under a profiler, e.g.
/// `valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p` or
/// `valgrind --tool=massif --depth=40`.
pub(crate) fn spawn(data_dir: Option<&Path>) -> (Child, String, Duration) {
    spawn_with(data_dir, &[])
}

/// [`spawn`], with these environment variables set for the daemon.
pub(crate) fn spawn_with(
    data_dir: Option<&Path>,
    env: &[(&str, &str)],
) -> (Child, String, Duration) {
    let started = Instant::now();
    let wrap = std::env::var("COVD_BENCH_WRAP").unwrap_or_default();
    let mut words = wrap.split_whitespace();
    let mut cmd = match words.next() {
        Some(program) => {
            let mut c = Command::new(program);
            c.args(words).arg(std::env::current_exe().unwrap());
            c
        }
        None => Command::new(std::env::current_exe().unwrap()),
    };
    cmd.arg("__daemon").envs(env.iter().copied());
    if let Some(dir) = data_dir {
        cmd.arg(dir);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the daemon");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let mut words = line.split_whitespace();
    let url = words.next().unwrap_or_default().to_owned();
    if let Some(metrics) = words.next() {
        *METRICS.lock().unwrap() = Some(metrics.to_owned());
    }
    (child, url, started.elapsed())
}

static METRICS: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// The metrics URL of the daemon [`spawn`] started last, if it has an HTTP port.
#[allow(dead_code)]
pub(crate) fn metrics_url() -> Option<String> {
    METRICS.lock().unwrap().clone()
}

/// The time one `GET` of `url` (`http://host:port/path`) takes, whole answer read; `None`
/// when it fails or is not a 200.
#[allow(dead_code)]
pub(crate) fn time_get(url: &str) -> Option<Duration> {
    use std::io::Read;
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest.split_once('/')?;
    let started = Instant::now();
    let mut stream = std::net::TcpStream::connect(host).ok()?;
    write!(
        stream,
        "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).ok()?;
    let took = started.elapsed();
    answer.starts_with(b"HTTP/1.1 200").then_some(took)
}

/// utime + stime of a process, from /proc (clock ticks of 1/100 s on Linux).
pub(crate) fn cpu_seconds(pid: u32) -> f64 {
    let (user, system) = cpu_split(pid);
    user + system
}

/// (user, system) CPU seconds of a process.
pub(crate) fn cpu_split(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) / 100.0, ticks(12) / 100.0)
}

/// Peak resident memory so far, in KB.
pub(crate) fn peak_rss_kb(pid: u32) -> u64 {
    status_kb(pid, "VmHWM:")
}

/// A `/proc/PID/status` figure in KB (`VmHWM:` peak RSS, `VmRSS:` RSS now).
pub(crate) fn status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}
