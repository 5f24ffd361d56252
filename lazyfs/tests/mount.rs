//! Real FUSE mounts (needs /dev/fuse and root, or fusermount3): what survives a power loss.

use fjall::{Database, KeyspaceCreateOptions, PersistMode};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::Path;

fn read(p: &Path) -> Option<Vec<u8>> {
    let mut v = Vec::new();
    File::open(p).ok()?.read_to_end(&mut v).ok()?;
    Some(v)
}

fn fsync_dir(p: &Path) {
    File::open(p).unwrap().sync_all().unwrap();
}

#[test]
fn only_fsynced_data_and_names_survive_a_power_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let (backing, mnt) = (tmp.path().join("backing"), tmp.path().join("mnt"));
    std::fs::create_dir_all(&mnt).unwrap();
    let m = skv_lazyfs::mount(&backing, &mnt).unwrap();

    // a: written and fsynced. b: written, never synced. c: synced, then appended.
    let mut a = File::create(mnt.join("a")).unwrap();
    a.write_all(b"durable").unwrap();
    a.sync_all().unwrap();
    drop(a);
    std::fs::write(mnt.join("b"), b"volatile").unwrap();
    let mut c = File::create(mnt.join("c")).unwrap();
    c.write_all(&vec![7u8; 10_000]).unwrap();
    c.sync_data().unwrap();
    c.write_all(b"tail").unwrap();
    drop(c);
    // d/e: a new directory whose file is synced; r: a synced file renamed, unsynced.
    std::fs::create_dir(mnt.join("d")).unwrap();
    let mut e = File::create(mnt.join("d/e")).unwrap();
    e.write_all(b"in d").unwrap();
    e.sync_all().unwrap();
    drop(e);
    std::fs::write(mnt.join("r"), b"r").unwrap();
    File::open(mnt.join("r")).unwrap().sync_all().unwrap();
    std::fs::rename(mnt.join("r"), mnt.join("r2")).unwrap();
    // t: truncated after a sync, not synced again.
    let mut t = File::create(mnt.join("t")).unwrap();
    t.write_all(b"0123456789").unwrap();
    t.sync_all().unwrap();
    t.set_len(3).unwrap();
    drop(t);

    // Everything reads back as written through the mount.
    assert_eq!(read(&mnt.join("b")).unwrap(), b"volatile");
    assert_eq!(read(&mnt.join("c")).unwrap().len(), 10_004);
    assert_eq!(read(&mnt.join("r2")).unwrap(), b"r");
    assert!(read(&mnt.join("r")).is_none());
    assert_eq!(read(&mnt.join("t")).unwrap(), b"012");
    // The backing directory has only what was synced.
    assert_eq!(read(&backing.join("a")).unwrap(), b"durable");
    assert!(read(&backing.join("b")).is_none());

    let stats = m.power_loss().unwrap();
    assert!(stats.fsyncs >= 5, "{stats:?}");

    assert_eq!(read(&backing.join("a")).unwrap(), b"durable");
    assert!(read(&backing.join("b")).is_none(), "an unsynced new file survived");
    assert_eq!(
        read(&backing.join("c")).unwrap(),
        vec![7u8; 10_000],
        "unsynced append survived"
    );
    assert_eq!(read(&backing.join("d/e")).unwrap(), b"in d");
    assert_eq!(read(&backing.join("r")).unwrap(), b"r", "an unsynced rename was kept");
    assert!(read(&backing.join("r2")).is_none());
    assert_eq!(read(&backing.join("t")).unwrap(), b"0123456789");
    assert!(!backing.join(skv_lazyfs::fs::STAGING).exists());

    // Reboot: mount again, the mount shows the backing content; a directory fsync now
    // makes an unlink and a rename durable.
    let m = skv_lazyfs::mount(&backing, &mnt).unwrap();
    assert_eq!(read(&mnt.join("c")).unwrap().len(), 10_000);
    std::fs::remove_file(mnt.join("a")).unwrap();
    std::fs::rename(mnt.join("r"), mnt.join("r3")).unwrap();
    let mut n = OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(mnt.join("n"))
        .unwrap();
    n.write_all(b"never synced").unwrap();
    drop(n);
    fsync_dir(&mnt);
    m.power_loss().unwrap();
    assert!(read(&backing.join("a")).is_none(), "a synced unlink was undone");
    assert_eq!(read(&backing.join("r3")).unwrap(), b"r");
    assert_eq!(
        read(&backing.join("n")).unwrap(),
        b"",
        "a name synced without its data is empty"
    );
}

