//! `cairn service install DIR` / `uninstall DIR`: the mount as a systemd user service.
//!
//! The unit is a template (`systemd/cairn-mount@.service`) whose instance name is the
//! mountpoint escaped like `systemd-escape --path`; everything else an instance needs (vault
//! name, non-default data dir or config file) goes into its own env file, so one template
//! serves any number of mounts. Where no user manager is reachable (containers, CI, a root
//! shell without a session) the files are still written and the exact commands to run later
//! are printed instead.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

const TEMPLATE: &str = include_str!("../../../systemd/cairn-mount@.service");
const UNIT_NAME: &str = "cairn-mount@.service";
/// The binary path the template is written with; replaced by the installed binary's.
const TEMPLATE_BIN: &str = "%h/.cargo/bin/cairn";

/// Where the instance gets its settings.
pub struct InstanceSettings<'a> {
    pub vault: &'a str,
    pub data_dir: Option<&'a Path>,
    pub config: Option<&'a Path>,
}

fn config_home() -> Result<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(x));
    }
    let home = std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .context("neither XDG_CONFIG_HOME nor HOME is set; cannot tell where user units live")?;
    Ok(PathBuf::from(home).join(".config"))
}

/// `systemd-escape --path`, done here when the tool is missing (same rules: `/` becomes `-`,
/// bytes outside `[A-Za-z0-9:_.]` and a leading `.` become `\xNN`).
pub fn escape_path(path: &Path) -> Result<String> {
    if let Ok(out) = Command::new("systemd-escape")
        .arg("--path")
        .arg(path)
        .stderr(Stdio::null())
        .output()
        && out.status.success()
    {
        return Ok(String::from_utf8_lossy(&out.stdout).trim().to_string());
    }
    Ok(escape_path_builtin(path))
}

fn escape_path_builtin(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    let parts: Vec<&[u8]> = bytes
        .split(|b| *b == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
        .collect();
    if parts.is_empty() {
        return "-".to_string();
    }
    let mut out = String::new();
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            out.push('-');
        }
        for (j, &b) in part.iter().enumerate() {
            let plain = b.is_ascii_alphanumeric()
                || b == b':'
                || b == b'_'
                || (b == b'.' && !(i == 0 && j == 0));
            if plain {
                out.push(b as char);
            } else {
                out.push_str(&format!("\\x{b:02x}"));
            }
        }
    }
    out
}

/// The unit text for the binary at `bin`.
pub fn unit_text(bin: &Path) -> String {
    TEMPLATE.replace(TEMPLATE_BIN, &bin.display().to_string())
}

