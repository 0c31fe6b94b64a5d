//! cairn's own protocols (registry, blobs, pairing) through a `RelayServer` on 127.0.0.1,
//! with endpoints built by `cairn_net::bind_endpoint` exactly as the daemon builds them:
//! the member allowlist holds on relay paths as on direct ones, and a connection that can
//! only start on the relay moves to a direct path once one exists.
//!
//! Nothing here sends to any address but 127.0.0.1: the relay is configured explicitly,
//! address lookup and port mapping are off (`bind_endpoint` never enables them).

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use cairn_crypto::{DeviceId, DeviceKey, VaultId, VaultSecret};
use cairn_net::{
    BlobService, EndpointAddr, Members, NetConfig, PAIR_ALPN, PairError, Pairing, PairingProtocol,
    PushResult, REGISTRY_ALPN, RegistryClient, RegistryProtocol, Relays, Router, Ticket,
    bind_endpoint, join,
};
use cairn_registry::{Payload, Registry, RegistryEntry, Revision};
use cairn_relay::{AccessList, RelayOptions, RelayServer};
use cairn_store::Durability;
use iroh::{RelayUrl, TransportAddr};

const DEADLINE: Duration = Duration::from_secs(60);

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// A device as the daemon runs it: endpoint with the allowlist, and the registry, blob and
/// pairing protocols behind a router.
struct Node {
    key: DeviceKey,
    endpoint: iroh::Endpoint,
    router: Router,
    registry: RegistryProtocol,
    blobs: BlobService,
    members: Members,
    _dir: tempfile::TempDir,
}

impl Node {
    async fn spawn(
        secret: &VaultSecret,
        members: &[DeviceId],
        key: DeviceKey,
        net: NetConfig,
    ) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let vault = secret.vault_id();
        let registry = Registry::open(dir.path().join("registry.sqlite")).unwrap();
        for m in members {
            registry.add_member(&vault, m).unwrap();
        }
        let members = Members::new(members.iter().copied());
        let roster = vec![cairn_net::MemberInfo {
            device: key.device_id(),
            age_recipient: format!("age1-{}", key.device_id().short()),
        }];
        let pairing = Pairing::new(secret.clone(), roster, members.clone());
        let direct = net.direct;
        let endpoint = bind_endpoint(&key, net, members.clone(), Some(pairing.clone()))
            .await
            .unwrap();
        let sockets = endpoint.bound_sockets();
        assert_eq!(
            sockets.is_empty(),
            !direct,
            "relay-only binds no socket: {sockets:?}"
        );
        for s in sockets {
            assert!(s.ip().is_loopback(), "bound to {s}");
        }
        let store = Arc::new(cairn_store::BlobStore::open(dir.path().join("blobs")).unwrap());
        let blobs = BlobService::open(store, members.clone());
        let registry = RegistryProtocol::new(Arc::new(registry));
        let router = Router::builder(endpoint.clone())
            .accept(REGISTRY_ALPN, registry.clone())
            .accept(iroh_blobs::ALPN, blobs.protocol())
            .accept(PAIR_ALPN, PairingProtocol::new(pairing, &endpoint))
            .spawn();
        Node {
            key,
            endpoint,
            router,
            registry,
            blobs,
            members,
            _dir: dir,
        }
    }

    fn id(&self) -> DeviceId {
        self.key.device_id()
    }

    /// This node's address as a peer that knows only its id and relay sees it.
    fn via_relay(&self, relay: &RelayUrl) -> EndpointAddr {
        EndpointAddr::new(self.endpoint.id()).with_relay_url(relay.clone())
    }

    async fn online(&self) {
        within("the home relay", self.endpoint.online()).await;
    }

    async fn shutdown(self) {
        let _ = self.router.shutdown().await;
    }
}

fn net(relay: &RelayUrl, direct: bool) -> NetConfig {
    NetConfig {
        bind: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        relays: Relays::Custom(vec![relay.clone()]),
        direct,
    }
}

fn entry(key: &DeviceKey, vault: VaultId, rev: u64) -> RegistryEntry {
    RegistryEntry::sign(key, vault, Revision(rev), Payload([rev as u8; 32]))
}

