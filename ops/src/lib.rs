//! The operations endpoint every edgeloop component serves (the broker's and
//! the processor's `metrics_listen`, the agent's `metrics_listen`):
//! `/healthz`, `/readyz` and Prometheus `/metrics`.
//!
//! - [`serve`]: a deliberately small HTTP/1.1 server, one GET per
//!   connection, answered by the component's own [`Endpoint`];
//! - [`counter`] and [`gauge`]: lines of the Prometheus text exposition.
//!
//! No I/O besides the listener and no dependency on Kafka or MQTT, so the
//! agent on a device carries it too.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// An answer: the status line's code and reason, and the body.
pub type Answer = (&'static str, String);

/// What a component answers on each path.
pub trait Endpoint: Send + Sync + 'static {
    /// The Prometheus text exposition of the component's metrics.
    fn metrics(&self) -> String;
    /// `Ok(())` while the component does its job; otherwise why not, in a
    /// sentence (`/readyz` answers 503 with it).
    fn ready(&self) -> Result<(), String>;
}

/// Binds `listen` (so that a taken port fails the component's start-up).
pub async fn bind(listen: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(listen).await
}

/// The answer to a GET of `path`: `/healthz` is 200 whenever the process
/// answers at all, `/readyz` 200 or 503 from [`Endpoint::ready`], `/metrics`
/// the exposition, anything else 404.
pub fn answer(endpoint: &dyn Endpoint, path: &str) -> Answer {
    match path {
        "/metrics" => ("200 OK", endpoint.metrics()),
        "/healthz" => ("200 OK", "ok\n".to_string()),
        "/readyz" => match endpoint.ready() {
            Ok(()) => ("200 OK", "ok\n".to_string()),
            Err(why) => ("503 Service Unavailable", format!("not ready: {why}\n")),
        },
        _ => ("404 Not Found", "not found\n".to_string()),
    }
}

/// Serves `endpoint` on `listener` until `shutdown`.
pub async fn serve<E: Endpoint>(
    listener: TcpListener,
    endpoint: std::sync::Arc<E>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    tracing::info!(listen = %listener.local_addr()?, "serving /metrics, /healthz, /readyz");
    loop {
        let (mut socket, _) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            accepted = listener.accept() => accepted?,
        };
        let endpoint = endpoint.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let n = match tokio::time::timeout(Duration::from_secs(5), socket.read(&mut buf)).await
            {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let request = String::from_utf8_lossy(&buf[..n]);
            let path = request.split_whitespace().nth(1).unwrap_or("/");
            let (status, body) = answer(endpoint.as_ref(), path);
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(response.as_bytes()).await;
        });
    }
}

/// Appends a counter with its HELP and TYPE lines (`help` without the
/// final full stop).
pub fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}.\n# TYPE {name} counter\n{name} {value}"
    );
}

/// Appends a gauge with its HELP and TYPE lines.
pub fn gauge(out: &mut String, name: &str, help: &str, value: impl std::fmt::Display) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}.\n# TYPE {name} gauge\n{name} {value}"
    );
}

/// The metric families of `exposition` (its `# TYPE` lines) whose name,
/// in backquotes, `doc` does not mention: a component's test that its
/// metrics are all documented.
pub fn undocumented(exposition: &str, doc: &str) -> Vec<String> {
    exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next())
        .filter(|name| !doc.contains(&format!("`{name}`")))
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    struct Fake {
        ready: AtomicBool,
    }

    impl Endpoint for Fake {
        fn metrics(&self) -> String {
            let mut out = String::new();
            counter(&mut out, "x_total", "Things", 3);
            gauge(&mut out, "y", "Level", 1.5);
            out
        }
        fn ready(&self) -> Result<(), String> {
            if self.ready.load(Ordering::Relaxed) {
                Ok(())
            } else {
                Err("the link is down".into())
            }
        }
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn the_endpoint_answers_each_path_and_readyz_follows_the_component() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let fake = Arc::new(Fake {
            ready: AtomicBool::new(false),
        });
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(listener, fake.clone(), stop.clone()));

        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200 OK"));
        let not_ready = get(addr, "/readyz").await;
        assert!(not_ready.starts_with("HTTP/1.1 503"), "{not_ready}");
        assert!(not_ready.ends_with("not ready: the link is down\n"));
        fake.ready.store(true, Ordering::Relaxed);
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200 OK"));
        let metrics = get(addr, "/metrics").await;
        assert!(
            metrics.contains("# TYPE x_total counter\nx_total 3\n"),
            "{metrics}"
        );
        assert!(metrics.contains("# TYPE y gauge\ny 1.5\n"), "{metrics}");
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));

        stop.cancel();
        server.await.unwrap().unwrap();
    }

    #[test]
    fn undocumented_names_the_families_the_doc_does_not_mention() {
        let mut out = String::new();
        counter(&mut out, "a_total", "A", 1);
        gauge(&mut out, "b", "B", 2);
        assert_eq!(undocumented(&out, "| `a_total` | counter |"), vec!["b"]);
        assert!(undocumented(&out, "`a_total` and `b`").is_empty());
    }
}
