//! The broker gate's handling of what a client sends, on arbitrary bytes:
//! framing under the size limit, CONNECT (its fields, the credential
//! rewrite, what the log shows of it), PUBLISH and SUBSCRIBE (their fields
//! and the ACL decision for a device identity, the SUBSCRIBE re-encoding),
//! SUBACK, and the CONNACK rewrite that tells MQTT 5 clients the limit; for
//! MQTT 3.1.1 and 5.
//!
//! None may panic; every result must be an Ok or an Err, and the invariants
//! the gate relies on must hold: a framed packet is never over the limit, a
//! CONNECT that parses can be rewritten and parses again to the same
//! identity, a log line's share of a client string stays short.
//!
//! The first two bytes choose the size limit (so small limits are explored
//! too); the rest is the client's byte stream, framed packet by packet.
#![no_main]

use edgeloop_broker::gate::acl::{Identity, Role};
use edgeloop_broker::gate::{packet, refusals};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (limit, mut stream) = match data {
        [a, b, rest @ ..] => (usize::from(u16::from_be_bytes([*a, *b])).max(2), rest),
        _ => return,
    };
    let mut level = 4;
    let mut identity: Option<Identity> = None;
    while let Ok(Some(len)) = packet::frame(stream, limit) {
        assert!(len <= limit, "a framed packet of {len} bytes over the limit {limit}");
        let p = &stream[..len];
        stream = &stream[len..];
        match packet::kind(p) {
            packet::CONNECT => {
                let Ok(c) = packet::parse_connect(p) else {
                    continue;
                };
                level = c.level;
                let rewritten = packet::rewrite_connect_credentials(p, "gate", b"secret")
                    .expect("a CONNECT that parses can be rewritten");
                let again = packet::parse_connect(&rewritten).expect("the rewrite parses");
                assert_eq!(again.client_id, c.client_id);
                assert_eq!(again.will_topic, c.will_topic);
                assert_eq!(again.username.as_deref(), Some("gate"));
                for s in [Some(c.client_id.as_str()), c.username.as_deref()] {
                    let shown = refusals::shown_opt(s);
                    assert!(shown.len() <= refusals::SHOWN_BYTES + 32, "{shown}");
                }
                identity = Some(Identity {
                    id: c.client_id.clone(),
                    role: Role::Device,
                });
                if let (Some(id), Some(will)) = (&identity, &c.will_topic) {
                    let _ = id.can_publish(will);
                }
            }
            packet::PUBLISH => {
                if let Ok(head) = packet::parse_publish(p, level) {
                    assert!(head.payload_len <= p.len());
                    if let Some(id) = &identity {
                        let allowed = id.can_publish(head.topic);
                        // A device may publish only under its own id.
                        if allowed {
                            assert!(head.topic.ends_with(&format!("/{}", id.id)), "{}", head.topic);
                        }
                    }
                    let _ = refusals::shown(head.topic);
                }
            }
            packet::SUBSCRIBE => {
                if let Ok(sub) = packet::parse_subscribe(p, level) {
                    if let Some(id) = &identity {
                        for (f, _) in &sub.filters {
                            let _ = id.can_subscribe(f);
                        }
                    }
                    let again = packet::encode_subscribe(&sub, &sub.filters);
                    let back =
                        packet::parse_subscribe(&again, level).expect("re-encoded SUBSCRIBE parses");
                    assert_eq!(back.filters, sub.filters);
                }
            }
            packet::CONNACK => {
                let _ = packet::connack_code(p);
                if let Some(with) = packet::connack_with_max_packet_size(p, limit) {
                    assert_eq!(packet::connack_code(&with), packet::connack_code(p));
                    assert_eq!(packet::frame(&with, usize::MAX), Ok(Some(with.len())));
                    assert_eq!(packet::connack_with_max_packet_size(&with, limit), None);
                }
            }
            _ => {
                for l in [4, 5] {
                    let _ = packet::parse_suback(p, l);
                }
            }
        }
    }
});
