//! The faults added for issue 14's second round (ADR 0026): a slow disk on one storenode,
//! the loss of a proxy and the loss of an etcd member. The loop that schedules them is nemesis.rs's.

use crate::cluster::{ClusterError, Role};
use crate::nemesis::{Ctx, NemesisKind, pick_store, result_text};
use rand::Rng;
use rand::rngs::StdRng;
use std::time::Duration;

/// Delay of every write and fsync on a slowed disk: uniform in this range (ms).
const SLOW_DISK_MS: (u64, u64) = (20, 150);

pub(crate) async fn fault(ctx: &Ctx, kind: NemesisKind, rng: &mut StdRng, hold: Duration, round: u64) {
    match kind {
        NemesisKind::SlowDisk => {
            let n = ctx.cluster.lock().await.stores.len();
            let Some(i) = pick_store(ctx, rng, n, None) else {
                ctx.event(kind.name(), "-", format!("round {round}: no free storenode"));
                return;
            };
            let name = format!("store-{i}");
            let ms = rng.random_range(SLOW_DISK_MS.0..=SLOW_DISK_MS.1);
            let r = set_delay(ctx, i, Duration::from_millis(ms)).await;
            ctx.event(
                "slow-disk",
                &name,
                result_text(r.map(|()| {
                    format!("round {round}: every write and fsync +{ms} ms for {hold:?} (applied by its lazyfs)")
                })),
            );
            tokio::time::sleep(hold).await;
            let r = set_delay(ctx, i, Duration::ZERO).await;
            ctx.event(
                "disk-restored",
                &name,
                result_text(r.map(|()| "full speed".to_string())),
            );
            ctx.busy.lock().remove(&i);
        }
        NemesisKind::ProxyKill => {
            let n = ctx.cluster.lock().await.proxies.len();
            let i = rng.random_range(0..n.max(1));
            let name = format!("proxy-{i}");
            let was = ctx.cluster.lock().await.kill(Role::Proxy, i);
            ctx.event(
                "proxy-kill",
                &name,
                format!("round {round}: kill -9 (was running: {was}), down {hold:?}"),
            );
            tokio::time::sleep(hold).await;
            let r = ctx.cluster.lock().await.start_proc(Role::Proxy, i);
            ctx.event("restart", &name, result_text(r.map(|()| "restarted".to_string())));
        }
        NemesisKind::EtcdMember => {
            let i = {
                let mut c = ctx.cluster.lock().await;
                match c.etcd_mut().members() {
                    Some(m) if !m.is_empty() => rng.random_range(0..m.len()),
                    _ => {
                        drop(c);
                        ctx.event(
                            "etcd-member-kill",
                            "-",
                            format!("round {round}: FAILED: etcd has one member"),
                        );
                        return;
                    }
                }
            };
            let name = format!("etcd-{i}");
            let r = match ctx.cluster.lock().await.etcd_mut().members() {
                Some(m) => m.kill(i),
                None => Err(ClusterError::NotReady("no etcd members".into())),
            };
            ctx.event(
                "etcd-member-kill",
                &name,
                result_text(r.map(|was| format!("round {round}: kill -9 (was running: {was}), down {hold:?}"))),
            );
            tokio::time::sleep(hold).await;
            let r = match ctx.cluster.lock().await.etcd_mut().members() {
                Some(m) => m.start_member(i),
                None => Err(ClusterError::NotReady("no etcd members".into())),
            };
            ctx.event(
                "restart",
                &name,
                result_text(r.map(|()| "restarted on its data dir".to_string())),
            );
        }
        _ => ctx.event(kind.name(), "-", format!("round {round}: not a fault of faults.rs")),
    }
}

/// Sets storenode `i`'s disk delay and waits (up to 3 s) until its skv-lazyfs says it
/// applied it, so a fault that did not take is reported FAILED, not silently run.
async fn set_delay(ctx: &Ctx, i: usize, delay: Duration) -> Result<(), ClusterError> {
    let before = {
        let c = ctx.cluster.lock().await;
        let Some(d) = c.disks() else {
            return Err(ClusterError::NotReady(
                "the storenodes are not on lazyfs disks".to_string(),
            ));
        };
        let before = d.delays_applied(i);
        d.set_delay(i, delay)?;
        before
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let applied = ctx
            .cluster
            .lock()
            .await
            .disks()
            .map(|d| d.delays_applied(i))
            .unwrap_or(0);
        if applied > before {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(ClusterError::NotReady(format!(
                "skv-lazyfs of store-{i} did not apply a delay of {delay:?} within 3 s"
            )));
        }
    }
}
