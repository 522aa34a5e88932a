//! Moving a session to another backend without its client noticing.
//!
//! The session is idle when its state is read: one query on its backend reads back
//! everything the client relies on — its session user and role, the settings it SET
//! (custom dotted ones by the names learned from its statements), prepared
//! statements (SQL-level and protocol-level, with parameter types by name) and LISTEN
//! channels — and whatever cannot move (temporary tables, WITH HOLD cursors, session
//! advisory locks). One or two pipelined round trips replay it on the new, already
//! logged-in backend, and one more reads it back there: a session whose state is not
//! reproduced exactly does not move.
//!
//! Texts are kept as the bytes the backend sent, in the session's own
//! client_encoding, and written back as such on a connection with the same
//! encoding: nothing is decoded as UTF-8. Literals are dollar-quoted, which no
//! server-side encoding's bytes and no `standard_conforming_strings` can break.

use bytes::{Buf, BytesMut};
use tokio::io::AsyncWriteExt;

use crate::net::Stream;
use crate::protocol::read::{parse_fields, read_message, ReadError};
use crate::protocol::write;

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("backend connection failed: {0}")]
    Io(String),
    #[error("the backend answered {code}: {message}")]
    Backend { code: String, message: String },
    #[error("this session holds {0}, which cannot move to another server")]
    Unmovable(String),
    #[error("its state could not be reproduced on the new server exactly ({0})")]
    Differs(String),
    #[error("the new server did not answer within {0:?}")]
    Stalled(std::time::Duration),
}

impl From<std::io::Error> for MigrateError {
    fn from(e: std::io::Error) -> Self {
        MigrateError::Io(e.to_string())
    }
}

impl From<ReadError> for MigrateError {
    fn from(e: ReadError) -> Self {
        MigrateError::Io(e.to_string())
    }
}

/// Text as the backend sent it, in the session's client_encoding.
pub type Text = Vec<u8>;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SessionState {
    /// `session_user` (SET SESSION AUTHORIZATION changes it).
    pub session_user: Text,
    /// `current_setting('role')`: `none`, or the role SET ROLE chose.
    pub role: Text,
    /// Settings whose source is the session, from pg_settings (sorted by name).
    pub settings: Vec<(Text, Text)>,
    /// Custom dotted settings by the names learned from the session's statements.
    pub custom: Vec<(Text, Text)>,
    pub prepared: Vec<Prepared>,
    pub channels: Vec<Text>,
    pub unmovable: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    pub name: Text,
    pub statement: Text,
    /// Parameter type OIDs, as the old backend resolved them.
    pub param_types: Vec<u32>,
    /// The same types by name (`regtype` output under the session's search_path).
    pub type_names: Vec<Text>,
    /// Created with SQL PREPARE (its text is the whole PREPARE statement).
    pub from_sql: bool,
}

/// Types up to here are built in: the same OID on every cluster.
const FIRST_NORMAL_OID: u32 = 16384;

fn read_back(custom: &[Box<str>]) -> Vec<u8> {
    let mut sql = b"SELECT 'who', session_user::text, current_setting('role'), NULL, NULL, NULL \
UNION ALL SELECT 'set', name, setting, NULL, NULL, NULL FROM pg_settings WHERE source = 'session' \
UNION ALL SELECT 'prepared', name, statement, parameter_types::oid[]::text, from_sql::text, parameter_types::regtype[]::text FROM pg_prepared_statements \
UNION ALL SELECT 'listen', c, NULL, NULL, NULL, NULL FROM pg_listening_channels() c \
UNION ALL SELECT 'unmovable', 'temporary tables', NULL, NULL, NULL, NULL FROM pg_class WHERE relnamespace = pg_my_temp_schema() HAVING count(*) > 0 \
UNION ALL SELECT 'unmovable', 'WITH HOLD cursors', NULL, NULL, NULL, NULL FROM pg_cursors WHERE is_holdable HAVING count(*) > 0 \
UNION ALL SELECT 'unmovable', 'session advisory locks', NULL, NULL, NULL, NULL FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() HAVING count(*) > 0"
        .to_vec();
    if !custom.is_empty() {
        sql.extend_from_slice(b" UNION ALL SELECT 'custom', n, current_setting(n, true), NULL, NULL, NULL FROM unnest(ARRAY[");
        for (i, name) in custom.iter().enumerate() {
            if i > 0 {
                sql.push(b',');
            }
            sql.extend(literal(name.as_bytes()));
        }
        sql.extend_from_slice(b"]::text[]) n WHERE current_setting(n, true) IS NOT NULL");
    }
    sql
}

