//! `cairn/registry/1`: exchanging signed registry entries between members.
//!
//! Every request opens its own bidirectional stream and sends one frame (see `wire`: a
//! big-endian `u32` length, then the body):
//!
//! | request    | body                                   | reply frames                        |
//! |------------|----------------------------------------|-------------------------------------|
//! | Push       | `0x01` vault(16) entry(153)            | one [`PushResult`]                  |
//! | FetchAll   | `0x02` vault(16)                       | one: `0x00` then n × entry(153)     |
//!
//! A FetchAll reply holds every head, then both entries of each equivocation the server
//! holds evidence of (same device and revision, different payloads).
//! | Subscribe  | `0x03` vault(16)                       | a stream of events (below)          |
//! | Roster     | `0x04` vault(16) roster message        | one: `0x00` then roster message     |
//!
//! Push result: `0x00` Accepted (`0x00` | `0x01` previous u64), `0x01` Unchanged,
//! `0x02` Rejected + UTF-8 reason. Errors to FetchAll/Subscribe: `0x02` + UTF-8 reason.
//! Subscription events: `0x10` entry(153) for each newly accepted entry, or `0x11` + u64 when
//! the subscriber fell behind and that many entries were skipped (it should FetchAll).
//!
//! A roster message is `u32 len | member records (see cairn_registry::roster) | u16 n |
//! n × (device(32) | u8 k | k × (u8 len | socket address as text))`: the sender's signed
//! member list and the addresses it knows, its own first. Both sides merge what they receive
//! (the exchange runs on every (re)connection and whenever the roster changes), so a member
//! added through any device reaches every other one.
//!
//! The server checks nothing itself: every pushed entry goes through
//! [`Registry::put`](cairn_registry::Registry::put), which checks format, signature, vault,
//! membership of the signer and the compare-and-swap rule. Fetching and subscribing require
//! the connecting device to be a member of the requested vault. Subscriptions are fed from a
//! bounded broadcast queue; a slow subscriber lags (and is told), memory stays bounded.

use std::sync::Arc;

use cairn_codec::Reader;
use cairn_crypto::{DeviceId, VaultId};

use std::sync::RwLock;

use cairn_registry::{
    ENTRY_LEN, EpochRecord, MemberRecord, NameRecord, Offered, Outcome, Registry, RegistryEntry,
    RegistryError, Revision, RosterChange, decode_epochs, decode_names, decode_roster,
    encode_epochs, encode_names, encode_roster,
};
use iroh::endpoint::{Connection, RecvStream, SendStream};
use iroh::protocol::{AcceptError, ProtocolHandler};
use tokio::io::AsyncRead;
use tokio::sync::broadcast;

use crate::addr::{MAX_ADDR_TEXT, PeerAddr, parse_addrs};
use crate::endpoint::device_id_of;
use crate::wire::{FrameError, read_frame, read_frame_body, read_frame_len, write_frame};

pub const REGISTRY_ALPN: &[u8] = b"cairn/registry/1";

const REQ_PUSH: u8 = 0x01;
const REQ_FETCH_ALL: u8 = 0x02;
const REQ_SUBSCRIBE: u8 = 0x03;
const REQ_ROSTER: u8 = 0x04;
/// A roster of thousands of members with their addresses stays far below this.
const MAX_ROSTER: usize = 4 << 20;
const RES_OK: u8 = 0x00;
const RES_UNCHANGED: u8 = 0x01;
const RES_REJECTED: u8 = 0x02;
const EV_ENTRY: u8 = 0x10;
const EV_LAGGED: u8 = 0x11;

