//! Where a member can be reached: direct UDP socket addresses and the relays it is connected
//! to. Both kinds travel in tickets and in roster messages and are remembered per member, so
//! a device whose IP address changed is still found through its relay, and two devices that
//! can reach each other directly switch to the direct path (iroh's hole punching).
//!
//! In text (the registry's address book, roster messages) a direct address is `IP:PORT`
//! (`[IPv6]:PORT`) and a relay is its `http://` or `https://` URL.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use iroh::{EndpointAddr, EndpointId, RelayUrl};

/// The longest address text accepted (relay URLs are short; this bounds what a peer can make
/// us store and parse).
pub const MAX_ADDR_TEXT: usize = 255;

/// One way to reach a device.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PeerAddr {
    /// A UDP socket address, reachable directly.
    Direct(SocketAddr),
    /// A relay server the device is connected to.
    Relay(RelayUrl),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    #[error("address {0:?} is longer than {MAX_ADDR_TEXT} bytes")]
    TooLong(String),
    #[error("{0:?} is neither a socket address (IP:PORT) nor a relay URL (http:// or https://)")]
    Invalid(String),
}

impl FromStr for PeerAddr {
    type Err = AddrError;

    fn from_str(s: &str) -> Result<Self, AddrError> {
        if s.len() > MAX_ADDR_TEXT {
            return Err(AddrError::TooLong(s.chars().take(40).collect()));
        }
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(Self::Direct(a));
        }
        if (s.starts_with("http://") || s.starts_with("https://"))
            && let Ok(u) = s.parse::<RelayUrl>()
            && u.host_str().is_some()
        {
            return Ok(Self::Relay(u));
        }
        Err(AddrError::Invalid(s.to_string()))
    }
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Direct(a) => write!(f, "{a}"),
            Self::Relay(u) => write!(f, "{u}"),
        }
    }
}

impl PeerAddr {
    pub fn is_relay(&self) -> bool {
        matches!(self, Self::Relay(_))
    }
}

/// The addresses an endpoint address lists, direct ones first.
pub fn peer_addrs(addr: &EndpointAddr) -> Vec<PeerAddr> {
    addr.ip_addrs()
        .map(|a| PeerAddr::Direct(*a))
        .chain(addr.relay_urls().map(|u| PeerAddr::Relay(u.clone())))
        .collect()
}

/// What to dial for endpoint `id` known at `addrs`.
pub fn endpoint_addr(id: EndpointId, addrs: &[PeerAddr]) -> EndpointAddr {
    addrs.iter().fold(EndpointAddr::new(id), |e, a| match a {
        PeerAddr::Direct(s) => e.with_ip_addr(*s),
        PeerAddr::Relay(u) => e.with_relay_url(u.clone()),
    })
}

/// Parses an address book entry, dropping (and logging) what does not parse: a bad entry
/// must not make the others unusable.
pub fn parse_addrs<'a>(texts: impl IntoIterator<Item = &'a str>) -> Vec<PeerAddr> {
    texts
        .into_iter()
        .filter_map(|t| match t.parse() {
            Ok(a) => Some(a),
            Err(e) => {
                tracing::debug!(error = %e, "skipping an unusable address");
                None
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn both_kinds_round_trip_through_text() {
        for t in [
            "127.0.0.1:4000",
            "[::1]:9",
            "http://127.0.0.1:3340/",
            "https://relay.example.org/",
        ] {
            let a: PeerAddr = t.parse().unwrap();
            assert_eq!(a.to_string(), t);
            assert_eq!(a.to_string().parse::<PeerAddr>().unwrap(), a);
        }
        assert!(
            "https://relay.example.org/"
                .parse::<PeerAddr>()
                .unwrap()
                .is_relay()
        );
        for bad in ["", "localhost", "ftp://x/", "http://", "1.2.3.4"] {
            assert!(bad.parse::<PeerAddr>().is_err(), "{bad:?}");
        }
        let long = format!("https://{}.org/", "a".repeat(300));
        assert!(matches!(
            long.parse::<PeerAddr>(),
            Err(AddrError::TooLong(_))
        ));
    }

    proptest! {
        #[test]
        fn any_text_parses_or_errs_and_what_parses_round_trips(s in ".{0,300}") {
            if let Ok(a) = s.parse::<PeerAddr>() {
                let again: PeerAddr = a.to_string().parse().unwrap();
                prop_assert_eq!(again, a);
            }
        }
    }
}
