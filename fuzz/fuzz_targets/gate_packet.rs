//! The broker gate's MQTT parsers on arbitrary bytes: framing, CONNECT (and
//! its credential rewrite), PUBLISH, SUBSCRIBE (and its re-encoding) and
//! SUBACK, for MQTT 3.1.1 and 5.
//! None may panic; every result must be an Ok or an Err.
#![no_main]

use edgeloop_broker::gate::packet;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(Some(len)) = packet::frame(data, 1 << 20) else {
        return;
    };
    let p = &data[..len];
    if let Ok(c) = packet::parse_connect(p) {
        let rewritten = packet::rewrite_connect_credentials(p, "gate", b"secret")
            .expect("a CONNECT that parses can be rewritten");
        let again = packet::parse_connect(&rewritten).expect("the rewrite parses");
        assert_eq!(again.client_id, c.client_id);
        assert_eq!(again.will_topic, c.will_topic);
    }
    for level in [4, 5] {
        let _ = packet::parse_publish(p, level);
        let _ = packet::parse_suback(p, level);
        if let Ok(sub) = packet::parse_subscribe(p, level) {
            let again = packet::encode_subscribe(&sub, &sub.filters);
            let back = packet::parse_subscribe(&again, level).expect("re-encoded SUBSCRIBE parses");
            assert_eq!(back.filters, sub.filters);
        }
    }
});
