//! The gate and rumqttd behind it, started in-process without the bridge
//! (so without Kafka), against raw MQTT clients on loopback.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::credentials::CredentialsFile;
use super::packet::{self, codes};
use super::Gate;
use crate::backpressure::Backpressure;
use crate::stats::BrokerStats;
use crate::{BrokerConfig, Inner};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

struct Running {
    addr: SocketAddr,
    gate: Arc<Gate>,
    replica: Arc<crate::replicas::Replica>,
    stats: Arc<BrokerStats>,
    inner: Inner,
    credentials: PathBuf,
    stop: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Drop for Running {
    fn drop(&mut self) {
        // rumqttd's thread cannot be stopped; the gate and its tasks can.
        self.stop.cancel();
    }
}

/// rumqttd (two listeners per protocol level) and the gate, with a
/// credentials file holding `devices`; their passwords.
/// Each may also connect as `{id}-*` (a gateway's children).
async fn start(
    devices: &[&str],
    tweak: impl FnOnce(&mut BrokerConfig),
) -> Result<(Running, Vec<String>)> {
    let dir = tempfile::tempdir()?;
    let credentials = dir.path().join("credentials.toml");
    let mut passwords = Vec::new();
    for id in devices {
        let children = [format!("{id}-*")];
        let added = CredentialsFile::add(
            &credentials,
            &[id.to_string()],
            super::Role::Device,
            &children,
        )?;
        passwords.extend(added.into_iter().map(|(_, p)| p));
    }
    let mut config = BrokerConfig::default();
    config.mqtt.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.mqtt.listener_threads = Some(2);
    config.auth.credentials_file = Some(credentials.clone());
    config.auth.reload_interval = Duration::from_millis(100);
    tweak(&mut config);
    let inner = Inner::new(2)?;
    let broker = rumqttd::Broker::new(crate::rumqttd_config(&config.mqtt, &inner));
    let stats = Arc::new(BrokerStats::default());
    let stop = CancellationToken::new();
    crate::start_rumqttd(broker, &inner, &config.mqtt, &stats, &stop).await?;
    let backpressure = Arc::new(Backpressure::new(0));
    // A replica that writes no session records (no Kafka here); a test
    // feeds it the records instead.
    let replica = Arc::new(crate::replicas::Replica::new(
        "test".into(),
        None,
        stats.clone(),
    ));
    let (gate, addr) = crate::open_gate(
        &config,
        &inner,
        Some(replica.clone()),
        backpressure,
        &stats,
        &stop,
        &stop,
    )
    .await?;
    Ok((
        Running {
            addr,
            gate,
            replica,
            stats,
            inner,
            credentials,
            stop,
            _dir: dir,
        },
        passwords,
    ))
}

/// Reads one whole packet; `None` if the connection closed first.
async fn read_packet(s: &mut TcpStream, buf: &mut Vec<u8>) -> Result<Option<Vec<u8>>> {
    loop {
        if let Some(len) = packet::frame(buf, 1 << 24).map_err(|e| e.to_string())? {
            return Ok(Some(buf.drain(..len).collect()));
        }
        match s.read_buf(buf).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(_) => {}
        }
    }
}

/// Connects and logs in; the socket, the CONNACK (None: closed without one)
/// and anything read after it.
async fn connect(
    addr: SocketAddr,
    level: u8,
    client_id: &str,
    user: &str,
    password: &[u8],
) -> Result<(TcpStream, Option<Vec<u8>>, Vec<u8>)> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(&packet::encode_connect(
        level,
        client_id,
        Some(user),
        Some(password),
    ))
    .await?;
    let mut buf = Vec::new();
    let connack = tokio::time::timeout(Duration::from_secs(30), read_packet(&mut s, &mut buf))
        .await
        .map_err(|_| "no CONNACK in 30 s")??;
    Ok((s, connack, buf))
}

/// Whether the broker closes `s` (None) or sends a packet first (Some).
async fn next_packet_or_close(s: &mut TcpStream, buf: &mut Vec<u8>) -> Result<Option<Vec<u8>>> {
    tokio::time::timeout(Duration::from_secs(30), read_packet(s, buf))
        .await
        .map_err(|_| "neither a packet nor a close in 30 s".into())
        .and_then(|r| r)
}

