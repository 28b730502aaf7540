//! A throwaway PostgreSQL server for tests: `initdb` in a temporary directory, `postgres` on a
//! free loopback port, stopped and deleted when dropped. It uses Debian's `postgresql` package
//! (installed by `scripts/setup`). PostgreSQL refuses to run as root, so under root (as in CI)
//! the cluster belongs to `nobody`. The server stops when the value is dropped or the test
//! process ends, whichever comes first.

use std::{
    ffi::OsStr,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        OnceLock,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

/// The superuser of the throwaway cluster (trust authentication on loopback).
pub const USER: &str = "limbic";

pub struct TempPostgres {
    server: Child,
    port: u16,
    bin: PathBuf,
    dir: tempfile::TempDir,
}

impl TempPostgres {
    /// Starts a new cluster and waits until it accepts connections. Panics with the reason when
    /// it cannot (a test cannot go on without its database).
    pub fn start() -> Self {
        Self::start_with_tls(None)
    }

    /// [`Self::start`], offering TLS with the certificate (chain) and key `tls` (PEM) when given.
    pub fn start_with_tls(tls: Option<(&str, &str)>) -> Self {
        let bin = binaries().expect("PostgreSQL's server binaries (Debian's postgresql package; scripts/setup installs it)");
        let dir = tempfile::Builder::new().prefix("limbic-pg").tempdir().expect("temporary directory");
        let data = dir.path().join("data");
        std::fs::create_dir(&data).expect("data directory");
        let as_root = unsafe { libc::geteuid() } == 0;
        if as_root {
            for path in [dir.path(), data.as_path()] {
                chown_to_nobody(path);
            }
        }
        // A program run as the cluster's owner.
        let run = |program: PathBuf| {
            let mut command = if as_root {
                let mut command = Command::new("setpriv");
                command.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]).arg(program);
                command
            } else {
                Command::new(program)
            };
            command.env_remove("PGDATA").current_dir(dir.path());
            command
        };
        let initdb = run(bin.join("initdb"))
            .args(["--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync", "-U", USER, "-D"])
            .arg(&data)
            .output()
            .expect("initdb runs");
        assert!(initdb.status.success(), "initdb failed: {}", String::from_utf8_lossy(&initdb.stderr));
        let mut settings = vec!["fsync=off".to_owned(), "max_connections=400".to_owned()];
        if let Some((certificate, key)) = tls {
            // The key must be the server's own and readable by it alone.
            let (certificate_file, key_file) = (dir.path().join("server.crt"), dir.path().join("server.key"));
            std::fs::write(&certificate_file, certificate).expect("certificate file");
            std::fs::write(&key_file, key).expect("key file");
            std::fs::set_permissions(&key_file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("key file mode");
            if as_root {
                chown_to_nobody(&certificate_file);
                chown_to_nobody(&key_file);
            }
            settings.extend(["ssl=on".to_owned(), format!("ssl_cert_file={}", certificate_file.display()), format!("ssl_key_file={}", key_file.display())]);
        }
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("postgres.log")).expect("log file");
        // postgres runs under a shell that stops it when its standard input closes: when this
        // value is dropped, and also when the test process ends without dropping it (a cluster
        // shared by a whole test binary lives in a static).
        // It then deletes the cluster's directory, which a static's value never does.
        let watchdog = r#"bin="$1"; shift; "$bin" "$@" </dev/null & pg=$!; read -r _; kill -QUIT "$pg"; wait "$pg"; rm -rf "$PWD""#;
        let server = run(PathBuf::from("sh"))
            .args(["-c", watchdog, "sh"])
            .arg(bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1", "-c"])
            .arg(format!("unix_socket_directories={}", dir.path().display()))
            // The tests do not outlive the machine: durability on disk only costs them time.
            .args(settings.iter().flat_map(|setting| ["-c", setting.as_str()]))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("postgres starts");
        let postgres = Self { server, port, bin, dir };
        postgres.wait_ready();
        postgres
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = self.client("pg_isready").args(["-d", "postgres"]).stdout(Stdio::null()).status();
            if ready.is_ok_and(|s| s.success()) {
                return;
            }
            assert!(Instant::now() < deadline, "PostgreSQL did not become ready in 30 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn client(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin.join(program));
        command.args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", USER]);
        command
    }

    /// One cluster for the whole test process, started on first use.
    pub fn shared() -> &'static Self {
        static SHARED: OnceLock<TempPostgres> = OnceLock::new();
        SHARED.get_or_init(Self::start)
    }

    /// Creates an empty database with a name no other caller in this process gets, and returns
    /// its URL.
    pub fn new_database(&self, purpose: &str) -> String {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!("{purpose}_{}", NEXT.fetch_add(1, Ordering::Relaxed));
        self.database(&name)
    }

    /// The cluster's data directory (its tables' files and write-ahead log).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Creates an empty database and returns its URL.
    pub fn database(&self, name: &str) -> String {
        let created = self.client("createdb").arg(name).output().expect("createdb runs");
        assert!(created.status.success(), "createdb {name}: {}", String::from_utf8_lossy(&created.stderr));
        self.url(name)
    }

    /// Runs SQL in `database` as the superuser and returns what psql printed (unaligned, no headers).
    pub fn psql(&self, database: &str, sql: &str) -> String {
        let output = self.client("psql").args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", database, "-c", sql]).output().expect("psql runs");
        assert!(output.status.success(), "psql: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgresql://{USER}@127.0.0.1:{}/{database}", self.port)
    }
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        // Closing the watchdog's input stops the server (immediate shutdown: the cluster is
        // thrown away).
        drop(self.server.stdin.take());
        let _ = self.server.wait();
    }
}

/// The directory of `initdb` and `postgres`: on PATH, else Debian's newest
/// /usr/lib/postgresql/<version>/bin.
fn binaries() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .and_then(|path| std::env::split_paths(&path).find(|dir| dir.join("initdb").is_file() && dir.join("pg_isready").is_file()));
    on_path.or_else(|| {
        let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|entry| {
                let entry = entry.ok()?;
                let version = entry.file_name().to_str()?.parse().ok()?;
                Some((version, entry.path().join("bin")))
            })
            .filter(|(_, bin)| bin.join("initdb").is_file())
            .collect();
        versions.sort();
        versions.pop().map(|(_, bin)| bin)
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free loopback port").port()
}

fn chown_to_nobody(path: &Path) {
    let status = Command::new("chown").args([OsStr::new("nobody:nogroup"), path.as_os_str()]).status().expect("chown runs");
    assert!(status.success(), "chown nobody {}", path.display());
}
