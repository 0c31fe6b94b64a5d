//! The cairn network layer. It owns the iroh endpoint (one per daemon, whose secret key is the
//! device key, so the endpoint id *is* the [`DeviceId`]), the member allowlist enforced on
//! every incoming connection, pairing (`cairn/pair/1`: one-time tickets that hand a joiner the
//! vault secret and member list), the registry exchange protocol (`cairn/registry/1`: push,
//! fetch-all and subscribe for signed registry entries) and blob replication over iroh-blobs
//! into the local [`cairn_store::BlobStore`]. It does not own the sync engine, merging,
//! snapshot formats or FUSE: it moves verified bytes and signed entries between members and
//! leaves every decision about their meaning to its callers.
//!
//! Everything here can run fully offline: [`NetConfig::loopback`] disables relays, address
//! lookup, net-report probes and port mapping and binds to `127.0.0.1` only, and the tests use
//! nothing else.

pub mod addr;
mod blobs;
pub mod endpoint;
pub mod limiter;
pub mod pairing;
pub mod registry_proto;
mod wire;

pub use addr::{AddrError, PeerAddr, endpoint_addr, parse_addrs, peer_addrs};
pub use blobs::{BlobError, BlobService};
pub use endpoint::{
    EndpointError, Members, NOT_MEMBER_CODE, NetConfig, PAIRING_CLOSED_CODE, Relays, bind_endpoint,
    device_id_of, endpoint_id_of,
};
pub use pairing::{
    ANY_VAULT, Invitation, JoinResult, Joined, MAX_INVITATION_TTL, MAX_PENDING_INVITATIONS,
    MAX_RECOVERY_WINDOW, MAX_REMEMBERED_TOKENS, MemberInfo, PAIR_ALPN, PairError, Pairing,
    PairingEvent, PairingProtocol, Ticket, TicketError, WindowError, join, recovery_token,
};
pub use registry_proto::{
    PushResult, REGISTRY_ALPN, RegistryClient, RegistryProtoError, RegistryProtocol, RosterMessage,
    Subscription, SubscriptionEvent,
};

pub use cairn_crypto::DeviceId;
pub use iroh::{Endpoint, EndpointAddr, EndpointId, RelayUrl, protocol::Router};

/// Test-only global allocator that records the largest single allocation a thread makes while
/// measuring, so tests can prove that a forged length is never reserved up front.
#[cfg(test)]
pub(crate) mod test_alloc {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    struct Recording;

    thread_local! {
        // Const-initialised without a destructor: touching it from the allocator never
        // allocates itself.
        static MEASURING: Cell<bool> = const { Cell::new(false) };
        static LARGEST: Cell<usize> = const { Cell::new(0) };
    }

    fn record(size: usize) {
        if MEASURING.with(Cell::get) {
            LARGEST.with(|l| l.set(l.get().max(size)));
        }
    }

    unsafe impl GlobalAlloc for Recording {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            record(layout.size());
            // SAFETY: forwarded unchanged to the system allocator.
            unsafe { System.alloc(layout) }
        }
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            record(layout.size());
            // SAFETY: forwarded unchanged to the system allocator.
            unsafe { System.alloc_zeroed(layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            record(new_size);
            // SAFETY: forwarded unchanged to the system allocator.
            unsafe { System.realloc(ptr, layout, new_size) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: forwarded unchanged to the system allocator.
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    #[global_allocator]
    static GLOBAL: Recording = Recording;

    /// Runs `f` on this thread and returns its result with the size of the largest single
    /// allocation (or reallocation) it made on this thread.
    pub(crate) fn largest_allocation_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
        LARGEST.with(|l| l.set(0));
        MEASURING.with(|m| m.set(true));
        let out = f();
        MEASURING.with(|m| m.set(false));
        (out, LARGEST.with(Cell::get))
    }

    #[test]
    fn the_recorder_sees_a_large_reservation() {
        let (v, largest) = largest_allocation_during(|| Vec::<u8>::with_capacity(1 << 20));
        assert!(v.capacity() >= 1 << 20);
        assert!(largest >= 1 << 20, "{largest}");
    }
}

/// The budget and mutations of the decoder fuzz tests (every test named `fuzz_*`).
#[cfg(test)]
pub(crate) mod fuzz {
    pub(crate) use cairn_fuzzkit::{config, mutate};
}
