//! `cairn/pair/1`: admitting a new device into a vault, only while a member has opened a
//! window for it.
//!
//! Two things admit a device:
//! - an [`Invitation`] (`cairn invite`): a random 32-byte token, valid once, until an expiry
//!   at most [`MAX_INVITATION_TTL`] away. Its [`Ticket`] (endpoint id + loopback/LAN socket
//!   addresses + relays + vault id + token + expiry) is printed as a copy-pasteable string.
//! - the vault's [`recovery_token`], derived from its secret (so from the recovery phrase) and
//!   never spent, accepted only while a **recovery window** is open on this device
//!   ([`Pairing::open_recovery`], `cairn allow-recovery`, at most [`MAX_RECOVERY_WINDOW`]).
//!   Outside a window a correct recovery proof is refused like any other (code 5): holding the
//!   secret of a vault is not enough to walk into it unnoticed.
//!
//! Non-members reach this ALPN only while this device has a pending, unexpired invitation or
//! an open recovery window ([`Pairing::is_open`]). Otherwise the allowlist closes their
//! connection right after the TLS handshake with [`PAIRING_CLOSED_CODE`] (the joiner reports
//! [`PairError::PairingClosed`]), as it closes every other ALPN to them with
//! [`crate::endpoint::NOT_MEMBER_CODE`].
//!
//! The joiner connects to the endpoint id in the ticket (TLS authenticates the inviter) and
//! sends, in one frame, `0x01 | mac(32) | age recipient (UTF-8)` where
//! `mac = blake3::keyed_hash(token, "cairn pair v1 join" | inviter id | joiner id)`: the token
//! itself never crosses the wire, and the proof is bound to both authenticated endpoint ids,
//! so it cannot be replayed on another connection. The inviter replies with one frame:
//! `0x00 | confirm(32) | vault secret(32) | n u16 | n × (device(32) | len u16 | recipient)`
//! where `confirm = keyed_hash(token, "cairn pair v1 accept" | inviter id | joiner id)`, or
//! `0x01 | code u8 | message` with codes
//! - 1 unknown token, 2 already used, 3 expired, 4 malformed request;
//! - 5 recovery not open: a correct recovery proof while no recovery window is open;
//! - 6 too many failed attempts: the joiner (or everybody, see [`crate::limiter`]) is backing
//!   off; the message says for how long.
//!
//! Joiners that predate codes 5 and 6 show them as a malformed reply carrying the inviter's
//! message. All of it travels inside the QUIC connection's encryption.
//!
//! What the inviter keeps is bounded: at most [`MAX_PENDING_INVITATIONS`] invitations are
//! pending (one more is an error), expired ones are dropped whenever the state is used, and
//! only the last [`MAX_REMEMBERED_TOKENS`] used or expired tokens are remembered, so that a
//! late joiner is told "already used" or "expired" rather than "unknown": forgetting one
//! changes that message, never whether anybody is admitted. Refused requests are rate-limited
//! per remote and for the whole device ([`crate::limiter`]). The expiry a ticket carries is
//! for the joiner only: the inviter keeps its own per token, so a forged `expires_at` (even
//! `u64::MAX`) is only ever compared, never added to.
//!
//! On success the inviter adds the joiner to the allowlist [`Members`] and to its roster, and
//! emits [`PairingEvent::Joined`] so the daemon can add it to the signed member list.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cairn_codec::Reader;
use cairn_crypto::{DeviceId, VaultId, VaultSecret};
use data_encoding::{BASE32_NOPAD, BASE32_NOPAD_NOCASE};
use iroh::endpoint::{ConnectError, ConnectingError, Connection, ConnectionError, VarInt};
use iroh::protocol::{AcceptError, ProtocolHandler};
use iroh::{Endpoint, EndpointAddr, RelayUrl};
use tokio::sync::broadcast;

use crate::addr::{MAX_ADDR_TEXT, PeerAddr};
use crate::endpoint::{Members, PAIRING_CLOSED_CODE, device_id_of, endpoint_id_of};
use crate::limiter::FailureLimiter;
use crate::wire::{FrameError, read_frame, write_frame};

pub const PAIR_ALPN: &[u8] = b"cairn/pair/1";
const TICKET_PREFIX: &str = "cairn1";
/// Version 2 added the inviter's relay URLs; version 1 tickets (direct addresses only) are
/// still read.
const TICKET_VERSION: u8 = 2;
const MAX_RECIPIENT: usize = 512;
const MAX_MEMBERS: usize = 4096;
const JOIN_CONTEXT: &[u8] = b"cairn pair v1 join";
const ACCEPT_CONTEXT: &[u8] = b"cairn pair v1 accept";

/// The longest an invitation may stay valid: long enough to hand a ticket over by post, short
/// enough that a forgotten one does not keep this device open for long.
pub const MAX_INVITATION_TTL: Duration = Duration::from_secs(7 * 24 * 60 * 60);
/// The longest a recovery window may stay open: recovery is done in one sitting, and while the
/// window is open anybody holding the vault secret (a removed device too) can join.
pub const MAX_RECOVERY_WINDOW: Duration = Duration::from_secs(24 * 60 * 60);
/// Invitations pending at once on one device. Each is a few dozen bytes; the cap is there so a
/// runaway script cannot grow the inviter without bound, and is far above what people use.
pub const MAX_PENDING_INVITATIONS: usize = 64;
/// Used or expired tokens remembered to tell a late joiner why its ticket is refused.
pub const MAX_REMEMBERED_TOKENS: usize = 1024;

/// A member as the roster knows it: its device id and the age recipient its snapshot
/// headers are sealed to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberInfo {
    pub device: DeviceId,
    pub age_recipient: String,
}

// ---------------------------------------------------------------------------------------
// Ticket

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum TicketError {
    #[error(
        "not a cairn ticket: it must start with \"{TICKET_PREFIX}\" (copy the whole line `cairn invite` printed)"
    )]
    Prefix,
    #[error("the ticket contains characters that are not base32: it was mangled while copying")]
    Encoding,
    #[error(
        "the ticket's checksum does not match: some characters were changed or lost while copying"
    )]
    Checksum,
    #[error(
        "ticket format version {0} is not supported by this cairn (only version {TICKET_VERSION}); upgrade cairn"
    )]
    Version(u8),
    #[error("the ticket is cut off: copy the whole line")]
    Truncated,
    #[error("the ticket has unexpected data after its end")]
    Trailing,
    #[error("the ticket's device id is not a valid public key")]
    BadId,
    #[error("the ticket names a relay that is not an http:// or https:// URL")]
    Relay,
    #[error("the ticket has an unknown address family {0}")]
    AddressFamily(u8),
}

