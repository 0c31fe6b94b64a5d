//! The self-hosted relay for people who want no third party at all: an iroh relay server
//! (from the `iroh-relay` crate) that only the devices of your vault may use.
//!
//! This crate owns the relay **server** and its **access list**: listening on plain HTTP (for
//! loopback tests, or behind a TLS-terminating proxy) or HTTPS from PEM files (re-read
//! periodically, so a renewed certificate needs no restart), and admitting only listed
//! device ids, from the command line and/or an allow file that is re-read when it changes
//! (removing an id disconnects that device). It does not own the client side, i.e. which
//! relays a device uses and how it dials through them: that lives in `cairn-net`. The `cairn
//! relay` command is a thin wrapper around [`RelayServer::spawn`].
//!
//! The relay only forwards end-to-end encrypted QUIC packets between endpoints; it never sees
//! vault content. It does see which devices talk to each other, when, how much, and their IP
//! addresses, so run it where you would be comfortable keeping such metadata.
//!
//! Who may *connect to a device* is still decided by each device's own member allowlist
//! (`cairn-net`); this list only decides who may use the relay at all.

mod access;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use iroh::RelayUrl;
use iroh_relay::server::{self as relay, CertConfig, Server, ServerConfig};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::task::JoinHandle;

pub use access::{
    AccessList, AccessReport, AllowLineError, DEFAULT_POLL_INTERVAL, DENY_REASON, parse_allow_file,
};
pub use cairn_crypto::DeviceId;
pub use iroh_relay::server::RelayMetrics;

use access::{Gate, GateAccess};

/// How often the certificate and key files are re-read (certbot renews weeks ahead).
pub const CERT_RELOAD_INTERVAL: Duration = Duration::from_secs(60 * 60);

/// The PEM files of the relay's TLS certificate chain and private key (e.g. certbot's
/// `fullchain.pem` and `privkey.pem`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// How to run the relay.
#[derive(Debug, Clone)]
pub struct RelayOptions {
    /// Where the relay listens (TCP). Port 0 picks a free port (see [`RelayServer::url`]).
    pub bind: SocketAddr,
    /// Serve HTTPS with this certificate; `None` serves plain HTTP.
    pub tls: Option<TlsFiles>,
    /// With TLS, the relay also answers iroh's captive-portal probe
    /// (`http://HOST/generate_204`) over plain HTTP; normally port 80. `None` puts that
    /// listener on an ephemeral port of the same IP, where nobody looks for it. Ignored
    /// without TLS (the probe is then served on `bind`).
    pub captive_portal: Option<SocketAddr>,
    /// Which devices may use the relay.
    pub allow: AccessList,
}

impl RelayOptions {
    /// Plain HTTP on `bind` for the devices in `allow`.
    pub fn new(bind: SocketAddr, allow: AccessList) -> Self {
        Self {
            bind,
            tls: None,
            captive_portal: None,
            allow,
        }
    }

    /// Serve HTTPS with the certificate chain and key in these PEM files.
    pub fn with_tls(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.tls = Some(TlsFiles {
            cert: cert.into(),
            key: key.into(),
        });
        self
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(
        "the access list is empty, so no device could use this relay; allow your devices (`cairn peers` on a member lists their ids) with --allow DEVICE_ID or in {}, or pass --allow-anyone to run an open relay on purpose",
        .file.as_ref().map_or("an --allow-file".to_string(), |f| f.display().to_string())
    )]
    EmptyAccessList { file: Option<PathBuf> },
    #[error(
        "--allow-anyone makes an open relay, so it cannot be combined with --allow or --allow-file; pick one"
    )]
    AnyoneWithList,
    #[error(
        "cannot read the allow file {}: {source} (create it with one device id per line, as `cairn peers` prints them)",
        .path.display()
    )]
    AllowFileRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{}:{line}: {reason} (expected one device id per line: 64 hex characters as `cairn peers` prints them; `#` starts a comment)",
        .path.display()
    )]
    AllowFileLine {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{0} is not a valid ed25519 public key, so it cannot be a device id")]
    BadDeviceId(DeviceId),
    #[error("cannot use the TLS {what} {}: {reason}", .path.display())]
    Tls {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error(
        "cannot listen on {addr}: {reason} (is the address this machine's and the port free? ports below 1024 need root or CAP_NET_BIND_SERVICE)"
    )]
    Bind { addr: SocketAddr, reason: String },
    #[error("the relay stopped with an error: {0}")]
    Stopped(String),
    #[error("relay internal error: {0}")]
    Internal(String),
}