/// Requests are tiny; replies to FetchAll hold one entry per device of a vault.
const MAX_REQUEST: usize = 1 + 16 + ENTRY_LEN;
const MAX_REPLY: usize = 1 + 65_536 * ENTRY_LEN;
const MAX_REASON: usize = 4096;
/// How many accepted entries a subscriber may fall behind before it lags.
pub const SUBSCRIBER_QUEUE: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum RegistryProtoError {
    #[error("cannot connect to the peer's registry: {0}")]
    Connect(String),
    #[error("registry exchange failed: {0}")]
    Frame(#[from] FrameError),
    #[error("the peer refused the request: {0}")]
    Refused(String),
    #[error("the peer sent a malformed registry message: {0}")]
    Malformed(String),
    #[error("the local registry failed: {0}")]
    Local(#[from] RegistryError),
    #[error("the registry task failed: {0}")]
    Join(String),
}

/// What the receiving peer did with a pushed entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushResult {
    Accepted {
        previous: Option<Revision>,
    },
    Unchanged,
    /// Refused, with the registry's reason (bad signature, not a member, stale, …). Nothing
    /// changed on the peer.
    Rejected(String),
}

fn encode_push_result(r: &PushResult) -> Vec<u8> {
    match r {
        PushResult::Accepted { previous: None } => vec![RES_OK, 0],
        PushResult::Accepted {
            previous: Some(rev),
        } => {
            let mut v = vec![RES_OK, 1];
            v.extend_from_slice(&rev.0.to_be_bytes());
            v
        }
        PushResult::Unchanged => vec![RES_UNCHANGED],
        PushResult::Rejected(reason) => rejected(reason),
    }
}

fn rejected(reason: &str) -> Vec<u8> {
    let mut v = vec![RES_REJECTED];
    let mut end = reason.len().min(MAX_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    v.extend_from_slice(&reason.as_bytes()[..end]);
    v
}

fn decode_push_result(b: &[u8]) -> Result<PushResult, RegistryProtoError> {
    let bad = || RegistryProtoError::Malformed(format!("push reply of {} bytes", b.len()));
    match b {
        [RES_OK, 0] => Ok(PushResult::Accepted { previous: None }),
        [RES_OK, 1, rest @ ..] => {
            let rev: [u8; 8] = rest.try_into().map_err(|_| bad())?;
            Ok(PushResult::Accepted {
                previous: Some(Revision(u64::from_be_bytes(rev))),
            })
        }
        [RES_UNCHANGED] => Ok(PushResult::Unchanged),
        [RES_REJECTED, reason @ ..] => Ok(PushResult::Rejected(
            String::from_utf8_lossy(reason).into_owned(),
        )),
        _ => Err(bad()),
    }
}

/// A request as read off a stream, or why it was refused before its body was buffered.
#[derive(Debug, PartialEq, Eq)]
enum Incoming {
    Request {
        tag: u8,
        vault: VaultId,
        body: Vec<u8>,
    },
    Refused(String),
}

/// The largest request of type `tag` a peer may send, tag and vault id included.
fn request_limit(tag: u8) -> usize {
    match tag {
        REQ_ROSTER => MAX_ROSTER,
        _ => MAX_REQUEST,
    }
}

/// Reads one request (`tag | vault(16) | body`, framed), settling its size before buffering
/// it: the length prefix, tag and vault id come first and decide the limit, and a roster
/// request (the only large one) is read only from a device `is_member` of that vault says
/// belongs to it. `Ok(None)` when the peer finished the stream without a request.
async fn read_request<R: AsyncRead + Unpin>(
    recv: &mut R,
    is_member: impl AsyncFnOnce(VaultId) -> Result<bool, RegistryProtoError>,
) -> Result<Option<Incoming>, RegistryProtoError> {
    let Some(len) = read_frame_len(recv).await? else {
        return Ok(None);
    };
    const HEAD: usize = 1 + 16;
    let head = read_frame_body(recv, len.min(HEAD), HEAD).await?;
    let Some((&tag, vault)) = head.split_first() else {
        return Ok(Some(Incoming::Refused("empty request".into())));
    };
    let Ok(vault) = <[u8; 16]>::try_from(vault) else {
        return Ok(Some(Incoming::Refused(
            "request too short for a vault id".into(),
        )));
    };
    let vault = VaultId(vault);
    let max = request_limit(tag);
    if len > max {
        return Ok(Some(Incoming::Refused(format!(
            "request of {len} bytes is larger than the {max} bytes a request of type {tag:#04x} may have"
        ))));
    }
    if tag == REQ_ROSTER && !is_member(vault).await? {
        return Ok(Some(Incoming::Refused(
            "only members of the vault may send a roster".into(),
        )));
    }
    let body = read_frame_body(recv, len - HEAD, max - HEAD).await?;
    Ok(Some(Incoming::Request { tag, vault, body }))
}

/// Serves the registry ALPN from a local [`Registry`]. Clone it freely (shared state).
#[derive(Debug, Clone)]
pub struct RegistryProtocol {
    registry: Arc<Registry>,
    events: broadcast::Sender<RegistryEntry>,
    roster_events: broadcast::Sender<RosterChange>,
    /// This device and the addresses it tells peers to reach it at.
    local: Arc<RwLock<Option<LocalInfo>>>,
}

/// This device and the addresses it announces.
type LocalInfo = (DeviceId, Vec<PeerAddr>);

/// A signed member list plus known addresses, as exchanged between members.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RosterMessage {
    pub records: Vec<MemberRecord>,
    /// Where each device can be reached (direct addresses and relays), as its sender knows.
    pub addrs: Vec<(DeviceId, Vec<PeerAddr>)>,
    /// Signed key-epoch records (each member's copy of an epoch secret, sealed to it).
    pub epochs: Vec<EpochRecord>,
    /// Each member's signed name for itself (see `cairn_registry::names`).
    pub names: Vec<NameRecord>,
}

impl RosterMessage {
    pub fn encode(&self) -> Vec<u8> {
        let roster = encode_roster(&self.records);
        let mut v = Vec::with_capacity(4 + roster.len() + 2 + self.addrs.len() * 64);
        v.extend_from_slice(&(roster.len() as u32).to_be_bytes());
        v.extend_from_slice(&roster);
        let addrs = &self.addrs[..self.addrs.len().min(u16::MAX as usize)];
        v.extend_from_slice(&(addrs.len() as u16).to_be_bytes());
        for (d, list) in addrs {
            v.extend_from_slice(d.as_bytes());
            let list = &list[..list.len().min(16)];
            v.push(list.len() as u8);
            for a in list {
                let t = a.to_string();
                // Never more than MAX_ADDR_TEXT (255) bytes: PeerAddr refuses longer text.
                let t = &t.as_bytes()[..t.len().min(MAX_ADDR_TEXT)];
                v.push(t.len() as u8);
                v.extend_from_slice(t);
            }
        }
        // Appended last so the layout before it is unchanged.
        let epochs = encode_epochs(&self.epochs);
        v.extend_from_slice(&(epochs.len() as u32).to_be_bytes());
        v.extend_from_slice(&epochs);
        // Names came later still: a message from an older cairn simply ends before them.
        let names = encode_names(&self.names);
        v.extend_from_slice(&(names.len() as u32).to_be_bytes());
        v.extend_from_slice(&names);
        v
    }

    pub fn decode(b: &[u8]) -> Result<Self, RegistryProtoError> {
        let bad = |why: &str| RegistryProtoError::Malformed(format!("roster message: {why}"));
        let cut = |e: cairn_codec::Error| match e {
            cairn_codec::Error::TrailingBytes(_) => bad("trailing bytes"),
            // No varints here: every other failure is running out of input.
            _ => bad("cut off"),
        };
        let mut r = Reader::new(b);
        let n = r.u32_be().map_err(cut)? as usize;
        // A bad record is the sender's fault: say so, not "the local registry failed".
        let records = decode_roster(r.take(n).map_err(cut)?).map_err(|e| bad(&e.to_string()))?;
        let count = r.u16_be().map_err(cut)?;
        // Each device takes at least 33 bytes (id and address count): a forged count
        // reserves no more than the message could hold.
        let mut addrs = Vec::with_capacity(usize::from(count).min(r.remaining() / 33));
        for _ in 0..count {
            let d = DeviceId(r.take_array().map_err(cut)?);
            let k = r.u8().map_err(cut)?;
            // Each address takes at least its length byte.
            let mut list = Vec::with_capacity(usize::from(k).min(r.remaining()));
            for _ in 0..k {
                let len = r.u8().map_err(cut)? as usize;
                let t = r.take(len).map_err(cut)?;
                let a = std::str::from_utf8(t)
                    .ok()
                    .and_then(|t| t.parse::<PeerAddr>().ok())
                    .ok_or_else(|| bad("invalid address (neither IP:PORT nor a relay URL)"))?;
                list.push(a);
            }
            addrs.push((d, list));
        }
        let n = r.u32_be().map_err(cut)? as usize;
        let epochs = decode_epochs(r.take(n).map_err(cut)?).map_err(|e| bad(&e.to_string()))?;
        let names = if r.remaining() == 0 {
            Vec::new()
        } else {
            let n = r.u32_be().map_err(cut)? as usize;
            decode_names(r.take(n).map_err(cut)?).map_err(|e| bad(&e.to_string()))?
        };
        r.finish().map_err(cut)?;
        Ok(Self {
            records,
            addrs,
            epochs,
            names,
        })
    }
}

impl RegistryProtocol {
    pub fn new(registry: Arc<Registry>) -> Self {
        let (events, _) = broadcast::channel(SUBSCRIBER_QUEUE);
        let (roster_events, _) = broadcast::channel(64);
        Self {
            registry,
            events,
            roster_events,
            local: Arc::default(),
        }
    }

    /// Who this device is and where peers can reach it (sent in roster exchanges).
    pub fn set_local(&self, device: DeviceId, addrs: Vec<PeerAddr>) {
        *self.local.write().unwrap_or_else(|p| p.into_inner()) = Some((device, addrs));
    }

    /// Tells subscribers about an entry already stored locally (this device's own publish,
    /// which went through the registry's publish loop rather than [`Self::submit`]).
    pub fn announce(&self, entry: RegistryEntry) {
        let _ = self.events.send(entry);
    }

    /// Member list changes made by roster exchanges (in either direction).
    pub fn roster_events(&self) -> broadcast::Receiver<RosterChange> {
        self.roster_events.subscribe()
    }

    /// This device's roster message for `vault`: every record it holds, then the addresses
    /// it knows (its own first).
    pub async fn roster_message(
        &self,
        vault: VaultId,
    ) -> Result<RosterMessage, RegistryProtoError> {
        let registry = self.registry.clone();
        let local = self.local.read().unwrap_or_else(|p| p.into_inner()).clone();
        tokio::task::spawn_blocking(move || -> Result<RosterMessage, RegistryError> {
            let records = registry.roster(&vault)?;
            let mut addrs = Vec::new();
            if let Some((d, a)) = &local {
                addrs.push((*d, a.clone()));
            }
            for (d, list) in registry.addrs(&vault)? {
                if local.as_ref().is_some_and(|(me, _)| *me == d) {
                    continue;
                }
                let list = parse_addrs(list.iter().map(String::as_str));
                if !list.is_empty() {
                    addrs.push((d, list));
                }
            }
            let epochs = registry.epochs(&vault)?;
            let names = registry.names(&vault)?;
            Ok(RosterMessage {
                records,
                addrs,
                epochs,
                names,
            })
        })
        .await
        .map_err(|e| RegistryProtoError::Join(e.to_string()))?
        .map_err(Into::into)
    }

    /// Merges a roster message received from member `from`: signed records by the roster
    /// rules; `from`'s own addresses always, others' only where we know none, and only ever
    /// for members (a peer cannot make us remember addresses of strangers).
    pub async fn absorb(
        &self,
        vault: VaultId,
        from: DeviceId,
        msg: RosterMessage,
    ) -> Result<RosterChange, RegistryProtoError> {
        let registry = self.registry.clone();
        let me = self
            .local
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(d, _)| *d);
        let change = tokio::task::spawn_blocking(move || -> Result<RosterChange, RegistryError> {
            let mut change = registry.merge_roster(&vault, &msg.records)?;
            // After the roster: an epoch signed by a member added in this very message counts.
            change.epochs = registry.merge_epochs(&vault, &msg.epochs)?;
            // After the roster too: a name counts once its device is a member.
            change.renamed = registry.merge_names(&vault, &msg.names)?;
            let known: std::collections::HashSet<DeviceId> = registry
                .addrs(&vault)?
                .into_iter()
                .map(|(d, _)| d)
                .collect();
            let members: std::collections::HashSet<DeviceId> =
                registry.members(&vault)?.into_iter().collect();
            for (d, list) in &msg.addrs {
                if Some(*d) == me || list.is_empty() || !members.contains(d) {
                    continue;
                }
                if *d == from || !known.contains(d) {
                    let text: Vec<String> = list.iter().map(|a| a.to_string()).collect();
                    registry.set_addrs(&vault, d, &text)?;
                }
            }
            Ok(change)
        })
        .await
        .map_err(|e| RegistryProtoError::Join(e.to_string()))??;
        for (device, why) in &change.refused {
            tracing::debug!(from = %from.short(), device = %device.short(), %why, "refused member record");
        }
        if !change.is_empty() {
            let _ = self.roster_events.send(change.clone());
        }
        Ok(change)
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Offers an entry as if a peer pushed it (e.g. one this device just published, or one
    /// fetched from another peer): stored through [`Registry::offer`], and broadcast to
    /// subscribers if accepted.
    ///
    /// An entry proving its device equivocated is kept as evidence; when that evidence is
    /// new, both entries are broadcast, so every member holding either one sees the other,
    /// detects the equivocation itself and settles on the same head (the lower payload).
    pub async fn submit(&self, entry: RegistryEntry) -> Result<PushResult, RegistryProtoError> {
        let registry = self.registry.clone();
        let held = entry.clone();
        let outcome = tokio::task::spawn_blocking(move || registry.offer(&held.vault, &held))
            .await
            .map_err(|e| RegistryProtoError::Join(e.to_string()))?;
        Ok(match outcome {
            Ok(Offered::Stored(Outcome::Accepted { previous })) => {
                // No subscribers is fine.
                let _ = self.events.send(entry);
                PushResult::Accepted { previous }
            }
            Ok(Offered::Stored(Outcome::Unchanged)) => PushResult::Unchanged,
            Ok(Offered::Equivocation(seen)) => {
                if seen.new_evidence {
                    tracing::error!(
                        device = %seen.device,
                        revision = seen.revision.0,
                        "device signed two different snapshots under one revision (equivocation); both entries are kept as evidence and shown by `cairn status`; consider removing the device with `cairn remove-device`"
                    );
                    let _ = self.events.send(seen.other.clone());
                }
                let kept = seen.other.payload.min(entry.payload);
                if seen.head_replaced || seen.new_evidence {
                    let _ = self.events.send(entry);
                }
                if seen.head_replaced {
                    PushResult::Accepted {
                        previous: Some(seen.revision),
                    }
                } else {
                    PushResult::Rejected(format!(
                        "device {} equivocated at revision {}: this registry keeps payload {} for it (the lower one)",
                        seen.device, seen.revision, kept
                    ))
                }
            }
            Err(e @ (RegistryError::Db(_) | RegistryError::Busy | RegistryError::Corrupt(_))) => {
                return Err(e.into());
            }
            Err(e) => PushResult::Rejected(e.to_string()),
        })
    }

    /// Takes equivocation evidence out of a list of entries a peer sent (a fetch-all reply
    /// carries both entries of every equivocation its sender knows): each pair of one
    /// device and revision with different payloads is checked and recorded. Returns how
    /// many pairs were new here.
    pub async fn absorb_evidence(
        &self,
        entries: &[RegistryEntry],
    ) -> Result<usize, RegistryProtoError> {
        // One pass with a map: a reply may hold tens of thousands of entries.
        let mut first: std::collections::HashMap<(DeviceId, Revision), &RegistryEntry> =
            std::collections::HashMap::new();
        let mut pairs = Vec::new();
        for e in entries {
            match first.entry((e.device, e.revision)) {
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(e);
                }
                std::collections::hash_map::Entry::Occupied(a) if a.get().payload != e.payload => {
                    pairs.push(((*a.get()).clone(), e.clone()));
                }
                std::collections::hash_map::Entry::Occupied(_) => {}
            }
        }
        if pairs.is_empty() {
            return Ok(0);
        }
        let registry = self.registry.clone();
        tokio::task::spawn_blocking(move || {
            let mut new = 0;
            for (a, b) in pairs {
                match registry.record_equivocation(&a.vault, &a, &b) {
                    Ok(true) => new += 1,
                    Ok(false) => {}
                    Err(
                        e @ (RegistryError::Db(_) | RegistryError::Busy | RegistryError::Corrupt(_)),
                    ) => return Err(e),
                    Err(e) => tracing::debug!(device = %a.device.short(), error = %e, "ignored equivocation evidence"),
                }
            }
            Ok(new)
        })
        .await
        .map_err(|e| RegistryProtoError::Join(e.to_string()))?
        .map_err(Into::into)
    }

    /// Local subscription to accepted entries (for the engine).
    pub fn subscribe_local(&self) -> broadcast::Receiver<RegistryEntry> {
        self.events.subscribe()
    }

    async fn is_member(
        &self,
        vault: VaultId,
        device: DeviceId,
    ) -> Result<bool, RegistryProtoError> {
        let registry = self.registry.clone();
        tokio::task::spawn_blocking(move || registry.is_member(&vault, &device))
            .await
            .map_err(|e| RegistryProtoError::Join(e.to_string()))?
            .map_err(Into::into)
    }

    async fn handle_stream(
        &self,
        remote: DeviceId,
        mut send: SendStream,
        mut recv: RecvStream,
    ) -> Result<(), RegistryProtoError> {
        let remote_is_member = async |vault: VaultId| self.is_member(vault, remote).await;
        let (tag, vault, body) = match read_request(&mut recv, remote_is_member).await? {
            None => return Ok(()),
            Some(Incoming::Request { tag, vault, body }) => (tag, vault, body),
            Some(Incoming::Refused(why)) => {
                tracing::debug!(from = %remote.short(), %why, "refused registry request");
                write_frame(&mut send, &rejected(&why)).await?;
                let _ = send.finish();
                return Ok(());
            }
        };
        let body = &body[..];
        match tag {
            REQ_PUSH => {
                let result = match RegistryEntry::decode(body) {
                    Err(e) => PushResult::Rejected(e.to_string()),
                    Ok(entry) if entry.vault != vault => PushResult::Rejected(
                        RegistryError::WrongVault {
                            expected: vault,
                            got: entry.vault,
                        }
                        .to_string(),
                    ),
                    Ok(entry) => self.submit(entry).await?,
                };
                if let PushResult::Rejected(reason) = &result {
                    tracing::debug!(from = %remote.short(), %reason, "rejected pushed entry");
                }
                write_frame(&mut send, &encode_push_result(&result)).await?;
            }
            REQ_FETCH_ALL | REQ_SUBSCRIBE | REQ_ROSTER
                if !self.is_member(vault, remote).await? =>
            {
                let msg = format!("device {remote} is not a member of vault {vault}");
                write_frame(&mut send, &rejected(&msg)).await?;
            }
            REQ_FETCH_ALL => {
                let registry = self.registry.clone();
                // The heads, then both entries of every equivocation known here: evidence
                // costs two entries per case and convinces the receiver on its own.
                let entries = tokio::task::spawn_blocking(move || {
                    let mut all = registry.list(&vault)?;
                    for e in registry.equivocations(&vault)? {
                        all.push(e.low);
                        all.push(e.high);
                    }
                    Ok::<_, RegistryError>(all)
                })
                .await
                .map_err(|e| RegistryProtoError::Join(e.to_string()))??;
                let mut reply = Vec::with_capacity(1 + entries.len() * ENTRY_LEN);
                reply.push(RES_OK);
                for e in entries.iter().take((MAX_REPLY - 1) / ENTRY_LEN) {
                    reply.extend_from_slice(&e.encode());
                }
                write_frame(&mut send, &reply).await?;
            }
            REQ_ROSTER => {
                let reply = match RosterMessage::decode(body) {
                    Ok(msg) => {
                        self.absorb(vault, remote, msg).await?;
                        let mut r = vec![RES_OK];
                        r.extend_from_slice(&self.roster_message(vault).await?.encode());
                        r
                    }
                    Err(e) => rejected(&e.to_string()),
                };
                write_frame(&mut send, &reply).await?;
            }
            REQ_SUBSCRIBE => {
                let mut rx = self.events.subscribe();
                write_frame(&mut send, &[RES_OK]).await?;
                loop {
                    let frame = tokio::select! {
                        ev = rx.recv() => match ev {
                            // A member removed while subscribed gets nothing more.
                            Ok(_) if !self.is_member(vault, remote).await? => break,
                            Ok(entry) if entry.vault == vault => {
                                let mut f = vec![EV_ENTRY];
                                f.extend_from_slice(&entry.encode());
                                f
                            }
                            Ok(_) => continue,
                            Err(broadcast::error::RecvError::Lagged(n)) => {
                                let mut f = vec![EV_LAGGED];
                                f.extend_from_slice(&n.to_be_bytes());
                                f
                            }
                            Err(broadcast::error::RecvError::Closed) => break,
                        },
                        // The subscriber went away.
                        _ = send.stopped() => break,
                    };
                    write_frame(&mut send, &frame).await?;
                }
            }
            other => {
                write_frame(
                    &mut send,
                    &rejected(&format!("unknown request type {other:#04x}")),
                )
                .await?;
            }
        }
        let _ = send.finish();
        Ok(())
    }
}

impl ProtocolHandler for RegistryProtocol {
    async fn accept(&self, conn: Connection) -> Result<(), AcceptError> {
        let remote = device_id_of(&conn.remote_id());
        loop {
            let (send, recv) = match conn.accept_bi().await {
                Ok(s) => s,
                // Connection closed: normal end.
                Err(_) => return Ok(()),
            };
            let this = self.clone();
            tokio::spawn(async move {
                if let Err(e) = this.handle_stream(remote, send, recv).await {
                    tracing::debug!(from = %remote.short(), "registry stream failed: {e}");
                }
            });
        }
    }
}

/// Client side of the registry protocol over an established connection (ALPN
/// [`REGISTRY_ALPN`]).
#[derive(Debug, Clone)]
pub struct RegistryClient {
    conn: Connection,
}

impl RegistryClient {
    /// Connects to `addr` (an `EndpointAddr`, or an id the endpoint can resolve).
    pub async fn connect(
        endpoint: &iroh::Endpoint,
        addr: impl Into<iroh::EndpointAddr>,
    ) -> Result<Self, RegistryProtoError> {
        let conn = endpoint
            .connect(addr, REGISTRY_ALPN)
            .await
            .map_err(|e| RegistryProtoError::Connect(e.to_string()))?;
        Ok(Self { conn })
    }

    pub fn from_connection(conn: Connection) -> Self {
        Self { conn }
    }

    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    async fn request(
        &self,
        tag: u8,
        vault: &VaultId,
        body: &[u8],
    ) -> Result<(SendStream, RecvStream), RegistryProtoError> {
        let (mut send, recv) = self.conn.open_bi().await.map_err(|e| {
            RegistryProtoError::Connect(format!("{e} (refused: is this device a member?)"))
        })?;
        let mut req = Vec::with_capacity(1 + 16 + body.len());
        req.push(tag);
        req.extend_from_slice(vault.as_bytes());
        req.extend_from_slice(body);
        write_frame(&mut send, &req).await?;
        Ok((send, recv))
    }

    async fn reply(recv: &mut RecvStream, max: usize) -> Result<Vec<u8>, RegistryProtoError> {
        read_frame(recv, max)
            .await?
            .ok_or_else(|| RegistryProtoError::Malformed("the peer sent no reply".into()))
    }

    /// Pushes one entry (any bytes: the peer validates) to the peer's registry.
    pub async fn push_bytes(
        &self,
        vault: &VaultId,
        entry: &[u8],
    ) -> Result<PushResult, RegistryProtoError> {
        let (mut send, mut recv) = self.request(REQ_PUSH, vault, entry).await?;
        let _ = send.finish();
        decode_push_result(&Self::reply(&mut recv, 2 + MAX_REASON).await?)
    }

    pub async fn push(&self, entry: &RegistryEntry) -> Result<PushResult, RegistryProtoError> {
        self.push_bytes(&entry.vault, &entry.encode()).await
    }

    /// Every current entry the peer holds for `vault`, each verified locally (signature and
    /// vault) before being returned.
    pub async fn fetch_all(
        &self,
        vault: &VaultId,
    ) -> Result<Vec<RegistryEntry>, RegistryProtoError> {
        let (mut send, mut recv) = self.request(REQ_FETCH_ALL, vault, &[]).await?;
        let _ = send.finish();
        let reply = Self::reply(&mut recv, MAX_REPLY).await?;
        decode_fetch_all_reply(vault, &reply)
    }

    /// Sends our roster message and returns the peer's (merged with ours on its side).
    pub async fn exchange_roster(
        &self,
        vault: &VaultId,
        ours: &RosterMessage,
    ) -> Result<RosterMessage, RegistryProtoError> {
        let (mut send, mut recv) = self.request(REQ_ROSTER, vault, &ours.encode()).await?;
        let _ = send.finish();
        let reply = Self::reply(&mut recv, MAX_ROSTER + 1).await?;
        match reply.split_first() {
            Some((&RES_OK, rest)) => RosterMessage::decode(rest),
            Some((&RES_REJECTED, reason)) => Err(RegistryProtoError::Refused(
                String::from_utf8_lossy(reason).into_owned(),
            )),
            _ => Err(RegistryProtoError::Malformed("roster reply".into())),
        }
    }

    /// Subscribes to entries the peer accepts for `vault` from now on.
    pub async fn subscribe(&self, vault: &VaultId) -> Result<Subscription, RegistryProtoError> {
        let (send, mut recv) = self.request(REQ_SUBSCRIBE, vault, &[]).await?;
        let reply = Self::reply(&mut recv, 1 + MAX_REASON).await?;
        match reply.split_first() {
            Some((&RES_OK, [])) => Ok(Subscription {
                vault: *vault,
                _send: send,
                recv,
            }),
            Some((&RES_REJECTED, reason)) => Err(RegistryProtoError::Refused(
                String::from_utf8_lossy(reason).into_owned(),
            )),
            _ => Err(RegistryProtoError::Malformed("subscribe reply".into())),
        }
    }
}

/// What a subscription yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubscriptionEvent {
    /// An entry the peer accepted (verified locally: signature and vault).
    Entry(RegistryEntry),
    /// This many entries were skipped because we read too slowly; re-fetch all.
    Lagged(u64),
}

