//! The relay end to end, on 127.0.0.1 only: relay-only iroh endpoints (no UDP socket, no
//! address lookup, no public relay, no port mapping) that reach each other through a
//! `RelayServer` restricted to an access list.
//!
//! Deadlines are generous and only bound how long a failing test hangs; nothing asserts a
//! duration.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use cairn_crypto::{DeviceId, DeviceKey};
use cairn_relay::{AccessList, DENY_REASON, RelayError, RelayOptions, RelayServer};
use iroh::endpoint::{NetReportConfig, PortmapperConfig, presets};
use iroh::tls::CaTlsConfig;
use iroh::{Endpoint, EndpointAddr, RelayMap, RelayMode, RelayUrl, SecretKey, Watcher};

const ALPN: &[u8] = b"cairn/relay-test/0";
const DEADLINE: Duration = Duration::from_secs(60);

fn loopback() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
}

struct Device {
    id: DeviceId,
    secret: SecretKey,
}

fn device() -> Device {
    let key = DeviceKey::generate();
    Device {
        id: key.device_id(),
        secret: SecretKey::from_bytes(&key.to_bytes()),
    }
}

/// An endpoint that can only talk through `relay` (see the iroh-relay notes §6).
async fn relay_only(dev: &Device, relay: &RelayUrl, ca: Option<CaTlsConfig>) -> Endpoint {
    let mut net_report = NetReportConfig::minimal();
    // The home relay is picked from probe latencies; without a UDP socket only the HTTPS
    // probe (GET <relay>/ping, loopback here) can run.
    net_report.https_probes = true;
    let mut builder = Endpoint::builder(presets::Minimal)
        .secret_key(dev.secret.clone())
        .clear_ip_transports()
        .relay_mode(RelayMode::Custom(RelayMap::from_iter([
            iroh::RelayConfig::new(relay.clone(), None),
        ])))
        .clear_address_lookup()
        .net_report_config(net_report)
        .portmapper_config(PortmapperConfig::Disabled)
        .alpns(vec![ALPN.to_vec()]);
    if let Some(ca) = ca {
        builder = builder.ca_tls_config(ca);
    }
    let ep = builder.bind().await.expect("bind a relay-only endpoint");
    assert!(ep.bound_sockets().is_empty(), "relay-only: no IP socket");
    ep
}

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Polls `cond` every 50 ms until it holds.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    within(what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

/// The reason the relay gave for refusing this endpoint, once it has.
async fn denied_reason(ep: &Endpoint) -> String {
    let mut status = ep.home_relay_status();
    within("the relay to deny the endpoint", async {
        loop {
            if let Some(r) = status
                .get()
                .iter()
                .find_map(|s| s.auth_denied_reason().map(str::to_string))
            {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

fn home_relay_connected(ep: &Endpoint) -> bool {
    ep.home_relay_status()
        .get()
        .iter()
        .any(|s| s.is_connected())
}

/// `a` accepts one connection and echoes one stream back; `b` dials `a` by id and relay URL
/// only. Returns the echo; checks that every path of the connection is a relay path.
async fn exchange(a: &Endpoint, b: &Endpoint, relay: &RelayUrl, msg: &[u8]) -> Vec<u8> {
    let server = async {
        let conn = a
            .accept()
            .await
            .expect("incoming")
            .await
            .expect("handshake");
        let (mut send, mut recv) = conn.accept_bi().await.expect("stream");
        let got = recv.read_to_end(1 << 16).await.expect("read");
        send.write_all(&got).await.expect("echo");
        send.finish().expect("finish");
        // Keep the connection until the client has read the echo and closed.
        conn.closed().await;
    };
    let client = async {
        let conn = b
            .connect(
                EndpointAddr::new(a.id()).with_relay_url(relay.clone()),
                ALPN,
            )
            .await
            .expect("connect through the relay");
        let (mut send, mut recv) = conn.open_bi().await.expect("open stream");
        send.write_all(msg).await.expect("write");
        send.finish().expect("finish");
        let echo = recv.read_to_end(1 << 16).await.expect("read echo");
        let paths: Vec<_> = conn
            .paths()
            .iter()
            .map(|p| (p.is_relay(), p.is_selected(), p.remote_addr().clone()))
            .collect();
        assert!(!paths.is_empty());
        assert!(
            paths.iter().all(|(relay, _, _)| *relay),
            "only relay paths: {paths:?}"
        );
        assert!(paths.iter().any(|(_, selected, _)| *selected), "{paths:?}");
        conn.close(0u32.into(), b"done");
        echo
    };
    within("the exchange", async { tokio::join!(server, client).1 }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_talk_through_the_relay_and_strangers_are_denied() {
    let (a, b, c) = (device(), device(), device());
    let relay = RelayServer::spawn(RelayOptions::new(
        loopback(),
        AccessList::devices([a.id, b.id]),
    ))
    .await
    .unwrap();
    let url = relay.url();
    assert!(url.as_str().starts_with("http://127.0.0.1:"), "{url}");
    assert_ne!(relay.local_addr().port(), 0);
    assert_eq!(relay.allowed_devices().len(), 2);

    let ea = relay_only(&a, &url, None).await;
    let eb = relay_only(&b, &url, None).await;
    within("A and B online", async {
        tokio::join!(ea.online(), eb.online())
    })
    .await;
    until("two connected clients", || relay.connected_clients() == 2).await;

    let echo = exchange(&ea, &eb, &url, b"hello over the relay").await;
    assert_eq!(echo, b"hello over the relay");
    assert!(relay.stats().bytes_recv > 0 && relay.stats().bytes_sent > 0);

    let ec = relay_only(&c, &url, None).await;
    assert_eq!(denied_reason(&ec).await, DENY_REASON);
    assert!(!home_relay_connected(&ec));
    assert!(relay.stats().denied >= 1);
    assert_eq!(relay.connected_clients(), 2, "C never got in");

    for ep in [ea, eb, ec] {
        ep.close().await;
    }
    relay.shutdown().await.unwrap();
}

fn write_allow(path: &Path, ids: &[DeviceId]) {
    let mut text = String::from("# devices allowed on this relay\n\n");
    for id in ids {
        text.push_str(&format!("{id}  # a device\n"));
    }
    // Write-then-rename, as editors and config management do.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_allow_file_is_followed_without_restart() {
    let (a, b, c) = (device(), device(), device());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("relay-allow");
    write_allow(&file, &[a.id, b.id]);
    let relay = RelayServer::spawn(RelayOptions::new(
        loopback(),
        AccessList::default()
            .with_file(&file)
            .with_poll_interval(Duration::from_millis(100)),
    ))
    .await
    .unwrap();
    let url = relay.url();

    let ea = relay_only(&a, &url, None).await;
    let eb = relay_only(&b, &url, None).await;
    within("A and B online", async {
        tokio::join!(ea.online(), eb.online())
    })
    .await;

    // C is added to the file: the relay admits it without a restart.
    write_allow(&file, &[a.id, b.id, c.id]);
    until("C on the access list", || {
        relay.allowed_devices().contains(&c.id)
    })
    .await;
    let ec = relay_only(&c, &url, None).await;
    within("C online", ec.online()).await;
    assert_eq!(exchange(&ea, &ec, &url, b"welcome").await, b"welcome");

    // B is removed: its connection is closed and its reconnection refused.
    write_allow(&file, &[a.id, c.id]);
    until("B off the access list", || {
        !relay.allowed_devices().contains(&b.id)
    })
    .await;
    assert_eq!(denied_reason(&eb).await, DENY_REASON);
    assert!(!home_relay_connected(&eb));
    until("A and C still connected, B not", || {
        relay.connected_clients() == 2
    })
    .await;
    assert!(home_relay_connected(&ea) && home_relay_connected(&ec));

    // A broken edit leaves the previous list in force.
    std::fs::write(&file, format!("{}\nnot-an-id\n", a.id)).unwrap();
    let err = relay.reload_access_list().await.unwrap_err();
    assert!(
        err.to_string().contains(&format!("{}:2:", file.display())),
        "{err}"
    );
    assert_eq!(relay.allowed_devices().len(), 2);
    assert!(relay.allowed_devices().contains(&c.id));

    // An explicit reload (SIGHUP) reports what changed.
    write_allow(&file, &[a.id]);
    let report = relay.reload_access_list().await.unwrap();
    assert_eq!(report.allowed, 1);
    // The poller may have applied the change first; then there is nothing left to report.
    assert!(report.removed == vec![c.id] || report.removed.is_empty());
    assert_eq!(denied_reason(&ec).await, DENY_REASON);

    for ep in [ea, eb, ec] {
        ep.close().await;
    }
    relay.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_self_signed_certificate() {
    let (a, b) = (device(), device());
    let dir = tempfile::tempdir().unwrap();
    let certified =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".into()])
            .unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();

    let relay = RelayServer::spawn(
        RelayOptions::new(loopback(), AccessList::devices([a.id, b.id])).with_tls(&cert, &key),
    )
    .await
    .unwrap();
    let url = relay.url();
    assert!(url.as_str().starts_with("https://127.0.0.1:"), "{url}");
    let portal = relay
        .captive_portal_addr()
        .expect("captive-portal listener");
    assert_ne!(portal, relay.local_addr());

    let roots = || CaTlsConfig::custom_roots([certified.cert.der().clone()]);
    let ea = relay_only(&a, &url, Some(roots())).await;
    let eb = relay_only(&b, &url, Some(roots())).await;
    within("A and B online over TLS", async {
        tokio::join!(ea.online(), eb.online())
    })
    .await;
    assert_eq!(exchange(&ea, &eb, &url, b"over tls").await, b"over tls");

    ea.close().await;
    eb.close().await;
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn bad_tls_files_are_refused_clearly() {
    let a = device();
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.pem");
    let err = RelayServer::spawn(
        RelayOptions::new(loopback(), AccessList::devices([a.id])).with_tls(&missing, &missing),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, RelayError::Tls { .. }), "{err}");
    assert!(err.to_string().contains("nope.pem"), "{err}");

    // A key that is not the certificate's.
    let one = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, one.cert.pem()).unwrap();
    std::fs::write(&key, other.signing_key.serialize_pem()).unwrap();
    let err = RelayServer::spawn(
        RelayOptions::new(loopback(), AccessList::devices([a.id])).with_tls(&cert, &key),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, RelayError::Tls { .. }), "{err}");
}

#[tokio::test]
async fn an_empty_access_list_is_refused_unless_anyone_is_explicit() {
    let err = RelayServer::spawn(RelayOptions::new(loopback(), AccessList::default()))
        .await
        .unwrap_err();
    assert!(matches!(err, RelayError::EmptyAccessList { .. }), "{err}");
    assert!(err.to_string().contains("--allow-anyone"), "{err}");

    // A file with only comments is just as empty, and the message names it.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("relay-allow");
    write_allow(&file, &[]);
    let err = RelayServer::spawn(RelayOptions::new(
        loopback(),
        AccessList::default().with_file(&file),
    ))
    .await
    .unwrap_err();
    assert!(matches!(err, RelayError::EmptyAccessList { .. }), "{err}");
    assert!(err.to_string().contains("relay-allow"), "{err}");

    // A bad line names the file and the line.
    std::fs::write(&file, "# ok\n\nzz-not-hex\n").unwrap();
    let err = RelayServer::spawn(RelayOptions::new(
        loopback(),
        AccessList::default().with_file(&file),
    ))
    .await
    .unwrap_err();
    assert!(
        err.to_string()
            .starts_with(&format!("{}:3:", file.display())),
        "{err}"
    );

    // A missing file says so.
    let err = RelayServer::spawn(RelayOptions::new(
        loopback(),
        AccessList::default().with_file(dir.path().join("absent")),
    ))
    .await
    .unwrap_err();
    assert!(matches!(err, RelayError::AllowFileRead { .. }), "{err}");

    // Anyone plus a list is contradictory.
    let err = RelayServer::spawn(RelayOptions::new(
        loopback(),
        AccessList::anyone().with_device(device().id),
    ))
    .await
    .unwrap_err();
    assert!(matches!(err, RelayError::AnyoneWithList), "{err}");

    // An open relay, chosen explicitly, starts and admits anybody.
    let relay = RelayServer::spawn(RelayOptions::new(loopback(), AccessList::anyone()))
        .await
        .unwrap();
    assert!(relay.is_open());
    let d = device();
    let ep = relay_only(&d, &relay.url(), None).await;
    within("a stranger online on an open relay", ep.online()).await;
    ep.close().await;
    relay.shutdown().await.unwrap();
}