/// Three devices logging in at once with one credential, over and over
/// (two auto-reconnecting clones of a device do this by accident): each
/// takeover of the client id must leave every rumqttd listener able to log
/// devices in. (rumqttd 0.20 panicked in the takeover while holding a lock
/// of its listener, which poisoned it: afterwards every device the gate
/// sent to that listener got CONNACK "server unavailable".)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simultaneous_logins_with_one_credential_leave_every_listener_logging_devices_in(
) -> Result<()> {
    let (b, passwords) = start(&["dev-1"], |_| {}).await?;
    let pass = passwords[0].as_bytes().to_vec();
    let mut open = Vec::new();
    for _ in 0..100 {
        let logins: Vec<_> = (0..3)
            .map(|_| {
                let pass = pass.clone();
                tokio::spawn(async move { connect(b.addr, 4, "dev-1", "dev-1", &pass).await })
            })
            .collect();
        let mut round = Vec::new();
        for login in logins {
            if let Ok(Ok((s, _, _))) = login.await {
                round.push(s);
            }
        }
        // The previous round's connections stay open until this one has
        // logged in, so takeovers meet live sessions as well as new ones.
        open = round;
    }
    drop(open);
    // Every listener of both protocol levels (the gate takes them in turn)
    // still logs a device in. (Under client ids of their own: rumqttd has
    // a race of its own when one client id reconnects at once, below.)
    for (i, level) in [4, 5, 4, 5, 4, 5, 4, 5].into_iter().enumerate() {
        let child = format!("dev-1-{i}");
        let (_s, connack, _) = connect(b.addr, level, &child, "dev-1", &pass).await?;
        let code = connack.as_deref().and_then(packet::connack_code);
        assert_eq!(code, Some(0), "MQTT level {level}: CONNACK {connack:?}");
    }
    crate::ops::probe_listeners(
        &b.inner.listeners(),
        &b.inner.user,
        &b.inner.secret,
        Duration::from_secs(10),
        &b.stats,
    )
    .await;
    assert_eq!(b.stats.listeners_down(), Vec::<String>::new());
    Ok(())
}

/// Removing a device's credential, or giving it a new password, ends its
/// open session at the next reload; a device whose credential is unchanged
/// carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloading_credentials_ends_the_sessions_of_removed_and_changed_credentials() -> Result<()>
{
    let (b, passwords) = start(&["dev-1", "dev-2", "dev-3"], |_| {}).await?;
    let mut sessions = Vec::new();
    for (i, (id, level)) in [("dev-1", 4), ("dev-2", 5), ("dev-3", 4)]
        .into_iter()
        .enumerate()
    {
        let (s, connack, buf) = connect(b.addr, level, id, id, passwords[i].as_bytes()).await?;
        assert_eq!(
            connack.as_deref().and_then(packet::connack_code),
            Some(0),
            "{id}"
        );
        sessions.push((s, buf));
    }
    // dev-1 removed, dev-2 given a new password, dev-3 untouched.
    let mut file = CredentialsFile::read(&b.credentials)?;
    file.credentials.retain(|c| c.id != "dev-1");
    let (_, new_hash) = super::credentials::new_password()?;
    for c in &mut file.credentials {
        if c.id == "dev-2" {
            c.hash = new_hash.clone();
        }
    }
    file.write(&b.credentials)?;

    let (s1, buf1) = &mut sessions[0];
    assert_eq!(
        next_packet_or_close(s1, buf1).await?,
        None,
        "dev-1 (3.1.1) closed"
    );
    let (s2, buf2) = &mut sessions[1];
    assert_eq!(
        next_packet_or_close(s2, buf2).await?,
        Some(packet::encode_disconnect(codes::V5_NOT_AUTHORIZED)),
        "dev-2 (5) told why"
    );
    assert_eq!(next_packet_or_close(s2, buf2).await?, None, "then closed");
    // dev-3 still answers: PINGREQ, PINGRESP.
    let (s3, buf3) = &mut sessions[2];
    s3.write_all(&[0xc0, 0]).await?;
    assert_eq!(next_packet_or_close(s3, buf3).await?, Some(vec![0xd0, 0]));
    assert_eq!(BrokerStats::get(&b.stats.sessions_revoked), 2);
    // The ended sessions' entries go when their relays finish.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while b.gate.sessions.len() != 1 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(b.gate.sessions.len(), 1);
    // The removed device cannot come back; the changed one only with its
    // new password.
    let (_, connack, _) = connect(b.addr, 4, "dev-1", "dev-1", passwords[0].as_bytes()).await?;
    assert_eq!(
        connack.as_deref().and_then(packet::connack_code),
        Some(codes::V4_BAD_CREDENTIALS)
    );
    Ok(())
}

