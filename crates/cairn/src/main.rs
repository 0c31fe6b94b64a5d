//! The `cairn` command: the binary edge of the project, where library errors become
//! messages for people. Everything with logic lives in the library crates.

mod config;
mod held;
mod log;
mod logging;
mod prune;
mod relay;
mod service;
mod status;

use cairn_daemon as daemon;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};

use cairn_daemon::{VaultState, default_data_dir};

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
    /// Configuration file (default: $XDG_CONFIG_HOME/cairn/config.toml; see
    /// docs/config.example.toml).
    #[arg(long, global = true, env = "CAIRN_CONFIG", value_name = "PATH")]
    config: Option<PathBuf>,
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
        /// This device's name, shown to every member (default: the host name).
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
    },
    /// Create the vault if there is none, then show it (idempotent).
    Ensure,
    /// Show the vault: identity, whether it is mounted, changes not yet uploaded, the last
    /// snapshot, conflicts, peers.
    Status {
        /// Machine-readable output (`"state": "synced" | "pending" | "disk full" | "not mounted"`).
        #[arg(long)]
        json: bool,
    },
    /// Mount the vault at MOUNTPOINT and serve it until stopped (SIGTERM, Ctrl-C, or
    /// `cairn unmount`). Stopping flushes every change into a published snapshot first.
    Mount {
        /// An existing, empty directory.
        mountpoint: PathBuf,
        /// Idle time after the last write before changes are folded into a snapshot
        /// (default: `[mount] debounce_ms` of the configuration, 150).
        #[arg(long, value_name = "MS")]
        debounce_ms: Option<u64>,
        /// Create the vault first if this device has none (what `scripts/run.sh` uses).
        #[arg(long)]
        init: bool,
        /// Show the vault as it was at TIME, read-only: `2026-11-23T10:00:00Z`,
        /// `"2026-11-23 10:00:00"` (UTC) or an age such as `90m` or `2days`.
        #[arg(long, value_name = "TIME", conflicts_with = "init")]
        at: Option<String>,
        /// Mount options, comma-separated: allow_other, default_permissions (always on),
        /// ro, uid=N, gid=N, umask=OCTAL (added to `[mount] options` of the configuration).
        #[arg(short = 'o', long = "options", value_name = "OPTS")]
        options: Option<String>,
    },
    /// The vault's history across every member, newest first: who, when, which paths
    /// changed. With PATH: the versions of that file (who, when, size), or the snapshots
    /// that changed something below that directory.
    Log {
        /// A file or directory, relative to the vault root.
        path: Option<String>,
        /// Counts and bytes per snapshot, and every changed path.
        #[arg(long)]
        stat: bool,
        /// Entries per page.
        #[arg(long, value_name = "N", default_value_t = 20)]
        limit: usize,
        /// Only snapshots older than TIME (next page: what the previous one printed).
        #[arg(long, value_name = "TIME")]
        before: Option<String>,
        /// Only this device's snapshots: a name, an id prefix, or `me`.
        #[arg(long, value_name = "DEVICE")]
        device: Option<String>,
    },
    /// Give this device a name (shown by every member instead of a bare id). A device can
    /// only name itself: run it there. ID, if given, must be this device's.
    RenameDevice {
        /// [ID] NAME
        #[arg(num_args = 1..=2, required = true, value_name = "[ID] NAME")]
        args: Vec<String>,
    },
    /// Print a one-time ticket that lets another device join this vault (the daemon must
    /// be running: `cairn mount` or `cairn sync`).
    Invite {
        /// How long the ticket stays valid (at most 7 days).
        #[arg(long, default_value = "10m", value_parser = invitation_ttl)]
        ttl: std::time::Duration,
        /// Withdraw every pending invitation of this device instead.
        #[arg(long, conflicts_with = "ttl")]
        cancel: bool,
    },
    /// Let a device recover with the recovery phrase (`cairn recover --from` this device)
    /// for a while. Outside such a window this device refuses the phrase, so a copy of it (or
    /// of a removed device's vault.secret) admits nobody. The daemon must be running.
    AllowRecovery {
        /// How long the window stays open (at most 1 day).
        #[arg(long = "for", value_name = "DURATION", default_value = "10m", value_parser = recovery_window)]
        duration: std::time::Duration,
        /// Close the window now instead.
        #[arg(long, conflicts_with = "duration")]
        close: bool,
    },
    /// Join a vault with a ticket from `cairn invite`, then mount it at MOUNTPOINT (or only
    /// sync it with --no-mount, for an always-on replica).
    Join {
        ticket: String,
        /// Where to mount the joined vault (an existing, empty directory).
        #[arg(required_unless_present = "no_mount")]
        mountpoint: Option<PathBuf>,
        /// Only sync (no mount): keep a complete replica of the vault on this device.
        #[arg(long)]
        no_mount: bool,
        /// Idle time after the last write before a flush (default: the configuration's).
        #[arg(long, value_name = "MS")]
        debounce_ms: Option<u64>,
        /// This device's name, shown to every member (default: the host name).
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
        /// What this device fetches: `full` (every file's content) or `on-demand` (every
        /// name, size and date; content only when read or pinned). Default: `[sync] mode`
        /// of the configuration.
        #[arg(long, value_name = "full|on-demand", value_parser = sync_mode)]
        mode: Option<daemon::SyncMode>,
    },
    /// Rebuild this device from the vault's recovery phrase (read from stdin) and one
    /// reachable member, then mount at MOUNTPOINT (or only sync with --no-mount).
    Recover {
        /// A member to recover from: `DEVICE_ID@HOST:PORT` (see `cairn peers` there).
        #[arg(long, value_name = "DEVICE@HOST:PORT")]
        from: String,
        #[arg(required_unless_present = "no_mount")]
        mountpoint: Option<PathBuf>,
        #[arg(long)]
        no_mount: bool,
        /// This device's name, shown to every member (default: the host name).
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
        /// What this device fetches: `full` or `on-demand` (see `cairn join --help`).
        #[arg(long, value_name = "full|on-demand", value_parser = sync_mode)]
        mode: Option<daemon::SyncMode>,
    },
    /// Run the sync daemon without mounting (an always-on replica).
    Sync,
    /// List the vault's member devices: connected or not, the path in use (direct or which
    /// relay), round-trip time, bytes sent and received, known addresses.
    Peers {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a member device: it can no longer connect or fetch, and the vault's keys move
    /// to a new epoch it never receives, so nothing written afterwards is readable with
    /// anything it holds (what it already had stays readable to it). Prints the new recovery
    /// phrase: the old one admits nobody any more. DEVICE is its id or an unambiguous prefix
    /// (see `cairn peers`).
    RemoveDevice { device: String },
    /// Start a new key epoch for the current members (e.g. when a key may have leaked) and
    /// print its recovery phrase; older phrases admit nobody any more.
    RotateKeys,
    /// Print the recovery phrase of the vault's current key epoch (asks for confirmation on
    /// a terminal: whoever sees it can join the vault through a member's recovery window).
    RecoveryPhrase {
        /// Print without asking.
        #[arg(long)]
        yes: bool,
    },
    /// List deletions held by the mass-delete guard (too many files deleted at once, here or
    /// on another device): the files stay visible until approved or rejected.
    Held {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Apply a held deletion on this device and every other (all held ones without ID).
    Approve { id: Option<u64> },
    /// Undo a held deletion: the files come back on every device, the deleting one too (all
    /// held ones without ID).
    Reject { id: Option<u64> },
    /// List conflict copies (`name.sync-conflict-…`): the name, the copy, and for both
    /// versions who wrote it, when, and its size.
    Conflicts {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Resolve one conflict through the mount; the result syncs everywhere. PATH is the
    /// conflict copy, or the name it lost (if it has one copy).
    Resolve {
        path: String,
        /// `mine` (the version this device wrote), `theirs`, `both` (the copy becomes
        /// `name (device).ext`), or the name of the version to keep.
        #[arg(long, value_name = "mine|theirs|both|NAME")]
        keep: String,
    },
    /// Stop the daemon serving MOUNTPOINT, waiting until all changes are flushed.
    Unmount { mountpoint: PathBuf },
    /// Bring back a deleted or older version of one file or directory tree, touching nothing
    /// else (through the mount if the vault is mounted).
    Restore {
        /// Path relative to the vault root (or inside the mount).
        path: String,
        /// Restore the version of this time (`2026-11-23T10:00:00Z`, `90m`, `@UNIX_SECONDS`);
        /// default: the newest snapshot that has PATH.
        #[arg(long, value_name = "TIME")]
        at: Option<String>,
        /// Restore to this vault path instead of PATH (e.g. to keep the current version).
        #[arg(long, value_name = "DEST")]
        to: Option<String>,
    },
    /// Apply the `[history]` retention policy: forget the snapshots it does not keep and
    /// free the storage only they used (on this device).
    Prune {
        /// Only say what would be freed.
        #[arg(long)]
        dry_run: bool,
    },
    /// Show or set what this device fetches for this vault: `full` (every file's content, in
    /// the background) or `on-demand` (every name, size and date, but content only when read
    /// or pinned). Without MODE: the mode and the pins.
    Mode {
        #[arg(value_name = "full|on-demand", value_parser = sync_mode)]
        mode: Option<daemon::SyncMode>,
    },
    /// Keep files or whole trees on this device: fetched now (with progress on a terminal)
    /// and kept up to date as they change. PATH is relative to the vault root or inside the
    /// mount. Also `setfattr -n user.cairn.pin -v 1 FILE` in the mount.
    Pin {
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<String>,
    },
    /// Stop keeping PATHs pinned (their content stays until evicted).
    Unpin {
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<String>,
    },
    /// Free the local content of files (on an on-demand device) that another member can
    /// serve right now; files only this device holds, and pinned ones, are refused. A later
    /// read fetches them again. The daemon must be running.
    Evict {
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<String>,
    },
    /// Run the mount as a systemd user service.
    Service {
        #[command(subcommand)]
        action: ServiceAction,
    },
    /// Run a relay server that only your vault's devices may use, so devices that cannot
    /// reach each other directly still connect without any third party. Runs until SIGINT
    /// or SIGTERM; SIGHUP re-reads the allow file (which is also polled every 2 s).
    Relay(RelayArgs),
}

#[derive(clap::Args, Debug)]
struct RelayArgs {
    /// TCP address to listen on (HTTPS with --cert/--key, else plain HTTP).
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:3340")]
    bind: SocketAddr,
    /// TLS certificate chain, PEM (e.g. certbot's fullchain.pem); re-read hourly.
    #[arg(long, value_name = "PEM", requires = "key")]
    cert: Option<PathBuf>,
    /// TLS private key, PEM (e.g. certbot's privkey.pem).
    #[arg(long, value_name = "PEM", requires = "cert")]
    key: Option<PathBuf>,
    /// With TLS: also answer iroh's captive-portal probe over plain HTTP here (e.g.
    /// 0.0.0.0:80); by default that listener gets an unused ephemeral port.
    #[arg(long, value_name = "ADDR", requires = "cert")]
    captive_portal: Option<SocketAddr>,
    /// A device that may use the relay (repeatable): its id as `cairn peers` prints it.
    #[arg(long = "allow", value_name = "DEVICE_ID")]
    allow: Vec<String>,
    /// A file with one device id per line (`#` comments); changes apply without a restart,
    /// and a device removed from it is disconnected.
    #[arg(long, value_name = "PATH")]
    allow_file: Option<PathBuf>,
    /// Let any iroh endpoint use the relay (an open relay: only on purpose).
    #[arg(long, conflicts_with_all = ["allow", "allow_file"])]
    allow_anyone: bool,
}

#[derive(Subcommand)]
enum ServiceAction {
    /// Write the user unit and enable + start it for DIR (or print how, if no user manager
    /// is reachable).
    Install { dir: PathBuf },
    /// Stop and disable the service of DIR and remove its files.
    Uninstall { dir: PathBuf },
}

fn main() {
    let cli = Cli::parse();
    // The relay has no log file: its access-list changes go to stderr (the journal).
    logging::init(match cli.command {
        Command::Relay(_) => "warn,cairn_relay=info",
        _ => "warn",
    });
    raise_fd_limit();
    if let Err(e) = run(cli) {
        eprintln!("cairn: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    // The relay needs no vault on this machine: no configuration file, no data directory.
    if let Command::Relay(args) = cli.command {
        return relay::run(args);
    }
    let config = config::Config::load(cli.config.as_deref())?;
    let explicit_data_dir = cli.data_dir.clone();
    let data_dir = match cli.data_dir {
        // Absolute, so nothing depends on the daemon's working directory later.
        Some(d) => std::path::absolute(&d).unwrap_or(d),
        None => default_data_dir()?,
    };
    match cli.command {
        Command::Init { show_phrase, name } => {
            let name = name.as_deref().map(daemon::parse_name).transpose()?;
            let s = VaultState::create(&data_dir, &cli.vault)?;
            println!("created vault {:?}", s.name);
            if let Some(name) = name {
                daemon::set_own_name(&daemon::OpenVault::open(&s)?, name)?;
            }
            print_identity(&s);
            if show_phrase {
                println!(
                    "recovery phrase: {}",
                    s.key_epochs().current().secret.to_phrase()
                );
            }
        }
        Command::Ensure => {
            let s = match VaultState::load(&data_dir, &cli.vault) {
                Ok(s) => s,
                Err(_)
                    if !daemon::vault_dir(&data_dir, &cli.vault)
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
        Command::Status { json } => {
            let report = daemon::report(
                &VaultState::load(&data_dir, &cli.vault)?,
                &daemon::ReportOptions {
                    min_free: config.mount.min_free_bytes(),
                    default_mode: config.sync.mode,
                },
            )?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                status::print_human(&report);
            }
        }
        Command::Mount {
            mountpoint,
            debounce_ms,
            init,
            at,
            options,
        } => {
            let state = if init
                && !daemon::vault_dir(&data_dir, &cli.vault)
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
            if let Err(e) = logging::log_to_file(&state.dir) {
                tracing::warn!(error = %format!("{e:#}"), "logging to stderr only");
            }
            let debounce_ms = debounce_ms.unwrap_or(config.mount.debounce_ms);
            let mut opts = cairn_fuse::MountOptions {
                flush_debounce: std::time::Duration::from_millis(debounce_ms),
                min_free: config.mount.min_free_bytes(),
                ..Default::default()
            };
            for list in [Some(&config.mount.options), options.as_ref()]
                .into_iter()
                .flatten()
            {
                opts.apply_options(list)?;
            }
            match at {
                Some(t) => {
                    let at_ms = daemon::parse_time(&t, daemon::now_ms())?;
                    daemon::mount_at(&state, &mountpoint, at_ms, opts)?;
                }
                None => daemon::mount(
                    &state,
                    &mountpoint,
                    opts,
                    &cache_budget(&config),
                    Some(net_settings(&config)),
                    config.guard.policy(),
                )?,
            }
        }
        Command::Log {
            path,
            stat,
            limit,
            before,
            device,
        } => log::run(
            &VaultState::load(&data_dir, &cli.vault)?,
            log::LogArgs {
                path,
                stat,
                limit,
                before,
                device,
            },
        )?,
        Command::RenameDevice { args } => {
            let state = VaultState::load(&data_dir, &cli.vault)?;
            let vault = daemon::OpenVault::open(&state)?;
            let (id, name) = match args.as_slice() {
                [name] => (None, name),
                [id, name] => (Some(id), name),
                _ => unreachable!("clap takes one or two"),
            };
            let me = vault.device_id.to_string();
            if let Some(id) = id
                && !me.starts_with(&id.to_ascii_lowercase())
            {
                bail!(
                    "{id:?} is not this device ({}); a device can only name itself: run `cairn rename-device NAME` on that device",
                    vault.device_id.short()
                );
            }
            let name = daemon::parse_name(name)?;
            daemon::set_own_name(&vault, name.clone())?;
            // A running daemon passes it on now; otherwise at the next start.
            let live = daemon::control_request(&state.dir, "names")?.is_some();
            println!(
                "this device is now {}{}",
                cairn_registry::names::label(&vault.device_id, Some(&name)),
                if live {
                    ""
                } else {
                    "; the members learn it when the daemon next runs"
                }
            );
        }
        Command::Conflicts { json } => {
            held::conflicts(&VaultState::load(&data_dir, &cli.vault)?, json)?
        }
        Command::Resolve { path, keep } => {
            let state = VaultState::load(&data_dir, &cli.vault)?;
            let r = daemon::resolve(&state, &path, &daemon::Keep::parse(&keep))?;
            println!("resolved {}: kept {}", r.path, r.kept);
        }
        Command::Held { json } => held::list(&VaultState::load(&data_dir, &cli.vault)?.dir, json)?,
        Command::Approve { id } => {
            held::decide(&VaultState::load(&data_dir, &cli.vault)?.dir, id, true)?
        }
        Command::Reject { id } => {
            held::decide(&VaultState::load(&data_dir, &cli.vault)?.dir, id, false)?
        }
        Command::Unmount { mountpoint } => daemon::unmount(&data_dir, &mountpoint)?,
        Command::Invite { cancel: true, .. } => {
            let state = VaultState::load(&data_dir, &cli.vault)?;
            let reply =
                daemon::control_request(&state.dir, "invite cancel")?.ok_or_else(no_daemon)?;
            println!("withdrew {} pending invitation(s)", reply.trim());
        }
        Command::Invite { ttl, .. } => {
            let state = VaultState::load(&data_dir, &cli.vault)?;
            let reply = daemon::control_request(&state.dir, &format!("invite {}", ttl.as_secs()))?
                .ok_or_else(no_daemon)?;
            println!("{}", reply.trim());
            eprintln!(
                "cairn: on the new device run `cairn join TICKET DIR` within {}; the ticket works once",
                humantime::format_duration(ttl)
            );
        }
        Command::AllowRecovery { close: true, .. } => {
            let state = VaultState::load(&data_dir, &cli.vault)?;
            let reply = daemon::control_request(&state.dir, "allow-recovery close")?
                .ok_or_else(no_daemon)?;
            match reply.trim() {
                "closed" => println!(
                    "recovery window closed: this device refuses the recovery phrase again"
                ),
                _ => println!(
                    "no recovery window was open: this device already refuses the recovery phrase"
                ),
            }
        }
        Command::AllowRecovery { duration, .. } => {
            let state = VaultState::load(&data_dir, &cli.vault)?;
            let reply = daemon::control_request(
                &state.dir,
                &format!("allow-recovery {}", duration.as_secs()),
            )?
            .ok_or_else(no_daemon)?;
            let until_ms: u64 = reply.trim().parse().map_err(|_| {
                anyhow::anyhow!(
                    "the daemon's reply {:?} is unreadable; is it the same cairn version?",
                    reply.trim()
                )
            })?;
            println!(
                "recovery window open until {} (for {})",
                daemon::format_time(until_ms),
                humantime::format_duration(duration)
            );
            let me = state.device.device_id();
            eprintln!(
                "cairn: on the device to recover, run `cairn recover --from {me}@ADDRESS DIR` and type the recovery phrase; ADDRESS is one of this device's addresses (`cairn peers`)"
            );
            eprintln!("cairn: close it early with `cairn allow-recovery --close`");
        }
        Command::Join {
            ticket,
            mountpoint,
            no_mount,
            debounce_ms,
            name,
            mode,
        } => {
            let name = name.as_deref().map(daemon::parse_name).transpose()?;
            let settings = net_settings(&config);
            let state = daemon::join_vault(&data_dir, &cli.vault, &ticket, settings)?;
            if let Some(name) = name {
                daemon::set_own_name(&daemon::OpenVault::open(&state)?, name)?;
            }
            if let Some(mode) = mode {
                daemon::set_sync_mode(&state, mode)?;
            }
            eprintln!(
                "cairn: joined vault {} as device {}",
                state.secret.vault_id(),
                state.device.device_id()
            );
            serve_new_member(&state, mountpoint, no_mount, debounce_ms, &config)?;
        }
        Command::Recover {
            from,
            mountpoint,
            no_mount,
            name,
            mode,
        } => {
            let name = name.as_deref().map(daemon::parse_name).transpose()?;
            let settings = net_settings(&config);
            if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                eprintln!("cairn: type the 24-word recovery phrase, then Enter:");
            }
            let mut phrase = String::new();
            std::io::stdin()
                .read_line(&mut phrase)
                .map_err(|e| anyhow::anyhow!("cannot read the recovery phrase from stdin: {e}"))?;
            let state = daemon::recover_vault(&data_dir, &cli.vault, &phrase, &from, settings)?;
            if let Some(name) = name {
                daemon::set_own_name(&daemon::OpenVault::open(&state)?, name)?;
            }
            if let Some(mode) = mode {
                daemon::set_sync_mode(&state, mode)?;
            }
            eprintln!(
                "cairn: recovered vault {} as new device {}; its data now syncs from the members",
                state.secret.vault_id(),
                state.device.device_id()
            );
            serve_new_member(&state, mountpoint, no_mount, None, &config)?;
        }
        Command::Sync => {
            let state = VaultState::load(&data_dir, &cli.vault)?;
            daemon::sync_only(&state, net_settings(&config), config.guard.policy())?;
        }
        Command::Peers { json } => {
            let state = VaultState::load(&data_dir, &cli.vault)?;
            let me = state.device.device_id();
            match daemon::control_request(&state.dir, "peers")? {
                Some(reply) => {
                    let reply: daemon::PeersReply = serde_json::from_str(reply.trim())
                        .map_err(|e| anyhow::anyhow!("the daemon's peers reply is unreadable ({e}); is it the same cairn version?"))?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&reply)?);
                    } else {
                        let own = daemon::OpenVault::open(&state)
                            .map(|v| daemon::Labels::load(&v))
                            .unwrap_or_default();
                        print_peers(&me.to_string(), own.name(&me), &reply);
                    }
                }
                None => {
                    let device = daemon::OpenVault::open(&state)?;
                    let labels = daemon::Labels::load(&device);
                    println!(
                        "{me}  {}this device (daemon not running: connection state unknown)",
                        named(labels.name(&me))
                    );
                    for d in device.registry.members(&device.vault_id)? {
                        if d != me {
                            println!("{d}  {}member", named(labels.name(&d)));
                        }
                    }
                }
            }
        }
        Command::RemoveDevice { device } => {
            let state = VaultState::load(&data_dir, &cli.vault)?;
            match daemon::control_request(&state.dir, &format!("remove {device}"))? {
                Some(reply) => {
                    let (head, phrase) =
                        reply.trim().split_once('\n').unwrap_or((reply.trim(), ""));
                    let mut words = head.split_whitespace();
                    let (dev, epoch) = (words.next().unwrap_or("?"), words.next().unwrap_or("?"));
                    println!("removed device {dev}; the vault's keys moved to epoch {epoch}");
                    print_new_phrase(phrase);
                }
                None => bail!(
                    "the daemon of this vault is not running; start it (`cairn mount DIR` or `cairn sync`) so the removal reaches the other members, then retry"
                ),
            }
        }
        Command::RotateKeys => {
            let state = VaultState::load(&data_dir, &cli.vault)?;
            match daemon::control_request(&state.dir, "rotate")? {
                Some(reply) => {
                    let (epoch, phrase) =
                        reply.trim().split_once('\n').unwrap_or((reply.trim(), ""));
                    println!("the vault's keys moved to epoch {}", epoch.trim());
                    print_new_phrase(phrase);
                }
                None => bail!(
                    "the daemon of this vault is not running; start it (`cairn mount DIR` or `cairn sync`) so the new keys reach the other members, then retry"
                ),
            }
        }
        Command::RecoveryPhrase { yes } => {
            let state = VaultState::load(&data_dir, &cli.vault)?;
            if !yes && std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                eprint!(
                    "cairn: the phrase lets anyone join this vault through a member's recovery window. Print it? [y/N] "
                );
                let mut answer = String::new();
                std::io::stdin().read_line(&mut answer)?;
                if !matches!(answer.trim(), "y" | "Y" | "yes") {
                    bail!("not printed");
                }
            }
            let current = state.key_epochs().current();
            println!("{}", current.secret.to_phrase());
            eprintln!("cairn: recovery phrase of key epoch {}", current.number);
        }
        Command::Restore { path, at, to } => daemon::restore(
            &VaultState::load(&data_dir, &cli.vault)?,
            &path,
            at.as_deref(),
            to.as_deref(),
        )?,
        Command::Prune { dry_run } => prune::run(
            &VaultState::load(&data_dir, &cli.vault)?,
            config.history.policy(),
            dry_run,
        )?,
        Command::Mode { mode } => {
            let state = VaultState::load(&data_dir, &cli.vault)?;
            match mode {
                Some(m) => {
                    daemon::set_sync_mode(&state, m)?;
                    println!("this device now fetches {}", describe_mode(m));
                }
                None => {
                    let od = daemon::OnDemand::load(&state.dir)?;
                    od.set_default_mode(config.sync.mode);
                    println!("mode: {} ({})", od.mode(), describe_mode(od.mode()));
                    for p in od.pins() {
                        println!("pinned: {}", if p.is_empty() { "/" } else { &p });
                    }
                }
            }
        }
        Command::Pin { paths } => {
            let state = VaultState::load(&data_dir, &cli.vault)?;
            let bar = pin_progress_bar();
            let done = daemon::pin_paths(&state, &paths, |path, done, total| {
                if let Some(b) = &bar {
                    b.set_message(path.to_string());
                    b.set_length(total);
                    b.set_position(done);
                }
            });
            if let Some(b) = &bar {
                b.finish_and_clear();
            }
            for (path, outcome) in done? {
                match outcome {
                    daemon::PinOutcome::Fetched(n) => {
                        println!("pinned {path}: {n} chunk(s) fetched, all of it is on this device")
                    }
                    daemon::PinOutcome::Recorded => println!(
                        "pinned {path}; the daemon is not running: it fetches it when it next runs"
                    ),
                }
            }
        }
        Command::Unpin { paths } => {
            daemon::unpin_paths(&VaultState::load(&data_dir, &cli.vault)?, &paths)?;
            println!(
                "unpinned {}; the content stays until evicted (`cairn evict`)",
                paths.join(", ")
            );
        }
        Command::Evict { paths } => {
            let r = daemon::evict_paths(&VaultState::load(&data_dir, &cli.vault)?, &paths)?;
            println!(
                "evicted {} file(s), freed {}",
                r.evicted_files,
                status::bytes(r.freed_bytes)
            );
            for (path, why) in &r.refused {
                eprintln!("cairn: kept {path}: {why}");
            }
            if !r.refused.is_empty() {
                bail!("{} file(s) were not evicted (see above)", r.refused.len());
            }
        }
        Command::Service { action } => match action {
            ServiceAction::Install { dir } => service::install(
                &dir,
                &service::InstanceSettings {
                    vault: &cli.vault,
                    data_dir: explicit_data_dir.as_deref(),
                    config: cli.config.as_deref(),
                },
            )?,
            ServiceAction::Uninstall { dir } => service::uninstall(&dir)?,
        },
        Command::Relay(_) => unreachable!("handled above"),
    }
    Ok(())
}

