use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::{Parser, Subcommand};
use limbic_server::{Server, cli::UserCommand, config::Config};

#[derive(Parser)]
#[command(name = "limbic", version, about = "Limbic: a Matrix homeserver for therapy practices and clinics")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the homeserver.
    Serve {
        /// Path to the TOML configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check a configuration file and exit.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Manage accounts on the store directly (stop the server first, or use the admin API).
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Check the audit log, or export its head (stop the server first, or use the admin API).
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Manage the server's federation signing key (stop the server first).
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Copy the store into the engine the config names, and verify the copy (stop the server,
    /// every node, first): with backend = "postgres", the RocksDB store at [database] path into
    /// the database at [database] url; with backend = "rocksdb", that database into a new
    /// RocksDB store at [database] path.
    Migrate {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// The TURN server that relays call media (stop the server first).
    Voip {
        #[command(subcommand)]
        command: VoipCommand,
    },
}

#[derive(Subcommand)]
enum VoipCommand {
    /// Print a coturn configuration (turnserver -c FILE) for `[voip]`: its port, the shared
    /// secret, and relaying only to this server's SFU among private addresses.
    CoturnConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Replace the signing key with a new one; the old one stays published as expired now.
    Rotate {
        #[arg(long, short)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Recompute every entry's hash, link and MAC; exit 1 at the first entry that does not check out.
    Verify {
        #[arg(long, short)]
        config: PathBuf,
        /// A head exported earlier (`limbic audit head`, or GET /_limbic/admin/v1/audit/head):
        /// it must still be in the log, unchanged.
        #[arg(long)]
        head: Option<PathBuf>,
    },
    /// Print the newest entry's seq, hash, MAC and time as JSON, to keep off the machine.
    Head {
        #[arg(long, short)]
        config: PathBuf,
    },
}

impl Command {
    fn config(&self) -> &Path {
        match self {
            Self::Serve { config } | Self::CheckConfig { config } | Self::Migrate { config } => config,
            Self::User { command } => command.config(),
            Self::Audit { command: AuditCommand::Verify { config, .. } | AuditCommand::Head { config } } => config,
            Self::Keys { command: KeysCommand::Rotate { config } } => config,
            Self::Voip { command: VoipCommand::CoturnConfig { config } } => config,
        }
    }
}

fn init_logging(level: &str) {
    // ruma's auth-rule checks log every decision at info; keep them for debugging only.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(format!("{level},ruma_state_res=warn")))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,ruma_state_res=warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_target(false).init();
}

fn main() -> ExitCode {
    limbic_server::tune_allocator();
    let cli = Cli::parse();
    let config = match Config::load(cli.command.config()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("limbic: {e}");
            return ExitCode::from(2);
        }
    };
    if matches!(cli.command, Command::CheckConfig { .. }) {
        println!("configuration is valid");
        return ExitCode::SUCCESS;
    }
    if matches!(cli.command, Command::Serve { .. }) {
        init_logging(&config.logging.level);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("limbic: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::User { command } => return limbic_server::cli::run(config, command).await,
            Command::Audit { command: AuditCommand::Verify { head, .. } } => return limbic_server::cli::verify_audit(config, head.as_deref()),
            Command::Audit { command: AuditCommand::Head { .. } } => return limbic_server::cli::audit_head(config),
            Command::Keys { command: KeysCommand::Rotate { .. } } => return limbic_server::cli::rotate_key(config),
            Command::Voip { command: VoipCommand::CoturnConfig { .. } } => return limbic_server::cli::coturn_config(config),
            Command::Migrate { .. } => return limbic_server::cli::migrate(config),
            Command::Serve { .. } | Command::CheckConfig { .. } => {}
        }
        let server = match Server::open(config) {
            Ok(server) => server,
            Err(e) => {
                eprintln!("limbic: cannot open the server: {e}");
                return ExitCode::FAILURE;
            }
        };
        match limbic_server::serve(server).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("limbic: {e}");
                ExitCode::FAILURE
            }
        }
    })
}