/// MQTT's variable-length integer.
fn varint(mut n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return out;
        }
    }
}

/// A QoS 1 PUBLISH to `status/dev-1` whose whole packet (MQTT 5, no
/// properties) is `total` bytes.
fn status_publish(total: usize, pkid: u16) -> Vec<u8> {
    let topic = b"status/dev-1";
    let remaining = (1..=4)
        .map(|n| total - 1 - n)
        .find(|r| varint(*r).len() == total - 1 - r)
        .unwrap_or(0);
    let mut p = vec![0x32];
    p.extend(varint(remaining));
    p.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    p.extend_from_slice(topic);
    p.extend_from_slice(&pkid.to_be_bytes());
    p.push(0);
    p.resize(total, 0x5a);
    assert_eq!(packet::frame(&p, usize::MAX), Ok(Some(total)));
    p
}

/// One size limit, in the gate: a packet of exactly `mqtt.max_payload_bytes`
/// goes through and is acknowledged; one byte more, or the old limit of
/// 64 KiB more (which the gate let through and rumqttd then dropped,
/// uncounted), is refused by the gate with DISCONNECT 0x95 and counted; and
/// the CONNACK tells an MQTT 5 client the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_packet_of_the_size_limit_passes_and_a_larger_one_is_refused_and_counted_by_the_gate(
) -> Result<()> {
    const LIMIT: usize = 4096;
    let (b, passwords) = start(&["dev-1"], |c| c.mqtt.max_payload_bytes = LIMIT).await?;
    let pass = passwords[0].as_bytes();
    let (mut s, connack, mut buf) = connect(b.addr, 5, "dev-1", "dev-1", pass).await?;
    let connack = connack.ok_or("no CONNACK")?;
    assert_eq!(packet::connack_code(&connack), Some(0));
    assert!(
        connack.windows(5).any(|w| w == [0x27, 0, 0, 0x10, 0]),
        "the CONNACK says Maximum Packet Size 4096: {connack:?}"
    );
    s.write_all(&status_publish(LIMIT, 1)).await?;
    assert_eq!(
        next_packet_or_close(&mut s, &mut buf)
            .await?
            .map(|p| p[0] >> 4),
        Some(packet::PUBACK),
        "a packet of exactly the limit is acknowledged"
    );
    for (i, total) in [LIMIT + 1, LIMIT + (64 << 10)].into_iter().enumerate() {
        if i > 0 {
            (s, _, buf) = connect(b.addr, 5, "dev-1", "dev-1", pass).await?;
        }
        // The gate may close before all of it is written.
        let _ = s.write_all(&status_publish(total, 2)).await;
        assert_eq!(
            next_packet_or_close(&mut s, &mut buf).await?,
            Some(packet::encode_disconnect(codes::V5_PACKET_TOO_LARGE)),
            "{total} bytes"
        );
        assert_eq!(BrokerStats::get(&b.stats.packets_too_large), i as u64 + 1);
    }
    Ok(())
}

