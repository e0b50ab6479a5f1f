//! Waiting on a condition with a deadline: the only way tests wait.

use std::time::{Duration, Instant};

use crate::Error;

/// How often a condition is polled.
const POLL: Duration = Duration::from_millis(20);

/// Polls `cond` until it holds (the time it took) or `deadline` passes
/// ([`Error::Timeout`] naming `what`).
pub fn wait_until(deadline: Duration, what: &str, mut cond: impl FnMut() -> bool) -> crate::Result<Duration> {
    let start = Instant::now();
    loop {
        if cond() {
            return Ok(start.elapsed());
        }
        if start.elapsed() > deadline {
            return Err(Error::Timeout {
                what: what.to_owned(),
                deadline,
            });
        }
        std::thread::sleep(POLL);
    }
}

/// As [`wait_until`], panicking on timeout (for tests).
pub fn wait_for(deadline: Duration, what: &str, cond: impl FnMut() -> bool) {
    if let Err(e) = wait_until(deadline, what, cond) {
        panic!("{e}");
    }
}
