//! Where a device keeps its vault state, and how it is created and loaded.
//!
//! Layout (all under the data directory, `$XDG_DATA_HOME/cairn` by default):
//! ```text
//! vaults/<name>/vault.secret   32-byte vault secret          (0600)
//! vaults/<name>/device.key     32-byte ed25519 device secret (0600)
//! vaults/<name>/age.key        age X25519 identity            (0600)
//! vaults/<name>/vault.id       public vault id, hex (for humans and scripts)
//! vaults/<name>/epochs.secret  later key epochs: n × (number u32 BE | secret 32)  (0600)
//! ```
//! `vault.secret` is key epoch 0 and names the vault forever; `epochs.secret` holds every
//! later epoch this device received (see `cairn_crypto::KeyEpochs`), absent until the first
//! rotation.
//! One device key per vault (not per machine) so that membership in one vault reveals
//! nothing about membership in another.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use cairn_crypto::{
    AgeIdentity, DeviceKey, Epoch, EpochSecret, KeyEpochs, VaultSecret, read_secret_file,
    write_secret_file,
};

pub const EPOCHS_FILE: &str = "epochs.secret";
const EPOCH_RECORD_LEN: usize = 4 + 32;

/// The data directory: `$XDG_DATA_HOME/cairn`, else `~/.local/share/cairn`.
pub fn default_data_dir() -> Result<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(x).join("cairn"));
    }
    let home = std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .context("neither XDG_DATA_HOME nor HOME is set; pass --data-dir")?;
    Ok(PathBuf::from(home).join(".local/share/cairn"))
}

/// Loaded key material of one vault on this device.
pub struct VaultState {
    pub name: String,
    pub dir: PathBuf,
    pub secret: VaultSecret,
    pub device: DeviceKey,
    pub age: AgeIdentity,
    /// Key epochs after epoch 0 (which is `secret`).
    pub epochs: Vec<Epoch>,
}

pub fn vault_dir(data_dir: &Path, name: &str) -> PathBuf {
    data_dir.join("vaults").join(name)
}

fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && !name.starts_with('-');
    if !ok {
        bail!(
            "invalid vault name {name:?}: use 1-64 letters, digits, '-' or '_' (not starting with '-')"
        );
    }
    Ok(())
}

impl VaultState {
    /// Create a new vault. Refuses to overwrite an existing one: its secret is the only
    /// key to its data.
    pub fn create(data_dir: &Path, name: &str) -> Result<Self> {
        Self::create_with(
            data_dir,
            name,
            VaultSecret::generate(),
            DeviceKey::generate(),
            AgeIdentity::generate(),
        )
    }

    /// Stores the given keys as vault `name` (a joined vault: its secret came from a member).
    pub fn create_with(
        data_dir: &Path,
        name: &str,
        secret: VaultSecret,
        device: DeviceKey,
        age: AgeIdentity,
    ) -> Result<Self> {
        check_name(name)?;
        let dir = vault_dir(data_dir, name);
        if dir.join("vault.secret").exists() {
            bail!(
                "vault {name:?} already exists in {}; use another --vault name, or remove that directory if you really mean to destroy it",
                dir.display()
            );
        }
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        restrict_dir(&dir)?;
        let state = Self {
            name: name.to_string(),
            dir: dir.clone(),
            secret,
            device,
            age,
            epochs: Vec::new(),
        };
        // Device and age keys first: a vault.secret without them would look complete.
        write_secret_file(&dir.join("device.key"), &state.device.to_bytes())?;
        write_secret_file(
            &dir.join("age.key"),
            state.age.to_secret_string().as_bytes(),
        )?;
        fs::write(
            dir.join("vault.id"),
            format!("{}\n", state.secret.vault_id()),
        )
        .with_context(|| format!("writing {}", dir.join("vault.id").display()))?;
        write_secret_file(&dir.join("vault.secret"), state.secret.as_bytes())?;
        Ok(state)
    }

