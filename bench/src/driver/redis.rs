//! Redis through the `redis` crate: tokio, one multiplexed (pipelining) connection per
//! client. Redis is the in-memory ceiling (run it with `--save '' --appendonly no`).
//!
//! Redis keys are not ordered, so for scans (workload E) the driver keeps a sorted set
//! of every key (score 0, ordered by bytes) as YCSB's Redis binding does: a put also
//! does `ZADD`, and a scan is `ZRANGE BYLEX ... LIMIT` then `MGET`, two round trips.
//! Without scans in the workload the index is off and a put is one `SET`.

use super::{ConnectOptions, Driver, DriverError, DriverResult, ErrorKind, prefix_end};
use async_trait::async_trait;
use redis::AsyncConnectionConfig;
use redis::aio::MultiplexedConnection;
use std::time::Duration;

pub struct RedisDriver {
    conn: MultiplexedConnection,
    /// The sorted set that orders keys, when scans need it.
    index: Option<Vec<u8>>,
    /// `(<end of the bench prefix>`, the exclusive upper bound of a lexicographic range.
    scan_max: Vec<u8>,
}

impl RedisDriver {
    pub async fn connect(o: &ConnectOptions) -> DriverResult<Self> {
        let client = redis::Client::open(o.redis_url.as_str()).map_err(from_redis)?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(3)))
            .set_response_timeout(Some(o.op_timeout));
        let conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(from_redis)?;
        let end = prefix_end(o.key_prefix.as_bytes());
        let scan_max = if end.is_empty() {
            b"+".to_vec()
        } else {
            [b"(".as_slice(), &end].concat()
        };
        Ok(Self {
            conn,
            index: o
                .redis_ordered_index
                .then(|| format!("skv-bench:index:{}", o.key_prefix).into_bytes()),
            scan_max,
        })
    }
}

/// Maps the redis crate's errors onto the kinds counted in the results.
pub fn from_redis(e: redis::RedisError) -> DriverError {
    let kind = if e.is_timeout() {
        ErrorKind::Timeout
    } else if e.is_connection_refusal() || e.is_connection_dropped() || e.is_io_error() {
        ErrorKind::Transport
    } else {
        ErrorKind::Other
    };
    DriverError::new(kind, e.to_string())
}

#[async_trait]
impl Driver for RedisDriver {
    async fn get(&self, key: &[u8]) -> DriverResult<Option<Vec<u8>>> {
        let mut c = self.conn.clone();
        redis::cmd("GET").arg(key).query_async(&mut c).await.map_err(from_redis)
    }

    async fn put(&self, key: &[u8], value: &[u8]) -> DriverResult<()> {
        let mut c = self.conn.clone();
        match &self.index {
            None => redis::cmd("SET").arg(key).arg(value).exec_async(&mut c).await,
            Some(index) => {
                let mut p = redis::pipe();
                p.cmd("SET").arg(key).arg(value).ignore();
                p.cmd("ZADD").arg(index).arg(0).arg(key).ignore();
                p.exec_async(&mut c).await
            }
        }
        .map_err(from_redis)
    }

    async fn delete(&self, key: &[u8]) -> DriverResult<bool> {
        let mut c = self.conn.clone();
        let n: i64 = match &self.index {
            None => redis::cmd("DEL").arg(key).query_async(&mut c).await,
            Some(index) => {
                let mut p = redis::pipe();
                p.cmd("DEL").arg(key);
                p.cmd("ZREM").arg(index).arg(key).ignore();
                p.query_async::<(i64,)>(&mut c).await.map(|(n,)| n)
            }
        }
        .map_err(from_redis)?;
        Ok(n > 0)
    }

    async fn scan(&self, start: &[u8], limit: u32) -> DriverResult<usize> {
        let Some(index) = &self.index else {
            return Err(DriverError::new(
                ErrorKind::Rejected,
                "Redis scans need the key index (on for workloads with scans)",
            ));
        };
        let mut c = self.conn.clone();
        let min = [b"[".as_slice(), start].concat();
        let keys: Vec<Vec<u8>> = redis::cmd("ZRANGE")
            .arg(index)
            .arg(min)
            .arg(&self.scan_max)
            .arg("BYLEX")
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut c)
            .await
            .map_err(from_redis)?;
        if keys.is_empty() {
            return Ok(0);
        }
        let values: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut c)
            .await
            .map_err(from_redis)?;
        Ok(values.iter().filter(|v| v.is_some()).count())
    }
}
