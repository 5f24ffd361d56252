//! One MetaStore test suite, run against a real etcd process AND the embedded store.

mod support;

use futures::StreamExt;
use skv_placement::election;
use skv_placement::layout::Layout;
use skv_placement::meta::embedded::EmbeddedStore;
use skv_placement::meta::etcd::EtcdStore;
use skv_placement::meta::{
    CmpOp, Compare, DynMetaStore, EventKind, MetaError, Op, Txn, WatchEvent, WatchStream, prefix_range,
};
use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

type Fixture = (DynMetaStore, Box<dyn Any + Send>);

async fn etcd_fixture() -> Fixture {
    let g = support::etcd::EtcdGuard::start();
    let s = EtcdStore::connect(std::slice::from_ref(&g.endpoint))
        .await
        .expect("connect etcd");
    (Arc::new(s), Box::new(g))
}

async fn embedded_fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = EmbeddedStore::open(dir.path().join("meta")).expect("open");
    (Arc::new(s), Box::new(dir))
}

async fn put(s: &DynMetaStore, k: &str, v: &str) -> i64 {
    s.txn(Txn::new().and_then([Op::put(k, v)])).await.unwrap().revision
}

async fn next_events(w: &mut WatchStream) -> Vec<WatchEvent> {
    tokio::time::timeout(Duration::from_secs(5), w.next())
        .await
        .expect("watch event in time")
        .expect("stream open")
        .expect("no watch error")
}

mod cases {
    use super::*;

    pub async fn kv_range_and_revisions(s: DynMetaStore) {
        assert!(s.get(b"/t/a").await.unwrap().is_none());
        let r1 = put(&s, "/t/a", "1").await;
        let r2 = put(&s, "/t/b", "2").await;
        let r3 = put(&s, "/t/a", "3").await;
        assert!(r1 < r2 && r2 < r3);
        let a = s.get(b"/t/a").await.unwrap().unwrap();
        assert_eq!(a.value, b"3");
        assert_eq!((a.create_revision, a.mod_revision, a.version), (r1, r3, 2));
        put(&s, "/t/c", "4").await;
        put(&s, "/u", "x").await;
        let (from, to) = prefix_range(b"/t/");
        let all = s.range(&from, &to, 0).await.unwrap();
        assert_eq!(
            all.kvs.iter().map(|k| k.key.clone()).collect::<Vec<_>>(),
            vec![b"/t/a".to_vec(), b"/t/b".to_vec(), b"/t/c".to_vec()]
        );
        assert!(!all.more);
        assert!(all.revision >= r3);
        let two = s.range(&from, &to, 2).await.unwrap();
        assert_eq!(two.kvs.len(), 2);
        assert!(two.more);
        let bounded = s.range(b"/t/b", b"/t/c", 0).await.unwrap();
        assert_eq!(bounded.kvs.len(), 1);
        // `[0]` as the end means "to the end of the key space".
        let open = s.range(b"/t/c", &[0], 0).await.unwrap();
        assert_eq!(open.kvs.len(), 2);
    }

