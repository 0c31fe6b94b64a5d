//! The optional configuration file, `$XDG_CONFIG_HOME/cairn/config.toml`.
//!
//! Every key has a default, so a missing file is a valid configuration; a present file must be
//! entirely understood (unknown keys are rejected), because a typo that silently falls back
//! to a default is worse than a refusal. `docs/config.example.toml` documents every key.
//! Precedence, lowest first: defaults, the file, environment (`CAIRN_RELAY`, `CAIRN_BIND`,
//! `CAIRN_DIRECT`), command-line flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use cairn_daemon::{PeerAddr, RelayUrl, Relays};
use serde::Deserialize;

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub net: NetSettings,
    pub mount: MountSettings,
    pub cache: CacheSettings,
    pub guard: GuardSettings,
    pub history: HistorySettings,
    pub sync: SyncSettings,
}

/// `[sync]`: what this device fetches, and how content missing locally is fetched from
/// the other members.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncSettings {
    /// `"full"` (every file's content, in the background) or `"on-demand"` (every name, size
    /// and date, but content only when read or pinned). A vault that chose its own mode
    /// (`cairn join --mode`, `cairn mode`) keeps it.
    #[serde(deserialize_with = "sync_mode")]
    pub mode: cairn_daemon::SyncMode,
    /// How long one member may take to deliver a chunk or tree node before it is given up
    /// on: the next member is asked, and when none delivers, a read of that content fails
    /// with EIO instead of hanging.
    pub fetch_timeout_secs: u64,
}

impl Default for SyncSettings {
    fn default() -> Self {
        Self {
            mode: cairn_daemon::SyncMode::default(),
            fetch_timeout_secs: cairn_daemon::DEFAULT_FETCH_TIMEOUT.as_secs(),
        }
    }
}

impl SyncSettings {
    /// The timeout, at least one second (0 would fail every fetch).
    pub fn fetch_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.fetch_timeout_secs.max(1))
    }
}

fn sync_mode<'de, D: serde::Deserializer<'de>>(d: D) -> Result<cairn_daemon::SyncMode, D::Error> {
    String::deserialize(d)?
        .parse()
        .map_err(serde::de::Error::custom)
}

/// `[history]`: which snapshots are kept (restic-style, over every member's snapshots) and
/// when the daemon prunes by itself.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistorySettings {
    /// Keep every snapshot this close to the newest one (`7days`, `36h`, `0s`).
    #[serde(deserialize_with = "duration")]
    pub keep_within: std::time::Duration,
    /// Beyond that, the newest snapshot of each of this many most recent hours, days, weeks
    /// (Monday to Sunday, UTC) and calendar months that hold one.
    pub keep_hourly: u32,
    pub keep_daily: u32,
    pub keep_weekly: u32,
    pub keep_monthly: u32,
    /// Whether the daemon prunes by itself.
    pub auto_prune: bool,
    /// ... this often (`1day`),
    #[serde(deserialize_with = "duration")]
    pub prune_every: std::time::Duration,
    /// ... and whenever the local store passes this size (MiB; 0: no size trigger).
    pub prune_above_mib: u64,
    /// How often the daemon checks both (`10m`).
    #[serde(deserialize_with = "duration")]
    pub prune_check: std::time::Duration,
}

impl Default for HistorySettings {
    fn default() -> Self {
        let p = cairn_vault::RetentionPolicy::default();
        Self {
            keep_within: std::time::Duration::from_millis(p.keep_within_ms),
            keep_hourly: p.keep_hourly,
            keep_daily: p.keep_daily,
            keep_weekly: p.keep_weekly,
            keep_monthly: p.keep_monthly,
            auto_prune: true,
            prune_every: std::time::Duration::from_secs(86_400),
            prune_above_mib: 10 * 1024,
            prune_check: std::time::Duration::from_secs(600),
        }
    }
}

impl HistorySettings {
    pub fn policy(&self) -> cairn_vault::RetentionPolicy {
        cairn_vault::RetentionPolicy {
            keep_within_ms: u64::try_from(self.keep_within.as_millis()).unwrap_or(u64::MAX),
            keep_hourly: self.keep_hourly,
            keep_daily: self.keep_daily,
            keep_weekly: self.keep_weekly,
            keep_monthly: self.keep_monthly,
        }
    }

    /// The daemon's automatic prune; `None` when turned off.
    pub fn auto(&self) -> Option<cairn_daemon::AutoPrune> {
        self.auto_prune.then(|| cairn_daemon::AutoPrune {
            policy: self.policy(),
            every: Some(self.prune_every).filter(|d| !d.is_zero()),
            above_bytes: Some(self.prune_above_mib.saturating_mul(1 << 20)).filter(|&b| b > 0),
            check_every: self.prune_check.max(std::time::Duration::from_secs(1)),
        })
    }
}

