//! `unionfs-rs quota report|limit`: xfs_quota's vocabulary over the control socket.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::control;
use crate::quota::human;

/// `quota report [-h] [--json] [MERGED…]`; no mount point: every unionfs-rs mount.
pub fn report(mounts: &[PathBuf], human_sizes: bool, json: bool) -> Result<String, String> {
    let mounts: Vec<PathBuf> = if mounts.is_empty() {
        all_mounts()
    } else {
        mounts
            .iter()
            .map(|m| {
                m.canonicalize()
                    .map_err(|e| format!("{}: {e}", m.display()))
            })
            .collect::<Result<_, _>>()?
    };
    if mounts.is_empty() {
        return Err("no unionfs-rs mounts".into());
    }
    let mut out = String::new();
    let mut jsons = Vec::new();
    for m in &mounts {
        if json {
            let r = control::request(m, "quota-report")?;
            jsons.push(r);
            continue;
        }
        let r = control::request(m, "quota-report kv")?;
        if r.starts_with('{') {
            // An error object.
            out.push_str(&format!("{}: {}\n", m.display(), r));
            continue;
        }
        let kv: HashMap<&str, i64> = r
            .lines()
            .filter_map(|l| l.split_once('='))
            .filter_map(|(k, v)| v.parse().ok().map(|v| (k, v)))
            .collect();
        out.push_str(&table(m, &kv, human_sizes));
    }
    if json {
        return Ok(format!("[{}]\n", jsons.join(",")));
    }
    Ok(out)
}

fn grace(left: i64) -> String {
    match left {
        l if l < 0 => "[--------]".into(),
        0 => "[none]".into(),
        l if l >= 86400 => format!("[{}d{}h]", l / 86400, (l % 86400) / 3600),
        l if l >= 3600 => format!("[{}h{}m]", l / 3600, (l % 3600) / 60),
        l => format!("[{}m{}s]", l / 60, l % 60),
    }
}

fn table(m: &Path, kv: &HashMap<&str, i64>, h: bool) -> String {
    let g = |k: &str| kv.get(k).copied().unwrap_or(0);
    let size = |v: i64| {
        if h {
            human(v.max(0) as u64)
        } else {
            // 1 KiB blocks, as xfs_quota prints without -h.
            format!("{}", (v.max(0) as u64).div_ceil(1024))
        }
    };
    let cnt = |v: i64| {
        if h {
            human(v.max(0) as u64)
        } else {
            v.to_string()
        }
    };
    let mut s = format!("Project quota on {} (unionfs-rs)\n", m.display());
    s.push_str(&format!(
        "{:<10} {:>10} {:>10} {:>10} {:>14} {:>10} {:>10} {:>10} {:>14}\n",
        "Project ID",
        "Blocks",
        "Soft",
        "Hard",
        "Warn/Grace",
        "Inodes",
        "Soft",
        "Hard",
        "Warn/Grace"
    ));
    s.push_str(&format!("{}\n", "-".repeat(106)));
    s.push_str(&format!(
        "{:<10} {:>10} {:>10} {:>10} {:>14} {:>10} {:>10} {:>10} {:>14}\n",
        format!("#{}", g("project_id")),
        size(g("bused")),
        size(g("bsoft")),
        size(g("bhard")),
        format!("00 {}", grace(g("bleft"))),
        cnt(g("iused")),
        cnt(g("isoft")),
        cnt(g("ihard")),
        format!("00 {}", grace(g("ileft"))),
    ));
    s.push('\n');
    s
}

/// `quota limit [--bhard …] … MERGED`.
pub fn limit(merged: &Path, args: &[String]) -> Result<String, String> {
    if args.is_empty() {
        return Err(
            "nothing to change (give --bhard, --bsoft, --ihard, --isoft, --bgrace or --igrace)"
                .into(),
        );
    }
    // Validate here too, so bad input fails before talking to the daemon.
    let mut probe = crate::quota::Limits::default();
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    // Soft/hard ordering is checked by the daemon against the limits in force.
    for a in &refs {
        control::apply_limit_args(&mut probe, &[a]).or_else(|e| {
            if e.contains("above the hard limit") {
                Ok(())
            } else {
                Err(e)
            }
        })?;
    }
    let m = merged
        .canonicalize()
        .map_err(|e| format!("{}: {e}", merged.display()))?;
    let r = control::request(&m, &format!("quota-limit {}", args.join(" ")))?;
    if let Some(e) = r.strip_prefix("{\"error\":") {
        return Err(e.trim_end_matches('}').trim_matches('"').to_string());
    }
    report(&[m], false, false)
}

/// Every mounted unionfs-rs filesystem.
pub fn all_mounts() -> Vec<PathBuf> {
    let Ok(s) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    s.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-")?;
            if f.get(sep + 1)? == &"fuse.unionfs-rs" {
                Some(PathBuf::from(super::daemon::unescape(f.get(4)?)))
            } else {
                None
            }
        })
        .collect()
}