/// A tracing writer into a shared buffer.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// 50 CONNECTs refused from one address, each with a 64 KiB client id,
/// user name and password: each is counted, but only a burst of them is
/// logged, each line short, and never the password.
#[tokio::test(flavor = "current_thread")]
async fn refusals_are_logged_short_and_a_burst_per_source_at_a_time() -> Result<()> {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _default = tracing::subscriber::set_default(subscriber);
    let (b, _) = start(&["dev-1"], |_| {}).await?;
    let began = std::time::Instant::now();
    let long = |c: char| c.to_string().repeat(65_000);
    let (id, user, password) = (long('i'), long('u'), long('p'));
    for _ in 0..50 {
        let (_, connack, _) = connect(b.addr, 4, &id, &user, password.as_bytes()).await?;
        assert_eq!(
            connack.as_deref().and_then(packet::connack_code),
            Some(codes::V4_IDENTIFIER_REJECTED)
        );
    }
    // And unknown identities with a valid client id.
    for _ in 0..50 {
        let (_, connack, _) = connect(b.addr, 5, "dev-1", &user, password.as_bytes()).await?;
        assert_eq!(
            connack.as_deref().and_then(packet::connack_code),
            Some(codes::V5_BAD_CREDENTIALS)
        );
    }
    let elapsed = began.elapsed();
    assert_eq!(BrokerStats::get(&b.stats.auth_failures), 100);
    let text = String::from_utf8(captured.0.lock().unwrap_or_else(|p| p.into_inner()).clone())?;
    let refusals: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("connection refused"))
        .collect();
    // A burst, and one more per refill period that passed (however slow
    // this machine is).
    let allowed = super::refusals::BURST as usize
        + (elapsed.as_secs_f64() / super::refusals::REFILL.as_secs_f64()).ceil() as usize;
    assert!(
        !refusals.is_empty() && refusals.len() <= allowed,
        "{} refusal lines logged (at most {allowed})",
        refusals.len()
    );
    for line in text.lines() {
        assert!(line.len() < 1024, "a {}-byte log line", line.len());
        assert!(!line.contains("pppppppp"), "the password was logged");
    }
    Ok(())
}

/// A device whose clones just logged in three at once, and dropped, logs in
/// again at once under the same client id, and is let in every time: the
/// gate logs in once more when rumqttd closes a log-in without a CONNACK in
/// the middle of a takeover (without that, about one in a few hundred got
/// "server unavailable").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_reconnecting_at_once_is_logged_in_every_time() -> Result<()> {
    let (b, passwords) = start(&["dev-1"], |_| {}).await?;
    let pass = passwords[0].as_bytes().to_vec();
    let mut refused = Vec::new();
    for i in 0..200 {
        let level = if i % 2 == 0 { 4 } else { 5 };
        let clones: Vec<_> = (0..3)
            .map(|_| {
                let pass = pass.clone();
                tokio::spawn(async move { connect(b.addr, 4, "dev-1", "dev-1", &pass).await })
            })
            .collect();
        for c in clones {
            drop(c.await);
        }
        let (s, connack, _) = connect(b.addr, level, "dev-1", "dev-1", &pass).await?;
        let code = connack.as_deref().and_then(packet::connack_code);
        if code != Some(0) {
            refused.push((i, code));
        }
        drop(s);
    }
    assert_eq!(
        refused,
        Vec::new(),
        "logins refused (attempt, CONNACK code)"
    );
    Ok(())
}

/// Set in the copy of this test binary that [`alone`] starts.
const ALONE: &str = "EDGELOOP_BROKER_TEST_ALONE";

/// Whether this process runs `test` alone. If not, runs this test binary
/// again with `test` only (and [`ALONE`] set) and returns `false` if it
/// passed, or prints its output and returns an error if not. For a test that must own
/// the process: a global tracing subscriber sees the events of every
/// thread, rumqttd's own threads included, so other tests running beside
/// it would log into it too.
fn alone(test: &str) -> Result<bool> {
    if std::env::var_os(ALONE).is_some() {
        return Ok(true);
    }
    let name = format!("gate::tests::{test}");
    let out = std::process::Command::new(std::env::current_exe()?)
        .args([name.as_str(), "--exact", "--nocapture", "--test-threads=1"])
        .env(ALONE, "1")
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !stdout.contains("1 passed") {
        eprintln!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        return Err(format!(
            "{name}, run alone, failed ({}): its output is above",
            out.status
        )
        .into());
    }
    Ok(false)
}

/// One tracing event as [`Events`] recorded it.
#[derive(Debug, Clone)]
struct Event {
    level: tracing::Level,
    target: String,
    /// The message and the other fields, `name=value` each.
    text: String,
}

