//! The optional configuration file: mount options added to mounts before the caller's own
//! (which win). Its main use is a default size limit for every container mount podman makes
//! through the mount-program form, since containers-storage refuses `--storage-opt size=`
//! without XFS project quota and does not pass `mountopt` to mount programs.
//!
//! Looked up at `$UNIONFS_RS_CONFIG`, else `/etc/unionfs-rs/unionfs-rs.conf`, else
//! `$XDG_CONFIG_HOME/unionfs-rs/unionfs-rs.conf` (or `~/.config/…`). Format: `key = value`
//! lines, `#` comments:
//!
//! ```text
//! # every mount made with the `-o lowerdir=…` form (podman, buildah, fstab):
//! mount_program_options = size=10G
//! # every mount:
//! default_options = ttl=30
//! ```

use std::path::PathBuf;

/// What the config file says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    /// Options for `-o` form mounts.
    pub mount_program_options: Option<String>,
    /// Options for every mount.
    pub default_options: Option<String>,
    /// Where it was read from.
    pub path: Option<PathBuf>,
}

fn candidates() -> Vec<PathBuf> {
    if let Some(p) = std::env::var_os("UNIONFS_RS_CONFIG").filter(|p| !p.is_empty()) {
        return vec![PathBuf::from(p)];
    }
    let mut v = vec![PathBuf::from("/etc/unionfs-rs/unionfs-rs.conf")];
    let xdg = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")));
    if let Some(x) = xdg {
        v.push(x.join("unionfs-rs").join("unionfs-rs.conf"));
    }
    v
}

/// Parse config text.
pub fn parse(text: &str) -> Result<Config, String> {
    let mut c = Config::default();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| format!("line {}: expected key = value", i + 1))?;
        let v = v.trim().to_string();
        match k.trim() {
            "mount_program_options" => c.mount_program_options = Some(v),
            "default_options" => c.default_options = Some(v),
            other => return Err(format!("line {}: unknown key '{other}'", i + 1)),
        }
    }
    Ok(c)
}

/// Read the first config file that exists (none: empty config). One named by
/// `$UNIONFS_RS_CONFIG` must exist.
pub fn load() -> Result<Config, String> {
    // (Set but empty: no config file, as unset.)
    let named = std::env::var_os("UNIONFS_RS_CONFIG").is_some_and(|p| !p.is_empty());
    for p in candidates() {
        match std::fs::read_to_string(&p) {
            Ok(t) => {
                let mut c = parse(&t).map_err(|e| format!("{}: {e}", p.display()))?;
                c.path = Some(p);
                return Ok(c);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !named => continue,
            Err(e) => return Err(format!("{}: {e}", p.display())),
        }
    }
    Ok(Config::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        let c = parse("# c\nmount_program_options = size=10G,bsoft=8G\n\ndefault_options=ttl=5\n")
            .unwrap();
        assert_eq!(
            c.mount_program_options.as_deref(),
            Some("size=10G,bsoft=8G")
        );
        assert_eq!(c.default_options.as_deref(), Some("ttl=5"));
        assert!(parse("bogus = 1").is_err());
        assert!(parse("no equals").is_err());
    }
}
