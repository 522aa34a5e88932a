//! Moving a session to another backend without its client noticing.
//!
//! At the switch the session is idle (held at the gate). One query on its old
//! backend reads back everything the client relies on — parameters it SET, prepared
//! statements (SQL-level and protocol-level), LISTEN channels — and whatever cannot
//! move (temporary tables, WITH HOLD cursors, session advisory locks). One pipelined
//! round trip replays it on the new, already logged-in backend.

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

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SessionState {
    pub settings: Vec<(String, String)>,
    pub prepared: Vec<Prepared>,
    pub channels: Vec<String>,
    pub unmovable: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    pub name: String,
    pub statement: String,
    /// Parameter type OIDs, as the old backend resolved them.
    pub param_types: Vec<u32>,
    /// Created with SQL PREPARE (its text is the whole PREPARE statement).
    pub from_sql: bool,
}

const READ_BACK: &str = "\
SELECT 'set', name, setting, NULL, NULL FROM pg_settings WHERE source = 'session' \
UNION ALL SELECT 'prepared', name, statement, parameter_types::oid[]::text, from_sql::text FROM pg_prepared_statements \
UNION ALL SELECT 'listen', c, NULL, NULL, NULL FROM pg_listening_channels() c \
UNION ALL SELECT 'unmovable', 'temporary tables', NULL, NULL, NULL FROM pg_class WHERE relnamespace = pg_my_temp_schema() HAVING count(*) > 0 \
UNION ALL SELECT 'unmovable', 'WITH HOLD cursors', NULL, NULL, NULL FROM pg_cursors WHERE is_holdable HAVING count(*) > 0 \
UNION ALL SELECT 'unmovable', 'session advisory locks', NULL, NULL, NULL FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() HAVING count(*) > 0";

/// Messages the backend sent on its own while we asked (NotificationResponse,
/// NoticeResponse, ParameterStatus): they belong to the client.
pub type Async = Vec<BytesMut>;

type Row = Vec<Option<String>>;

/// Runs one simple query and collects its rows, or the first error.
pub async fn simple_query(stream: &mut Stream, sql: &str, asynchronous: &mut Async) -> Result<Vec<Row>, MigrateError> {
    let mut q = BytesMut::new();
    let mut body = sql.as_bytes().to_vec();
    body.push(0);
    write::frontend_message(&mut q, b'Q', &body);
    stream.write_all(&q).await?;
    collect(stream, asynchronous, 1).await
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
                        let v = body.split_to(len as usize);
                        row.push(Some(String::from_utf8_lossy(&v).into_owned()));
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

fn parse_oids(text: &str) -> Vec<u32> {
    text.trim_matches(|c| c == '{' || c == '}').split(',').filter_map(|s| s.trim().parse().ok()).collect()
}

/// Reads back what the session relies on from its (idle) backend.
pub async fn read_state(stream: &mut Stream, asynchronous: &mut Async) -> Result<SessionState, MigrateError> {
    let mut state = SessionState::default();
    for row in simple_query(stream, READ_BACK, asynchronous).await? {
        let field = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
        match field(0).as_str() {
            "set" => state.settings.push((field(1), field(2))),
            "prepared" => state.prepared.push(Prepared {
                name: field(1),
                statement: field(2),
                param_types: parse_oids(&field(3)),
                from_sql: field(4) == "true",
            }),
            "listen" => state.channels.push(field(1)),
            "unmovable" => state.unmovable.push(field(1)),
            _ => {}
        }
    }
    Ok(state)
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

/// Replays `state` on a new backend in one pipelined round trip: one simple query
/// for settings, SQL-level statements and LISTENs, Parse messages for
/// protocol-level statements, one Sync.
pub async fn replay(stream: &mut Stream, state: &SessionState, asynchronous: &mut Async) -> Result<(), MigrateError> {
    if !state.unmovable.is_empty() {
        return Err(MigrateError::Unmovable(state.unmovable.join(", ")));
    }
    let mut sql = String::new();
    for (name, value) in &state.settings {
        sql.push_str(&format!("SELECT set_config({}, {}, false);", quote_literal(name), quote_literal(value)));
    }
    for p in state.prepared.iter().filter(|p| p.from_sql) {
        // The text is the client's whole query string: replay only its PREPARE, or
        // the other statements in it would run again.
        let prepare = split_statements(&p.statement).into_iter().find(|s| prepares(s, &p.name));
        let Some(prepare) = prepare else {
            return Err(MigrateError::Unmovable(format!("prepared statement {} (its PREPARE cannot be found again)", quote_ident(&p.name))));
        };
        sql.push_str(prepare);
        sql.push(';');
    }
    for c in &state.channels {
        sql.push_str(&format!("LISTEN {};", quote_ident(c)));
    }
    let mut out = BytesMut::new();
    let mut readies = 0;
    if !sql.is_empty() {
        let mut body = sql.into_bytes();
        body.push(0);
        write::frontend_message(&mut out, b'Q', &body);
        readies += 1;
    }
    let protocol: Vec<&Prepared> = state.prepared.iter().filter(|p| !p.from_sql).collect();
    if !protocol.is_empty() {
        for p in protocol {
            let mut body = Vec::with_capacity(p.name.len() + p.statement.len() + 4 + 4 * p.param_types.len());
            body.extend_from_slice(p.name.as_bytes());
            body.push(0);
            body.extend_from_slice(p.statement.as_bytes());
            body.push(0);
            body.extend_from_slice(&(p.param_types.len() as u16).to_be_bytes());
            for oid in &p.param_types {
                body.extend_from_slice(&oid.to_be_bytes());
            }
            write::frontend_message(&mut out, b'P', &body);
        }
        write::frontend_message(&mut out, b'S', &[]);
        readies += 1;
    }
    if readies == 0 {
        return Ok(());
    }
    stream.write_all(&out).await?;
    collect(stream, asynchronous, readies).await.map(|_| ())
}

/// Splits SQL text at top-level semicolons, skipping quoted strings, quoted
/// identifiers, dollar quotes and comments.
pub fn split_statements(sql: &str) -> Vec<&str> {
    let b = sql.as_bytes();
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
                        match sql[e + 1..].find(tag) {
                            Some(close) => i = e + 1 + close + tag.len(),
                            None => i = b.len(),
                        }
                    }
                    _ => i += 1,
                }
            }
            b';' => {
                out.push(sql[start..i].trim());
                i += 1;
                start = i;
            }
            _ => i += 1,
        }
    }
    out.push(sql[start..].trim());
    out.retain(|s| !s.is_empty());
    out
}

