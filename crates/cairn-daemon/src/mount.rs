//! `cairn mount` and `cairn unmount`: the daemon's lifecycle.
//!
//! The daemon runs in the foreground (systemd `Type=notify` friendly: READY=1 is sent only
//! once the kernel mount answers). SIGTERM, SIGINT or an external unmount stop it; stopping
//! always flushes the overlay into a published snapshot before the process exits, and
//! `cairn unmount` waits for that, so nothing written before unmount is lost.

use std::fs;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use cairn_fuse::{
    BaseLayer, FlushSink, MountOptions, Overlay, OverlayError, is_mounted, lazy_unmount,
};

use super::base::VaultBase;
use super::control::ControlServer;
use super::history_folder::HistorySnapshots;
use super::net::{Net, NetSettings};
use super::sink::{VaultSink, view_of};
use super::status::{StatusBoard, StatusSink};
use crate::instance::{self, InstanceLock, running_daemon};
use crate::open_vault::OpenVault;
use crate::publisher::Publisher;
use crate::state::VaultState;
use cairn_vault::GuardPolicy;

/// Memory budgets of a mount's caches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheBudget {
    /// Decrypted file chunks kept by the mount.
    pub chunk_bytes: usize,
    /// Decoded tree nodes kept by the engine.
    pub node_bytes: usize,
}

/// The daemon serving a vault's writable mount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveMount {
    pub pid: i32,
    pub mountpoint: std::path::PathBuf,
}

/// The live daemon serving the writable mount of this vault, if any (not `cairn sync`, not a
/// history view).
pub fn writable_mount(vault_dir: &Path) -> Option<LiveMount> {
    let d = running_daemon(vault_dir)?;
    Some(LiveMount {
        pid: d.pid,
        mountpoint: d.mountpoint?,
    })
}

