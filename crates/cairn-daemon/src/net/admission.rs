//! The member list and what follows from it: devices that paired through one of our
//! invitations are signed in, removals are signed and spread, and every change of the signed
//! roster (ours or one a peer sent) brings the allowlist, the roster handed to joiners, the
//! recipients of our next snapshots and the set of peer sessions in line with it.

use std::collections::HashSet;
use std::sync::Arc;

use anyhow::{Context, Result};
use cairn_crypto::DeviceId;
use cairn_net::PairingEvent;
use cairn_registry::MemberRecord;
use tokio::sync::broadcast::error::RecvError;

use super::{NetNode, roster_info, session};
use crate::open_vault::{now_ms, recipients};

/// Signs in the devices that paired with our invitations, for as long as the node runs.
pub(super) async fn pairing_events(node: Arc<NetNode>) {
    let mut rx = node.pairing.events();
    loop {
        tokio::select! {
            ev = rx.recv() => match ev {
                Ok(PairingEvent::Joined(j)) => {
                    let node2 = node.clone();
                    let _ = tokio::task::spawn_blocking(move || node2.admit(j.device, j.age_recipient)).await;
                }
                Ok(PairingEvent::Refused { device, error }) => {
                    tracing::warn!(device = %device.short(), %error, "refused a join attempt");
                }
                Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => return,
            },
            _ = node.stop_notify.notified() => return,
        }
    }
}

/// Follows roster changes that arrive from peers.
pub(super) async fn roster_events(node: Arc<NetNode>) {
    let mut rx = node.registry.roster_events();
    loop {
        tokio::select! {
            ev = rx.recv() => match ev {
                Ok(_) | Err(RecvError::Lagged(_)) => {
                    let node2 = node.clone();
                    let _ = tokio::task::spawn_blocking(move || node2.refresh_members()).await;
                }
                Err(RecvError::Closed) => return,
            },
            _ = node.stop_notify.notified() => return,
        }
    }
}

impl NetNode {
    /// Brings everything that depends on the member list in line with the registry: the
    /// allowlist, the roster handed to joiners, the recipients of our next snapshots, and one
    /// session per member.
    pub fn refresh_members(self: &Arc<Self>) {
        let vault = &self.publisher.vault;
        let members = match vault.registry.members(&self.vault) {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the member list");
                return;
            }
        };
        self.members.replace(members.iter().copied());
        // Key epochs travel with the roster: take up any a member started for us, stop
        // writing under any a removed device held, rotate if none is left.
        if let Err(e) = vault.settle_epochs() {
            tracing::error!(error = %format!("{e:#}"), "cannot bring the vault's key epochs up to date");
        }
        // Only the current epoch's recovery phrase admits anyone (inside a window).
        self.pairing
            .set_recovery_token(vault.keys.current().secret.recovery_token());
        if let Ok(info) = roster_info(vault) {
            self.pairing.set_roster(info);
        }
        let own = vault.engine().keys().identity.recipient();
        match recipients(&vault.registry, &self.vault, own, &vault.keys) {
            Ok(r) => {
                let mut engine = vault.engine();
                engine.set_history_identities(crate::open_vault::history_identities(&vault.keys));
                if engine.keys().recipients != r {
                    engine.set_recipients(r);
                    // Our current head was sealed to the old member list: a new member could
                    // not open it (and so not merge anything of ours until our next edit), a
                    // removed one still could. Re-seal the same state to the new list now.
                    if engine.head().is_some() {
                        match self.publisher.publish(&mut engine, now_ms()) {
                            Ok(r) => tracing::info!(
                                revision = r.revision.0,
                                "re-sealed the current snapshot to the new member list"
                            ),
                            Err(e) => {
                                tracing::warn!(error = %format!("{e:#}"), "cannot re-seal the current snapshot; the next flush will")
                            }
                        }
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot read member recipients"),
        }
        let wanted: HashSet<DeviceId> = members.into_iter().filter(|d| *d != self.me).collect();
        let mut peers = self.peers();
        peers.retain(|d, p| {
            if wanted.contains(d) {
                return true;
            }
            if let Some(t) = p.task.take() {
                t.abort();
            }
            p.blob.close_all(b"removed from the vault");
            tracing::info!(device = %d.short(), "no longer a member: session closed");
            false
        });
        for d in wanted {
            let p = peers.entry(d).or_default();
            if p.task.as_ref().is_none_or(|t| t.is_finished()) {
                let node = self.clone();
                p.task = Some(self.handle.spawn(session::peer_loop(node, d)));
            }
        }
        drop(peers);
        self.roster_changed.notify_waiters();
    }

    /// Signs `device` into the member list (after it joined through one of our invitations).
    fn admit(self: &Arc<Self>, device: DeviceId, recipient: String) {
        let vault = &self.publisher.vault;
        let rec = MemberRecord::add(&vault.key, self.vault, device, recipient.clone(), now_ms());
        match recipient.parse::<cairn_crypto::AgeRecipient>() {
            Ok(r) => {
                if let Err(e) = vault.share_epochs_with(device, &r) {
                    tracing::error!(device = %device.short(), error = %format!("{e:#}"), "cannot record the key epochs handed to the joined device");
                }
            }
            Err(e) => {
                tracing::warn!(device = %device.short(), error = %e, "joined device has an unusable age recipient")
            }
        }
        match vault.registry.merge_roster(&self.vault, &[rec]) {
            Ok(change) => {
                tracing::info!(device = %device.short(), added = change.added.len(), "device joined");
                self.refresh_members();
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot add the joined device to the member list")
            }
        }
    }

    /// Signs a removal of `device`, starts a new key epoch without it, and applies both;
    /// peers learn them at the next roster exchange (which this triggers at once). Returns
    /// the new epoch (its recovery phrase replaces the old one).
    pub fn remove_member(self: &Arc<Self>, device: DeviceId) -> Result<cairn_crypto::Epoch> {
        if device == self.me {
            anyhow::bail!(
                "refusing to remove this device itself; run `cairn remove-device` on another member"
            );
        }
        let vault = &self.publisher.vault;
        let rec = MemberRecord::remove(&vault.key, self.vault, device, now_ms());
        vault
            .registry
            .merge_roster(&self.vault, &[rec])
            .context("recording the removal")?;
        // Sealed to the members that remain: the removed device never gets this secret.
        let epoch = vault.rotate_keys().context(
            "the device is removed, but starting a new key epoch failed; run `cairn rotate-keys`",
        )?;
        self.refresh_members();
        Ok(epoch)
    }

    /// `cairn rotate-keys`: a new key epoch for the current members, spread at once.
    pub fn rotate_keys(self: &Arc<Self>) -> Result<cairn_crypto::Epoch> {
        let epoch = self.publisher.vault.rotate_keys()?;
        self.refresh_members();
        Ok(epoch)
    }
}