/// What a joiner needs to reach the inviter and prove it was invited.
#[derive(Clone, PartialEq, Eq)]
pub struct Ticket {
    pub inviter: DeviceId,
    pub addrs: Vec<SocketAddr>,
    /// Relays the inviter is connected to: the way in when its direct addresses are not
    /// reachable from the joiner's network.
    pub relays: Vec<RelayUrl>,
    pub vault: VaultId,
    pub token: [u8; 32],
    /// Seconds since the Unix epoch.
    pub expires_at: u64,
}

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ticket")
            .field("inviter", &self.inviter)
            .field("addrs", &self.addrs)
            .field("relays", &self.relays)
            .field("vault", &self.vault)
            .field("token", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

impl Ticket {
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = vec![TICKET_VERSION];
        v.extend_from_slice(self.inviter.as_bytes());
        v.extend_from_slice(self.vault.as_bytes());
        v.extend_from_slice(&self.token);
        v.extend_from_slice(&self.expires_at.to_be_bytes());
        let addrs = &self.addrs[..self.addrs.len().min(255)];
        v.push(addrs.len() as u8);
        for a in addrs {
            match a.ip() {
                IpAddr::V4(ip) => {
                    v.push(4);
                    v.extend_from_slice(&ip.octets());
                }
                IpAddr::V6(ip) => {
                    v.push(6);
                    v.extend_from_slice(&ip.octets());
                }
            }
            v.extend_from_slice(&a.port().to_be_bytes());
        }
        let relays: Vec<String> = self
            .relays
            .iter()
            .map(|u| u.to_string())
            .filter(|t| t.len() <= MAX_ADDR_TEXT)
            .take(255)
            .collect();
        v.push(relays.len() as u8);
        for t in relays {
            v.push(t.len() as u8);
            v.extend_from_slice(t.as_bytes());
        }
        let sum = blake3::hash(&v);
        v.extend_from_slice(&sum.as_bytes()[..4]);
        v
    }

    pub fn from_bytes(b: &[u8]) -> Result<Self, TicketError> {
        if b.len() < 5 {
            return Err(TicketError::Truncated);
        }
        let (body, sum) = b.split_at(b.len() - 4);
        if blake3::hash(body).as_bytes()[..4] != *sum {
            return Err(TicketError::Checksum);
        }
        let mut r = Reader::new(body);
        let version = r.u8()?;
        if version != 1 && version != TICKET_VERSION {
            return Err(TicketError::Version(version));
        }
        let inviter = DeviceId(r.take_array()?);
        endpoint_id_of(&inviter).map_err(|_| TicketError::BadId)?;
        let vault = VaultId(r.take_array()?);
        let token = r.take_array()?;
        let expires_at = r.u64_be()?;
        let n = r.u8()?;
        // An address takes at least 7 bytes (family, IPv4, port).
        let mut addrs = Vec::with_capacity(usize::from(n).min(r.remaining() / 7));
        for _ in 0..n {
            let ip = match r.u8()? {
                4 => IpAddr::V4(Ipv4Addr::from(r.take_array::<4>()?)),
                6 => IpAddr::V6(Ipv6Addr::from(r.take_array::<16>()?)),
                f => return Err(TicketError::AddressFamily(f)),
            };
            let port = r.u16_be()?;
            addrs.push(SocketAddr::new(ip, port));
        }
        let mut relays = Vec::new();
        if version >= 2 {
            let n = r.u8()?;
            for _ in 0..n {
                let len = r.u8()? as usize;
                let text = std::str::from_utf8(r.take(len)?).map_err(|_| TicketError::Relay)?;
                match text.parse::<PeerAddr>() {
                    Ok(PeerAddr::Relay(u)) => relays.push(u),
                    _ => return Err(TicketError::Relay),
                }
            }
        }
        r.finish()?;
        Ok(Self {
            inviter,
            addrs,
            relays,
            vault,
            token,
            expires_at,
        })
    }

    pub fn is_expired(&self) -> bool {
        unix_now() >= self.expires_at
    }
}

impl From<cairn_codec::Error> for TicketError {
    fn from(e: cairn_codec::Error) -> Self {
        match e {
            cairn_codec::Error::TrailingBytes(_) => TicketError::Trailing,
            // The ticket has no varints, so running out of input is the only other failure.
            cairn_codec::Error::Truncated
            | cairn_codec::Error::VarintOverflow
            | cairn_codec::Error::NonCanonicalVarint => TicketError::Truncated,
        }
    }
}

impl fmt::Display for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{TICKET_PREFIX}{}",
            BASE32_NOPAD.encode(&self.to_bytes()).to_ascii_lowercase()
        )
    }
}

impl FromStr for Ticket {
    type Err = TicketError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let body = s.strip_prefix(TICKET_PREFIX).ok_or(TicketError::Prefix)?;
        let bytes = BASE32_NOPAD_NOCASE
            .decode(body.as_bytes())
            .map_err(|_| TicketError::Encoding)?;
        Self::from_bytes(&bytes)
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The vault a recovery ticket names when the rescuer cannot know it: a recovery phrase of a
/// key epoch after the first does not encode the vault id. The member's confirmation (keyed
/// with the recovery token, see the module docs) still proves it holds that phrase's epoch.
pub const ANY_VAULT: VaultId = VaultId([0; 16]);

/// The recovery token of key epoch 0, derived from the vault secret (so from the first
/// recovery phrase): `cairn recover` proves it to rejoin through a member without an
/// invitation, which the member accepts only inside a recovery window. After a key rotation
/// the member accepts only the current epoch's token instead (see
/// [`Pairing::set_recovery_token`] and `cairn_crypto::EpochSecret::recovery_token`, the same
/// derivation).
pub fn recovery_token(secret: &VaultSecret) -> [u8; 32] {
    secret.derive("cairn pairing recovery token v1")
}

fn proof(token: &[u8; 32], context: &[u8], inviter: &DeviceId, joiner: &DeviceId) -> blake3::Hash {
    let mut h = blake3::Hasher::new_keyed(token);
    h.update(context);
    h.update(inviter.as_bytes());
    h.update(joiner.as_bytes());
    h.finalize()
}

// ---------------------------------------------------------------------------------------
// Errors and events

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum PairError {
    #[error("invalid ticket: {0}")]
    Ticket(#[from] TicketError),
    #[error("this invitation expired; ask for a new one with `cairn invite`")]
    Expired,
    #[error(
        "this invitation was already used; each ticket works once, ask for a new one with `cairn invite`"
    )]
    AlreadyUsed,
    #[error(
        "the inviter does not know this invitation (wrong ticket, or the inviting daemon restarted); ask for a new one"
    )]
    UnknownToken,
    #[error("malformed pairing message: {0}")]
    Malformed(String),
    #[error(
        "the inviter refused the connection: {0} (the invitation may have expired or been used)"
    )]
    Refused(String),
    #[error(
        "cannot reach the inviter: {0} (is its cairn running and reachable at the ticket's address?)"
    )]
    Connect(String),
    #[error("the inviter could not prove it issued this ticket: refusing its vault secret")]
    BadConfirmation,
    /// The allowlist closed the connection: no invitation pending, no recovery window open.
    #[error(
        "the member is not accepting new devices right now: it has no pending invitation and no open recovery window (a ticket stops working once used, withdrawn or expired, or when its daemon restarts). To join, ask for a new ticket with `cairn invite` on a member; to recover, run `cairn allow-recovery` on the member first"
    )]
    PairingClosed,
    #[error(
        "the member has no recovery window open, so it refuses the recovery phrase: run `cairn allow-recovery` on that member, then retry"
    )]
    RecoveryClosed,
    /// Refused by the rate limit; the inviter's message says for how long.
    #[error("{0}")]
    TooManyAttempts(String),
}

impl PairError {
    /// The refusal code on the wire (see the module docs).
    fn code(&self) -> u8 {
        match self {
            PairError::UnknownToken => 1,
            PairError::AlreadyUsed => 2,
            PairError::Expired => 3,
            PairError::RecoveryClosed => 5,
            PairError::TooManyAttempts(_) => 6,
            _ => 4,
        }
    }

    fn from_code(code: u8, message: String) -> Self {
        match code {
            1 => PairError::UnknownToken,
            2 => PairError::AlreadyUsed,
            3 => PairError::Expired,
            5 => PairError::RecoveryClosed,
            6 => PairError::TooManyAttempts(message),
            _ => PairError::Malformed(message),
        }
    }