/// Blocks the stop signals in the calling thread (and every thread it spawns later), so one
/// dedicated thread can receive them with `sigwait` instead of an async-signal handler.
pub(super) fn block_stop_signals() -> libc::sigset_t {
    // SAFETY: plain libc signal-mask calls on a zeroed, initialized sigset_t.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn notify_systemd(msg: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sock = match UnixDatagram::unbound() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot notify systemd");
            return;
        }
    };
    let bytes = path.as_encoded_bytes();
    let res = if let Some(abstract_name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)
            .and_then(|a| sock.send_to_addr(msg.as_bytes(), &a))
    } else {
        sock.send_to(msg.as_bytes(), Path::new(&path))
    };
    if let Err(e) = res {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// The network side of a running daemon: stopped after the mount's final flush, so the last
/// snapshot is still announced to connected peers.
struct Networking {
    control: Option<ControlServer>,
    net: Option<Net>,
    /// The automatic prune (see `crate::prune::spawn_auto`).
    pruner: Option<(
        Arc<std::sync::atomic::AtomicBool>,
        std::thread::JoinHandle<()>,
    )>,
    reporter: Option<(
        Arc<std::sync::atomic::AtomicBool>,
        std::thread::JoinHandle<()>,
    )>,
}

impl Drop for Networking {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Networking {
    fn none() -> Self {
        Self {
            control: None,
            net: None,
            pruner: None,
            reporter: None,
        }
    }

    fn start(
        state: &VaultState,
        publisher: &Arc<Publisher>,
        settings: Option<NetSettings>,
        board: Option<Arc<StatusBoard>>,
    ) -> Result<Self> {
        let Some(settings) = settings else {
            return Ok(Self::none());
        };
        let pruner = match settings.prune {
            Some(auto) => {
                let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let t = crate::prune::spawn_auto(publisher.vault.clone(), auto, stop.clone())?;
                Some((stop, t))
            }
            None => None,
        };
        let net = Net::start(state, publisher.clone(), settings)?;
        let control = ControlServer::start(&state.dir, net.node().clone())?;
        let reporter = match board {
            Some(board) => {
                let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let (stop2, inner) = (stop.clone(), net.node().clone());
                let t = std::thread::Builder::new()
                    .name("cairn-netstatus".into())
                    .spawn(move || {
                        while !stop2.load(std::sync::atomic::Ordering::SeqCst) {
                            board.set_peers(inner.peer_status());
                            let (chunks, bytes) = inner.downloads();
                            board.set_downloads(chunks, bytes);
                            std::thread::sleep(Duration::from_millis(500));
                        }
                    })?;
                Some((stop, t))
            }
            None => None,
        };
        eprintln!(
            "cairn: device {} listening on {}",
            publisher.vault.device_id.short(),
            net.addrs()
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        Ok(Self {
            control: Some(control),
            net: Some(net),
            pruner,
            reporter,
        })
    }

    fn stop(&mut self) {
        // A prune stopped midway leaves only garbage behind (see `crate::prune`).
        if let Some((stop, t)) = self.pruner.take() {
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
            let _ = t.join();
        }
        if let Some((stop, t)) = self.reporter.take() {
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
            let _ = t.join();
        }
        self.control.take();
        if let Some(net) = self.net.take() {
            net.shutdown();
        }
    }
}

/// Runs the network side only (an always-on replica, `cairn sync` / `cairn join --no-mount`)
/// until a stop signal.
pub fn sync_only(state: &VaultState, settings: NetSettings, guard: GuardPolicy) -> Result<()> {
    let sigset = block_stop_signals();
    let _lock = instance::lock_vault(&state.dir, &state.name, None)?;
    let device = Arc::new(OpenVault::open(state)?);
    let publisher = Arc::new(Publisher::with_policy(device, None, guard));
    {
        // Paths decided or restored while the daemon was down are no longer held.
        let engine = publisher.vault.engine();
        publisher.guard_after(&engine, engine.root());
    }
    let mut networking = Networking::start(state, &publisher, Some(settings), None)?;
    eprintln!(
        "cairn: syncing vault {:?} (no mount); stop with Ctrl-C or SIGTERM",
        state.name
    );
    notify_systemd("READY=1\nSTATUS=syncing (no mount)");
    let rx = signal_thread(sigset)?;
    let sig = rx.recv().unwrap_or(libc::SIGTERM);
    tracing::info!(signal = sig, "stopping");
    notify_systemd("STOPPING=1");
    networking.stop();
    eprintln!("cairn: stopped");
    Ok(())
}

/// Under systemd with `WatchdogSec=`, pings the watchdog at half its interval for as long as
/// the mount answers a stat: a hung FUSE session stops the pings and systemd restarts us.
/// The stat runs on its own thread so a hang never blocks signal handling.
fn start_watchdog(mountpoint: &Path) {
    let Some(usec) = std::env::var("WATCHDOG_USEC")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&u| u > 0)
    else {
        return;
    };
    if let Some(pid) = std::env::var("WATCHDOG_PID")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        && pid != std::process::id()
    {
        return;
    }
    let every = Duration::from_micros(usec / 2);
    let mountpoint = mountpoint.to_path_buf();
    let spawned = std::thread::Builder::new()
        .name("cairn-watchdog".into())
        .spawn(move || {
            while is_mounted(&mountpoint) {
                if fs::metadata(&mountpoint).is_ok() {
                    notify_systemd("WATCHDOG=1");
                }
                std::thread::sleep(every);
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the systemd watchdog thread");
    }
}

fn signal_thread(sigset: libc::sigset_t) -> Result<mpsc::Receiver<i32>> {
    let (tx, rx) = mpsc::channel::<i32>();
    std::thread::Builder::new()
        .name("cairn-signals".into())
        .spawn(move || {
            loop {
                let mut sig = 0;
                // SAFETY: sigwait on the set blocked above; `sig` is a valid out-pointer.
                if unsafe { libc::sigwait(&sigset, &mut sig) } == 0 && tx.send(sig).is_err() {
                    break;
                }
            }
        })
        .context("starting the signal thread")?;
    Ok(rx)
}

pub fn mount(
    state: &VaultState,
    mountpoint: &Path,
    opts: MountOptions,
    cache: &CacheBudget,
    net: Option<NetSettings>,
    guard: GuardPolicy,
) -> Result<()> {
    let sigset = block_stop_signals();
    let abs = std::path::absolute(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf());
    let shown = fs::canonicalize(&abs).unwrap_or(abs);
    let lock = instance::lock_vault(&state.dir, &state.name, Some(&shown))?;
    let device = Arc::new(OpenVault::open_with(state, cache.node_bytes)?);
    let overlay = Overlay::open(state.dir.join("overlay")).map_err(|e| match e {
        OverlayError::Locked { .. } => anyhow::anyhow!(
            "vault {:?} is already mounted by another cairn process ({e}); unmount it first with `cairn unmount DIR`",
            state.name
        ),
        e => anyhow::Error::new(e).context("opening the local overlay"),
    })?;
    let source = device.engine().source();
    let base = Arc::new(
        VaultBase::with_chunk_cache(device.stores.clone(), view_of(source), cache.chunk_bytes)
            .with_remote(device.remote_blobs.clone())
            .with_faults(device.faults.clone())
            .with_ondemand(device.ondemand.clone()),
    );
    let publisher = Arc::new(Publisher::with_policy(
        device.clone(),
        Some(base.clone()),
        guard,
    ));
    {
        // Held deletions survive restarts: show them from the first lookup on.
        let engine = device.engine();
        publisher.guard_after(&engine, engine.root());
        publisher.show(&engine, None);
    }
    let sink = Arc::new(VaultSink {
        publisher: publisher.clone(),
    });
    // The `.cairn/history/` folder of past snapshots, read from the same stores.
    let opts = MountOptions {
        history: Some(cairn_fuse::HistoryFolder(Arc::new(HistorySnapshots::open(
            device.clone(),
        )?))),
        ..opts
    };
    let board = StatusBoard::new(&state.dir, &shown);
    board.set_faults(device.faults.clone());
    serve(
        state,
        mountpoint,
        base,
        sink,
        overlay,
        opts,
        sigset,
        lock,
        Some(board),
        Some((&publisher, net)),
    )
}

/// Mounts `base` + `overlay`, announces readiness, and serves until a stop signal or an
/// external unmount; then flushes and unmounts. `board` (the writable mount's, not a history
/// view's) is published as the vault's status file while serving.
#[allow(clippy::too_many_arguments)]
pub(super) fn serve(
    state: &VaultState,
    mountpoint: &Path,
    base: Arc<dyn BaseLayer>,
    sink: Arc<dyn FlushSink>,
    overlay: Overlay,
    opts: MountOptions,
    sigset: libc::sigset_t,
    lock: InstanceLock,
    board: Option<Arc<StatusBoard>>,
    publisher: Option<(&Arc<Publisher>, Option<NetSettings>)>,
) -> Result<()> {
    let sink: Arc<dyn FlushSink> = match &board {
        Some(b) => Arc::new(StatusSink {
            inner: sink,
            board: b.clone(),
        }),
        None => sink,
    };
    let handle = cairn_fuse::mount(base, sink, overlay, mountpoint, opts)?;
    let mountpoint = handle.mountpoint().to_path_buf();
    // The network starts once the mount exists (so a bad mountpoint fails before anything
    // binds) and before READY (so a ready daemon is reachable by its peers).
    let (publisher, settings) = match publisher {
        Some((p, s)) => (Some(p), s),
        None => (None, None),
    };
    let mut networking = match publisher {
        Some(publisher) => {
            publisher.set_invalidator(Some(handle.invalidator()));
            match Networking::start(state, publisher, settings, board.clone()) {
                Ok(n) => n,
                Err(e) => {
                    publisher.set_invalidator(None);
                    if let Err(u) = handle.unmount() {
                        tracing::error!(error = %u, "unmount after a failed start");
                    }
                    return Err(e);
                }
            }
        }
        None => Networking::none(),
    };
    let status_writer = match &board {
        Some(b) => Some((b.clone(), b.spawn_writer()?)),
        None => None,
    };
    // The kernel answers once the session thread runs; a stat through the mount proves it.
    fs::metadata(&mountpoint)
        .with_context(|| format!("the new mount at {} does not answer", mountpoint.display()))?;
    eprintln!(
        "cairn: vault {:?} mounted at {}",
        state.name,
        mountpoint.display()
    );
    notify_systemd(&format!(
        "READY=1\nSTATUS=mounted at {}",
        mountpoint.display()
    ));

    start_watchdog(&mountpoint);
    let rx = signal_thread(sigset)?;
    let reason = loop {
        match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(sig) => break format!("signal {sig}"),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if !is_mounted(&mountpoint) {
                    break "external unmount".to_string();
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break "signal thread ended".to_string(),
        }
    };
    tracing::info!(%reason, "stopping: flushing and unmounting");
    notify_systemd("STOPPING=1\nSTATUS=flushing");
    if let Some(publisher) = publisher {
        publisher.set_invalidator(None);
    }
    let result = handle.unmount();
    networking.stop();
    if let Some((b, w)) = status_writer {
        b.stop(w);
    }
    // Only now may another daemon take the vault: every change is in a snapshot.
    drop(lock);
    result.context("unmounting (changes not yet in a snapshot stay in the overlay and are flushed at the next mount)")?;
    eprintln!(
        "cairn: {} unmounted, all changes flushed",
        mountpoint.display()
    );
    Ok(())
}

/// Stops the daemon serving `mountpoint` (found among this data dir's vaults, the writable
/// mount or a history view), waiting until it has flushed every change and exited.
pub fn unmount(data_dir: &Path, mountpoint: &Path) -> Result<()> {
    let abs = std::path::absolute(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf());
    let canonical = fs::canonicalize(&abs).unwrap_or(abs.clone());
    let found = fs::read_dir(data_dir.join("vaults"))
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|v| instance::live_daemons(&v.path()))
        .find(|d| {
            d.mountpoint
                .as_deref()
                .is_some_and(|m| m == canonical || m == abs)
        });
    let Some(daemon) = found else {
        if !is_mounted(&canonical) && !is_mounted(&abs) {
            bail!(
                "{} is not a cairn mount of this data directory ({}); nothing to unmount",
                abs.display(),
                data_dir.display()
            );
        }
        // A mount without a live daemon (crashed): detach it; its overlay is replayed and
        // flushed at the next mount.
        lazy_unmount(&canonical)
            .map_err(|e| anyhow::anyhow!("detaching {} failed: {e}", canonical.display()))?;
        eprintln!(
            "cairn: detached {} (no daemon was running; pending changes will flush at the next mount)",
            canonical.display()
        );
        return Ok(());
    };
    instance::stop(&daemon, Duration::from_secs(600))?;
    eprintln!("cairn: unmounted {}", canonical.display());
    Ok(())
}
