//! The gate: where device identity and per-device topic ACLs are enforced.
//!
//! rumqttd has no topic ACLs, and its only hook is a connect-time
//! `(client id, user name, password) -> bool`. So the listeners devices reach
//! are ours: the gate accepts each connection (plain TCP, or TLS with an
//! optional client certificate), reads its CONNECT, authenticates it, and only
//! then opens a connection of its own to rumqttd, which listens on loopback
//! only. From there it relays bytes both ways, parsing every packet the
//! client sends ([`packet`]):
//!
//! - PUBLISH to a topic the identity may not publish to ([`acl`]) is refused:
//!   MQTT 5 gets PUBACK/PUBREC with reason 0x87 (not authorized); MQTT 3.1.1
//!   has no refusal code for a publish, so the connection is closed. Either
//!   way the message never reaches rumqttd, so never the bridge or Kafka.
//! - SUBSCRIBE: refused filters get a failure code in the SUBACK (0x80 in
//!   3.1.1, 0x87 in 5); the allowed ones are forwarded to rumqttd and its
//!   codes spliced back in their places.
//! - A will message is checked like a publish, at CONNECT.
//! - A telemetry PUBLISH waits while the bridge is `bridge.max_lag_bytes`
//!   behind ([`crate::backpressure`]); until it goes, nothing more is read
//!   from that client, so TCP pushes back on it.
//! - Packets over the size limit, malformed packets and a second CONNECT
//!   close the connection; other connections carry on. The size limit
//!   (`mqtt.max_payload_bytes`) is the only one: rumqttd behind the gate
//!   allows as much, so it never drops what the gate let through.
//! - A session that logged in with a credential of the file ends when a
//!   reload removes or changes that credential ([`sessions`]).
//! - A session ends when a newer session of its client id appears on another
//!   broker replica ([`crate::replicas`]): rumqttd gets a normal DISCONNECT
//!   (its will is dropped, the device is online elsewhere), an MQTT 5
//!   client DISCONNECT 0x8E (session taken over).
//! - What is logged of a refusal is bounded, in size and per source
//!   ([`refusals`]).
//!
//! rumqttd runs each of its listeners on a thread of its own, so the gate
//! spreads devices over several (`mqtt.listener_threads`), in turn.
//!
//! Why a relay rather than a patch inside rumqttd: rumqttd's router is not a
//! public extension point, and a local link per device would mean writing
//! a broker's session layer. The relay costs one extra loopback hop but
//! keeps rumqttd's router and sessions as they are, checks every packet in
//! one place, and sees the TLS identity. (rumqttd does carry one small patch,
//! vendor/README.md: its links waited for the router's CONNACK with a
//! blocking receive, which stopped every connection of the listener's thread
//! while a device logged in.) rumqttd itself asks for a per-process secret the gate
//! presents in place of the device's credential, so a local process that
//! finds rumqttd's loopback port still cannot bypass the gate.
//!
//! The bridge and the model publisher are rumqttd local links in this
//! process: they do not pass through the gate and need no credential.

pub mod acl;
pub mod credentials;
pub mod packet;
pub mod refusals;
pub mod sessions;
#[cfg(test)]
mod tests;
pub mod tls;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::backpressure::Backpressure;
use crate::stats::BrokerStats;
use acl::{valid_device_id, Identity, Role};
use credentials::{Credential, Credentials};
use packet::{codes, Malformed};
use refusals::{shown, shown_opt, RefusalLog};
use sessions::Sessions;