/// A live subscription; dropping it ends it.
#[derive(Debug)]
pub struct Subscription {
    vault: VaultId,
    _send: SendStream,
    recv: RecvStream,
}

impl Subscription {
    /// The next event, or `Ok(None)` when the peer ended the subscription.
    pub async fn next(&mut self) -> Result<Option<SubscriptionEvent>, RegistryProtoError> {
        let Some(frame) = read_frame(&mut self.recv, 1 + ENTRY_LEN).await? else {
            return Ok(None);
        };
        decode_event(&self.vault, &frame).map(Some)
    }
}

/// A FetchAll reply: `0x00` then whole entries, each checked to be of `vault` and signed by
/// its device, or `0x02` and the peer's reason.
fn decode_fetch_all_reply(
    vault: &VaultId,
    reply: &[u8],
) -> Result<Vec<RegistryEntry>, RegistryProtoError> {
    match reply.split_first() {
        Some((&RES_OK, rest)) if rest.len().is_multiple_of(ENTRY_LEN) => rest
            .chunks_exact(ENTRY_LEN)
            .map(|b| {
                let e = RegistryEntry::decode(b)?;
                cairn_registry::check_authentic(vault, &e)?;
                Ok(e)
            })
            .collect(),
        Some((&RES_REJECTED, reason)) => Err(RegistryProtoError::Refused(
            String::from_utf8_lossy(reason).into_owned(),
        )),
        _ => Err(RegistryProtoError::Malformed(format!(
            "fetch-all reply of {} bytes",
            reply.len()
        ))),
    }
}

