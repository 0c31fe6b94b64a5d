//! `cairn join`: becoming a member of an existing vault with a ticket from `cairn invite`.
//!
//! The new device makes its keys, proves the ticket's token to the inviter over an
//! authenticated connection (see `cairn_net::pairing`), receives the vault secret, and pulls
//! the signed member list before anything is written to disk as a vault: a failed join
//! leaves no half-made vault behind.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use cairn_crypto::{AgeIdentity, DeviceKey};
use cairn_net::{
    Members, NetConfig, PairError, PeerAddr, RegistryClient, RegistryProtocol, Ticket,
    bind_endpoint, endpoint_addr, endpoint_id_of, join,
};
use cairn_registry::Registry;

use super::net::NetSettings;
use crate::state::{VaultState, vault_dir};

pub fn join_vault(
    data_dir: &Path,
    name: &str,
    ticket_text: &str,
    settings: NetSettings,
) -> Result<VaultState> {
    let ticket: Ticket = ticket_text
        .trim()
        .parse()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    join_with(data_dir, name, &ticket, settings)
}

/// `cairn recover`: rebuilds this device's membership from the recovery phrase and one
/// reachable member, given as `DEVICE_ID@HOST:PORT` or `DEVICE_ID@RELAY_URL` (both shown by
/// `cairn peers` on that member). The phrase's recovery token stands in for an invitation,
/// and the member accepts it only inside a recovery window (`cairn allow-recovery` there).
pub fn recover_vault(
    data_dir: &Path,
    name: &str,
    phrase: &str,
    from: &str,
    settings: NetSettings,
) -> Result<VaultState> {
    let secret = cairn_crypto::EpochSecret::from_phrase(phrase.trim()).map_err(|e| {
        anyhow::anyhow!(
            "the recovery phrase is not valid ({e}); check the 24 words and their order"
        )
    })?;
    let (dev, addr) = from.split_once('@').ok_or_else(|| {
        anyhow::anyhow!(
            "--from must be DEVICE_ID@HOST:PORT or DEVICE_ID@RELAY_URL (see `cairn peers` on that member), got {from:?}"
        )
    })?;
    let inviter: cairn_crypto::DeviceId = dev
        .parse()
        .map_err(|e| anyhow::anyhow!("{dev:?} is not a device id: {e}"))?;
    let (addrs, relays) = if addr.starts_with("http://") || addr.starts_with("https://") {
        match addr.parse::<PeerAddr>() {
            Ok(PeerAddr::Relay(u)) => (Vec::new(), vec![u]),
            _ => bail!("{addr:?} is not a usable relay URL"),
        }
    } else {
        let addrs: Vec<std::net::SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(addr)
            .with_context(|| format!("cannot resolve {addr:?}; give HOST:PORT or a relay URL"))?
            .collect();
        (addrs, Vec::new())
    };
    let ticket = Ticket {
        inviter,
        addrs,
        relays,
        // The phrase of a key epoch after the first does not name the vault: learn it from
        // the member, whose confirmation proves it holds this phrase's epoch.
        vault: cairn_net::ANY_VAULT,
        token: secret.recovery_token(),
        // The member decides how long recovery stays open; this ticket never expires here.
        expires_at: u64::MAX,
    };
    join_with(data_dir, name, &ticket, settings).map_err(|e| {
        match e.downcast_ref::<PairError>() {
            Some(PairError::PairingClosed | PairError::RecoveryClosed) => anyhow::anyhow!(
                "the member refused the recovery phrase: no recovery window is open on it. On that member run `cairn allow-recovery --for 10m`, then retry here"
            ),
            Some(PairError::UnknownToken) => anyhow::anyhow!(
                "the member refused the recovery phrase: it is not the vault's current one. Phrases change when a device is removed or the keys are rotated; `cairn recovery-phrase` on a member prints the current one"
            ),
            _ => e,
        }
    })
}

