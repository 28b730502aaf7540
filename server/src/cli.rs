//! The offline subcommands: `limbic user …`, `limbic audit …`, `limbic keys rotate`. They run on
//! the store directly, with the same service functions as the admin API. The store admits one
//! process at a time, so these need the server stopped; while it runs, the admin API does the
//! same.

use std::{
    io::BufRead,
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::{Args, Subcommand};

use crate::{Error, Result, Server, admin, config::{Config, DatabaseBackend, DatabaseConfig}, store::StoreError, users::random_string};

#[derive(Subcommand)]
pub enum UserCommand {
    /// Create an account.
    Create {
        /// Path to the TOML configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// The localpart of the new user id.
        #[arg(long)]
        username: String,
        #[command(flatten)]
        password: PasswordArgs,
        /// Make the user a server admin.
        #[arg(long)]
        admin: bool,
    },
    /// Make a user a server admin, or with --revoke take the rights away.
    MakeAdmin {
        #[arg(long, short)]
        config: PathBuf,
        /// A full user id or a localpart.
        user_id: String,
        #[arg(long)]
        revoke: bool,
    },
    /// Set a new password and log out every device of the user.
    ResetPassword {
        #[arg(long, short)]
        config: PathBuf,
        /// A full user id or a localpart.
        user_id: String,
        #[command(flatten)]
        password: PasswordArgs,
    },
}

/// Where the password comes from; without either option a random one is made and printed.
#[derive(Args)]
pub struct PasswordArgs {
    /// The password (other local users can see it in the process list; prefer --password-stdin).
    #[arg(long, conflicts_with = "password_stdin")]
    password: Option<String>,
    /// Read the password from the first line of standard input.
    #[arg(long)]
    password_stdin: bool,
}

impl PasswordArgs {
    /// The password, and whether it was generated (and so must be shown).
    fn read(&self) -> Result<(String, bool), String> {
        if let Some(password) = &self.password {
            return Ok((password.clone(), false));
        }
        if !self.password_stdin {
            return Ok((random_string(24), true));
        }
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line).map_err(|e| format!("cannot read standard input: {e}"))?;
        let password = line.strip_suffix('\n').map(|l| l.strip_suffix('\r').unwrap_or(l)).unwrap_or(&line);
        if password.is_empty() {
            return Err("no password on standard input".to_owned());
        }
        Ok((password.to_owned(), false))
    }
}

impl UserCommand {
    pub fn config(&self) -> &Path {
        match self {
            Self::Create { config, .. } | Self::MakeAdmin { config, .. } | Self::ResetPassword { config, .. } => config,
        }
    }
}

