//! Bounce classification and the suppression list.
//!
//! # Layout
//! - [`classify`]: which class a failure reply reports (shipped table plus
//!   `[[bounce_class]]`), pure.
//! - [`suppress`]: writing suppression entries to the control group (the
//!   admin API and feedback loops call [`suppress::suppress`]), the
//!   automatic additions after hard bounces (batched by one task), and
//!   the reply a suppressed recipient fails with.

pub mod classify;
pub mod suppress;

pub use classify::{Class, Classifier};