/// A duration as humantime text (`7days`, `90m`, `0s`).
fn duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<std::time::Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(text.trim()).map_err(|e| {
        serde::de::Error::custom(format!(
            "{text:?} is not a duration ({e}); write it as 7days, 36h, 90m or 0s"
        ))
    })
}

/// `[guard]`: when a deletion (made here or received from a peer) is held instead of
/// applied: it must remove more than `max_delete_share` of the vault's files *and* more than
/// `max_delete_files` files.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuardSettings {
    /// Share of the vault's files, 0.0 to 1.0.
    pub max_delete_share: f64,
    pub max_delete_files: u64,
}

impl Default for GuardSettings {
    fn default() -> Self {
        let p = cairn_daemon::GuardPolicy::default();
        Self {
            max_delete_share: p.max_delete_share,
            max_delete_files: p.max_delete_files,
        }
    }
}

impl GuardSettings {
    pub fn policy(&self) -> cairn_daemon::GuardPolicy {
        cairn_daemon::GuardPolicy {
            max_delete_share: self.max_delete_share,
            max_delete_files: self.max_delete_files,
        }
    }
}

/// `net.relay`: which relays carry traffic between devices that cannot reach each other
/// directly.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawRelay")]
pub enum RelayMode {
    /// n0's public relays (the default): devices on different networks (a laptop at a café,
    /// a desktop at home) find each other with no set-up. The relay sees device ids, IP
    /// addresses and traffic volume, never content (it is end-to-end encrypted QUIC), and
    /// iroh moves the connection to a direct path whenever hole punching succeeds.
    #[default]
    Default,
    /// Direct connections only: nothing is sent to any third party; devices must reach each
    /// other directly (same LAN, a VPN, or a forwarded UDP port).
    Disabled,
    /// Your own relays (`cairn relay`), by URL.
    Custom(Vec<RelayUrl>),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawRelay {
    Word(String),
    List(Vec<String>),
}

impl TryFrom<RawRelay> for RelayMode {
    type Error = String;

    fn try_from(raw: RawRelay) -> Result<Self, String> {
        match raw {
            RawRelay::Word(w) => parse_relay(&w),
            RawRelay::List(urls) => relay_urls(urls.iter().map(String::as_str)),
        }
    }
}

fn relay_urls<'a>(urls: impl IntoIterator<Item = &'a str>) -> Result<RelayMode, String> {
    let mut out = Vec::new();
    for u in urls {
        match u.trim().parse::<PeerAddr>() {
            Ok(PeerAddr::Relay(url)) => out.push(url),
            _ => {
                return Err(format!(
                    "{u:?} is not a relay URL; give http://HOST:PORT/ or https://HOST/"
                ));
            }
        }
    }
    if out.is_empty() {
        return Err("an empty relay list; use \"disabled\" for no relays".into());
    }
    Ok(RelayMode::Custom(out))
}

/// `"default"`, `"disabled"`, or comma-separated relay URLs (the form `CAIRN_RELAY` takes).
fn parse_relay(text: &str) -> Result<RelayMode, String> {
    match text.trim() {
        "default" => Ok(RelayMode::Default),
        "disabled" => Ok(RelayMode::Disabled),
        t if t.starts_with("http://") || t.starts_with("https://") => {
            relay_urls(t.split(',').filter(|u| !u.trim().is_empty()))
        }
        other => Err(format!(
            "relay {other:?} is not understood; use \"default\", \"disabled\" or a list of relay URLs"
        )),
    }
}

