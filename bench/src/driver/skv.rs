//! skv through its Rust SDK (crate `skv`): the path a user's program takes.

use super::{ConnectOptions, Driver, DriverError, DriverResult, ErrorKind, prefix_end};
use async_trait::async_trait;
use futures::TryStreamExt;
use skv::{Client, KeyRange};

pub struct SkvDriver {
    client: Client,
    scan_end: Vec<u8>,
}

impl SkvDriver {
    /// One SDK client over every proxy endpoint given (connections are lazy).
    pub async fn connect(o: &ConnectOptions) -> DriverResult<Self> {
        if o.skv_endpoints.is_empty() {
            return Err(DriverError::new(
                ErrorKind::Rejected,
                "no skv endpoint: give --skv-endpoint or SKV_ENDPOINT",
            ));
        }
        let client = Client::builder()
            .endpoints(o.skv_endpoints.iter().cloned())
            .token(o.skv_token.clone())
            .timeout(o.op_timeout)
            .connect()
            .await
            .map_err(from_sdk)?;
        Ok(Self {
            client,
            scan_end: prefix_end(o.key_prefix.as_bytes()),
        })
    }
}

/// Maps the SDK's typed errors onto the kinds counted in the results.
pub fn from_sdk(e: skv::Error) -> DriverError {
    let kind = match &e {
        skv::Error::Unavailable(_) => ErrorKind::Unavailable,
        skv::Error::DeadlineExceeded(_) => ErrorKind::Timeout,
        skv::Error::OutcomeUnknown(_) => ErrorKind::OutcomeUnknown,
        skv::Error::Transport(_) => ErrorKind::Transport,
        skv::Error::Unauthenticated(_)
        | skv::Error::PermissionDenied(_)
        | skv::Error::InvalidArgument(_)
        | skv::Error::ConditionFailed(_)
        | skv::Error::ResourceExhausted(_)
        | skv::Error::Config(_) => ErrorKind::Rejected,
        _ => ErrorKind::Other,
    };
    DriverError::new(kind, e.to_string())
}

#[async_trait]
impl Driver for SkvDriver {
    async fn get(&self, key: &[u8]) -> DriverResult<Option<Vec<u8>>> {
        Ok(self.client.get(key).await.map_err(from_sdk)?.map(|e| e.value))
    }

    async fn put(&self, key: &[u8], value: &[u8]) -> DriverResult<()> {
        self.client.put(key, value.to_vec()).await.map_err(from_sdk)?;
        Ok(())
    }

    async fn delete(&self, key: &[u8]) -> DriverResult<bool> {
        self.client.delete(key).await.map_err(from_sdk)
    }

    async fn scan(&self, start: &[u8], limit: u32) -> DriverResult<usize> {
        let range = KeyRange::new(start.to_vec(), self.scan_end.clone());
        self.client
            .scan_limit(range, limit)
            .try_fold(0usize, |n, _kv| async move { Ok(n + 1) })
            .await
            .map_err(from_sdk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sdk_errors_map_to_kinds() {
        for (e, kind) in [
            (skv::Error::Unavailable("x".into()), ErrorKind::Unavailable),
            (skv::Error::DeadlineExceeded("x".into()), ErrorKind::Timeout),
            (skv::Error::OutcomeUnknown("x".into()), ErrorKind::OutcomeUnknown),
            (skv::Error::Transport("x".into()), ErrorKind::Transport),
            (skv::Error::Unauthenticated("x".into()), ErrorKind::Rejected),
            (skv::Error::Decode("x".into()), ErrorKind::Other),
        ] {
            assert_eq!(from_sdk(e).kind, kind);
        }
    }

    #[tokio::test]
    async fn connect_needs_an_endpoint() {
        let o = ConnectOptions {
            skv_endpoints: vec![],
            skv_token: String::new(),
            etcd: Default::default(),
            redis_url: String::new(),
            key_prefix: "b/".into(),
            redis_ordered_index: false,
            op_timeout: std::time::Duration::from_secs(1),
        };
        let err = SkvDriver::connect(&o).await.err().map(|e| e.kind);
        assert_eq!(err, Some(ErrorKind::Rejected));
    }
}
