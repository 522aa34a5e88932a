//! The frame scanner and both relay pumps, fed arbitrary bytes in arbitrary chunks.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgcutover::protocol::frame::{Scan, Scanner};
use pgcutover::session::relay;

fuzz_target!(|data: &[u8]| {
    let Some((&chunking, stream)) = data.split_first() else { return };
    let chunk = (chunking as usize % 64) + 1;

    // The scanner alone: cursor never passes the end, body accounting adds up.
    let mut scanner = Scanner::new(1 << 20);
    let mut buf = Vec::new();
    for piece in stream.chunks(chunk) {
        buf.extend_from_slice(piece);
        let mut pos = 0;
        loop {
            match scanner.scan(&buf[pos..]) {
                Err(_) => return,
                Ok(Scan::Incomplete) => break,
                Ok(Scan::Body(n)) => pos += n,
                Ok(Scan::Frame { total, .. }) => {
                    assert!(total >= 5);
                    pos += scanner.pass(total, buf.len() - pos);
                }
            }
            assert!(pos <= buf.len());
        }
        buf.drain(..pos);
    }

    // The pumps: whatever arrives, they end with a reason, never a panic, and
    // forward nothing they did not receive.
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    rt.block_on(async {
        let (session, control) = relay::fuzzing::session();
        let gate = pgcutover::gate::Gate::new();
        let (to_client, mut from_proxy) = tokio::sync::mpsc::unbounded_channel();
        let mut up = relay::Upstream::new(&session.info, &gate, control, to_client);
        let mut out = Vec::new();
        let mut pump = relay::Pump::new(1 << 20);
        let mut input = stream;
        relay::client_to_backend(&mut input, &mut out, &mut pump, &mut up).await;
        assert!(stream.starts_with(&out));
        let mut out = Vec::new();
        let mut pump = relay::Pump::new(1 << 20);
        let mut input = stream;
        relay::backend_to_client(&mut input, &mut out, &mut pump, &session.info, &gate, &mut from_proxy, 1234).await;
        assert!(out.len() <= stream.len());
    });
});
