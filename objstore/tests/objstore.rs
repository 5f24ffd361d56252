//! skv-objstore against a real S3-compatible server (s3s-fs) and against file://.

use skv_objstore::format::CheckpointHeader;
use skv_objstore::manifest::BackupObjects;
use skv_objstore::{ObjError, ObjMetrics, ObjectStoreUrl, Objects, OpenError};
use skv_testkit::s3::S3Server;
use std::path::PathBuf;
use std::time::Instant;

const KEYS: usize = 100_000;
/// The cluster the tests' checkpoints belong to.
const CLUSTER: &str = "0123456789abcdef0123456789abcdef";

fn header(range: u64, generation: u64, index: u64) -> CheckpointHeader {
    CheckpointHeader {
        range_id: range,
        generation,
        conf_ver: 1,
        epoch_version: 1,
        applied_index: index,
        applied_term: generation,
        created_unix_ms: skv_objstore::store::now_ms(),
        start: Vec::new(),
        end: Vec::new(),
        descriptor: b"descriptor".to_vec(),
    }
}

fn key(i: usize) -> Vec<u8> {
    format!("user/{i:08}").into_bytes()
}

/// A value that does not compress much (xorshift bytes), so 100,000 keys take several parts.
fn value(i: usize) -> Vec<u8> {
    let mut x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = (i as u64 + 1).to_be_bytes().to_vec();
    for _ in 0..12 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v
}

async fn upload(o: &Objects, range: u64, generation: u64, index: u64, n: usize) -> skv_objstore::CheckpointEntry {
    o.upload_checkpoint(header(range, generation, index), move |sink| {
        for i in 0..n {
            sink.push(&key(i), &value(i))?;
        }
        Ok(())
    })
    .await
    .unwrap_or_else(|e| panic!("upload: {e}"))
}

async fn s3(server: &S3Server, url: &str) -> Objects {
    let url: ObjectStoreUrl = url.parse().unwrap();
    Objects::open_with_vars(&url, server.env(), ObjMetrics::new())
        .await
        .unwrap_or_else(|e| panic!("open {url}: {e}"))
        .for_cluster(CLUSTER)
        .unwrap()
}

async fn file(dir: &std::path::Path) -> Objects {
    let url: ObjectStoreUrl = format!("file://{}", dir.display()).parse().unwrap();
    Objects::open(&url, ObjMetrics::new())
        .await
        .unwrap()
        .for_cluster(CLUSTER)
        .unwrap()
}

/// Uploads and commits 100,000 keys, reads them back through the manifest, checks each.
async fn round_trip(o: &Objects, label: &str) {
    let t = Instant::now();
    let entry = upload(o, 7, 2, 1000, KEYS).await;
    let upload_ms = t.elapsed().as_millis();
    assert_eq!(entry.key_count, KEYS as u64);
    assert!(
        o.read_manifest(7).await.unwrap().is_none(),
        "visible before the manifest names it"
    );
    let (m, deleted) = o.commit_checkpoint(entry.clone(), 1).await.unwrap();
    assert!(deleted.is_empty());
    assert_eq!(m.latest(), Some(&entry));
    let latest = o
        .read_manifest(7)
        .await
        .unwrap()
        .and_then(|m| m.latest().cloned())
        .unwrap();
    let t = Instant::now();
    let mut i = 0usize;
    let s = o
        .read_checkpoint(&latest, |block| {
            for e in block {
                if e.key != key(i) || e.value != value(i) {
                    return Err(format!("entry {i} differs"));
                }
                i += 1;
            }
            Ok(())
        })
        .await
        .unwrap();
    assert_eq!(i, KEYS);
    assert_eq!(s.entries, KEYS as u64);
    println!(
        "{label}: 100,000 keys ({} raw bytes) -> {} bytes in {} blocks; upload {upload_ms} ms, read {} ms",
        s.raw_bytes,
        entry.size,
        s.blocks,
        t.elapsed().as_millis()
    );
    assert!(
        entry.size > skv_objstore::store::PART_BYTES as u64,
        "the test must cross the multipart threshold"
    );
    let listing = o.list("").await.unwrap();
    println!("{label} listing:");
    for (p, size, _) in &listing {
        println!("  {size:>10}  {p}");
    }
    assert!(
        listing
            .iter()
            .any(|(p, size, _)| *p == entry.path && *size == entry.size)
    );
    assert!(
        listing
            .iter()
            .any(|(p, _, _)| *p == format!("clusters/{CLUSTER}/manifests/ranges/00000000000000000007.json"))
    );
}

