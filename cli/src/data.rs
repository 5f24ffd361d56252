//! Data commands through the SDK: get, put, delete, scan, cas.

use crate::args::{Global, Output, ScanArgs};
use crate::output::{input_bytes, json_bytes, show_bytes, show_cell, table};
use anyhow::Result;
use futures::StreamExt;
use serde_json::{Map, Value, json};
use skv::{CasOutcome, Client, KeyRange};

/// What a command wants the process to exit with.
pub type ExitCode = i32;

pub async fn client(g: &Global) -> Result<Client> {
    let mut b = Client::builder()
        .endpoints(g.endpoint.iter().cloned())
        .token(g.token.clone().unwrap_or_default())
        .timeout(g.timeout);
    if let Some(ca) = &g.ca_file {
        b = b.ca_file(ca);
    }
    // Presented when the proxy asks for a client certificate (--client-tls-ca-file).
    match (&g.client_cert_file, &g.client_key_file) {
        (Some(c), Some(k)) => b = b.client_cert(c, k),
        (None, None) => {}
        _ => anyhow::bail!("--client-cert-file and --client-key-file go together"),
    }
    Ok(b.connect().await?)
}

pub async fn get(g: &Global, key: &str, stale_ok: bool) -> Result<ExitCode> {
    let c = client(g).await?;
    let k = input_bytes(key, g.hex)?;
    let entry = if stale_ok {
        c.get_stale(&k).await?
    } else {
        c.get(&k).await?
    };
    match (g.output, entry) {
        (Output::Json, e) => {
            let mut m = Map::new();
            json_bytes(&mut m, "key", &k, g.hex);
            m.insert("found".into(), e.is_some().into());
            if let Some(e) = &e {
                json_bytes(&mut m, "value", &e.value, g.hex);
                m.insert("version".into(), e.version.into());
            }
            println!("{}", Value::Object(m));
            Ok(if e.is_some() { 0 } else { 1 })
        }
        (Output::Table, Some(e)) => {
            println!("{}", show_bytes(&e.value, g.hex));
            eprintln!("(version {})", e.version);
            Ok(0)
        }
        (Output::Table, None) => {
            eprintln!("not found: {key}");
            Ok(1)
        }
    }
}

pub async fn put(g: &Global, key: &str, value: &str, if_version: Option<u64>, if_absent: bool) -> Result<ExitCode> {
    let c = client(g).await?;
    let k = input_bytes(key, g.hex)?;
    let v = input_bytes(value, g.hex)?;
    let version = match (if_version, if_absent) {
        (Some(ver), _) => c.put_if_version(&k, ver, v).await?,
        (None, true) => c.put_if_absent(&k, v).await?,
        (None, false) => c.put(&k, v).await?,
    };
    match g.output {
        Output::Json => println!("{}", json!({ "version": version })),
        Output::Table => println!("OK (version {version})"),
    }
    Ok(0)
}

pub async fn delete(g: &Global, key: &str, if_version: Option<u64>) -> Result<ExitCode> {
    let c = client(g).await?;
    let k = input_bytes(key, g.hex)?;
    let deleted = match if_version {
        Some(v) => c.delete_if_version(&k, v).await?,
        None => c.delete(&k).await?,
    };
    match g.output {
        Output::Json => println!("{}", json!({ "deleted": deleted })),
        Output::Table if deleted => println!("deleted"),
        Output::Table => println!("not found (nothing deleted)"),
    }
    Ok(0)
}

pub async fn cas(g: &Global, key: &str, expected_version: u64, value: &str) -> Result<ExitCode> {
    let c = client(g).await?;
    let k = input_bytes(key, g.hex)?;
    let v = input_bytes(value, g.hex)?;
    let outcome = c.compare_and_swap(&k, expected_version, v).await?;
    match (g.output, outcome) {
        (Output::Json, CasOutcome::Swapped { version }) => {
            println!("{}", json!({ "succeeded": true, "version": version }));
            Ok(0)
        }
        (Output::Json, CasOutcome::Mismatch { current_version }) => {
            println!("{}", json!({ "succeeded": false, "version": current_version }));
            Ok(1)
        }
        (Output::Table, CasOutcome::Swapped { version }) => {
            println!("OK (version {version})");
            Ok(0)
        }
        (Output::Table, CasOutcome::Mismatch { current_version }) => {
            if current_version == 0 {
                eprintln!("mismatch: the key is absent, not at version {expected_version}");
            } else {
                eprintln!("mismatch: the key is at version {current_version}, not {expected_version}");
            }
            Ok(1)
        }
    }
}

pub fn scan_range(a: &ScanArgs, hex: bool) -> Result<KeyRange> {
    Ok(match (&a.prefix, &a.start, &a.end) {
        (Some(p), _, _) => KeyRange::prefix(input_bytes(p, hex)?),
        (None, s, e) => KeyRange::new(
            s.as_deref()
                .map(|s| input_bytes(s, hex))
                .transpose()?
                .unwrap_or_default(),
            e.as_deref()
                .map(|e| input_bytes(e, hex))
                .transpose()?
                .unwrap_or_default(),
        ),
    })
}

pub async fn scan(g: &Global, a: &ScanArgs) -> Result<ExitCode> {
    let c = client(g).await?;
    let mut stream = c.scan_limit(scan_range(a, g.hex)?, a.limit);
    match g.output {
        Output::Json => {
            let mut rows = Vec::new();
            while let Some(kv) = stream.next().await {
                let kv = kv?;
                let mut m = Map::new();
                json_bytes(&mut m, "key", &kv.key, g.hex);
                json_bytes(&mut m, "value", &kv.value, g.hex);
                m.insert("version".into(), kv.version.into());
                rows.push(Value::Object(m));
            }
            println!("{}", Value::Array(rows));
        }
        Output::Table => {
            let mut rows = Vec::new();
            while let Some(kv) = stream.next().await {
                let kv = kv?;
                rows.push(vec![
                    show_cell(&kv.key, g.hex),
                    show_cell(&kv.value, g.hex),
                    kv.version.to_string(),
                ]);
            }
            print!("{}", table(&["KEY", "VALUE", "VERSION"], &rows));
            eprintln!("({} keys)", rows.len());
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_ranges_from_flags() {
        let a = ScanArgs {
            prefix: Some("ab".into()),
            start: None,
            end: None,
            limit: 0,
        };
        assert_eq!(scan_range(&a, false).unwrap(), KeyRange::new("ab", "ac"));
        let a = ScanArgs {
            prefix: None,
            start: Some("61".into()),
            end: None,
            limit: 0,
        };
        assert_eq!(scan_range(&a, true).unwrap(), KeyRange::new("a", ""));
        let a = ScanArgs {
            prefix: None,
            start: None,
            end: None,
            limit: 3,
        };
        assert_eq!(scan_range(&a, false).unwrap(), KeyRange::default());
    }
}