/// Runs the command, printing its result, or the error on stderr with a failing exit code.
pub async fn run(config: Config, command: UserCommand) -> ExitCode {
    match execute(config, command).await {
        Ok(message) => {
            println!("{message}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("limbic: {message}");
            ExitCode::FAILURE
        }
    }
}

fn open_stopped(config: Config) -> Result<std::sync::Arc<Server>, String> {
    let database = config.database.clone();
    Server::open(config).map_err(|e| match e {
        Error::Store(e) => stopped_first(&database, e),
        e => format!("cannot open the store: {e}"),
    })
}

/// Why the store did not open; in use most likely means by the running server.
fn stopped_first(database: &DatabaseConfig, error: StoreError) -> String {
    match error {
        StoreError::Locked => format!(
            "{} is in use, most likely by the running server: stop the server first, \
             or use the admin API (/_synapse/admin/…) while it runs",
            match database.backend {
                DatabaseBackend::RocksDb => format!("the store at {}", database.path.display()),
                DatabaseBackend::Postgres => "the PostgreSQL database".to_owned(),
            }
        ),
        StoreError::OtherNode(node) => format!("node {node} is running on the PostgreSQL database: stop every node first"),
        e => format!("cannot open the store: {e}"),
    }
}

/// `limbic keys rotate`: a new signing key; the old one is kept as expired now, so other
/// servers still verify what it signed. Audited.
pub fn rotate_key(config: Config) -> ExitCode {
    let server_name = config.server_name.clone();
    let rotated = open_stopped(config).and_then(|server| {
        let key_id = crate::events::ServerSigningKey::rotate(&server.store, server_name).map_err(|e| e.to_string())?;
        let record = crate::audit::AuditRecord::new("signing_key_rotated", "cli").details(serde_json::json!({ "key_id": key_id }));
        server.audit.write_with(&server.store, server.store.batch(), vec![record]).map_err(|e| e.to_string())?;
        Ok(key_id)
    });
    match rotated {
        Ok(key_id) => {
            println!("new signing key {key_id}; the old key stays published as expired");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("limbic: {message}");
            ExitCode::FAILURE
        }
    }
}

/// `limbic migrate`: copies the store into the engine the config names from the other one (into
/// the PostgreSQL database at `[database] url` from the RocksDB store at `[database] path`, or
/// the other way with `backend = "rocksdb"`), compares the two entry by entry, moves the
/// recordings being made to where the server on the new engine finds them, and records the move
/// in the (copied) audit log. Both must be unused: the server (every node) stopped, the target
/// empty.
pub fn migrate(config: Config) -> ExitCode {
    match migrate_store(&config) {
        Ok(moved) => {
            let total: u64 = moved.counts.iter().map(|(_, n)| n).sum();
            for (table, entries) in moved.counts.iter().filter(|(_, n)| *n > 0) {
                println!("{:<24} {entries}", table.name());
            }
            if moved.recordings > 0 {
                println!("{} recordings being made, moved to be stored when the server starts", moved.recordings);
            }
            println!("copied and verified {total} entries from {} into {}", moved.from, moved.to);
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("limbic: {message}");
            ExitCode::FAILURE
        }
    }
}

/// What `limbic migrate` did: the engines, the entries of each table, the recordings moved.
struct Moved {
    from: &'static str,
    to: &'static str,
    counts: Vec<(crate::store::Table, u64)>,
    recordings: usize,
}

fn migrate_store(config: &Config) -> Result<Moved, String> {
    let database = &config.database;
    let path = &database.path;
    let (source, target, from, to, node) = match database.backend {
        DatabaseBackend::Postgres => {
            // RocksDB would create an empty store where none is, and the copy would be empty too.
            if !path.join("CURRENT").is_file() {
                return Err(format!("no RocksDB store at {} ([database] path) to copy into the PostgreSQL database", path.display()));
            }
            let rocksdb = DatabaseConfig { backend: DatabaseBackend::RocksDb, ..database.clone() };
            let source = crate::store::Store::open(path).map_err(|e| stopped_first(&rocksdb, e))?;
            let target = crate::server::open_store(config).map_err(|e| stopped_first(database, e))?;
            (source, target, "rocksdb", "postgres", Some(config.cluster.node_name.as_str()))
        }
        DatabaseBackend::RocksDb => {
            if database.url.is_empty() {
                return Err("[database] url names no PostgreSQL database to copy into the RocksDB store at [database] path \
                            (or set backend = \"postgres\" to copy the RocksDB store into that database)"
                    .into());
            }
            // Opened as the only node: a node still running would go on writing what is copied.
            let name = if config.cluster.node_name.is_empty() { "migrate" } else { &config.cluster.node_name };
            let postgres = DatabaseConfig { backend: DatabaseBackend::Postgres, ..database.clone() };
            let source = crate::store::Store::open_node(&database.url, database.pool_size, name, false).map_err(|e| stopped_first(&postgres, e))?;
            let target = crate::store::Store::open(path).map_err(|e| stopped_first(database, e))?;
            (source, target, "postgres", "rocksdb", None)
        }
    };
    let recordings_dir = config.media.path.join("recordings");
    let recordings = crate::calls::spool::Gathering::plan(&recordings_dir, node).map_err(|e| e.to_string())?;
    let counts = source.migrate_into(&target).map_err(|e| e.to_string())?;
    let audit = crate::audit::Audit::load(&target, &config.audit.key_file).map_err(|e| e.to_string())?;
    let total: u64 = counts.iter().map(|(_, n)| n).sum();
    let record = crate::audit::AuditRecord::new("store_migrated", "cli").details(serde_json::json!({ "from": from, "to": to, "entries": total }));
    audit.write_with(&target, target.batch(), vec![record]).map_err(|e| e.to_string())?;
    let recordings = recordings.apply().map_err(|e| {
        format!("the store is copied, verified and audited, but not all recordings being made under {} were moved into the new engine's spool: {e}", recordings_dir.display())
    })?;
    Ok(Moved { from, to, counts, recordings })
}

/// `limbic voip coturn-config`: coturn's configuration for `[voip]`'s TURN URIs and secret,
/// relaying to this server's SFU only among private addresses. Only the store is opened (for a
/// secret kept there), not the whole server.
pub fn coturn_config(config: Config) -> ExitCode {
    let (realm, sfu) = (config.server_name.to_string(), crate::calls::media::media_ip(&config.calls));
    let printed = crate::server::open_store(&config)
        .map_err(|e| stopped_first(&config.database, e))
        .and_then(|store| crate::calls::turn::Turn::open(&std::sync::Arc::new(store), &config.voip).map_err(|e| e.to_string()));
    match printed {
        Ok(turn) => {
            print!("{}", turn.coturn_config(&realm, sfu));
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("limbic: {message}");
            ExitCode::FAILURE
        }
    }
}

/// `limbic audit verify`: exit 0 when the whole chain checks out and, with `head` (a file holding
/// a head exported earlier), that head is still there unchanged; 1 otherwise.
pub fn verify_audit(config: Config, head: Option<&Path>) -> ExitCode {
    let verified = head.map(read_head).transpose().and_then(|head| {
        let server = open_stopped(config)?;
        server.audit.verify(&server.store, head.as_ref().map(|h| (h.seq, h.hash.as_str()))).map_err(|e| e.to_string())
    });
    match verified {
        Ok(check) if check.valid => {
            let against = head.map(|_| ", up to the exported head").unwrap_or_default();
            println!("audit log intact{against}: {} entries, keyed from entry {}", check.entries, check.keyed_from);
            ExitCode::SUCCESS
        }
        Ok(check) => {
            eprintln!(
                "limbic: audit log broken at entry {}: {} ({} entries before it are intact)",
                check.first_invalid.unwrap_or(0),
                check.reason.unwrap_or_default(),
                check.entries
            );
            ExitCode::FAILURE
        }
        Err(message) => {
            eprintln!("limbic: {message}");
            ExitCode::FAILURE
        }
    }
}

fn read_head(path: &Path) -> Result<crate::audit::AuditHead, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{} is not an exported audit head: {e}", path.display()))
}