/// A running relay. Dropping it stops the relay abruptly; prefer [`RelayServer::shutdown`].
#[derive(Debug)]
pub struct RelayServer {
    server: Server,
    url: RelayUrl,
    addr: SocketAddr,
    gate: Arc<Gate>,
    watcher: AbortOnDrop,
}

/// The allow-file watcher task, stopped with the server (or when the server is dropped).
#[derive(Debug)]
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Counters of a running relay (since it started).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayStats {
    /// Client connections admitted.
    pub accepts: u64,
    /// Client connections that ended.
    pub disconnects: u64,
    /// Client connections refused by the access list.
    pub denied: u64,
    /// Bytes of relayed packets received from clients.
    pub bytes_recv: u64,
    /// Bytes of relayed packets sent to clients.
    pub bytes_sent: u64,
}

impl RelayServer {
    /// Checks the options (access list, certificate files), binds and starts serving.
    pub async fn spawn(opts: RelayOptions) -> Result<Self, RelayError> {
        let gate = Arc::new(Gate::new(&opts.allow)?);
        let mut relay_cfg = relay::RelayConfig::new(opts.bind);
        relay_cfg.access = Arc::new(GateAccess(gate.clone()));
        if let Some(files) = &opts.tls {
            let server_config = tls_server_config(files).await?;
            relay_cfg.http_bind_addr = opts
                .captive_portal
                .unwrap_or(SocketAddr::new(opts.bind.ip(), 0));
            relay_cfg.tls = Some(relay::TlsConfig::new(
                opts.bind,
                CertConfig::Manual { server_config },
            ));
        }
        let mut cfg = ServerConfig::default();
        cfg.relay = Some(relay_cfg);
        let server = Server::spawn(cfg).await.map_err(|e| RelayError::Bind {
            addr: opts.bind,
            reason: error_chain(&e),
        })?;
        let (scheme, addr) = match (&opts.tls, server.https_addr(), server.http_addr()) {
            (Some(_), Some(addr), _) => ("https", addr),
            (None, _, Some(addr)) => ("http", addr),
            _ => {
                return Err(RelayError::Internal(
                    "the relay server reports no listening address".into(),
                ));
            }
        };
        let url: RelayUrl = format!("{scheme}://{addr}/")
            .parse()
            .map_err(|e| RelayError::Internal(format!("relay url for {addr}: {e}")))?;
        let clients = server
            .relay_service()
            .ok_or_else(|| RelayError::Internal("the relay service did not start".into()))?
            .clients()
            .clone();
        let watcher = AbortOnDrop(tokio::spawn(watch(
            gate.clone(),
            clients,
            opts.allow.poll_interval,
        )));
        Ok(Self {
            server,
            url,
            addr,
            gate,
            watcher,
        })
    }

    /// The URL members put in their configuration: `http://ADDR/` or `https://ADDR/`. With
    /// a wildcard bind (`0.0.0.0`) members use the machine's public name or address instead.
    pub fn url(&self) -> RelayUrl {
        self.url.clone()
    }

    /// The address the relay listens on (the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// With TLS, the address of the plain-HTTP captive-portal listener.
    pub fn captive_portal_addr(&self) -> Option<SocketAddr> {
        self.server.https_addr().and(self.server.http_addr())
    }

    /// Whether every endpoint may use the relay (`--allow-anyone`).
    pub fn is_open(&self) -> bool {
        self.gate.is_anyone()
    }

    /// The devices allowed right now (empty for an open relay).
    pub fn allowed_devices(&self) -> Vec<DeviceId> {
        self.gate.allowed_devices()
    }

    /// How many distinct endpoints are connected right now.
    pub fn connected_clients(&self) -> usize {
        self.gate.connected_clients()
    }

    pub fn stats(&self) -> RelayStats {
        let m = &self.server.metrics().server;
        RelayStats {
            accepts: m.accepts.get(),
            disconnects: m.disconnects.get(),
            denied: self.gate.denied(),
            bytes_recv: m.bytes_recv.get(),
            bytes_sent: m.bytes_sent.get(),
        }
    }

