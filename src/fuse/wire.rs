//! The FUSE wire format (include/uapi/linux/fuse.h, protocol 7.41+) for the io_uring transport,
//! which receives requests and writes replies itself instead of through fuser: the request
//! header, the per-operation argument structs, and the reply structs. Fields are read and written
//! at their documented offsets in native byte order; nothing here is `unsafe`.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::time::Duration;

use crate::union::Attr;

// Opcodes (enum fuse_opcode).
pub const LOOKUP: u32 = 1;
pub const FORGET: u32 = 2;
pub const GETATTR: u32 = 3;
pub const SETATTR: u32 = 4;
pub const READLINK: u32 = 5;
pub const SYMLINK: u32 = 6;
pub const MKNOD: u32 = 8;
pub const MKDIR: u32 = 9;
pub const UNLINK: u32 = 10;
pub const RMDIR: u32 = 11;
pub const RENAME: u32 = 12;
pub const LINK: u32 = 13;
pub const OPEN: u32 = 14;
pub const READ: u32 = 15;
pub const WRITE: u32 = 16;
pub const STATFS: u32 = 17;
pub const RELEASE: u32 = 18;
pub const FSYNC: u32 = 20;
pub const SETXATTR: u32 = 21;
pub const GETXATTR: u32 = 22;
pub const LISTXATTR: u32 = 23;
pub const REMOVEXATTR: u32 = 24;
pub const FLUSH: u32 = 25;
pub const INIT: u32 = 26;
pub const OPENDIR: u32 = 27;
pub const READDIR: u32 = 28;
pub const RELEASEDIR: u32 = 29;
pub const FSYNCDIR: u32 = 30;
pub const ACCESS: u32 = 34;
pub const CREATE: u32 = 35;
pub const INTERRUPT: u32 = 36;
pub const DESTROY: u32 = 38;
pub const IOCTL: u32 = 39;
pub const BATCH_FORGET: u32 = 42;
pub const FALLOCATE: u32 = 43;
pub const READDIRPLUS: u32 = 44;
pub const RENAME2: u32 = 45;
pub const LSEEK: u32 = 46;
pub const COPY_FILE_RANGE: u32 = 47;

// fuse_setattr_in.valid bits.
pub const FATTR_MODE: u32 = 1 << 0;
pub const FATTR_UID: u32 = 1 << 1;
pub const FATTR_GID: u32 = 1 << 2;
pub const FATTR_SIZE: u32 = 1 << 3;
pub const FATTR_ATIME: u32 = 1 << 4;
pub const FATTR_MTIME: u32 = 1 << 5;
pub const FATTR_FH: u32 = 1 << 6;
pub const FATTR_ATIME_NOW: u32 = 1 << 7;
pub const FATTR_MTIME_NOW: u32 = 1 << 8;
/// The daemon clears the set-id bits (a truncate by a caller without CAP_FSETID, with
/// FUSE_HANDLE_KILLPRIV_V2).
pub const FATTR_KILL_SUIDGID: u32 = 1 << 11;
/// fuse_open_in.open_flags: an open with O_TRUNC (atomic O_TRUNC) by a caller without
/// CAP_FSETID: the daemon clears the set-id bits.
pub const FUSE_OPEN_KILL_SUIDGID: u32 = 1 << 0;

/// fuse_getattr_in.getattr_flags: `fh` is valid.
pub const GETATTR_FH: u32 = 1 << 0;

// fuse_open_out.open_flags.
pub const FOPEN_KEEP_CACHE: u32 = 1 << 1;
pub const FOPEN_PASSTHROUGH: u32 = 1 << 7;

/// Size of struct fuse_in_header.
pub const IN_HEADER_LEN: usize = 40;
/// Size of struct fuse_out_header.
pub const OUT_HEADER_LEN: usize = 16;
/// Size of struct fuse_attr.
const ATTR_LEN: usize = 88;
/// Size of struct fuse_entry_out.
pub const ENTRY_OUT_LEN: usize = 40 + ATTR_LEN;
/// Size of struct fuse_attr_out.
pub const ATTR_OUT_LEN: usize = 16 + ATTR_LEN;
/// Size of struct fuse_open_out.
pub const OPEN_OUT_LEN: usize = 16;
/// Size of struct fuse_kstatfs (= fuse_statfs_out).
pub const STATFS_OUT_LEN: usize = 80;
/// Size of struct fuse_dirent without its name.
const DIRENT_LEN: usize = 24;

