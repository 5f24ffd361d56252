//! Replica moves of the leader's own replica, end to end (issue 10): real placement,
//! storenode and proxy processes over loopback sockets. Placement's MoveReplica moves the
//! replica that leads the range, several times in a row, while writers and readers run
//! through the SDK. Every move must finish (the range map shows the target as a voter, not
//! the source, and three voters; placement counts each move operator as `ok`), and calls
//! must succeed during every move. The scheduler is paused, so nothing but the move
//! operator can bring the range back to three voters. Needs the built binaries
//! (`cargo build --bins`).

use skv_common::keys::namespace_prefix;
use skv_proto::internal::placement_client::PlacementClient;
use skv_proto::internal::{
    AdminMoveReplicaRequest, GetStoresRequest, RangeDescriptor, RangeInfo, ReplicaRole, ScanRangesRequest,
    SetSchedulerPausedRequest,
};
use skv_testkit::cluster::{ProcCluster, admin};
use skv_testkit::workload::{Workload, WorkloadOptions};
use skv_testkit::{free_port, metrics, wait_until};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// Moves in a row, each of the replica that leads the range when it starts.
const MOVES: usize = 6;

/// The range holding `key` (raw internal key), retried until placement answers.
async fn range_of(pd: &PlacementClient<Channel>, key: &[u8]) -> RangeInfo {
    wait_until("placement to answer ScanRanges", Duration::from_secs(30), || {
        let mut pd = pd.clone();
        let key = key.to_vec();
        async move {
            let rs = pd
                .scan_ranges(ScanRangesRequest::default())
                .await
                .ok()?
                .into_inner()
                .ranges;
            rs.into_iter().find(|r| {
                r.descriptor.as_ref().is_some_and(|d| {
                    d.start.as_slice() <= key.as_slice() && (d.end.is_empty() || key.as_slice() < d.end.as_slice())
                })
            })
        }
    })
    .await
}

fn voters(d: &RangeDescriptor) -> Vec<u64> {
    d.replicas
        .iter()
        .filter(|r| r.role == ReplicaRole::Voter as i32)
        .map(|r| r.store_id)
        .collect()
}

/// Three voters, no learner, and a known leader among them.
fn settled(r: &RangeInfo) -> bool {
    r.descriptor.as_ref().is_some_and(|d| {
        let v = voters(d);
        v.len() == 3 && d.replicas.len() == 3 && v.contains(&r.leader_store_id)
    })
}

