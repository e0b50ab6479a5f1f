//! Aggregate reports Tern sends for the cluster: TLS-RPT (RFC 8460) from
//! the outcomes of outbound TLS, and DMARC aggregate reports (RFC 7489
//! 7.2) from inbound checks. Each node records outcomes in memory; the
//! counts of a period are collected in the control group and the report
//! is built and sent once, by the control group's leader.

pub mod tls;
