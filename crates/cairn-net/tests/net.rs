//! End-to-end tests: several endpoints in one process, loopback only (`NetConfig::loopback`:
//! no relays, no address lookup, no port mapping, bound to 127.0.0.1).

use std::sync::Arc;
use std::time::Duration;

use cairn_crypto::{DeviceId, DeviceKey, VaultId, VaultSecret};
use cairn_net::{
    BlobService, EndpointAddr, Members, NetConfig, PAIR_ALPN, PairError, Pairing, PairingEvent,
    PairingProtocol, PeerAddr, PushResult, REGISTRY_ALPN, RegistryClient, RegistryProtocol, Router,
    SubscriptionEvent, Ticket, TicketError, bind_endpoint, join,
};
use cairn_registry::{Payload, Registry, RegistryEntry, Revision};
use cairn_store::{BlobStore, ChunkId, Durability};
use iroh::Endpoint;

const DEADLINE: Duration = Duration::from_secs(20);

struct Node {
    key: DeviceKey,
    endpoint: Endpoint,
    router: Router,
    members: Members,
    registry: RegistryProtocol,
    blobs: BlobService,
    pairing: Pairing,
    _dir: tempfile::TempDir,
}

impl Node {
    async fn spawn(secret: &VaultSecret, members: &[DeviceId], key: DeviceKey) -> Node {
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
        let endpoint = bind_endpoint(
            &key,
            NetConfig::loopback(),
            members.clone(),
            Some(pairing.clone()),
        )
        .await
        .unwrap();
        for s in endpoint.bound_sockets() {
            assert!(s.ip().is_loopback(), "bound to {s}");
        }
        let store = Arc::new(BlobStore::open(dir.path().join("blobs")).unwrap());
        let blobs = BlobService::open(store, members.clone());
        let registry = RegistryProtocol::new(Arc::new(registry));
        let router = Router::builder(endpoint.clone())
            .accept(REGISTRY_ALPN, registry.clone())
            .accept(iroh_blobs::ALPN, blobs.protocol())
            .accept(PAIR_ALPN, PairingProtocol::new(pairing.clone(), &endpoint))
            .spawn();
        Node {
            key,
            endpoint,
            router,
            members,
            registry,
            blobs,
            pairing,
            _dir: dir,
        }
    }

    fn id(&self) -> DeviceId {
        self.key.device_id()
    }

    fn addr(&self) -> EndpointAddr {
        self.endpoint.addr()
    }

    async fn shutdown(self) {
        let _ = self.router.shutdown().await;
    }
}

async fn trio() -> (VaultSecret, Node, Node, Node) {
    let secret = VaultSecret::generate();
    let keys = [
        DeviceKey::generate(),
        DeviceKey::generate(),
        DeviceKey::generate(),
    ];
    let ids: Vec<DeviceId> = keys.iter().map(|k| k.device_id()).collect();
    let [a, b, c] = keys;
    let a = Node::spawn(&secret, &ids, a).await;
    let b = Node::spawn(&secret, &ids, b).await;
    let c = Node::spawn(&secret, &ids, c).await;
    (secret, a, b, c)
}

fn entry(key: &DeviceKey, vault: VaultId, rev: u64, payload: u8) -> RegistryEntry {
    RegistryEntry::sign(key, vault, Revision(rev), Payload([payload; 32]))
}