#[tokio::test]
async fn s3_round_trip_of_100k_keys() {
    let server = S3Server::start(&["skv"]);
    let o = s3(&server, "s3://skv/cluster-a").await;
    round_trip(&o, "s3s-fs").await;
    assert_eq!(o.metrics.uploads.get(), 1);
    assert_eq!(o.metrics.downloads.get(), 1);
    assert!(o.metrics.upload_bytes.get() > skv_objstore::store::PART_BYTES as u64);
    // The objects really are in the bucket under the prefix.
    assert!(
        server
            .dir
            .path()
            .join(format!("skv/cluster-a/clusters/{CLUSTER}/manifests/ranges"))
            .is_dir()
    );
}

#[tokio::test]
async fn file_round_trip_of_100k_keys() {
    let dir = tempfile::tempdir().unwrap();
    let o = file(dir.path()).await;
    round_trip(&o, "file").await;
}

/// Flips one byte, then truncates, the object on disk: both reads are refused.
async fn corruption_is_refused(o: &Objects, object_file: impl Fn(&str) -> PathBuf) {
    let entry = upload(o, 9, 1, 50, 5_000).await;
    o.commit_checkpoint(entry.clone(), 1).await.unwrap();
    let path = object_file(&entry.path);
    let good = std::fs::read(&path).unwrap();
    assert_eq!(good.len() as u64, entry.size);

    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x01;
    std::fs::write(&path, &bad).unwrap();
    let mut got = 0usize;
    let r = o
        .read_checkpoint(&entry, |b| {
            got += b.len();
            Ok(())
        })
        .await;
    assert!(matches!(r, Err(ObjError::Format(_))), "{r:?}");
    assert!(got < 5_000);

    std::fs::write(&path, &good[..good.len() - 20]).unwrap();
    let r = o.read_checkpoint(&entry, |_| Ok(())).await;
    assert!(matches!(r, Err(ObjError::Format(_))), "{r:?}");

    // Another valid checkpoint in its place does not match the manifest entry either.
    std::fs::write(&path, &good).unwrap();
    o.read_checkpoint(&entry, |_| Ok(())).await.unwrap();
    let mut other = entry.clone();
    other.checksum = "0000000000000000".into();
    assert!(matches!(
        o.read_checkpoint(&other, |_| Ok(())).await,
        Err(ObjError::Mismatch { .. })
    ));
}

#[tokio::test]
async fn s3_corrupt_and_truncated_objects_are_refused() {
    let server = S3Server::start(&["skv"]);
    let o = s3(&server, "s3://skv/p").await;
    let root = server.dir.path().join("skv/p");
    corruption_is_refused(&o, |rel| root.join(rel)).await;
}

#[tokio::test]
async fn file_corrupt_and_truncated_objects_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let o = file(dir.path()).await;
    let root = dir.path().to_path_buf();
    corruption_is_refused(&o, |rel| root.join(rel)).await;
}

#[tokio::test]
async fn start_errors_are_one_clear_error() {
    let server = S3Server::start(&["skv"]);
    let url: ObjectStoreUrl = "s3://missing-bucket/p".parse().unwrap();
    let e = Objects::open_with_vars(&url, server.env(), ObjMetrics::new())
        .await
        .unwrap_err();
    println!("missing bucket: {e}");
    assert!(matches!(e, OpenError::NotFound { .. }), "{e:?}");

    let url: ObjectStoreUrl = "s3://skv/p".parse().unwrap();
    let mut env = server.env();
    for (k, v) in env.iter_mut() {
        if k == "AWS_SECRET_ACCESS_KEY" {
            *v = "wrong-secret".into();
        }
    }
    let e = Objects::open_with_vars(&url, env, ObjMetrics::new()).await.unwrap_err();
    println!("bad credentials: {e}");
    assert!(matches!(e, OpenError::Denied { .. }), "{e:?}");

    let mut env = server.env();
    for (k, v) in env.iter_mut() {
        if k == "AWS_ENDPOINT" {
            *v = format!("http://127.0.0.1:{}", skv_testkit::free_port());
        }
    }
    let t = Instant::now();
    let e = Objects::open_with_vars(&url, env, ObjMetrics::new()).await.unwrap_err();
    println!("unreachable endpoint ({} ms): {e}", t.elapsed().as_millis());
    assert!(matches!(e, OpenError::Check { .. }), "{e:?}");

    // Plain http without AWS_ALLOW_HTTP is refused, not silently downgraded.
    let env: Vec<_> = server
        .env()
        .into_iter()
        .filter(|(k, _)| k != "AWS_ALLOW_HTTP")
        .collect();
    let e = Objects::open_with_vars(&url, env, ObjMetrics::new()).await.unwrap_err();
    println!("http without AWS_ALLOW_HTTP: {e}");
    assert!(matches!(e, OpenError::HttpNotAllowed { .. }), "{e:?}");

    let e = Objects::open(&"file:///nonexistent/skv-objects".parse().unwrap(), ObjMetrics::new())
        .await
        .unwrap_err();
    assert!(matches!(e, OpenError::NoDirectory { .. }), "{e:?}");
    assert!("s3:/bucket".parse::<ObjectStoreUrl>().is_err());
    // The good one opens.
    s3(&server, "s3://skv/p").await;
}

