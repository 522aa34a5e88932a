//! Custom settings a session sets: `pg_settings` hides every dotted name
//! (`app.tenant`), so the names are learned from the session's own statements —
//! `SET [SESSION | LOCAL] a.b ...`, `RESET a.b` and `set_config('a.b', ...)` in the
//! text of Query and Parse messages — and their values are read back by name when
//! the session moves. A false match (the words inside a string literal) only adds a
//! name whose value reads back as unset.

/// How many names one session may teach the proxy (a bound on its memory).
pub const MAX_NAMES: usize = 64;
const MAX_NAME_LEN: usize = 128;

fn ident_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80
}

fn word_at(sql: &[u8], i: usize, word: &[u8]) -> bool {
    sql.len() >= i + word.len()
        && sql[i..i + word.len()].eq_ignore_ascii_case(word)
        && (i == 0 || !ident_byte(sql[i - 1]))
        && sql.get(i + word.len()).is_none_or(|b| !ident_byte(*b))
}

fn skip_space(sql: &[u8], mut i: usize) -> usize {
    while i < sql.len() && sql[i].is_ascii_whitespace() {
        i += 1;
    }
    i
}

fn remember(out: &mut Vec<Box<str>>, name: String) {
    if name.contains('.') && name.len() <= MAX_NAME_LEN && out.len() < MAX_NAMES && !out.iter().any(|n| **n == *name) {
        out.push(name.into_boxed_str());
    }
}

/// A possibly quoted, dotted name at `i`, as PostgreSQL folds it.
fn dotted_name(sql: &[u8], mut i: usize) -> Option<String> {
    let mut name = String::new();
    loop {
        if sql.get(i) == Some(&b'"') {
            let mut part = Vec::new();
            i += 1;
            loop {
                match sql.get(i)? {
                    b'"' if sql.get(i + 1) == Some(&b'"') => {
                        part.push(b'"');
                        i += 2;
                    }
                    b'"' => {
                        i += 1;
                        break;
                    }
                    b => {
                        part.push(*b);
                        i += 1;
                    }
                }
            }
            name.push_str(std::str::from_utf8(&part).ok()?);
        } else {
            let start = i;
            while i < sql.len() && ident_byte(sql[i]) {
                i += 1;
            }
            if i == start {
                return None;
            }
            name.push_str(&std::str::from_utf8(&sql[start..i]).ok()?.to_lowercase());
        }
        if sql.get(i) == Some(&b'.') {
            name.push('.');
            i += 1;
        } else {
            return Some(name);
        }
    }
}

/// A string literal's text at `i` ('...' with '' escapes).
fn literal(sql: &[u8], mut i: usize) -> Option<String> {
    if sql.get(i) != Some(&b'\'') {
        return None;
    }
    i += 1;
    let mut text = Vec::new();
    loop {
        match sql.get(i)? {
            b'\'' if sql.get(i + 1) == Some(&b'\'') => {
                text.push(b'\'');
                i += 2;
            }
            b'\'' => return String::from_utf8(text).ok().map(|s| s.to_lowercase()),
            b => {
                text.push(*b);
                i += 1;
            }
        }
    }
}

/// Adds to `out` the custom setting names `sql` may set.
pub fn custom_settings(sql: &[u8], out: &mut Vec<Box<str>>) {
    let mut i = 0;
    while i < sql.len() {
        let b = sql[i] | 0x20;
        if b == b's' && word_at(sql, i, b"set_config") {
            let j = skip_space(sql, i + 10);
            if sql.get(j) == Some(&b'(') {
                if let Some(name) = literal(sql, skip_space(sql, j + 1)) {
                    remember(out, name);
                }
            }
            i += 10;
        } else if (b == b's' && word_at(sql, i, b"set")) || (b == b'r' && word_at(sql, i, b"reset")) {
            let mut j = skip_space(sql, i + if b == b's' { 3 } else { 5 });
            for scope in [&b"session"[..], b"local"] {
                if word_at(sql, j, scope) {
                    j = skip_space(sql, j + scope.len());
                }
            }
            if let Some(name) = dotted_name(sql, j) {
                remember(out, name);
            }
            i += 3;
        } else {
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn learn(sql: &str) -> Vec<String> {
        let mut out = Vec::new();
        custom_settings(sql.as_bytes(), &mut out);
        out.into_iter().map(String::from).collect()
    }

    #[test]
    fn dotted_names_are_learned_from_set_reset_and_set_config() {
        assert_eq!(learn("SET app.tenant = '7'; set Local App.User TO 3"), vec!["app.tenant", "app.user"]);
        assert_eq!(learn("RESET \"My\".x"), vec!["My.x"]);
        assert_eq!(learn("SELECT set_config( 'App.Tenant', $1, false)"), vec!["app.tenant"]);
        assert_eq!(learn("SET SESSION work_mem = '4MB'; UPDATE t SET a.b = 1"), vec!["a.b"], "a false match only costs a read-back");
        assert!(learn("UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2").is_empty());
        assert!(learn("SELECT offset, reset_at FROM settings").is_empty());
    }
}