/// What the gate needs to know; built from the broker config.
pub struct Gate {
    pub credentials: Option<Arc<Credentials>>,
    pub allow_anonymous: bool,
    /// rumqttd's loopback listeners for MQTT 3.1.1 and 5 (at least one of
    /// each; devices are spread over them in turn).
    pub inner_v4: Vec<SocketAddr>,
    pub inner_v5: Vec<SocketAddr>,
    pub next_upstream: AtomicUsize,
    /// The credential rumqttd accepts (from the gate only).
    pub inner_user: String,
    pub inner_secret: String,
    /// The largest packet a device may send (`mqtt.max_payload_bytes`),
    /// fixed header included: the one size limit. rumqttd behind the gate
    /// allows as much in a packet's remaining length, so never refuses what
    /// the gate let through; the gate counts what it refuses
    /// (`edgeloop_gate_packets_too_large_total`), tells MQTT 5 clients the
    /// limit in the CONNACK and closes with DISCONNECT 0x95.
    pub max_packet_bytes: usize,
    pub connect_timeout: Duration,
    pub connections: Arc<Semaphore>,
    pub stats: Arc<BrokerStats>,
    /// Telemetry let into rumqttd ahead of the bridge, and how long a
    /// publish may wait for it (`bridge.max_lag_bytes`, `bridge.max_hold`).
    pub backpressure: Arc<Backpressure>,
    pub max_hold: Duration,
    /// Sessions by the credential they logged in with, for revocation.
    pub sessions: Arc<Sessions>,
    /// This broker among its replicas: each session claims its client id
    /// there, and is closed when a newer one appears on another replica
    /// ([`crate::replicas`]). None: one broker alone (the gate's tests).
    pub replica: Option<Arc<crate::replicas::Replica>>,
    /// How often each source may log a refusal.
    pub refusals: RefusalLog,
}

/// Accepts connections on `listener` until `shutdown`.
pub async fn serve(
    gate: Arc<Gate>,
    listener: TcpListener,
    tls: Option<tls::TlsAcceptor>,
    shutdown: CancellationToken,
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = gate.connections.clone().try_acquire_owned() else {
            BrokerStats::add(&gate.stats.connections_refused, 1);
            tracing::warn!(%peer, "connection refused: the connection limit is reached");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let gate = gate.clone();
        let tls = tls.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            gate.stats.connections_open.fetch_add(1, Ordering::Relaxed);
            let result = match tls {
                None => gate.handle(stream, peer, None, &shutdown).await,
                Some(acceptor) => {
                    match tokio::time::timeout(gate.connect_timeout, acceptor.accept(stream)).await
                    {
                        Ok(Ok(stream)) => {
                            let cert_id = tls::peer_identity(stream.get_ref().1);
                            gate.handle(stream, peer, cert_id, &shutdown).await
                        }
                        Ok(Err(e)) => Err(format!("TLS handshake: {e}")),
                        Err(_) => Err("TLS handshake timed out".into()),
                    }
                }
            };
            gate.stats.connections_open.fetch_sub(1, Ordering::Relaxed);
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection closed");
            }
            drop(permit);
        });
    }
}

/// Why a CONNECT was refused, and the codes that say so.
struct Refusal {
    v4: u8,
    v5: u8,
    reason: String,
}

impl Refusal {
    fn bad_credentials(reason: String) -> Refusal {
        Refusal {
            v4: codes::V4_BAD_CREDENTIALS,
            v5: codes::V5_BAD_CREDENTIALS,
            reason,
        }
    }
    fn not_authorized(reason: String) -> Refusal {
        Refusal {
            v4: codes::V4_NOT_AUTHORIZED,
            v5: codes::V5_NOT_AUTHORIZED,
            reason,
        }
    }
}

/// A telemetry publish the gate holds until the bridge has room for it, or
/// `max_hold` is over.
struct Held {
    packet: BytesMut,
    since: tokio::time::Instant,
    admitted: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
}

/// Per-connection relay state.
struct Session {
    identity: Identity,
    level: u8,
    /// MQTT 5 topic aliases the client set.
    aliases: HashMap<u16, String>,
    /// SUBSCRIBEs forwarded with some filters removed: per packet id, the
    /// refusal code of each original filter (None: forwarded).
    pending: HashMap<u16, Vec<Option<u8>>>,
    /// Whether rumqttd's CONNACK has passed (the first packet from it).
    connack_seen: bool,
}

