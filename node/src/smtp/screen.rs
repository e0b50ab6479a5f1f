//! Screening of recipients from unauthenticated clients at RCPT time: DNS
//! block lists ([`super::dnsbl`]) and greylisting ([`super::greylist`]).
//!
//! Why at RCPT and not at connect: the refusal can name the recipient in
//! logs, `postmaster` stays reachable (RFC 5321 4.5.1) so a listed sender
//! can still ask for help, and clients that never send are not refused.
//! The block-list lookup starts at connect, so it is usually done by then.
//!
//! Never screened: clients in `relay_networks`, authenticated sessions
//! (the session does not ask), recipients whose local part is
//! `postmaster`. Order: block lists (`554 5.7.1`), then recipient
//! verification, then greylisting (`451 4.7.1`), so unknown users never
//! create triplets.

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use tokio::task::JoinHandle;
use tracing::info;

use super::dnsbl::{Dnsbl, Verdict};
use super::greylist::{Greylist, Outcome};
use crate::cluster::control::ControlState;
use crate::cluster::writer::ControlWriter;
use crate::config::Config;
use crate::metrics::ScreenMetrics;
use tern_smtp::Reply;

/// The screens of a node, shared by its listeners.
#[derive(Debug)]
pub struct Screen {
    dnsbl: Option<Arc<Dnsbl>>,
    greylist: Option<Arc<Greylist>>,
    relay_networks: Vec<IpNet>,
    metrics: ScreenMetrics,
}

impl Screen {
    /// `None` when neither `[dnsbl]` nor `[greylist]` is on. Call on the
    /// runtime (greylisting starts its writing task).
    pub fn from_config(
        config: &Config,
        control: Option<ControlState>,
        writer: Option<ControlWriter>,
        metrics: ScreenMetrics,
    ) -> anyhow::Result<Option<Arc<Screen>>> {
        Screen::rebuild(config, None, control, writer, metrics)
    }

    /// [`Screen::from_config`] after a config reload: the block-list
    /// resolver (and its cache) and the greylist (its writing task and
    /// pending writes) of `previous` are kept when their section did not
    /// change. Triplets live in the control group, so a new greylist
    /// knows every one the old one wrote.
    pub fn rebuild(
        config: &Config,
        previous: Option<&Screen>,
        control: Option<ControlState>,
        writer: Option<ControlWriter>,
        metrics: ScreenMetrics,
    ) -> anyhow::Result<Option<Arc<Screen>>> {
        let kept_dnsbl = previous
            .and_then(|p| p.dnsbl.as_ref())
            .filter(|d| *d.config() == config.dnsbl);
        let dnsbl = match kept_dnsbl {
            _ if !config.dnsbl.active() => None,
            Some(d) => Some(Arc::clone(d)),
            None => Some(Arc::new(Dnsbl::new(
                config.dnsbl.clone(),
                &config.dns_nameservers,
                metrics.clone(),
            )?)),
        };
        let kept_greylist = previous
            .and_then(|p| p.greylist.as_ref())
            .filter(|g| *g.config() == config.greylist);
        let greylist = match kept_greylist {
            _ if !config.greylist.enabled => None,
            Some(g) => Some(Arc::clone(g)),
            None => Some(Greylist::start(
                config.greylist.clone(),
                control,
                writer,
                metrics.clone(),
            )),
        };
        if dnsbl.is_none() && greylist.is_none() {
            return Ok(None);
        }
        Ok(Some(Arc::new(Screen {
            dnsbl,
            greylist,
            relay_networks: config.relay_networks.clone(),
            metrics,
        })))
    }

    /// The screening of one connection from `client`; starts its block
    /// list lookup now (call on the runtime).
    pub fn client(self: &Arc<Self>, client: IpAddr) -> ClientScreen {
        let client = client.to_canonical();
        let trusted = self.relay_networks.iter().any(|n| n.contains(&client));
        let dnsbl = match &self.dnsbl {
            Some(d) if !trusted && !d.exempt(client) => {
                let d = Arc::clone(d);
                Lookup::Running(tokio::spawn(async move { d.check(client).await }))
            }
            _ => Lookup::Done(Verdict::default()),
        };
        ClientScreen {
            screen: Arc::clone(self),
            client,
            trusted,
            dnsbl,
        }
    }
}

enum Lookup {
    Running(JoinHandle<Verdict>),
    Done(Verdict),
}

/// One connection's screening.
pub struct ClientScreen {
    screen: Arc<Screen>,
    client: IpAddr,
    /// In `relay_networks`: never screened.
    trusted: bool,
    dnsbl: Lookup,
}

