//! Startup-phase packets: SSLRequest, GSSENCRequest, CancelRequest, StartupMessage.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgcutover::protocol::startup::{self, StartupPacket};

fuzz_target!(|data: &[u8]| {
    if let Ok(StartupPacket::Startup(m)) = startup::parse(data, Default::default()) {
        assert!(!m.user().is_empty());
        let _ = m.database();
    }
    // With a correct length word in front, whatever follows.
    let mut packet = ((data.len() + 4) as u32).to_be_bytes().to_vec();
    packet.extend_from_slice(data);
    let _ = startup::parse(&packet, Default::default());
});