/// A tracing layer that records every event.
#[derive(Clone, Default)]
struct Events(Arc<std::sync::Mutex<Vec<Event>>>);

impl Events {
    fn all(&self) -> Vec<Event> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Events above TRACE, a line each, for a failure message.
fn lines(events: &[Event]) -> String {
    events
        .iter()
        .filter(|e| e.level < tracing::Level::TRACE)
        .map(|e| format!("{} {}: {}\n", e.level, e.target, e.text))
        .collect()
}

struct Fields(String);

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        use std::fmt::Write;
        if !self.0.is_empty() {
            self.0.push(' ');
        }
        let _ = match field.name() {
            "message" => write!(self.0, "{value:?}"),
            name => write!(self.0, "{name}={value:?}"),
        };
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Events {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let mut fields = Fields(String::new());
        event.record(&mut fields);
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Event {
                level: *event.metadata().level(),
                target: event.metadata().target().to_string(),
                text: fields.0,
            });
    }
}

/// Logs in as `id` over MQTT 3.1.1 with rumqttc and disconnects cleanly
/// (DISCONNECT, then the socket closes).
async fn connect_and_disconnect_v4(addr: SocketAddr, id: &str, password: &str) -> Result<()> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet};
    let mut options = MqttOptions::new(id, "127.0.0.1", addr.port());
    options.set_credentials(id, password);
    let (client, mut eventloop) = AsyncClient::new(options, 10);
    while !matches!(eventloop.poll().await?, Event::Incoming(Packet::ConnAck(_))) {}
    client.disconnect().await?;
    while !matches!(
        eventloop.poll().await?,
        Event::Outgoing(Outgoing::Disconnect)
    ) {}
    Ok(())
}

/// The same over MQTT 5.
async fn connect_and_disconnect_v5(addr: SocketAddr, id: &str, password: &str) -> Result<()> {
    use rumqttc::v5::{mqttbytes::v5::Packet, AsyncClient, Event, MqttOptions};
    use rumqttc::Outgoing;
    let mut options = MqttOptions::new(id, "127.0.0.1", addr.port());
    options.set_credentials(id, password);
    let (client, mut eventloop) = AsyncClient::new(options, 10);
    while !matches!(eventloop.poll().await?, Event::Incoming(Packet::ConnAck(_))) {}
    client.disconnect().await?;
    while !matches!(
        eventloop.poll().await?,
        Event::Outgoing(Outgoing::Disconnect)
    ) {}
    Ok(())
}

