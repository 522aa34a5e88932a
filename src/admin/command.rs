//! The admin console's grammar: a tokenizer and a parser, not whitespace splitting.
//!
//! ```text
//! SHOW { STATUS | SESSIONS | BACKENDS | STATS | CUTOVER | FLEET }
//! PAUSE [ duration ]        duration: 500ms, 2s, '1.5s', 250 (milliseconds)
//! RESUME | RELOAD
//! CUTOVER [ target ] [ FORCE ] [ REHEARSE ]
//! CHECK [ target ] [ FORCE ]
//! ```
//! Keywords are case-insensitive; identifiers may be double-quoted; one trailing
//! semicolon is allowed.

use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Show(Show),
    Pause(Option<Duration>),
    Resume,
    Reload,
    Cutover { target: Option<String>, force: bool, rehearse: bool },
    Check { target: Option<String>, force: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Show {
    Status,
    Sessions,
    Backends,
    Stats,
    Cutover,
    Fleet,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Word(String),
    Quoted(String),
    Ident(String),
    Semicolon,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(pub String);

fn err<T>(m: impl Into<String>) -> Result<T, ParseError> {
    Err(ParseError(m.into()))
}

fn tokenize(text: &str) -> Result<Vec<Token>, ParseError> {
    let mut tokens = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            c if c.is_whitespace() => {
                chars.next();
            }
            ';' => {
                chars.next();
                tokens.push(Token::Semicolon);
            }
            '\'' | '"' => {
                chars.next();
                let mut s = String::new();
                loop {
                    match chars.next() {
                        Some(q) if q == c && chars.peek() == Some(&c) => {
                            chars.next();
                            s.push(c);
                        }
                        Some(q) if q == c => break,
                        Some(other) => s.push(other),
                        None => return err("unterminated quoted string"),
                    }
                }
                tokens.push(if c == '\'' { Token::Quoted(s) } else { Token::Ident(s) });
            }
            c if c.is_alphanumeric() || c == '_' || c == '.' || c == '-' => {
                let mut s = String::new();
                while let Some(&c) = chars.peek() {
                    if c.is_alphanumeric() || c == '_' || c == '.' || c == '-' {
                        s.push(c);
                        chars.next();
                    } else {
                        break;
                    }
                }
                tokens.push(Token::Word(s));
            }
            other => return err(format!("syntax error at or near \"{other}\"")),
        }
    }
    if tokens.last() == Some(&Token::Semicolon) {
        tokens.pop();
    }
    if tokens.contains(&Token::Semicolon) {
        return err("one command at a time");
    }
    Ok(tokens)
}

/// A duration with its unit: `500ms`, `2s`, `1.5s`, `1m`. A bare number is refused,
/// as in proxy.toml: "10" could mean seconds or milliseconds.
pub fn parse_duration(text: &str) -> Result<Duration, ParseError> {
    if text.trim().parse::<f64>().is_ok() {
        return err(format!("duration \"{text}\" has no unit: write it as 500ms, 2s or 1m"));
    }
    if let Some(secs) = text.strip_suffix('s').filter(|s| !s.ends_with('m')).and_then(|s| s.parse::<f64>().ok()) {
        if secs.is_finite() && secs >= 0.0 {
            return Ok(Duration::from_secs_f64(secs));
        }
    }
    humantime::parse_duration(text).or_else(|_| err(format!("invalid duration \"{text}\" (try 500ms or 2s)")))
}

fn keyword(t: &Token) -> Option<String> {
    match t {
        Token::Word(w) => Some(w.to_ascii_uppercase()),
        _ => None,
    }
}