async fn local_relay() -> RelayServer {
    // Anyone may use this relay: what is tested is each device's own allowlist.
    RelayServer::spawn(RelayOptions::new(
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        AccessList::anyone(),
    ))
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_members_are_refused_through_the_relay_on_every_alpn() {
    let relay = local_relay().await;
    let url = relay.url();
    let secret = VaultSecret::generate();
    let vault = secret.vault_id();
    let (ka, kb) = (DeviceKey::generate(), DeviceKey::generate());
    let ids = [ka.device_id(), kb.device_id()];
    let a = Node::spawn(&secret, &ids, ka, net(&url, false)).await;
    let b = Node::spawn(&secret, &ids, kb, net(&url, false)).await;
    // The stranger runs the same software, knows A's id and relay, and is in no member list.
    let s = Node::spawn(
        &VaultSecret::generate(),
        &[],
        DeviceKey::generate(),
        net(&url, false),
    )
    .await;
    for n in [&a, &b, &s] {
        n.online().await;
    }
    let id = a
        .blobs
        .blob_store()
        .put(b"members only", Durability::Immediate)
        .unwrap();

    // Registry: refused right after the handshake, nothing stored.
    let res = within("the stranger's push", async {
        let client = RegistryClient::connect(&s.endpoint, a.via_relay(&url)).await?;
        client.push(&entry(&s.key, vault, 1)).await
    })
    .await;
    assert!(
        res.is_err(),
        "a stranger's push through the relay got {res:?}"
    );
    assert!(a.registry.registry().list(&vault).unwrap().is_empty());

    // Blobs: nothing fetched.
    let res = within(
        "the stranger's fetch",
        s.blobs.fetch_from(&s.endpoint, a.via_relay(&url), id),
    )
    .await;
    assert!(res.is_err(), "a stranger fetched a blob through the relay");
    assert!(!s.blobs.blob_store().has(&id).unwrap());

    // Pairing without a live invitation: closed at the handshake, as over a direct path.
    let ticket = Ticket {
        inviter: a.id(),
        addrs: Vec::new(),
        relays: vec![url.clone()],
        vault,
        token: [7; 32],
        expires_at: u64::MAX,
    };
    let res = within(
        "the stranger's pairing",
        join(&s.endpoint, &ticket, "age1x"),
    )
    .await;
    assert!(
        matches!(
            res,
            Err(PairError::PairingClosed
                | PairError::Refused(_)
                | PairError::Connect(_)
                | PairError::UnknownToken)
        ),
        "{res:?}"
    );
    assert!(!a.members.contains(&s.id()));

    // The member on the same relay gets through on both protocols.
    let pushed = within("the member's push", async {
        let client = RegistryClient::connect(&b.endpoint, a.via_relay(&url)).await?;
        client.push(&entry(&b.key, vault, 1)).await
    })
    .await
    .unwrap();
    assert!(matches!(pushed, PushResult::Accepted { .. }), "{pushed:?}");
    within(
        "the member's fetch",
        b.blobs.fetch_from(&b.endpoint, a.via_relay(&url), id),
    )
    .await
    .unwrap();
    assert!(b.blobs.blob_store().has(&id).unwrap());

    for n in [a, b, s] {
        n.shutdown().await;
    }
    relay.shutdown().await.unwrap();
}

/// Whether the connection's selected path is a relay path, a direct one, or none yet.
fn selected(conn: &iroh::endpoint::Connection) -> Option<TransportAddr> {
    conn.paths()
        .iter()
        .find(|p| p.is_selected())
        .map(|p| p.remote_addr().clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_starts_on_the_relay_moves_to_a_direct_path() {
    let relay = local_relay().await;
    let url = relay.url();
    let secret = VaultSecret::generate();
    let (ka, kb) = (DeviceKey::generate(), DeviceKey::generate());
    let ids = [ka.device_id(), kb.device_id()];
    let a = Node::spawn(&secret, &ids, ka, net(&url, true)).await;
    let b = Node::spawn(&secret, &ids, kb, net(&url, true)).await;
    a.online().await;
    b.online().await;

    // B knows only A's id and relay (as after A's address changed): the relay is the only
    // way to start, and the first selected path must be it.
    let client = within(
        "B connecting to A through the relay",
        RegistryClient::connect(&b.endpoint, a.via_relay(&url)),
    )
    .await
    .unwrap();
    let conn = client.connection().clone();
    let first = selected(&conn);
    assert!(
        matches!(first, Some(TransportAddr::Relay(ref u)) if *u == url),
        "the first path is the relay: {first:?}"
    );
    // Traffic keeps flowing while iroh finds the direct path and switches to it.
    let mut rev = 0;
    let direct = within("the switch to a direct path", async {
        loop {
            rev += 1;
            let r = client
                .push(&entry(&b.key, secret.vault_id(), rev))
                .await
                .unwrap();
            assert!(matches!(r, PushResult::Accepted { .. }), "{r:?}");
            if let Some(TransportAddr::Ip(ip)) = selected(&conn) {
                return ip;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(direct.ip().is_loopback(), "direct path to {direct}");
    assert_eq!(
        Some(direct.port()),
        a.endpoint.bound_sockets().first().map(|s| s.port()),
        "the direct path is A's own socket"
    );
    // Every entry pushed across the switch arrived.
    let stored = a.registry.registry().list(&secret.vault_id()).unwrap();
    assert!(!stored.is_empty(), "A stored B's entries");

    for n in [a, b] {
        n.shutdown().await;
    }
    relay.shutdown().await.unwrap();
}
