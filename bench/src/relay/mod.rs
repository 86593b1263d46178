//! `orly-bench`'s parts: ingest rate, REQ latency and memory of the real `orly` binary in
//! several deployments ([`Mode`]), driven over raw WebSockets ([`client`]) against child
//! processes ([`process`]); live fan-out latency over many subscriptions, on one relay or
//! across replicas ([`fanout`]); the load of many connections and stalled readers
//! ([`load`]); printed as tables ([`report`]). [`live`] holds the subscribers, publishers and
//! delivery tally both share, [`matcher`] the client side's filter matching, [`net`] the
//! sockets.

pub mod client;
pub mod dataset;
pub mod fanout;
pub mod live;
pub mod load;
pub mod matcher;
pub mod net;
pub mod postgres;
pub mod process;
pub mod report;

use clap::ValueEnum;

/// How the relay is deployed for a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// `orly` with its store in-process on SQLite.
    LocalSqlite,
    /// `orly db` on SQLite plus `orly` reaching it over gRPC.
    SplitSqlite,
    /// `orly` with its store in-process on PostgreSQL.
    LocalPostgres,
    /// local/SQLite with ACL mode `follows` (an admin following 10,000 keys), in-process.
    FollowsLocal,
    /// The same with the ACL in an `orly acl` process, over gRPC.
    FollowsGrpc,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::LocalSqlite => "local/SQLite",
            Mode::SplitSqlite => "split/SQLite",
            Mode::LocalPostgres => "local/PostgreSQL",
            Mode::FollowsLocal => "follows/local",
            Mode::FollowsGrpc => "follows/gRPC",
        }
    }
}
