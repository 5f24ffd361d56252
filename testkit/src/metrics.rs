//! A server's Prometheus `/metrics` page, as the tests read it.

use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The body of `GET /metrics` at `addr` (`host:port`), or `None` when the server does not
/// answer within 5 s (connect) and 10 s (the page).
pub async fn scrape(addr: &str) -> Option<String> {
    let mut s = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    let req = format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf).to_string();
    text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}

/// The sum of the samples that `selector` picks on a metrics page: a metric name (every
/// series of it, whatever its labels: `skv_bootstrap_installs_total`), one series
/// (`name{reason="corrupt"}`), or the series whose labels start so (`name{kind="move",`).
/// A longer metric name that starts with `selector` (`name_bucket`) is not picked.
pub fn sum(text: &str, selector: &str) -> f64 {
    let open = selector.ends_with(',') || selector.ends_with('{');
    text.lines()
        .filter(|l| {
            l.strip_prefix(selector)
                .is_some_and(|rest| open || rest.starts_with([' ', '{']))
        })
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.trim().parse::<f64>().ok()))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::sum;

    #[test]
    fn selectors_pick_names_series_and_label_prefixes() {
        let page = "# HELP x_total x\n\
                    x_total{kind=\"move\",result=\"ok\"} 3\n\
                    x_total{kind=\"move\",result=\"failed\"} 1\n\
                    x_total{kind=\"split\",result=\"ok\"} 5\n\
                    x_total_bucket{le=\"1\"} 100\n\
                    y 2.5\n";
        assert_eq!(sum(page, "x_total"), 9.0);
        assert_eq!(sum(page, "x_total{kind=\"move\",result=\"ok\"}"), 3.0);
        assert_eq!(sum(page, "x_total{kind=\"move\","), 4.0);
        assert_eq!(sum(page, "y"), 2.5);
        assert_eq!(sum(page, "z"), 0.0);
    }
}
