//! `--config file.toml` on a real binary: the file supplies flags, the command line wins.

use skv_proto::internal::GetMembersRequest;
use skv_proto::internal::placement_client::PlacementClient;
use skv_testkit::{ChildGuard, bin_path, free_port, wait_until};
use std::process::{Command, Stdio};
use std::time::Duration;

#[tokio::test]
async fn placement_reads_its_flags_from_a_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let (file_port, flag_port) = (free_port(), free_port());
    let cfg = dir.path().join("placement.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:{file_port}\"\ndata_dir = \"{}\"\nname = \"from-file\"\n",
            dir.path().join("pd").display()
        ),
    )
    .unwrap();
    // The file alone: the server listens where the file says, under the file's name.
    let mut cmd = Command::new(bin_path("skv-placement"));
    cmd.arg("--config")
        .arg(&cfg)
        .env_remove("SKV_LISTEN")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let guard = ChildGuard::spawn("placement", &mut cmd).unwrap();
    let url = format!("http://127.0.0.1:{file_port}");
    let leader = wait_until("placement from the config file", Duration::from_secs(20), || {
        let url = url.clone();
        async move {
            let mut c = PlacementClient::connect(url).await.ok()?;
            c.get_members(GetMembersRequest {}).await.ok()?.into_inner().leader
        }
    })
    .await;
    assert_eq!(leader.name, "from-file");
    drop(guard);

    // A command-line flag overrides the file.
    let mut cmd = Command::new(bin_path("skv-placement"));
    cmd.arg("--config")
        .arg(&cfg)
        .arg("--listen")
        .arg(format!("127.0.0.1:{flag_port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _guard = ChildGuard::spawn("placement", &mut cmd).unwrap();
    let url = format!("http://127.0.0.1:{flag_port}");
    wait_until("placement on the flag's port", Duration::from_secs(20), || {
        let url = url.clone();
        async move { PlacementClient::connect(url).await.ok() }
    })
    .await;

    // An unknown key fails like an unknown flag, with a non-zero exit.
    std::fs::write(&cfg, "no_such_flag = 1\n").unwrap();
    let out = Command::new(bin_path("skv-placement"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-flag"));
}