fn join_with(
    data_dir: &Path,
    name: &str,
    ticket: &Ticket,
    settings: NetSettings,
) -> Result<VaultState> {
    let ticket = ticket.clone();
    let dir = vault_dir(data_dir, name);
    if dir.join("vault.secret").exists() {
        bail!(
            "a vault named {name:?} already exists on this device ({}); join into another one with `--vault NAME`",
            dir.display()
        );
    }
    if ticket.is_expired() {
        bail!("this ticket has expired; ask for a new one with `cairn invite` on a member device");
    }
    let device = DeviceKey::generate();
    let age = AgeIdentity::generate();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the network runtime")?;
    let (secret, members, roster) = rt.block_on(async {
        let endpoint = bind_endpoint(
            &device,
            NetConfig {
                bind: settings.bind,
                relays: settings.relays.clone(),
                direct: settings.direct,
            },
            Members::new([ticket.inviter]),
            None,
        )
        .await
        .context("starting the network endpoint")?;
        let outcome = pair_with(&endpoint, &ticket, &age).await;
        // Always close: a dropped endpoint logs an error of its own over ours.
        endpoint.close().await;
        outcome
    })?;

    let state = VaultState::create_with(data_dir, name, secret, device, age)?;
    let registry = Arc::new(
        Registry::open(state.dir.join("registry.sqlite"))
            .with_context(|| format!("opening the registry in {}", state.dir.display()))?,
    );
    let vault = state.secret.vault_id();
    // The inviter authenticated itself as the ticket's device and vouches for these members;
    // their signed records (in `roster`) are checked against this list.
    for m in &members {
        registry.add_member(&vault, &m.device)?;
    }
    registry.add_member(&vault, &state.device.device_id())?;
    let addrs: Vec<String> = ticket_addrs(&ticket)
        .iter()
        .map(|a| a.to_string())
        .collect();
    registry.set_addrs(&vault, &ticket.inviter, &addrs)?;
    let proto = RegistryProtocol::new(registry);
    proto.set_local(state.device.device_id(), Vec::new());
    rt.block_on(proto.absorb(vault, ticket.inviter, roster))
        .context("storing the member list")?;
    Ok(state)
}

/// Pairs with the inviter and fetches the signed member list.
async fn pair_with(
    endpoint: &iroh::Endpoint,
    ticket: &Ticket,
    age: &AgeIdentity,
) -> Result<(
    cairn_crypto::VaultSecret,
    Vec<cairn_net::MemberInfo>,
    cairn_net::RosterMessage,
)> {
    let result = join(endpoint, ticket, &age.recipient().to_string())
        .await
        .map_err(|e| anyhow::Error::new(e).context("joining failed"))?;
    if ticket.vault != cairn_net::ANY_VAULT && result.vault_secret.vault_id() != ticket.vault {
        bail!("the inviter sent the secret of another vault than the ticket names; refusing it");
    }
    let vault = result.vault_secret.vault_id();
    // The signed member list, with our own record that the inviter just signed.
    let addr = endpoint_addr(endpoint_id_of(&ticket.inviter)?, &ticket_addrs(ticket));
    let client = RegistryClient::connect(endpoint, addr)
        .await
        .context("connecting to the inviter's registry")?;
    // The inviter signs us into its member list right after pairing, asynchronously: until
    // then its registry refuses us, so retry for a while.
    let mut attempt = 0;
    let roster = loop {
        match client.exchange_roster(&vault, &Default::default()).await {
            Ok(r) => break r,
            Err(cairn_net::RegistryProtoError::Refused(why)) if attempt < 80 => {
                tracing::debug!(%why, "inviter has not admitted us yet");
                attempt += 1;
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
            Err(e) => {
                return Err(
                    anyhow::Error::new(e).context("fetching the member list from the inviter")
                );
            }
        }
    };
    Ok((result.vault_secret, result.members, roster))
}

/// Every way to reach the inviter a ticket names.
fn ticket_addrs(ticket: &Ticket) -> Vec<PeerAddr> {
    ticket
        .addrs
        .iter()
        .map(|a| PeerAddr::Direct(*a))
        .chain(ticket.relays.iter().map(|u| PeerAddr::Relay(u.clone())))
        .collect()
}
