//! Real services for the cluster tests, on loopback, started by the tests themselves:
//! PostgreSQL (Debian's binaries; `initdb` runs as the `postgres` user when the tests run as
//! root) and an S3 server (moto, from `.ci/tools`' virtual environment). A service that cannot
//! start fails the test, saying why: nothing is skipped.
//!
//! The cluster benchmark (`examples/bench_cluster.rs`) starts them with this file too, so it
//! uses nothing but std and tempfile.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// The project's tools (`.ci/tools`: lcov, pycobertura, moto, PostgreSQL, Chromium, …),
/// installed once per process (the script locks across processes), in `target/tools`.
pub(crate) fn tools() -> &'static std::path::Path {
    static TOOLS: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    TOOLS.get_or_init(|| {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let out = Command::new(root.join(".ci/tools"))
            .output()
            .expect("run .ci/tools");
        assert!(
            out.status.success(),
            "the tools could not be installed by .ci/tools:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        root.join("target/tools")
    })
}

/// A port free on loopback now (the services below take a port number, not a listener).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Reads `child`'s standard error until a line holds `ready`; panics with what it said if it
/// ends first.
fn wait_for(child: &mut Child, ready: &str, what: &str) {
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let mut said = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap_or_default();
        if line.contains(ready) {
            // The rest is drained, so that the service never blocks on a full pipe.
            std::thread::spawn(move || lines.for_each(drop));
            return;
        }
        said.push(line);
    }
    panic!("{what} did not start:\n{}", said.join("\n"));
}

fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self").unwrap().uid() == 0
}

/// The `postgres` user's uid (`-u`) or gid (`-g`).
fn id(which: &str) -> u32 {
    let out = Command::new("id")
        .args([which, "postgres"])
        .output()
        .expect("run id");
    assert!(
        out.status.success(),
        "no user `postgres` (Debian's postgresql package makes it)"
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// A PostgreSQL server of its own, in a temporary directory, on a loopback port.
pub(crate) struct Postgres {
    child: Child,
    _dir: tempfile::TempDir,
    pub(crate) url: String,
    /// What starts it again: its binaries, data, port and user.
    restart: (PathBuf, PathBuf, u16, Option<(u32, u32)>),
}

/// Starts `postgres` on `data`, listening on loopback `port` (and a socket in `socket_dir`).
fn spawn_postgres(
    bin: &std::path::Path,
    data: &std::path::Path,
    socket_dir: &std::path::Path,
    port: u16,
    user: Option<(u32, u32)>,
) -> Child {
    let mut postgres = Command::new(bin.join("postgres"));
    postgres
        .arg("-D")
        .arg(data)
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-k"])
        .arg(socket_dir)
        // What tests need of it: no fsync, and a log line when it is ready.
        .args(["-c", "fsync=off", "-c", "logging_collector=off"])
        .stderr(Stdio::piped())
        // Its own process group: a kill takes its backends too, as a crash of the host
        // would (the postmaster's backends outlive it for a while otherwise).
        .process_group(0);
    if let Some((uid, gid)) = user {
        postgres.uid(uid).gid(gid);
    }
    postgres.spawn().expect("run postgres")
}

impl Postgres {
    pub(crate) fn start() -> Postgres {
        tools();
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL's binaries in /usr/lib/postgresql (.ci/tools installs them)")
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|b| b.join("initdb").exists())
            .max()
            .expect("an initdb under /usr/lib/postgresql");
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        // initdb refuses to run as root: the `postgres` user owns the cluster then.
        let user = running_as_root().then(|| (id("-u"), id("-g")));
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        }
        let as_user = |c: &mut Command| {
            if let Some((uid, gid)) = user {
                c.uid(uid).gid(gid);
            }
        };
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .args(["-A", "trust", "-U", "covd", "--no-sync", "-D"])
            .arg(&data);
        as_user(&mut initdb);
        let out = initdb.output().expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let mut server = Postgres {
            child: spawn_postgres(&bin, &data, dir.path(), port, user),
            _dir: dir,
            url: format!("postgres://covd@127.0.0.1:{port}/postgres"),
            restart: (bin, data, port, user),
        };
        server.wait_ready();
        server
    }

    fn wait_ready(&mut self) {
        wait_for(
            &mut self.child,
            "database system is ready to accept connections",
            "PostgreSQL",
        );
    }

    /// Kills the server (SIGKILL) and starts it again on its data and port, as after a crash.
    pub(crate) fn restart(&mut self) {
        self.kill();
        let (bin, data, port, user) = &self.restart;
        self.child = spawn_postgres(bin, data, self._dir.path(), *port, *user);
        self.wait_ready();
    }

    /// Stops the server and its backends at once (SIGKILL), as a crash would.
    pub(crate) fn kill(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An S3 server (moto) on a loopback port, with one bucket, `covd`.
pub(crate) struct S3 {
    child: Child,
    pub(crate) endpoint: String,
}

impl S3 {
    pub(crate) fn start() -> S3 {
        let server = tools().join("venv/bin/moto_server");
        let port = free_port();
        let mut child = Command::new(&server)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("run {}: {e}", server.display()));
        wait_for(&mut child, "Running on", "moto's S3 server");
        let endpoint = format!("http://127.0.0.1:{port}");
        // moto takes a bucket made by a plain, unsigned PUT.
        use std::io::{Read as _, Write as _};
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(
            c,
            "PUT /covd HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "making the bucket: {answer}"
        );
        S3 { child, endpoint }
    }

    /// The server's process id (its CPU is part of what the cluster benchmark costs).
    #[allow(dead_code)] // the benchmark's, not the tests'
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The options that point the `object_store` crate at this server.
    pub(crate) fn options(&self) -> Vec<(&str, &str)> {
        vec![
            ("aws_endpoint", self.endpoint.as_str()),
            ("aws_allow_http", "true"),
            ("aws_access_key_id", "test"),
            ("aws_secret_access_key", "test"),
            ("aws_region", "us-east-1"),
        ]
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