#[tokio::test]
async fn retention_deletes_covered_checkpoints_but_not_those_a_backup_names() {
    let server = S3Server::start(&["skv"]);
    let o = s3(&server, "s3://skv").await;
    let a = upload(&o, 3, 1, 10, 100).await;
    o.commit_checkpoint(a.clone(), 1).await.unwrap();
    let b = upload(&o, 3, 1, 20, 100).await;
    // A backup names b.
    let backup = BackupObjects {
        id: "b1".into(),
        objects: vec![b.path.clone()],
    };
    let body = serde_json::to_vec(&backup).unwrap();
    std::fs::create_dir_all(server.dir.path().join("skv/backups/b1")).unwrap();
    std::fs::write(server.dir.path().join("skv/backups/b1/manifest.json"), body).unwrap();
    let (_, deleted) = o.commit_checkpoint(b.clone(), 1).await.unwrap();
    assert_eq!(deleted, vec![a.path.clone()]);
    let c = upload(&o, 3, 2, 30, 100).await;
    let (m, deleted) = o.commit_checkpoint(c.clone(), 1).await.unwrap();
    assert!(deleted.is_empty(), "{deleted:?}");
    let kept: Vec<&str> = m.checkpoints.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(kept, vec![b.path.as_str(), c.path.as_str()]);
    let listed: Vec<String> = o
        .list(&format!("clusters/{CLUSTER}/snapshots"))
        .await
        .unwrap()
        .into_iter()
        .map(|x| x.0)
        .collect();
    assert_eq!(listed, vec![b.path.clone(), c.path.clone()]);
    // A deposed leader (older generation) cannot write the manifest; its object is removed.
    let old = upload(&o, 3, 1, 40, 100).await;
    assert!(matches!(
        o.commit_checkpoint(old.clone(), 1).await,
        Err(ObjError::Manifest(_))
    ));
    let listed: Vec<String> = o
        .list(&format!("clusters/{CLUSTER}/snapshots"))
        .await
        .unwrap()
        .into_iter()
        .map(|x| x.0)
        .collect();
    assert!(!listed.contains(&old.path));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_to_a_stopped_server_fails_and_the_next_one_succeeds() {
    let mut server = S3Server::start(&["skv"]);
    let o = s3(&server, "s3://skv/p").await;
    server.stop();
    // Large enough to go multipart: the failure comes while the producer still pushes.
    let r = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        o.upload_checkpoint(header(4, 1, 10), |sink| {
            for i in 0..KEYS {
                sink.push(&key(i), &value(i))?;
            }
            Ok(())
        }),
    )
    .await
    .expect("a failed upload must end, not hang");
    assert!(r.is_err());
    assert_eq!(o.metrics.uploads.get(), 0);
    server.restart();
    let e = upload(&o, 4, 1, 11, 1000).await;
    o.commit_checkpoint(e.clone(), 1).await.unwrap();
    assert_eq!(
        o.read_manifest(4).await.unwrap().and_then(|m| m.latest().cloned()),
        Some(e)
    );
}

