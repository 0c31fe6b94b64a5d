//! Device names: this device's own (signed into the registry, spread with the roster) and
//! how every device is labelled in output (`laptop (8be8d81b)`).

use std::collections::HashMap;

use anyhow::{Context, Result};
use cairn_crypto::DeviceId;
use cairn_registry::{DeviceName, NameRecord};

use crate::open_vault::{OpenVault, now_ms};

/// This machine's host name, as a device name (`None` if it has none usable).
pub fn hostname() -> Option<DeviceName> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that much.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    DeviceName::sanitized(&String::from_utf8_lossy(&buf[..end]))
}

/// Checks what the user typed, with a hint on what is allowed.
pub fn parse_name(text: &str) -> Result<DeviceName> {
    DeviceName::new(text).with_context(|| {
        format!(
            "{text:?} cannot be a device name: use 1 to {} bytes of text without control characters (e.g. laptop)",
            cairn_registry::names::MAX_NAME_LEN
        )
    })
}

/// Signs `name` as this device's name; members learn it at the next roster exchange.
pub fn set_own_name(vault: &OpenVault, name: DeviceName) -> Result<()> {
    // Later than whatever this device signed before, even if the clock went back.
    let held = own_record(vault)?.map_or(0, |r| r.at_ms + 1);
    let rec = NameRecord::sign(&vault.key, vault.vault_id, name, now_ms().max(held));
    vault
        .registry
        .merge_names(&vault.vault_id, &[rec])
        .context("storing the device name")?;
    Ok(())
}

fn own_record(vault: &OpenVault) -> Result<Option<NameRecord>> {
    Ok(vault
        .registry
        .names(&vault.vault_id)?
        .into_iter()
        .find(|r| r.device == vault.device_id))
}

/// Gives this device its host name if it has no name yet.
pub fn ensure_own_name(vault: &OpenVault) -> Result<()> {
    if own_record(vault)?.is_none()
        && let Some(name) = hostname()
    {
        set_own_name(vault, name)?;
    }
    Ok(())
}

/// Labels of devices for output.
#[derive(Default, Clone)]
pub struct Labels(HashMap<DeviceId, DeviceName>);

impl Labels {
    pub fn load(vault: &OpenVault) -> Self {
        Self(vault.registry.name_map(&vault.vault_id).unwrap_or_default())
    }

    pub fn name(&self, d: &DeviceId) -> Option<&DeviceName> {
        self.0.get(d)
    }

    /// `laptop (8be8d81b)`, or `8be8d81b` for a device without a name.
    pub fn label(&self, d: &DeviceId) -> String {
        cairn_registry::names::label(d, self.0.get(d))
    }
}

impl Labels {
    /// The member `text` names: its device name (case-insensitive) or an unambiguous prefix
    /// of its id.
    pub fn resolve(&self, vault: &OpenVault, text: &str) -> Result<DeviceId> {
        let members = vault.registry.members(&vault.vault_id)?;
        let by_name: Vec<&DeviceId> = members
            .iter()
            .filter(|d| {
                self.0
                    .get(d)
                    .is_some_and(|n| n.as_str().eq_ignore_ascii_case(text))
            })
            .collect();
        if let [one] = by_name.as_slice() {
            return Ok(**one);
        }
        let lower = text.to_ascii_lowercase();
        let by_id: Vec<&DeviceId> = members
            .iter()
            .filter(|d| !lower.is_empty() && d.to_string().starts_with(&lower))
            .collect();
        match (by_id.as_slice(), by_name.len()) {
            ([one], 0) => Ok(**one),
            ([], 0) => anyhow::bail!(
                "no member is named {text:?} or has an id starting with it; see `cairn peers`"
            ),
            _ => anyhow::bail!(
                "{text:?} matches several devices; give more characters of the id (see `cairn peers`)"
            ),
        }
    }
}
