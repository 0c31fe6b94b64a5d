//! Building the iroh endpoint from a device key, id conversions, and the member allowlist.
//!
//! The allowlist is an [`EndpointHooks::after_handshake`] hook, so it applies to every ALPN
//! before any protocol handler sees the connection: a non-member's connection is closed
//! right after the TLS handshake (its `connect()` may succeed, its first stream fails). The
//! one exception is the pairing ALPN of an endpoint bound with a [`Pairing`], and only while
//! that pairing is open ([`Pairing::is_open`]: an invitation is pending and unexpired, or a
//! recovery window is open): non-members may then reach it, and must prove an invitation
//! token or the vault's recovery token there (see [`crate::pairing`]). Closed, they are
//! refused with [`PAIRING_CLOSED_CODE`] so the joiner can say what to do.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};

use cairn_crypto::{DeviceId, DeviceKey};
use iroh::endpoint::{
    AfterHandshakeOutcome, Connection, EndpointHooks, NetReportConfig, PortmapperConfig, VarInt,
    presets,
};
use iroh::{Endpoint, EndpointId, RelayMap, RelayMode, RelayUrl, SecretKey};

use crate::pairing::{PAIR_ALPN, Pairing};

/// QUIC close code sent to endpoints refused by the allowlist.
pub const NOT_MEMBER_CODE: u32 = 403;
/// QUIC close code sent to non-members that ask for the pairing ALPN while this device has
/// no pending invitation and no open recovery window.
pub const PAIRING_CLOSED_CODE: u32 = 423;

/// Which relays the endpoint uses.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Relays {
    /// None: devices must reach each other directly (same LAN, VPN, forwarded port).
    #[default]
    Disabled,
    /// n0's public relays.
    Default,
    /// These relays (self-hosted, e.g. `cairn relay`); the endpoint picks the one that
    /// answers fastest as its home relay.
    Custom(Vec<RelayUrl>),
}

impl Relays {
    pub fn enabled(&self) -> bool {
        !matches!(self, Self::Disabled)
    }
}

/// Where and how the endpoint talks to the network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// Local UDP socket to bind (`127.0.0.1:0` for tests); unused when `direct` is false.
    pub bind: SocketAddr,
    /// Relays for reaching devices on other networks. Address lookup (pkarr/DNS) is never
    /// enabled by this crate; peers are addressed by the addresses members exchange.
    pub relays: Relays,
    /// Open a UDP socket for direct paths. `false` is relay-only: no socket is bound, no
    /// direct path is ever opened or announced, so peers never learn this device's IP
    /// address (only the relay does). Needs a relay.
    pub direct: bool,
}

impl NetConfig {
    /// Loopback only, random port, no relays: nothing leaves `127.0.0.1`.
    pub fn loopback() -> Self {
        Self {
            bind: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            relays: Relays::Disabled,
            direct: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error(
        "cannot bind the network endpoint to {addr}: {reason} (is the address valid and the port free?)"
    )]
    Bind { addr: SocketAddr, reason: String },
    #[error("{0} is not a valid ed25519 public key, so it cannot be a device or endpoint id")]
    BadId(DeviceId),
    #[error(
        "relay-only mode (net.direct = false) needs a relay: set net.relay to \"default\" or to your relay URLs"
    )]
    RelayOnlyWithoutRelay,
}

/// The endpoint id of a device: the same ed25519 public key.
pub fn endpoint_id_of(device: &DeviceId) -> Result<EndpointId, EndpointError> {
    EndpointId::from_bytes(device.as_bytes()).map_err(|_| EndpointError::BadId(*device))
}

/// The device id of an endpoint.
pub fn device_id_of(id: &EndpointId) -> DeviceId {
    DeviceId(*id.as_bytes())
}

/// The dynamic set of devices allowed to connect. Cheap to clone (shared).
#[derive(Debug, Clone, Default)]
pub struct Members(Arc<RwLock<HashSet<DeviceId>>>);

impl Members {
    pub fn new(devices: impl IntoIterator<Item = DeviceId>) -> Self {
        Self(Arc::new(RwLock::new(devices.into_iter().collect())))
    }

    pub fn contains(&self, device: &DeviceId) -> bool {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(device)
    }

    /// Returns whether the device was newly added.
    pub fn insert(&self, device: DeviceId) -> bool {
        self.0
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(device)
    }

    /// Returns whether the device was present. Existing connections are not closed.
    pub fn remove(&self, device: &DeviceId) -> bool {
        self.0
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(device)
    }

    /// Replaces the whole set (e.g. after the signed member list changed).
    pub fn replace(&self, devices: impl IntoIterator<Item = DeviceId>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = devices.into_iter().collect();
    }