    /// The error a joiner reports for a connection the inviter closed.
    fn from_connection(e: &ConnectionError) -> Self {
        match e {
            ConnectionError::ApplicationClosed(close)
                if close.error_code == VarInt::from_u32(PAIRING_CLOSED_CODE) =>
            {
                PairError::PairingClosed
            }
            ConnectionError::ApplicationClosed(close) => {
                PairError::Refused(String::from_utf8_lossy(&close.reason).into_owned())
            }
            other => PairError::Connect(other.to_string()),
        }
    }
}

/// Why an invitation or a recovery window cannot be opened.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum WindowError {
    #[error(
        "an invitation can stay valid for at most {}, not {}: give a shorter --ttl",
        human(MAX_INVITATION_TTL),
        human(*.0)
    )]
    InvitationTooLong(Duration),
    #[error(
        "a recovery window can stay open for at most {}, not {}: give a shorter --for",
        human(MAX_RECOVERY_WINDOW),
        human(*.0)
    )]
    RecoveryTooLong(Duration),
    #[error("{0} must last at least one second")]
    TooShort(&'static str),
    #[error(
        "{MAX_PENDING_INVITATIONS} invitations are already pending on this device: use one, wait until one expires, or withdraw them all with `cairn invite --cancel`"
    )]
    TooManyInvitations,
}

/// `d` in the largest whole unit that divides it, e.g. "7 days" or "90 seconds"; plain
/// division, so even `u64::MAX` seconds prints without overflow.
fn human(d: Duration) -> String {
    let s = d.as_secs();
    let (n, unit) = match s {
        0 => return format!("{} ms", d.as_millis()),
        s if s % 86_400 == 0 => (s / 86_400, "day"),
        s if s % 3_600 == 0 => (s / 3_600, "hour"),
        s if s % 60 == 0 => (s / 60, "minute"),
        s => (s, "second"),
    };
    format!("{n} {unit}{}", if n == 1 { "" } else { "s" })
}

/// Checks a requested lifetime against its bounds.
fn check_lifetime(
    d: Duration,
    max: Duration,
    too_long: fn(Duration) -> WindowError,
    what: &'static str,
) -> Result<Duration, WindowError> {
    if d > max {
        return Err(too_long(d));
    }
    if d < Duration::from_secs(1) {
        return Err(WindowError::TooShort(what));
    }
    Ok(d)
}

/// A device that joined through one of our invitations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joined {
    pub device: DeviceId,
    pub age_recipient: String,
}

/// What happened on the inviter side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PairingEvent {
    Joined(Joined),
    Refused { device: DeviceId, error: PairError },
}

/// What the joiner receives.
#[derive(Clone)]
pub struct JoinResult {
    pub vault_secret: VaultSecret,
    pub inviter: DeviceId,
    /// The whole roster, including the inviter and the joiner itself.
    pub members: Vec<MemberInfo>,
}

impl fmt::Debug for JoinResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinResult")
            .field("vault_secret", &"<redacted>")
            .field("inviter", &self.inviter)
            .field("members", &self.members)
            .finish()
    }
}

// ---------------------------------------------------------------------------------------
// Inviter state

/// A created invitation: give `ticket.to_string()` to the joining device.
#[derive(Debug, Clone)]
pub struct Invitation {
    pub ticket: Ticket,
}

/// Why a token is no longer pending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retired {
    Used,
    Expired,
}

#[derive(Debug)]
struct State {
    /// token → expiry (unix seconds); never more than [`MAX_PENDING_INVITATIONS`].
    pending: HashMap<[u8; 32], u64>,
    /// Tokens no longer pending, oldest first; never more than [`MAX_REMEMBERED_TOKENS`].
    retired: VecDeque<([u8; 32], Retired)>,
    /// The end of the open recovery window. Monotonic time: a clock change neither closes nor
    /// extends it.
    recovery_until: Option<Instant>,
    failures: FailureLimiter,
    roster: Vec<MemberInfo>,
}

impl State {
    /// Retires expired invitations and forgets a recovery window that closed. Called before
    /// every decision, so nothing expired is ever counted as live.
    fn prune(&mut self, now_unix: u64, now: Instant) {
        let expired: Vec<[u8; 32]> = self
            .pending
            .iter()
            .filter(|&(_, &exp)| exp <= now_unix)
            .map(|(t, _)| *t)
            .collect();
        for token in expired {
            self.pending.remove(&token);
            self.retire(token, Retired::Expired);
        }
        if self.recovery_until.is_some_and(|until| until <= now) {
            self.recovery_until = None;
        }
    }

    fn retire(&mut self, token: [u8; 32], why: Retired) {
        while self.retired.len() >= MAX_REMEMBERED_TOKENS {
            self.retired.pop_front();
        }
        self.retired.push_back((token, why));
    }

    /// Whether non-members may reach the pairing ALPN. Only after [`State::prune`].
    fn is_open(&self) -> bool {
        !self.pending.is_empty() || self.recovery_until.is_some()
    }
}

/// The inviter's pairing state: vault secret, roster, pending tokens, the recovery window and
/// the failure counts. Clone freely.
#[derive(Clone)]
pub struct Pairing(Arc<PairingInner>);

struct PairingInner {
    secret: VaultSecret,
    /// The token of the current key epoch's recovery phrase; older phrases admit nobody.
    recovery: Mutex<[u8; 32]>,
    members: Members,
    state: Mutex<State>,
    events: broadcast::Sender<PairingEvent>,
}

impl fmt::Debug for Pairing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pairing")
            .field("vault", &self.0.secret.vault_id())
            .finish_non_exhaustive()
    }
}

impl Pairing {
    /// `roster` is the current member list (with this device in it); `members` is the
    /// allowlist the endpoint enforces, to which joiners are added.
    pub fn new(secret: VaultSecret, roster: Vec<MemberInfo>, members: Members) -> Self {
        let (events, _) = broadcast::channel(64);
        Self(Arc::new(PairingInner {
            recovery: Mutex::new(recovery_token(&secret)),
            secret,
            members,
            state: Mutex::new(State {
                pending: HashMap::new(),
                retired: VecDeque::new(),
                recovery_until: None,
                failures: FailureLimiter::default(),
                roster,
            }),
            events,
        }))
    }

    /// Accepts only the recovery phrase whose token this is from now on (after a key
    /// rotation: the new epoch's), so phrases computed from older key files admit nobody.
    pub fn set_recovery_token(&self, token: [u8; 32]) {
        *self.0.recovery.lock().unwrap_or_else(|p| p.into_inner()) = token;
    }