impl Gate {
    async fn handle<S>(
        &self,
        mut client: S,
        peer: SocketAddr,
        cert_id: Option<String>,
        shutdown: &CancellationToken,
    ) -> Result<(), String>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut cbuf = BytesMut::with_capacity(4096);
        let connect = tokio::time::timeout(
            self.connect_timeout,
            read_packet(&mut client, &mut cbuf, self.max_packet_bytes),
        )
        .await
        .map_err(|_| "no CONNECT in time".to_string())?
        .map_err(|e| {
            BrokerStats::add(&self.stats.malformed_packets, 1);
            if matches!(e, Malformed::TooLarge { .. }) {
                BrokerStats::add(&self.stats.packets_too_large, 1);
            }
            format!("before CONNECT: {e}")
        })?;
        let Some(connect) = connect else {
            return Ok(());
        };
        let parsed = packet::parse_connect(&connect).map_err(|e| {
            BrokerStats::add(&self.stats.malformed_packets, 1);
            format!("CONNECT: {e}")
        })?;
        let (identity, credential) = match self.authenticate(&parsed, cert_id).await {
            Ok(granted) => granted,
            Err(refusal) => {
                BrokerStats::add(&self.stats.auth_failures, 1);
                if let Some(suppressed) = self.refusals.admit(peer.ip()) {
                    tracing::warn!(
                        %peer,
                        client_id = %shown(&parsed.client_id),
                        user = %shown_opt(parsed.username.as_deref()),
                        reason = %refusal.reason,
                        suppressed,
                        "connection refused"
                    );
                }
                refuse(&mut client, parsed.level, refusal.v4, refusal.v5).await;
                let _ = client.shutdown().await;
                return Ok(());
            }
        };
        if let Some(will) = &parsed.will_topic {
            if !identity.can_publish(will) {
                BrokerStats::add(&self.stats.acl_refused_publishes, 1);
                if let Some(suppressed) = self.refusals.admit(peer.ip()) {
                    tracing::warn!(%peer, %identity, topic = %shown(will), suppressed, "connection refused: will topic not allowed");
                }
                refuse(
                    &mut client,
                    parsed.level,
                    codes::V4_NOT_AUTHORIZED,
                    codes::V5_NOT_AUTHORIZED,
                )
                .await;
                return Ok(());
            }
        }
        let upstreams = if parsed.level == 5 {
            &self.inner_v5
        } else {
            &self.inner_v4
        };
        let asked = tokio::time::Instant::now();
        let mut ubuf = BytesMut::with_capacity(4096);
        // rumqttd sometimes closes a log-in without a CONNACK when the same
        // client id's previous connections are being taken over at that
        // moment (rarely: about one in a few hundred when three log in at
        // once and then a fourth); the gate then logs in once more, on the
        // next listener, before it answers "server unavailable".
        let mut retried = false;
        let upstream = loop {
            let next = self.next_upstream.fetch_add(1, Ordering::Relaxed);
            let Some(&inner) = upstreams.get(next % upstreams.len().max(1)) else {
                return Err("no rumqttd listener for this protocol level".into());
            };
            ubuf.clear();
            match self.log_in_upstream(inner, &connect, &mut ubuf).await {
                Ok(upstream) => break upstream,
                Err(UpstreamLogin::Closed(e)) if !retried => {
                    retried = true;
                    BrokerStats::add(&self.stats.upstream_login_retries, 1);
                    tracing::debug!(%peer, %identity, rumqttd = %inner, error = %e, "logging in again");
                }
                Err(e) => {
                    refuse(
                        &mut client,
                        parsed.level,
                        codes::V4_SERVER_UNAVAILABLE,
                        codes::V5_SERVER_UNAVAILABLE,
                    )
                    .await;
                    return Err(format!("rumqttd at {inner}: {e}"));
                }
            }
        };
        self.stats.connect_latency.observe(asked.elapsed());
        tracing::debug!(%peer, %identity, level = parsed.level, "connected");
        // A session that logged in with a credential of the file ends when
        // a reload removes or changes that credential (the check after
        // registering covers a reload between authenticating and here).
        let registered = credential.map(|c| self.sessions.register(c));
        if let (Some(r), Some(credentials)) = (&registered, &self.credentials) {
            // Only this session: the others are the watcher's.
            if !sessions::still_granted(r.credential(), &credentials.current()) {
                BrokerStats::add(&self.stats.sessions_revoked, 1);
                tracing::info!(%peer, %identity, "session ended: its credential was removed or changed");
                return Ok(());
            }
        }
        let revoked = registered
            .as_ref()
            .map_or_else(CancellationToken::new, |r| r.revoked.clone());
        // The newest session of a client id wins across replicas.
        let claim = self.replica.as_ref().map(|r| r.claim(&identity.id));
        let taken_over = claim
            .as_ref()
            .map_or_else(CancellationToken::new, |c| c.closed.clone());
        let mut session = Session {
            identity,
            level: parsed.level,
            aliases: HashMap::new(),
            pending: HashMap::new(),
            connack_seen: false,
        };
        let (mut ur, mut uw) = upstream.into_split();
        let (mut cr, mut cw) = tokio::io::split(client);
        // rumqttd's CONNACK (and whatever came with it) goes to the client
        // first.
        let out = self.upstream_packets(&mut ubuf, &mut session)?;
        cw.write_all(&out).await.map_err(|e| e.to_string())?;
        // A telemetry publish waiting for the bridge: nothing more is read
        // from the client meanwhile (TCP pushes back on it), while
        // rumqttd's packets to it still pass.
        let mut held: Option<Held> = None;
        loop {
            // Relay every whole packet the client sent (some may have
            // arrived together with its CONNECT).
            while held.is_none() {
                let len = match packet::frame(&cbuf, self.max_packet_bytes) {
                    Ok(Some(len)) => len,
                    Ok(None) => break,
                    Err(e) => {
                        self.refuse_malformed(&mut cw, &session, peer, &e).await;
                        if matches!(e, Malformed::TooLarge { .. }) {
                            linger(&mut cr, self.max_packet_bytes).await;
                        }
                        return Ok(());
                    }
                };
                let p = cbuf.split_to(len);
                match self.check(&p, &mut session, peer) {
                    Verdict::Forward => uw.write_all(&p).await.map_err(|e| e.to_string())?,
                    Verdict::Telemetry(cost) => {
                        if self.backpressure.try_take(cost) {
                            uw.write_all(&p).await.map_err(|e| e.to_string())?
                        } else {
                            BrokerStats::add(&self.stats.publishes_held, 1);
                            let (backpressure, max_hold) =
                                (self.backpressure.clone(), self.max_hold);
                            held = Some(Held {
                                packet: p,
                                since: tokio::time::Instant::now(),
                                admitted: Box::pin(async move {
                                    let taken =
                                        tokio::time::timeout(max_hold, backpressure.take(cost))
                                            .await;
                                    if !matches!(taken, Ok(Ok(()))) {
                                        backpressure.force(cost);
                                    }
                                }),
                            });
                        }
                    }
                    Verdict::ForwardInstead(other) => {
                        uw.write_all(&other).await.map_err(|e| e.to_string())?
                    }
                    Verdict::Reply(reply) => {
                        cw.write_all(&reply).await.map_err(|e| e.to_string())?
                    }
                    Verdict::Drop => {}
                    Verdict::Close(reply) => {
                        if let Some(r) = reply {
                            let _ = cw.write_all(&r).await;
                        }
                        let _ = cw.shutdown().await;
                        return Ok(());
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = revoked.cancelled() => {
                    tracing::info!(%peer, identity = %session.identity, "session ended: its credential was removed or changed");
                    if session.level == 5 {
                        let _ = cw
                            .write_all(&packet::encode_disconnect(codes::V5_NOT_AUTHORIZED))
                            .await;
                    }
                    let _ = cw.shutdown().await;
                    return Ok(());
                }
                _ = taken_over.cancelled() => {
                    tracing::info!(%peer, identity = %session.identity, "session closed: a newer session of this client is on another broker replica");
                    let _ = uw
                        .write_all(&packet::encode_normal_disconnect(session.level))
                        .await;
                    let _ = uw.shutdown().await;
                    if session.level == 5 {
                        let _ = cw
                            .write_all(&packet::encode_disconnect(codes::V5_SESSION_TAKEN_OVER))
                            .await;
                    }
                    let _ = cw.shutdown().await;
                    return Ok(());
                }
                () = async {
                    match held.as_mut() {
                        Some(h) => h.admitted.as_mut().await,
                        None => std::future::pending().await,
                    }
                }, if held.is_some() => {
                    if let Some(h) = held.take() {
                        BrokerStats::add(
                            &self.stats.publish_hold_micros,
                            h.since.elapsed().as_micros() as u64,
                        );
                        uw.write_all(&h.packet).await.map_err(|e| e.to_string())?;
                    }
                }
                n = cr.read_buf(&mut cbuf), if held.is_none() => {
                    if n.map_err(|e| e.to_string())? == 0 {
                        return Ok(());
                    }
                }
                n = ur.read_buf(&mut ubuf) => {
                    if n.map_err(|e| e.to_string())? == 0 {
                        let _ = cw.shutdown().await;
                        return Ok(());
                    }
                    let out = self.upstream_packets(&mut ubuf, &mut session)?;
                    if !out.is_empty() {
                        cw.write_all(&out).await.map_err(|e| e.to_string())?;
                    }
                }
            }
        }
    }

    /// Connects to rumqttd's listener `inner` and logs the device in with
    /// its CONNECT (the gate's credential in place of the device's); returns
    /// once rumqttd's CONNACK is in `ubuf`.
    async fn log_in_upstream(
        &self,
        inner: SocketAddr,
        connect: &[u8],
        ubuf: &mut BytesMut,
    ) -> Result<TcpStream, UpstreamLogin> {
        let closed = |e: String| UpstreamLogin::Closed(e);
        let mut upstream = TcpStream::connect(inner)
            .await
            .map_err(|e| closed(e.to_string()))?;
        let _ = upstream.set_nodelay(true);
        let rewritten = packet::rewrite_connect_credentials(
            connect,
            &self.inner_user,
            self.inner_secret.as_bytes(),
        )
        .map_err(|e| UpstreamLogin::Other(format!("CONNECT: {e}")))?;
        upstream
            .write_all(&rewritten)
            .await
            .map_err(|e| closed(e.to_string()))?;
        match tokio::time::timeout(self.connect_timeout, read_whole_packet(&mut upstream, ubuf))
            .await
        {
            Ok(Ok(true)) => Ok(upstream),
            Ok(Ok(false)) => Err(closed("closed before its CONNACK".into())),
            Ok(Err(e)) => Err(UpstreamLogin::Other(e)),
            Err(_) => Err(UpstreamLogin::Other(format!(
                "no CONNACK within {:?}",
                self.connect_timeout
            ))),
        }
    }

    /// The whole packets in `ubuf` from rumqttd, to pass to the client: as
    /// they are, but for a SUBACK answering a SUBSCRIBE the gate trimmed.
    fn upstream_packets(
        &self,
        ubuf: &mut BytesMut,
        session: &mut Session,
    ) -> Result<Vec<u8>, String> {
        let mut out = Vec::with_capacity(ubuf.len());
        loop {
            let len = match packet::frame(ubuf, UPSTREAM_LIMIT) {
                Ok(Some(len)) => len,
                Ok(None) => return Ok(out),
                Err(e) => return Err(format!("from rumqttd: {e}")),
            };
            let p = ubuf.split_to(len);
            if !session.connack_seen && packet::kind(&p) == packet::CONNACK {
                session.connack_seen = true;
                if session.level == 5 {
                    if let Some(with_limit) =
                        packet::connack_with_max_packet_size(&p, self.max_packet_bytes)
                    {
                        out.extend_from_slice(&with_limit);
                        continue;
                    }
                }
            }
            match self.splice_suback(&p, session) {
                Some(rewritten) => out.extend_from_slice(&rewritten),
                None => out.extend_from_slice(&p),
            }
        }
    }

    async fn refuse_malformed<W: AsyncWrite + Unpin>(
        &self,
        cw: &mut W,
        session: &Session,
        peer: SocketAddr,
        e: &Malformed,
    ) {
        BrokerStats::add(&self.stats.malformed_packets, 1);
        if matches!(e, Malformed::TooLarge { .. }) {
            BrokerStats::add(&self.stats.packets_too_large, 1);
        }
        if let Some(suppressed) = self.refusals.admit(peer.ip()) {
            tracing::warn!(%peer, identity = %session.identity, error = %e, suppressed, "closing the connection");
        }
        if session.level == 5 {
            let reason = if matches!(e, Malformed::TooLarge { .. }) {
                codes::V5_PACKET_TOO_LARGE
            } else {
                codes::V5_PROTOCOL_ERROR
            };
            let _ = cw.write_all(&packet::encode_disconnect(reason)).await;
        }
        let _ = cw.shutdown().await;
    }

    /// The identity a CONNECT is granted, and the credential of the file
    /// that granted it (none for a client certificate or anonymous access).
    async fn authenticate(
        &self,
        connect: &packet::Connect,
        cert_id: Option<String>,
    ) -> Result<(Identity, Option<Credential>), Refusal> {
        let client_id = connect.client_id.as_str();
        if !valid_device_id(client_id) {
            return Err(Refusal {
                v4: codes::V4_IDENTIFIER_REJECTED,
                v5: codes::V5_CLIENT_ID_NOT_VALID,
                reason: "the client id is not a valid device id".into(),
            });
        }
        if let Some(cn) = cert_id {
            // A verified client certificate names the device.
            if cn != client_id {
                return Err(Refusal::not_authorized(format!(
                    "client id differs from the certificate's device id {cn:?}"
                )));
            }
            return Ok((
                Identity {
                    id: cn,
                    role: Role::Device,
                },
                None,
            ));
        }
        let Some(user) = &connect.username else {
            if self.allow_anonymous {
                return Ok((
                    Identity {
                        id: client_id.into(),
                        role: Role::Device,
                    },
                    None,
                ));
            }
            return Err(Refusal::not_authorized(
                "anonymous access is off (no user name)".into(),
            ));
        };
        let Some(credentials) = &self.credentials else {
            return Err(Refusal::bad_credentials(
                "no credentials file configured".into(),
            ));
        };
        let file = credentials.current();
        let Some(cred) = file.credentials.iter().find(|c| &c.id == user).cloned() else {
            return Err(Refusal::bad_credentials(format!(
                "unknown identity {:?}",
                shown(user)
            )));
        };
        if !cred.may_be(client_id) {
            return Err(Refusal {
                v4: codes::V4_IDENTIFIER_REJECTED,
                v5: codes::V5_CLIENT_ID_NOT_VALID,
                reason: format!("client id does not match the credential of {user:?}"),
            });
        }
        let role = cred.role;
        let password = connect.password.clone().unwrap_or_default();
        let checked = cred.clone();
        let hash_ok = tokio::task::spawn_blocking(move || checked.verify(&password))
            .await
            .unwrap_or(false);
        if !hash_ok {
            return Err(Refusal::bad_credentials(format!(
                "wrong password for {user:?}"
            )));
        }
        Ok((
            Identity {
                // Acting for a child (a gateway), the ACLs are the child's.
                id: client_id.into(),
                role,
            },
            Some(cred),
        ))
    }

    /// A SUBACK for a SUBSCRIBE the gate trimmed, with the refused filters'
    /// codes spliced back in; `None` for every other packet.
    fn splice_suback(&self, p: &[u8], session: &mut Session) -> Option<Vec<u8>> {
        if session.pending.is_empty() || packet::kind(p) != packet::SUBACK {
            return None;
        }
        let (pkid, granted) = packet::parse_suback(p, session.level).ok()?;
        let verdicts = session.pending.remove(&pkid)?;
        let mut granted = granted.into_iter();
        let codes: Vec<u8> = verdicts
            .iter()
            .map(|v| v.unwrap_or_else(|| granted.next().unwrap_or(0x80)))
            .collect();
        Some(packet::encode_suback(pkid, session.level, &codes))
    }

    fn check(&self, p: &[u8], session: &mut Session, peer: SocketAddr) -> Verdict {
        let level = session.level;
        let malformed = |e: Malformed| {
            BrokerStats::add(&self.stats.malformed_packets, 1);
            if let Some(suppressed) = self.refusals.admit(peer.ip()) {
                tracing::warn!(%peer, identity = %session.identity, error = %e, suppressed, "closing the connection");
            }
            Verdict::Close(
                (level == 5).then(|| packet::encode_disconnect(codes::V5_PROTOCOL_ERROR)),
            )
        };
        match packet::kind(p) {
            packet::PUBLISH => {
                let head = match packet::parse_publish(p, level) {
                    Ok(h) => h,
                    Err(e) => return malformed(e),
                };
                let topic = if head.topic.is_empty() {
                    match head.topic_alias.and_then(|a| session.aliases.get(&a)) {
                        Some(t) => t.clone(),
                        None => return malformed(Malformed::Field("topic alias (unknown)")),
                    }
                } else {
                    if let Some(a) = head.topic_alias {
                        session.aliases.insert(a, head.topic.to_string());
                    }
                    head.topic.to_string()
                };
                if session.identity.can_publish(&topic) {
                    if Backpressure::counts(topic.as_bytes()) {
                        BrokerStats::add(&self.stats.publishes_telemetry, 1);
                        return Verdict::Telemetry(
                            self.backpressure.cost(topic.len(), head.payload_len),
                        );
                    }
                    let counter = if topic.starts_with("status/") {
                        &self.stats.publishes_status
                    } else {
                        &self.stats.publishes_other
                    };
                    BrokerStats::add(counter, 1);
                    return Verdict::Forward;
                }
                BrokerStats::add(&self.stats.acl_refused_publishes, 1);
                if let Some(suppressed) = self.refusals.admit(peer.ip()) {
                    tracing::warn!(%peer, identity = %session.identity, topic = %shown(&topic), suppressed, "publish refused by ACL");
                }
                if level == 5 {
                    if head.qos == 0 {
                        Verdict::Drop
                    } else {
                        Verdict::Reply(packet::encode_refused_ack(
                            head.qos,
                            head.pkid,
                            codes::V5_NOT_AUTHORIZED,
                        ))
                    }
                } else {
                    // MQTT 3.1.1 has no way to refuse a publish: disconnect.
                    Verdict::Close(None)
                }
            }
            packet::SUBSCRIBE => {
                let sub = match packet::parse_subscribe(p, level) {
                    Ok(s) => s,
                    Err(e) => return malformed(e),
                };
                let refusal = if level == 5 {
                    codes::V5_NOT_AUTHORIZED
                } else {
                    codes::V4_SUBACK_FAILURE
                };
                let verdicts: Vec<Option<u8>> = sub
                    .filters
                    .iter()
                    .map(|(f, _)| (!session.identity.can_subscribe(f)).then_some(refusal))
                    .collect();
                let refused = verdicts.iter().filter(|v| v.is_some()).count();
                if refused == 0 {
                    return Verdict::Forward;
                }
                BrokerStats::add(&self.stats.acl_refused_subscriptions, refused as u64);
                for ((f, _), v) in sub.filters.iter().zip(&verdicts) {
                    if v.is_some() {
                        if let Some(suppressed) = self.refusals.admit(peer.ip()) {
                            tracing::warn!(%peer, identity = %session.identity, filter = %shown(f), suppressed, "subscription refused by ACL");
                        }
                    }
                }
                if refused == sub.filters.len() {
                    let codes = vec![refusal; sub.filters.len()];
                    return Verdict::Reply(packet::encode_suback(sub.pkid, level, &codes));
                }
                // Forward the allowed filters; rumqttd's SUBACK gets the
                // refusal codes spliced back in at their places.
                let allowed: Vec<(&str, u8)> = sub
                    .filters
                    .iter()
                    .zip(&verdicts)
                    .filter(|(_, v)| v.is_none())
                    .map(|(f, _)| *f)
                    .collect();
                session.pending.insert(sub.pkid, verdicts);
                Verdict::ForwardInstead(packet::encode_subscribe(&sub, &allowed))
            }
            packet::CONNECT => malformed(Malformed::Field("second CONNECT")),
            _ => Verdict::Forward,
        }
    }
}

/// Every `interval` until `shutdown`: re-reads the credentials file if it
/// changed and ends the sessions whose credential it no longer holds as
/// they logged in with it ([`sessions`]).
pub async fn watch_credentials(gate: Arc<Gate>, interval: Duration, shutdown: CancellationToken) {
    let Some(credentials) = gate.credentials.clone() else {
        return;
    };
    let mut last = credentials.current();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let file = credentials.current();
        if Arc::ptr_eq(&file, &last) {
            continue;
        }
        last = file;
        let ended = gate.sessions.revoke_changed(&last);
        BrokerStats::add(&gate.stats.sessions_revoked, ended as u64);
        if ended > 0 {
            tracing::warn!(
                sessions = ended,
                "credentials reloaded: ended the sessions of removed or changed credentials"
            );
        }
    }
}

