//! Quickstart: run `skvctl playground` in one terminal, paste the `export ...`
//! line it prints into another, then `cargo run -p skv --example quickstart`.
//!
//! Reads `SKV_ENDPOINT` (comma-separated proxy URLs, default
//! `http://127.0.0.1:7400`) and `SKV_TOKEN`.

use futures::TryStreamExt;
use serde::{Deserialize, Serialize};
use skv::{CasOutcome, Client};

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct Profile {
    name: String,
    karma: i64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let endpoint = std::env::var("SKV_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:7400".into());
    let token = std::env::var("SKV_TOKEN").unwrap_or_default();
    let client = Client::builder()
        .endpoints(endpoint.split(','))
        .token(token)
        .connect()
        .await?;

    // Bytes in, bytes out.
    let v = client.put("quickstart/greeting", "hello").await?;
    println!("put quickstart/greeting -> version {v}");
    let e = client.get("quickstart/greeting").await?.expect("just written");
    println!(
        "get quickstart/greeting -> {:?} (version {})",
        String::from_utf8_lossy(&e.value),
        e.version
    );

    // Optimistic concurrency.
    match client
        .compare_and_swap("quickstart/greeting", e.version, "hello, world")
        .await?
    {
        CasOutcome::Swapped { version } => println!("cas ok -> version {version}"),
        CasOutcome::Mismatch { current_version } => println!("cas lost: now version {current_version}"),
    }

    // Batches and scans.
    let results = client
        .batch_put((1..=5).map(|i| (format!("quickstart/n/{i}"), i.to_string())))
        .await?;
    println!("batch_put: {} results", results.len());
    let rows: Vec<skv::KeyValue> = client.scan_prefix("quickstart/n/").try_collect().await?;
    for kv in &rows {
        println!(
            "  {} = {}",
            String::from_utf8_lossy(&kv.key),
            String::from_utf8_lossy(&kv.value)
        );
    }

    // A typed, BTreeMap-like view.
    let users = client.map::<u64, Profile>("quickstart/users/");
    for (id, name) in [(10u64, "grace"), (2, "ada"), (7, "edsger")] {
        users
            .insert(
                &id,
                &Profile {
                    name: name.into(),
                    karma: id as i64 * 10,
                },
            )
            .await?;
    }
    let all: Vec<(u64, Profile)> = users.iter().try_collect().await?;
    println!("users in key order:");
    for (id, p) in &all {
        println!("  {id}: {p:?}");
    }
    assert!(all.windows(2).all(|w| w[0].0 < w[1].0));
    println!("removed 7: {}", users.remove(&7).await?);
    println!("contains 7: {}", users.contains_key(&7).await?);
    Ok(())
}
