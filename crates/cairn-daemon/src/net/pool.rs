//! The blob connections kept per peer and lent to fetches.
//!
//! One QUIC connection is driven by a single task on each side (its packets are framed,
//! sealed and acknowledged one after another), which capped a transfer of many small chunks
//! at about half of what one large blob moves. So each peer has up to [`BLOB_CONNECTIONS`]
//! slots: a single on-demand read reuses an idle open connection (no handshake per read), a
//! new connection is dialed only while every open one is busy, and spare connections that
//! stay idle are closed so they do not exchange keep-alives forever. Which slot a fetch takes
//! and which ones close are pure functions, tested below.

use std::time::{Duration, Instant};

use cairn_crypto::DeviceId;
use iroh::endpoint::Connection;

use super::NetNode;

/// Blob connections kept per peer at most. With a connection per concurrent batch the work
/// spreads over the runtime's threads (1 GiB of ~80 KiB chunks on loopback,
/// `scripts/bench/sync.sh xfer`, medians: ~200 → ~380–410 MiB/s).
pub(super) const BLOB_CONNECTIONS: usize = 8;
/// A spare blob connection (all but the most recently used) idle this long is closed.
pub(super) const BLOB_IDLE: Duration = Duration::from_secs(60);
/// Dial timeout per attempt.
pub(super) const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// One peer's blob connection slots.
#[derive(Default)]
pub(super) struct BlobSlots {
    /// A closed or missing connection is redialed when needed.
    conns: [Option<Connection>; BLOB_CONNECTIONS],
    /// Fetches using (or dialing) each slot.
    busy: [usize; BLOB_CONNECTIONS],
    /// When each slot's last fetch ended (None while busy or never used).
    idle_since: [Option<Instant>; BLOB_CONNECTIONS],
}

impl BlobSlots {
    /// Which slots hold a connection that is still open.
    fn open(&self) -> Vec<bool> {
        self.conns
            .iter()
            .map(|c| c.as_ref().is_some_and(|c| c.close_reason().is_none()))
            .collect()
    }

    /// The connections held (open or not yet noticed closed).
    pub(super) fn open_conns(&self) -> impl Iterator<Item = &Connection> {
        self.conns.iter().flatten()
    }

    /// Closes every connection (the peer is no longer a member).
    pub(super) fn close_all(&mut self, reason: &[u8]) {
        for c in self.conns.iter_mut().filter_map(Option::take) {
            c.close(403u32.into(), reason);
        }
    }

    /// Closes the spare connections idle for `after`; how many, and the bytes they had sent
    /// and received.
    fn close_idle(&mut self, now: Instant, after: Duration) -> (usize, (u64, u64)) {
        let spare = idle_spare_slots(&self.open(), &self.busy, &self.idle_since, now, after);
        let mut bytes = (0, 0);
        for &i in &spare {
            if let Some(c) = self.conns[i].take() {
                let (s, r) = super::conn_bytes(&c);
                bytes = (bytes.0 + s, bytes.1 + r);
                c.close(0u32.into(), b"idle");
            }
        }
        (spare.len(), bytes)
    }
}

/// Which blob connection slot a fetch takes, given which slots hold an open connection and
/// how many fetches use (or dial) each: an idle open connection; else an idle slot to dial;
/// else the least busy open connection (or slot being dialed).
fn choose_blob_slot(open: &[bool], busy: &[usize]) -> usize {
    let least_busy = |want_open: bool| {
        (0..open.len())
            .filter(|&i| open[i] == want_open)
            .min_by_key(|&i| busy[i])
    };
    match (least_busy(true), least_busy(false)) {
        (Some(i), _) if busy[i] == 0 => i,
        (_, Some(i)) if busy[i] == 0 => i,
        (open, closed) => open.or(closed).unwrap_or(0),
    }
}

/// The slots whose open blob connection has had no fetch for `after`, except one: the most
/// recently used open connection stays for the next on-demand read.
fn idle_spare_slots(
    open: &[bool],
    busy: &[usize],
    idle_since: &[Option<Instant>],
    now: Instant,
    after: Duration,
) -> Vec<usize> {
    let open_slots: Vec<usize> = (0..open.len()).filter(|&i| open[i]).collect();
    let keep = open_slots
        .iter()
        .copied()
        .max_by_key(|&i| (busy[i] > 0, idle_since[i]));
    open_slots
        .into_iter()
        .filter(|&i| Some(i) != keep && busy[i] == 0)
        .filter(|&i| idle_since[i].is_some_and(|t| now.saturating_duration_since(t) >= after))
        .collect()
}

/// A blob connection lent to one fetch (see [`NetNode::blob_conn`]).
pub(super) struct BlobConn<'a> {
    conn: Connection,
    _lease: BlobLease<'a>,
}

impl std::ops::Deref for BlobConn<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        &self.conn
    }
}

/// Counts a fetch on one of a peer's blob connection slots while it lives.
struct BlobLease<'a> {
    node: &'a NetNode,
    device: DeviceId,
    slot: usize,
}

