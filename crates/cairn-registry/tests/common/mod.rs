#![allow(dead_code)] // each test binary uses a different subset

use std::path::Path;

use cairn_registry::{DeviceKey, Payload, Registry, RegistryEntry, Revision, VaultId};
use rusqlite::types::Value;

pub fn vault() -> VaultId {
    cairn_crypto::VaultSecret::generate().vault_id()
}

/// A key that is already a member of `vault` in `reg`.
pub fn member(reg: &Registry, vault: &VaultId) -> DeviceKey {
    let k = DeviceKey::generate();
    reg.add_member(vault, &k.device_id()).unwrap();
    k
}

pub fn entry(key: &DeviceKey, vault: VaultId, rev: u64, payload: u8) -> RegistryEntry {
    RegistryEntry::sign(key, vault, Revision(rev), Payload([payload; 32]))
}

/// Every row of every table, read through a separate connection: "state unchanged" means
/// this is byte-for-byte equal, timestamps included.
pub fn dump(path: &Path) -> Vec<(String, Vec<Vec<Value>>)> {
    let conn = rusqlite::Connection::open(path).unwrap();
    let mut tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    tables.retain(|t| t != "sqlite_sequence");
    tables
        .into_iter()
        .map(|t| {
            let mut stmt = conn
                .prepare(&format!("SELECT * FROM {t} ORDER BY 1, 2"))
                .unwrap();
            let n = stmt.column_count();
            let rows = stmt
                .query_map([], |r| (0..n).map(|i| r.get::<_, Value>(i)).collect())
                .unwrap()
                .collect::<Result<Vec<Vec<Value>>, _>>()
                .unwrap();
            (t, rows)
        })
        .collect()
}

/// Blake3 of a set, as a stand-in for "id of the snapshot header holding this tree".
pub fn set_id(set: &std::collections::BTreeSet<String>) -> Payload {
    let mut h = blake3::Hasher::new();
    for item in set {
        h.update(&(item.len() as u64).to_be_bytes());
        h.update(item.as_bytes());
    }
    Payload(*h.finalize().as_bytes())
}