    pub async fn txn_compares(s: DynMetaStore) {
        // Create-if-absent: exactly one of two wins.
        let t = |v: &str| Txn::new().when([Compare::absent("/k")]).and_then([Op::put("/k", v)]);
        assert!(s.txn(t("first")).await.unwrap().succeeded);
        assert!(!s.txn(t("second")).await.unwrap().succeeded);
        let kv = s.get(b"/k").await.unwrap().unwrap();
        assert_eq!(kv.value, b"first");
        // Mod revision CAS.
        let stale = kv.mod_revision - 1;
        let r = s
            .txn(
                Txn::new()
                    .when([Compare::mod_revision("/k", CmpOp::Equal, stale)])
                    .and_then([Op::put("/k", "bad")])
                    .or_else([Op::put("/failed", "yes")]),
            )
            .await
            .unwrap();
        assert!(!r.succeeded);
        assert_eq!(s.get(b"/failed").await.unwrap().unwrap().value, b"yes");
        assert!(
            s.txn(
                Txn::new()
                    .when([Compare::mod_revision("/k", CmpOp::Equal, kv.mod_revision)])
                    .and_then([Op::put("/k", "second"), Op::delete("/failed")])
            )
            .await
            .unwrap()
            .succeeded
        );
        assert!(s.get(b"/failed").await.unwrap().is_none());
        // Value, version, create revision, existence and comparison operators.
        let ok = |c: Compare| {
            let s = s.clone();
            async move { s.txn(Txn::new().when([c])).await.unwrap().succeeded }
        };
        assert!(ok(Compare::value("/k", CmpOp::Equal, "second")).await);
        assert!(!ok(Compare::value("/k", CmpOp::Equal, "first")).await);
        assert!(ok(Compare::value("/k", CmpOp::Greater, "a")).await);
        assert!(!ok(Compare::value("/missing", CmpOp::NotEqual, "x")).await);
        assert!(ok(Compare::version("/k", CmpOp::Equal, 2)).await);
        assert!(ok(Compare::version("/missing", CmpOp::Equal, 0)).await);
        assert!(ok(Compare::create_revision("/k", CmpOp::Equal, kv.create_revision)).await);
        assert!(ok(Compare::exists("/k")).await);
        assert!(!ok(Compare::exists("/missing")).await);
        assert!(ok(Compare::mod_revision("/k", CmpOp::Greater, kv.mod_revision)).await);
        assert!(ok(Compare::mod_revision("/k", CmpOp::Less, i64::MAX)).await);
        assert!(ok(Compare::mod_revision("/missing", CmpOp::Equal, 0)).await);
        // Multiple compares are a conjunction.
        assert!(
            !s.txn(Txn::new().when([Compare::exists("/k"), Compare::exists("/missing")]))
                .await
                .unwrap()
                .succeeded
        );
    }

    pub async fn watch_from_revision(s: DynMetaStore) {
        let r0 = put(&s, "/w/a", "0").await;
        let r1 = put(&s, "/w/b", "1").await;
        put(&s, "/other", "x").await;
        let (from, to) = prefix_range(b"/w/");
        // Watching from a past revision replays history.
        let mut w = s.watch(&from, &to, r1).await.unwrap();
        let ev = next_events(&mut w).await;
        assert_eq!(ev.len(), 1);
        assert_eq!(
            (ev[0].kind, ev[0].kv.key.as_slice(), ev[0].kv.mod_revision),
            (EventKind::Put, b"/w/b".as_slice(), r1)
        );
        // Live events: a txn with a put and a delete arrives as one batch, in order.
        let r2 = s
            .txn(Txn::new().and_then([Op::put("/w/c", "2"), Op::delete("/w/a")]))
            .await
            .unwrap()
            .revision;
        let ev = next_events(&mut w).await;
        assert_eq!(ev.len(), 2);
        assert!(ev.iter().all(|e| e.kv.mod_revision == r2));
        assert_eq!(ev[0].kind, EventKind::Put);
        assert_eq!(ev[0].kv.value, b"2");
        assert_eq!(
            (ev[1].kind, ev[1].kv.key.as_slice()),
            (EventKind::Delete, b"/w/a".as_slice())
        );
        // Keys outside the range are not delivered.
        put(&s, "/x", "y").await;
        put(&s, "/w/d", "3").await;
        let ev = next_events(&mut w).await;
        assert_eq!(ev[0].kv.key, b"/w/d");
        assert!(r0 < r1);
    }