async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_fetch_and_subscribe() {
    let (secret, a, b, c) = trio().await;
    let vault = secret.vault_id();

    // C subscribes to B; A pushes to B; C must see it.
    let c_to_b = within("connect", RegistryClient::connect(&c.endpoint, b.addr()))
        .await
        .unwrap();
    let mut sub = within("subscribe", c_to_b.subscribe(&vault)).await.unwrap();

    let a_to_b = within("connect", RegistryClient::connect(&a.endpoint, b.addr()))
        .await
        .unwrap();
    let e1 = entry(&a.key, vault, 1, 1);
    assert_eq!(
        within("push", a_to_b.push(&e1)).await.unwrap(),
        PushResult::Accepted { previous: None }
    );
    assert_eq!(
        b.registry.registry().get(&vault, &a.id()).unwrap(),
        Some(e1.clone())
    );
    match within("event", sub.next()).await.unwrap() {
        Some(SubscriptionEvent::Entry(e)) => assert_eq!(e, e1),
        other => panic!("expected the pushed entry, got {other:?}"),
    }

    // Replay is harmless, a newer revision replaces, a stale one is refused with a reason.
    assert_eq!(a_to_b.push(&e1).await.unwrap(), PushResult::Unchanged);
    let e2 = entry(&a.key, vault, 2, 2);
    assert_eq!(
        a_to_b.push(&e2).await.unwrap(),
        PushResult::Accepted {
            previous: Some(Revision(1))
        }
    );
    match within("event", sub.next()).await.unwrap() {
        Some(SubscriptionEvent::Entry(e)) => assert_eq!(e, e2),
        other => panic!("expected the second entry, got {other:?}"),
    }
    // (The same payload as before: another one at revision 1 would be equivocation.)
    let stale = entry(&a.key, vault, 1, 1);
    match a_to_b.push(&stale).await.unwrap() {
        PushResult::Rejected(reason) => assert!(reason.contains("stale"), "{reason}"),
        other => panic!("stale entry: {other:?}"),
    }

    // Local submissions (this device's own publishes) reach subscribers too.
    let eb = entry(&b.key, vault, 1, 3);
    assert!(matches!(
        b.registry.submit(eb.clone()).await.unwrap(),
        PushResult::Accepted { .. }
    ));
    match within("event", sub.next()).await.unwrap() {
        Some(SubscriptionEvent::Entry(e)) => assert_eq!(e, eb),
        other => panic!("expected B's own entry, got {other:?}"),
    }

    let mut all = within("fetch", c_to_b.fetch_all(&vault)).await.unwrap();
    all.sort_by_key(|e| e.device);
    let mut want = vec![e2, eb];
    want.sort_by_key(|e| e.device);
    assert_eq!(all, want);

    drop(sub);
    for n in [a, b, c] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_garbage_entries_are_rejected() {
    let (secret, a, b, c) = trio().await;
    let vault = secret.vault_id();
    let client = RegistryClient::connect(&a.endpoint, b.addr())
        .await
        .unwrap();
    let reason = |r: PushResult| match r {
        PushResult::Rejected(reason) => reason,
        other => panic!("expected a rejection, got {other:?}"),
    };

    let garbage = reason(client.push_bytes(&vault, b"not an entry").await.unwrap());
    assert!(garbage.contains("registry entry"), "{garbage}");
    let mut short = entry(&a.key, vault, 5, 5).encode().to_vec();
    short.truncate(100);
    let short = reason(client.push_bytes(&vault, &short).await.unwrap());
    assert!(short.contains("expected 153"), "{short}");

    let mut forged = entry(&a.key, vault, 5, 5).encode();
    forged[60] ^= 1; // inside the signed payload
    let forged = reason(client.push_bytes(&vault, &forged).await.unwrap());
    assert!(forged.contains("does not verify"), "{forged}");

    let outsider = DeviceKey::generate();
    let stranger = reason(client.push(&entry(&outsider, vault, 1, 1)).await.unwrap());
    assert!(stranger.contains("not a member"), "{stranger}");

    let other_vault = VaultSecret::generate().vault_id();
    let wrong = reason(
        client
            .push_bytes(&vault, &entry(&a.key, other_vault, 1, 1).encode())
            .await
            .unwrap(),
    );
    assert!(wrong.contains("vault"), "{wrong}");

    assert!(b.registry.registry().list(&vault).unwrap().is_empty());
    assert!(client.fetch_all(&vault).await.unwrap().is_empty());
    for n in [a, b, c] {
        n.shutdown().await;
    }
}

/// A member announcing a request larger than its type allows gets a clear refusal at once:
/// the server decides from the length prefix, tag and vault id, without waiting for (or
/// buffering) the body the peer announced and never sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_registry_requests_are_refused_before_buffering() {
    let (secret, a, b, c) = trio().await;
    let vault = secret.vault_id();
    let client = RegistryClient::connect(&a.endpoint, b.addr())
        .await
        .unwrap();
    for (tag, len) in [(0x01u8, 4u32 << 20), (0x04, u32::MAX)] {
        let (mut send, mut recv) = client.connection().open_bi().await.unwrap();
        send.write_all(&len.to_be_bytes()).await.unwrap();
        send.write_all(&[tag]).await.unwrap();
        send.write_all(vault.as_bytes()).await.unwrap();
        // Neither the body nor the end of the stream follows.
        let reply = within("refusal", async {
            let mut n = [0u8; 4];
            recv.read_exact(&mut n).await.unwrap();
            let mut body = vec![0u8; u32::from_be_bytes(n) as usize];
            recv.read_exact(&mut body).await.unwrap();
            body
        })
        .await;
        assert_eq!(reply[0], 0x02, "not a refusal: {reply:?}");
        let why = String::from_utf8_lossy(&reply[1..]);
        assert!(
            why.contains(&format!("request of {len} bytes is larger than")),
            "{why}"
        );
    }
    // The connection still serves ordinary requests.
    assert!(client.fetch_all(&vault).await.unwrap().is_empty());
    for n in [a, b, c] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_members_are_refused_on_every_alpn() {
    let (secret, a, b, c) = trio().await;
    let vault = secret.vault_id();
    // A stranger: its own vault, knows nobody.
    let stranger = Node::spawn(&secret, &[], DeviceKey::generate()).await;

    let id = a
        .blobs
        .blob_store()
        .put(b"members only", Durability::Immediate)
        .unwrap();

    // Registry: the connection is closed right after the handshake.
    let res = within("registry", async {
        let client = RegistryClient::connect(&stranger.endpoint, a.addr()).await?;
        client.push(&entry(&stranger.key, vault, 1, 1)).await
    })
    .await;
    assert!(res.is_err(), "stranger push got {res:?}");
    assert!(a.registry.registry().list(&vault).unwrap().is_empty());

    // Blobs.
    let res = within(
        "blobs",
        stranger.blobs.fetch_from(&stranger.endpoint, a.addr(), id),
    )
    .await;
    assert!(res.is_err(), "stranger fetched a blob");
    assert!(!stranger.blobs.blob_store().has(&id).unwrap());

    // Pairing with no pending invitation and no recovery window: closed at the handshake.
    let ticket = Ticket {
        inviter: a.id(),
        addrs: a.addr().ip_addrs().copied().collect(),
        relays: Vec::new(),
        vault,
        token: [7; 32],
        expires_at: u64::MAX,
    };
    let res = within("pair", join(&stranger.endpoint, &ticket, "age1x")).await;
    assert_eq!(res.unwrap_err(), PairError::PairingClosed);
    assert!(!a.members.contains(&stranger.id()));

    // The vault's recovery token (derived from the secret, i.e. the recovery phrase) admits
    // nobody without a recovery window: refused at the handshake while nothing is open...
    let recovery = Ticket {
        token: cairn_net::recovery_token(&secret),
        ..ticket.clone()
    };
    let res = within(
        "recover, closed",
        join(&stranger.endpoint, &recovery, "age1r"),
    )
    .await;
    assert_eq!(res.unwrap_err(), PairError::PairingClosed);
    // ... and by the proof check while only an invitation is pending.
    let _inv = a
        .pairing
        .invite(&a.endpoint, Duration::from_secs(600))
        .unwrap();
    let res = within(
        "recover, invitation",
        join(&stranger.endpoint, &recovery, "age1r"),
    )
    .await;
    assert_eq!(res.unwrap_err(), PairError::RecoveryClosed);
    assert!(!a.members.contains(&stranger.id()));
    // A made-up token gets nothing through the open door either.
    let res = within("made up", join(&stranger.endpoint, &ticket, "age1x")).await;
    assert_eq!(res.unwrap_err(), PairError::UnknownToken);
    assert_eq!(a.pairing.cancel_all(), 1);

    // Inside a recovery window it works, more than once.
    a.pairing.open_recovery(Duration::from_secs(600)).unwrap();
    for _ in 0..2 {
        let rescuer = Node::spawn(&secret, &[], DeviceKey::generate()).await;
        let joined = within("recover", join(&rescuer.endpoint, &recovery, "age1r"))
            .await
            .unwrap();
        assert_eq!(joined.vault_secret, secret);
        assert!(a.members.contains(&rescuer.id()));
        rescuer.shutdown().await;
    }
    // Closed early: refused again.
    assert!(a.pairing.close_recovery());
    let late = Node::spawn(&secret, &[], DeviceKey::generate()).await;
    let res = within(
        "recover, closed early",
        join(&late.endpoint, &recovery, "age1r"),
    )
    .await;
    assert_eq!(res.unwrap_err(), PairError::PairingClosed);
    // A window that runs out closes by itself.
    a.pairing.open_recovery(Duration::from_secs(1)).unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let res = within("recover, ran out", join(&late.endpoint, &recovery, "age1r")).await;
    assert_eq!(res.unwrap_err(), PairError::PairingClosed);
    assert!(!a.members.contains(&late.id()));
    late.shutdown().await;

    // A member on the same nodes still gets through.
    within("member blob", b.blobs.fetch_from(&b.endpoint, a.addr(), id))
        .await
        .unwrap();
    for n in [a, b, c, stranger] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pairing_invite_join_reuse_expiry() {
    let secret = VaultSecret::generate();
    let ka = DeviceKey::generate();
    let a = Node::spawn(&secret, &[ka.device_id()], ka).await;
    // The joiner knows no vault yet.
    let j = Node::spawn(&VaultSecret::generate(), &[], DeviceKey::generate()).await;
    let mut events = a.pairing.events();

    let inv = a
        .pairing
        .invite(&a.endpoint, Duration::from_secs(600))
        .unwrap();
    let text = inv.ticket.to_string();
    let ticket: Ticket = text.parse().unwrap();
    let got = within("join", join(&j.endpoint, &ticket, "age1joiner"))
        .await
        .unwrap();
    assert_eq!(got.vault_secret.as_bytes(), secret.as_bytes());
    assert_eq!(got.inviter, a.id());
    let devices: Vec<DeviceId> = got.members.iter().map(|m| m.device).collect();
    assert!(
        devices.contains(&a.id()) && devices.contains(&j.id()),
        "{devices:?}"
    );
    assert!(
        got.members
            .iter()
            .any(|m| m.device == j.id() && m.age_recipient == "age1joiner")
    );
    assert!(a.members.contains(&j.id()));
    match within("event", events.recv()).await.unwrap() {
        PairingEvent::Joined(joined) => assert_eq!(joined.device, j.id()),
        other => panic!("{other:?}"),
    }

    // Reuse: with nothing else pending the inviter no longer lets strangers in at all; with
    // another invitation pending it says exactly why.
    let stranger = Node::spawn(&VaultSecret::generate(), &[], DeviceKey::generate()).await;
    let res = within("reuse", join(&stranger.endpoint, &ticket, "age1s")).await;
    assert_eq!(res.unwrap_err(), PairError::PairingClosed);
    let _other = a
        .pairing
        .invite(&a.endpoint, Duration::from_secs(600))
        .unwrap();
    let res = within("reuse", join(&stranger.endpoint, &ticket, "age1s")).await;
    assert_eq!(res.unwrap_err(), PairError::AlreadyUsed);
    match within("event", events.recv()).await.unwrap() {
        PairingEvent::Refused { device, error } => {
            assert_eq!(device, stranger.id());
            assert_eq!(error, PairError::AlreadyUsed);
        }
        other => panic!("{other:?}"),
    }

    // A wrong token.
    let mut wrong = ticket.clone();
    wrong.token = [1; 32];
    let res = within("wrong", join(&stranger.endpoint, &wrong, "age1s")).await;
    assert_eq!(res.unwrap_err(), PairError::UnknownToken);
    assert!(!a.members.contains(&stranger.id()));

    // Expiry: refused locally by the joiner, and by the inviter even if the joiner lies
    // about the expiry.
    let short = a
        .pairing
        .invite(&a.endpoint, Duration::from_secs(1))
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let res = join(&stranger.endpoint, &short.ticket, "age1s").await;
    assert_eq!(res.unwrap_err(), PairError::Expired);
    let mut lying = short.ticket.clone();
    lying.expires_at = u64::MAX;
    let res = within("expired", join(&stranger.endpoint, &lying, "age1s")).await;
    assert_eq!(res.unwrap_err(), PairError::Expired);
    assert!(!a.members.contains(&stranger.id()));

    // Malformed ticket strings give a clear error.
    let err = "cairn1zzzz!".parse::<Ticket>().unwrap_err();
    assert_eq!(err, TicketError::Encoding);
    let mut mangled = text.clone();
    mangled.truncate(text.len() - 3);
    let err = mangled.parse::<Ticket>().unwrap_err();
    assert!(
        matches!(err, TicketError::Checksum | TicketError::Encoding),
        "{err}"
    );
    assert!(PairError::from(err).to_string().contains("copying"));

    for n in [a, j, stranger] {
        n.shutdown().await;
    }
}

/// Guessing is rate-limited per remote: after its failures a device is refused even with a
/// valid ticket, which stays usable by anybody else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_proofs_are_rate_limited_per_remote() {
    use cairn_net::limiter::MAX_FAILURES_PER_REMOTE;
    let secret = VaultSecret::generate();
    let ka = DeviceKey::generate();
    let a = Node::spawn(&secret, &[ka.device_id()], ka).await;
    let guesser = Node::spawn(&VaultSecret::generate(), &[], DeviceKey::generate()).await;
    let good = a
        .pairing
        .invite(&a.endpoint, Duration::from_secs(600))
        .unwrap();
    for i in 0..MAX_FAILURES_PER_REMOTE {
        let guess = Ticket {
            token: [i as u8; 32],
            ..good.ticket.clone()
        };
        let res = within("guess", join(&guesser.endpoint, &guess, "age1g")).await;
        assert_eq!(res.unwrap_err(), PairError::UnknownToken, "guess {i}");
    }
    let res = within("locked out", join(&guesser.endpoint, &good.ticket, "age1g")).await;
    match res {
        Err(PairError::TooManyAttempts(m)) => assert!(m.contains("retry in"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(!a.members.contains(&guesser.id()));
    let honest = Node::spawn(&VaultSecret::generate(), &[], DeviceKey::generate()).await;
    within("honest", join(&honest.endpoint, &good.ticket, "age1h"))
        .await
        .unwrap();
    assert!(a.members.contains(&honest.id()));
    for n in [a, guesser, honest] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_fetch_verified_missing_and_tampered() {
    let (_secret, a, b, c) = trio().await;
    let mut data = vec![0u8; 5 * 1024 * 1024];
    blake3::Hasher::new()
        .update(b"cairn-net blob test")
        .finalize_xof()
        .fill(&mut data);
    let id = a
        .blobs
        .blob_store()
        .put(&data, Durability::Immediate)
        .unwrap();
    b.blobs
        .blob_store()
        .put(&data, Durability::Immediate)
        .unwrap();

    // C fetches from A: byte-identical (`get` hashes what it reads back).
    within("fetch", c.blobs.fetch_from(&c.endpoint, a.addr(), id))
        .await
        .unwrap();
    assert_eq!(c.blobs.blob_store().get(&id).unwrap(), data);

    // A hash nobody has: a clean error, nothing stored.
    let missing = ChunkId::of(b"nobody has this");
    let err = within(
        "missing",
        c.blobs.fetch_from(&c.endpoint, a.addr(), missing),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains(&missing.to_hex()), "{err}");
    assert!(!c.blobs.blob_store().has(&missing).unwrap());

    // Tamper with A's copy in place (A re-hashes what it serves and refuses it; the client
    // would reject changed bytes under the original hash anyway). A fresh node gets nothing
    // from A and the blob from B instead.
    {
        use std::os::unix::fs::FileExt;
        let loc = a.blobs.blob_store().locate(&id).unwrap().unwrap();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&loc.path)
            .unwrap();
        f.write_all_at(b"tampered", loc.offset + 3 * 1024 * 1024 + 17)
            .unwrap();
        f.sync_all().unwrap();
    }
    let d_key = DeviceKey::generate();
    let d = Node::spawn(&_secret, &[], d_key).await;
    a.members.insert(d.id());
    b.members.insert(d.id());
    let err = within("tampered", d.blobs.fetch_from(&d.endpoint, a.addr(), id))
        .await
        .unwrap_err();
    assert!(
        !d.blobs.blob_store().has(&id).unwrap(),
        "stored tampered data: {err}"
    );
    let from = within(
        "fallback",
        d.blobs
            .fetch_from_any(&d.endpoint, &[a.addr(), b.addr()], id),
    )
    .await
    .unwrap();
    assert_eq!(from, b.id());
    assert_eq!(d.blobs.blob_store().get(&id).unwrap(), data);

    for n in [a, b, c, d] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn equivocation_is_detected_kept_and_passed_on() {
    let (secret, a, b, c) = trio().await;
    let vault = secret.vault_id();
    // A signs two payloads under revision 1; B hears the higher one first.
    let (x, y) = (entry(&a.key, vault, 1, 0x70), entry(&a.key, vault, 1, 0x07));
    let a_to_b = within("connect", RegistryClient::connect(&a.endpoint, b.addr()))
        .await
        .unwrap();
    let c_to_b = within("connect", RegistryClient::connect(&c.endpoint, b.addr()))
        .await
        .unwrap();
    let mut sub = within("subscribe", c_to_b.subscribe(&vault)).await.unwrap();
    assert_eq!(
        within("push", a_to_b.push(&x)).await.unwrap(),
        PushResult::Accepted { previous: None }
    );
    // The lower payload wins the revision: B switches to it and tells its subscribers.
    assert_eq!(
        within("push", a_to_b.push(&y)).await.unwrap(),
        PushResult::Accepted {
            previous: Some(Revision(1))
        }
    );
    assert_eq!(
        b.registry.registry().get(&vault, &a.id()).unwrap(),
        Some(y.clone())
    );
    let ev = b.registry.registry().equivocations(&vault).unwrap();
    assert_eq!(ev.len(), 1);
    assert_eq!(
        (ev[0].low.clone(), ev[0].high.clone()),
        (y.clone(), x.clone())
    );
    let mut seen = Vec::new();
    while seen.len() < 3 {
        match within("event", sub.next()).await.unwrap() {
            Some(SubscriptionEvent::Entry(e)) => seen.push(e),
            other => panic!("expected entries, got {other:?}"),
        }
    }
    assert!(seen.contains(&x) && seen.contains(&y), "{seen:?}");
    // Pushing the higher one again is refused with a reason naming the device.
    match a_to_b.push(&x).await.unwrap() {
        PushResult::Rejected(reason) => {
            assert!(reason.contains("equivocated"), "{reason}");
            assert!(reason.contains(&a.id().to_string()), "{reason}");
        }
        other => panic!("equivocating entry: {other:?}"),
    }

    // A fetch-all carries the evidence: C, which never saw either entry, records it.
    let all = within("fetch", c_to_b.fetch_all(&vault)).await.unwrap();
    assert!(all.contains(&x) && all.contains(&y), "{all:?}");
    for e in &all {
        c.registry.submit(e.clone()).await.unwrap();
    }
    assert_eq!(
        c.registry.absorb_evidence(&all).await.unwrap(),
        0,
        "already seen via submit"
    );
    let on_c = c.registry.registry().equivocations(&vault).unwrap();
    assert_eq!(on_c.len(), 1);
    assert_eq!(
        c.registry.registry().get(&vault, &a.id()).unwrap(),
        Some(y.clone())
    );

    // And evidence alone (two entries, not offered one by one) is enough on a fresh node.
    let d = Node::spawn(&secret, &[a.id(), b.id(), c.id()], DeviceKey::generate()).await;
    assert_eq!(
        d.registry
            .absorb_evidence(&[x.clone(), y.clone()])
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        d.registry.registry().equivocations(&vault).unwrap().len(),
        1
    );

    for n in [a, b, c, d] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roster_exchange_spreads_members_and_addresses() {
    let (secret, a, b, c) = trio().await;
    let vault = secret.vault_id();
    // A signs the founder record and B in; C will hear about them only through B.
    let founder = cairn_registry::MemberRecord::add(&a.key, vault, a.id(), "age1a".into(), 1);
    let add_b = cairn_registry::MemberRecord::add(&a.key, vault, b.id(), "age1b".into(), 2);
    a.registry
        .registry()
        .merge_roster(&vault, &[founder.clone(), add_b.clone()])
        .unwrap();
    let new_dev = DeviceKey::generate().device_id();
    let add_new = cairn_registry::MemberRecord::add(&a.key, vault, new_dev, "age1n".into(), 3);
    a.registry
        .registry()
        .merge_roster(&vault, &[add_new])
        .unwrap();
    a.registry.set_local(
        a.id(),
        a.endpoint
            .bound_sockets()
            .into_iter()
            .map(PeerAddr::Direct)
            .chain(["http://127.0.0.1:9/".parse().unwrap()])
            .collect(),
    );

    // B asks A: B now holds A's three records and A's address.
    let mut events = b.registry.roster_events();
    let b_to_a = within("connect", RegistryClient::connect(&b.endpoint, a.addr()))
        .await
        .unwrap();
    let ours = b.registry.roster_message(vault).await.unwrap();
    let theirs = within("exchange", b_to_a.exchange_roster(&vault, &ours))
        .await
        .unwrap();
    let change = b.registry.absorb(vault, a.id(), theirs).await.unwrap();
    assert_eq!(change.added, vec![new_dev], "{change:?}");
    assert!(b.registry.registry().is_member(&vault, &new_dev).unwrap());
    assert_eq!(within("event", events.recv()).await.unwrap(), change);
    let addrs = b.registry.registry().addrs(&vault).unwrap();
    let a_addrs = &addrs.iter().find(|(d, _)| *d == a.id()).unwrap().1;
    assert_eq!(
        a_addrs,
        &a.endpoint
            .bound_sockets()
            .iter()
            .map(|s| s.to_string())
            .chain(["http://127.0.0.1:9/".to_string()])
            .collect::<Vec<_>>(),
        "direct addresses and relays both travel"
    );

    // A removal signed by A travels the same way and wins over the earlier addition.
    let rm = cairn_registry::MemberRecord::remove(&a.key, vault, new_dev, 4);
    a.registry.registry().merge_roster(&vault, &[rm]).unwrap();
    let theirs = b_to_a
        .exchange_roster(&vault, &b.registry.roster_message(vault).await.unwrap())
        .await
        .unwrap();
    let change = b.registry.absorb(vault, a.id(), theirs).await.unwrap();
    assert_eq!(change.removed, vec![new_dev]);
    assert!(!b.registry.registry().is_member(&vault, &new_dev).unwrap());

    // A forged record (signed by a non-member) is dropped on the receiving side.
    let stranger = DeviceKey::generate();
    let forged = cairn_registry::MemberRecord::add(
        &stranger,
        vault,
        stranger.device_id(),
        "age1s".into(),
        5,
    );
    // Addresses travel only for members: the stranger's and the removed device's are
    // dropped, the sender's own are kept.
    let somewhere: PeerAddr = "10.9.8.7:6543".parse().unwrap();
    let msg = cairn_net::RosterMessage {
        records: vec![forged],
        addrs: vec![
            (c.id(), vec![somewhere.clone()]),
            (stranger.device_id(), vec![somewhere.clone()]),
            (new_dev, vec![somewhere.clone()]),
        ],
        epochs: vec![],
        names: vec![],
    };
    let c_to_a = RegistryClient::connect(&c.endpoint, a.addr())
        .await
        .unwrap();
    c_to_a.exchange_roster(&vault, &msg).await.unwrap();
    assert!(
        !a.registry
            .registry()
            .is_member(&vault, &stranger.device_id())
            .unwrap()
    );
    let known: Vec<DeviceId> = a
        .registry
        .registry()
        .addrs(&vault)
        .unwrap()
        .into_iter()
        .map(|(d, _)| d)
        .collect();
    assert!(known.contains(&c.id()), "the sender's own address is kept");
    assert!(
        !known.contains(&stranger.device_id()) && !known.contains(&new_dev),
        "addresses of non-members were kept: {known:?}"
    );

    for n in [a, b, c] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_falls_behind_still_converges() {
    let (secret, a, b, c) = trio().await;
    let vault = secret.vault_id();
    let b_to_a = RegistryClient::connect(&b.endpoint, a.addr())
        .await
        .unwrap();
    let mut sub = within("subscribe", b_to_a.subscribe(&vault)).await.unwrap();
    // More accepted entries than the server's per-subscriber queue, without reading any:
    // the server either forwards them (QUIC flow control bounds what is buffered) or tells
    // the subscriber it lagged; it never queues without bound.
    let n = cairn_net::registry_proto::SUBSCRIBER_QUEUE as u64 + 200;
    for rev in 1..=n {
        let e = entry(&c.key, vault, rev, (rev % 251) as u8);
        a.registry.submit(e).await.unwrap();
    }
    let mut newest = 0;
    loop {
        match within("event", sub.next()).await.unwrap() {
            Some(SubscriptionEvent::Lagged(k)) => {
                assert!(k > 0);
                // What a lagging subscriber does: refetch the current heads.
                let all = b_to_a.fetch_all(&vault).await.unwrap();
                newest = all.iter().map(|e| e.revision.0).max().unwrap_or(0);
            }
            Some(SubscriptionEvent::Entry(e)) => {
                assert!(e.revision.0 > newest || e.revision.0 <= n, "out of range");
                newest = newest.max(e.revision.0);
            }
            None => panic!("subscription ended"),
        }
        if newest == n {
            break;
        }
    }
    for n in [a, b, c] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_member_stops_receiving_and_cannot_reconnect() {
    let (secret, a, b, c) = trio().await;
    let vault = secret.vault_id();
    let b_to_a = RegistryClient::connect(&b.endpoint, a.addr())
        .await
        .unwrap();
    let mut sub = within("subscribe", b_to_a.subscribe(&vault)).await.unwrap();
    a.registry
        .registry()
        .remove_member(&vault, &b.id())
        .unwrap();
    a.members.remove(&b.id());
    a.registry.submit(entry(&c.key, vault, 1, 1)).await.unwrap();
    // The open subscription ends instead of delivering the entry.
    match within("end of subscription", sub.next()).await {
        Ok(None) | Err(_) => {}
        Ok(Some(ev)) => panic!("a removed member still received {ev:?}"),
    }
    // And a fresh connection is refused on every request.
    let again = RegistryClient::connect(&b.endpoint, a.addr()).await;
    if let Ok(client) = again {
        assert!(within("fetch", client.fetch_all(&vault)).await.is_err());
    }
    for n in [a, b, c] {
        n.shutdown().await;
    }
}

/// `n` blobs of `size` bytes each, all different.
fn distinct_blobs(n: usize, size: usize, seed: &str) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let mut data = vec![0u8; size];
            blake3::Hasher::new()
                .update(format!("{seed} {i}").as_bytes())
                .finalize_xof()
                .fill(&mut data);
            data
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_fetch_stores_good_blobs_and_rejects_a_tampered_one() {
    let (secret, a, b, c) = trio().await;
    let data = distinct_blobs(6, 100 * 1024, "batch");
    let mut ids = Vec::new();
    for d in &data {
        ids.push(a.blobs.blob_store().put(d, Durability::Immediate).unwrap());
        b.blobs.blob_store().put(d, Durability::Immediate).unwrap();
    }
    // One hash nobody has, in the middle of the batch.
    let missing = ChunkId::of(b"nobody has this either");
    let mut asked = ids.clone();
    asked.insert(2, missing);

    // C asks A for all of them in one batch: everything A has arrives, the missing one fails.
    let conn = c
        .endpoint
        .connect(a.addr(), iroh_blobs::ALPN)
        .await
        .unwrap();
    let results = within("batch", c.blobs.fetch_many(&conn, &asked)).await;
    assert_eq!(results.len(), asked.len());
    for (i, (id, r)) in results.iter().enumerate() {
        assert_eq!(*id, asked[i]);
        if *id == missing {
            assert!(r.is_err(), "a blob nobody has was fetched");
        } else {
            assert_eq!(*r.as_ref().unwrap(), 100 * 1024);
        }
    }
    for (id, d) in ids.iter().zip(&data) {
        assert_eq!(&c.blobs.blob_store().get(id).unwrap(), d);
    }
    assert!(!c.blobs.blob_store().has(&missing).unwrap());

    // Tamper with A's copy of the third blob (A refuses to serve it). A fresh node
    // fetching the batch from A keeps the five good blobs and rejects the bad one, then gets
    // that one from B.
    let bad = ids[2];
    {
        use std::os::unix::fs::FileExt;
        let loc = a.blobs.blob_store().locate(&bad).unwrap().unwrap();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&loc.path)
            .unwrap();
        f.write_all_at(b"tampered", loc.offset + 50 * 1024).unwrap();
        f.sync_all().unwrap();
    }
    let d = Node::spawn(&secret, &[], DeviceKey::generate()).await;
    a.members.insert(d.id());
    b.members.insert(d.id());
    let conn = d
        .endpoint
        .connect(a.addr(), iroh_blobs::ALPN)
        .await
        .unwrap();
    let results = within("tampered batch", d.blobs.fetch_many(&conn, &ids)).await;
    for (id, r) in &results {
        assert_eq!(r.is_ok(), *id != bad, "{id}: {r:?}");
    }
    assert!(!d.blobs.blob_store().has(&bad).unwrap());
    for (id, data) in ids.iter().zip(&data) {
        if *id != bad {
            assert_eq!(&d.blobs.blob_store().get(id).unwrap(), data);
        }
    }
    let from = within(
        "fallback",
        d.blobs
            .fetch_from_any(&d.endpoint, &[a.addr(), b.addr()], bad),
    )
    .await
    .unwrap();
    assert_eq!(from, b.id());
    assert_eq!(d.blobs.blob_store().get(&bad).unwrap(), data[2]);

    for n in [a, b, c, d] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_fetch_refuses_non_members() {
    let (secret, a, b, c) = trio().await;
    let data = distinct_blobs(3, 40 * 1024, "members only");
    let ids: Vec<ChunkId> = data
        .iter()
        .map(|d| a.blobs.blob_store().put(d, Durability::Immediate).unwrap())
        .collect();

    // A stranger is refused at the handshake already.
    let stranger = Node::spawn(&secret, &[], DeviceKey::generate()).await;
    if let Ok(conn) = stranger.endpoint.connect(a.addr(), iroh_blobs::ALPN).await {
        let results = within("stranger", stranger.blobs.fetch_many(&conn, &ids)).await;
        assert!(results.iter().all(|(_, r)| r.is_err()), "{results:?}");
    }
    for id in &ids {
        assert!(!stranger.blobs.blob_store().has(id).unwrap());
    }

    // A member removed while its connection stays open: the request itself is refused.
    let conn = b
        .endpoint
        .connect(a.addr(), iroh_blobs::ALPN)
        .await
        .unwrap();
    let results = within("member", b.blobs.fetch_many(&conn, &ids[..1])).await;
    assert!(results[0].1.is_ok(), "{results:?}");
    a.members.remove(&b.id());
    let results = within("removed member", b.blobs.fetch_many(&conn, &ids[1..])).await;
    assert!(results.iter().all(|(_, r)| r.is_err()), "{results:?}");
    for id in &ids[1..] {
        assert!(!b.blobs.blob_store().has(id).unwrap());
    }

    for n in [a, b, c, stranger] {
        n.shutdown().await;
    }
}

/// The has-check evict relies on: a peer holding every blob passes, one missing any blob
/// fails, and so does one that removed a blob after it was indexed for serving (its serving
/// index still names it, but the data is gone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_all_is_true_only_for_blobs_the_peer_can_serve() {
    let (_secret, a, b, c) = trio().await;
    // Sizes around iroh-blobs' 1 KiB groups and 16 KiB chunk groups, and a tiny one.
    let mut data = distinct_blobs(5, 70 * 1024, "holds");
    data.push(b"tiny".to_vec());
    data.push(vec![7u8; 1024]);
    let ids: Vec<ChunkId> = data
        .iter()
        .map(|d| a.blobs.blob_store().put(d, Durability::Immediate).unwrap())
        .collect();
    b.blobs
        .blob_store()
        .put(&data[0], Durability::Immediate)
        .unwrap();
    let conn_a = c
        .endpoint
        .connect(a.addr(), iroh_blobs::ALPN)
        .await
        .unwrap();
    within("A holds all", c.blobs.holds_all(&conn_a, &ids))
        .await
        .unwrap();
    let conn_b = c
        .endpoint
        .connect(b.addr(), iroh_blobs::ALPN)
        .await
        .unwrap();
    within("B holds one", c.blobs.holds_all(&conn_b, &ids[..1]))
        .await
        .unwrap();
    // The provider resets the stream at the first blob it lacks, which may cut off the one
    // before it too: the answer is only "not all of them".
    within("B lacks some", c.blobs.holds_all(&conn_b, &ids))
        .await
        .unwrap_err();
    // A removes a blob it already served (so it is in its serving index).
    assert!(a.blobs.blob_store().remove(&ids[3]).unwrap());
    let conn_a = c
        .endpoint
        .connect(a.addr(), iroh_blobs::ALPN)
        .await
        .unwrap();
    within("A lost one", c.blobs.holds_all(&conn_a, &ids))
        .await
        .unwrap_err();
    within(
        "A still holds the rest",
        c.blobs.holds_all(&conn_a, &ids[..3]),
    )
    .await
    .unwrap();
    // Nothing was stored by asking.
    assert!(!c.blobs.blob_store().has(&ids[1]).unwrap());
    for n in [a, b, c] {
        n.shutdown().await;
    }
}