impl Drop for BlobLease<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.node.peers().get_mut(&self.device) {
            let s = &mut p.blob;
            s.busy[self.slot] = s.busy[self.slot].saturating_sub(1);
            if s.busy[self.slot] == 0 {
                s.idle_since[self.slot] = Some(Instant::now());
            }
        }
    }
}

impl NetNode {
    /// A blob connection to `d` for one fetch: the least busy open one if it is idle, else a
    /// new one while the peer has fewer than [`BLOB_CONNECTIONS`], else the least busy. So
    /// single reads share one connection (no handshake per read) and concurrent batches get
    /// one each.
    pub(super) async fn blob_conn(&self, d: DeviceId) -> Option<BlobConn<'_>> {
        let (slot, open) = {
            let mut peers = self.peers();
            let s = &mut peers.get_mut(&d)?.blob;
            let open = s.open();
            let slot = choose_blob_slot(&open, &s.busy);
            s.busy[slot] += 1;
            s.idle_since[slot] = None;
            (slot, s.conns[slot].clone().filter(|_| open[slot]))
        };
        let lease = BlobLease {
            node: self,
            device: d,
            slot,
        };
        let conn = match open {
            Some(c) => c,
            None => {
                let addr = self.addr_of(d)?;
                let conn = tokio::time::timeout(
                    DIAL_TIMEOUT,
                    self.endpoint.connect(addr, iroh_blobs::ALPN),
                )
                .await
                .ok()?
                .ok()?;
                if let Some(p) = self.peers().get_mut(&d)
                    && let Some(old) = p.blob.conns[slot].replace(conn.clone())
                {
                    let (s, r) = super::conn_bytes(&old);
                    p.closed_bytes = (p.closed_bytes.0 + s, p.closed_bytes.1 + r);
                }
                conn
            }
        };
        Some(BlobConn {
            conn,
            _lease: lease,
        })
    }

    /// Closes the peer's spare blob connections that have been idle for [`BLOB_IDLE`]: the
    /// extra connections a bulk transfer opened would otherwise exchange keep-alives forever.
    pub(super) fn close_idle_blob_conns(&self, d: DeviceId) {
        let closed = match self.peers().get_mut(&d) {
            Some(p) => {
                let (n, (s, r)) = p.blob.close_idle(Instant::now(), BLOB_IDLE);
                p.closed_bytes = (p.closed_bytes.0 + s, p.closed_bytes.1 + r);
                n
            }
            None => return,
        };
        if closed > 0 {
            tracing::debug!(peer = %d.short(), closed, "closed idle blob connections");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{choose_blob_slot, idle_spare_slots};

    #[test]
    fn idle_spare_connections_close_and_the_latest_stays() {
        let now = Instant::now();
        let ago = |s: u64| Some(now - Duration::from_secs(s));
        let minute = Duration::from_secs(60);
        // Three idle open connections past the limit: all but the most recently used close.
        assert_eq!(
            idle_spare_slots(
                &[true, true, true, false],
                &[0; 4],
                &[ago(300), ago(90), ago(200), None],
                now,
                minute
            ),
            vec![0, 2]
        );
        // Not idle long enough, or busy: kept.
        assert_eq!(
            idle_spare_slots(
                &[true, true, true],
                &[0, 1, 0],
                &[ago(30), None, ago(120)],
                now,
                minute
            ),
            vec![2]
        );
        // A single open connection is never closed for idleness.
        assert!(
            idle_spare_slots(&[false, true], &[0, 0], &[None, ago(999)], now, minute).is_empty()
        );
        // Closed slots are not reported.
        assert!(
            idle_spare_slots(&[false, false], &[0, 0], &[ago(999), ago(999)], now, minute)
                .is_empty()
        );
    }

    #[test]
    fn single_fetches_share_one_connection_and_concurrent_ones_spread() {
        // Nothing open yet: dial the first slot.
        assert_eq!(choose_blob_slot(&[false; 4], &[0; 4]), 0);
        // An idle open connection is reused, wherever it is.
        assert_eq!(choose_blob_slot(&[false, false, true, false], &[0; 4]), 2);
        // The only open one is busy: dial another slot rather than queue behind it.
        assert_eq!(
            choose_blob_slot(&[true, false, false, false], &[1, 0, 0, 0]),
            1
        );
        // A slot being dialed (not open yet, busy) is not dialed twice while another is free.
        assert_eq!(
            choose_blob_slot(&[true, false, false, false], &[1, 1, 0, 0]),
            2
        );
        // Every slot open and busy: the least busy one.
        assert_eq!(
            choose_blob_slot(&[true, true, true, true], &[3, 2, 1, 2]),
            2
        );
        // Every slot busy, some still dialing: the least busy open connection.
        assert_eq!(
            choose_blob_slot(&[true, false, true, false], &[2, 1, 1, 1]),
            2
        );
        // A connection closed with nothing on it is redialed in its slot.
        assert_eq!(choose_blob_slot(&[false, true], &[0, 1]), 0);
    }
}
