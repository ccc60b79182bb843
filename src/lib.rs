//! unionfs-rs: an OverlayFS-compatible union filesystem in userspace.
//!
//! Layout (DESIGN.md section 1): `layer` (symlink-safe access beneath a layer root),
//! `union` (the overlay semantics, FUSE-free), `fuse` (the thin fuser adapter), `cli`.

pub mod cache;
pub mod cli;
pub mod control;
pub mod fuse;
pub mod layer;
pub mod logger;
pub mod quota;
pub mod union;