    /// Load an existing vault, with an error that says how to create one if it is missing.
    pub fn load(data_dir: &Path, name: &str) -> Result<Self> {
        check_name(name)?;
        let dir = vault_dir(data_dir, name);
        if !dir.join("vault.secret").exists() {
            bail!(
                "no vault named {name:?} in {}; create one with `cairn init` (or join one with `cairn join TICKET`)",
                data_dir.display()
            );
        }
        let secret = fixed::<32>(&dir.join("vault.secret"))?;
        let device = fixed::<32>(&dir.join("device.key"))?;
        let age_text = read_secret_file(&dir.join("age.key"))?;
        let age = String::from_utf8(age_text)
            .ok()
            .and_then(|s| s.parse::<AgeIdentity>().ok())
            .with_context(|| {
                format!(
                    "{} is damaged; restore it from a backup or rejoin the vault",
                    dir.join("age.key").display()
                )
            })?;
        let epochs = load_epochs(&dir)?;
        Ok(Self {
            name: name.to_string(),
            dir,
            secret: VaultSecret::from_bytes(secret),
            device: DeviceKey::from_bytes(device),
            age,
            epochs,
        })
    }

    /// Every key epoch this device holds, epoch 0 included.
    pub fn key_epochs(&self) -> KeyEpochs {
        let keys = KeyEpochs::new(&self.secret);
        for e in &self.epochs {
            keys.add(e.clone());
        }
        keys
    }
}

/// The later key epochs stored in `dir` (none if the file does not exist yet).
pub fn load_epochs(dir: &Path) -> Result<Vec<Epoch>> {
    let path = dir.join(EPOCHS_FILE);
    if !path.exists() {
        return Ok(Vec::new());
    }
    let bytes = read_secret_file(&path)?;
    if bytes.len() % EPOCH_RECORD_LEN != 0 {
        bail!(
            "{} has {} bytes, not a whole number of {EPOCH_RECORD_LEN}-byte epochs; it is damaged. Restore it from a backup, or recover the vault with the current recovery phrase",
            path.display(),
            bytes.len()
        );
    }
    Ok(bytes
        .chunks_exact(EPOCH_RECORD_LEN)
        .map(|c| Epoch {
            number: u32::from_be_bytes([c[0], c[1], c[2], c[3]]),
            secret: EpochSecret::from_bytes(c[4..].try_into().expect("32 bytes")),
        })
        .collect())
}

/// Replaces the stored later epochs with every epoch in `keys` but epoch 0 (atomically).
pub fn store_epochs(dir: &Path, keys: &KeyEpochs) -> Result<()> {
    let mut bytes = Vec::new();
    for e in keys.all().into_iter().filter(|e| e.number > 0) {
        bytes.extend_from_slice(&e.number.to_be_bytes());
        bytes.extend_from_slice(e.secret.as_bytes());
    }
    write_secret_file(&dir.join(EPOCHS_FILE), &bytes)?;
    Ok(())
}

fn fixed<const N: usize>(path: &Path) -> Result<[u8; N]> {
    let bytes = read_secret_file(path)?;
    let len = bytes.len();
    bytes.try_into().map_err(|_| {
        anyhow::anyhow!(
            "{} has {len} bytes, expected {N}; it is damaged. Restore it from a backup or recover the vault from its recovery phrase",
            path.display()
        )
    })
}

fn restrict_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("restricting permissions of {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_then_load_gives_same_identity() {
        let d = tempfile::tempdir().unwrap();
        let a = VaultState::create(d.path(), "default").unwrap();
        let b = VaultState::load(d.path(), "default").unwrap();
        assert_eq!(a.secret, b.secret);
        assert_eq!(a.device.device_id(), b.device.device_id());
        assert_eq!(a.age.recipient(), b.age.recipient());
    }

    #[test]
    fn create_refuses_to_overwrite_and_load_explains_missing() {
        let d = tempfile::tempdir().unwrap();
        VaultState::create(d.path(), "v").unwrap();
        let err = VaultState::create(d.path(), "v").err().unwrap().to_string();
        assert!(err.contains("already exists"), "{err}");
        let err = VaultState::load(d.path(), "nope")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("cairn init"), "{err}");
        assert!(VaultState::create(d.path(), "../evil").is_err());
    }

    #[test]
    fn damaged_key_file_is_reported() {
        let d = tempfile::tempdir().unwrap();
        let s = VaultState::create(d.path(), "v").unwrap();
        fs::write(s.dir.join("device.key"), b"short").unwrap();
        let err = VaultState::load(d.path(), "v").err().unwrap().to_string();
        assert!(err.contains("damaged"), "{err}");
    }
}