impl Drop for ClientScreen {
    fn drop(&mut self) {
        if let Lookup::Running(task) = &self.dnsbl {
            task.abort();
        }
    }
}

impl ClientScreen {
    /// The verdict on one recipient: `verify` (recipient verification,
    /// when the session asked for it) runs between the block lists and
    /// greylisting.
    pub async fn recipient(
        &mut self,
        reverse_path: &str,
        address: &str,
        verify: Option<impl Future<Output = Result<(), Reply>>>,
    ) -> Result<(), Reply> {
        let postmaster = address
            .rsplit_once('@')
            .map_or(address, |(local, _)| local)
            .eq_ignore_ascii_case("postmaster");
        let screened = !self.trusted && !postmaster;
        if screened {
            let verdict = self.verdict().await;
            if verdict.reject {
                for zone in &verdict.listed_by {
                    self.screen.metrics.dnsbl_rejection(zone);
                }
                info!(client = %self.client, recipient = address, listed_by = ?verdict.listed_by, score = verdict.score, "recipient refused: client on a DNS block list");
                return Err(Reply::new(554, "5.7.1", verdict.reply_text(self.client)));
            }
        }
        if let Some(verify) = verify {
            verify.await?;
        }
        let greylist = match &self.screen.greylist {
            Some(g) if screened && !g.exempt(self.client) => g,
            _ => return Ok(()),
        };
        let now = chrono::Utc::now().timestamp_millis();
        match greylist.check(self.client, reverse_path, address, now) {
            o if o.accepts() => Ok(()),
            Outcome::Early(secs) => Err(greylisted(address, secs)),
            _ => Err(greylisted(address, greylist_delay(greylist))),
        }
    }

    async fn verdict(&mut self) -> Verdict {
        if let Lookup::Running(task) = &mut self.dnsbl {
            // `check` bounds itself by `[dnsbl] timeout`; a failed task fails open.
            let verdict = task.await.unwrap_or_default();
            self.dnsbl = Lookup::Done(verdict);
        }
        match &self.dnsbl {
            Lookup::Done(v) => v.clone(),
            Lookup::Running(_) => Verdict::default(),
        }
    }
}

fn greylist_delay(g: &Greylist) -> u64 {
    g.delay().as_secs()
}

fn greylisted(address: &str, secs: u64) -> Reply {
    Reply::new(
        451,
        "4.7.1",
        format!("<{address}>: Greylisted, please try again in {secs} seconds"),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::from_toml(&format!("[dns]\nnameservers = [\"127.0.0.1:53\"]\n{text}")).unwrap()
    }

    fn rebuild(config: &Config, previous: Option<&Screen>) -> Option<Arc<Screen>> {
        Screen::rebuild(config, previous, None, None, ScreenMetrics::default()).unwrap()
    }

    /// A reload keeps an unchanged section's block-list resolver and
    /// greylist (their caches and pending writes), and builds a changed one anew.
    #[tokio::test]
    async fn a_rebuild_keeps_unchanged_parts() {
        let dnsbl = "[dnsbl]\nenabled = true\nzones = [{ zone = \"bl.test\" }]\n";
        let greylist = "[greylist]\nenabled = true\n";
        let first = rebuild(&config(&format!("{dnsbl}{greylist}")), None).unwrap();
        let same = rebuild(&config(&format!("{dnsbl}{greylist}")), Some(&first)).unwrap();
        assert!(Arc::ptr_eq(first.dnsbl.as_ref().unwrap(), same.dnsbl.as_ref().unwrap()));
        assert!(Arc::ptr_eq(
            first.greylist.as_ref().unwrap(),
            same.greylist.as_ref().unwrap()
        ));

        let other_zone = dnsbl.replace("bl.test", "other.test");
        let changed = rebuild(&config(&format!("{other_zone}{greylist}")), Some(&same)).unwrap();
        assert!(!Arc::ptr_eq(
            same.dnsbl.as_ref().unwrap(),
            changed.dnsbl.as_ref().unwrap()
        ));
        assert!(Arc::ptr_eq(
            same.greylist.as_ref().unwrap(),
            changed.greylist.as_ref().unwrap()
        ));

        let no_greylist = rebuild(&config(&other_zone), Some(&changed)).unwrap();
        assert!(no_greylist.greylist.is_none() && no_greylist.dnsbl.is_some());
        assert!(rebuild(&config(""), Some(&no_greylist)).is_none());
    }
}
