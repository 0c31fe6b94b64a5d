//! The cairn network layer. It owns the iroh endpoint (one per daemon, whose secret key is the
//! device key, so the endpoint id *is* the [`DeviceId`]), the member allowlist enforced on
//! every incoming connection, pairing (`cairn/pair/1`: one-time tickets that hand a joiner the
//! vault secret and member list), the registry exchange protocol (`cairn/registry/1`: push,
//! fetch-all and subscribe for signed registry entries) and blob replication over iroh-blobs
//! into the local [`cairn_store::BlobStore`]. It does not own the sync engine, merging,
//! snapshot formats or FUSE: it moves verified bytes and signed entries between members and
//! leaves every decision about their meaning to its callers.
//!
//! Everything here can run fully offline: [`NetConfig::loopback`] disables relays, address
//! lookup, net-report probes and port mapping and binds to `127.0.0.1` only, and the tests use
//! nothing else.

pub mod addr;
mod blobs;
pub mod endpoint;
pub mod limiter;
pub mod pairing;
pub mod registry_proto;
mod wire;

pub use addr::{AddrError, PeerAddr, endpoint_addr, parse_addrs, peer_addrs};
pub use blobs::{BlobError, BlobService};
pub use endpoint::{
    EndpointError, Members, NOT_MEMBER_CODE, NetConfig, PAIRING_CLOSED_CODE, Relays, bind_endpoint,
    device_id_of, endpoint_id_of,
};
pub use pairing::{
    Invitation, JoinResult, Joined, MAX_INVITATION_TTL, MAX_PENDING_INVITATIONS,
    MAX_RECOVERY_WINDOW, MAX_REMEMBERED_TOKENS, MemberInfo, PAIR_ALPN, PairError, Pairing,
    PairingEvent, PairingProtocol, Ticket, TicketError, WindowError, join, recovery_token,
};
pub use registry_proto::{
    PushResult, REGISTRY_ALPN, RegistryClient, RegistryProtoError, RegistryProtocol, RosterMessage,
    Subscription, SubscriptionEvent,
};

pub use cairn_crypto::DeviceId;
pub use iroh::{Endpoint, EndpointAddr, EndpointId, RelayUrl, protocol::Router};