/// Whether `systemctl --user` can talk to a user manager.
fn user_manager_reachable() -> bool {
    Command::new("systemctl")
        .args(["--user", "show-environment"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn systemctl(args: &[&str]) -> Result<()> {
    let out = Command::new("systemctl")
        .arg("--user")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running systemctl")?;
    if !out.status.success() {
        bail!(
            "`systemctl --user {}` failed: {}; see `journalctl --user -u cairn-mount@*`",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn absolute_dir(dir: &Path) -> Result<PathBuf> {
    let abs = std::path::absolute(dir)
        .with_context(|| format!("cannot make {} absolute", dir.display()))?;
    // Resolve symlinks where the directory exists, so the instance names the real path the
    // daemon will report.
    Ok(fs::canonicalize(&abs).unwrap_or(abs))
}

pub fn install(dir: &Path, settings: &InstanceSettings) -> Result<()> {
    let dir = absolute_dir(dir)?;
    let bin = std::env::current_exe()
        .context("cannot find the path of the running cairn binary")?
        .canonicalize()
        .context("cannot resolve the path of the running cairn binary")?;
    let config = config_home()?;
    let unit_dir = config.join("systemd/user");
    fs::create_dir_all(&unit_dir).with_context(|| format!("creating {}", unit_dir.display()))?;
    let unit_path = unit_dir.join(UNIT_NAME);
    fs::write(&unit_path, unit_text(&bin))
        .with_context(|| format!("writing {}", unit_path.display()))?;

    let instance = escape_path(&dir)?;
    let env_dir = config.join("cairn");
    fs::create_dir_all(&env_dir).with_context(|| format!("creating {}", env_dir.display()))?;
    let env_path = env_dir.join(format!("mount-{instance}.env"));
    let mut env = format!("CAIRN_VAULT={}\n", settings.vault);
    if let Some(d) = settings.data_dir {
        env += &format!("CAIRN_DATA_DIR={}\n", absolute_dir(d)?.display());
    }
    if let Some(c) = settings.config {
        env += &format!("CAIRN_CONFIG={}\n", absolute_dir(c)?.display());
    }
    fs::write(&env_path, env).with_context(|| format!("writing {}", env_path.display()))?;
    let service = format!("cairn-mount@{instance}.service");
    println!("wrote {}", unit_path.display());
    println!("wrote {}", env_path.display());

    if !user_manager_reachable() {
        println!(
            "no systemd user manager is reachable from here (container, CI or no login session), so nothing was started; in a login session run:"
        );
        println!("  systemctl --user daemon-reload");
        println!("  systemctl --user enable --now '{service}'");
        println!("(and `loginctl enable-linger $USER` to keep it running after logout)");
        return Ok(());
    }
    systemctl(&["daemon-reload"])?;
    systemctl(&["enable", "--now", &service])?;
    println!(
        "started {service}: vault {:?} is mounted at {} and comes back at every login",
        settings.vault,
        dir.display()
    );
    println!(
        "status: `systemctl --user status '{service}'`, logs: `journalctl --user -u '{service}'`"
    );
    Ok(())
}

pub fn uninstall(dir: &Path) -> Result<()> {
    let dir = absolute_dir(dir)?;
    let instance = escape_path(&dir)?;
    let service = format!("cairn-mount@{instance}.service");
    let config = config_home()?;
    let env_path = config.join("cairn").join(format!("mount-{instance}.env"));
    let unit_path = config.join("systemd/user").join(UNIT_NAME);
    if !env_path.exists() && !unit_path.exists() {
        bail!(
            "no cairn service is installed for {} ({} is missing); `ls {}` shows the installed ones",
            dir.display(),
            env_path.display(),
            config.join("cairn").display()
        );
    }
    let reachable = user_manager_reachable();
    if reachable {
        // Stopping runs `cairn unmount`, which waits for the final flush.
        systemctl(&["disable", "--now", &service])?;
    }
    let _ = fs::remove_file(&env_path);
    println!("removed {}", env_path.display());
    let others = fs::read_dir(config.join("cairn"))
        .map(|rd| {
            rd.flatten().any(|e| {
                let n = e.file_name();
                let n = n.to_string_lossy();
                n.starts_with("mount-") && n.ends_with(".env")
            })
        })
        .unwrap_or(false);
    if !others && unit_path.exists() {
        fs::remove_file(&unit_path).with_context(|| format!("removing {}", unit_path.display()))?;
        println!(
            "removed {} (no other cairn mount uses it)",
            unit_path.display()
        );
    }
    if reachable {
        systemctl(&["daemon-reload"])?;
        println!("stopped and disabled {service}");
    } else {
        println!(
            "no systemd user manager is reachable from here; in a login session run:\n  systemctl --user disable --now '{service}'\n  systemctl --user daemon-reload"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_escaping_matches_systemd() {
        let cases = [
            ("/home/u/Cairn", "home-u-Cairn"),
            ("/home/u/My Files/", "home-u-My\\x20Files"),
            ("/home/u/a-b", "home-u-a\\x2db"),
            ("/.hidden/x", "\\x2ehidden-x"),
            ("/", "-"),
        ];
        for (path, want) in cases {
            assert_eq!(escape_path_builtin(Path::new(path)), want, "{path}");
        }
        // Cross-check against the real tool where it exists.
        for (path, _) in cases {
            if let Ok(out) = Command::new("systemd-escape")
                .arg("--path")
                .arg(path)
                .output()
                && out.status.success()
            {
                assert_eq!(
                    escape_path_builtin(Path::new(path)),
                    String::from_utf8_lossy(&out.stdout).trim(),
                    "{path}"
                );
            }
        }
    }

    #[test]
    fn the_unit_runs_the_given_binary_on_the_instance_path() {
        let text = unit_text(Path::new("/opt/cairn/bin/cairn"));
        assert!(
            text.contains("ExecStart=/opt/cairn/bin/cairn mount %f\n"),
            "{text}"
        );
        assert!(
            text.contains("ExecStop=/opt/cairn/bin/cairn unmount %f\n"),
            "{text}"
        );
        assert!(text.contains("Type=notify"));
        assert!(!text.contains(".cargo/bin"));
    }
}
