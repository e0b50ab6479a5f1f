//! Fencing of the end of data: before the final "." (or the last BDAT
//! byte) a delivery asks whether this node may still deliver the message.
//! A shard leader that was frozen (SIGSTOP, VM pause) mid-transaction and
//! woke after a new leader took over must not complete a delivery that the
//! new leader makes too.

use std::future::Future;
use std::pin::Pin;

/// The reply given to recipients whose transaction was abandoned by the
/// fence; the queue records no outcome for them.
pub const FENCED_REPLY: &str = "451 4.3.0 shard leadership not confirmed; delivery left to the current leader";

/// Says whether delivery may complete now.
pub trait Fence: Send + Sync + std::fmt::Debug {
    fn holds(&self) -> Pin<Box<dyn Future<Output = bool> + Send + '_>>;
}
