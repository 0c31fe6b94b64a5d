//! The publish loop: concurrent producers on one device converge to the union of their
//! changes, losers retry, and giving up is bounded and leaves a valid registry.

mod common;

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

use cairn_registry::{
    DeviceKey, Outcome, Payload, PublishError, PublishPolicy, Published, Registry, RegistryEntry,
    RegistryError, Revision, VaultId, publish,
};
use common::{dump, entry, member, set_id, vault};

/// "Snapshot store" shared by all producers: header id → the set of items it holds.
type Snapshots = Arc<Mutex<HashMap<Payload, BTreeSet<String>>>>;

/// make_payload for the set model: merge `item` onto the head's set, store, return its id.
fn add_item(
    snapshots: &Snapshots,
    item: String,
) -> impl FnMut(Option<&RegistryEntry>) -> Result<Payload, String> + '_ {
    move |head| {
        let mut map = snapshots.lock().unwrap();
        let mut set = match head {
            None => BTreeSet::new(),
            Some(h) => map
                .get(&h.payload)
                .cloned()
                .ok_or_else(|| format!("head {} names an unknown snapshot", h.payload))?,
        };
        set.insert(item.clone());
        let id = set_id(&set);
        map.insert(id, set);
        Ok(id)
    }
}

fn parallel_publishers(threads: usize, per_thread: usize) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.db");
    let setup = Registry::open(&path).unwrap();
    let v = vault();
    let key = member(&setup, &v);
    let snapshots: Snapshots = Arc::default();
    let barrier = Barrier::new(threads);
    let policy = PublishPolicy::default();

    let results: Vec<Vec<Published>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (path, key, snapshots, barrier, policy) =
                    (&path, &key, &snapshots, &barrier, &policy);
                s.spawn(move || {
                    let reg = Registry::open(path).unwrap();
                    barrier.wait();
                    (0..per_thread)
                        .map(|i| {
                            publish(
                                &reg,
                                key,
                                v,
                                policy,
                                add_item(snapshots, format!("t{t}-{i}")),
                            )
                            .unwrap_or_else(|e| panic!("publisher {t} #{i}: {e}"))
                        })
                        .collect()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });

    let total = (threads * per_thread) as u64;
    let head = setup.get(&v, &key.device_id()).unwrap().unwrap();
    head.verify().unwrap();
    assert_eq!(
        head.revision,
        Revision(total),
        "one revision per successful publish"
    );
    let map = snapshots.lock().unwrap();
    let expected: BTreeSet<String> = (0..threads)
        .flat_map(|t| (0..per_thread).map(move |i| format!("t{t}-{i}")))
        .collect();
    assert_eq!(
        map[&head.payload], expected,
        "final head lost someone's item"
    );

    // Every successful publish got its own revision, and the history only ever grew: each
    // revision's set contains the previous one plus exactly one new item.
    let mut revisions: Vec<u64> = results
        .iter()
        .flatten()
        .map(|p| p.entry.revision.0)
        .collect();
    revisions.sort_unstable();
    assert_eq!(revisions, (1..=total).collect::<Vec<_>>());
    let log = setup.log(&v, &key.device_id()).unwrap();
    assert_eq!(log.len() as u64, total);
    let mut prev: BTreeSet<String> = BTreeSet::new();
    for (rev, payload) in log.iter().rev() {
        let set = &map[payload];
        assert!(set.is_superset(&prev), "revision {rev} dropped items");
        assert_eq!(set.len(), prev.len() + 1, "revision {rev}");
        prev = set.clone();
    }
    let attempts: u32 = results.iter().flatten().map(|p| p.attempts).sum();
    let worst = results
        .iter()
        .flatten()
        .map(|p| p.attempts)
        .max()
        .unwrap_or(0);
    eprintln!("{total} publishes took {attempts} attempts (worst single publish: {worst})");
    if total >= 100 {
        // Otherwise the retry path this test is about never ran.
        assert!(attempts > total as u32, "no publisher ever lost a race");
    }
    // Each publisher's own items are all in its own returned entries' snapshots.
    for (t, published) in results.iter().enumerate() {
        for (i, p) in published.iter().enumerate() {
            assert!(map[&p.entry.payload].contains(&format!("t{t}-{i}")));
            assert!(p.attempts >= 1 && p.attempts <= policy.max_attempts);
        }
    }
}

#[test]
fn ten_parallel_publishers_converge_to_the_union() {
    parallel_publishers(10, 1);
}

#[test]
fn ten_parallel_publishers_twenty_times_each_converge_to_the_union() {
    parallel_publishers(10, 20);
}

#[test]
fn sequential_publishes_count_up_from_one() {
    let reg = Registry::open_in_memory().unwrap();
    let v = vault();
    let key = member(&reg, &v);
    let snapshots: Snapshots = Arc::default();
    for i in 1..=5u64 {
        let p = publish(
            &reg,
            &key,
            v,
            &PublishPolicy::default(),
            add_item(&snapshots, format!("{i}")),
        )
        .unwrap();
        assert_eq!((p.entry.revision, p.attempts), (Revision(i), 1));
        assert_eq!(reg.get(&v, &key.device_id()).unwrap(), Some(p.entry));
    }
}

thread_local! {
    static SLEPT: RefCell<Vec<Duration>> = const { RefCell::new(Vec::new()) };
}

fn record_sleep(d: Duration) {
    SLEPT.with(|s| s.borrow_mut().push(d));
}

fn take_sleeps() -> Vec<Duration> {
    SLEPT.with(|s| std::mem::take(&mut *s.borrow_mut()))
}