/// A request argument of the wrong size: the kernel and we disagree on the protocol.
#[derive(Debug, PartialEq, Eq)]
pub struct Short;

/// Little reader over an argument struct.
#[derive(Clone, Copy)]
pub struct Arg<'a>(pub &'a [u8]);

impl<'a> Arg<'a> {
    pub fn u32(&self, off: usize) -> Result<u32, Short> {
        let b = self.0.get(off..off + 4).ok_or(Short)?;
        Ok(u32::from_ne_bytes(b.try_into().map_err(|_| Short)?))
    }
    pub fn i32(&self, off: usize) -> Result<i32, Short> {
        self.u32(off).map(|v| v as i32)
    }
    pub fn u64(&self, off: usize) -> Result<u64, Short> {
        let b = self.0.get(off..off + 8).ok_or(Short)?;
        Ok(u64::from_ne_bytes(b.try_into().map_err(|_| Short)?))
    }
    pub fn u16(&self, off: usize) -> Result<u16, Short> {
        let b = self.0.get(off..off + 2).ok_or(Short)?;
        Ok(u16::from_ne_bytes(b.try_into().map_err(|_| Short)?))
    }
}

/// The NUL-terminated strings at the start of a payload (names of LOOKUP, SYMLINK, RENAME…),
/// in order; the bytes after the last one requested are the remainder.
pub struct Names<'a>(&'a [u8]);

impl<'a> Names<'a> {
    pub fn new(b: &'a [u8]) -> Names<'a> {
        Names(b)
    }
    /// The next NUL-terminated string.
    pub fn next_name(&mut self) -> Result<&'a OsStr, Short> {
        let end = self.0.iter().position(|&c| c == 0).ok_or(Short)?;
        let (name, rest) = self.0.split_at(end);
        self.0 = &rest[1..];
        Ok(OsStr::from_bytes(name))
    }
    /// What follows the strings taken so far.
    pub fn rest(&self) -> &'a [u8] {
        self.0
    }
}

/// struct fuse_in_header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InHeader {
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

impl InHeader {
    pub fn parse(b: &[u8]) -> Result<InHeader, Short> {
        let a = Arg(b);
        Ok(InHeader {
            opcode: a.u32(4)?,
            unique: a.u64(8)?,
            nodeid: a.u64(16)?,
            uid: a.u32(24)?,
            gid: a.u32(28)?,
            pid: a.u32(32)?,
        })
    }
}

