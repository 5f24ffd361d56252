//! A client in another language (Python, stubs generated from proto/ with
//! grpcio-tools) talks to a real proxy. The README's test command installs
//! grpcio-tools into target/pyenv and sets SKV_PYTHON.

use skv_testkit::cluster::{Cluster, ClusterOptions, token};
use std::path::PathBuf;

fn python() -> String {
    if let Ok(p) = std::env::var("SKV_PYTHON") {
        return p;
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/pyenv/bin/python");
    if venv.exists() {
        return venv.display().to_string();
    }
    panic!("no Python with grpcio-tools: run ./scripts/test.sh (it creates target/pyenv), or set SKV_PYTHON");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpc_client_works_against_the_proxy() {
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let endpoint = cluster.proxy_url(0).trim_start_matches("http://").to_string();
    let out = tokio::process::Command::new(python())
        .arg(root.join("tests/python/kv_client.py"))
        .arg("--proto-dir")
        .arg(root.join("../proto"))
        .arg("--endpoint")
        .arg(&endpoint)
        .arg("--token")
        .arg(token("python", "write"))
        .kill_on_drop(true)
        .output()
        .await
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("PYTHON-CLIENT-OK"),
        "python client failed:\n{stdout}\n{stderr}"
    );
    cluster.shutdown().await;
}
