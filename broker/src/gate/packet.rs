//! Just enough of MQTT 3.1.1 and 5 to enforce identity and topic ACLs:
//! framing, the fields of CONNECT, PUBLISH and SUBSCRIBE the gate checks,
//! and the few packets it writes itself (CONNACK, PUBACK, SUBACK,
//! DISCONNECT). Everything else passes through as bytes.
//!
//! Every parser works on untrusted bytes and returns an error instead of
//! panicking: lengths are checked before every slice.

use std::fmt;

/// Packet types (the high nibble of the first byte).
pub const CONNECT: u8 = 1;
pub const CONNACK: u8 = 2;
pub const PUBLISH: u8 = 3;
pub const PUBACK: u8 = 4;
pub const PUBREC: u8 = 5;
pub const SUBSCRIBE: u8 = 8;
pub const SUBACK: u8 = 9;
pub const DISCONNECT: u8 = 14;

/// A protocol error: the connection is closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Malformed {
    /// The remaining length does not fit in 4 bytes.
    BadLength,
    /// The packet is larger than the configured limit.
    TooLarge { size: usize, limit: usize },
    /// A field runs past the end of the packet or is invalid.
    Field(&'static str),
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Malformed::BadLength => write!(f, "malformed remaining length"),
            Malformed::TooLarge { size, limit } => {
                write!(f, "packet of {size} bytes exceeds the limit of {limit}")
            }
            Malformed::Field(what) => write!(f, "malformed {what}"),
        }
    }
}

/// One whole packet at the start of `buf`: `Ok(Some(len))` with its total
/// length, `Ok(None)` if more bytes are needed.
pub fn frame(buf: &[u8], limit: usize) -> Result<Option<usize>, Malformed> {
    let mut len: usize = 0;
    let mut shift = 0;
    for i in 1..5 {
        let Some(&b) = buf.get(i) else {
            return Ok(None);
        };
        len |= usize::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            let total = 1 + i + len;
            if total > limit {
                return Err(Malformed::TooLarge { size: total, limit });
            }
            return Ok((buf.len() >= total).then_some(total));
        }
        shift += 7;
    }
    Err(Malformed::BadLength)
}

/// The packet type of a framed packet.
pub fn kind(packet: &[u8]) -> u8 {
    packet.first().map_or(0, |b| b >> 4)
}

/// Reads fields off a packet body.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], Malformed> {
        let end = self.pos.checked_add(n).ok_or(Malformed::Field(what))?;
        let out = self.buf.get(self.pos..end).ok_or(Malformed::Field(what))?;
        self.pos = end;
        Ok(out)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, Malformed> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, Malformed> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn binary(&mut self, what: &'static str) -> Result<&'a [u8], Malformed> {
        let n = self.u16(what)?;
        self.take(usize::from(n), what)
    }

    fn string(&mut self, what: &'static str) -> Result<&'a str, Malformed> {
        std::str::from_utf8(self.binary(what)?).map_err(|_| Malformed::Field(what))
    }

    fn varint(&mut self, what: &'static str) -> Result<usize, Malformed> {
        let mut value = 0usize;
        for i in 0..4 {
            let b = self.u8(what)?;
            value |= usize::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(Malformed::Field(what))
    }

    /// MQTT 5 properties: their raw bytes.
    fn properties(&mut self) -> Result<&'a [u8], Malformed> {
        let n = self.varint("properties length")?;
        self.take(n, "properties")
    }

    fn done(&self) -> bool {
        self.pos >= self.buf.len()
    }
}

/// The body of a framed packet (after the fixed header).
fn body(packet: &[u8]) -> Result<&[u8], Malformed> {
    let mut i = 1;
    while packet.get(i).is_some_and(|b| b & 0x80 != 0) {
        i += 1;
    }
    packet.get(i + 1..).ok_or(Malformed::BadLength)
}

/// The fields of a CONNECT the gate needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// 4 for MQTT 3.1.1, 5 for MQTT 5 (3.1's level 3 is refused).
    pub level: u8,
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<Vec<u8>>,
    pub will_topic: Option<String>,
}