/// Why the gate could not log a device in to rumqttd.
enum UpstreamLogin {
    /// rumqttd closed (or refused) the connection before its CONNACK: worth
    /// one more try.
    Closed(String),
    /// Anything else (no CONNACK in time, a CONNECT that cannot be
    /// rewritten, an answer that does not frame).
    Other(String),
}

impl std::fmt::Display for UpstreamLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamLogin::Closed(e) | UpstreamLogin::Other(e) => f.write_str(e),
        }
    }
}

/// Packets from rumqttd can be large (model updates): a generous limit that
/// only guards the framing.
const UPSTREAM_LIMIT: usize = 256 << 20;

enum Verdict {
    Forward,
    /// Forward once the bridge is close enough behind; the cost in the
    /// [`Backpressure`] budget.
    Telemetry(u32),
    ForwardInstead(Vec<u8>),
    Reply(Vec<u8>),
    Drop,
    Close(Option<Vec<u8>>),
}

/// After refusing a packet too large: reads and drops what the client is
/// still sending of it (at most `limit` bytes more, for at most a second)
/// before the connection closes. Closing a socket with unread bytes makes
/// the kernel reset it, and a reset discards, at the client, the DISCONNECT
/// 0x95 that says why.
async fn linger<R: AsyncRead + Unpin>(client: &mut R, limit: usize) {
    let drain = async {
        let mut buf = vec![0u8; 16 << 10];
        let mut drained = 0;
        while drained < limit {
            match client.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => drained += n,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}

/// Answers a CONNECT with a refusal: `v4` for MQTT 3.1.1, `v5` for 5.
async fn refuse<S: AsyncWrite + Unpin>(client: &mut S, level: u8, v4: u8, v5: u8) {
    let _ = client
        .write_all(&packet::encode_connack_refused(level, v4, v5))
        .await;
}

/// Reads from rumqttd until `buf` holds a whole packet (true), or rumqttd
/// closed first (false).
async fn read_whole_packet(s: &mut TcpStream, buf: &mut BytesMut) -> Result<bool, String> {
    loop {
        if packet::frame(buf, UPSTREAM_LIMIT)
            .map_err(|e| format!("from rumqttd: {e}"))?
            .is_some()
        {
            return Ok(true);
        }
        if s.read_buf(buf).await.map_err(|e| e.to_string())? == 0 {
            return Ok(false);
        }
    }
}

/// Reads one whole CONNECT; `Ok(None)` if the peer closed first.
async fn read_packet<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut BytesMut,
    limit: usize,
) -> Result<Option<BytesMut>, Malformed> {
    loop {
        if buf.first().is_some_and(|b| b >> 4 != packet::CONNECT) {
            return Err(Malformed::Field("first packet (not a CONNECT)"));
        }
        if let Some(len) = packet::frame(buf, limit)? {
            return Ok(Some(buf.split_to(len)));
        }
        match s.read_buf(buf).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(_) => {}
        }
    }
}
