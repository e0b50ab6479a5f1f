//! A test cluster's certificates, made the way an operator makes them:
//! `ternctl cert init-ca` once, `ternctl cert node --id N` per node, and
//! `ternctl cert client --role admin` for the harness's own ternctl calls.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Error, Result};

pub struct TestPki {
    dir: tempfile::TempDir,
    ternctl: PathBuf,
}

/// The harness's operator name (its client certificate's `tern://client/admin/<name>`).
pub const HARNESS_CLIENT: &str = "harness";

impl TestPki {
    /// A new CA and the harness's admin client certificate, made with `ternctl`.
    pub fn new(ternctl: &Path) -> Result<TestPki> {
        let pki = TestPki {
            dir: tempfile::tempdir().map_err(Error::io("PKI temp dir"))?,
            ternctl: ternctl.to_owned(),
        };
        pki.cert(&["init-ca", "--name", "Tern test CA", "--days", "2"])?;
        pki.cert(&["client", "--name", HARNESS_CLIENT, "--role", "admin", "--days", "2"])?;
        Ok(pki)
    }

    /// As [`TestPki::new`], with the workspace's `ternctl` ([`crate::bin`]).
    pub fn with_workspace_ternctl() -> Result<TestPki> {
        TestPki::new(&crate::try_bin("ternctl")?)
    }

    fn cert(&self, args: &[&str]) -> Result<()> {
        let (sub, rest) = args
            .split_first()
            .ok_or_else(|| Error::Failed("no cert subcommand".into()))?;
        let out = Command::new(&self.ternctl)
            .args(["cert", sub, "--dir"])
            .arg(self.dir.path())
            .args(rest)
            .output()
            .map_err(Error::io("running ternctl cert"))?;
        if !out.status.success() {
            return Err(Error::Failed(format!(
                "ternctl cert {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Issues a certificate for node `id` (once; later calls reuse it).
    pub fn issue_node(&self, id: u64) -> Result<()> {
        if !self.path(&format!("node-{id}.crt")).exists() {
            let id = id.to_string();
            self.cert(&[
                "node",
                "--id",
                &id,
                "--host",
                "127.0.0.1",
                "--host",
                "localhost",
                "--days",
                "2",
            ])?;
        }
        Ok(())
    }

    /// Issues another client certificate (e.g. a viewer), returning (cert, key).
    pub fn issue_client(&self, name: &str, role: &str) -> Result<(PathBuf, PathBuf)> {
        self.cert(&["client", "--name", name, "--role", role, "--days", "2"])?;
        Ok((
            self.path(&format!("client-{name}.crt")),
            self.path(&format!("client-{name}.key")),
        ))
    }

    /// `[cluster]` lines for node `id` (its certificate issued if needed).
    pub fn cluster_toml(&self, id: u64) -> Result<String> {
        self.issue_node(id)?;
        Ok(format!(
            "tls_cert = \"{}\"\ntls_key = \"{}\"\ntls_ca = \"{}\"\n",
            self.path(&format!("node-{id}.crt")).display(),
            self.path(&format!("node-{id}.key")).display(),
            self.path("ca.crt").display()
        ))
    }

    /// ternctl's TLS flags as environment (`TERN_TLS_CA/CERT/KEY`), with the
    /// harness's admin client certificate.
    pub fn ternctl_env(&self) -> Vec<(String, String)> {
        vec![
            ("TERN_TLS_CA".into(), self.path("ca.crt").display().to_string()),
            (
                "TERN_TLS_CERT".into(),
                self.path(&format!("client-{HARNESS_CLIENT}.crt")).display().to_string(),
            ),
            (
                "TERN_TLS_KEY".into(),
                self.path(&format!("client-{HARNESS_CLIENT}.key")).display().to_string(),
            ),
        ]
    }
}