/// After `join` / `recover`: mount the vault at `mountpoint`, or only sync it.
fn serve_new_member(
    state: &VaultState,
    mountpoint: Option<PathBuf>,
    no_mount: bool,
    debounce_ms: Option<u64>,
    config: &config::Config,
) -> Result<()> {
    let settings = net_settings(config);
    match mountpoint {
        Some(mp) if !no_mount => {
            let debounce_ms = debounce_ms.unwrap_or(config.mount.debounce_ms);
            let mut opts = cairn_fuse::MountOptions {
                flush_debounce: std::time::Duration::from_millis(debounce_ms),
                min_free: config.mount.min_free_bytes(),
                ..Default::default()
            };
            opts.apply_options(&config.mount.options)?;
            daemon::mount(
                state,
                &mp,
                opts,
                &cache_budget(config),
                Some(settings),
                config.guard.policy(),
            )
        }
        _ => daemon::sync_only(state, settings, config.guard.policy()),
    }
}

/// A flush holds one descriptor per dirty file and the FUSE session many more; the usual soft
/// limit (1024) would make a large copy into the mount unflushable. Raise it to the hard limit.
fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit on a zeroed rlimit struct we own.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// `--mode` of `join` / `recover`, and `cairn mode`.
fn sync_mode(text: &str) -> Result<daemon::SyncMode, String> {
    text.parse()
}

