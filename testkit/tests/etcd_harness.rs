//! The harness itself: a real etcd starts, answers, and is gone after drop.

use skv_testkit::Etcd;

#[tokio::test]
async fn etcd_starts_answers_and_is_killed_on_drop() {
    let etcd = Etcd::start().await;
    let pid = etcd.pid();
    let mut c = etcd_client::Client::connect([etcd.client_url.as_str()], None)
        .await
        .unwrap();
    c.put("k", "v", None).await.unwrap();
    let r = c.get("k", None).await.unwrap();
    assert_eq!(r.kvs()[0].value(), b"v");
    drop(etcd);
    // The process must be gone (reaped): /proc/<pid> disappears.
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "etcd pid {pid} still alive"
    );
}
