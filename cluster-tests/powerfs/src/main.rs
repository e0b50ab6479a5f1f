//! `tern-powerfs`: mounts a [`tern_powerfs::PowerFs`] and takes commands on
//! stdin, one per line, answering one line each on stdout:
//!
//! * `cut` - power cut: drop unsynced data, undo non-durable directory changes;
//!   answers `ok dropped_bytes=.. dropped_writes=.. torn_files=.. undone_entries=.. undo_errors=..`
//! * `cut tear` - the same, keeping a 4 KiB-aligned prefix of each file's oldest unsynced write
//! * `status` - `ok dirty_files=.. dirty_bytes=.. pending_entries=.. cuts=..`
//! * `settle` - make everything durable now (the opposite of a cut):
//!   `ok settled_files=.. settled_entries=..`
//! * anything else - `err unknown command`
//!
//! After mounting it prints `mounted MOUNTPOINT`. It unmounts and exits on
//! stdin EOF, `quit`, SIGTERM or SIGINT. If it is killed the mount is left
//! behind (reads fail with ENOTCONN): `fusermount3 -u -z MOUNTPOINT` removes it.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::mpsc;

use anyhow::Context;
use clap::Parser;
use fuser::{Config, MountOption, SessionACL};
use nix::sys::signal::{SigSet, Signal};

#[derive(Parser)]
#[command(about = "FUSE pass-through file system that drops unsynced writes on a power cut")]
struct Args {
    /// Directory that holds the durable state.
    #[arg(long)]
    backing: PathBuf,
    /// Where to mount it.
    #[arg(long)]
    mountpoint: PathBuf,
}

enum Event {
    Line(String),
    Stop(&'static str),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn,fuser=error".into()),
        )
        .init();
    let args = Args::parse();
    // Block the stop signals in every thread (they inherit the mask) so one
    // thread can wait for them and unmount cleanly.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.thread_block().context("blocking SIGTERM/SIGINT")?;

    let (fs, control) = tern_powerfs::PowerFs::new(&args.backing)
        .with_context(|| format!("opening backing dir {}", args.backing.display()))?;
    let mut config = Config::default();
    config.mount_options = vec![MountOption::FSName("tern-powerfs".into()), MountOption::RW];
    config.acl = SessionACL::All;
    let session = fuser::spawn_mount(fs, &args.mountpoint, &config)
        .with_context(|| format!("mounting on {}", args.mountpoint.display()))?;

    let (tx, rx) = mpsc::channel();
    let sig_tx = tx.clone();
    std::thread::spawn(move || {
        let _ = signals.wait();
        let _ = sig_tx.send(Event::Stop("signal"));
    });
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            match line {
                Ok(l) => {
                    if tx.send(Event::Line(l)).is_err() {
                        return;
                    }
                }
                Err(_) => break,
            }
        }
        let _ = tx.send(Event::Stop("stdin closed"));
    });

    let mut out = std::io::stdout().lock();
    writeln!(out, "mounted {}", args.mountpoint.display())?;
    out.flush()?;
    let reason = loop {
        let Ok(event) = rx.recv() else { break "channel closed" };
        let answer = match event {
            Event::Stop(reason) => break reason,
            Event::Line(l) => match l.split_whitespace().collect::<Vec<_>>().as_slice() {
                ["cut"] => format!("ok {}", control.cut(false)),
                ["cut", "tear"] => format!("ok {}", control.cut(true)),
                ["status"] => format!("ok {}", control.status()),
                ["settle"] => match control.settle() {
                    Ok((files, entries)) => format!("ok settled_files={files} settled_entries={entries}"),
                    Err(e) => format!("err settle: {e}"),
                },
                ["quit"] => break "quit",
                [] => continue,
                _ => "err unknown command".to_string(),
            },
        };
        tracing::info!(answer = %answer, "command done");
        writeln!(out, "{answer}")?;
        out.flush()?;
    };
    tracing::info!(reason, "unmounting");
    session.umount_and_join().context("unmounting")?;
    Ok(())
}
