//! The frame scanner and the relay, fed arbitrary bytes in arbitrary chunks.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgcutover::protocol::frame::{Scan, Scanner};

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

    // The relay: whatever either side sends, it ends with a reason, never a panic,
    // and forwards to the backend nothing the client did not send.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let (client, backend) = stream.split_at(chunking as usize * stream.len() / 255);
        if let Ok((to_backend, _to_client, _end)) = pgcutover::session::fuzzing::relay_bytes(client, backend).await {
            assert!(client.starts_with(&to_backend), "forwarded bytes the client never sent");
        }
    });
});
