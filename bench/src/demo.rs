//! The scaling demo: run a workload against skv for minutes while asking placement each
//! second how many ranges and stores there are, and mark splits, merges, replica moves
//! and store joins on the chart.

use anyhow::Result;
use serde::{Deserialize, Serialize};
use skv_proto::internal as pb;
use skv_rpc::PlacementMembers;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use crate::stats::Sample;

/// Something that changed in the cluster during a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Seconds since measuring started (0 for changes seen before it).
    pub t: f64,
    /// `split`, `merge`, `move`, `store-join`, `store-down`, `store-drain`.
    pub kind: String,
    pub detail: String,
}

/// What placement says about the cluster at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterView {
    /// Range id → its replicas' store ids, sorted.
    pub ranges: BTreeMap<u64, Vec<u64>>,
    /// Store id → state (`pb::StoreState` as i32).
    pub stores: BTreeMap<u64, i32>,
}

impl ClusterView {
    pub fn from_scan(r: &pb::ScanRangesResponse) -> Self {
        let ranges = r
            .ranges
            .iter()
            .filter_map(|info| info.descriptor.as_ref())
            .map(|d| {
                let mut stores: Vec<u64> = d.replicas.iter().map(|r| r.store_id).collect();
                stores.sort_unstable();
                (d.range_id, stores)
            })
            .collect();
        let stores = r.stores.iter().map(|s| (s.store_id, s.state)).collect();
        Self { ranges, stores }
    }

    /// Stores that are up.
    pub fn stores_up(&self) -> u64 {
        self.stores
            .values()
            .filter(|s| **s == pb::StoreState::Up as i32)
            .count() as u64
    }
}

fn state_name(s: i32) -> &'static str {
    match pb::StoreState::try_from(s) {
        Ok(pb::StoreState::Up) => "up",
        Ok(pb::StoreState::Down) => "down",
        Ok(pb::StoreState::Draining) => "draining",
        Ok(pb::StoreState::Removed) => "removed",
        Err(_) => "unknown",
    }
}

/// The changes from `prev` to `cur`, as `(kind, detail)`.
pub fn diff(prev: &ClusterView, cur: &ClusterView) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let (p, c) = (prev.ranges.len(), cur.ranges.len());
    if c > p {
        out.push(("split".into(), format!("ranges {p} -> {c}")));
    } else if c < p {
        out.push(("merge".into(), format!("ranges {p} -> {c}")));
    }
    for (id, stores) in &cur.ranges {
        if let Some(before) = prev.ranges.get(id)
            && before != stores
        {
            out.push(("move".into(), format!("r{id}: stores {before:?} -> {stores:?}")));
        }
    }
    let up = pb::StoreState::Up as i32;
    for (id, &state) in &cur.stores {
        let before = prev.stores.get(id).copied();
        if before == Some(state) {
            continue;
        }
        let kind = match state {
            s if s == up => "store-join",
            s if s == pb::StoreState::Draining as i32 => "store-drain",
            _ => "store-down",
        };
        let was = before.map(state_name).unwrap_or("absent");
        out.push((kind.into(), format!("store {id}: {was} -> {}", state_name(state))));
    }
    for id in prev.stores.keys().filter(|id| !cur.stores.contains_key(id)) {
        out.push(("store-down".into(), format!("store {id}: gone")));
    }
    out
}

/// One poll: seconds since the measured phase started (negative before it), and the view.
pub type Poll = (f64, ClusterView);

/// Events between consecutive polls (changes before measuring are put at t = 0).
pub fn events(polls: &[Poll]) -> Vec<Event> {
    polls
        .windows(2)
        .flat_map(|w| {
            let t = w[1].0.max(0.0);
            diff(&w[0].1, &w[1].1)
                .into_iter()
                .map(move |(kind, detail)| Event { t, kind, detail })
        })
        .collect()
}

/// Sets each sample's range and store counts from the last poll at or before it.
pub fn attach_counts(series: &mut [Sample], polls: &[Poll]) {
    for s in series.iter_mut() {
        if let Some((_, v)) = polls.iter().rev().find(|(t, _)| *t <= s.t + 1e-9) {
            s.ranges = Some(v.ranges.len() as u64);
            s.stores = Some(v.stores_up());
        }
    }
}

/// skv-rpc's placement client over every placement URL (comma separated).
pub fn placement_client(urls: &str) -> Result<PlacementMembers> {
    anyhow::ensure!(
        urls.split(',').any(|u| !u.trim().is_empty()),
        "no placement URL: give --placement or SKV_PLACEMENT"
    );
    PlacementMembers::new(&[urls]).map_err(|e| anyhow::anyhow!("--placement: {e}"))
}

pub async fn fetch_view(c: &PlacementMembers) -> Result<ClusterView> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let r = c
        .call(deadline, Duration::from_secs(5), |mut c| async move {
            c.scan_ranges(pb::ScanRangesRequest::default()).await
        })
        .await
        .map_err(|s| anyhow::anyhow!("ScanRanges: {:?}: {}", s.code(), s.message()))?;
    Ok(ClusterView::from_scan(&r))
}

