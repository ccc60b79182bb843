//! ID mapping between the files on disk and the merged view (fuse-overlayfs' `uidmapping=`,
//! `gidmapping=`, `squash_to_uid=`, `squash_to_gid=`, as containers-storage passes them).
//!
//! `A:B:N` says, as fuse-overlayfs reads it: ids A..A+N stored in the layers (the image's own
//! ids) are shown as B..B+N through the mount (ids of the daemon's user namespace, where the
//! container's processes' ids appear). Containers-storage passes e.g.
//! `uidmapping=:0:1:1002:1002:0:1:…` for `--userns=keep-id`. Disk ids outside every range show
//! as the overflow id 65534; view ids outside every range cannot be written (EINVAL, as chown(2)
//! for an unmapped id). A squash id makes every object show as owned by it.

/// The overflow id shown for unmapped owners.
pub const OVERFLOW_ID: u32 = 65534;

/// One direction-agnostic id map.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdMap {
    /// (view start, disk start, count)
    pub ranges: Vec<(u32, u32, u32)>,
    /// Show every object as owned by this id.
    pub squash: Option<u32>,
}

impl IdMap {
    /// Parse `[:]DISK:VIEW:N[:DISK:VIEW:N…]`.
    pub fn parse(s: &str) -> Result<IdMap, String> {
        let s = s.strip_prefix(':').unwrap_or(s);
        let nums: Vec<u32> = s
            .split(':')
            .map(|x| {
                x.trim()
                    .parse::<u32>()
                    .map_err(|_| format!("invalid id mapping '{s}': '{x}' is not a number"))
            })
            .collect::<Result<_, _>>()?;
        if nums.is_empty() || nums.len() % 3 != 0 {
            return Err(format!(
                "invalid id mapping '{s}': expected ID:MAPPED_ID:COUNT triples"
            ));
        }
        // Stored as (view start, disk start, count).
        let ranges: Vec<(u32, u32, u32)> = nums.chunks(3).map(|c| (c[1], c[0], c[2])).collect();
        if ranges.iter().any(|r| r.2 == 0) {
            return Err(format!("invalid id mapping '{s}': a range has count 0"));
        }
        // As the kernel's uid_map rules: every range within the 32-bit ids (4294967295, the
        // invalid id, never mapped), and no two
        // overlapping on either side (an id would map two ways).
        let end = |start: u32, n: u32| u64::from(start) + u64::from(n);
        if let Some(r) = ranges
            .iter()
            .find(|r| end(r.0, r.2) > u64::from(u32::MAX) || end(r.1, r.2) > u64::from(u32::MAX))
        {
            return Err(format!(
                "invalid id mapping '{s}': {}:{}:{} goes past the largest id",
                r.1, r.0, r.2
            ));
        }
        for (i, a) in ranges.iter().enumerate() {
            for b in &ranges[i + 1..] {
                let overlap = |x: u32, y: u32| u64::from(x.max(y)) < end(x, a.2).min(end(y, b.2));
                if overlap(a.0, b.0) || overlap(a.1, b.1) {
                    return Err(format!(
                        "invalid id mapping '{s}': ranges {}:{}:{} and {}:{}:{} overlap",
                        a.1, a.0, a.2, b.1, b.0, b.2
                    ));
                }
            }
        }
        Ok(IdMap {
            ranges,
            squash: None,
        })
    }

    /// Is this the identity (nothing to do)?
    pub fn is_identity(&self) -> bool {
        self.ranges.is_empty() && self.squash.is_none()
    }

    /// The view id of a disk id; `None` if no range maps it (shown as the overflow id).
    pub fn view_of(&self, disk: u32) -> Option<u32> {
        if let Some(s) = self.squash {
            return Some(s);
        }
        if self.ranges.is_empty() {
            return Some(disk);
        }
        self.ranges
            .iter()
            .find(|&&(_, h, n)| disk >= h && disk - h < n)
            .map(|&(c, h, _)| c + (disk - h))
    }

    /// The id the merged view shows for a disk id.
    pub fn to_view(&self, disk: u32) -> u32 {
        self.view_of(disk).unwrap_or(OVERFLOW_ID)
    }

    /// The disk id for a view id (`None`: unmapped).
    pub fn to_disk(&self, view: u32) -> Option<u32> {
        if self.ranges.is_empty() {
            return Some(view);
        }
        self.ranges
            .iter()
            .find(|&&(c, _, n)| view >= c && view - c < n)
            .map(|&(c, h, _)| h + (view - c))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_both_ways() {
        // Disk ids 0.. show as 100000.. (fuse-overlayfs' reading of podman's option).
        let m = IdMap::parse(":0:100000:65536").unwrap();
        assert_eq!(m.to_view(5), 100005);
        assert_eq!(m.to_disk(100000), Some(0));
        assert_eq!(m.to_disk(5), None);
        assert_eq!(m.to_view(70000), OVERFLOW_ID);
        // keep-id for uid 1002: image root (disk 0) shows as 1 (container root in the
        // daemon's namespace); the user's own id 1002 is disk 0's neighbour range.
        let k = IdMap::parse(":0:1:1002:1002:0:1:1003:1003:64534").unwrap();
        assert_eq!(k.to_view(0), 1);
        assert_eq!(k.to_view(1002), 0);
        assert_eq!(k.to_view(1003), 1003);
        assert_eq!(k.to_disk(0), Some(1002));
        assert_eq!(k.to_disk(1), Some(0));
        assert!(IdMap::parse("1:2").is_err());
        assert!(IdMap::parse("a:b:c").is_err());
        // Overlapping ranges (either side) and ranges past the largest id.
        assert!(IdMap::parse("0:100:10:5:200:10").is_err());
        assert!(IdMap::parse("0:100:10:10:105:10").is_err());
        assert!(IdMap::parse("0:0:4294967295").is_ok());
        assert!(IdMap::parse("1:0:4294967296").is_err());
        assert!(IdMap::parse("1:0:4294967295").is_err());
        assert!(IdMap::parse("0:100:10:10:110:10").is_ok());
        assert!(IdMap::default().is_identity());
    }
}
