//! Fencing of the end of data: before the final "." (or the last BDAT
//! byte) a delivery asks whether this node may still deliver the message.
//! A shard leader that was frozen (SIGSTOP, VM pause) mid-transaction and
//! woke after a new leader took over must not complete a delivery that the
//! new leader makes too.

use std::future::Future;
use std::pin::Pin;

/// The text of a fenced outcome; the fenced outcome itself is
/// [`RcptOutcome::Fenced`](super::RcptOutcome::Fenced), for which the
/// queue records nothing.
pub use tern_smtp::client::FENCED_REPLY;

/// Says whether delivery may complete now.
pub trait Fence: Send + Sync + std::fmt::Debug {
    fn holds(&self) -> Pin<Box<dyn Future<Output = bool> + Send + '_>>;
}
