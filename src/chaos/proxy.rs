//! A device's link: every agent reaches the broker through a TCP proxy of
//! its own inside the chaos process, which can cut it. A cut closes the
//! device's open connections at once; connections it opens while the link
//! is down are accepted and then blackholed (held open, nothing forwarded,
//! as a dead radio link looks), and closed when the link comes back.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Result;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The link's state: a generation that changes at every cut and restore, and
/// whether it is up.
#[derive(Debug, Clone, Copy)]
struct State {
    generation: u64,
    up: bool,
}

pub struct Link {
    pub addr: SocketAddr,
    state: watch::Sender<State>,
    /// Connections closed by a cut or blackholed while down.
    pub severed: Arc<AtomicU64>,
}

impl Link {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr, stop: CancellationToken) -> Result<Link> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (state, rx) = watch::channel(State {
            generation: 0,
            up: true,
        });
        let severed = Arc::new(AtomicU64::new(0));
        let counter = severed.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = stop.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let Ok((socket, _)) = accepted else {
                    continue;
                };
                let _ = socket.set_nodelay(true);
                tokio::spawn(serve(
                    socket,
                    upstream,
                    rx.clone(),
                    counter.clone(),
                    stop.clone(),
                ));
            }
        });
        Ok(Link {
            addr,
            state,
            severed,
        })
    }

    /// Cuts the link: open connections close, new ones are blackholed.
    pub fn cut(&self) {
        self.state.send_modify(|s| {
            s.generation += 1;
            s.up = false;
        });
    }

    /// Brings the link back (blackholed connections close; the device reconnects).
    pub fn restore(&self) {
        self.state.send_modify(|s| {
            if !s.up {
                s.generation += 1;
                s.up = true;
            }
        });
    }
}

async fn serve(
    mut socket: TcpStream,
    upstream: SocketAddr,
    mut state: watch::Receiver<State>,
    severed: Arc<AtomicU64>,
    stop: CancellationToken,
) {
    let at_accept = *state.borrow_and_update();
    let changed = async {
        let _ = state
            .wait_for(|s| s.generation != at_accept.generation)
            .await;
    };
    if !at_accept.up {
        // Blackholed: held open, nothing read or written.
        severed.fetch_add(1, Ordering::Relaxed);
        tokio::select! {
            _ = changed => {}
            _ = stop.cancelled() => {}
        }
        return;
    }
    let Ok(mut broker) = TcpStream::connect(upstream).await else {
        // The broker is down: the device sees its connection refused, closed.
        return;
    };
    let _ = broker.set_nodelay(true);
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut socket, &mut broker) => {}
        _ = changed => {
            severed.fetch_add(1, Ordering::Relaxed);
        }
        _ = stop.cancelled() => {}
    }
}
