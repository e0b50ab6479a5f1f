//! End-to-end tests against real `ternd` processes and real SMTP peers.
//! One test binary (faster to link) with a file per topic; the plumbing
//! (process harness, peers, DNS, ports, waits) comes from `tern-testkit`.

#![allow(clippy::unwrap_used)]

mod api;
mod apikey;
mod arc;
mod backoff;
mod cert_reload;
mod cluster;
mod cluster_ops;
mod console;
mod dane;
mod delivery;
mod disk_full;
mod dkim;
mod dnsbl;
mod durability;
mod fbl;
mod filters;
mod future_release;
mod greylist;
mod harness;
mod inbound;
mod limits;
mod local;
mod metrics;
mod mta_sts;
mod node;
mod operators;
mod ops;
mod outbound_tls;
mod peers;
mod pools;
mod quiet;
mod reload;
mod reload_inbound;
mod reports;
mod requiretls;
mod shaping;
mod shards;
mod smtp;
mod spf_suite;
mod submission;
mod suppression;
mod webhook;
mod webhook_durable;
