//! The kernel's own readahead on the FUSE mount.
//!
//! The kernel reads ahead for buffered readers of a FUSE file through the mount's backing device
//! info (`/sys/class/bdi/MAJ:MIN/read_ahead_kb`), which starts at 128 KiB, whatever the disks
//! under the layers use (8 MiB for a virtio disk here). Kernel overlayfs reads the layer files
//! themselves and so gets their disks' readahead. As root the daemon sets the mount's value to
//! that of the layers' disks (or to `kernel_readahead_kb`), so the kernel keeps large reads in
//! flight, in parallel, straight into its page cache; our own readahead then only runs beyond it
//! (see `read.rs`). Rootless, sysfs is not writable and the kernel's 128 KiB stays.

use std::path::Path;

/// `MAJ:MIN` of the FUSE mount at `mountpoint` (the last one stacked there), from mountinfo.
/// Resolved once, right after mounting: later, another mount may be stacked on the same path.
pub fn mount_dev(mountpoint: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = mountpoint.to_str()?;
    info.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL…] - FSTYPE SOURCE SUPEROPTS
        let fstype = f
            .iter()
            .position(|x| *x == "-")
            .and_then(|i| f.get(i + 1))?;
        let fuse = *fstype == "fuse" || fstype.starts_with("fuse.");
        (fuse && f.len() > 4 && unescape(f[4]) == want).then(|| f[2].to_string())
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn read_kb(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The readahead of the block device holding a filesystem with `st_dev` (its disk's, for a
/// partition); None for filesystems without one (tmpfs, overlay, FUSE).
pub fn device_readahead_kb(st_dev: u64) -> Option<u64> {
    let (maj, min) = (libc::major(st_dev), libc::minor(st_dev));
    if maj == 0 {
        return None;
    }
    read_kb(&format!("/sys/dev/block/{maj}:{min}/queue/read_ahead_kb")).or_else(|| {
        read_kb(&format!(
            "/sys/dev/block/{maj}:{min}/../queue/read_ahead_kb"
        ))
    })
}

/// Set the kernel's readahead for the FUSE mount with device `dev` (`MAJ:MIN`, from
/// [`mount_dev`]) to `configured` KiB, or (0) to the largest readahead of the disks holding
/// `layer_devs`. Returns the value now in effect.
pub fn apply(dev: &str, layer_devs: &[u64], configured: u64) -> Result<u64, String> {
    let path = format!("/sys/class/bdi/{dev}/read_ahead_kb");
    let current = read_kb(&path).ok_or_else(|| format!("cannot read {path}"))?;
    let target = if configured > 0 {
        configured
    } else {
        match layer_devs
            .iter()
            .filter_map(|&d| device_readahead_kb(d))
            .max()
        {
            Some(kb) => kb,
            None => return Ok(current),
        }
    };
    if target != current {
        std::fs::write(&path, format!("{target}\n"))
            .map_err(|e| format!("cannot set {path} to {target}: {e}"))?;
    }
    read_kb(&path).ok_or_else(|| format!("cannot read {path}"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(super::unescape(r"/a\040b\134c"), "/a b\\c");
        assert_eq!(super::unescape(r"/plain"), "/plain");
        assert_eq!(super::unescape(r"/x\04"), r"/x\04");
    }

    #[test]
    fn no_block_device_no_readahead() {
        // makedev(0, 42): an anonymous device (tmpfs, overlay, FUSE).
        assert_eq!(super::device_readahead_kb(libc::makedev(0, 42)), None);
    }
}