fn describe_mode(m: daemon::SyncMode) -> &'static str {
    match m {
        daemon::SyncMode::Full => "every file's content, in the background",
        daemon::SyncMode::OnDemand => "every name, size and date; content only when read or pinned",
    }
}

/// `cairn pin`'s progress, on a terminal only.
fn pin_progress_bar() -> Option<indicatif::ProgressBar> {
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return None;
    }
    let bar = indicatif::ProgressBar::new(0);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg:>20} [{bar:30}] {pos}/{len} chunks, {elapsed} (eta {eta})",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    Some(bar)
}

/// `--ttl` of `cairn invite`.
fn invitation_ttl(text: &str) -> Result<std::time::Duration, String> {
    lifetime(text, daemon::MAX_INVITATION_TTL, "an invitation")
}

/// `--for` of `cairn allow-recovery`.
fn recovery_window(text: &str) -> Result<std::time::Duration, String> {
    lifetime(text, daemon::MAX_RECOVERY_WINDOW, "a recovery window")
}

/// A duration between one second and `max`. The daemon checks the same bounds; checking here
/// too names the limit before anything is sent, even for numbers too large to parse.
fn lifetime(
    text: &str,
    max: std::time::Duration,
    what: &str,
) -> Result<std::time::Duration, String> {
    let too_long = || {
        format!(
            "{what} can last at most {}",
            humantime::format_duration(max)
        )
    };
    let d = humantime::parse_duration(text).map_err(|e| match e {
        humantime::DurationError::NumberOverflow => too_long(),
        e => format!("{e}: give a duration such as 10m, 2h or 3days"),
    })?;
    if d > max {
        return Err(too_long());
    }
    if d < std::time::Duration::from_secs(1) {
        return Err(format!("{what} must last at least one second"));
    }
    Ok(d)
}