/// fjall, as the storenode uses it: what `persist(SyncAll)` covered survives, the rest is gone.
#[test]
fn fjall_keeps_what_it_persisted_and_loses_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let (backing, mnt) = (tmp.path().join("backing"), tmp.path().join("mnt"));
    std::fs::create_dir_all(&mnt).unwrap();
    let m = skv_lazyfs::mount(&backing, &mnt).unwrap();
    {
        let db = Database::builder(mnt.join("db")).open().unwrap();
        let ks = db.keyspace("data", KeyspaceCreateOptions::default).unwrap();
        for i in 0..500u32 {
            ks.insert(format!("synced-{i:04}"), vec![1u8; 100]).unwrap();
        }
        db.persist(PersistMode::SyncAll).unwrap();
        for i in 0..500u32 {
            ks.insert(format!("unsynced-{i:04}"), vec![2u8; 100]).unwrap();
        }
        // Written to the filesystem (not just fjall's buffer), never fsynced.
        db.persist(PersistMode::Buffer).unwrap();
        let stats = m.switch().power_loss();
        assert!(stats.unsynced_bytes > 0, "nothing unsynced was held: {stats:?}");
        // fjall's handles now get EIO; dropping them must not reach the backing directory.
    }
    m.unmount().unwrap();

    let m = skv_lazyfs::mount(&backing, &mnt).unwrap();
    {
        let db = Database::builder(mnt.join("db")).open().unwrap();
        let ks = db.keyspace("data", KeyspaceCreateOptions::default).unwrap();
        for i in 0..500u32 {
            assert!(
                ks.get(format!("synced-{i:04}")).unwrap().is_some(),
                "synced-{i:04} lost"
            );
        }
        let survived = (0..500u32)
            .filter(|i| ks.get(format!("unsynced-{i:04}")).unwrap().is_some())
            .count();
        assert_eq!(survived, 0, "unsynced writes survived the power loss");
    }
    m.unmount().unwrap();
}

/// The storenode's pattern: many small batches, each followed by a group-commit fsync.
#[test]
fn fjall_keeps_every_batch_synced_one_by_one() {
    let tmp = tempfile::tempdir().unwrap();
    let (backing, mnt) = (tmp.path().join("backing"), tmp.path().join("mnt"));
    std::fs::create_dir_all(&mnt).unwrap();
    let m = skv_lazyfs::mount(&backing, &mnt).unwrap();
    {
        let db = Database::builder(mnt.join("db")).open().unwrap();
        let data = db.keyspace("data", KeyspaceCreateOptions::default).unwrap();
        let raft = db.keyspace("raft", KeyspaceCreateOptions::default).unwrap();
        let meta = db.keyspace("meta", KeyspaceCreateOptions::default).unwrap();
        meta.insert("store_id", [0u8, 0, 0, 0, 0, 0, 0, 3]).unwrap();
        db.persist(PersistMode::SyncAll).unwrap();
        for i in 0..200u32 {
            raft.insert(format!("log-{i:04}"), vec![3u8; 200]).unwrap();
            data.insert(format!("k-{i:04}"), vec![4u8; 50]).unwrap();
            db.persist(PersistMode::SyncAll).unwrap();
        }
        m.switch().power_loss();
    }
    m.unmount().unwrap();
    let m = skv_lazyfs::mount(&backing, &mnt).unwrap();
    {
        let db = Database::builder(mnt.join("db")).open().unwrap();
        let data = db.keyspace("data", KeyspaceCreateOptions::default).unwrap();
        let raft = db.keyspace("raft", KeyspaceCreateOptions::default).unwrap();
        let meta = db.keyspace("meta", KeyspaceCreateOptions::default).unwrap();
        assert!(meta.get("store_id").unwrap().is_some(), "store id lost");
        for i in 0..200u32 {
            assert!(raft.get(format!("log-{i:04}")).unwrap().is_some(), "log-{i:04} lost");
            assert!(data.get(format!("k-{i:04}")).unwrap().is_some(), "k-{i:04} lost");
        }
    }
    m.unmount().unwrap();
}

#[test]
fn a_slow_disk_delays_writes_and_fsyncs_until_switched_off() {
    let tmp = tempfile::tempdir().unwrap();
    let (backing, mnt) = (tmp.path().join("backing"), tmp.path().join("mnt"));
    std::fs::create_dir_all(&mnt).unwrap();
    let m = skv_lazyfs::mount(&backing, &mnt).unwrap();
    let timed = |tag: u8| {
        let t = std::time::Instant::now();
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(mnt.join("f"))
            .unwrap();
        f.write_all(&[tag; 100]).unwrap();
        f.sync_data().unwrap();
        t.elapsed()
    };
    let fast = timed(1);
    m.switch().set_delay(std::time::Duration::from_millis(300));
    // One write and one fsync: at least two delays.
    let slow = timed(2);
    m.switch().set_delay(std::time::Duration::ZERO);
    let fast_again = timed(3);
    assert!(slow >= std::time::Duration::from_millis(600), "slow: {slow:?}");
    assert!(fast < std::time::Duration::from_millis(300), "fast: {fast:?}");
    assert!(
        fast_again < std::time::Duration::from_millis(300),
        "after: {fast_again:?}"
    );
    // Slow, not lossy: everything was written and synced.
    assert_eq!(read(&backing.join("f")).unwrap().len(), 300);
    m.unmount().unwrap();
}