/// Polls placement once a second until stopped; prints each change to stderr.
pub struct Poller {
    polls: Arc<parking_lot::Mutex<Vec<(Instant, ClusterView)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Poller {
    pub fn start(client: PlacementMembers, t0: Instant) -> Self {
        let polls: Arc<parking_lot::Mutex<Vec<(Instant, ClusterView)>>> = Arc::default();
        let out = polls.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last: Option<ClusterView> = None;
            let mut failing = false;
            loop {
                tick.tick().await;
                match fetch_view(&client).await {
                    Ok(v) => {
                        failing = false;
                        let now = Instant::now();
                        if let Some(prev) = &last {
                            for (kind, detail) in diff(prev, &v) {
                                eprintln!("[{:>6.1}s] {kind}: {detail}", now.duration_since(t0).as_secs_f64());
                            }
                        }
                        last = Some(v.clone());
                        out.lock().push((now, v));
                    }
                    Err(e) if !failing => {
                        failing = true;
                        eprintln!("placement does not answer (will keep asking): {e}");
                    }
                    Err(_) => {}
                }
            }
        });
        Self { polls, task }
    }

    /// Stops polling; the polls relative to `measure_start`.
    pub fn finish(self, measure_start: Instant) -> Vec<Poll> {
        self.task.abort();
        let polls = self.polls.lock();
        polls
            .iter()
            .map(|(at, v)| {
                let t = if *at >= measure_start {
                    at.duration_since(measure_start).as_secs_f64()
                } else {
                    -measure_start.duration_since(*at).as_secs_f64()
                };
                (t, v.clone())
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(ranges: &[(u64, &[u64])], stores: &[(u64, pb::StoreState)]) -> ClusterView {
        ClusterView {
            ranges: ranges.iter().map(|(id, s)| (*id, s.to_vec())).collect(),
            stores: stores.iter().map(|(id, s)| (*id, *s as i32)).collect(),
        }
    }

    #[test]
    fn diff_names_each_kind_of_change() {
        use pb::StoreState::*;
        let three = [(1, Up), (2, Up), (3, Up)];
        let base = view(&[(1, &[1, 2, 3])], &three);
        let cases: Vec<(ClusterView, Vec<&str>)> = vec![
            (base.clone(), vec![]),
            (view(&[(1, &[1, 2, 3]), (2, &[1, 2, 3])], &three), vec!["split"]),
            (view(&[], &three), vec!["merge"]),
            (view(&[(1, &[1, 2, 4])], &three), vec!["move"]),
            (
                view(&[(1, &[1, 2, 3])], &[(1, Up), (2, Up), (3, Up), (4, Up)]),
                vec!["store-join"],
            ),
            (
                view(&[(1, &[1, 2, 3])], &[(1, Up), (2, Up), (3, Down)]),
                vec!["store-down"],
            ),
            (
                view(&[(1, &[1, 2, 3])], &[(1, Up), (2, Up), (3, Draining)]),
                vec!["store-drain"],
            ),
            (view(&[(1, &[1, 2, 3])], &[(1, Up), (2, Up)]), vec!["store-down"]),
            (
                view(
                    &[(1, &[2, 3, 4]), (5, &[2, 3, 4])],
                    &[(1, Up), (2, Up), (3, Up), (4, Up)],
                ),
                vec!["split", "move", "store-join"],
            ),
        ];
        for (cur, want) in cases {
            let got: Vec<String> = diff(&base, &cur).into_iter().map(|(k, _)| k).collect();
            assert_eq!(got, want, "{cur:?}");
        }
        let d = diff(&base, &view(&[(1, &[1, 2, 4])], &three));
        assert_eq!(d[0].1, "r1: stores [1, 2, 3] -> [1, 2, 4]");
    }

    #[test]
    fn events_and_counts_follow_the_polls() {
        use pb::StoreState::Up;
        let one = view(&[(1, &[1])], &[(1, Up)]);
        let two = view(&[(1, &[1]), (2, &[1])], &[(1, Up), (2, Up)]);
        let polls: Vec<Poll> = vec![(-1.0, one.clone()), (0.5, one), (2.2, two.clone()), (3.2, two)];
        let ev = events(&polls);
        let kinds: Vec<(f64, &str)> = ev.iter().map(|e| (e.t, e.kind.as_str())).collect();
        assert_eq!(kinds, vec![(2.2, "split"), (2.2, "store-join")]);
        let mut series: Vec<Sample> = (1..=4)
            .map(|t| Sample {
                t: t as f64,
                ..Default::default()
            })
            .collect();
        attach_counts(&mut series, &polls);
        let counts: Vec<(Option<u64>, Option<u64>)> = series.iter().map(|s| (s.ranges, s.stores)).collect();
        assert_eq!(
            counts,
            vec![
                (Some(1), Some(1)),
                (Some(1), Some(1)),
                (Some(2), Some(2)),
                (Some(2), Some(2))
            ]
        );
    }

    #[test]
    fn view_from_a_placement_answer() {
        let r = pb::ScanRangesResponse {
            ranges: vec![pb::RangeInfo {
                descriptor: Some(pb::RangeDescriptor {
                    range_id: 7,
                    replicas: [3u64, 1, 2]
                        .iter()
                        .map(|s| pb::Replica { store_id: *s, role: 0 })
                        .collect(),
                    ..Default::default()
                }),
                leader_store_id: 1,
            }],
            stores: vec![
                pb::StoreInfo {
                    store_id: 1,
                    state: pb::StoreState::Up as i32,
                    ..Default::default()
                },
                pb::StoreInfo {
                    store_id: 2,
                    state: pb::StoreState::Down as i32,
                    ..Default::default()
                },
            ],
        };
        let v = ClusterView::from_scan(&r);
        assert_eq!(v.ranges.get(&7), Some(&vec![1, 2, 3]));
        assert_eq!(v.stores_up(), 1);
        assert!(placement_client("").is_err());
    }
}