/// Waits (up to `secs`) until the range holding `key` is [`settled`]; panics with the last
/// state seen and placement's log.
async fn wait_settled(c: &ProcCluster, pd: &PlacementClient<Channel>, key: &[u8], what: &str, secs: u64) -> RangeInfo {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let r = range_of(pd, key).await;
        if settled(&r) {
            return r;
        }
        if Instant::now() >= deadline {
            panic!(
                "{what}: the range has no three voters and known leader after {secs} s: {r:?}\n{}",
                c.read_log("placement")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moving_the_leaders_replica_again_and_again_always_finishes() {
    let metrics_port = free_port();
    let c = ProcCluster::start_with_placement_args(
        4,
        false,
        Vec::new(),
        Vec::new(),
        vec!["--metrics-listen".into(), format!("127.0.0.1:{metrics_port}")],
    )
    .await;
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let channel = Channel::from_shared(c.placement_url())
        .unwrap_or_else(|e| panic!("placement url: {e}"))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect placement: {e}"));
    let pd = PlacementClient::new(channel);
    let stores: Vec<u64> = wait_until("4 stores registered", Duration::from_secs(30), || {
        let mut pd = pd.clone();
        async move {
            let st = pd.get_stores(GetStoresRequest {}).await.ok()?.into_inner().stores;
            (st.len() == 4).then(|| st.iter().map(|s| s.store_id).collect())
        }
    })
    .await;
    let key = [namespace_prefix(b"moves").unwrap_or_default(), b"m/".to_vec()].concat();
    // The first range may start with fewer voters (initial placement does not wait for 3
    // stores); the scheduler brings it to three. Then it is paused: only the move operators
    // change the range's replicas, so a failed move would stay a fourth voter (or a
    // learner) in the map.
    wait_settled(&c, &pd, &key, "before the moves", 60).await;
    pd.clone()
        .set_scheduler_paused(admin(SetSchedulerPausedRequest { paused: true }))
        .await
        .unwrap_or_else(|e| panic!("pause the scheduler: {e}"));
    let client = c.client("moves", "write").await;
    let load = Workload::start(
        client.clone(),
        WorkloadOptions {
            prefix: "m/".into(),
            keys: 200,
            writers: 2,
            readers: 2,
            pause: Duration::from_millis(2),
        },
    );
    let mut took = Vec::new();
    for round in 1..=MOVES {
        // The range as the previous move left it, its leader known from heartbeats.
        let r = wait_settled(&c, &pd, &key, &format!("round {round}"), 30).await;
        let d = r.descriptor.clone().unwrap_or_default();
        let from = r.leader_store_id;
        let Some(to) = stores
            .iter()
            .copied()
            .find(|s| !d.replicas.iter().any(|x| x.store_id == *s))
        else {
            panic!("round {round}: no store without a replica of r{}: {d:?}", d.range_id);
        };
        let ops_before = load.ops();
        let started = Instant::now();
        wait_until("placement to start the move", Duration::from_secs(20), || {
            let mut pd = pd.clone();
            let range_id = d.range_id;
            async move {
                match pd
                    .move_replica(admin(AdminMoveReplicaRequest {
                        range_id,
                        from_store_id: from,
                        to_store_id: to,
                    }))
                    .await
                {
                    Ok(_) => Some(()),
                    // E.g. the previous operator still settling, or the leader not known yet.
                    Err(e) if e.code() == tonic::Code::Unavailable => None,
                    Err(e) => panic!("round {round}: move r{range_id} s{from} -> s{to}: {e}"),
                }
            }
        })
        .await;
        let done = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                let r = range_of(&pd, &key).await;
                if let Some(d) = &r.descriptor {
                    let v = voters(d);
                    if v.contains(&to) && !d.replicas.iter().any(|x| x.store_id == from) && d.replicas.len() == 3 {
                        return r;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        let Ok(after) = done else {
            let now = range_of(&pd, &key).await;
            panic!(
                "round {round}: the move of the leader's replica s{from} -> s{to} did not finish in 60 s: {now:?}\n{}",
                c.read_log("placement")
            );
        };
        let secs = started.elapsed().as_secs_f64();
        // Calls went through while the leadership and the replica moved.
        wait_until("calls to succeed after the move", Duration::from_secs(10), || {
            let ops = load.ops();
            async move { (ops > ops_before).then_some(()) }
        })
        .await;
        eprintln!(
            "round {round}: s{from} (leader) -> s{to} done in {secs:.2} s; replicas {:?}, {} calls since the start",
            after.descriptor.map(|d| voters(&d)).unwrap_or_default(),
            load.ops() - ops_before
        );
        took.push(secs);
    }
    let out = load.stop_and_check(&client, "moves of the leader's replica").await;
    // Every move operator finished as such, none failed and none was retried as a whole.
    let m = metrics::scrape(&metrics_addr)
        .await
        .unwrap_or_else(|| panic!("placement metrics at {metrics_addr} not readable"));
    let ok = metrics::sum(&m, "skv_placement_operators_total{kind=\"move\",result=\"ok\"}");
    let all = metrics::sum(&m, "skv_placement_operators_total{kind=\"move\",");
    let started = metrics::sum(&m, "skv_placement_operators_started_total{kind=\"move\",");
    let retries: Vec<&str> = m
        .lines()
        .filter(|l| l.starts_with("skv_placement_operator_step_retries_total{"))
        .collect();
    eprintln!(
        "{MOVES} moves of the leader's replica: {ok} ok of {all} finished ({started} started), {:?} s each, {} calls; step retries: {retries:?}",
        took, out.ops
    );
    // The steps placement retried from a re-read range (each ended the operator before).
    for l in c
        .read_log("placement")
        .lines()
        .filter(|l| l.contains("move step refused"))
    {
        eprintln!("placement: {l}");
    }
    assert_eq!(started, MOVES as f64, "{m}");
    assert_eq!(ok, MOVES as f64, "moves not ok:\n{m}");
    assert_eq!(all, MOVES as f64, "moves that ended otherwise:\n{m}");
}