pub fn parse_connect(packet: &[u8]) -> Result<Connect, Malformed> {
    if kind(packet) != CONNECT {
        return Err(Malformed::Field("first packet (not a CONNECT)"));
    }
    let mut r = Reader::new(body(packet)?);
    let name = r.string("protocol name")?;
    let level = r.u8("protocol level")?;
    if !matches!((name, level), ("MQTT", 4) | ("MQTT", 5)) {
        return Err(Malformed::Field("protocol name or level"));
    }
    let flags = r.u8("connect flags")?;
    if flags & 1 != 0 {
        return Err(Malformed::Field("connect flags (reserved bit set)"));
    }
    r.u16("keep alive")?;
    if level == 5 {
        r.properties()?;
    }
    let client_id = r.string("client id")?.to_string();
    let mut will_topic = None;
    if flags & 0x04 != 0 {
        if level == 5 {
            r.properties()?;
        }
        will_topic = Some(r.string("will topic")?.to_string());
        r.binary("will payload")?;
    }
    let username = if flags & 0x80 != 0 {
        Some(r.string("user name")?.to_string())
    } else {
        None
    };
    let password = if flags & 0x40 != 0 {
        Some(r.binary("password")?.to_vec())
    } else {
        None
    };
    if !r.done() {
        return Err(Malformed::Field("CONNECT (trailing bytes)"));
    }
    Ok(Connect {
        level,
        client_id,
        username,
        password,
        will_topic,
    })
}

/// The same CONNECT with its user name and password replaced (the gate
/// presents its own credential to rumqttd behind it).
pub fn rewrite_connect_credentials(
    packet: &[u8],
    username: &str,
    password: &[u8],
) -> Result<Vec<u8>, Malformed> {
    let mut r = Reader::new(body(packet)?);
    let name = r.string("protocol name")?;
    let level = r.u8("protocol level")?;
    let flags = r.u8("connect flags")?;
    let keep_alive = r.u16("keep alive")?;
    let props = if level == 5 {
        Some(r.properties()?)
    } else {
        None
    };
    let client_id = r.binary("client id")?;
    let mut will = None;
    if flags & 0x04 != 0 {
        let will_props = if level == 5 {
            Some(r.properties()?)
        } else {
            None
        };
        let topic = r.binary("will topic")?;
        let payload = r.binary("will payload")?;
        will = Some((will_props, topic, payload));
    }
    let mut out = Vec::with_capacity(packet.len() + username.len() + password.len());
    put_binary(&mut out, name.as_bytes());
    out.push(level);
    out.push((flags & 0x3f) | 0xc0);
    out.extend_from_slice(&keep_alive.to_be_bytes());
    if let Some(p) = props {
        put_varint(&mut out, p.len());
        out.extend_from_slice(p);
    }
    put_binary(&mut out, client_id);
    if let Some((will_props, topic, payload)) = will {
        if let Some(p) = will_props {
            put_varint(&mut out, p.len());
            out.extend_from_slice(p);
        }
        put_binary(&mut out, topic);
        put_binary(&mut out, payload);
    }
    put_binary(&mut out, username.as_bytes());
    put_binary(&mut out, password);
    Ok(with_header(CONNECT << 4, &out))
}

/// The fields of a PUBLISH the gate checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishHead<'a> {
    pub qos: u8,
    /// Empty when an MQTT 5 topic alias stands for it.
    pub topic: &'a str,
    pub pkid: u16,
    pub topic_alias: Option<u16>,
    /// Bytes of the application message.
    pub payload_len: usize,
}

pub fn parse_publish(packet: &[u8], level: u8) -> Result<PublishHead<'_>, Malformed> {
    let qos = (packet.first().copied().unwrap_or(0) >> 1) & 3;
    if qos == 3 {
        return Err(Malformed::Field("PUBLISH QoS"));
    }
    let mut r = Reader::new(body(packet)?);
    let topic = r.string("topic name")?;
    let pkid = if qos > 0 { r.u16("packet id")? } else { 0 };
    let mut topic_alias = None;
    if level == 5 {
        let props = r.properties()?;
        topic_alias = find_u16_property(props, 0x23)?;
    }
    if topic.contains(['+', '#', '\0']) {
        return Err(Malformed::Field("topic name (wildcard or NUL)"));
    }
    if topic.is_empty() && topic_alias.is_none() {
        return Err(Malformed::Field("topic name (empty)"));
    }
    Ok(PublishHead {
        qos,
        topic,
        pkid,
        topic_alias,
        payload_len: r.buf.len().saturating_sub(r.pos),
    })
}

