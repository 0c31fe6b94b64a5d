//! `cairn/registry/1`: exchanging signed registry entries between members.
//!
//! Every request opens its own bidirectional stream and sends one frame (see `wire`: a
//! big-endian `u32` length, then the body):
//!
//! | request    | body                                   | reply frames                        |
//! |------------|----------------------------------------|-------------------------------------|
//! | Push       | `0x01` vault(16) entry(153)            | one [`PushResult`]                  |
//! | FetchAll   | `0x02` vault(16)                       | one: `0x00` then n × entry(153)     |
//! | Subscribe  | `0x03` vault(16)                       | a stream of events (below)          |
//!
//! Push result: `0x00` Accepted (`0x00` | `0x01` previous u64), `0x01` Unchanged,
//! `0x02` Rejected + UTF-8 reason. Errors to FetchAll/Subscribe: `0x02` + UTF-8 reason.
//! Subscription events: `0x10` entry(153) for each newly accepted entry, or `0x11` + u64 when
//! the subscriber fell behind and that many entries were skipped (it should FetchAll).
//!
//! The server checks nothing itself: every pushed entry goes through
//! [`Registry::put`](cairn_registry::Registry::put), which checks format, signature, vault,
//! membership of the signer and the compare-and-swap rule. Fetching and subscribing require
//! the connecting device to be a member of the requested vault. Subscriptions are fed from a
//! bounded broadcast queue; a slow subscriber lags (and is told), memory stays bounded.

use std::sync::Arc;

use cairn_crypto::{DeviceId, VaultId};
use cairn_registry::{ENTRY_LEN, Outcome, Registry, RegistryEntry, RegistryError, Revision};
use iroh::endpoint::{Connection, RecvStream, SendStream};
use iroh::protocol::{AcceptError, ProtocolHandler};
use tokio::sync::broadcast;

use crate::endpoint::device_id_of;
use crate::wire::{FrameError, read_frame, write_frame};

pub const REGISTRY_ALPN: &[u8] = b"cairn/registry/1";

const REQ_PUSH: u8 = 0x01;
const REQ_FETCH_ALL: u8 = 0x02;
const REQ_SUBSCRIBE: u8 = 0x03;
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

/// Serves the registry ALPN from a local [`Registry`]. Clone it freely (shared state).
#[derive(Debug, Clone)]
pub struct RegistryProtocol {
    registry: Arc<Registry>,
    events: broadcast::Sender<RegistryEntry>,
}

impl RegistryProtocol {
    pub fn new(registry: Arc<Registry>) -> Self {
        let (events, _) = broadcast::channel(SUBSCRIBER_QUEUE);
        Self { registry, events }
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Offers an entry as if a peer pushed it (e.g. one this device just published, or one
    /// fetched from another peer): stored through `Registry::put`, and broadcast to
    /// subscribers if accepted.
    pub async fn submit(&self, entry: RegistryEntry) -> Result<PushResult, RegistryProtoError> {
        let registry = self.registry.clone();
        let outcome = tokio::task::spawn_blocking(move || registry.put(&entry.vault, &entry))
            .await
            .map_err(|e| RegistryProtoError::Join(e.to_string()))?;
        Ok(match outcome {
            Ok(Outcome::Accepted { previous }) => {
                // No subscribers is fine.
                let _ = self.events.send(entry);
                PushResult::Accepted { previous }
            }
            Ok(Outcome::Unchanged) => PushResult::Unchanged,
            Err(e @ (RegistryError::Db(_) | RegistryError::Busy | RegistryError::Corrupt(_))) => {
                return Err(e.into());
            }
            Err(e) => PushResult::Rejected(e.to_string()),
        })
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
        let Some(req) = read_frame(&mut recv, MAX_REQUEST).await? else {
            return Ok(());
        };
        let (tag, rest) = req
            .split_first()
            .ok_or_else(|| RegistryProtoError::Malformed("empty request".into()))?;
        if rest.len() < 16 {
            write_frame(&mut send, &rejected("request too short for a vault id")).await?;
            return Ok(());
        }
        let vault = VaultId(rest[..16].try_into().expect("16 bytes"));
        let body = &rest[16..];
        match *tag {
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
            REQ_FETCH_ALL | REQ_SUBSCRIBE if !self.is_member(vault, remote).await? => {
                let msg = format!("device {remote} is not a member of vault {vault}");
                write_frame(&mut send, &rejected(&msg)).await?;
            }
            REQ_FETCH_ALL => {
                let registry = self.registry.clone();
                let entries = tokio::task::spawn_blocking(move || registry.list(&vault))
                    .await
                    .map_err(|e| RegistryProtoError::Join(e.to_string()))??;
                let mut reply = Vec::with_capacity(1 + entries.len() * ENTRY_LEN);
                reply.push(RES_OK);
                for e in entries.iter().take((MAX_REPLY - 1) / ENTRY_LEN) {
                    reply.extend_from_slice(&e.encode());
                }
                write_frame(&mut send, &reply).await?;
            }
            REQ_SUBSCRIBE => {
                let mut rx = self.events.subscribe();
                write_frame(&mut send, &[RES_OK]).await?;
                loop {
                    let frame = tokio::select! {
                        ev = rx.recv() => match ev {
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
        match frame.split_first() {
            Some((&EV_ENTRY, body)) => {
                let e = RegistryEntry::decode(body)?;
                cairn_registry::check_authentic(&self.vault, &e)?;
                Ok(Some(SubscriptionEvent::Entry(e)))
            }
            Some((&EV_LAGGED, n)) if n.len() == 8 => Ok(Some(SubscriptionEvent::Lagged(
                u64::from_be_bytes(n.try_into().expect("8 bytes")),
            ))),
            _ => Err(RegistryProtoError::Malformed("subscription event".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
