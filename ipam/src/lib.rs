//! `cni-host-local`: the host-local IPAM plugin, leases on disk in the reference's layout.

pub mod allocator;
pub mod config;
pub mod dns;
pub mod error;
pub mod plugin;
pub mod range;
pub mod store;

pub use plugin::HostLocal;

#[cfg(test)]
mod proptests;
