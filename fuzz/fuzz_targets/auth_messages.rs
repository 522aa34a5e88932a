//! What a client or backend sends during authentication: SASL messages (ours and
//! pgwire's SCRAM server), error fields, server-first messages, secrets.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use pgcutover::auth::scram::{ChannelBinding, ScramClient, ScramVerifier};
use pgcutover::auth::Secret;
use pgcutover::protocol::read;

fuzz_target!(|data: &[u8]| {
    let _ = read::parse_sasl_initial_response(BytesMut::from(data));
    let _ = read::parse_fields(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Secret::parse(text);
        let _ = ScramVerifier::parse(text);
    }
    let mut client = ScramClient::new(ChannelBinding::None);
    let _ = client.handle_server_first(data);
    let _ = client.verify_server_final(data);

    // The client leg: pgwire's server state machine behind our guards.
    static VERIFIER: std::sync::OnceLock<ScramVerifier> = std::sync::OnceLock::new();
    let verifier = VERIFIER.get_or_init(|| ScramVerifier::derive("secret", b"fixedsaltfixedsa", 4096));
    let (first, last) = data.split_at(data.len() / 2);
    let _ = pgcutover::client::fuzzing::scram_exchange(verifier, first, last);
});
