use super::*;

/// A private ext4 filesystem on a loop device (a sparse image file in a test's tempdir),
/// unmounted on drop, before the tempdir (whose clone it holds) can go: free space and
/// releases on it are the test's alone.
pub struct LoopFs {
    pub mnt: PathBuf,
    _dirs: Dirs,
}

impl LoopFs {
    pub fn new(dirs: &Dirs, size_mib: u64) -> LoopFs {
        let img = dirs.root.join("fs.img");
        let mnt = dirs.root.join("fs");
        fs::create_dir_all(&mnt).expect("mkdir");
        fs::File::create(&img)
            .and_then(|f| f.set_len(size_mib << 20))
            .expect("image");
        let ok = Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&img)
            .status()
            .expect("mkfs.ext4")
            .success();
        assert!(ok, "mkfs.ext4 failed");
        let ok = Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt)
            .status()
            .expect("mount")
            .success();
        assert!(ok, "loop mount failed");
        LoopFs {
            mnt,
            _dirs: dirs.clone(),
        }
    }

    /// `dirs` with upper and work on this filesystem (created).
    pub fn holding_upper(&self, dirs: &Dirs) -> Dirs {
        let mut d = dirs.clone();
        d.upper = self.mnt.join("upper");
        d.work = self.mnt.join("work");
        fs::create_dir_all(&d.upper).expect("mkdir upper");
        fs::create_dir_all(&d.work).expect("mkdir work");
        d
    }

    /// Free bytes for unprivileged use, as `df` shows them.
    pub fn avail(&self) -> u64 {
        let s = nix::sys::statvfs::statvfs(&self.mnt).expect("statvfs");
        s.blocks_available() * s.fragment_size()
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}