/// Is `stmt` a `PREPARE name ...` of the statement called `name`?
fn prepares(stmt: &str, name: &str) -> bool {
    let rest = match stmt.get(..7) {
        Some(kw) if kw.eq_ignore_ascii_case("prepare") => stmt[7..].trim_start(),
        _ => return false,
    };
    if let Some(quoted) = rest.strip_prefix('"') {
        let mut ident = String::new();
        let mut chars = quoted.chars().peekable();
        while let Some(c) = chars.next() {
            if c == '"' {
                if chars.peek() == Some(&'"') {
                    chars.next();
                    ident.push('"');
                } else {
                    return ident == name;
                }
            } else {
                ident.push(c);
            }
        }
        false
    } else {
        let word: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_' || *c == '$').collect();
        word.to_lowercase() == name
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
    }

    #[test]
    fn statements_split_at_top_level_semicolons_only() {
        let sql = "SET a = 'x;y'; PREPARE p AS SELECT $$;$$ -- ;\n ; /* ; */ LISTEN \"c;d\"";
        assert_eq!(split_statements(sql), vec!["SET a = 'x;y'", "PREPARE p AS SELECT $$;$$ -- ;", "/* ; */ LISTEN \"c;d\""]);
        assert_eq!(split_statements("SELECT E'a\\';b'; SELECT 2"), vec!["SELECT E'a\\';b'", "SELECT 2"]);
    }

    #[test]
    fn the_prepare_of_a_statement_is_found_among_others() {
        let text = "SET work_mem = '7MB'; PREPARE plus_one (int) AS SELECT $1 + 1; LISTEN news";
        let found = split_statements(text).into_iter().find(|s| prepares(s, "plus_one"));
        assert_eq!(found, Some("PREPARE plus_one (int) AS SELECT $1 + 1"));
        assert!(prepares("prepare \"Mixed\"\"Case\" AS SELECT 1", "Mixed\"Case"));
        assert!(prepares("PREPARE Upper AS SELECT 1", "upper"));
        assert!(!prepares("PREPARE other AS SELECT 1", "plus_one"));
    }

    #[test]
    fn oid_arrays_parse() {
        assert_eq!(parse_oids("{23,25}"), vec![23, 25]);
        assert_eq!(parse_oids("{}"), Vec::<u32>::new());
    }
}