/// `limbic audit head`: the newest entry as JSON, to keep off the machine for `verify --head`.
pub fn audit_head(config: Config) -> ExitCode {
    let head = open_stopped(config).and_then(|server| crate::audit::Audit::head(&server.store).map_err(|e| e.to_string()));
    match head {
        Ok(Some(head)) => {
            println!("{}", serde_json::to_string(&head).expect("JSON serializes"));
            ExitCode::SUCCESS
        }
        Ok(None) => {
            eprintln!("limbic: the audit log is empty");
            ExitCode::FAILURE
        }
        Err(message) => {
            eprintln!("limbic: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn execute(config: Config, command: UserCommand) -> Result<String, String> {
    let server = open_stopped(config)?;
    let server = &*server;
    let failed = |e: Error| e.to_string();
    match command {
        UserCommand::Create { username, password, admin, .. } => {
            let user_id = admin::local_user(server, &username).map_err(failed)?;
            let (password, generated) = password.read()?;
            admin::create_user(server, &user_id, Some(&password), admin).map_err(failed)?;
            audit(server, "user_created", &user_id, serde_json::json!({ "admin": admin }))?;
            let role = if admin { " (server admin)" } else { "" };
            Ok(with_password(format!("created {user_id}{role}"), &password, generated))
        }
        UserCommand::MakeAdmin { user_id, revoke, .. } => {
            let user_id = admin::local_user(server, &user_id).map_err(failed)?;
            admin::set_admin(server, &user_id, !revoke).map_err(failed)?;
            audit(server, if revoke { "admin_revoked" } else { "admin_granted" }, &user_id, serde_json::json!({}))?;
            Ok(if revoke { format!("{user_id} is no longer a server admin") } else { format!("{user_id} is now a server admin") })
        }
        UserCommand::ResetPassword { user_id, password, .. } => {
            let user_id = admin::local_user(server, &user_id).map_err(failed)?;
            let (password, generated) = password.read()?;
            admin::reset_password(server, &user_id, &password, true).map_err(failed)?;
            audit(server, "password_reset", &user_id, serde_json::json!({ "logout_devices": true }))?;
            Ok(with_password(format!("reset the password of {user_id} and logged out its devices"), &password, generated))
        }
    }
}

/// Audits an action taken on the command line; the actor is `cli` (whoever runs the binary
/// with the server's config).
fn audit(server: &Server, action: &'static str, user_id: &ruma::UserId, details: serde_json::Value) -> Result<(), String> {
    let record = crate::audit::AuditRecord::new(action, "cli").target(user_id).details(details);
    server.audit.write_with(&server.store, server.store.batch(), vec![record]).map_err(|e| e.to_string())
}

fn with_password(message: String, password: &str, generated: bool) -> String {
    if generated { format!("{message}\npassword: {password}") } else { message }
}
