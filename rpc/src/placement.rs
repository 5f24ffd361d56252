use crate::{EndpointOptions, RpcError, channel_with};
use skv_proto::internal::placement_client::PlacementClient;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::time::Instant;
use tonic::Status;
use tonic::transport::Channel;

/// Largest placement answer decoded (a full range map of a big cluster).
const MAX_DECODE: usize = 256 * 1024 * 1024;

/// The placement service's members. Any member answers reads; followers forward writes
/// to the leader, so a caller never needs to find the leader itself.
pub struct PlacementMembers {
    members: Vec<(String, PlacementClient<Channel>)>,
    preferred: AtomicUsize,
    /// The channels speak TLS (for the error messages).
    tls: bool,
}

impl PlacementMembers {
    /// One lazy channel per URL (`host:port` or URL; commas split a list).
    pub fn new<S: AsRef<str>>(urls: &[S]) -> Result<Self, RpcError> {
        Self::with_options(urls, &EndpointOptions::default())
    }

    /// As [`PlacementMembers::new`], with connection settings.
    pub fn with_options<S: AsRef<str>>(urls: &[S], options: &EndpointOptions) -> Result<Self, RpcError> {
        let mut members = Vec::new();
        for u in urls.iter().flat_map(|u| u.as_ref().split(',')) {
            let u = u.trim();
            if u.is_empty() {
                continue;
            }
            let ch = channel_with(u, options)?;
            members.push((
                crate::url(u),
                PlacementClient::new(ch).max_decoding_message_size(MAX_DECODE),
            ));
        }
        if members.is_empty() {
            return Err(RpcError::NoEndpoints);
        }
        Ok(PlacementMembers {
            members,
            preferred: AtomicUsize::new(0),
            tls: options.tls.is_some(),
        })
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Member `i` (modulo the count): its URL and a client.
    pub fn member(&self, i: usize) -> (&str, PlacementClient<Channel>) {
        let (u, c) = &self.members[i % self.members.len()];
        (u, c.clone())
    }

    /// The member that answered last.
    pub fn preferred(&self) -> usize {
        self.preferred.load(Ordering::Relaxed)
    }

    /// Tries each member in turn, the last good one first, until one answers. Each try
    /// gets at most `per_try`, and none starts after `deadline`. A member's answer,
    /// error or not, is returned as it is: only a timeout or a transport failure moves
    /// on to the next member.
    pub async fn call<T, F, Fut>(&self, deadline: Instant, per_try: Duration, mut f: F) -> Result<T, Status>
    where
        F: FnMut(PlacementClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let n = self.members.len();
        let first = self.preferred();
        let mut last = Status::unavailable("placement unreachable: no member tried before the deadline");
        for i in 0..n {
            let idx = (first + i) % n;
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let t = per_try.min(deadline - now);
            match tokio::time::timeout(t, f(self.members[idx].1.clone())).await {
                Ok(Ok(r)) => {
                    self.preferred.store(idx, Ordering::Relaxed);
                    return Ok(r.into_inner());
                }
                Ok(Err(s)) if is_transport(&s) => {
                    // Say what failed, TLS included: tonic alone says "transport error".
                    let why = crate::tls::explain_transport(&s, self.tls);
                    tracing::debug!(member = %self.members[idx].0, error = %why, "placement member unreachable");
                    last = Status::new(s.code(), why);
                }
                Ok(Err(s)) => {
                    self.preferred.store(idx, Ordering::Relaxed);
                    return Err(s);
                }
                Err(_) => {
                    last =
                        Status::deadline_exceeded(format!("placement {} did not answer in {t:?}", self.members[idx].0))
                }
            }
        }
        Err(last)
    }
}

/// The member could not be reached or went away: another member may answer.
fn is_transport(s: &Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn members_from_lists() {
        let m = PlacementMembers::new(&["127.0.0.1:1, 127.0.0.1:2", "http://127.0.0.1:3"]).unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(m.member(1).0, "http://127.0.0.1:2");
        assert!(matches!(PlacementMembers::new(&[" , "]), Err(RpcError::NoEndpoints)));
        assert!(PlacementMembers::new(&["http://bad host"]).is_err());
    }

    #[tokio::test]
    async fn moves_on_from_unreachable_members_and_remembers_the_good_one() {
        // Port 1 refuses connections; nothing listens there on a test machine.
        let m = PlacementMembers::new(&["127.0.0.1:1", "127.0.0.1:1"]).unwrap();
        let mut tried = 0;
        let r: Result<(), Status> = m
            .call(Instant::now() + Duration::from_secs(5), Duration::from_secs(1), |_c| {
                tried += 1;
                async { Err(Status::unavailable("down")) }
            })
            .await;
        assert_eq!(tried, 2, "every member tried once");
        assert_eq!(r.unwrap_err().code(), tonic::Code::Unavailable);
        // A definite answer (not a transport error) is returned at once.
        let mut tried = 0;
        let r: Result<(), Status> = m
            .call(Instant::now() + Duration::from_secs(5), Duration::from_secs(1), |_c| {
                tried += 1;
                async { Err(Status::invalid_argument("no")) }
            })
            .await;
        assert_eq!((tried, r.unwrap_err().code()), (1, tonic::Code::InvalidArgument));
        // Past the deadline nothing is tried.
        let r: Result<(), Status> = m
            .call(Instant::now(), Duration::from_secs(1), |_c| async {
                Ok(tonic::Response::new(()))
            })
            .await;
        assert!(r.is_err());
    }
}