/// Walks MQTT 5 properties and returns the two-byte property `id`.
fn find_u16_property(props: &[u8], id: u8) -> Result<Option<u16>, Malformed> {
    let mut r = Reader::new(props);
    let mut found = None;
    while !r.done() {
        let pid = r.varint("property id")?;
        match pid {
            0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => {
                r.u8("property")?;
            }
            0x13 | 0x21 | 0x22 | 0x23 => {
                let v = r.u16("property")?;
                if pid == usize::from(id) {
                    found = Some(v);
                }
            }
            0x02 | 0x11 | 0x18 | 0x27 => {
                r.take(4, "property")?;
            }
            0x0B => {
                r.varint("property")?;
            }
            0x03 | 0x08 | 0x09 | 0x12 | 0x15 | 0x16 | 0x1A | 0x1C | 0x1F => {
                r.binary("property")?;
            }
            0x26 => {
                r.binary("user property")?;
                r.binary("user property")?;
            }
            _ => return Err(Malformed::Field("property id")),
        }
    }
    Ok(found)
}

/// A SUBSCRIBE: its packet id and each filter with its options byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe<'a> {
    pub pkid: u16,
    pub properties: Option<&'a [u8]>,
    pub filters: Vec<(&'a str, u8)>,
}

pub fn parse_subscribe(packet: &[u8], level: u8) -> Result<Subscribe<'_>, Malformed> {
    if packet.first() != Some(&0x82) {
        return Err(Malformed::Field("SUBSCRIBE fixed header"));
    }
    let mut r = Reader::new(body(packet)?);
    let pkid = r.u16("packet id")?;
    let properties = if level == 5 {
        Some(r.properties()?)
    } else {
        None
    };
    let mut filters = Vec::new();
    while !r.done() {
        let filter = r.string("topic filter")?;
        let options = r.u8("subscription options")?;
        filters.push((filter, options));
    }
    if filters.is_empty() {
        return Err(Malformed::Field("SUBSCRIBE (no topic filter)"));
    }
    Ok(Subscribe {
        pkid,
        properties,
        filters,
    })
}

/// A SUBSCRIBE carrying only `filters` (same packet id and properties).
pub fn encode_subscribe(sub: &Subscribe<'_>, filters: &[(&str, u8)]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&sub.pkid.to_be_bytes());
    if let Some(p) = sub.properties {
        put_varint(&mut out, p.len());
        out.extend_from_slice(p);
    }
    for (f, o) in filters {
        put_binary(&mut out, f.as_bytes());
        out.push(*o);
    }
    with_header(0x82, &out)
}

/// A SUBACK: its packet id and one code per filter.
pub fn parse_suback(packet: &[u8], level: u8) -> Result<(u16, Vec<u8>), Malformed> {
    let mut r = Reader::new(body(packet)?);
    let pkid = r.u16("packet id")?;
    if level == 5 {
        r.properties()?;
    }
    let codes = r.take(r.buf.len() - r.pos, "SUBACK codes")?;
    Ok((pkid, codes.to_vec()))
}

pub fn encode_suback(pkid: u16, level: u8, codes: &[u8]) -> Vec<u8> {
    let mut out = pkid.to_be_bytes().to_vec();
    if level == 5 {
        out.push(0);
    }
    out.extend_from_slice(codes);
    with_header(SUBACK << 4, &out)
}

/// CONNACK refusing the connection. `v4_code`/`v5_code` per version.
pub fn encode_connack_refused(level: u8, v4_code: u8, v5_code: u8) -> Vec<u8> {
    if level == 5 {
        with_header(CONNACK << 4, &[0, v5_code, 0])
    } else {
        with_header(CONNACK << 4, &[0, v4_code])
    }
}

