//! The `cairn` command: the binary edge of the project, where library errors become
//! messages for people. Everything with logic lives in the library crates.

mod daemon;
mod state;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

use state::{VaultState, default_data_dir};

#[derive(Parser)]
#[command(
    name = "cairn",
    version,
    about = "End-to-end encrypted, peer-to-peer synced folder"
)]
struct Cli {
    /// Where vault state (keys, store, registry) lives.
    #[arg(long, global = true, env = "CAIRN_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Which vault on this device to use.
    #[arg(long, global = true, default_value = "default", env = "CAIRN_VAULT")]
    vault: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a new vault on this device.
    Init {
        /// Print the 24-word recovery phrase (write it down: it is the only way back if
        /// every device is lost).
        #[arg(long)]
        show_phrase: bool,
    },
    /// Create the vault if there is none, then show it (idempotent).
    Ensure,
    /// Show this device's vault identity.
    Status,
    /// Mount the vault at MOUNTPOINT and serve it until stopped (SIGTERM, Ctrl-C, or
    /// `cairn unmount`). Stopping flushes every change into a published snapshot first.
    Mount {
        /// An existing, empty directory.
        mountpoint: PathBuf,
        /// Idle time after the last write before changes are folded into a snapshot.
        #[arg(long, default_value_t = 500, value_name = "MS")]
        debounce_ms: u64,
        /// Create the vault first if this device has none (what `scripts/run.sh` uses).
        #[arg(long)]
        init: bool,
        /// Show the vault as it was at TIME, read-only: `2026-11-23T10:00:00Z`,
        /// `"2026-11-23 10:00:00"` (UTC) or an age such as `90m` or `2days`.
        #[arg(long, value_name = "TIME", conflicts_with = "init")]
        at: Option<String>,
    },
    /// List the snapshots this device published, newest first.
    Log,
    /// Stop the daemon serving MOUNTPOINT, waiting until all changes are flushed.
    Unmount { mountpoint: PathBuf },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("cairn: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let data_dir = match cli.data_dir {
        Some(d) => d,
        None => default_data_dir()?,
    };
    match cli.command {
        Command::Init { show_phrase } => {
            let s = VaultState::create(&data_dir, &cli.vault)?;
            println!("created vault {:?}", s.name);
            print_identity(&s);
            if show_phrase {
                println!("recovery phrase: {}", s.secret.to_phrase());
            }
        }
        Command::Ensure => {
            let s = match VaultState::load(&data_dir, &cli.vault) {
                Ok(s) => s,
                Err(_)
                    if !state::vault_dir(&data_dir, &cli.vault)
                        .join("vault.secret")
                        .exists() =>
                {
                    let s = VaultState::create(&data_dir, &cli.vault)?;
                    println!("created vault {:?}", s.name);
                    s
                }
                Err(e) => return Err(e),
            };
            print_identity(&s);
        }
        Command::Status => print_identity(&VaultState::load(&data_dir, &cli.vault)?),
        Command::Mount {
            mountpoint,
            debounce_ms,
            init,
            at,
        } => {
            let state = if init
                && !state::vault_dir(&data_dir, &cli.vault)
                    .join("vault.secret")
                    .exists()
            {
                let s = VaultState::create(&data_dir, &cli.vault)?;
                println!("created vault {:?}", s.name);
                print_identity(&s);
                s
            } else {
                VaultState::load(&data_dir, &cli.vault)?
            };
            let opts = cairn_fuse::MountOptions {
                flush_debounce: std::time::Duration::from_millis(debounce_ms),
                ..Default::default()
            };
            match at {
                Some(t) => {
                    let at_ms = daemon::parse_time(&t, daemon::now_ms())?;
                    daemon::mount_at(&state, &mountpoint, at_ms, opts)?;
                }
                None => daemon::mount(&state, &mountpoint, opts)?,
            }
        }
        Command::Log => {
            let state = VaultState::load(&data_dir, &cli.vault)?;
            let device = daemon::Device::open(&state)?;
            let entries = daemon::log(&device)?;
            if entries.is_empty() {
                println!("no snapshots yet: mount the vault and write something");
            }
            for e in entries {
                let h = &e.snapshot.header;
                println!(
                    "revision {:>5}  {}  snapshot {}  parents {}",
                    e.revision,
                    daemon::format_time(h.created_ms),
                    &e.snapshot.id.0.to_string()[..16],
                    h.parents.len()
                );
            }
        }
        Command::Unmount { mountpoint } => daemon::unmount(&data_dir, &mountpoint)?,
    }
    Ok(())
}

fn print_identity(s: &VaultState) {
    println!("vault id:  {}", s.secret.vault_id());
    println!("device id: {}", s.device.device_id());
    println!("state dir: {}", s.dir.display());
}