impl RelayMode {
    pub fn to_relays(&self) -> Relays {
        match self {
            Self::Default => Relays::Default,
            Self::Disabled => Relays::Disabled,
            Self::Custom(urls) => Relays::Custom(urls.clone()),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetSettings {
    pub relay: RelayMode,
    /// UDP address of the endpoint; port 0 picks one (then remembered per vault).
    pub bind: SocketAddr,
    /// `false`: relay-only, no direct paths; peers never learn this device's IP address.
    pub direct: bool,
}

impl Default for NetSettings {
    fn default() -> Self {
        Self {
            relay: RelayMode::Default,
            bind: SocketAddr::from(([0, 0, 0, 0], 0)),
            direct: true,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MountSettings {
    /// Idle time after the last write before a flush.
    pub debounce_ms: u64,
    /// Mount options as `mount -o` takes them (`allow_other,uid=1000`); `cairn mount -o`
    /// adds to them.
    pub options: String,
    /// Free space (MiB) kept on the state directory's disk: below it, writes into the
    /// mount fail with ENOSPC so nothing already acknowledged is lost. Unset: 64 MiB, at
    /// most a twentieth of the disk.
    pub min_free_mib: Option<u64>,
}

impl MountSettings {
    /// The reserve in bytes, as the mount takes it.
    pub fn min_free_bytes(&self) -> Option<u64> {
        self.min_free_mib.map(|m| m.saturating_mul(1 << 20))
    }
}

impl Default for MountSettings {
    fn default() -> Self {
        // Short enough that a saved file reaches peers well within a second, long enough
        // that a burst of writes becomes one snapshot.
        Self {
            debounce_ms: 150,
            options: String::new(),
            min_free_mib: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheSettings {
    /// Decrypted file chunks kept by the mount (MiB).
    pub chunk_cache_mib: usize,
    /// Decoded tree nodes kept by the engine (MiB).
    pub node_cache_mib: usize,
    /// On an on-demand device, the local store's budget (GiB, fractions allowed; 0: none):
    /// past it, the least recently read unpinned content that another member holds is
    /// evicted.
    #[serde(deserialize_with = "gib")]
    pub max_gib: f64,
}

fn gib<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    let v = f64::deserialize(d)?;
    if !v.is_finite() || v < 0.0 {
        return Err(serde::de::Error::custom(format!(
            "{v} is not a size in GiB; give 0 (no budget) or more, such as 20 or 0.5"
        )));
    }
    Ok(v)
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            chunk_cache_mib: 8,
            node_cache_mib: 32,
            max_gib: 0.0,
        }
    }
}

impl CacheSettings {
    /// The store budget in bytes, if there is one.
    pub fn max_bytes(&self) -> Option<u64> {
        let bytes = self.max_gib * (1u64 << 30) as f64;
        (bytes >= 1.0).then_some(bytes as u64)
    }

    pub fn chunk_cache_bytes(&self) -> usize {
        self.chunk_cache_mib.saturating_mul(1 << 20)
    }

    pub fn node_cache_bytes(&self) -> usize {
        self.node_cache_mib.saturating_mul(1 << 20)
    }
}

/// Where the configuration is read from when no `--config` / `CAIRN_CONFIG` is given.
pub fn default_path(env: &dyn Fn(&str) -> Option<String>) -> Result<PathBuf> {
    if let Some(x) = env("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(x).join("cairn/config.toml"));
    }
    let home = env("HOME")
        .filter(|v| !v.is_empty())
        .context("neither XDG_CONFIG_HOME nor HOME is set; pass --config PATH")?;
    Ok(PathBuf::from(home).join(".config/cairn/config.toml"))
}

fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

impl Config {
    /// Reads `explicit` (which must exist), else the default path (which may be missing),
    /// then applies the environment overrides.
    pub fn load(explicit: Option<&Path>) -> Result<Config> {
        Self::load_with(explicit, &process_env)
    }

    fn load_with(explicit: Option<&Path>, env: &dyn Fn(&str) -> Option<String>) -> Result<Config> {
        let mut config = match explicit {
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| {
                    format!(
                        "cannot read the configuration file {} (named by --config or CAIRN_CONFIG); create it or drop the option",
                        path.display()
                    )
                })?;
                Self::parse(&text, path)?
            }
            None => {
                let path = default_path(env)?;
                match std::fs::read_to_string(&path) {
                    Ok(text) => Self::parse(&text, &path)?,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Config::default(),
                    Err(e) => {
                        return Err(e).with_context(|| {
                            format!("cannot read the configuration file {}", path.display())
                        });
                    }
                }
            }
        };
        if let Some(relay) = env("CAIRN_RELAY").filter(|v| !v.is_empty()) {
            config.net.relay =
                parse_relay(&relay).map_err(|e| anyhow::anyhow!("CAIRN_RELAY: {e}"))?;
        }
        if let Some(direct) = env("CAIRN_DIRECT").filter(|v| !v.is_empty()) {
            config.net.direct = match direct.as_str() {
                "1" | "true" | "yes" => true,
                "0" | "false" | "no" => false,
                other => bail!("CAIRN_DIRECT={other:?} is not understood; use true or false"),
            };
        }
        if !config.net.direct && config.net.relay == RelayMode::Disabled {
            bail!(
                "net.direct = false (relay-only) needs a relay, but net.relay is \"disabled\"; set net.relay to \"default\" or to your relay URLs"
            );
        }
        if let Some(bind) = env("CAIRN_BIND").filter(|v| !v.is_empty()) {
            config.net.bind = bind.parse().map_err(|_| {
                anyhow::anyhow!(
                    "CAIRN_BIND={bind:?} is not a socket address; use IP:PORT such as 0.0.0.0:0 or [::]:4433"
                )
            })?;
        }
        Ok(config)
    }

    /// Parses a whole file; errors name the file and line, then say how to find valid keys.
    pub fn parse(text: &str, path: &Path) -> Result<Config> {
        let config: Config = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            let reason = e.message().trim().replace('\n', " ");
            let place = match line {
                Some(l) => format!("{}:{l}", path.display()),
                None => path.display().to_string(),
            };
            anyhow::anyhow!(
                "{place}: {reason}; every valid key and its default is listed in docs/config.example.toml (or delete the file to use the defaults)"
            )
        })?;
        let share = config.guard.max_delete_share;
        if !(0.0..=1.0).contains(&share) {
            bail!(
                "{}: guard.max_delete_share = {share} is not a share of the vault; give a number from 0.0 to 1.0 (0.2 = 20 %)",
                path.display()
            );
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn missing_file_gives_the_documented_defaults() {
        let d = tempfile::tempdir().unwrap();
        let home = d.path().to_str().unwrap().to_string();
        let env = move |k: &str| (k == "XDG_CONFIG_HOME").then(|| home.clone());
        let c = Config::load_with(None, &env).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.net.relay, RelayMode::Default);
        assert!(c.net.direct);
        assert_eq!(c.net.bind, "0.0.0.0:0".parse().unwrap());
        assert_eq!(c.mount.debounce_ms, 150);
        assert_eq!(c.cache.chunk_cache_mib, 8);
        assert_eq!(c.cache.node_cache_mib, 32);
        assert_eq!(c.sync.fetch_timeout(), std::time::Duration::from_secs(30));
        assert_eq!(c.history.policy(), cairn_vault::RetentionPolicy::default());
        assert_eq!(c.history.keep_within.as_secs(), 7 * 86_400);
        assert!(c.history.auto().is_some());
    }

    #[test]
    fn history_durations_are_humantime_and_errors_say_how() {
        let c = Config::parse(
            "[history]\nkeep_within = \"0s\"\nkeep_hourly = 0\nkeep_daily = 0\nkeep_weekly = 0\nkeep_monthly = 0\nauto_prune = false\n",
            Path::new("c.toml"),
        )
        .unwrap();
        assert_eq!(
            c.history.policy(),
            cairn_vault::RetentionPolicy::newest_only()
        );
        assert!(c.history.auto().is_none());
        let err = Config::parse("[history]\nkeep_within = \"a week\"\n", Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("7days"), "{err}");
    }

    #[test]
    fn the_guard_share_must_be_a_share() {
        let c = Config::parse(
            "[guard]\nmax_delete_share = 0.5\nmax_delete_files = 10\n",
            Path::new("c.toml"),
        )
        .unwrap();
        assert_eq!(c.guard.policy().max_delete_files, 10);
        let err = Config::parse("[guard]\nmax_delete_share = 20\n", Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("0.0 to 1.0"), "{err}");
    }

    #[test]
    fn the_sync_mode_is_full_or_on_demand() {
        let c = Config::parse("[sync]\nmode = \"on-demand\"\n", Path::new("c.toml")).unwrap();
        assert_eq!(c.sync.mode, cairn_daemon::SyncMode::OnDemand);
        assert_eq!(Config::default().sync.mode, cairn_daemon::SyncMode::Full);
        let err = Config::parse("[sync]\nmode = \"lazy\"\n", Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("on-demand"), "{err}");
    }

    #[test]
    fn the_cache_budget_is_a_size_in_gib() {
        let c = Config::parse("[cache]\nmax_gib = 0.5\n", Path::new("c.toml")).unwrap();
        assert_eq!(c.cache.max_bytes(), Some(512 << 20));
        assert_eq!(Config::default().cache.max_bytes(), None);
        let err = Config::parse("[cache]\nmax_gib = -1\n", Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("GiB"), "{err}");
    }

    #[test]
    fn the_example_file_parses_to_the_defaults() {
        let text = include_str!("../../../docs/config.example.toml");
        let c = Config::parse(text, Path::new("config.example.toml")).unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn a_full_file_sets_every_key() {
        let text = r#"
[net]
relay = ["https://relay.example.org/", "http://127.0.0.1:3340"]
bind = "127.0.0.1:4433"
direct = false
[mount]
debounce_ms = 50
[cache]
chunk_cache_mib = 2
node_cache_mib = 64
[sync]
fetch_timeout_secs = 5
"#;
        let c = Config::parse(text, Path::new("config.toml")).unwrap();
        assert_eq!(
            c.net.relay,
            RelayMode::Custom(vec![
                "https://relay.example.org/".parse().unwrap(),
                "http://127.0.0.1:3340/".parse().unwrap()
            ])
        );
        assert!(!c.net.direct);
        assert_eq!(c.net.bind, "127.0.0.1:4433".parse().unwrap());
        assert_eq!(c.mount.debounce_ms, 50);
        assert_eq!(c.cache.chunk_cache_bytes(), 2 << 20);
        assert_eq!(c.cache.node_cache_bytes(), 64 << 20);
        assert_eq!(c.sync.fetch_timeout(), std::time::Duration::from_secs(5));
    }

    #[test]
    fn a_partial_file_keeps_the_other_defaults() {
        let c = Config::parse("[mount]\ndebounce_ms = 10\n", Path::new("c.toml")).unwrap();
        assert_eq!(c.mount.debounce_ms, 10);
        let c = Config::parse(
            "[mount]\noptions = \"allow_other,umask=022\"\n",
            Path::new("c.toml"),
        )
        .unwrap();
        assert_eq!(c.mount.options, "allow_other,umask=022");
        assert_eq!(c.cache, CacheSettings::default());
        assert_eq!(c.net, NetSettings::default());
    }

    #[test]
    fn an_unknown_key_is_rejected_with_its_line() {
        let text = "[mount]\ndebounce_ms = 10\n\n[cache]\nchunk_cache_mb = 4\n";
        let err = Config::parse(text, Path::new("config.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("config.toml:5: "), "{err}");
        assert!(err.contains("chunk_cache_mb"), "{err}");
        assert!(err.contains("docs/config.example.toml"), "{err}");
    }

    #[test]
    fn a_bad_bind_address_is_rejected_with_its_line() {
        let text = "[net]\nbind = \"localhost:99999\"\n";
        let err = Config::parse(text, Path::new("config.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("config.toml:2: "), "{err}");
    }

    #[test]
    fn a_bad_relay_mode_is_rejected() {
        for bad in [
            "relay = \"sometimes\"",
            "relay = []",
            "relay = [\"ftp://x/\"]",
            "relay = [\"relay.example.org\"]",
        ] {
            let err = Config::parse(&format!("[net]\n{bad}\n"), Path::new("c.toml"))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("c.toml:2: "), "{bad}: {err}");
        }
    }

    #[test]
    fn relay_only_needs_a_relay() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("config.toml");
        std::fs::write(&path, "[net]\nrelay = \"disabled\"\ndirect = false\n").unwrap();
        let err = Config::load_with(Some(&path), &no_env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("relay-only"), "{err}");
        let env = |k: &str| (k == "CAIRN_RELAY").then(|| "http://127.0.0.1:9/".to_string());
        let c = Config::load_with(Some(&path), &env).unwrap();
        assert!(!c.net.direct);
        assert_eq!(
            c.net.relay.to_relays(),
            Relays::Custom(vec!["http://127.0.0.1:9/".parse().unwrap()])
        );
    }

    #[test]
    fn environment_overrides_the_file() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("config.toml");
        std::fs::write(&path, "[net]\nrelay = \"default\"\nbind = \"0.0.0.0:1\"\n").unwrap();
        let env = |k: &str| match k {
            "CAIRN_RELAY" => Some("disabled".to_string()),
            "CAIRN_BIND" => Some("127.0.0.1:7000".to_string()),
            _ => None,
        };
        let c = Config::load_with(Some(&path), &env).unwrap();
        assert_eq!(c.net.relay, RelayMode::Disabled);
        assert_eq!(c.net.bind, "127.0.0.1:7000".parse().unwrap());
        let env = |k: &str| match k {
            "CAIRN_RELAY" => Some("http://127.0.0.1:1/,https://r.example/".to_string()),
            "CAIRN_DIRECT" => Some("false".to_string()),
            _ => None,
        };
        let c = Config::load_with(Some(&path), &env).unwrap();
        assert!(!c.net.direct);
        assert!(matches!(c.net.relay, RelayMode::Custom(ref v) if v.len() == 2));

        let bad = |k: &str| (k == "CAIRN_BIND").then(|| "nonsense".to_string());
        let err = Config::load_with(Some(&path), &bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("CAIRN_BIND"), "{err}");
    }

    #[test]
    fn an_explicit_path_must_exist() {
        let d = tempfile::tempdir().unwrap();
        let err = Config::load_with(Some(&d.path().join("nope.toml")), &no_env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("nope.toml"), "{err}");
    }
}
