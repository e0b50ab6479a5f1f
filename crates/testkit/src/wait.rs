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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_condition_that_holds_returns_at_once() {
        let took = wait_until(Duration::from_secs(5), "true", || true).expect("no timeout");
        assert!(took < Duration::from_secs(1), "{took:?}");
    }

    #[test]
    fn a_condition_that_never_holds_times_out_naming_it() {
        let mut polls = 0;
        let e = wait_until(Duration::from_millis(100), "the impossible", || {
            polls += 1;
            false
        })
        .expect_err("timeout");
        assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
        assert!(e.to_string().contains("the impossible"), "{e}");
        assert!(polls >= 2, "polled {polls} times");
    }
}
