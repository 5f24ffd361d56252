//! One MetaStore test suite, run against a real etcd process AND the embedded store.

mod support;

use futures::StreamExt;
use skv_common::ids::StoreId;
use skv_placement::cluster::{ApplyOutcome, Meta};
use skv_placement::election;
use skv_placement::layout::Layout;
use skv_placement::meta::embedded::EmbeddedStore;
use skv_placement::meta::etcd::EtcdStore;
use skv_placement::meta::{
    CmpOp, Compare, DynMetaStore, EventKind, MetaError, Op, Txn, WatchEvent, WatchStream, prefix_range,
};
use skv_placement::metrics::Metrics;
use skv_placement::rangemap::{Incoming, UpdatePlan, encode_record};
use skv_proto::internal::{RangeDescriptor, RangeEpoch, RangeInfo};
use skv_testkit::{Etcd, wait_until};
use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

type Fixture = (DynMetaStore, Box<dyn Any + Send>);

async fn etcd_fixture() -> Fixture {
    let g = Etcd::start().await;
    let s = EtcdStore::connect(std::slice::from_ref(&g.client_url))
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

    pub async fn txn_range_compare(s: DynMetaStore) {
        put(&s, "/r/a", "1").await;
        let r = put(&s, "/r/c", "2").await;
        put(&s, "/r0", "outside").await;
        // "Nothing in [/r/, /r0) changed after r".
        let unchanged_since = |rev: i64| Compare::mod_revision("/r/", CmpOp::Less, rev + 1).with_range("/r0");
        let t = |c: Compare| Txn::new().when([c]).and_then([Op::put("/done", "x")]);
        assert!(s.txn(t(unchanged_since(r))).await.unwrap().succeeded);
        // A write outside the interval does not matter; a creation or an update inside does.
        let r2 = put(&s, "/r0", "outside again").await;
        assert!(s.txn(t(unchanged_since(r))).await.unwrap().succeeded);
        let r3 = put(&s, "/r/b", "new").await;
        assert!(r3 > r2);
        assert!(!s.txn(t(unchanged_since(r))).await.unwrap().succeeded);
        assert!(s.txn(t(unchanged_since(r3))).await.unwrap().succeeded);
        let r4 = put(&s, "/r/a", "changed").await;
        assert!(!s.txn(t(unchanged_since(r3))).await.unwrap().succeeded);
        assert!(s.txn(t(unchanged_since(r4))).await.unwrap().succeeded);
        // The compare holds only if it holds for every key in the interval.
        let a = s.get(b"/r/a").await.unwrap().unwrap();
        let each_eq = Compare::mod_revision("/r/", CmpOp::Equal, a.mod_revision).with_range("/r0");
        assert!(!s.txn(t(each_eq)).await.unwrap().succeeded);
        let only_a = Compare::mod_revision("/r/a", CmpOp::Equal, a.mod_revision).with_range("/r/b");
        assert!(s.txn(t(only_a)).await.unwrap().succeeded);
        // An empty interval is compared as a missing key: revisions 0, a Value compare fails.
        let empty_rev = Compare::mod_revision("/s/", CmpOp::Equal, 0).with_range("/s0");
        assert!(s.txn(t(empty_rev)).await.unwrap().succeeded);
        let empty_absent = Compare::absent("/s/").with_range("/s0");
        assert!(s.txn(t(empty_absent)).await.unwrap().succeeded);
        let empty_value = Compare::value("/s/", CmpOp::NotEqual, "x").with_range("/s0");
        assert!(!s.txn(t(empty_value)).await.unwrap().succeeded);
        // absent() over a non-empty interval fails.
        assert!(
            !s.txn(t(Compare::absent("/r/").with_range("/r0")))
                .await
                .unwrap()
                .succeeded
        );
    }

    fn desc(id: u64, start: &str, end: &str, version: u64) -> RangeDescriptor {
        RangeDescriptor {
            range_id: id,
            start: start.as_bytes().to_vec(),
            end: end.as_bytes().to_vec(),
            epoch: Some(RangeEpoch { conf_ver: 1, version }),
            replicas: vec![],
        }
    }

    fn inc(d: RangeDescriptor) -> Incoming {
        Incoming {
            desc: d,
            leader: None,
            leader_term: None,
        }
    }

    /// A range map under `prefix` holding exactly `descs`.
    async fn range_map(s: &DynMetaStore, prefix: &str, descs: &[RangeDescriptor]) -> Meta {
        let layout = Layout::new(prefix);
        let ops: Vec<Op> = descs
            .iter()
            .map(|d| {
                let info = RangeInfo {
                    descriptor: Some(d.clone()),
                    leader_store_id: 0,
                };
                Op::put(layout.range(&d.end), encode_record(&info, 0))
            })
            .collect();
        assert!(s.txn(Txn::new().and_then(ops)).await.unwrap().succeeded);
        Meta::new(s.clone(), layout, Metrics::default())
    }

    /// The stored descriptors, checked to be well-formed and pairwise disjoint.
    async fn disjoint_map(m: &Meta) -> Vec<(u64, String, String, u64)> {
        let (recs, _) = m.all_ranges().await.unwrap();
        let descs: Vec<&RangeDescriptor> = recs.iter().map(|r| r.desc()).collect();
        for (r, d) in recs.iter().zip(&descs) {
            assert_eq!(r.key, m.layout.range(&d.end), "record stored under the wrong key");
        }
        // Records are sorted by end: consecutive ones must not overlap.
        for w in descs.windows(2) {
            assert!(
                !w[0].end.is_empty() && w[1].start >= w[0].end,
                "overlapping records: {:?} and {:?}",
                w[0],
                w[1]
            );
        }
        descs
            .iter()
            .map(|d| {
                (
                    d.range_id,
                    String::from_utf8_lossy(&d.start).into_owned(),
                    String::from_utf8_lossy(&d.end).into_owned(),
                    d.epoch.unwrap().version,
                )
            })
            .collect()
    }

    async fn write_plan(m: &Meta, i: &Incoming) -> Txn {
        match m.plan(std::slice::from_ref(i)).await.unwrap() {
            UpdatePlan::Write(t) => t,
            other => panic!("expected a write, got {other:?}"),
        }
    }

    /// Two updates planned against the same hole of the map with different ends (a
    /// delayed ReportSplit#1 `[a, m) v2` and a heartbeat `[a, c) v3` after a second
    /// split): exactly one commits, in either order, and the map never overlaps.
    pub async fn range_map_same_hole_race(s: DynMetaStore) {
        let base = [desc(1, "", "a", 2), desc(3, "m", "", 2)];
        let old = inc(desc(2, "a", "m", 2));
        let new = inc(desc(2, "a", "c", 3));
        // Older first: it wins the race; the newer one then replaces it on retry.
        let m = range_map(&s, "/race1", &base).await;
        let (t_old, t_new) = (write_plan(&m, &old).await, write_plan(&m, &new).await);
        assert!(s.txn(t_old).await.unwrap().succeeded);
        assert!(
            !s.txn(t_new).await.unwrap().succeeded,
            "both updates of one hole committed"
        );
        disjoint_map(&m).await;
        assert_eq!(
            m.apply(std::slice::from_ref(&new)).await.unwrap(),
            ApplyOutcome::Applied
        );
        assert_eq!(
            disjoint_map(&m).await,
            vec![
                (1, "".into(), "a".into(), 2),
                (2, "a".into(), "c".into(), 3),
                (3, "m".into(), "".into(), 2)
            ]
        );
        // Newer first: the older one loses, and is then refused as stale.
        let m = range_map(&s, "/race2", &base).await;
        let (t_old, t_new) = (write_plan(&m, &old).await, write_plan(&m, &new).await);
        assert!(s.txn(t_new).await.unwrap().succeeded);
        assert!(
            !s.txn(t_old).await.unwrap().succeeded,
            "both updates of one hole committed"
        );
        assert!(matches!(
            m.apply(std::slice::from_ref(&old)).await.unwrap(),
            ApplyOutcome::Stale(_)
        ));
        assert_eq!(disjoint_map(&m).await.len(), 3);
        // Many concurrent writers into one hole: whatever wins, nothing overlaps.
        let m = range_map(&s, "/race3", &base).await;
        let ends = ["b", "c", "d", "e", "f", "g", "h", "i"];
        let tasks: Vec<_> = ends
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let (m, i) = (m.clone(), inc(desc(2, "a", e, 2 + i as u64)));
                tokio::spawn(async move { m.apply(&[i]).await.unwrap() })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        disjoint_map(&m).await;
    }

    /// The record just past a hole does not overlap an update into the hole, but a
    /// concurrent writer that deletes it may take the hole over with a record whose key lies
    /// beyond the guarded interval: the update must still fail.
    pub async fn range_map_race_past_the_hole(s: DynMetaStore) {
        let base = [desc(1, "", "a", 2), desc(3, "m", "x", 2), desc(4, "x", "", 2)];
        let m = range_map(&s, "/race4", &base).await;
        let into_hole = inc(desc(2, "a", "c", 5));
        let merge = inc(desc(3, "b", "", 3));
        let (t_hole, t_merge) = (write_plan(&m, &into_hole).await, write_plan(&m, &merge).await);
        assert!(s.txn(t_merge).await.unwrap().succeeded);
        assert!(!s.txn(t_hole).await.unwrap().succeeded, "overlapping update committed");
        disjoint_map(&m).await;
        assert_eq!(m.apply(&[into_hole]).await.unwrap(), ApplyOutcome::Applied);
        disjoint_map(&m).await;
    }

    /// The leader's term is stored with the record: after a placement restart (a fresh
    /// `Meta`, no in-memory state), a heartbeat from a deposed leader is still ignored.
    pub async fn range_map_leader_term_is_stored(s: DynMetaStore) {
        let m = range_map(&s, "/term", &[desc(1, "", "", 2)]).await;
        let hb = |leader: u64, term: u64| Incoming {
            desc: desc(1, "", "", 2),
            leader: Some(StoreId(leader)),
            leader_term: Some(term),
        };
        assert_eq!(m.apply(&[hb(2, 7)]).await.unwrap(), ApplyOutcome::Applied);
        let m = Meta::new(s.clone(), Layout::new("/term"), Metrics::default());
        assert_eq!(m.apply(&[hb(3, 6)]).await.unwrap(), ApplyOutcome::Unchanged);
        let rec = m.lookup(b"k").await.unwrap().unwrap();
        assert_eq!((rec.info.leader_store_id, rec.leader_term), (2, 7));
        assert_eq!(m.apply(&[hb(3, 8)]).await.unwrap(), ApplyOutcome::Applied);
        let rec = m.lookup(b"k").await.unwrap().unwrap();
        assert_eq!((rec.info.leader_store_id, rec.leader_term), (3, 8));
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
        wait_until("lease expiry", Duration::from_secs(10), || {
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
            async fn txn_range_compare() {
                let (s, _g) = $fixture().await;
                cases::txn_range_compare(s).await;
            }
            #[tokio::test]
            async fn range_map_same_hole_race() {
                let (s, _g) = $fixture().await;
                cases::range_map_same_hole_race(s).await;
            }
            #[tokio::test]
            async fn range_map_race_past_the_hole() {
                let (s, _g) = $fixture().await;
                cases::range_map_race_past_the_hole(s).await;
            }
            #[tokio::test]
            async fn range_map_leader_term_is_stored() {
                let (s, _g) = $fixture().await;
                cases::range_map_leader_term_is_stored(s).await;
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
    put(&s, "/d", "5").await;
    drop(s);
    let s: DynMetaStore = Arc::new(EmbeddedStore::open(&path).unwrap());
    assert_eq!(s.get(b"/c").await.unwrap().unwrap().value, b"4");
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
async fn embedded_many_revisions_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta");
    let (from, to) = prefix_range(b"/k/");
    let (before, last);
    {
        let s: DynMetaStore = Arc::new(EmbeddedStore::open(&path).unwrap());
        for i in 0..300 {
            put(&s, &format!("/k/{:02}", i % 40), &i.to_string()).await;
            if i % 7 == 0 {
                // Multi-key revisions and deletes too.
                s.txn(Txn::new().and_then([
                    Op::put(format!("/k/m{i:03}"), "m"),
                    Op::delete(format!("/k/{:02}", (i + 3) % 40)),
                ]))
                .await
                .unwrap();
            }
        }
        s.txn(Txn::new().and_then([Op::delete("/k/00")])).await.unwrap();
        last = put(&s, "/last", "x").await;
        before = s.range(&from, &to, 0).await.unwrap();
        // A watch from an older revision works from memory while the store is open.
        let (lf, lt) = prefix_range(b"/last");
        let mut w = s.watch(&lf, &lt, last).await.unwrap();
        assert_eq!(next_events(&mut w).await[0].kv.mod_revision, last);
    }
    assert!(last > 340);
    for _ in 0..2 {
        let s: DynMetaStore = Arc::new(EmbeddedStore::open(&path).unwrap());
        let after = s.range(&from, &to, 0).await.unwrap();
        // Every key comes back with its value, revisions and version, at the same revision.
        assert_eq!(after.kvs, before.kvs);
        assert_eq!(after.revision, last);
        assert!(s.get(b"/k/00").await.unwrap().is_none());
        assert_eq!(s.get(b"/last").await.unwrap().unwrap().mod_revision, last);
        // History before the restart is gone: watching from it says so.
        assert!(matches!(
            s.watch(&from, &to, 1).await.err(),
            Some(MetaError::Compacted(_))
        ));
    }
    let s: DynMetaStore = Arc::new(EmbeddedStore::open(&path).unwrap());
    assert!(put(&s, "/after", "y").await > last);
}