/// Messages the backend sent on its own while we asked (NotificationResponse,
/// NoticeResponse, ParameterStatus): they belong to the client.
pub type Async = Vec<BytesMut>;

type Row = Vec<Option<Text>>;

fn query_message(out: &mut BytesMut, sql: &[u8]) {
    let mut body = Vec::with_capacity(sql.len() + 1);
    body.extend_from_slice(sql);
    body.push(0);
    write::frontend_message(out, b'Q', &body);
}

/// Runs one simple query and collects its rows, or the first error.
pub async fn simple_query(stream: &mut Stream, sql: &str, asynchronous: &mut Async) -> Result<Vec<Row>, MigrateError> {
    simple_query_bytes(stream, sql.as_bytes(), asynchronous).await
}

/// [`simple_query`] with SQL as bytes (identifiers in the session's encoding).
pub async fn simple_query_bytes(stream: &mut Stream, sql: &[u8], asynchronous: &mut Async) -> Result<Vec<Row>, MigrateError> {
    let mut q = BytesMut::new();
    query_message(&mut q, sql);
    stream.write_all(&q).await?;
    collect(stream, asynchronous, 1).await
}

/// Sends a Sync and waits for its ReadyForQuery: closes an open extended batch.
pub async fn sync(stream: &mut Stream, asynchronous: &mut Async) -> Result<(), MigrateError> {
    stream.write_all(&write::SYNC).await?;
    collect(stream, asynchronous, 1).await.map(drop)
}

/// Sends a Parse message as the client sent it, and a Sync; an error is returned.
pub async fn parse_again(stream: &mut Stream, parse: &[u8], asynchronous: &mut Async) -> Result<(), MigrateError> {
    let mut out = BytesMut::with_capacity(parse.len() + 5);
    out.extend_from_slice(parse);
    out.extend_from_slice(&write::SYNC);
    stream.write_all(&out).await?;
    collect(stream, asynchronous, 1).await.map(drop)
}

/// Reads until `readies` ReadyForQuery messages have come; returns DataRows.
async fn collect(stream: &mut Stream, asynchronous: &mut Async, mut readies: usize) -> Result<Vec<Row>, MigrateError> {
    let mut rows = Vec::new();
    let mut error = None;
    while readies > 0 {
        let (tag, mut body) = read_message(stream, 64 * 1024 * 1024).await?;
        match tag {
            b'D' => {
                if body.len() < 2 {
                    return Err(MigrateError::Io("short DataRow".into()));
                }
                let n = body.get_u16() as usize;
                let mut row = Vec::with_capacity(n);
                for _ in 0..n {
                    if body.len() < 4 {
                        return Err(MigrateError::Io("short DataRow".into()));
                    }
                    let len = body.get_i32();
                    if len < 0 {
                        row.push(None);
                    } else if len as usize <= body.len() {
                        row.push(Some(body.split_to(len as usize).to_vec()));
                    } else {
                        return Err(MigrateError::Io("short DataRow".into()));
                    }
                }
                rows.push(row);
            }
            b'E' => {
                let fields = parse_fields(&body);
                let get = |c: u8| fields.iter().find(|(k, _)| *k == c).map(|(_, v)| v.clone()).unwrap_or_default();
                error.get_or_insert(MigrateError::Backend { code: get(b'C'), message: get(b'M') });
            }
            b'A' | b'N' | b'S' => {
                let mut frame = BytesMut::with_capacity(body.len() + 5);
                write::frontend_message(&mut frame, tag, &body);
                asynchronous.push(frame);
            }
            b'Z' => readies -= 1,
            _ => {}
        }
    }
    match error {
        Some(e) => Err(e),
        None => Ok(rows),
    }
}

