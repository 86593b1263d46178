//! orly's benchmarks, as a library the three benchmark binaries share: one event generator
//! ([`dataset`]), one table renderer ([`table`]), the `orly` binary they start
//! ([`binaries`]), and each benchmark's own parts ([`relay`] for `orly-bench`, [`negentropy`]
//! for `orly-negentropy-bench`, [`sync`] for `orly-sync-bench`). None of it is in the relay.

pub mod binaries;
pub mod dataset;
pub mod negentropy;
pub mod relay;
pub mod sync;
pub mod table;