/// MQTT 5 PUBACK (QoS 1) or PUBREC (QoS 2) with a reason code.
pub fn encode_refused_ack(qos: u8, pkid: u16, reason: u8) -> Vec<u8> {
    let kind = if qos == 2 { PUBREC } else { PUBACK };
    let [a, b] = pkid.to_be_bytes();
    with_header(kind << 4, &[a, b, reason])
}

/// MQTT 5 DISCONNECT with a reason code.
pub fn encode_disconnect(reason: u8) -> Vec<u8> {
    with_header(DISCONNECT << 4, &[reason, 0])
}

/// A normal DISCONNECT at protocol `level` (4: MQTT 3.1.1, none in it; 5:
/// reason 0x00): the will is dropped.
pub fn encode_normal_disconnect(level: u8) -> Vec<u8> {
    if level == 5 {
        encode_disconnect(0x00)
    } else {
        with_header(DISCONNECT << 4, &[])
    }
}

/// A CONNECT with a clean session, keep-alive 30 s and no will: what the
/// gate's readiness probe logs in to rumqttd with (and tests).
pub fn encode_connect(
    level: u8,
    client_id: &str,
    username: Option<&str>,
    password: Option<&[u8]>,
) -> Vec<u8> {
    let mut out = Vec::new();
    put_binary(&mut out, b"MQTT");
    out.push(level);
    let mut flags = 0x02;
    if username.is_some() {
        flags |= 0x80;
    }
    if password.is_some() {
        flags |= 0x40;
    }
    out.push(flags);
    out.extend_from_slice(&30u16.to_be_bytes());
    if level == 5 {
        out.push(0);
    }
    put_binary(&mut out, client_id.as_bytes());
    if let Some(u) = username {
        put_binary(&mut out, u.as_bytes());
    }
    if let Some(p) = password {
        put_binary(&mut out, p);
    }
    with_header(CONNECT << 4, &out)
}

/// The return code (3.1.1) or reason code (5) of a framed CONNACK; `None`
/// for any other packet.
pub fn connack_code(packet: &[u8]) -> Option<u8> {
    if kind(packet) != CONNACK {
        return None;
    }
    body(packet).ok()?.get(1).copied()
}

/// An MQTT 5 CONNACK that also tells the client the largest packet it may
/// send (property 0x27, Maximum Packet Size), so a client that reads it
/// never sends one the gate must refuse; `None` if `packet` is not an
/// MQTT 5 CONNACK or already says so.
pub fn connack_with_max_packet_size(packet: &[u8], max: usize) -> Option<Vec<u8>> {
    if kind(packet) != CONNACK {
        return None;
    }
    let mut r = Reader::new(body(packet).ok()?);
    let flags = r.u8("connack flags").ok()?;
    let reason = r.u8("connack reason").ok()?;
    let props = r.properties().ok()?;
    if !r.done() || has_property(props, 0x27)? {
        return None;
    }
    let max = u32::try_from(max).unwrap_or(u32::MAX);
    let mut new_props = props.to_vec();
    new_props.push(0x27);
    new_props.extend_from_slice(&max.to_be_bytes());
    let mut out = vec![flags, reason];
    put_varint(&mut out, new_props.len());
    out.extend_from_slice(&new_props);
    Some(with_header(CONNACK << 4, &out))
}

/// Whether MQTT 5 CONNACK properties `props` hold property `id`; `None` if
/// they do not parse.
fn has_property(props: &[u8], id: u8) -> Option<bool> {
    let mut r = Reader::new(props);
    while !r.done() {
        let p = r.varint("property id").ok()?;
        if p == usize::from(id) {
            return Some(true);
        }
        let fixed = match p {
            // Byte properties.
            0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2a => 1,
            // Two-byte integers.
            0x13 | 0x21 | 0x22 | 0x23 => 2,
            // Four-byte integers.
            0x02 | 0x11 | 0x18 | 0x27 => 4,
            // Variable byte integer.
            0x0b => {
                r.varint("property").ok()?;
                0
            }
            // UTF-8 strings and binary data.
            0x03 | 0x08 | 0x09 | 0x12 | 0x15 | 0x16 | 0x1a | 0x1c | 0x1f => {
                r.binary("property").ok()?;
                0
            }
            // User property: a string pair.
            0x26 => {
                r.binary("property").ok()?;
                r.binary("property").ok()?;
                0
            }
            _ => return None,
        };
        r.take(fixed, "property").ok()?;
    }
    Some(false)
}

