//! Test fixtures for running CNI plugins as a runtime does, inside namespaces this process
//! makes and removes: a node namespace standing for the host, pod namespaces in both forms
//! runtimes use (`/run/netns/NAME`, `/proc/PID/ns/net` of a sleeping "pause" process).
//! Nothing here touches the root network namespace.

pub mod cluster;
pub mod netns;
pub mod plugin;
pub mod suite;
pub mod traffic;
pub mod world;

pub use netns::{is_root, require_root, Netns, Pause};
pub use plugin::{invoke, Out};
pub use world::{Plugins, World};