/// One subscription event frame; an entry is checked to be of `vault` and authentic.
fn decode_event(vault: &VaultId, frame: &[u8]) -> Result<SubscriptionEvent, RegistryProtoError> {
    match frame.split_first() {
        Some((&EV_ENTRY, body)) => {
            let e = RegistryEntry::decode(body)?;
            cairn_registry::check_authentic(vault, &e)?;
            Ok(SubscriptionEvent::Entry(e))
        }
        Some((&EV_LAGGED, n)) if n.len() == 8 => Ok(SubscriptionEvent::Lagged(u64::from_be_bytes(
            n.try_into().expect("8 bytes"),
        ))),
        _ => Err(RegistryProtoError::Malformed(format!(
            "subscription event of {} bytes",
            frame.len()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_alloc::largest_allocation_during;
    use proptest::prelude::*;

    #[test]
    fn roster_message_round_trip() {
        let k = cairn_crypto::DeviceKey::generate();
        let v = VaultId([3; 16]);
        let msg = RosterMessage {
            records: vec![MemberRecord::add(&k, v, k.device_id(), "age1x".into(), 4)],
            addrs: vec![(
                k.device_id(),
                vec![
                    "127.0.0.1:4000".parse().unwrap(),
                    "[::1]:9".parse().unwrap(),
                    "https://relay.example.org/".parse().unwrap(),
                ],
            )],
            epochs: vec![
                cairn_registry::EpochRecord::sign(
                    &k,
                    v,
                    1,
                    cairn_crypto::EpochId([5; 8]),
                    vec![(k.device_id(), vec![1; 190])],
                    9,
                )
                .unwrap(),
            ],
            names: vec![NameRecord::sign(
                &k,
                v,
                cairn_registry::DeviceName::new("laptop").unwrap(),
                4,
            )],
        };
        let b = msg.encode();
        assert_eq!(RosterMessage::decode(&b).unwrap(), msg);
        // A message from a cairn that predates names ends right before them.
        let names_len = 4 + msg.names[0].encode().len();
        let old = b.len() - names_len;
        let without = RosterMessage {
            names: Vec::new(),
            ..msg.clone()
        };
        assert_eq!(RosterMessage::decode(&b[..old]).unwrap(), without);
        for n in (0..b.len()).filter(|n| *n != old) {
            assert!(RosterMessage::decode(&b[..n]).is_err());
        }
    }

    #[test]
    fn push_result_round_trip() {
        for r in [
            PushResult::Accepted { previous: None },
            PushResult::Accepted {
                previous: Some(Revision(7)),
            },
            PushResult::Unchanged,
            PushResult::Rejected("nope ✓".into()),
        ] {
            assert_eq!(decode_push_result(&encode_push_result(&r)).unwrap(), r);
        }
        assert!(decode_push_result(&[9]).is_err());
        let long = "é".repeat(MAX_REASON);
        assert!(rejected(&long).len() <= 1 + MAX_REASON);
    }

    fn block_on<T>(f: impl Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    fn framed(tag: u8, vault: [u8; 16], body: &[u8]) -> Vec<u8> {
        let len = 17 + body.len();
        let mut v = (len as u32).to_be_bytes().to_vec();
        v.push(tag);
        v.extend_from_slice(&vault);
        v.extend_from_slice(body);
        v
    }

    /// Reads a request from `input` with a membership answer of `member`, and counts how
    /// often membership was asked.
    fn read(input: &[u8], member: bool) -> (Option<Incoming>, usize) {
        let asked = std::cell::Cell::new(0);
        let got = block_on(read_request(&mut &input[..], async |_| {
            asked.set(asked.get() + 1);
            Ok(member)
        }))
        .unwrap();
        (got, asked.get())
    }

    #[test]
    fn requests_are_read_whole_when_within_their_limit() {
        let entry = [5u8; ENTRY_LEN];
        let (got, asked) = read(&framed(REQ_PUSH, [1; 16], &entry), false);
        assert_eq!(
            got,
            Some(Incoming::Request {
                tag: REQ_PUSH,
                vault: VaultId([1; 16]),
                body: entry.to_vec()
            })
        );
        assert_eq!(asked, 0, "a push needs no membership check before reading");
        let (got, asked) = read(&framed(REQ_ROSTER, [2; 16], &[9; 5000]), true);
        assert!(
            matches!(got, Some(Incoming::Request { tag: REQ_ROSTER, ref body, .. }) if body.len() == 5000)
        );
        assert_eq!(asked, 1);
        assert_eq!(read(&[], true).0, None);
    }

    #[test]
    fn short_and_oversized_requests_are_refused_before_their_body() {
        let refused = |input: &[u8], member: bool| match read(input, member).0 {
            Some(Incoming::Refused(why)) => why,
            other => panic!("expected a refusal, got {other:?}"),
        };
        assert_eq!(refused(&0u32.to_be_bytes(), true), "empty request");
        let mut short = 5u32.to_be_bytes().to_vec();
        short.extend_from_slice(&[REQ_PUSH, 1, 2, 3, 4]);
        assert_eq!(refused(&short, true), "request too short for a vault id");
        // Lengths that announce more than the type allows; no body follows, so reading it
        // would fail with a cut frame instead of this refusal.
        for (tag, len) in [
            (REQ_PUSH, MAX_REQUEST + 1),
            (REQ_FETCH_ALL, u32::MAX as usize),
            (0x7f, MAX_REQUEST + 1),
            (REQ_ROSTER, MAX_ROSTER + 1),
        ] {
            let mut input = (len as u32).to_be_bytes().to_vec();
            input.push(tag);
            input.extend_from_slice(&[0; 16]);
            let why = refused(&input, true);
            assert!(
                why.contains(&format!("request of {len} bytes is larger than")),
                "{why}"
            );
        }
        // A roster from a non-member is refused before its megabytes are read.
        let mut input = (MAX_ROSTER as u32).to_be_bytes().to_vec();
        input.push(REQ_ROSTER);
        input.extend_from_slice(&[0; 16]);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (got, largest) = largest_allocation_during(|| {
            rt.block_on(read_request(&mut &input[..], async |_| Ok(false)))
        });
        assert_eq!(
            got.unwrap(),
            Some(Incoming::Refused(
                "only members of the vault may send a roster".into()
            ))
        );
        assert!(largest < 1024, "largest allocation {largest} bytes");
    }

    #[test]
    fn a_roster_request_that_lies_about_its_length_allocates_what_arrives() {
        let mut input = (MAX_ROSTER as u32).to_be_bytes().to_vec();
        input.push(REQ_ROSTER);
        input.extend_from_slice(&[0; 16]);
        input.extend_from_slice(&[0; 100]);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (got, largest) = largest_allocation_during(|| {
            rt.block_on(read_request(&mut &input[..], async |_| Ok(true)))
        });
        assert!(
            matches!(
                got,
                Err(RegistryProtoError::Frame(FrameError::Cut { got: 100, .. }))
            ),
            "{got:?}"
        );
        assert!(
            largest <= 2 * crate::wire::READ_STEP,
            "largest allocation {largest} bytes"
        );
    }

    /// A message announcing 65535 devices in a few bytes must not reserve room for them.
    #[test]
    fn roster_message_counts_are_bounded_by_the_input() {
        let mut b = 0u32.to_be_bytes().to_vec();
        b.extend_from_slice(&u16::MAX.to_be_bytes());
        b.extend_from_slice(&[7; 32]);
        b.push(255);
        let (r, largest) = largest_allocation_during(|| RosterMessage::decode(&b));
        let err = r.unwrap_err();
        assert_eq!(
            err.to_string(),
            "the peer sent a malformed registry message: roster message: cut off"
        );
        assert!(largest < 4096, "largest allocation {largest} bytes");
        // A record length beyond the input is refused without reading on.
        let mut b = u32::MAX.to_be_bytes().to_vec();
        b.extend_from_slice(&[0; 8]);
        assert!(RosterMessage::decode(&b).is_err());
    }

    fn member_record() -> impl Strategy<Value = MemberRecord> {
        (
            any::<[u8; 32]>(),
            any::<[u8; 16]>(),
            any::<[u8; 32]>(),
            "age1[a-z0-9]{0,70}",
            any::<bool>(),
            any::<u64>(),
        )
            .prop_map(|(seed, vault, device, recipient, removed, at)| {
                let k = cairn_crypto::DeviceKey::from_bytes(seed);
                let (v, d) = (VaultId(vault), DeviceId(device));
                if removed {
                    MemberRecord::remove(&k, v, d, at)
                } else {
                    MemberRecord::add(&k, v, d, recipient, at)
                }
            })
    }

    fn peer_addr() -> impl Strategy<Value = PeerAddr> {
        prop_oneof![
            // Built from IP and port: flow info and scope ids do not travel as text.
            (any::<std::net::IpAddr>(), any::<u16>())
                .prop_map(|(ip, port)| PeerAddr::Direct(std::net::SocketAddr::new(ip, port))),
            "[a-z]{1,12}\\.example\\.org".prop_map(|h| format!("https://{h}/").parse().unwrap()),
        ]
    }

    fn roster_message() -> impl Strategy<Value = RosterMessage> {
        (
            prop::collection::vec(member_record(), 0..4),
            prop::collection::vec(
                (
                    any::<[u8; 32]>().prop_map(DeviceId),
                    prop::collection::vec(peer_addr(), 0..4),
                ),
                0..4,
            ),
            prop::collection::vec(epoch_record(), 0..3),
            prop::collection::vec(name_record(), 0..3),
        )
            .prop_map(|(records, addrs, epochs, names)| RosterMessage {
                records,
                addrs,
                epochs,
                names,
            })
    }

    fn name_record() -> impl Strategy<Value = NameRecord> {
        (any::<[u8; 32]>(), "[a-z][a-z0-9 ]{0,20}[a-z]", any::<u64>()).prop_map(
            |(seed, name, at)| {
                NameRecord::sign(
                    &cairn_crypto::DeviceKey::from_bytes(seed),
                    VaultId([1; 16]),
                    cairn_registry::DeviceName::new(&name).expect("valid by construction"),
                    at,
                )
            },
        )
    }

    fn epoch_record() -> impl Strategy<Value = EpochRecord> {
        (
            any::<[u8; 32]>(),
            any::<u32>(),
            any::<[u8; 8]>(),
            prop::collection::vec((any::<[u8; 32]>(), 0..300usize), 1..3),
        )
            .prop_map(|(seed, number, id, shares)| {
                let k = cairn_crypto::DeviceKey::from_bytes(seed);
                let shares = shares
                    .into_iter()
                    .map(|(d, n)| (DeviceId(d), vec![n as u8; n]))
                    .collect();
                EpochRecord::sign(
                    &k,
                    VaultId([1; 16]),
                    number,
                    cairn_crypto::EpochId(id),
                    shares,
                    5,
                )
                .expect("within bounds")
            })
    }

    /// What decodes from a damaged message: every record in it that verifies is one the
    /// sender signed (damage never yields a valid forgery), and it re-encodes to bytes that
    /// decode to the same message.
    fn check_decoded(
        got: Result<RosterMessage, RegistryProtoError>,
        original: &RosterMessage,
    ) -> Result<(), TestCaseError> {
        match got {
            Ok(m) => {
                for r in &m.records {
                    if r.verify().is_ok() {
                        prop_assert!(original.records.contains(r), "forged record verifies");
                    }
                }
                for e in &m.epochs {
                    if e.verify().is_ok() {
                        prop_assert!(original.epochs.contains(e), "forged epoch record verifies");
                    }
                }
                for n in &m.names {
                    if n.verify().is_ok() {
                        prop_assert!(original.names.contains(n), "forged name record verifies");
                    }
                }
                prop_assert_eq!(RosterMessage::decode(&m.encode()).unwrap(), m);
            }
            Err(e) => {
                let text = e.to_string();
                prop_assert!(
                    text.contains("malformed registry message: roster message: "),
                    "{}",
                    text
                );
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(crate::fuzz::config())]

        #[test]
        fn fuzz_roster_message_round_trip(m in roster_message()) {
            let b = m.encode();
            prop_assert_eq!(RosterMessage::decode(&b).unwrap(), m.clone());
            for r in &m.records {
                prop_assert!(r.verify().is_ok());
            }
        }

        #[test]
        fn fuzz_roster_message_random_bytes(b in prop::collection::vec(any::<u8>(), 0..600)) {
            check_decoded(RosterMessage::decode(&b), &RosterMessage::default())?;
        }

        #[test]
        fn fuzz_roster_message_mutations(
            m in roster_message(),
            edits in prop::collection::vec((0u8..5, any::<prop::sample::Index>(), any::<u8>()), 1..4),
        ) {
            let mut b = m.encode();
            for (op, at, x) in edits {
                crate::fuzz::mutate(&mut b, op, at, x);
            }
            check_decoded(RosterMessage::decode(&b), &m)?;
        }

        #[test]
        fn fuzz_fetch_all_reply_mutations(
            seeds in prop::collection::vec(any::<[u8; 32]>(), 0..4),
            edits in prop::collection::vec((0u8..5, any::<prop::sample::Index>(), any::<u8>()), 1..4),
        ) {
            let vault = VaultId([8; 16]);
            let entries: Vec<RegistryEntry> = seeds
                .iter()
                .map(|s| RegistryEntry::sign(&cairn_crypto::DeviceKey::from_bytes(*s), vault, Revision(3), cairn_registry::Payload([1; 32])))
                .collect();
            let mut good = vec![RES_OK];
            for e in &entries {
                good.extend_from_slice(&e.encode());
            }
            prop_assert_eq!(decode_fetch_all_reply(&vault, &good).unwrap(), entries.clone());
            let mut b = good.clone();
            for (op, at, x) in edits {
                crate::fuzz::mutate(&mut b, op, at, x);
            }
            match decode_fetch_all_reply(&vault, &b) {
                // Only the untouched reply (or a cut between whole entries) gets through.
                Ok(got) => {
                    prop_assert!(b[0] == RES_OK && got.len() <= entries.len());
                    prop_assert_eq!(&got[..], &entries[..got.len()]);
                }
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
        }

        #[test]
        fn fuzz_subscription_event_random_bytes(mut b in prop::collection::vec(any::<u8>(), 0..200), tag in prop::sample::select(vec![EV_ENTRY, EV_LAGGED, 0x00, 0x12])) {
            if !b.is_empty() {
                b[0] = tag;
            }
            match decode_event(&VaultId([8; 16]), &b) {
                Ok(SubscriptionEvent::Lagged(_)) => prop_assert_eq!(b.len(), 9),
                // A random entry never carries a valid signature.
                Ok(SubscriptionEvent::Entry(_)) => prop_assert!(false, "a random entry verified"),
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
        }

        #[test]
        fn fuzz_push_result_random_bytes(b in prop::collection::vec(any::<u8>(), 0..40)) {
            match decode_push_result(&b) {
                Ok(PushResult::Rejected(_)) => prop_assert_eq!(b[0], RES_REJECTED),
                Ok(r) => prop_assert_eq!(encode_push_result(&r), b),
                Err(e) => prop_assert!(e.to_string().contains("push reply of"), "{}", e),
            }
        }

        #[test]
        fn fuzz_registry_request_random_bytes(b in prop::collection::vec(any::<u8>(), 0..300), member: bool) {
            let got = block_on(read_request(&mut &b[..], async |_| Ok(member)));
            match got {
                Ok(Some(Incoming::Request { tag, body, .. })) => {
                    prop_assert!(17 + body.len() <= request_limit(tag));
                    prop_assert!(tag != REQ_ROSTER || member);
                    prop_assert_eq!(&framed(tag, b[5..21].try_into().unwrap(), &body)[..], &b[..21 + body.len()]);
                }
                Ok(Some(Incoming::Refused(why))) => prop_assert!(why.contains("request"), "{}", why),
                Ok(None) => prop_assert!(b.is_empty()),
                // A slice only fails by ending early.
                Err(e) => prop_assert!(
                    matches!(e, RegistryProtoError::Frame(FrameError::Cut { got, len }) if got < len),
                    "{}", e
                ),
            }
        }
    }
}