/// A producer that always loses: inside its callback another handle publishes the very
/// revision it is about to claim (alternating: same revision, and two revisions ahead).
fn always_losing(
    policy: &PublishPolicy,
) -> (
    Result<Published, PublishError<String>>,
    u32,
    Registry,
    VaultId,
    DeviceKey,
    tempfile::TempDir,
) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.db");
    let reg = Registry::open(&path).unwrap();
    let v = vault();
    let key = member(&reg, &v);
    let rival = Registry::open(&path).unwrap();
    let mut calls = 0u32;
    let result = publish(&reg, &key, v, policy, |head| {
        calls += 1;
        let next = head.map_or(1, |h| h.revision.0 + 1);
        let bump = if calls.is_multiple_of(2) { 2 } else { 1 };
        for rev in next..next + bump {
            rival.put(&v, &entry(&key, v, rev, 200)).unwrap();
        }
        Ok::<_, String>(Payload([calls as u8; 32]))
    });
    (result, calls, reg, v, key, dir)
}

#[test]
fn a_producer_that_always_loses_gives_up_after_max_attempts() {
    let policy = PublishPolicy {
        max_attempts: 6,
        sleep: record_sleep,
        jitter_seed: Some(7),
        ..PublishPolicy::default()
    };
    take_sleeps();
    let (result, calls, reg, v, key, _dir) = always_losing(&policy);
    let err = result.unwrap_err();
    assert!(
        matches!(err, PublishError::Exhausted { attempts: 6, vault } if vault == v),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains("6 attempts") && msg.contains("safe"), "{msg}");
    assert_eq!(calls, 6);

    // Backed off between attempts, never after the last, each wait within its ceiling.
    let sleeps = take_sleeps();
    assert_eq!(sleeps.len(), 5);
    for (i, d) in sleeps.iter().enumerate() {
        assert!(
            *d <= policy.backoff_ceiling(i as u32 + 1),
            "sleep {i}: {d:?}"
        );
    }

    // The registry holds only the rival's entries: valid, contiguous, signed.
    let head = reg.get(&v, &key.device_id()).unwrap().unwrap();
    head.verify().unwrap();
    assert_eq!(head.payload, Payload([200; 32]));
    let log = reg.log(&v, &key.device_id()).unwrap();
    assert_eq!(log.len() as u64, head.revision.0);
    assert!(log.iter().all(|(_, p)| *p == Payload([200; 32])));
    assert_eq!(head.revision, Revision(9), "1+2+1+2+1+2 rival revisions");
}

#[test]
fn jitter_is_reproducible_with_a_seed() {
    let policy = PublishPolicy {
        max_attempts: 8,
        sleep: record_sleep,
        jitter_seed: Some(42),
        ..PublishPolicy::default()
    };
    take_sleeps();
    let _ = always_losing(&policy);
    let first = take_sleeps();
    let _ = always_losing(&policy);
    let second = take_sleeps();
    assert_eq!(first.len(), 7);
    assert_eq!(first, second);
    // Full jitter spreads waits out rather than using the ceiling every time.
    assert!(
        first
            .iter()
            .enumerate()
            .any(|(i, d)| *d < policy.backoff_ceiling(i as u32 + 1))
    );
}

#[test]
fn payload_error_stops_at_once_and_publishes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.db");
    let reg = Registry::open(&path).unwrap();
    let v = vault();
    let key = member(&reg, &v);
    reg.put(&v, &entry(&key, v, 1, 1)).unwrap();
    let before = dump(&path);
    let mut calls = 0;
    let err = publish(&reg, &key, v, &PublishPolicy::default(), |head| {
        calls += 1;
        assert_eq!(head.map(|h| h.revision), Some(Revision(1)));
        Err::<Payload, _>("disk full")
    })
    .unwrap_err();
    assert!(matches!(err, PublishError::Payload("disk full")));
    assert!(err.to_string().contains("disk full"));
    assert_eq!(calls, 1);
    assert_eq!(before, dump(&path));
}

#[test]
fn non_member_publisher_fails_without_retrying() {
    let reg = Registry::open_in_memory().unwrap();
    let v = vault();
    let outsider = DeviceKey::generate();
    let mut calls = 0;
    let err = publish(&reg, &outsider, v, &PublishPolicy::default(), |_| {
        calls += 1;
        Ok::<_, String>(Payload([1; 32]))
    })
    .unwrap_err();
    assert!(
        matches!(err, PublishError::Registry(RegistryError::NotMember { .. })),
        "{err:?}"
    );
    assert_eq!(calls, 1);
    assert!(reg.list(&v).unwrap().is_empty());
}

#[test]
fn identical_payload_from_a_concurrent_producer_counts_as_published() {
    // The rival publishes exactly what we are about to: our put is Unchanged, and that is
    // success because the registry holds our state.
    let reg = Registry::open_in_memory().unwrap();
    let v = vault();
    let key = member(&reg, &v);
    let p = publish(&reg, &key, v, &PublishPolicy::default(), |_| {
        let same = entry(&key, v, 1, 42);
        assert_eq!(
            reg.put(&v, &same).unwrap(),
            Outcome::Accepted { previous: None }
        );
        Ok::<_, String>(Payload([42; 32]))
    })
    .unwrap();
    assert_eq!((p.entry.revision, p.attempts), (Revision(1), 1));
    assert_eq!(reg.log(&v, &key.device_id()).unwrap().len(), 1);
}

#[test]
fn spent_revision_counter_is_a_clear_error() {
    let reg = Registry::open_in_memory().unwrap();
    let v = vault();
    let key = member(&reg, &v);
    reg.put(&v, &entry(&key, v, u64::MAX, 1)).unwrap();
    let err = publish(&reg, &key, v, &PublishPolicy::default(), |_| {
        Ok::<_, String>(Payload([2; 32]))
    })
    .unwrap_err();
    assert!(matches!(err, PublishError::RevisionExhausted { .. }));
}