    pub async fn leases_expire_and_revoke(s: DynMetaStore) {
        let l1 = s.grant_lease(2).await.unwrap();
        let l2 = s.grant_lease(2).await.unwrap();
        s.txn(Txn::new().and_then([Op::put_with_lease("/l/1", "a", l1), Op::put_with_lease("/l/2", "b", l2)]))
            .await
            .unwrap();
        assert_eq!(s.get(b"/l/1").await.unwrap().unwrap().lease, l1);
        s.revoke_lease(l1).await.unwrap();
        assert!(s.get(b"/l/1").await.unwrap().is_none());
        assert!(matches!(s.keep_alive(l1).await, Err(MetaError::LeaseNotFound(_))));
        // Kept alive: survives past its TTL.
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            s.keep_alive(l2).await.unwrap();
        }
        assert!(s.get(b"/l/2").await.unwrap().is_some());
        // Not kept alive: expires.
        support::eventually(Duration::from_secs(10), "lease expiry", || {
            let s = s.clone();
            async move { s.get(b"/l/2").await.unwrap().is_none().then_some(()) }
        })
        .await;
        assert!(matches!(s.keep_alive(l2).await, Err(MetaError::LeaseNotFound(_))));
    }

    pub async fn election_campaign_observe_resign(s: DynMetaStore) {
        let layout = Layout::new("/e");
        let key = layout.leader();
        let a = skv_proto::internal::PlacementMember {
            name: "a".into(),
            address: "127.0.0.1:1".into(),
        };
        let b = skv_proto::internal::PlacementMember {
            name: "b".into(),
            address: "127.0.0.1:2".into(),
        };
        use prost::Message;
        let la = s.grant_lease(5).await.unwrap();
        let lb = s.grant_lease(5).await.unwrap();
        assert!(election::campaign_once(&s, &key, &a.encode_to_vec(), la).await.unwrap());
        assert!(!election::campaign_once(&s, &key, &b.encode_to_vec(), lb).await.unwrap());
        // Campaigning again while holding it is idempotent.
        assert!(election::campaign_once(&s, &key, &a.encode_to_vec(), la).await.unwrap());
        let (leader, lease) = election::observe_leader(&s, &layout).await.unwrap().unwrap();
        assert_eq!((leader, lease), (a.clone(), la));
        s.keep_alive(la).await.unwrap();
        election::resign(&s, la).await.unwrap();
        assert!(election::observe_leader(&s, &layout).await.unwrap().is_none());
        assert!(election::campaign_once(&s, &key, &b.encode_to_vec(), lb).await.unwrap());
        assert_eq!(election::observe_leader(&s, &layout).await.unwrap().unwrap().0, b);
    }
}

macro_rules! metastore_suite {
    ($backend:ident, $fixture:path) => {
        mod $backend {
            use super::*;

            #[tokio::test]
            async fn kv_range_and_revisions() {
                let (s, _g) = $fixture().await;
                cases::kv_range_and_revisions(s).await;
            }
            #[tokio::test]
            async fn txn_compares() {
                let (s, _g) = $fixture().await;
                cases::txn_compares(s).await;
            }
            #[tokio::test]
            async fn watch_from_revision() {
                let (s, _g) = $fixture().await;
                cases::watch_from_revision(s).await;
            }
            #[tokio::test]
            async fn leases_expire_and_revoke() {
                let (s, _g) = $fixture().await;
                cases::leases_expire_and_revoke(s).await;
            }
            #[tokio::test]
            async fn election_campaign_observe_resign() {
                let (s, _g) = $fixture().await;
                cases::election_campaign_observe_resign(s).await;
            }
        }
    };
}

metastore_suite!(etcd, etcd_fixture);
metastore_suite!(embedded, embedded_fixture);

