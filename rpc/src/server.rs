use std::time::Duration;
use tonic::transport::server::TcpIncoming;

/// The connections a skv gRPC server accepts on `listener`: `TCP_NODELAY` on every
/// accepted socket, and TCP keepalive. tonic ignores `Server::tcp_nodelay` when a server
/// is given its own listener (`serve_with_incoming`), and without NODELAY every small
/// response waits for the peer's delayed ACK (~40 ms on Linux). Every skv server
/// accepts through this.
pub fn incoming(listener: tokio::net::TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(60)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt;

    #[tokio::test]
    async fn accepted_sockets_have_nodelay() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut inc = incoming(listener);
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let accepted = inc.next().await.unwrap().unwrap();
        assert!(
            accepted.nodelay().unwrap(),
            "accepted connections must have TCP_NODELAY"
        );
    }
}