    /// The state with expired invitations and a closed recovery window already pruned.
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        let mut st = self.0.state.lock().unwrap_or_else(|p| p.into_inner());
        st.prune(unix_now(), Instant::now());
        st
    }

    /// Creates a one-time invitation valid for `ttl` (1 second to [`MAX_INVITATION_TTL`]),
    /// addressed to `endpoint`'s bound sockets and relays.
    pub fn invite(&self, endpoint: &Endpoint, ttl: Duration) -> Result<Invitation, WindowError> {
        let (token, expires_at) = self.mint(ttl)?;
        let ticket = Ticket {
            inviter: device_id_of(&endpoint.id()),
            addrs: endpoint.addr().ip_addrs().copied().collect(),
            relays: endpoint.addr().relay_urls().cloned().collect(),
            vault: self.0.secret.vault_id(),
            token,
            expires_at,
        };
        Ok(Invitation { ticket })
    }

    /// Adds a pending invitation token valid for `ttl`; returns it and its expiry.
    fn mint(&self, ttl: Duration) -> Result<([u8; 32], u64), WindowError> {
        let ttl = check_lifetime(
            ttl,
            MAX_INVITATION_TTL,
            WindowError::InvitationTooLong,
            "an invitation",
        )?;
        let token: [u8; 32] = rand::random();
        let mut st = self.state();
        if st.pending.len() >= MAX_PENDING_INVITATIONS {
            return Err(WindowError::TooManyInvitations);
        }
        // Rounded up, so a sub-second remainder never shortens the invitation; bounded
        // above, so the sum cannot overflow (saturating all the same).
        let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        let expires_at = unix_now().saturating_add(secs);
        st.pending.insert(token, expires_at);
        Ok((token, expires_at))
    }

    /// Withdraws all pending invitations; returns how many there were. Their tickets then
    /// read as unknown to this device.
    pub fn cancel_all(&self) -> usize {
        let mut st = self.state();
        let n = st.pending.len();
        st.pending.clear();
        n
    }

    /// Whether any invitation is pending and unexpired.
    pub fn has_live_invitation(&self) -> bool {
        !self.state().pending.is_empty()
    }

    /// Opens (or replaces) the recovery window for `duration` (1 second to
    /// [`MAX_RECOVERY_WINDOW`]): until it closes, a device proving the vault's recovery token
    /// is admitted. Returns when it closes, by the wall clock.
    pub fn open_recovery(&self, duration: Duration) -> Result<SystemTime, WindowError> {
        let duration = check_lifetime(
            duration,
            MAX_RECOVERY_WINDOW,
            WindowError::RecoveryTooLong,
            "a recovery window",
        )?;
        self.state().recovery_until = Some(Instant::now() + duration);
        Ok(SystemTime::now() + duration)
    }

    /// Closes the recovery window now; returns whether one was open.
    pub fn close_recovery(&self) -> bool {
        self.state().recovery_until.take().is_some()
    }

    /// How long the recovery window stays open, if it is.
    pub fn recovery_open_for(&self) -> Option<Duration> {
        self.state()
            .recovery_until
            .map(|until| until.saturating_duration_since(Instant::now()))
    }

    /// Whether non-members may reach the pairing ALPN now: an invitation is pending and
    /// unexpired, or a recovery window is open. The allowlist asks this on every handshake.
    pub fn is_open(&self) -> bool {
        self.state().is_open()
    }

    pub fn roster(&self) -> Vec<MemberInfo> {
        self.state().roster.clone()
    }

    /// Replaces the roster handed to the next joiners (after the member list changed).
    pub fn set_roster(&self, roster: Vec<MemberInfo>) {
        self.state().roster = roster;
    }

    pub fn events(&self) -> broadcast::Receiver<PairingEvent> {
        self.0.events.subscribe()
    }

    /// The token a recovery proof is made from (see [`recovery_token`]).
    fn recovery_token(&self) -> [u8; 32] {
        *self.0.recovery.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Decides on a join request from `joiner`: the rate limit first, then the proof. Returns
    /// the token it proves and the joiner's age recipient; every refusal but the rate limit's
    /// own counts against the joiner.
    fn answer(
        &self,
        req: &[u8],
        inviter: &DeviceId,
        joiner: &DeviceId,
    ) -> Result<([u8; 32], String), PairError> {
        let now = Instant::now();
        let recovery = self.recovery_token();
        let mut st = self.state();
        if let Err(backoff) = st.failures.check(joiner, now) {
            return Err(PairError::TooManyAttempts(backoff.message()));
        }
        let result = parse_join_request(req).and_then(|(mac, recipient)| {
            redeem(&mut st, &recovery, &mac, inviter, joiner).map(|token| (token, recipient))
        });
        if result.is_err() {
            st.failures.failed(joiner, now);
        }
        result
    }
}

/// Checks the joiner's proof against the pending invitations, then the recovery token, and
/// consumes an invitation it proves. `st` is pruned, so every pending token is unexpired.
fn redeem(
    st: &mut State,
    recovery: &[u8; 32],
    mac: &[u8; 32],
    inviter: &DeviceId,
    joiner: &DeviceId,
) -> Result<[u8; 32], PairError> {
    let mac = blake3::Hash::from_bytes(*mac);
    // blake3::Hash equality is constant-time.
    let proves = |token: &[u8; 32]| proof(token, JOIN_CONTEXT, inviter, joiner) == mac;
    if let Some(token) = st.pending.keys().find(|t| proves(t)).copied() {
        st.pending.remove(&token);
        st.retire(token, Retired::Used);
        return Ok(token);
    }
    if proves(recovery) {
        return if st.recovery_until.is_some() {
            Ok(*recovery)
        } else {
            Err(PairError::RecoveryClosed)
        };
    }
    match st.retired.iter().find(|(t, _)| proves(t)) {
        Some((_, Retired::Used)) => Err(PairError::AlreadyUsed),
        Some((_, Retired::Expired)) => Err(PairError::Expired),
        None => Err(PairError::UnknownToken),
    }
}

/// Serves [`PAIR_ALPN`] for a [`Pairing`].
#[derive(Debug, Clone)]
pub struct PairingProtocol {
    pairing: Pairing,
    local: DeviceId,
}

impl PairingProtocol {
    /// `endpoint` is the endpoint this handler is registered on (its id is the inviter id
    /// the joiner's proof is bound to).
    pub fn new(pairing: Pairing, endpoint: &Endpoint) -> Self {
        Self {
            pairing,
            local: device_id_of(&endpoint.id()),
        }
    }

    async fn handle(&self, conn: &Connection) -> Result<(), PairError> {
        let joiner = device_id_of(&conn.remote_id());
        let inviter = self.local;
        let (mut send, mut recv) = conn
            .accept_bi()
            .await
            .map_err(|e| PairError::Connect(e.to_string()))?;
        let req = read_frame(&mut recv, 1 + 32 + MAX_RECIPIENT)
            .await
            .map_err(frame_err)?
            .ok_or_else(|| PairError::Malformed("empty pairing request".into()))?;
        let result = self.pairing.answer(&req, &inviter, &joiner);
        let reply = match &result {
            Ok((token, recipient)) => {
                let roster = {
                    let mut st = self.pairing.state();
                    if !st.roster.iter().any(|m| m.device == joiner) {
                        st.roster.push(MemberInfo {
                            device: joiner,
                            age_recipient: recipient.clone(),
                        });
                    }
                    st.roster.clone()
                };
                self.pairing.0.members.insert(joiner);
                accept_reply(
                    &proof(token, ACCEPT_CONTEXT, &inviter, &joiner),
                    &self.pairing.0.secret,
                    &roster,
                )
            }
            Err(e) => {
                let mut v = vec![0x01, e.code()];
                v.extend_from_slice(e.to_string().as_bytes());
                v
            }
        };
        write_frame(&mut send, &reply).await.map_err(frame_err)?;
        let _ = send.finish();
        // Wait for the joiner to read the reply and close (bounded).
        let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
        result.map(|(_, recipient)| {
            let _ = self.pairing.0.events.send(PairingEvent::Joined(Joined {
                device: joiner,
                age_recipient: recipient,
            }));
        })
    }
}

/// The success reply: `0x00 | confirm(32) | vault secret(32) | n u16 | n × (device(32) |
/// len u16 | recipient)`, the roster cut to [`MAX_MEMBERS`]. Read back by
/// [`parse_join_reply`].
fn accept_reply(confirm: &blake3::Hash, secret: &VaultSecret, roster: &[MemberInfo]) -> Vec<u8> {
    let mut v = vec![0x00];
    v.extend_from_slice(confirm.as_bytes());
    v.extend_from_slice(secret.as_bytes());
    let roster = &roster[..roster.len().min(MAX_MEMBERS)];
    v.extend_from_slice(&(roster.len() as u16).to_be_bytes());
    for m in roster {
        v.extend_from_slice(m.device.as_bytes());
        v.extend_from_slice(&(m.age_recipient.len() as u16).to_be_bytes());
        v.extend_from_slice(m.age_recipient.as_bytes());
    }
    v
}