/// MQTT 3.1.1 / 5 refusal codes.
pub mod codes {
    pub const V4_IDENTIFIER_REJECTED: u8 = 0x02;
    pub const V4_BAD_CREDENTIALS: u8 = 0x04;
    pub const V4_NOT_AUTHORIZED: u8 = 0x05;
    pub const V4_SUBACK_FAILURE: u8 = 0x80;
    pub const V5_CLIENT_ID_NOT_VALID: u8 = 0x85;
    pub const V5_BAD_CREDENTIALS: u8 = 0x86;
    pub const V5_NOT_AUTHORIZED: u8 = 0x87;
    pub const V5_SERVER_UNAVAILABLE: u8 = 0x88;
    pub const V5_SERVER_BUSY: u8 = 0x89;
    pub const V5_PACKET_TOO_LARGE: u8 = 0x95;
    pub const V5_PROTOCOL_ERROR: u8 = 0x82;
    pub const V5_SESSION_TAKEN_OVER: u8 = 0x8E;
    pub const V4_SERVER_UNAVAILABLE: u8 = 0x03;
}

fn put_binary(out: &mut Vec<u8>, b: &[u8]) {
    // Callers pass fields that came from u16-length fields or short names.
    let n = b.len().min(usize::from(u16::MAX));
    out.extend_from_slice(&(n as u16).to_be_bytes());
    out.extend_from_slice(&b[..n]);
}

fn put_varint(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
}

