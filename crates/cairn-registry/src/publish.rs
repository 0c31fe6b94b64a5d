//! The publish loop: verify-and-retry, like a compare-and-swap loop.
//!
//! Several producers on one device (mount flush, CLI snapshot, restore) may publish at the
//! same time without a lock. Each attempt reads the device's head, lets the caller merge its
//! changes onto that head, signs the result at head + 1 and offers it. Exactly one producer
//! wins each revision; the others see `Stale`/`Conflict`, back off, and retry on top of the
//! winner's head, so the final head is the union of everyone's changes.

use std::time::Duration;

use cairn_crypto::{DeviceKey, VaultId};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::{Outcome, Payload, Registry, RegistryEntry, RegistryError, Revision};

/// How hard to try before giving up, and how to wait between attempts.
#[derive(Clone, Copy, Debug)]
pub struct PublishPolicy {
    /// Attempts (not retries) before giving up; at least one attempt is always made.
    pub max_attempts: u32,
    /// Upper bound of the first backoff; each retry doubles it up to `max_backoff`.
    pub base_backoff: Duration,
    pub max_backoff: Duration,
    /// How to wait. Tests swap in a recorder to run without real sleeps.
    pub sleep: fn(Duration),
    /// Seed for the backoff jitter; `None` seeds from the OS. Fixed seeds make retries
    /// reproducible in simulations.
    pub jitter_seed: Option<u64>,
}

impl Default for PublishPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 16,
            base_backoff: Duration::from_millis(2),
            max_backoff: Duration::from_millis(200),
            sleep: std::thread::sleep,
            jitter_seed: None,
        }
    }
}

impl PublishPolicy {
    /// Upper bound of the wait after failed attempt number `attempt` (1-based).
    pub fn backoff_ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32
            .checked_shl(attempt.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.base_backoff
            .checked_mul(factor)
            .unwrap_or(self.max_backoff)
            .min(self.max_backoff)
    }
}

/// A successful publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Published {
    /// The entry this call signed and the registry now holds (or held, if a later producer
    /// on this device has already built on top of it).
    pub entry: RegistryEntry,
    /// Attempts it took, counting the successful one.
    pub attempts: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError<E> {
    /// The caller's merge/snapshot step failed; nothing was published.
    #[error("building the snapshot to publish failed: {0}")]
    Payload(E),
    #[error(
        "could not publish to vault {vault} after {attempts} attempts: other writers on this device kept publishing first. \
         Your changes are safe in the local store and will be published on the next flush"
    )]
    Exhausted { vault: VaultId, attempts: u32 },
    #[error(
        "this device's revision counter for vault {vault} is at its maximum and cannot advance; the vault needs a new device key"
    )]
    RevisionExhausted { vault: VaultId },
    #[error(
        "registry for vault {vault} holds revision {found} with another payload right after accepting ours at {ours}: \
         the registry database was changed behind cairn's back"
    )]
    Inconsistent {
        vault: VaultId,
        ours: Revision,
        found: String,
    },
    #[error(transparent)]
    Registry(RegistryError),
}

/// Publish a new head for `key`'s device in `vault`, retrying when another producer wins.
///
/// `make_payload` receives the current head (None before the first publish), merges the
/// caller's changes onto the snapshot it names, stores the new header, and returns its id.
/// It runs once per attempt, so it must be safe to call again on a newer head; headers from
/// lost attempts are simply never referenced.
pub fn publish<F, E>(
    reg: &Registry,
    key: &DeviceKey,
    vault: VaultId,
    policy: &PublishPolicy,
    mut make_payload: F,
) -> Result<Published, PublishError<E>>
where
    F: FnMut(Option<&RegistryEntry>) -> Result<Payload, E>,
{
    let device = key.device_id();
    let mut rng = match policy.jitter_seed {
        Some(seed) => StdRng::seed_from_u64(seed),
        None => rand::make_rng(),
    };
    let max_attempts = policy.max_attempts.max(1);
    for attempt in 1..=max_attempts {
        let head = reg.get(&vault, &device).map_err(PublishError::Registry)?;
        let revision = Revision::next_after(head.as_ref().map(|h| h.revision))
            .ok_or(PublishError::RevisionExhausted { vault })?;
        let span = tracing::info_span!("publish_attempt", attempt, revision = revision.0);
        let _guard = span.enter();

        let payload = make_payload(head.as_ref()).map_err(PublishError::Payload)?;
        let entry = RegistryEntry::sign(key, vault, revision, payload);
        match reg.put(&vault, &entry) {
            // Unchanged: another producer published exactly this payload at this revision,
            // which already contains everything we wanted to publish.
            Ok(Outcome::Accepted { .. } | Outcome::Unchanged) => {
                confirm(reg, &entry).map_err(|e| match e {
                    Confirm::Registry(e) => PublishError::Registry(e),
                    Confirm::Mismatch(found) => PublishError::Inconsistent {
                        vault,
                        ours: revision,
                        found,
                    },
                })?;
                tracing::info!(attempts = attempt, "published");
                return Ok(Published {
                    entry,
                    attempts: attempt,
                });
            }
            Err(e) if e.is_lost_race() => {
                tracing::debug!(error = %e, "another writer won this revision");
                if attempt < max_attempts {
                    let ceiling = policy.backoff_ceiling(attempt);
                    let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
                    // Full jitter: spreading retries over the whole window is what breaks
                    // lock-step collisions between producers that lost together.
                    (policy.sleep)(Duration::from_nanos(rng.random_range(0..=nanos)));
                }
            }
            Err(e) => return Err(PublishError::Registry(e)),
        }
    }
    tracing::warn!(%vault, attempts = max_attempts, "publish gave up");
    Err(PublishError::Exhausted {
        vault,
        attempts: max_attempts,
    })
}

enum Confirm {
    Registry(RegistryError),
    Mismatch(String),
}

/// Read back after acceptance. A newer revision is fine: it was built by another producer
/// on this device from a head that already contained ours (the revision only moves forward,
/// and every producer merges onto the head it read).
fn confirm(reg: &Registry, ours: &RegistryEntry) -> Result<(), Confirm> {
    let stored = reg
        .get(&ours.vault, &ours.device)
        .map_err(Confirm::Registry)?;
    match stored {
        Some(s) if s.revision > ours.revision => Ok(()),
        Some(s) if s.revision == ours.revision && s.payload == ours.payload => Ok(()),
        Some(s) => Err(Confirm::Mismatch(format!(
            "{} (payload {})",
            s.revision, s.payload
        ))),
        None => Err(Confirm::Mismatch("nothing".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_ceiling_doubles_and_caps() {
        let p = PublishPolicy::default();
        assert_eq!(p.backoff_ceiling(1), Duration::from_millis(2));
        assert_eq!(p.backoff_ceiling(2), Duration::from_millis(4));
        assert_eq!(p.backoff_ceiling(7), Duration::from_millis(128));
        assert_eq!(p.backoff_ceiling(8), Duration::from_millis(200));
        assert_eq!(p.backoff_ceiling(40), Duration::from_millis(200));
        assert_eq!(p.backoff_ceiling(u32::MAX), Duration::from_millis(200));
    }
}
