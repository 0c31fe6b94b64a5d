//! The running daemon's control socket (`<vault dir>/run/control.sock`, mode 0600), through
//! which `cairn invite`, `cairn peers` and `cairn remove-device` reach the live endpoint.
//!
//! One request per connection, one line in, the reply then EOF: `invite SECONDS` (answers the
//! ticket), `invite cancel` (withdraws every pending invitation, answers how many),
//! `allow-recovery SECONDS` (opens the recovery window, answers when it closes in Unix
//! milliseconds), `allow-recovery close` (answers `closed` or `none`), `peers`,
//! `remove DEVICE_HEX`, `rotate`, `held` (a JSON list of held deletions), `approve [ID]`
//! and `reject [ID]` (decide one held deletion, or all; answer how many paths), `names`
//! (re-sends the roster: a device name changed), `history` (indexes the members' snapshots,
//! answers `ok ADDED GAPS`), `prefetch ROOT_HEX [PATH]` (fetches the content of a past tree,
//! answers `ok CHUNKS`), `nodes ROOT_HEX PATH` and `diff OLD_HEX NEW_HEX` (fetch the tree
//! nodes a history listing reads), `prune dry|run WITHIN_MS HOURLY DAILY WEEKLY MONTHLY`
//! (answers a JSON `PruneReport`), `pin JSON_PATH` (records the pin, fetches the tree with
//! `progress DONE TOTAL` lines, answers `ok CHUNKS`), `unpin JSON_PATH`, `evict JSON_PATH`
//! (answers a JSON `EvictReport`), `mode full|on-demand`. Replies start with `ok` or `err`; `peers` answers `ok` and a
//! JSON [`PeersReply`] (this device's addresses, then every member with its connection state,
//! path, round-trip time and bytes); `remove` and `rotate` answer with the new key epoch:
//! `ok [DEVICE] EPOCH` and, on the next line, its recovery phrase (the socket is the owner's
//! only, like the key files the phrase could be computed from).
//! Only the owner can connect (file mode), which is also who owns the vault's keys.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use cairn_crypto::DeviceId;

use serde::{Deserialize, Serialize};

use super::net::NetNode;
use crate::status::PeerStatus;

/// How long `cairn invite` waits for a relay-only daemon to reach its relay: a ticket without
/// any address would be useless.
const INVITE_ADDR_WAIT: Duration = Duration::from_secs(10);

/// The reply to `peers`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PeersReply {
    /// Where this device can be reached: `IP:PORT` and relay URLs.
    pub addrs: Vec<String>,
    pub peers: Vec<PeerStatus>,
}

pub fn socket_path(vault_dir: &Path) -> PathBuf {
    vault_dir.join("run").join("control.sock")
}