/// Writes a reply struct field by field.
pub struct Out<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl<'a> Out<'a> {
    pub fn new(buf: &'a mut [u8]) -> Out<'a> {
        Out { buf, len: 0 }
    }
    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Room left.
    pub fn room(&self) -> usize {
        self.buf.len() - self.len
    }
    /// Write no more than `n` bytes in all.
    pub fn limit(&mut self, n: usize) {
        let buf = std::mem::take(&mut self.buf);
        let n = n.max(self.len).min(buf.len());
        self.buf = &mut buf[..n];
    }
    /// Append bytes; false (nothing written) if they do not fit.
    pub fn bytes(&mut self, b: &[u8]) -> bool {
        let Some(dst) = self.buf.get_mut(self.len..self.len + b.len()) else {
            return false;
        };
        dst.copy_from_slice(b);
        self.len += b.len();
        true
    }
    fn u32(&mut self, v: u32) {
        self.bytes(&v.to_ne_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_ne_bytes());
    }
    /// `n` (at most 32) zero bytes: padding and spare fields.
    fn zeros(&mut self, n: usize) {
        self.bytes(&[0u8; 32][..n]);
    }

    /// struct fuse_attr.
    fn attr(&mut self, a: &Attr) {
        self.u64(a.ino);
        self.u64(a.size);
        self.u64(a.blocks);
        self.u64(a.atime.0 as u64);
        self.u64(a.mtime.0 as u64);
        self.u64(a.ctime.0 as u64);
        self.u32(a.atime.1 as u32);
        self.u32(a.mtime.1 as u32);
        self.u32(a.ctime.1 as u32);
        self.u32(a.mode);
        self.u32(a.nlink as u32);
        self.u32(a.uid);
        self.u32(a.gid);
        self.u32(a.rdev as u32);
        self.u32(a.blksize as u32);
        self.u32(0); // flags
    }

    /// struct fuse_entry_out.
    pub fn entry(&mut self, a: &Attr, ttl: Duration) {
        self.u64(a.ino);
        self.u64(a.generation);
        self.u64(ttl.as_secs());
        self.u64(ttl.as_secs());
        self.u32(ttl.subsec_nanos());
        self.u32(ttl.subsec_nanos());
        self.attr(a);
    }

    /// struct fuse_attr_out.
    pub fn attr_out(&mut self, a: &Attr, ttl: Duration) {
        self.u64(ttl.as_secs());
        self.u32(ttl.subsec_nanos());
        self.u32(0);
        self.attr(a);
    }

    /// struct fuse_open_out.
    pub fn open(&mut self, fh: u64, open_flags: u32, backing_id: u32) {
        self.u64(fh);
        self.u32(open_flags);
        self.u32(backing_id);
    }

    /// struct fuse_write_out.
    pub fn write(&mut self, size: u32) {
        self.u32(size);
        self.u32(0);
    }

    /// struct fuse_getxattr_out.
    pub fn xattr_size(&mut self, size: u32) {
        self.u32(size);
        self.u32(0);
    }

    /// struct fuse_lseek_out.
    pub fn lseek(&mut self, off: i64) {
        self.u64(off as u64);
    }

    /// struct fuse_kstatfs.
    pub fn statfs(&mut self, s: &libc::statfs) {
        self.u64(s.f_blocks);
        self.u64(s.f_bfree);
        self.u64(s.f_bavail);
        self.u64(s.f_files);
        self.u64(s.f_ffree);
        self.u32(s.f_bsize as u32);
        self.u32(s.f_namelen as u32);
        self.u32(s.f_frsize as u32);
        self.u32(0);
        self.zeros(24);
    }

    /// struct fuse_ioctl_out (result 0, no retry) and the output data; false if it does not
    /// fit.
    pub fn ioctl(&mut self, data: &[u8]) -> bool {
        if 16 + data.len() > self.room() {
            return false;
        }
        self.zeros(16);
        self.bytes(data)
    }

    /// One struct fuse_dirent (padded to 8 bytes); false if it does not fit.
    pub fn dirent(&mut self, ino: u64, off: u64, mode: u32, name: &OsStr) -> bool {
        let name = name.as_bytes();
        let size = dirent_size(name.len());
        if size > self.room() {
            return false;
        }
        self.u64(ino);
        self.u64(off);
        self.u32(name.len() as u32);
        self.u32((mode & libc::S_IFMT) >> 12);
        self.bytes(name);
        self.zeros(size - DIRENT_LEN - name.len());
        true
    }

    /// One struct fuse_direntplus; false if it does not fit.
    pub fn direntplus(&mut self, a: &Attr, ttl: Duration, off: u64, name: &OsStr) -> bool {
        if ENTRY_OUT_LEN + dirent_size(name.len()) > self.room() {
            return false;
        }
        self.entry(a, ttl);
        self.dirent(a.ino, off, a.mode, name)
    }
}

/// FUSE_DIRENT_SIZE: the entry padded to a multiple of 8 bytes.
fn dirent_size(namelen: usize) -> usize {
    (DIRENT_LEN + namelen + 7) & !7
}

/// struct fuse_out_header.
pub fn out_header(buf: &mut [u8], len: u32, error: i32, unique: u64) {
    buf[0..4].copy_from_slice(&len.to_ne_bytes());
    buf[4..8].copy_from_slice(&error.to_ne_bytes());
    buf[8..16].copy_from_slice(&unique.to_ne_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr() -> Attr {
        Attr {
            ino: 7,
            generation: 3,
            mode: libc::S_IFREG | 0o644,
            nlink: 2,
            uid: 1000,
            gid: 100,
            rdev: 0,
            size: 12345,
            blocks: 24,
            blksize: 4096,
            atime: (1, 2),
            mtime: (3, 4),
            ctime: (5, 6),
        }
    }

    #[test]
    fn entry_out_has_the_abi_layout() {
        let mut buf = [0u8; 256];
        let mut o = Out::new(&mut buf);
        o.entry(&attr(), Duration::new(60, 5));
        assert_eq!(o.len(), ENTRY_OUT_LEN);
        let a = Arg(&buf);
        assert_eq!(a.u64(0), Ok(7)); // nodeid
        assert_eq!(a.u64(8), Ok(3)); // generation
        assert_eq!(a.u64(16), Ok(60)); // entry_valid
        assert_eq!(a.u32(32), Ok(5)); // entry_valid_nsec
        // fuse_attr at 40: ino, size, blocks, atime, mtime, ctime, then the nsecs, mode...
        assert_eq!(a.u64(40), Ok(7));
        assert_eq!(a.u64(48), Ok(12345));
        assert_eq!(a.u64(56), Ok(24));
        assert_eq!(a.u64(80), Ok(5)); // ctime
        assert_eq!(a.u32(88), Ok(2)); // atimensec
        assert_eq!(a.u32(100), Ok(libc::S_IFREG | 0o644)); // mode
        assert_eq!(a.u32(104), Ok(2)); // nlink
        assert_eq!(a.u32(108), Ok(1000));
        assert_eq!(a.u32(112), Ok(100));
        assert_eq!(a.u32(120), Ok(4096)); // blksize
    }

    #[test]
    fn dirents_are_padded_and_refused_when_full() {
        let mut buf = [0u8; 64];
        let mut o = Out::new(&mut buf);
        assert!(o.dirent(9, 1, libc::S_IFDIR, OsStr::new("abc")));
        assert_eq!(o.len(), 32);
        assert!(!o.dirent(9, 2, libc::S_IFREG, OsStr::new("a-much-longer-name")));
        assert_eq!(o.len(), 32);
        let a = Arg(&buf);
        assert_eq!(a.u32(16), Ok(3));
        assert_eq!(a.u32(20), Ok(libc::DT_DIR as u32));
        assert_eq!(&buf[24..27], b"abc");
        let mut big = [0u8; 512];
        let mut o = Out::new(&mut big);
        assert!(o.direntplus(&attr(), Duration::from_secs(1), 4, OsStr::new("f")));
        assert_eq!(o.len(), ENTRY_OUT_LEN + 32);
        assert_eq!(Arg(&big).u64(ENTRY_OUT_LEN), Ok(7));
    }

    #[test]
    fn ioctl_out_is_a_zero_result_then_the_data() {
        let mut buf = [0xffu8; 24];
        let mut o = Out::new(&mut buf);
        assert!(o.ioctl(&[1, 2, 3, 4]));
        assert_eq!(o.len(), 20);
        assert_eq!(&buf[..16], &[0u8; 16]);
        assert_eq!(&buf[16..20], &[1, 2, 3, 4]);
        let mut small = [0u8; 18];
        assert!(!Out::new(&mut small).ioctl(&[1, 2, 3, 4]));
    }

    #[test]
    fn names_split_at_nul() {
        let mut n = Names::new(b"old\0new\0tail");
        assert_eq!(n.next_name(), Ok(OsStr::new("old")));
        assert_eq!(n.next_name(), Ok(OsStr::new("new")));
        assert_eq!(n.rest(), b"tail");
        assert_eq!(n.next_name(), Err(Short));
    }

    #[test]
    fn short_arguments_are_refused() {
        assert_eq!(Arg(&[0u8; 6]).u64(0), Err(Short));
        assert_eq!(InHeader::parse(&[0u8; 20]), Err(Short));
    }
}
