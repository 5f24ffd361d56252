//! etcd through `etcd-client`. Gets are linearizable (etcd's default,
//! `serializable = false`), as skv's are.

use super::{Driver, DriverError, DriverResult, ErrorKind, prefix_end};
use async_trait::async_trait;
use etcd_client::{Client, CompactionOptions, GetOptions};

/// How to reach etcd and what to do before measuring.
#[derive(Clone, Debug)]
pub struct EtcdOptions {
    /// Client URLs of every member (`http://127.0.0.1:2379`).
    pub endpoints: Vec<String>,
    /// Before measuring: compact the history at the current revision and defragment
    /// every member (DESIGN.md §13: without it etcd's reads collapse after a load).
    pub compact: bool,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        Self {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            compact: true,
        }
    }
}

pub struct EtcdDriver {
    client: Client,
    options: EtcdOptions,
    scan_end: Vec<u8>,
}

impl EtcdDriver {
    /// One client balanced over every endpoint.
    pub async fn connect(o: &EtcdOptions, key_prefix: &str) -> DriverResult<Self> {
        if o.endpoints.is_empty() {
            return Err(DriverError::new(ErrorKind::Rejected, "no etcd endpoint given"));
        }
        let client = Client::connect(&o.endpoints, None).await.map_err(from_etcd)?;
        Ok(Self {
            client,
            options: o.clone(),
            scan_end: prefix_end(key_prefix.as_bytes()),
        })
    }
}

/// Maps etcd-client's errors onto the kinds counted in the results.
pub fn from_etcd(e: etcd_client::Error) -> DriverError {
    use tonic::Code;
    let kind = match &e {
        etcd_client::Error::GRpcStatus(s) => match s.code() {
            Code::Unavailable => ErrorKind::Unavailable,
            Code::DeadlineExceeded => ErrorKind::Timeout,
            Code::InvalidArgument
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::ResourceExhausted
            | Code::FailedPrecondition => ErrorKind::Rejected,
            _ => ErrorKind::Other,
        },
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => ErrorKind::Transport,
        etcd_client::Error::InvalidArgs(_) | etcd_client::Error::InvalidUri(_) => ErrorKind::Rejected,
        _ => ErrorKind::Other,
    };
    DriverError::new(kind, e.to_string())
}

#[async_trait]
impl Driver for EtcdDriver {
    async fn get(&self, key: &[u8]) -> DriverResult<Option<Vec<u8>>> {
        let mut kv = self.client.kv_client();
        let r = kv.get(key, None).await.map_err(from_etcd)?;
        Ok(r.kvs().first().map(|kv| kv.value().to_vec()))
    }

    async fn put(&self, key: &[u8], value: &[u8]) -> DriverResult<()> {
        let mut kv = self.client.kv_client();
        kv.put(key, value, None).await.map_err(from_etcd)?;
        Ok(())
    }

    async fn delete(&self, key: &[u8]) -> DriverResult<bool> {
        let mut kv = self.client.kv_client();
        let r = kv.delete(key, None).await.map_err(from_etcd)?;
        Ok(r.deleted() > 0)
    }

    async fn scan(&self, start: &[u8], limit: u32) -> DriverResult<usize> {
        let mut kv = self.client.kv_client();
        let opts = GetOptions::new()
            .with_range(self.scan_end.clone())
            .with_limit(i64::from(limit));
        let r = kv.get(start, Some(opts)).await.map_err(from_etcd)?;
        Ok(r.kvs().len())
    }

    /// Compacts at the current revision (physically) and defragments each member in turn.
    async fn prepare(&self) -> DriverResult<()> {
        if !self.options.compact {
            return Ok(());
        }
        let mut kv = self.client.kv_client();
        let status = kv
            .get(self.scan_end.clone(), Some(GetOptions::new().with_count_only()))
            .await
            .map_err(from_etcd)?;
        let revision = status.header().map(|h| h.revision()).unwrap_or(0);
        if revision > 1 {
            match kv
                .compact(revision, Some(CompactionOptions::new().with_physical()))
                .await
            {
                Ok(_) => {}
                // Already compacted at this revision (an earlier round): nothing to do.
                Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("compacted") => {}
                Err(e) => return Err(from_etcd(e)),
            }
        }
        for ep in &self.options.endpoints {
            let mut one = Client::connect([ep.as_str()], None).await.map_err(from_etcd)?;
            one.defragment().await.map_err(from_etcd)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etcd_errors_map_to_kinds() {
        for (e, kind) in [
            (
                etcd_client::Error::GRpcStatus(tonic::Status::unavailable("x")),
                ErrorKind::Unavailable,
            ),
            (
                etcd_client::Error::GRpcStatus(tonic::Status::deadline_exceeded("x")),
                ErrorKind::Timeout,
            ),
            (
                etcd_client::Error::GRpcStatus(tonic::Status::resource_exhausted("x")),
                ErrorKind::Rejected,
            ),
            (etcd_client::Error::InvalidArgs("x".into()), ErrorKind::Rejected),
            (etcd_client::Error::Internal("x".into()), ErrorKind::Other),
        ] {
            assert_eq!(from_etcd(e).kind, kind);
        }
    }
}