fn no_daemon() -> anyhow::Error {
    anyhow::anyhow!(
        "the daemon of this vault is not running; start it with `cairn mount DIR` (or `cairn sync`) and retry"
    )
}

/// The daemon's network settings from the configuration (which already applied the
/// `CAIRN_BIND` / `CAIRN_RELAY` / `CAIRN_DIRECT` environment overrides).
fn net_settings(config: &config::Config) -> daemon::NetSettings {
    daemon::NetSettings {
        bind: config.net.bind,
        relays: config.net.relay.to_relays(),
        direct: config.net.direct,
        prune: config.history.auto(),
        fetch_timeout: config.sync.fetch_timeout(),
        mode: config.sync.mode,
        cache_max_bytes: config.cache.max_bytes(),
    }
}

/// `laptop: ` for a named device, nothing otherwise (lines start with the full id, which
/// `remove-device` and `recover --from` take).
fn named(name: Option<&cairn_registry::DeviceName>) -> String {
    name.map(|n| format!("{n}: ")).unwrap_or_default()
}

fn print_peers(me: &str, my_name: Option<&cairn_registry::DeviceName>, reply: &daemon::PeersReply) {
    let own = if reply.addrs.is_empty() {
        "-".to_string()
    } else {
        reply.addrs.join(",")
    };
    println!("{me}  {}this device, listening on {own}", named(my_name));
    for p in &reply.peers {
        let mut parts = vec![
            if p.connected {
                "connected"
            } else {
                "disconnected"
            }
            .to_string(),
        ];
        if let Some(path) = &p.path {
            parts.push(format!("via {path}"));
        }
        if let Some(us) = p.rtt_us {
            parts.push(format!("rtt {:.1} ms", us as f64 / 1000.0));
        }
        if p.bytes_sent + p.bytes_received > 0 {
            parts.push(format!(
                "sent {}, received {}",
                status::bytes(p.bytes_sent),
                status::bytes(p.bytes_received)
            ));
        }
        parts.push(match p.last_contact_ms {
            Some(ms) => format!("last contact {}", daemon::format_time(ms)),
            None => "never contacted".to_string(),
        });
        let addrs = if p.addrs.is_empty() {
            "-".to_string()
        } else {
            p.addrs.join(",")
        };
        parts.push(format!("addresses {addrs}"));
        let name = p
            .name
            .as_ref()
            .map(|n| format!("{n}: "))
            .unwrap_or_default();
        println!("{}  {name}{}", p.device, parts.join(", "));
    }
}

fn cache_budget(config: &config::Config) -> daemon::CacheBudget {
    daemon::CacheBudget {
        chunk_bytes: config.cache.chunk_cache_bytes(),
        node_bytes: config.cache.node_cache_bytes(),
    }
}

fn print_identity(s: &VaultState) {
    println!("vault id:  {}", s.secret.vault_id());
    println!("device id: {}", s.device.device_id());
    println!("state dir: {}", s.dir.display());
}

/// After a rotation: the new phrase, and why the old one no longer helps.
fn print_new_phrase(phrase: &str) {
    if phrase.trim().is_empty() {
        return;
    }
    println!("new recovery phrase (write it down; the previous phrase no longer admits anyone):");
    println!("{}", phrase.trim());
}
