//! Two members of one vault opened on local disk, with no network between them: what the
//! sync worker and replicator tests build on. Device A writes and publishes; what B learns of
//! it is handed over by the test (registry entries) or fetched through in-memory peers.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use cairn_crypto::{AgeIdentity, DeviceKey};
use cairn_registry::{MemberRecord, RegistryEntry};
use cairn_store::{BlobStore, ChunkSealer, WriteOptions, write_file_with};
use cairn_vault::{Attrs, Change, Content, VaultPath, content_from_manifest};

use super::fetch::testing::{Behaviour, MemPeers};
use super::fetch::{Fetcher, NetRemote};
use crate::open_vault::{OpenVault, recipients};
use crate::state::VaultState;
use crate::stores::Remote;

pub struct Pair {
    _dir: tempfile::TempDir,
    pub a: Arc<OpenVault>,
    pub b: Arc<OpenVault>,
    /// Runs B's in-memory peers (the engine calls into it from plain threads).
    pub rt: tokio::runtime::Runtime,
}

pub const NOW: u64 = 1_800_000_000_000;

impl Pair {
    /// A and B, each signed into the other's member list, B's headers readable by A and back.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let sa = VaultState::create(dir.path(), "a").unwrap();
        let sb = VaultState::create_with(
            dir.path(),
            "b",
            sa.secret.clone(),
            DeviceKey::generate(),
            AgeIdentity::generate(),
        )
        .unwrap();
        let a = Arc::new(OpenVault::open(&sa).unwrap());
        let vid = a.vault_id;
        let b_id = sb.device.device_id();
        let add_b = MemberRecord::add(&sa.device, vid, b_id, sb.age.recipient().to_string(), NOW);
        a.registry.merge_roster(&vid, &[add_b]).unwrap();
        // B arrives the way a joiner does: with the inviter's roster already in its registry.
        {
            let reg = cairn_registry::Registry::open(sb.dir.join("registry.sqlite")).unwrap();
            reg.add_member(&vid, &a.device_id).unwrap();
            reg.add_member(&vid, &b_id).unwrap();
            reg.merge_roster(&vid, &a.registry.roster(&vid).unwrap())
                .unwrap();
        }
        let b = Arc::new(OpenVault::open(&sb).unwrap());
        for (v, s) in [(&a, &sa), (&b, &sb)] {
            let r = recipients(&v.registry, &vid, s.age.recipient(), &v.keys).unwrap();
            v.engine().set_recipients(r);
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        Self {
            _dir: dir,
            a,
            b,
            rt,
        }
    }

    /// Writes `bytes` at `path` on A and publishes; A's new registry entry.
    pub fn write_on_a(&self, path: &str, bytes: &[u8], at: u64) -> RegistryEntry {
        let content = if bytes.len() <= 4096 {
            Content::Inline(bytes.to_vec())
        } else {
            let (_, key) = self.a.keys.current_key();
            let manifest =
                write_file_with(&self.a.blobs, &key, bytes, WriteOptions::default()).unwrap();
            let sealer = ChunkSealer::new(&key);
            content_from_manifest(self.a.stores.blobs.as_ref(), &sealer, &manifest)
                .unwrap()
                .0
        };
        let change = Change::Write {
            attrs: Attrs {
                mode: 0o644,
                mtime_ns: at as i64 * 1_000_000,
                xattrs: Default::default(),
            },
            size: bytes.len() as u64,
            content,
        };
        let mut engine = self.a.engine();
        engine
            .commit([(VaultPath::new(path).unwrap(), change)], at)
            .unwrap();
        crate::sink::publish(&self.a, &mut engine, at).unwrap();
        self.a
            .registry
            .get(&self.a.vault_id, &self.a.device_id)
            .unwrap()
            .unwrap()
    }

    /// Hands A's entry to B's registry, as a session would.
    pub fn deliver_to_b(&self, entry: &RegistryEntry) {
        self.b.registry.put(&self.b.vault_id, entry).unwrap();
    }

    /// A fetcher on B whose peers are in memory, each serving A's store as `behaviours` say.
    pub fn fetcher_on_b(&self, behaviours: &[Behaviour]) -> Arc<Fetcher<MemPeers>> {
        let mut peers = MemPeers::new(self.b.blobs.clone());
        for (i, b) in behaviours.iter().enumerate() {
            peers = peers.with(i as u8 + 1, self.a.blobs.clone(), *b);
        }
        Arc::new(Fetcher::new(
            peers,
            self.b.blobs.clone(),
            Arc::new(AtomicBool::new(false)),
        ))
    }

    /// Lets B's engine and stores read what they lack through `fetcher`.
    pub fn connect_b(&self, fetcher: &Arc<Fetcher<MemPeers>>) {
        self.b.remote_blobs.set_remote(Some(Arc::new(NetRemote {
            fetcher: fetcher.clone(),
            handle: self.rt.handle().clone(),
        }) as Arc<dyn Remote>));
    }

    /// B's copy of `path`, if its engine has the file and every byte of it is local.
    pub fn read_on_b(&self, path: &str) -> Option<Vec<u8>> {
        let engine = self.b.engine();
        let (_, entry) = engine.lookup(&VaultPath::new(path).unwrap()).unwrap()?;
        match &entry.content {
            Content::Inline(b) => Some(b.clone()),
            _ => {
                let m = cairn_vault::manifest_of(self.b.stores.blobs.as_ref(), &entry.content)
                    .ok()??;
                let local: &BlobStore = &self.b.blobs;
                let mut out = Vec::new();
                for c in m.chunks() {
                    let sealed = local.get(&c.id).ok()?;
                    out.extend(cairn_store::open_chunk(c.id, &c.key, &sealed).ok()?);
                }
                Some(out)
            }
        }
    }
}

/// Deterministic bytes that do not compress or repeat, so they cut into many chunks.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