#[tokio::test]
async fn embedded_survives_restart_and_drops_leased_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta");
    let rev;
    {
        let s: DynMetaStore = Arc::new(EmbeddedStore::open(&path).unwrap());
        put(&s, "/a", "1").await;
        put(&s, "/b", "2").await;
        let l = s.grant_lease(60).await.unwrap();
        s.txn(Txn::new().and_then([Op::put_with_lease("/leased", "x", l)]))
            .await
            .unwrap();
        rev = s.txn(Txn::new().and_then([Op::put("/a", "3")])).await.unwrap().revision;
    }
    let s: DynMetaStore = Arc::new(EmbeddedStore::open(&path).unwrap());
    let a = s.get(b"/a").await.unwrap().unwrap();
    assert_eq!(
        (a.value.as_slice(), a.mod_revision, a.version),
        (b"3".as_slice(), rev, 2)
    );
    assert_eq!(s.get(b"/b").await.unwrap().unwrap().value, b"2");
    assert!(
        s.get(b"/leased").await.unwrap().is_none(),
        "leases do not survive a restart"
    );
    // Revisions keep rising after the restart.
    assert!(put(&s, "/c", "4").await > rev);
    // A torn tail (crash mid-append) is ignored.
    drop(s);
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(path.join("meta.log"))
            .unwrap();
        f.write_all(&[9, 0, 0, 0, 1, 2, 3]).unwrap();
    }
    let s: DynMetaStore = Arc::new(EmbeddedStore::open(&path).unwrap());
    assert_eq!(s.get(b"/c").await.unwrap().unwrap().value, b"4");
    put(&s, "/d", "5").await;
    drop(s);
    let s: DynMetaStore = Arc::new(EmbeddedStore::open(&path).unwrap());
    assert_eq!(s.get(b"/d").await.unwrap().unwrap().value, b"5");
}

#[tokio::test]
async fn embedded_refuses_a_second_opener() {
    let dir = tempfile::tempdir().unwrap();
    let s = EmbeddedStore::open(dir.path()).unwrap();
    assert!(EmbeddedStore::open(dir.path()).is_err());
    drop(s);
    EmbeddedStore::open(dir.path()).unwrap();
}

#[tokio::test]
async fn etcd_compaction_breaks_old_watches_cleanly() {
    let (s, _g) = etcd_fixture().await;
    let r1 = put(&s, "/c/a", "1").await;
    put(&s, "/c/a", "2").await;
    let r3 = put(&s, "/c/a", "3").await;
    s.compact(r3).await.unwrap();
    // Compacting again (or below) is fine.
    s.compact(r1).await.unwrap();
    let (from, to) = prefix_range(b"/c/");
    let mut w = s.watch(&from, &to, r1).await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), w.next())
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(r, Err(MetaError::Compacted(_))), "{r:?}");
}

#[tokio::test]
async fn embedded_snapshot_and_log_truncation_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta");
    let last;
    {
        let s: DynMetaStore = Arc::new(EmbeddedStore::open_with(&path, 10).unwrap());
        for i in 0..35 {
            put(&s, &format!("/k/{:02}", i % 12), &i.to_string()).await;
        }
        s.txn(Txn::new().and_then([Op::delete("/k/00")])).await.unwrap();
        last = put(&s, "/last", "x").await;
        // A watch from before the snapshot still works from memory while the store is open.
        let (from, to) = prefix_range(b"/last");
        let mut w = s.watch(&from, &to, last).await.unwrap();
        assert_eq!(next_events(&mut w).await[0].kv.mod_revision, last);
    }
    assert!(std::fs::metadata(path.join("meta.snap")).unwrap().len() > 0);
    let s: DynMetaStore = Arc::new(EmbeddedStore::open_with(&path, 10).unwrap());
    let (from, to) = prefix_range(b"/k/");
    let all = s.range(&from, &to, 0).await.unwrap();
    assert_eq!(all.kvs.len(), 11);
    assert_eq!(s.get(b"/k/11").await.unwrap().unwrap().value, b"23");
    assert_eq!(s.get(b"/k/01").await.unwrap().unwrap().value, b"25");
    assert_eq!(s.get(b"/last").await.unwrap().unwrap().mod_revision, last);
    assert!(put(&s, "/after", "y").await > last);
    // History before the restart is gone: watching from it says so.
    assert!(matches!(
        s.watch(&from, &to, 1).await.err(),
        Some(MetaError::Compacted(_))
    ));
}