/// In-progress multipart uploads s3s-fs keeps (`.upload-<id>.json` at its root).
fn open_uploads(server: &S3Server) -> usize {
    std::fs::read_dir(server.dir.path())
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with(".upload-"))
                .count()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_multipart_upload_is_aborted() {
    let server = S3Server::start(&["skv"]);
    let o = s3(&server, "s3://skv/p").await;
    // Incompressible values, more than one part, pushed until the upload is dropped.
    let task = tokio::spawn({
        let o = o.clone();
        async move {
            o.upload_checkpoint(header(1, 1, 1), move |sink| {
                let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
                for i in 0..1_000_000usize {
                    let v: Vec<u8> = (0..4096)
                        .map(|_| {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            x as u8
                        })
                        .collect();
                    sink.push(&key(i), &v)?;
                }
                Ok(())
            })
            .await
        }
    });
    let started = Instant::now();
    while open_uploads(&server) == 0 {
        assert!(started.elapsed().as_secs() < 30, "no multipart upload started");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    task.abort();
    let _ = task.await;
    let started = Instant::now();
    while open_uploads(&server) > 0 {
        assert!(
            started.elapsed().as_secs() < 15,
            "the dropped upload was not aborted: {} open",
            open_uploads(&server)
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        o.list(&format!("clusters/{CLUSTER}/snapshots"))
            .await
            .unwrap()
            .is_empty(),
        "no object was completed"
    );
}

/// Two clusters on one URL (a cluster restored from a backup next to the one it was taken
/// from): range ids restart at 1 in each, yet their manifests and objects stay apart, a
/// commit in one never sweeps or prunes the other's, and an unscoped handle reads none.
#[tokio::test]
async fn two_clusters_on_one_url_keep_separate_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let url: ObjectStoreUrl = format!("file://{}", dir.path().display()).parse().unwrap();
    let base = Objects::open(&url, ObjMetrics::new()).await.unwrap();
    let a = base.for_cluster("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa").unwrap();
    let b = base.for_cluster("bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb").unwrap();
    assert!(matches!(base.for_cluster("../x"), Err(ObjError::BadClusterId(_))));
    assert!(matches!(base.for_cluster(""), Err(ObjError::BadClusterId(_))));
    assert!(matches!(base.read_manifest(1).await, Err(ObjError::NoCluster)));

    let ea = upload(&a, 1, 1, 10, 100).await;
    a.commit_checkpoint(ea.clone(), 1).await.unwrap();
    assert!(
        ea.path
            .starts_with("clusters/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa/snapshots/"),
        "{}",
        ea.path
    );
    assert!(b.read_manifest(1).await.unwrap().is_none(), "b sees a's range 1");
    // b's range 1, later index and generation: it must not replace, prune or sweep a's.
    let eb = upload(&b, 1, 5, 500, 50).await;
    let (mb, deleted) = b.commit_checkpoint(eb.clone(), 1).await.unwrap();
    assert!(deleted.is_empty(), "{deleted:?}");
    assert_eq!(mb.cluster_id, "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb");
    let ma = a.read_manifest(1).await.unwrap().unwrap();
    assert_eq!(ma.latest(), Some(&ea));
    assert_eq!(ma.cluster_id, "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa");
    assert_eq!(b.read_manifest(1).await.unwrap().unwrap().latest(), Some(&eb));
    assert!(dir.path().join(&ea.path).is_file() && dir.path().join(&eb.path).is_file());
    // a's next checkpoint prunes a's old one only.
    let ea2 = upload(&a, 1, 1, 20, 100).await;
    let (_, deleted) = a.commit_checkpoint(ea2.clone(), 1).await.unwrap();
    assert_eq!(deleted, vec![ea.path.clone()]);
    assert!(dir.path().join(&eb.path).is_file());

    // A manifest under a's prefix that names b (copied by hand) is refused, not used.
    let a_manifest = dir
        .path()
        .join(skv_objstore::manifest_path("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", 1));
    std::fs::copy(
        dir.path()
            .join(skv_objstore::manifest_path("bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb", 1)),
        &a_manifest,
    )
    .unwrap();
    let e = a.read_manifest(1).await.unwrap_err();
    println!("{e}");
    assert!(matches!(e, ObjError::OtherCluster { .. }), "{e:?}");
    let listing = base.list("").await.unwrap();
    for (p, size, _) in &listing {
        println!("  {size:>8}  {p}");
    }
    assert!(listing.iter().all(|(p, _, _)| p.starts_with("clusters/")));
}