pub fn parse(text: &str) -> Result<Command, ParseError> {
    let tokens = tokenize(text)?;
    let Some(first) = tokens.first() else { return err("empty command") };
    let rest = &tokens[1..];
    let verb = keyword(first).ok_or_else(|| ParseError(format!("syntax error at or near {first:?}")))?;
    let no_more = |n: usize| -> Result<(), ParseError> {
        match rest.get(n) {
            None => Ok(()),
            Some(t) => err(format!("unexpected {} after {verb}", describe(t))),
        }
    };
    match verb.as_str() {
        "SHOW" => {
            let what = rest.first().and_then(keyword).ok_or_else(|| ParseError("SHOW what? STATUS, SESSIONS, BACKENDS, STATS, CUTOVER or FLEET".into()))?;
            no_more(1)?;
            let show = match what.as_str() {
                "STATUS" => Show::Status,
                "SESSIONS" | "CLIENTS" => Show::Sessions,
                "BACKENDS" | "SERVERS" => Show::Backends,
                "STATS" => Show::Stats,
                "CUTOVER" => Show::Cutover,
                "FLEET" => Show::Fleet,
                other => return err(format!("unknown SHOW {other}: try STATUS, SESSIONS, BACKENDS, STATS, CUTOVER or FLEET")),
            };
            Ok(Command::Show(show))
        }
        "PAUSE" => {
            no_more(1)?;
            match rest.first() {
                None => Ok(Command::Pause(None)),
                Some(Token::Word(w) | Token::Quoted(w)) => Ok(Command::Pause(Some(parse_duration(w)?))),
                Some(t) => err(format!("PAUSE takes a duration, not {}", describe(t))),
            }
        }
        "RESUME" => no_more(0).map(|_| Command::Resume),
        "RELOAD" => no_more(0).map(|_| Command::Reload),
        "CUTOVER" | "CHECK" => {
            let mut target = None;
            let (mut force, mut rehearse) = (false, false);
            let options = if verb == "CUTOVER" { "FORCE and REHEARSE" } else { "FORCE" };
            for t in rest {
                match t {
                    Token::Word(w) if w.eq_ignore_ascii_case("force") && !force => force = true,
                    Token::Word(w) if w.eq_ignore_ascii_case("rehearse") && !rehearse && verb == "CUTOVER" => rehearse = true,
                    Token::Word(w) | Token::Ident(w) | Token::Quoted(w) if target.is_none() && !force && !rehearse => target = Some(w.clone()),
                    t => return err(format!("{verb} takes a backend name, then {options}; not {}", describe(t))),
                }
            }
            Ok(if verb == "CUTOVER" { Command::Cutover { target, force, rehearse } } else { Command::Check { target, force } })
        }
        other => err(format!("unknown command {other}: try SHOW, PAUSE, RESUME, RELOAD, CHECK or CUTOVER")),
    }
}

fn describe(t: &Token) -> String {
    match t {
        Token::Word(w) => format!("\"{w}\""),
        Token::Quoted(q) => format!("'{q}'"),
        Token::Ident(i) => format!("\"{i}\""),
        Token::Semicolon => "\";\"".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_whatever_their_case() {
        assert_eq!(parse("show status").unwrap(), Command::Show(Show::Status));
        assert_eq!(parse("SHOW Sessions;").unwrap(), Command::Show(Show::Sessions));
        assert_eq!(parse("pause").unwrap(), Command::Pause(None));
        assert_eq!(parse("PAUSE 2s").unwrap(), Command::Pause(Some(Duration::from_secs(2))));
        assert_eq!(parse("PAUSE '1.5s'").unwrap(), Command::Pause(Some(Duration::from_millis(1500))));
        assert!(parse("pause 250").is_err(), "a duration needs its unit");
        assert_eq!(parse("PAUSE 500ms").unwrap(), Command::Pause(Some(Duration::from_millis(500))));
        assert_eq!(parse("CUTOVER \"green\"").unwrap(), Command::Cutover { target: Some("green".into()), force: false, rehearse: false });
        assert_eq!(parse("cutover").unwrap(), Command::Cutover { target: None, force: false, rehearse: false });
        assert_eq!(parse("CUTOVER green force").unwrap(), Command::Cutover { target: Some("green".into()), force: true, rehearse: false });
        assert_eq!(parse("CUTOVER green REHEARSE").unwrap(), Command::Cutover { target: Some("green".into()), force: false, rehearse: true });
        assert_eq!(parse("CUTOVER rehearse").unwrap(), Command::Cutover { target: None, force: false, rehearse: true });
        assert!(parse("CHECK green rehearse").is_err());
        assert_eq!(parse("CHECK blue").unwrap(), Command::Check { target: Some("blue".into()), force: false });
        assert_eq!(parse("  resume ; ").unwrap(), Command::Resume);
    }

    #[test]
    fn malformed_commands_are_refused_with_a_reason() {
        for bad in ["", "SHOW", "SHOW nothing", "PAUSE soon", "PAUSE 1s 2s", "RESUME now", "DROP TABLE x", "SHOW STATUS; SHOW STATS", "PAUSE 'unterminated", "select 1 + 1", "PAUSE 500", "PAUSE '2.5'"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
