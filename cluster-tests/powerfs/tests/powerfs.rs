//! The power-cut file system against its model (module doc of tern_powerfs):
//! a real `tern-powerfs` process mounted in a temp dir, driven with plain
//! std::fs calls. Needs /dev/fuse and root (CI sets TERN_REQUIRE_PEERS=1, so
//! there a missing /dev/fuse fails instead of skipping).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use tern_powerfs::mount::{fuse_available, PowerMount};

struct Fixture {
    mount: PowerMount,
    // Dropped after the mount (field order), so the backing dir outlives it.
    _dir: tempfile::TempDir,
    backing: PathBuf,
}

fn fixture() -> Option<Fixture> {
    if !fuse_available() {
        assert!(
            std::env::var_os("TERN_REQUIRE_PEERS").is_none(),
            "/dev/fuse is missing and TERN_REQUIRE_PEERS is set"
        );
        eprintln!("SKIPPED: /dev/fuse is missing (set TERN_REQUIRE_PEERS=1 to make this an error)");
        return None;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let backing = dir.path().join("backing");
    let mnt = dir.path().join("mnt");
    let mount = PowerMount::mount(Path::new(env!("CARGO_BIN_EXE_tern-powerfs")), &backing, &mnt).expect("mount");
    Some(Fixture {
        mount,
        _dir: dir,
        backing,
    })
}

impl Fixture {
    fn p(&self, name: &str) -> PathBuf {
        self.mount.mountpoint().join(name)
    }
    fn sync_dir(&self, name: &str) {
        File::open(self.p(name))
            .expect("open dir")
            .sync_all()
            .expect("fsync dir");
    }
}

fn write_synced(path: &Path, data: &[u8]) {
    let mut f = File::create(path).expect("create");
    f.write_all(data).expect("write");
    f.sync_all().expect("fsync");
}

#[test]
fn synced_data_survives_a_cut_and_unsynced_data_is_gone() {
    let Some(mut fx) = fixture() else { return };
    write_synced(&fx.p("a"), &[1u8; 10_000]);
    fx.sync_dir("");
    {
        let f = OpenOptions::new().write(true).open(fx.p("a")).expect("open");
        f.write_all_at(&[2u8; 20_000], 5_000).expect("pwrite");
        // fdatasync of another file makes nothing of this one durable.
        write_synced(&fx.p("other"), b"x");
    }
    assert_eq!(
        fs::read(fx.p("a")).expect("read").len(),
        25_000,
        "reads see unsynced data"
    );
    let report = fx.mount.cut(false).expect("cut");
    assert!(report.get("dropped_bytes") >= 20_000, "{report}");
    assert_eq!(fs::read(fx.p("a")).expect("read"), vec![1u8; 10_000]);
    assert_eq!(fs::read(fx.backing.join("a")).expect("read backing"), vec![1u8; 10_000]);

    // A truncate not synced is undone too; one synced stays.
    let f = OpenOptions::new().write(true).open(fx.p("a")).expect("open");
    f.set_len(100).expect("truncate");
    drop(f);
    fx.mount.cut(false).expect("cut");
    assert_eq!(fs::metadata(fx.p("a")).expect("stat").len(), 10_000);
    let f = OpenOptions::new().write(true).open(fx.p("a")).expect("open");
    f.set_len(100).expect("truncate");
    f.write_all_at(&[3u8; 10], 8_000).expect("write past the cut");
    f.sync_data().expect("fdatasync");
    drop(f);
    fx.mount.cut(false).expect("cut");
    let data = fs::read(fx.p("a")).expect("read");
    assert_eq!(data.len(), 8_010);
    assert!(data[..100].iter().all(|&b| b == 1), "kept prefix");
    assert!(
        data[100..8_000].iter().all(|&b| b == 0),
        "truncated bytes read as zeros"
    );
    assert_eq!(&data[8_000..], &[3u8; 10]);
}

#[test]
fn a_created_file_not_dir_synced_disappears() {
    let Some(mut fx) = fixture() else { return };
    fs::create_dir(fx.p("d")).expect("mkdir");
    fx.sync_dir("");
    write_synced(&fx.p("d/kept"), b"kept");
    fx.sync_dir("d");
    write_synced(&fx.p("d/lost"), b"lost, though its data was fsynced");
    fs::create_dir(fx.p("newdir")).expect("mkdir");
    write_synced(&fx.p("newdir/f"), b"f");
    fx.sync_dir("newdir");
    let report = fx.mount.cut(false).expect("cut");
    // d/lost and newdir; newdir/f was made durable in newdir, but newdir itself was not.
    assert_eq!(report.get("undone_entries"), 2, "{report}");
    assert_eq!(fs::read(fx.p("d/kept")).expect("kept"), b"kept");
    assert!(!fx.p("d/lost").exists(), "created, not dir-synced");
    assert!(
        !fx.p("newdir").exists(),
        "a directory never dir-synced goes with its content"
    );
    assert!(!fx.backing.join("newdir").exists());
}

#[test]
fn a_rename_not_dir_synced_goes_back_and_an_unlink_comes_back() {
    let Some(mut fx) = fixture() else { return };
    write_synced(&fx.p("old"), b"old");
    write_synced(&fx.p("target"), b"target");
    write_synced(&fx.p("victim"), b"victim");
    fx.sync_dir("");
    fs::rename(fx.p("old"), fx.p("target")).expect("rename over target");
    fs::remove_file(fx.p("victim")).expect("unlink");
    assert_eq!(fs::read(fx.p("target")).expect("read"), b"old");
    assert!(!fx.p("victim").exists());
    fx.mount.cut(false).expect("cut");
    assert_eq!(fs::read(fx.p("old")).expect("rename reverted"), b"old");
    assert_eq!(fs::read(fx.p("target")).expect("replaced target restored"), b"target");
    assert_eq!(fs::read(fx.p("victim")).expect("unlink undone"), b"victim");

    // Once the directory is synced, both stay.
    fs::rename(fx.p("old"), fx.p("target")).expect("rename");
    fs::remove_file(fx.p("victim")).expect("unlink");
    fx.sync_dir("");
    let report = fx.mount.cut(false).expect("cut");
    assert_eq!(report.get("undone_entries"), 0, "{report}");
    assert_eq!(fs::read(fx.p("target")).expect("read"), b"old");
    assert!(!fx.p("old").exists() && !fx.p("victim").exists());
    let trash: Vec<_> = fs::read_dir(fx.backing.join(tern_powerfs::TRASH))
        .expect("trash")
        .collect();
    assert!(trash.is_empty(), "durable unlinks empty the trash: {trash:?}");
    let listing: Vec<_> = fs::read_dir(fx.mount.mountpoint())
        .expect("ls")
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .collect();
    assert!(
        !listing.iter().any(|n| n == tern_powerfs::TRASH),
        "trash is hidden: {listing:?}"
    );
}

#[test]
fn a_torn_write_keeps_a_4k_aligned_prefix() {
    let Some(mut fx) = fixture() else { return };
    write_synced(&fx.p("log"), &[]);
    fx.sync_dir("");
    let f = OpenOptions::new().write(true).open(fx.p("log")).expect("open");
    // A small write inside one page (atomic: never torn, dropped whole), then
    // one write request (under max_write) crossing 5 boundaries, then a later one.
    f.write_all_at(&[9u8; 10], 100_000).expect("small write");
    f.write_all_at(&[7u8; 5 * 4096 + 100], 1000).expect("first write");
    f.write_all_at(&[8u8; 4096], 64 * 4096).expect("second write");
    drop(f);
    let report = fx.mount.cut(true).expect("cut tear");
    assert_eq!(report.get("torn_files"), 1, "{report}");
    let data = fs::read(fx.p("log")).expect("read");
    assert!(data.len() > 1000, "a prefix was kept: {} bytes", data.len());
    assert_eq!(
        data.len() % 4096,
        0,
        "the prefix ends on a 4 KiB boundary: {} bytes",
        data.len()
    );
    assert!(
        data.len() < 1000 + 5 * 4096 + 100,
        "only a prefix: {} bytes",
        data.len()
    );
    assert!(data[..1000].iter().all(|&b| b == 0));
    assert!(data[1000..].iter().all(|&b| b == 7), "nothing of the later write");
}
