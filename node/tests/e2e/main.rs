//! End-to-end tests against real `ternd` processes and real SMTP peers.
//! One test binary (faster to link) with a file per topic.

#![allow(clippy::unwrap_used)]

mod durability;
mod harness;
mod node;
mod smtp;