fn with_header(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(first);
    put_varint(&mut out, body.len());
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect(level: u8, client: &str, user: Option<&str>, pass: Option<&[u8]>) -> Vec<u8> {
        encode_connect(level, client, user, pass)
    }

    #[test]
    fn connect_fields_parse_and_credentials_are_replaced() {
        for level in [4, 5] {
            let p = connect(level, "dev-1", Some("dev-1"), Some(b"secret"));
            assert_eq!(frame(&p, 1000), Ok(Some(p.len())));
            let c = parse_connect(&p).unwrap();
            assert_eq!(c.client_id, "dev-1");
            assert_eq!(c.username.as_deref(), Some("dev-1"));
            assert_eq!(c.password.as_deref(), Some(&b"secret"[..]));
            let rewritten = rewrite_connect_credentials(&p, "gate", b"inner").unwrap();
            let c2 = parse_connect(&rewritten).unwrap();
            assert_eq!(c2.client_id, "dev-1");
            assert_eq!(c2.username.as_deref(), Some("gate"));
            assert_eq!(c2.password.as_deref(), Some(&b"inner"[..]));
            assert_eq!(c2.level, level);
        }
        let anonymous = connect(4, "x", None, None);
        let rewritten = rewrite_connect_credentials(&anonymous, "gate", b"p").unwrap();
        assert_eq!(
            parse_connect(&rewritten).unwrap().username.as_deref(),
            Some("gate")
        );
    }

    #[test]
    fn frames_need_whole_packets_and_respect_the_limit() {
        let p = connect(4, "dev-1", None, None);
        assert_eq!(frame(&p[..p.len() - 1], 1000), Ok(None));
        assert_eq!(frame(&p[..1], 1000), Ok(None));
        assert!(matches!(frame(&p, 5), Err(Malformed::TooLarge { .. })));
        assert_eq!(
            frame(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01], usize::MAX),
            Err(Malformed::BadLength)
        );
    }

    #[test]
    fn publish_topics_and_aliases_are_found() {
        let mut b = Vec::new();
        put_binary(&mut b, b"telemetry/dev-1");
        b.extend_from_slice(&7u16.to_be_bytes());
        b.extend_from_slice(&[1; 300]);
        let v4 = with_header(0x32, &b);
        let head = parse_publish(&v4, 4).unwrap();
        assert_eq!((head.topic, head.qos, head.pkid), ("telemetry/dev-1", 1, 7));
        assert_eq!(head.payload_len, 300);
        // MQTT 5: empty topic, alias 3, plus a user property before it.
        let mut b = Vec::new();
        put_binary(&mut b, b"");
        b.extend_from_slice(&9u16.to_be_bytes());
        let mut props = vec![0x26];
        put_binary(&mut props, b"k");
        put_binary(&mut props, b"v");
        props.extend_from_slice(&[0x23, 0, 3]);
        put_varint(&mut b, props.len());
        b.extend_from_slice(&props);
        b.extend_from_slice(b"payload");
        let v5 = with_header(0x32, &b);
        let head = parse_publish(&v5, 5).unwrap();
        assert_eq!((head.topic, head.topic_alias), ("", Some(3)));
        assert_eq!(head.payload_len, b"payload".len());
        // No topic and no alias.
        let mut b = Vec::new();
        put_binary(&mut b, b"");
        assert!(parse_publish(&with_header(0x30, &b), 4).is_err());
        let mut b = Vec::new();
        put_binary(&mut b, b"telemetry/+");
        assert!(parse_publish(&with_header(0x30, &b), 4).is_err());
    }

    #[test]
    fn subscribe_filters_parse_and_subacks_encode() {
        let mut b = 5u16.to_be_bytes().to_vec();
        put_binary(&mut b, b"ack/dev-1");
        b.push(1);
        put_binary(&mut b, b"ack/dev-2");
        b.push(1);
        let p = with_header(0x82, &b);
        let sub = parse_subscribe(&p, 4).unwrap();
        assert_eq!(sub.filters, vec![("ack/dev-1", 1), ("ack/dev-2", 1)]);
        assert_eq!(sub.pkid, 5);
        let only = encode_subscribe(&sub, &sub.filters[..1]);
        let again = parse_subscribe(&only, 4).unwrap();
        assert_eq!((again.pkid, again.filters), (5, vec![("ack/dev-1", 1)]));
        assert_eq!(
            parse_suback(&encode_suback(5, 5, &[1, 0x87]), 5).unwrap(),
            (5, vec![1, 0x87])
        );
        assert_eq!(
            encode_suback(5, 4, &[0x80, 0x80]),
            vec![0x90, 4, 0, 5, 0x80, 0x80]
        );
        assert_eq!(encode_suback(5, 5, &[0x87]), vec![0x90, 4, 0, 5, 0, 0x87]);
    }

    #[test]
    fn truncated_packets_are_errors_not_panics() {
        let p = connect(5, "dev-1", Some("u"), Some(b"p"));
        for n in 0..p.len() {
            let mut cut = p[..n].to_vec();
            if cut.len() >= 2 {
                cut[1] = (n - 2) as u8;
            }
            let _ = parse_connect(&cut);
            let _ = parse_publish(&cut, 5);
            let _ = parse_subscribe(&cut, 5);
        }
    }

    #[test]
    fn an_mqtt5_connack_learns_the_maximum_packet_size_once() {
        // rumqttd's MQTT 5 CONNACK: session present 0, success, properties
        // with a receive maximum (0x21).
        let connack = with_header(CONNACK << 4, &[0, 0, 3, 0x21, 0, 100]);
        assert_eq!(connack_code(&connack), Some(0));
        let with = connack_with_max_packet_size(&connack, 4096).unwrap();
        assert_eq!(connack_code(&with), Some(0));
        assert_eq!(frame(&with, 100), Ok(Some(with.len())));
        let props = &body(&with).unwrap()[3..];
        assert_eq!(props, &[0x21, 0, 100, 0x27, 0, 0, 0x10, 0]);
        assert_eq!(has_property(props, 0x27), Some(true));
        assert_eq!(connack_with_max_packet_size(&with, 4096), None, "once");
        // MQTT 3.1.1 has no properties: left as it is.
        let v4 = with_header(CONNACK << 4, &[0, 0]);
        assert_eq!(connack_with_max_packet_size(&v4, 4096), None);
        assert_eq!(connack_code(&v4), Some(0));
        assert_eq!(connack_code(&encode_disconnect(0x95)), None);
    }
}