fn parse_join_request(req: &[u8]) -> Result<([u8; 32], String), PairError> {
    match req {
        [0x01, rest @ ..] if rest.len() >= 32 => {
            let mac: [u8; 32] = rest[..32].try_into().expect("32 bytes");
            let recipient = std::str::from_utf8(&rest[32..])
                .map_err(|_| PairError::Malformed("age recipient is not UTF-8".into()))?;
            Ok((mac, recipient.to_owned()))
        }
        _ => Err(PairError::Malformed("bad join request".into())),
    }
}

fn frame_err(e: FrameError) -> PairError {
    PairError::Malformed(e.to_string())
}

impl ProtocolHandler for PairingProtocol {
    async fn accept(&self, conn: Connection) -> Result<(), AcceptError> {
        let device = device_id_of(&conn.remote_id());
        match self.handle(&conn).await {
            Ok(()) => {}
            // Already counted when the limit was reached; reporting every further attempt
            // would let a flood of them flood the log too.
            Err(error @ PairError::TooManyAttempts(_)) => {
                tracing::debug!(device = %device.short(), "pairing refused: {error}");
            }
            Err(error) => {
                tracing::info!(device = %device.short(), "pairing refused: {error}");
                let _ = self
                    .pairing
                    .0
                    .events
                    .send(PairingEvent::Refused { device, error });
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Joiner

/// Joins through `ticket`: proves the token, receives the vault secret and the roster.
/// `age_recipient` is this device's recipient, added to the roster by the inviter.
pub async fn join(
    endpoint: &Endpoint,
    ticket: &Ticket,
    age_recipient: &str,
) -> Result<JoinResult, PairError> {
    if ticket.is_expired() {
        return Err(PairError::Expired);
    }
    if age_recipient.len() > MAX_RECIPIENT {
        return Err(PairError::Malformed("age recipient too long".into()));
    }
    let id = endpoint_id_of(&ticket.inviter).map_err(|_| TicketError::BadId)?;
    let addr = ticket
        .relays
        .iter()
        .fold(EndpointAddr::new(id), |a, u| a.with_relay_url(u.clone()));
    let addr = ticket.addrs.iter().fold(addr, |a, s| a.with_ip_addr(*s));
    let conn = endpoint
        .connect(addr, PAIR_ALPN)
        .await
        .map_err(connect_err)?;
    let result = join_on(&conn, device_id_of(&endpoint.id()), ticket, age_recipient).await;
    conn.close(0u32.into(), b"done");
    result
}

fn closed_err(conn: &Connection, fallback: String) -> PairError {
    match conn.close_reason() {
        Some(e) => PairError::from_connection(&e),
        None => PairError::Connect(fallback),
    }
}

/// A failed connect: the inviter may have closed the connection while the handshake was
/// finishing on our side, and its close code says why.
fn connect_err(e: ConnectError) -> PairError {
    match &e {
        ConnectError::Connection { source, .. }
        | ConnectError::Connecting {
            source: ConnectingError::ConnectionError { source, .. },
            ..
        } => PairError::from_connection(source),
        _ => PairError::Connect(e.to_string()),
    }
}

async fn join_on(
    conn: &Connection,
    joiner: DeviceId,
    ticket: &Ticket,
    recipient: &str,
) -> Result<JoinResult, PairError> {
    let inviter = device_id_of(&conn.remote_id());
    let mut req = vec![0x01];
    req.extend_from_slice(proof(&ticket.token, JOIN_CONTEXT, &inviter, &joiner).as_bytes());
    req.extend_from_slice(recipient.as_bytes());
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| closed_err(conn, e.to_string()))?;
    write_frame(&mut send, &req)
        .await
        .map_err(|e| closed_err(conn, e.to_string()))?;
    let _ = send.finish();
    let reply = read_frame(&mut recv, 3 + 64 + MAX_MEMBERS * (34 + MAX_RECIPIENT))
        .await
        .map_err(|e| closed_err(conn, e.to_string()))?
        .ok_or_else(|| closed_err(conn, "the inviter sent no reply".into()))?;
    let confirm = proof(&ticket.token, ACCEPT_CONTEXT, &inviter, &joiner);
    let (vault_secret, members) = parse_join_reply(&reply, &confirm, &ticket.vault)?;
    Ok(JoinResult {
        vault_secret,
        inviter,
        members,
    })
}

/// Reads the inviter's reply to a join request (the layout is in the module docs): the vault
/// secret and roster when it carries the `confirm` proof and the secret of `vault`, else the
/// error it reports. Every read is bounds-checked, so a short or garbled reply is an error,
/// never a panic. Bytes after the roster are ignored.
fn parse_join_reply(
    reply: &[u8],
    confirm: &blake3::Hash,
    vault: &VaultId,
) -> Result<(VaultSecret, Vec<MemberInfo>), PairError> {
    match reply.split_first() {
        Some((0x00, rest)) => {
            let truncated =
                |_: cairn_codec::Error| PairError::Malformed("truncated pairing reply".into());
            let mut r = Reader::new(rest);
            let sent_confirm = r.take_array::<32>().map_err(truncated)?;
            let secret = r.take_array::<32>().map_err(truncated)?;
            let n = r.u16_be().map_err(truncated)?;
            if blake3::Hash::from_bytes(sent_confirm) != *confirm {
                return Err(PairError::BadConfirmation);
            }
            let secret = VaultSecret::from_bytes(secret);
            if *vault != ANY_VAULT && secret.vault_id() != *vault {
                return Err(PairError::Malformed(
                    "the inviter sent the secret of a different vault than the ticket names".into(),
                ));
            }
            // Each member takes at least 34 bytes: a forged count allocates no more than the
            // reply could hold.
            let mut members = Vec::with_capacity(usize::from(n).min(r.remaining() / 34));
            for _ in 0..n {
                let device = DeviceId(r.take_array().map_err(truncated)?);
                let len = r.u16_be().map_err(truncated)?;
                let age_recipient = std::str::from_utf8(r.take(len.into()).map_err(truncated)?)
                    .map_err(|_| PairError::Malformed("age recipient is not UTF-8".into()))?
                    .to_owned();
                members.push(MemberInfo {
                    device,
                    age_recipient,
                });
            }
            Ok((secret, members))
        }
        Some((0x01, [code, msg @ ..])) => Err(PairError::from_code(
            *code,
            String::from_utf8_lossy(msg).into_owned(),
        )),
        _ => Err(PairError::Malformed("unknown pairing reply".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_crypto::DeviceKey;

    fn ticket() -> Ticket {
        Ticket {
            inviter: DeviceKey::generate().device_id(),
            addrs: vec![
                "127.0.0.1:4242".parse().unwrap(),
                "[::1]:7".parse().unwrap(),
            ],
            relays: vec![
                "http://127.0.0.1:3340/".parse().unwrap(),
                "https://relay.example.org/".parse().unwrap(),
            ],
            vault: VaultSecret::generate().vault_id(),
            token: rand::random(),
            expires_at: 1_900_000_000,
        }
    }

    #[test]
    fn ticket_round_trip() {
        let t = ticket();
        let s = t.to_string();
        assert!(s.starts_with("cairn1"));
        assert_eq!(s.parse::<Ticket>().unwrap(), t);
        assert_eq!(
            s.to_uppercase()
                .replacen("CAIRN1", "cairn1", 1)
                .parse::<Ticket>()
                .unwrap(),
            t
        );
        assert!(!format!("{t:?}").contains(&hex::encode(t.token)));
    }

    #[test]
    fn malformed_tickets() {
        let s = ticket().to_string();
        assert_eq!("hello".parse::<Ticket>(), Err(TicketError::Prefix));
        assert_eq!(
            format!("{s}!").parse::<Ticket>(),
            Err(TicketError::Encoding)
        );
        assert_eq!(
            s[..s.len() - 8].parse::<Ticket>().unwrap_err(),
            TicketError::Checksum
        );
        let mut chars: Vec<char> = s.chars().collect();
        chars[20] = if chars[20] == 'a' { 'b' } else { 'a' };
        let flipped: String = chars.into_iter().collect();
        assert_eq!(flipped.parse::<Ticket>(), Err(TicketError::Checksum));
        assert_eq!("cairn1".parse::<Ticket>(), Err(TicketError::Truncated));
        let mut b = ticket().to_bytes();
        b[0] = 9;
        let n = b.len() - 4;
        let sum = blake3::hash(&b[..n]);
        b[n..].copy_from_slice(&sum.as_bytes()[..4]);
        assert_eq!(Ticket::from_bytes(&b), Err(TicketError::Version(9)));
    }

    fn member(i: u8, recipient: &str) -> MemberInfo {
        MemberInfo {
            device: DeviceId([i; 32]),
            age_recipient: recipient.into(),
        }
    }

    /// A valid success reply, and what it must be checked against.
    fn accepted() -> (Vec<u8>, blake3::Hash, VaultSecret, Vec<MemberInfo>) {
        let secret = VaultSecret::generate();
        let confirm = blake3::hash(b"confirm");
        let roster = vec![
            member(1, "age1first"),
            member(2, ""),
            member(3, "age1third"),
        ];
        (
            accept_reply(&confirm, &secret, &roster),
            confirm,
            secret,
            roster,
        )
    }

    fn parse_err(reply: &[u8], confirm: &blake3::Hash, vault: &VaultId) -> Option<PairError> {
        parse_join_reply(reply, confirm, vault).err()
    }

    #[test]
    fn join_reply_round_trip() {
        let (reply, confirm, secret, roster) = accepted();
        let vault = secret.vault_id();
        let Ok((got, members)) = parse_join_reply(&reply, &confirm, &vault) else {
            panic!("a valid reply was refused");
        };
        assert_eq!(got.as_bytes(), secret.as_bytes());
        assert_eq!(members, roster);

        let mut longer = reply.clone();
        longer.extend_from_slice(b"later fields");
        assert!(parse_join_reply(&longer, &confirm, &vault).is_ok());

        let other = blake3::hash(b"other");
        assert_eq!(
            parse_err(&reply, &other, &vault),
            Some(PairError::BadConfirmation)
        );
        let other_vault = VaultSecret::generate().vault_id();
        assert!(matches!(
            parse_err(&reply, &confirm, &other_vault),
            Some(PairError::Malformed(m)) if m.contains("different vault")
        ));
        assert_eq!(
            parse_err(b"\x01\x02already", &confirm, &vault),
            Some(PairError::AlreadyUsed)
        );
        assert_eq!(
            parse_err(b"\x01\x04bad join request", &confirm, &vault),
            Some(PairError::Malformed("bad join request".into()))
        );
    }

    #[test]
    fn truncated_or_garbled_join_replies_are_errors_not_panics() {
        let (reply, confirm, secret, _) = accepted();
        let vault = secret.vault_id();
        let truncated = Some(PairError::Malformed("truncated pairing reply".into()));

        assert_eq!(
            parse_err(&[], &confirm, &vault),
            Some(PairError::Malformed("unknown pairing reply".into()))
        );
        for cut in 1..reply.len() {
            assert_eq!(
                parse_err(&reply[..cut], &confirm, &vault),
                truncated,
                "cut at {cut}"
            );
        }

        // A forged member count with no members behind it.
        let header = 1 + 32 + 32;
        let mut forged = reply[..header].to_vec();
        forged.extend_from_slice(&u16::MAX.to_be_bytes());
        assert_eq!(parse_err(&forged, &confirm, &vault), truncated);
        // A recipient length running past the end.
        let mut long = reply[..header].to_vec();
        long.extend_from_slice(&1u16.to_be_bytes());
        long.extend_from_slice(&[7; 32]);
        long.extend_from_slice(&u16::MAX.to_be_bytes());
        long.extend_from_slice(b"age1");
        assert_eq!(parse_err(&long, &confirm, &vault), truncated);
        // A recipient that is not UTF-8.
        let mut latin1 = reply[..header].to_vec();
        latin1.extend_from_slice(&1u16.to_be_bytes());
        latin1.extend_from_slice(&[7; 32]);
        latin1.extend_from_slice(&2u16.to_be_bytes());
        latin1.extend_from_slice(&[0xe9, 0xe9]);
        assert_eq!(
            parse_err(&latin1, &confirm, &vault),
            Some(PairError::Malformed("age recipient is not UTF-8".into()))
        );

        // Every single-byte corruption of a valid reply, and seeded garbage, both bare and
        // behind a valid header so the roster decoding sees it: any outcome but a panic.
        for i in 0..reply.len() {
            for flip in [0x01, 0x80, 0xff] {
                let mut bad = reply.clone();
                bad[i] ^= flip;
                let _ = parse_join_reply(&bad, &confirm, &vault);
            }
        }
        for seed in 0u32..2000 {
            let mut xof = blake3::Hasher::new()
                .update(&seed.to_le_bytes())
                .finalize_xof();
            let mut garbage = vec![0u8; (seed % 300) as usize];
            xof.fill(&mut garbage);
            let _ = parse_join_reply(&garbage, &confirm, &vault);
            let mut behind = reply[..header].to_vec();
            behind.extend_from_slice(&garbage);
            let _ = parse_join_reply(&behind, &confirm, &vault);
        }
    }

    mod fuzz {
        use super::*;
        use crate::fuzz::mutate;
        use proptest::prelude::*;

        fn ticket_strategy() -> impl Strategy<Value = Ticket> {
            (
                any::<[u8; 32]>(),
                // IP and port only: a ticket carries no IPv6 flow info or scope id.
                prop::collection::vec(
                    (any::<IpAddr>(), any::<u16>())
                        .prop_map(|(ip, port)| SocketAddr::new(ip, port)),
                    0..4,
                ),
                prop::collection::vec("[a-z]{1,12}", 0..3),
                any::<[u8; 16]>(),
                any::<[u8; 32]>(),
                any::<u64>(),
            )
                .prop_map(|(seed, addrs, hosts, vault, token, expires_at)| Ticket {
                    inviter: DeviceKey::from_bytes(seed).device_id(),
                    addrs,
                    relays: hosts
                        .iter()
                        .map(|h| format!("https://{h}.example.org/").parse().unwrap())
                        .collect(),
                    vault: VaultId(vault),
                    token,
                    expires_at,
                })
        }

        /// Replaces the last four bytes with the checksum of the rest, so a mutated body
        /// reaches the parser instead of stopping at the checksum.
        fn reseal(b: &mut [u8]) {
            if b.len() >= 4 {
                let n = b.len() - 4;
                let sum = blake3::hash(&b[..n]);
                b[n..].copy_from_slice(&sum.as_bytes()[..4]);
            }
        }

        /// What a decoded ticket must satisfy: it encodes to bytes that decode to itself.
        fn check_ticket(got: Result<Ticket, TicketError>) -> Result<(), TestCaseError> {
            match got {
                Ok(t) => {
                    prop_assert_eq!(Ticket::from_bytes(&t.to_bytes()).unwrap(), t.clone());
                    prop_assert_eq!(t.to_string().parse::<Ticket>().unwrap(), t);
                }
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
            Ok(())
        }

        proptest! {
            #![proptest_config(crate::fuzz::config())]

            #[test]
            fn fuzz_ticket_random_bytes(mut b in prop::collection::vec(any::<u8>(), 0..200), seal: bool) {
                if seal {
                    reseal(&mut b);
                }
                check_ticket(Ticket::from_bytes(&b))?;
            }

            #[test]
            fn fuzz_ticket_random_text(s in "cairn1[a-z2-7]{0,200}") {
                check_ticket(s.parse::<Ticket>())?;
            }

            #[test]
            fn fuzz_ticket_mutations(
                t in ticket_strategy(),
                edits in prop::collection::vec((0u8..5, any::<prop::sample::Index>(), any::<u8>()), 1..4),
            ) {
                let good = t.to_bytes();
                prop_assert_eq!(Ticket::from_bytes(&good).unwrap(), t);
                let mut b = good.clone();
                for (op, at, x) in &edits {
                    mutate(&mut b, *op, *at, *x);
                }
                if b != good {
                    // The checksum catches a copy-paste accident...
                    prop_assert!(Ticket::from_bytes(&b).is_err());
                }
                // ...and the parser holds behind it.
                reseal(&mut b);
                check_ticket(Ticket::from_bytes(&b))?;
            }

            #[test]
            fn fuzz_join_request_random_bytes(b in prop::collection::vec(any::<u8>(), 0..100)) {
                match parse_join_request(&b) {
                    Ok((mac, recipient)) => {
                        let mut again = vec![0x01];
                        again.extend_from_slice(&mac);
                        again.extend_from_slice(recipient.as_bytes());
                        prop_assert_eq!(again, b);
                    }
                    Err(e) => prop_assert!(e.to_string().starts_with("malformed pairing message: ")),
                }
            }

            #[test]
            fn fuzz_join_reply_random_bytes(b in prop::collection::vec(any::<u8>(), 0..300)) {
                let confirm = blake3::hash(b"confirm");
                let vault = VaultId([1; 16]);
                // Random bytes cannot carry the right confirmation (or the right vault).
                let err = parse_join_reply(&b, &confirm, &vault).unwrap_err();
                prop_assert!(!err.to_string().is_empty());
            }

            #[test]
            fn fuzz_join_reply_mutations(
                roster in prop::collection::vec((any::<[u8; 32]>(), "age1[a-z0-9]{0,60}"), 0..5),
                edits in prop::collection::vec((0u8..5, any::<prop::sample::Index>(), any::<u8>()), 1..4),
            ) {
                let secret = VaultSecret::from_bytes([9; 32]);
                let confirm = blake3::hash(b"confirm");
                let roster: Vec<MemberInfo> = roster
                    .into_iter()
                    .map(|(d, r)| MemberInfo { device: DeviceId(d), age_recipient: r })
                    .collect();
                let good = accept_reply(&confirm, &secret, &roster);
                let mut b = good.clone();
                for (op, at, x) in &edits {
                    mutate(&mut b, *op, *at, *x);
                }
                match parse_join_reply(&b, &confirm, &secret.vault_id()) {
                    Ok((got, members)) => {
                        // Accepted only with the proof and secret intact.
                        prop_assert_eq!(&b[..65], &good[..65]);
                        prop_assert_eq!(got.as_bytes(), secret.as_bytes());
                        // Each member took at least 34 bytes of the reply.
                        prop_assert!(67 + 34 * members.len() <= b.len());
                    }
                    Err(e) => prop_assert!(!e.to_string().is_empty()),
                }
            }
        }

        /// A reply claiming 65535 members in a few bytes reserves room for none of them.
        #[test]
        fn join_reply_member_count_is_bounded_by_the_input() {
            let secret = VaultSecret::from_bytes([9; 32]);
            let confirm = blake3::hash(b"confirm");
            let mut b = accept_reply(&confirm, &secret, &[]);
            let n = b.len();
            b[n - 2..].copy_from_slice(&u16::MAX.to_be_bytes());
            let (r, largest) = crate::test_alloc::largest_allocation_during(|| {
                parse_join_reply(&b, &confirm, &secret.vault_id())
            });
            assert_eq!(
                r.unwrap_err(),
                PairError::Malformed("truncated pairing reply".into())
            );
            assert!(largest < 1024, "largest allocation {largest} bytes");
        }
    }

    // -----------------------------------------------------------------------------------
    // Inviter state: windows, bounds, rate limits

    fn pairing() -> Pairing {
        Pairing::new(VaultSecret::generate(), Vec::new(), Members::default())
    }

    fn inviter() -> DeviceId {
        DeviceId([0xaa; 32])
    }

    fn joiner(i: u32) -> DeviceId {
        let mut b = [0x11; 32];
        b[..4].copy_from_slice(&i.to_be_bytes());
        DeviceId(b)
    }

    /// The request `join` sends for `token`, from `joiner` to [`inviter`].
    fn request(token: &[u8; 32], joiner: &DeviceId) -> Vec<u8> {
        let mut req = vec![0x01];
        req.extend_from_slice(proof(token, JOIN_CONTEXT, &inviter(), joiner).as_bytes());
        req.extend_from_slice(b"age1joiner");
        req
    }

    fn answer(p: &Pairing, token: &[u8; 32], joiner: &DeviceId) -> Result<[u8; 32], PairError> {
        p.answer(&request(token, joiner), &inviter(), joiner)
            .map(|(t, recipient)| {
                assert_eq!(recipient, "age1joiner");
                t
            })
    }

    #[test]
    fn lifetimes_are_bounded_and_never_overflow() {
        let p = pairing();
        assert!(p.mint(MAX_INVITATION_TTL).is_ok());
        for absurd in [
            MAX_INVITATION_TTL + Duration::from_secs(1),
            Duration::from_secs(1_000_000 * 86_400),
            Duration::from_secs(u64::MAX),
            Duration::MAX,
        ] {
            let err = p.mint(absurd).unwrap_err();
            assert_eq!(err, WindowError::InvitationTooLong(absurd));
            assert!(err.to_string().contains("at most 7 days"), "{err}");
            let err = p.open_recovery(absurd).unwrap_err();
            assert_eq!(err, WindowError::RecoveryTooLong(absurd));
            assert!(err.to_string().contains("at most 1 day,"), "{err}");
        }
        for tiny in [Duration::ZERO, Duration::from_millis(999)] {
            assert_eq!(p.mint(tiny), Err(WindowError::TooShort("an invitation")));
            assert_eq!(
                p.open_recovery(tiny),
                Err(WindowError::TooShort("a recovery window"))
            );
        }
        // A sub-second remainder rounds the expiry up.
        let before = unix_now();
        let (_, exp) = p.mint(Duration::from_millis(1500)).unwrap();
        assert!(
            exp >= before + 2 && exp <= unix_now() + 2,
            "{exp} vs {before}"
        );
        // The longest recovery window closes a day from now by the wall clock.
        let until = p.open_recovery(MAX_RECOVERY_WINDOW).unwrap();
        let left = until.duration_since(SystemTime::now()).unwrap();
        assert!(
            left > MAX_RECOVERY_WINDOW - Duration::from_secs(5),
            "{left:?}"
        );
        assert!(p.recovery_open_for().unwrap() <= MAX_RECOVERY_WINDOW);
        assert_eq!(human(Duration::from_secs(90)), "90 seconds");
        assert_eq!(human(Duration::from_secs(600)), "10 minutes");
        assert_eq!(human(Duration::from_secs(3600)), "1 hour");
        assert!(human(Duration::MAX).ends_with("seconds"));
    }

    #[test]
    fn tickets_from_far_in_the_future_decode_and_compare_without_overflow() {
        for expires_at in [u64::MAX, u64::MAX - 1, 1 << 63] {
            let t = Ticket {
                expires_at,
                ..ticket()
            };
            let back: Ticket = t.to_string().parse().unwrap();
            assert_eq!(back.expires_at, expires_at);
            assert!(!back.is_expired());
        }
        let old = Ticket {
            expires_at: 0,
            ..ticket()
        };
        assert!(old.is_expired());
    }

    #[test]
    fn pairing_is_open_only_with_a_live_invitation_or_a_recovery_window() {
        let p = pairing();
        assert!(!p.is_open());
        p.mint(Duration::from_secs(60)).unwrap();
        assert!(p.is_open() && p.has_live_invitation());
        assert_eq!(p.cancel_all(), 1);
        assert!(!p.is_open());
        p.open_recovery(Duration::from_secs(60)).unwrap();
        assert!(p.is_open() && !p.has_live_invitation());
        assert!(p.close_recovery());
        assert!(!p.close_recovery());
        assert!(!p.is_open());
        assert_eq!(p.recovery_open_for(), None);

        // An invitation that expired no longer opens anything.
        p.state().pending.insert([9; 32], unix_now() - 1);
        assert!(!p.is_open());
        assert!(p.state().pending.is_empty());
        // A window whose time is up closes by itself.
        p.state().recovery_until = Some(Instant::now());
        assert!(!p.is_open());
    }

    #[test]
    fn pending_invitations_are_capped_and_remembered_tokens_bounded() {
        let p = pairing();
        for _ in 0..MAX_PENDING_INVITATIONS {
            p.mint(Duration::from_secs(600)).unwrap();
        }
        let err = p.mint(Duration::from_secs(600)).unwrap_err();
        assert_eq!(err, WindowError::TooManyInvitations);
        assert!(err.to_string().contains("cairn invite --cancel"), "{err}");
        // Expired invitations make room.
        for exp in p.state().pending.values_mut().take(3) {
            *exp = 0;
        }
        for _ in 0..3 {
            p.mint(Duration::from_secs(600)).unwrap();
        }
        assert!(p.mint(Duration::from_secs(600)).is_err());
        assert_eq!(p.state().retired.len(), 3);
        assert_eq!(p.cancel_all(), MAX_PENDING_INVITATIONS);
        p.mint(Duration::from_secs(600)).unwrap();

        // Used and expired tokens: only the newest are remembered.
        let mut st = p.state();
        for i in 0..MAX_REMEMBERED_TOKENS + 10 {
            let mut t = [0u8; 32];
            t[..8].copy_from_slice(&(i as u64).to_be_bytes());
            st.retire(t, Retired::Used);
        }
        assert_eq!(st.retired.len(), MAX_REMEMBERED_TOKENS);
        let oldest = st.retired.front().unwrap().0;
        // The three expired tokens from above went first, then the ten oldest of these.
        assert_eq!(oldest[..8], 10u64.to_be_bytes()[..]);
    }

    #[test]
    fn the_recovery_token_admits_only_inside_a_window() {
        let p = pairing();
        let recovery = recovery_token(&p.0.secret);
        assert_eq!(
            answer(&p, &recovery, &joiner(1)),
            Err(PairError::RecoveryClosed)
        );
        p.open_recovery(Duration::from_secs(60)).unwrap();
        // Inside the window, as often as needed.
        assert_eq!(answer(&p, &recovery, &joiner(2)), Ok(recovery));
        assert_eq!(answer(&p, &recovery, &joiner(3)), Ok(recovery));
        // A proof bound to another joiner does not carry over.
        let stolen = request(&recovery, &joiner(3));
        assert_eq!(
            p.answer(&stolen, &inviter(), &joiner(4)).unwrap_err(),
            PairError::UnknownToken
        );
        p.close_recovery();
        assert_eq!(
            answer(&p, &recovery, &joiner(5)),
            Err(PairError::RecoveryClosed)
        );
        // A window that ran out is closed too.
        p.open_recovery(Duration::from_secs(60)).unwrap();
        p.state().recovery_until = Some(Instant::now());
        assert_eq!(
            answer(&p, &recovery, &joiner(6)),
            Err(PairError::RecoveryClosed)
        );
    }

    #[test]
    fn invitations_work_once_and_say_why_they_are_refused() {
        let p = pairing();
        let (token, _) = p.mint(Duration::from_secs(60)).unwrap();
        assert_eq!(answer(&p, &token, &joiner(1)), Ok(token));
        assert_eq!(answer(&p, &token, &joiner(2)), Err(PairError::AlreadyUsed));
        let (late, _) = p.mint(Duration::from_secs(60)).unwrap();
        *p.state().pending.get_mut(&late).unwrap() = unix_now();
        assert_eq!(answer(&p, &late, &joiner(3)), Err(PairError::Expired));
        assert_eq!(
            answer(&p, &[7; 32], &joiner(4)),
            Err(PairError::UnknownToken)
        );
        assert!(matches!(
            p.answer(b"\x01short", &inviter(), &joiner(5)),
            Err(PairError::Malformed(_))
        ));
        // An invitation does not open recovery.
        p.mint(Duration::from_secs(60)).unwrap();
        let recovery = recovery_token(&p.0.secret);
        assert_eq!(
            answer(&p, &recovery, &joiner(6)),
            Err(PairError::RecoveryClosed)
        );
    }

    #[test]
    fn failed_proofs_back_off_per_remote_and_globally() {
        use crate::limiter::{MAX_FAILURES_PER_MINUTE, MAX_FAILURES_PER_REMOTE};
        let p = pairing();
        let (token, _) = p.mint(Duration::from_secs(600)).unwrap();
        let guesser = joiner(1);
        for _ in 0..MAX_FAILURES_PER_REMOTE {
            assert_eq!(answer(&p, &[7; 32], &guesser), Err(PairError::UnknownToken));
        }
        // Now even the right token is not looked at, and stays pending for others.
        let err = answer(&p, &token, &guesser).unwrap_err();
        assert!(
            matches!(&err, PairError::TooManyAttempts(m) if m.contains("from this device") && m.contains("retry in 600 s")),
            "{err:?}"
        );
        assert!(p.has_live_invitation());
        assert_eq!(answer(&p, &token, &joiner(2)), Ok(token));

        // Fresh ids use up the device-wide budget; then everybody waits.
        let p = pairing();
        let (token, _) = p.mint(Duration::from_secs(600)).unwrap();
        for i in 0..MAX_FAILURES_PER_MINUTE {
            assert_eq!(
                answer(&p, &[7; 32], &joiner(100 + i)),
                Err(PairError::UnknownToken)
            );
        }
        let err = answer(&p, &token, &joiner(1)).unwrap_err();
        assert!(
            matches!(&err, PairError::TooManyAttempts(m) if m.contains("any device")),
            "{err:?}"
        );
        assert!(p.has_live_invitation());
    }

    #[test]
    fn new_refusal_codes_cross_the_wire() {
        for e in [
            PairError::UnknownToken,
            PairError::AlreadyUsed,
            PairError::Expired,
            PairError::RecoveryClosed,
            PairError::TooManyAttempts("retry in 5 s".into()),
        ] {
            let mut reply = vec![0x01, e.code()];
            reply.extend_from_slice(e.to_string().as_bytes());
            let vault = VaultSecret::generate().vault_id();
            assert_eq!(parse_err(&reply, &blake3::hash(b"x"), &vault), Some(e));
        }
    }
}