/// Serves the control socket until dropped.
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ControlServer {
    pub fn start(vault_dir: &Path, net: Arc<NetNode>) -> Result<Self> {
        let path = socket_path(vault_dir);
        std::fs::create_dir_all(path.parent().expect("has a parent"))?;
        // A socket left by a daemon that died is just a file; a live one answers.
        if UnixStream::connect(&path).is_ok() {
            bail!(
                "another cairn daemon serves this vault (control socket {} answers); stop it first",
                path.display()
            );
        }
        let _ = std::fs::remove_file(&path);
        let listener =
            UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("cairn-control".into())
            .spawn(move || {
                while !stop2.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let _ = stream.set_nonblocking(false);
                            let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                            if let Err(e) = handle(stream, &net) {
                                tracing::debug!(error = %e, "control request failed");
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "control socket accept failed");
                            std::thread::sleep(Duration::from_millis(200));
                        }
                    }
                }
            })?;
        Ok(Self {
            path,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn handle(stream: UnixStream, net: &Arc<NetNode>) -> Result<()> {
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    // Pinning a large tree, or asking the members about every chunk before an eviction, can
    // take minutes: on their own threads, so other requests are answered meanwhile (the
    // fetcher deduplicates concurrent fetches; removals are idempotent).
    if matches!(line.split_whitespace().next(), Some("pin" | "evict")) {
        let net = net.clone();
        std::thread::Builder::new()
            .name("cairn-control-long".into())
            .spawn(move || {
                if let Err(e) = answer(stream, &line, &net) {
                    tracing::debug!(error = %e, "control request failed");
                }
            })?;
        return Ok(());
    }
    answer(stream, &line, net)
}

fn answer(stream: UnixStream, line: &str, net: &Arc<NetNode>) -> Result<()> {
    let mut words = line.split_whitespace();
    let reply = match (words.next(), words.next()) {
        (Some("invite"), Some("cancel")) => {
            let n = net.pairing.cancel_all();
            tracing::info!(withdrawn = n, "pending invitations withdrawn");
            format!("ok {n}\n")
        }
        (Some("invite"), secs) => match seconds(secs.unwrap_or("600")) {
            Err(e) => format!("err {e}\n"),
            Ok(_) if !net.wait_addressable(INVITE_ADDR_WAIT) => {
                "err this device has no address to put in a ticket: direct paths are off (net.direct = false) and no relay answered; check net.relay and the network, then retry\n".to_string()
            }
            Ok(ttl) => match net.pairing.invite(&net.endpoint, ttl) {
                Ok(inv) => format!("ok {}\n", inv.ticket),
                Err(e) => format!("err {e}\n"),
            },
        },
        (Some("allow-recovery"), Some("close")) => {
            if net.pairing.close_recovery() {
                tracing::warn!("recovery window closed early");
                "ok closed\n".to_string()
            } else {
                "ok none\n".to_string()
            }
        }
        (Some("allow-recovery"), Some(secs)) => {
            match seconds(secs).and_then(|d| Ok(net.pairing.open_recovery(d)?)) {
                Ok(until) => {
                    let ms = until
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_millis() as u64)
                        .unwrap_or(0);
                    // Worth a warning in the log: until it closes, anybody with the recovery
                    // phrase (or a copy of vault.secret) can join.
                    tracing::warn!(
                        until = %crate::format_time(ms),
                        "recovery window open: the recovery phrase admits a new device until then"
                    );
                    format!("ok {ms}\n")
                }
                Err(e) => format!("err {e:#}\n"),
            }
        }
        (Some("peers"), _) => {
            let reply = PeersReply {
                addrs: cairn_net::peer_addrs(&net.endpoint.addr())
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
                peers: net.peer_status(),
            };
            format!("ok\n{}\n", serde_json::to_string(&reply)?)
        }
        (Some("remove"), Some(dev)) => match resolve_device(net, dev) {
            Ok(d) => match net.remove_member(d) {
                Ok(epoch) => format!("ok {d} {}\n{}\n", epoch.number, epoch.secret.to_phrase()),
                Err(e) => format!("err {e:#}\n"),
            },
            Err(e) => format!("err {e:#}\n"),
        },
        (Some("held"), None) => format!(
            "ok\n{}\n",
            serde_json::to_string(&net.publisher.guard.summaries())?
        ),
        (Some(word @ ("approve" | "reject")), id) => {
            let id = match id.map(str::parse::<u64>) {
                None => Ok(None),
                Some(Ok(n)) => Ok(Some(n)),
                Some(Err(_)) => Err(anyhow::anyhow!(
                    "a held deletion is named by its number; see `cairn held`"
                )),
            };
            match id.and_then(|id| net.publisher.decide(id, word == "approve")) {
                Ok(n) => format!("ok {n}\n"),
                Err(e) => format!("err {e:#}\n"),
            }
        }
        // `cairn log` and friends: index the members' snapshots, fetching headers we lack.
        (Some("history"), None) => {
            let vault = &net.publisher.vault;
            match crate::timeline::Timeline::open(&vault.dir)
                .and_then(|t| crate::history::refresh(vault, &t))
            {
                Ok(r) => format!("ok {} {}\n", r.added, r.gaps),
                Err(e) => format!("err {e:#}\n"),
            }
        }
        // `cairn restore` / `mount --at`: make a past tree's content local.
        (Some("prefetch"), Some(root)) => {
            let path = words.next();
            match prefetch(net, root, path) {
                Ok(n) => format!("ok {n}\n"),
                Err(e) => format!("err {e:#}\n"),
            }
        }
        // `cairn log`: the tree nodes of another member's old snapshot.
        (Some("nodes"), Some(root)) => {
            let path = words.next().unwrap_or("");
            let done = parse_root(root).and_then(|root| {
                let p = cairn_vault::VaultPath::new(path).map_err(|e| anyhow::anyhow!("{e}"))?;
                crate::history::fetch_nodes(&net.publisher.vault, root, &p)
            });
            match done {
                Ok(()) => "ok\n".to_string(),
                Err(e) => format!("err {e:#}\n"),
            }
        }
        (Some("diff"), Some(old)) => {
            let done = parse_root(old).and_then(|old| {
                let new = parse_root(words.next().unwrap_or(""))?;
                crate::history::fetch_diff(&net.publisher.vault, old, new)
            });
            match done {
                Ok(n) => format!("ok {n}\n"),
                Err(e) => format!("err {e:#}\n"),
            }
        }
        // `cairn rename-device` stored a new name record: pass it on now.
        (Some("names"), None) => {
            net.roster_changed.notify_waiters();
            "ok\n".to_string()
        }
        // `cairn prune`: `prune dry|run WITHIN_MS HOURLY DAILY WEEKLY MONTHLY`, answers the
        // JSON report. Runs here so the sweep sees this daemon's writes (see `crate::prune`).
        (Some("prune"), Some(mode)) => {
            let rest: Vec<&str> = words.collect();
            match crate::prune::request_options(mode, &rest) {
                Ok(opts) => match crate::prune::prune(&net.publisher.vault, &opts, |_| {
                    std::ops::ControlFlow::Continue(())
                }) {
                    Ok(r) => {
                        if !opts.dry_run {
                            crate::prune::record_prune(&net.publisher.vault);
                        }
                        format!("ok {}\n", serde_json::to_string(&r).unwrap_or_default())
                    }
                    Err(e) => format!("err {e:#}\n"),
                },
                Err(e) => format!("err {e:#}\n"),
            }
        }
        // Files on demand: `pin|unpin|evict JSON_PATH`, `mode full|on-demand`.
        (Some("pin"), Some(_)) => {
            let r = json_path(line, "pin").and_then(|p| {
                net.publisher.vault.ondemand.pin(&p)?;
                // Progress lines are best effort: a client that went away only stops them.
                net.fetch_path(&p, |done, total| {
                    let _ = (&stream).write_all(format!("progress {done} {total}\n").as_bytes());
                })
            });
            match r {
                Ok(n) => format!("ok {n}\n"),
                Err(e) => format!("err {e:#}\n"),
            }
        }
        (Some("unpin"), Some(_)) => match json_path(line, "unpin").and_then(|p| {
            if net.publisher.vault.ondemand.unpin(&p)? {
                Ok(())
            } else {
                bail!("{p} is not pinned itself{}", pinned_note(net, &p))
            }
        }) {
            Ok(()) => "ok\n".to_string(),
            Err(e) => format!("err {e:#}\n"),
        },
        (Some("evict"), Some(_)) => match json_path(line, "evict").and_then(|p| net.evict(&p)) {
            Ok(r) => format!("ok {}\n", serde_json::to_string(&r)?),
            Err(e) => format!("err {e:#}\n"),
        },
        (Some("mode"), Some(m)) => match m
            .parse::<crate::ondemand::SyncMode>()
            .map_err(|e| anyhow::anyhow!(e))
            .and_then(|m| net.publisher.vault.ondemand.set_mode(m))
        {
            Ok(()) => "ok\n".to_string(),
            Err(e) => format!("err {e:#}\n"),
        },
        (Some("rotate"), None) => match net.rotate_keys() {
            Ok(epoch) => format!("ok {}\n{}\n", epoch.number, epoch.secret.to_phrase()),
            Err(e) => format!("err {e:#}\n"),
        },
        _ => "err unknown request\n".to_string(),
    };
    (&stream).write_all(reply.as_bytes())?;
    Ok(())
}

/// A lifetime sent as whole seconds. Text that is not a number is an error rather than a
/// default: a typo must not open pairing for longer than asked.
fn parse_root(text: &str) -> Result<cairn_tree::NodeId> {
    let bytes: Vec<u8> = (0..text.len())
        .step_by(2)
        .map(|i| {
            text.get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect::<Option<_>>()
        .context("the tree root is not hex")?;
    Ok(cairn_tree::NodeId(bytes.try_into().map_err(|_| {
        anyhow::anyhow!("the tree root is not 32 bytes")
    })?))
}

/// The vault path of a `WORD JSON_STRING` request (JSON, so any name fits on one line).
fn json_path(line: &str, word: &str) -> Result<cairn_vault::VaultPath> {
    let text = line.trim().strip_prefix(word).unwrap_or("").trim();
    let s: String = serde_json::from_str(text)
        .map_err(|e| anyhow::anyhow!("{word}: the path is not a JSON string ({e})"))?;
    cairn_vault::VaultPath::new(&s).map_err(|e| anyhow::anyhow!("{word}: {s:?}: {e}"))
}

fn pinned_note(net: &NetNode, p: &cairn_vault::VaultPath) -> String {
    match net.publisher.vault.ondemand.pinned_by(p.as_str()) {
        Some(pin) => format!(" (it is inside the pin {pin:?}; unpin that)"),
        None => String::new(),
    }
}

fn prefetch(net: &NetNode, root: &str, path: Option<&str>) -> Result<usize> {
    let root = parse_root(root)?;
    let path = path
        .map(cairn_vault::VaultPath::new)
        .transpose()
        .map_err(|e| anyhow::anyhow!("prefetch: {e}"))?;
    crate::history::fetch_tree(&net.publisher.vault, root, path.as_ref())
}

fn seconds(text: &str) -> Result<Duration> {
    text.parse::<u64>().map(Duration::from_secs).map_err(|_| {
        anyhow::anyhow!("{text:?} is not a number of seconds (is the cairn command the same version as the daemon?)")
    })
}

/// A full device id, or an unambiguous hex prefix of a member's.
fn resolve_device(net: &NetNode, text: &str) -> Result<DeviceId> {
    let members = net.publisher.vault.registry.members(&net.vault)?;
    resolve_among(&members, text)
}

fn resolve_among(members: &[DeviceId], text: &str) -> Result<DeviceId> {
    let text = text.trim().to_ascii_lowercase();
    let hits: Vec<&DeviceId> = members
        .iter()
        .filter(|d| d.to_string().starts_with(&text))
        .collect();
    match hits.as_slice() {
        [one] if !text.is_empty() => Ok(**one),
        [] => bail!("no member's device id starts with {text:?}; see `cairn peers`"),
        _ => bail!("{text:?} matches several devices; give more characters of the id"),
    }
}

/// [`request_within`] for a request that reports progress: every `progress …` line before
/// the reply goes to `progress` (its words after `progress`).
pub fn request_with_progress(
    vault_dir: &Path,
    line: &str,
    wait: Duration,
    mut progress: impl FnMut(&str),
) -> Result<Option<String>> {
    let path = socket_path(vault_dir);
    let stream = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(_) => return Ok(None),
    };
    stream.set_read_timeout(Some(wait))?;
    (&stream).write_all(format!("{line}\n").as_bytes())?;
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut reply = String::new();
    for l in BufReader::new(&stream).lines() {
        let l = l.context("reading the daemon's reply")?;
        match l.strip_prefix("progress ") {
            Some(p) if reply.is_empty() => progress(p),
            _ => {
                reply.push_str(&l);
                reply.push('\n');
            }
        }
    }
    if let Some(err) = reply.strip_prefix("err ") {
        bail!("{}", err.trim());
    }
    Ok(Some(reply.strip_prefix("ok").unwrap_or(&reply).to_string()))
}

/// Sends one request to the daemon of `vault_dir`; `Ok(None)` if no daemon runs.
pub fn request(vault_dir: &Path, line: &str) -> Result<Option<String>> {
    request_within(vault_dir, line, Duration::from_secs(30))
}

/// [`request`] for work that may fetch a lot from peers.
pub fn request_within(vault_dir: &Path, line: &str, wait: Duration) -> Result<Option<String>> {
    request_with_progress(vault_dir, line, wait, |_| {})
}