    /// All of iroh-relay's counters.
    pub fn metrics(&self) -> &RelayMetrics {
        self.server.metrics()
    }

    /// Re-reads the allow file now (e.g. on SIGHUP) instead of waiting for the next poll,
    /// and disconnects devices that are no longer allowed. On error the previous list
    /// stays in force.
    pub async fn reload_access_list(&self) -> Result<AccessReport, RelayError> {
        let clients = self.clients()?;
        self.gate.reload(|id| clients.disconnect(id, None)).await
    }

    /// Waits until the relay stops by itself (an internal failure); normally never returns.
    pub async fn stopped(&mut self) -> RelayError {
        match self.server.join().await {
            Ok(Ok(())) => RelayError::Stopped("the server tasks ended".into()),
            Ok(Err(e)) => RelayError::Stopped(error_chain(&e)),
            Err(e) => RelayError::Stopped(e.to_string()),
        }
    }

    /// Stops accepting, closes every client connection and waits for the server tasks.
    pub async fn shutdown(self) -> Result<(), RelayError> {
        drop(self.watcher);
        self.server
            .shutdown()
            .await
            .map_err(|e| RelayError::Stopped(error_chain(&e)))
    }

    fn clients(&self) -> Result<iroh_relay::server::clients::Clients, RelayError> {
        Ok(self
            .server
            .relay_service()
            .ok_or_else(|| RelayError::Internal("the relay service is not running".into()))?
            .clients()
            .clone())
    }
}

/// Polls the allow file's mtime and size; on a change, reloads it. Every tick also
/// disconnects clients that are no longer allowed (catching one admitted just as it was
/// removed).
async fn watch(gate: Arc<Gate>, clients: iroh_relay::server::clients::Clients, interval: Duration) {
    if gate.is_anyone() || !gate.has_file() {
        return;
    }
    let mut tick = tokio::time::interval(interval.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if gate.file_changed() {
            match gate.reload(|id| clients.disconnect(id, None)).await {
                Ok(r) => tracing::info!(
                    allowed = r.allowed,
                    added = r.added.len(),
                    removed = r.removed.len(),
                    disconnected = r.disconnected,
                    "allow file re-read"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "allow file not applied; the previous access list stays in force")
                }
            }
        } else {
            gate.sweep(|id| clients.disconnect(id, None));
        }
    }
}

/// The rustls config for the relay's HTTPS listener: ring, no client auth, and a resolver
/// that re-reads the PEM files every [`CERT_RELOAD_INTERVAL`]. The files are parsed and
/// checked here first, so a wrong path or a key that does not match the certificate fails
/// at start with a clear message.
async fn tls_server_config(files: &TlsFiles) -> Result<rustls::ServerConfig, RelayError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = read_certs(&files.cert)?;
    let key = read_key(&files.key)?;
    let builder = || {
        rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| RelayError::Internal(format!("TLS protocol versions: {e}")))
    };
    builder()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| RelayError::Tls {
            what: "certificate and key",
            path: files.cert.clone(),
            reason: format!(
                "{e} (does {} hold the private key of this certificate?)",
                files.key.display()
            ),
        })?;
    let resolver = relay::reloading_resolver(
        &provider,
        files.cert.clone(),
        files.key.clone(),
        CERT_RELOAD_INTERVAL,
    )
    .await
    .map_err(|e| RelayError::Tls {
        what: "certificate",
        path: files.cert.clone(),
        reason: error_chain(&e),
    })?;
    Ok(builder()?
        .with_no_client_auth()
        .with_cert_resolver(resolver))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, RelayError> {
    let err = |reason: String| RelayError::Tls {
        what: "certificate",
        path: path.to_path_buf(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err(
            "no PEM certificate in it (expected -----BEGIN CERTIFICATE-----, e.g. certbot's fullchain.pem)".into(),
        ));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, RelayError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| RelayError::Tls {
        what: "private key",
        path: path.to_path_buf(),
        reason: format!("{e} (expected a PEM private key, e.g. certbot's privkey.pem)"),
    })
}

/// An error and its sources on one line.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        let msg = src.to_string();
        if !s.contains(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        cur = src.source();
    }
    s
}