    pub fn to_vec(&self) -> Vec<DeviceId> {
        let mut v: Vec<_> = self
            .0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .collect();
        v.sort();
        v
    }
}

/// The allowlist hook installed on every endpoint built by [`bind_endpoint`].
#[derive(Debug)]
struct Allowlist {
    members: Members,
    pairing: Option<Pairing>,
}

impl EndpointHooks for Allowlist {
    async fn after_handshake(&self, conn: &Connection) -> AfterHandshakeOutcome {
        // Outgoing connections are to peers we chose to dial (including an inviter we are
        // joining); only incoming ones are filtered.
        if !conn.side().is_server() {
            return AfterHandshakeOutcome::Accept;
        }
        let remote = device_id_of(&conn.remote_id());
        if self.members.contains(&remote) {
            return AfterHandshakeOutcome::Accept;
        }
        if conn.alpn() == PAIR_ALPN {
            // Strangers reach pairing only while a member opened it on purpose (`cairn
            // invite`, `cairn allow-recovery`); even then they get nothing without a proof
            // made from a live invitation's token or, inside a recovery window, from the
            // vault's recovery token (see `pairing`).
            if self.pairing.as_ref().is_some_and(Pairing::is_open) {
                return AfterHandshakeOutcome::Accept;
            }
            tracing::debug!(device = %remote.short(), "refusing pairing: no invitation pending, no recovery window open");
            return AfterHandshakeOutcome::Reject {
                error_code: VarInt::from_u32(PAIRING_CLOSED_CODE),
                reason:
                    b"not accepting new devices: no invitation pending, no recovery window open"
                        .to_vec(),
            };
        }
        tracing::debug!(device = %remote.short(), "refusing connection from a non-member");
        AfterHandshakeOutcome::Reject {
            error_code: VarInt::from_u32(NOT_MEMBER_CODE),
            reason: b"not a member of this vault".to_vec(),
        }
    }
}

/// Binds an endpoint whose secret key is `key` (so its id equals `key.device_id()`), with the
/// member allowlist installed. Pass the [`Pairing`] state if this device may invite others
/// or let a device rejoin with the recovery phrase: non-members may then reach the pairing
/// ALPN (and only it) while that state is open ([`Pairing::is_open`]). With `None`, or while
/// it is closed, they are refused on every ALPN.
///
/// Address lookup, captive-portal checks and port mapping are always off. With relays, the
/// net report asks each relay's `/ping` over HTTP(S) to pick the home relay (nothing else is
/// probed); without, it probes nothing. Binding never waits for a relay: an unreachable one
/// is retried by iroh in the background while direct paths work.
pub async fn bind_endpoint(
    key: &DeviceKey,
    config: NetConfig,
    members: Members,
    pairing: Option<Pairing>,
) -> Result<Endpoint, EndpointError> {
    let bind_err = |reason: String| EndpointError::Bind {
        addr: config.bind,
        reason,
    };
    if !config.direct && !config.relays.enabled() {
        return Err(EndpointError::RelayOnlyWithoutRelay);
    }
    let mut report = NetReportConfig::minimal();
    let relay_mode = match &config.relays {
        Relays::Disabled => RelayMode::Disabled,
        Relays::Default => {
            report.https_probes = true;
            RelayMode::Default
        }
        Relays::Custom(urls) => {
            report.https_probes = true;
            RelayMode::Custom(RelayMap::from_iter(
                urls.iter().map(|u| iroh::RelayConfig::new(u.clone(), None)),
            ))
        }
    };
    let mut builder = Endpoint::builder(presets::Minimal)
        .secret_key(SecretKey::from_bytes(&key.to_bytes()))
        .relay_mode(relay_mode)
        .clear_address_lookup()
        .net_report_config(report)
        .portmapper_config(PortmapperConfig::Disabled)
        .clear_ip_transports();
    if config.direct {
        builder = builder
            .bind_addr(config.bind)
            .map_err(|e| bind_err(e.to_string()))?;
    }
    builder
        .hooks(Allowlist { members, pairing })
        .bind()
        .await
        .map_err(|e| bind_err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_round_trip() {
        let key = DeviceKey::generate();
        let eid = endpoint_id_of(&key.device_id()).unwrap();
        assert_eq!(eid, SecretKey::from_bytes(&key.to_bytes()).public());
        assert_eq!(device_id_of(&eid), key.device_id());
    }

    #[test]
    fn members_set() {
        let m = Members::default();
        let a = DeviceKey::generate().device_id();
        assert!(!m.contains(&a));
        assert!(m.insert(a));
        assert!(m.clone().contains(&a));
        m.replace([]);
        assert!(!m.contains(&a));
    }
}