fn parse_oids(text: &[u8]) -> Vec<u32> {
    array_elements(text).iter().filter_map(|s| std::str::from_utf8(s).ok()?.trim().parse().ok()).collect()
}

/// The elements of a one-dimensional array's text output (`{a,"b c"}`).
fn array_elements(text: &[u8]) -> Vec<Text> {
    let inner = text.strip_prefix(b"{").and_then(|t| t.strip_suffix(b"}")).unwrap_or(text);
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let (mut quoted, mut escaped, mut any) = (false, false, false);
    for &b in inner {
        any = true;
        match b {
            _ if escaped => {
                cur.push(b);
                escaped = false;
            }
            b'\\' if quoted => escaped = true,
            b'"' => quoted = !quoted,
            b',' if !quoted => out.push(std::mem::take(&mut cur)),
            _ => cur.push(b),
        }
    }
    if any {
        out.push(cur);
    }
    out
}

/// Reads back what the session relies on from its (idle) backend; `custom` are the
/// dotted setting names learned from its statements.
pub async fn read_state(stream: &mut Stream, custom: &[Box<str>], asynchronous: &mut Async) -> Result<SessionState, MigrateError> {
    let mut q = BytesMut::new();
    query_message(&mut q, &read_back(custom));
    stream.write_all(&q).await?;
    let mut state = SessionState::default();
    for row in collect(stream, asynchronous, 1).await? {
        let field = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
        match field(0).as_slice() {
            b"who" => {
                state.session_user = field(1);
                state.role = field(2);
            }
            b"set" => state.settings.push((field(1), field(2))),
            b"custom" => state.custom.push((field(1), field(2))),
            b"prepared" => state.prepared.push(Prepared {
                name: field(1),
                statement: field(2),
                param_types: parse_oids(&field(3)),
                from_sql: field(4) == b"true",
                type_names: array_elements(&field(5)),
            }),
            b"listen" => state.channels.push(field(1)),
            b"unmovable" => state.unmovable.push(String::from_utf8_lossy(&field(1)).into_owned()),
            _ => {}
        }
    }
    state.settings.sort();
    state.custom.sort();
    state.prepared.sort_by(|a, b| a.name.cmp(&b.name));
    state.channels.sort();
    Ok(state)
}

/// A string literal in dollar quotes, whatever bytes it holds: the tag is one that
/// first occurs, in the value followed by the tag, at its end.
pub fn literal(v: &[u8]) -> Vec<u8> {
    let mut n = 0;
    let tag = loop {
        let tag = if n == 0 { b"$pgc$".to_vec() } else { format!("$pgc{n}$").into_bytes() };
        let mut probe = v.to_vec();
        probe.extend_from_slice(&tag);
        if probe.windows(tag.len()).position(|w| w == tag.as_slice()) == Some(v.len()) {
            break tag;
        }
        n += 1;
    };
    let mut out = tag.clone();
    out.extend_from_slice(v);
    out.extend_from_slice(&tag);
    out
}

