//! `cairn relay`: the self-hosted relay server (`cairn-relay`) as a foreground process.

use anyhow::{Context, Result, anyhow};
use cairn_relay::{AccessList, DeviceId, RelayOptions, RelayServer};
use tokio::signal::unix::{SignalKind, signal};

use crate::RelayArgs;

/// The options the arguments describe; every `--allow` must be a device id.
fn options(args: RelayArgs) -> Result<RelayOptions> {
    let mut allow = if args.allow_anyone {
        AccessList::anyone()
    } else {
        AccessList::default()
    };
    for s in &args.allow {
        let id: DeviceId = s.trim().parse().map_err(|e| {
            anyhow!(
                "--allow {s}: not a device id ({e}); use the 64-hex-character ids `cairn peers` prints"
            )
        })?;
        allow = allow.with_device(id);
    }
    if let Some(file) = args.allow_file {
        // Absolute, so the log and errors say which file, whatever the working directory.
        allow = allow.with_file(std::path::absolute(&file).unwrap_or(file));
    }
    let mut opts = RelayOptions::new(args.bind, allow);
    if let (Some(cert), Some(key)) = (args.cert, args.key) {
        opts = opts.with_tls(cert, key);
    }
    opts.captive_portal = args.captive_portal;
    Ok(opts)
}

enum Event {
    Stop(&'static str),
    Reload,
    Died(cairn_relay::RelayError),
}

pub fn run(args: RelayArgs) -> Result<()> {
    let opts = options(args)?;
    let file = opts.allow.file().map(|f| f.display().to_string());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let mut relay = RelayServer::spawn(opts).await?;
        println!("relay listening: {}", relay.url());
        if let Some(portal) = relay.captive_portal_addr() {
            println!("captive-portal probe (plain HTTP): {portal}");
        }
        if relay.is_open() {
            println!("allowed devices: anyone (open relay, --allow-anyone)");
        } else {
            match &file {
                Some(f) => println!(
                    "allowed devices: {} (re-reading {f} when it changes)",
                    relay.allowed_devices().len()
                ),
                None => println!("allowed devices: {}", relay.allowed_devices().len()),
            }
        }
        let mut int = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
        let mut term = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
        let mut hup = signal(SignalKind::hangup()).context("installing a SIGHUP handler")?;
        loop {
            let event = tokio::select! {
                _ = int.recv() => Event::Stop("SIGINT"),
                _ = term.recv() => Event::Stop("SIGTERM"),
                _ = hup.recv() => Event::Reload,
                e = relay.stopped() => Event::Died(e),
            };
            match event {
                Event::Stop(sig) => {
                    eprintln!("cairn: {sig}: closing client connections");
                    break;
                }
                Event::Reload if file.is_none() => {
                    eprintln!("cairn: SIGHUP: no --allow-file to re-read");
                }
                Event::Reload => match relay.reload_access_list().await {
                    Ok(r) => eprintln!(
                        "cairn: SIGHUP: allow file re-read: {} allowed, {} added, {} removed, {} disconnected",
                        r.allowed,
                        r.added.len(),
                        r.removed.len(),
                        r.disconnected
                    ),
                    Err(e) => {
                        eprintln!("cairn: SIGHUP: {e}; the previous access list stays in force")
                    }
                },
                Event::Died(e) => return Err(e.into()),
            }
        }
        relay.shutdown().await?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Cli, Command};
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<RelayArgs, clap::Error> {
        let cli = Cli::try_parse_from(["cairn", "relay"].iter().chain(args))?;
        match cli.command {
            Command::Relay(a) => Ok(a),
            _ => unreachable!(),
        }
    }

    const ID: &str = "3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29";

    #[test]
    fn defaults_and_flags() {
        let a = parse(&["--allow", ID]).unwrap();
        assert_eq!(a.bind, "0.0.0.0:3340".parse().unwrap());
        assert!(a.cert.is_none() && !a.allow_anyone);
        let opts = options(a).unwrap();
        assert!(opts.tls.is_none());
        assert!(!opts.allow.is_anyone());

        let a = parse(&[
            "--bind",
            "127.0.0.1:443",
            "--cert",
            "c.pem",
            "--key",
            "k.pem",
            "--allow-file",
            "allow",
        ])
        .unwrap();
        let opts = options(a).unwrap();
        assert_eq!(opts.tls.unwrap().cert, std::path::Path::new("c.pem"));
        assert!(opts.allow.file().unwrap().is_absolute());
    }

    #[test]
    fn contradictions_are_refused_by_the_parser() {
        assert!(parse(&["--allow-anyone", "--allow", ID]).is_err());
        assert!(parse(&["--allow-anyone", "--allow-file", "f"]).is_err());
        assert!(parse(&["--cert", "c.pem"]).is_err());
        assert!(parse(&["--captive-portal", "0.0.0.0:80"]).is_err());
        assert!(parse(&["--bind", "nonsense"]).is_err());
        assert!(parse(&["--allow-anyone"]).is_ok());
    }

    #[test]
    fn a_bad_allow_id_is_named() {
        let err = options(parse(&["--allow", "abc"]).unwrap()).unwrap_err();
        assert!(err.to_string().contains("--allow abc"), "{err}");
        assert!(err.to_string().contains("cairn peers"), "{err}");
    }
}