/// What happens to every broker all day is not an error: a TCP probe of
/// the port (a load balancer's or Kubernetes' `tcpSocket` check: a
/// connection closed without a CONNECT; the broker itself probes its
/// rumqttd listeners so at start), the broker's CONNECT check of each
/// rumqttd listener, and devices that log in and disconnect cleanly (MQTT
/// 3.1.1 and 5). None of it may log at ERROR, from the gate or from
/// rumqttd. The test owns its process ([`alone`]), so its subscriber is
/// global and hears rumqttd's threads too. (rumqttd 0.20 logged each clean
/// disconnect as "router-drop" or "no-connection id … is already gone",
/// and each probe as "Error while handling MQTT connect packet", all at
/// ERROR.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_probes_and_clean_disconnects_log_no_error() -> Result<()> {
    if !alone("port_probes_and_clean_disconnects_log_no_error")? {
        return Ok(());
    }
    use tracing_subscriber::layer::SubscriberExt;
    let events = Events::default();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(events.clone()))?;
    // The listener check runs once, at start: every connection to rumqttd
    // is then one this test knows of.
    let (b, passwords) = start(&["dev-1"], |c| {
        c.mqtt.listener_check_interval = Duration::from_secs(3600);
    })
    .await?;
    let listeners = b.inner.v4.len() + b.inner.v5.len();

    drop(TcpStream::connect(b.addr).await?);
    connect_and_disconnect_v4(b.addr, "dev-1", &passwords[0]).await?;
    connect_and_disconnect_v5(b.addr, "dev-1", &passwords[0]).await?;

    // The gate is done with every connection (it took the probe before the
    // devices' connections)...
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while BrokerStats::get(&b.stats.connections_open) > 0 {
        if tokio::time::Instant::now() > deadline {
            return Err("the gate did not close its connections in 30 s".into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // ... and so is rumqttd: each listener's TCP probe
    // (`wait_listening`) has ended, and each logged-in connection (a
    // listener check per listener, and the two devices') has been
    // disconnected by the router. What rumqttd logs after that for a
    // connection (its link ending on the router's drop, the router taking
    // the link's second disconnect, or the link seeing its socket close)
    // depends on which side saw the end first, so the test then waits for
    // rumqttd to log nothing new for a while before it looks.
    let rumqttd = |e: &Event, what: &str| e.target.starts_with("rumqttd") && e.text.contains(what);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut settled = (0usize, tokio::time::Instant::now());
    loop {
        let all = events.all();
        let count = |what: &str| all.iter().filter(|e| rumqttd(e, what)).count();
        let probes = count("connect packet");
        let disconnected = count("Disconnecting connection");
        let now = tokio::time::Instant::now();
        if all.len() != settled.0 {
            settled = (all.len(), now);
        }
        if probes >= listeners
            && disconnected >= listeners + 2
            && now - settled.1 >= Duration::from_millis(500)
        {
            break;
        }
        if now > deadline {
            return Err(format!(
                "rumqttd did not finish with its connections in 30 s \
                 ({probes} probes, {disconnected} disconnected):\n{}",
                lines(&all)
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let errors: Vec<Event> = events
        .all()
        .into_iter()
        .filter(|e| e.level == tracing::Level::ERROR)
        .collect();
    assert!(errors.is_empty(), "logged at ERROR:\n{}", lines(&errors));
    Ok(())
}

/// A newer session of the client on another replica (a record of
/// `edgeloop.sessions` read after this session's own) closes the session
/// here: an MQTT 5 client gets DISCONNECT 0x8E, an MQTT 3.1.1 one is
/// closed; a record read before its own leaves it be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_session_on_another_replica_closes_this_one_with_disconnect_session_taken_over(
) -> Result<()> {
    use crate::replicas::{Outcome, SessionRecord};
    let (b, passwords) = start(&["dev-1", "dev-2"], |_| {}).await?;
    let elsewhere = |session: &str| SessionRecord {
        replica: "other".into(),
        session: session.into(),
        connected_at_micros: 0,
    };
    for (level, device, password) in [(5, "dev-1", &passwords[0]), (4, "dev-2", &passwords[1])] {
        let (mut s, connack, mut buf) =
            connect(b.addr, level, device, device, password.as_bytes()).await?;
        assert_eq!(connack.as_deref().and_then(packet::connack_code), Some(0));
        let own = SessionRecord {
            replica: "test".into(),
            session: b.replica.session_of(device).ok_or("no session claimed")?,
            connected_at_micros: 0,
        };
        // Older than this one: it stays.
        assert_eq!(
            b.replica.on_record(device, &elsewhere("x-1")),
            Outcome::Kept
        );
        assert_eq!(b.replica.on_record(device, &own), Outcome::Own);
        assert!(b.replica.is_connected(device));
        // Newer: this one is closed.
        assert_eq!(
            b.replica.on_record(device, &elsewhere("x-2")),
            Outcome::TakenOver
        );
        let next = next_packet_or_close(&mut s, &mut buf).await?;
        if level == 5 {
            assert_eq!(
                next,
                Some(packet::encode_disconnect(codes::V5_SESSION_TAKEN_OVER)),
                "MQTT 5: DISCONNECT 0x8E"
            );
            assert_eq!(next_packet_or_close(&mut s, &mut buf).await?, None);
        } else {
            assert_eq!(next, None, "MQTT 3.1.1: closed");
        }
    }
    assert_eq!(BrokerStats::get(&b.stats.sessions_taken_over), 2);
    // The claims went with their connections.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while b.replica.session_of("dev-1").is_some() || b.replica.session_of("dev-2").is_some() {
        if tokio::time::Instant::now() > deadline {
            return Err("the closed sessions are still claimed after 30 s".into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}