/// A string literal, safe whatever `standard_conforming_strings` says.
pub fn quote_literal(s: &str) -> String {
    if s.contains('\\') {
        format!("E'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
    } else {
        format!("'{}'", s.replace('\'', "''"))
    }
}

pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

pub fn ident(v: &[u8]) -> Vec<u8> {
    let mut out = vec![b'"'];
    for &b in v {
        if b == b'"' {
            out.push(b'"');
        }
        out.push(b);
    }
    out.push(b'"');
    out
}

/// Replays `state` on a new backend whose login user is `login_user`:
/// - a Query with the session authorization and every setting (first, and on its
///   own, so that a client_encoding it sets applies to what follows);
/// - a Query with the SQL-level PREPAREs and the LISTENs, and the lookup of
///   parameter types that are not built in, by name;
/// - Parse messages for the protocol-level statements and a Sync;
/// - SET ROLE last (it may drop privileges the steps before need).
///
/// Two round trips when a statement has a type that is not built in (its OID is
/// looked up on the new server first), else one.
pub async fn replay(stream: &mut Stream, state: &SessionState, login_user: &[u8], asynchronous: &mut Async) -> Result<(), MigrateError> {
    if !state.unmovable.is_empty() {
        return Err(MigrateError::Unmovable(state.unmovable.join(", ")));
    }
    let mut first = Vec::new();
    if !state.session_user.is_empty() && state.session_user != login_user {
        first.extend_from_slice(b"SET SESSION AUTHORIZATION ");
        first.extend(ident(&state.session_user));
        first.push(b';');
    }
    for (name, value) in state.settings.iter().chain(&state.custom) {
        first.extend_from_slice(b"SELECT set_config(");
        first.extend(literal(name));
        first.push(b',');
        first.extend(literal(value));
        first.extend_from_slice(b", false);");
    }
    let mut second = Vec::new();
    for p in state.prepared.iter().filter(|p| p.from_sql) {
        // The text is the client's whole query string: replay only its PREPARE, or
        // the other statements in it would run again.
        let Some(prepare) = split_statements(&p.statement).into_iter().find(|s| prepares(s, &p.name)) else {
            return Err(MigrateError::Unmovable(format!("prepared statement {} (its PREPARE cannot be found again)", String::from_utf8_lossy(&ident(&p.name)))));
        };
        second.extend_from_slice(prepare);
        second.push(b';');
    }
    for c in &state.channels {
        second.extend_from_slice(b"LISTEN ");
        second.extend(ident(c));
        second.push(b';');
    }
    let protocol: Vec<&Prepared> = state.prepared.iter().filter(|p| !p.from_sql).collect();
    let mut custom_types: Vec<&Text> = Vec::new();
    for p in &protocol {
        for (oid, name) in p.param_types.iter().zip(&p.type_names) {
            if *oid >= FIRST_NORMAL_OID && !custom_types.contains(&name) {
                custom_types.push(name);
            }
        }
    }
    let mut out = BytesMut::new();
    let mut readies = 0;
    for sql in [&first, &second] {
        if !sql.is_empty() {
            query_message(&mut out, sql);
            readies += 1;
        }
    }
    let mut oids = std::collections::HashMap::new();
    if !custom_types.is_empty() {
        let mut q = b"SELECT n, n::regtype::oid::text FROM unnest(ARRAY[".to_vec();
        for (i, t) in custom_types.iter().enumerate() {
            if i > 0 {
                q.push(b',');
            }
            q.extend(literal(t));
        }
        q.extend_from_slice(b"]::text[]) n");
        query_message(&mut out, &q);
        stream.write_all(&out).await?;
        out.clear();
        for row in collect(stream, asynchronous, readies + 1).await? {
            if let [Some(name), Some(oid)] = row.as_slice() {
                if let Some(oid) = std::str::from_utf8(oid).ok().and_then(|o| o.parse::<u32>().ok()) {
                    oids.insert(name.clone(), oid);
                }
            }
        }
        readies = 0;
    }
    if !protocol.is_empty() {
        for p in protocol {
            let mut body = Vec::with_capacity(p.name.len() + p.statement.len() + 4 + 4 * p.param_types.len());
            body.extend_from_slice(&p.name);
            body.push(0);
            body.extend_from_slice(&p.statement);
            body.push(0);
            body.extend_from_slice(&(p.param_types.len() as u16).to_be_bytes());
            for (i, oid) in p.param_types.iter().enumerate() {
                let oid = match p.type_names.get(i) {
                    Some(name) if *oid >= FIRST_NORMAL_OID => *oids.get(name).ok_or_else(|| MigrateError::Differs(format!("type {} is missing on the new server", String::from_utf8_lossy(name))))?,
                    _ => *oid,
                };
                body.extend_from_slice(&oid.to_be_bytes());
            }
            write::frontend_message(&mut out, b'P', &body);
        }
        write::frontend_message(&mut out, b'S', &[]);
        readies += 1;
    }
    if state.role != b"none" && !state.role.is_empty() {
        let mut q = b"SET ROLE ".to_vec();
        q.extend(ident(&state.role));
        query_message(&mut out, &q);
        readies += 1;
    }
    if readies == 0 {
        return Ok(());
    }
    stream.write_all(&out).await?;
    collect(stream, asynchronous, readies).await.map(|_| ())
}

/// What differs between the state read on the old backend and the one read back on
/// the new one after the replay, if anything. SQL-level statements are compared by
/// name and parameter types (their text is the query string that created them).
pub fn differences(old: &SessionState, new: &SessionState) -> Option<String> {
    let show = |v: &[u8]| String::from_utf8_lossy(v).into_owned();
    let mut diffs = Vec::new();
    if old.session_user != new.session_user {
        diffs.push(format!("session user {} became {}", show(&old.session_user), show(&new.session_user)));
    }
    if old.role != new.role {
        diffs.push(format!("role {} became {}", show(&old.role), show(&new.role)));
    }
    for (label, a, b) in [("setting", &old.settings, &new.settings), ("custom setting", &old.custom, &new.custom)] {
        for (name, value) in a {
            if !b.iter().any(|(n, v)| n == name && v == value) {
                diffs.push(format!("{label} {} = {:?} is not set", show(name), show(value)));
            }
        }
    }
    let key = |p: &Prepared| (p.name.clone(), p.type_names.clone(), p.from_sql, if p.from_sql { Vec::new() } else { p.statement.clone() });
    let a: Vec<_> = old.prepared.iter().map(key).collect();
    let b: Vec<_> = new.prepared.iter().map(key).collect();
    if a != b {
        diffs.push("prepared statements differ".into());
    }
    if old.channels != new.channels {
        diffs.push("LISTEN channels differ".into());
    }
    (!diffs.is_empty()).then(|| diffs.join("; "))
}

/// Splits SQL text at top-level semicolons, skipping quoted strings, quoted
/// identifiers, dollar quotes and comments.
pub fn split_statements(sql: &[u8]) -> Vec<&[u8]> {
    let b = sql;
    let mut out = Vec::new();
    let (mut i, mut start) = (0, 0);
    while i < b.len() {
        match b[i] {
            b'\'' | b'"' => {
                let q = b[i];
                // E'...' strings take backslash escapes.
                let escapes = q == b'\'' && i > 0 && (b[i - 1] == b'E' || b[i - 1] == b'e');
                i += 1;
                while i < b.len() {
                    if escapes && b[i] == b'\\' {
                        i += 2;
                        continue;
                    }
                    if b[i] == q {
                        if b.get(i + 1) == Some(&q) {
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    i += 1;
                }
                i += 1;
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let mut depth = 0;
                while i < b.len() {
                    if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                        depth += 1;
                        i += 2;
                    } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
            }
            b'$' => {
                // $tag$ ... $tag$ (a tag is empty or an identifier).
                let tag_end = b[i + 1..].iter().position(|c| !(c.is_ascii_alphanumeric() || *c == b'_')).map(|n| i + 1 + n);
                match tag_end {
                    Some(e) if b[e] == b'$' && !b[i + 1..e].first().is_some_and(u8::is_ascii_digit) => {
                        let tag = &sql[i..=e];
                        match sql[e + 1..].windows(tag.len()).position(|w| w == tag) {
                            Some(close) => i = e + 1 + close + tag.len(),
                            None => i = b.len(),
                        }
                    }
                    _ => i += 1,
                }
            }
            b';' => {
                out.push(sql[start..i].trim_ascii());
                i += 1;
                start = i;
            }
            _ => i += 1,
        }
    }
    out.push(sql[start..].trim_ascii());
    out.retain(|s| !s.is_empty());
    out
}

/// Is `stmt` a `PREPARE name ...` of the statement called `name`?
fn prepares(stmt: &[u8], name: &[u8]) -> bool {
    let rest = match stmt.get(..7) {
        Some(kw) if kw.eq_ignore_ascii_case(b"prepare") => stmt[7..].trim_ascii_start(),
        _ => return false,
    };
    if let Some(quoted) = rest.strip_prefix(b"\"") {
        let mut ident = Vec::new();
        let mut i = 0;
        while i < quoted.len() {
            if quoted[i] == b'"' {
                if quoted.get(i + 1) == Some(&b'"') {
                    ident.push(b'"');
                    i += 2;
                    continue;
                }
                return ident == name;
            }
            ident.push(quoted[i]);
            i += 1;
        }
        false
    } else {
        let word: Vec<u8> = rest.iter().take_while(|c| c.is_ascii_alphanumeric() || **c == b'_' || **c == b'$' || **c >= 0x80).map(u8::to_ascii_lowercase).collect();
        word == name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_and_identifiers_are_quoted() {
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal(r"C:\dir"), r"E'C:\\dir'");
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
        assert_eq!(literal(b"a'b\\c"), b"$pgc$a'b\\c$pgc$".to_vec());
        assert_eq!(literal(b"x$pgc"), b"$pgc1$x$pgc$pgc1$".to_vec(), "the tag never closes early");
        assert_eq!(literal(b"$pgc$"), b"$pgc1$$pgc$$pgc1$".to_vec());
        assert_eq!(ident(b"we\"ird"), b"\"we\"\"ird\"".to_vec());
    }

    #[test]
    fn statements_split_at_top_level_semicolons_only() {
        let sql = b"SET a = 'x;y'; PREPARE p AS SELECT $$;$$ -- ;\n ; /* ; */ LISTEN \"c;d\"";
        assert_eq!(split_statements(sql), vec![&b"SET a = 'x;y'"[..], b"PREPARE p AS SELECT $$;$$ -- ;", b"/* ; */ LISTEN \"c;d\""]);
        assert_eq!(split_statements(b"SELECT E'a\\';b'; SELECT 2"), vec![&b"SELECT E'a\\';b'"[..], b"SELECT 2"]);
    }

    #[test]
    fn the_prepare_of_a_statement_is_found_among_others() {
        let text = b"SET work_mem = '7MB'; PREPARE plus_one (int) AS SELECT $1 + 1; LISTEN news";
        let found = split_statements(text).into_iter().find(|s| prepares(s, b"plus_one"));
        assert_eq!(found, Some(&b"PREPARE plus_one (int) AS SELECT $1 + 1"[..]));
        assert!(prepares(b"prepare \"Mixed\"\"Case\" AS SELECT 1", b"Mixed\"Case"));
        assert!(prepares(b"PREPARE Upper AS SELECT 1", b"upper"));
        assert!(!prepares(b"PREPARE other AS SELECT 1", b"plus_one"));
    }

    #[test]
    fn arrays_of_oids_and_type_names_parse() {
        assert_eq!(parse_oids(b"{23,25}"), vec![23, 25]);
        assert_eq!(parse_oids(b"{}"), Vec::<u32>::new());
        assert_eq!(array_elements(b"{integer,\"character varying\",\"a\\\"b\"}"), vec![b"integer".to_vec(), b"character varying".to_vec(), b"a\"b".to_vec()]);
    }
}
