//! Sequences: logical replication does not copy them.
//!
//! Read every sequence's position on the source, set them all on the target in one
//! statement. Covers owned, standalone and identity sequences, ascending and
//! descending ones, and ones never called (`is_called = false`: `pg_sequences`
//! shows no last_value for them, so they are read from the relation itself). A
//! sequence the admin user cannot read refuses the cutover by name, and a sequence
//! on the target that is already past the source's position is left alone: a copy
//! never moves a sequence backwards.

use tokio_postgres::Client;

use super::CutoverError;
use crate::session::migrate::{quote_ident, quote_literal};

/// One sequence's position on the source, as the target should continue it.
#[derive(Debug, Clone, PartialEq)]
pub struct Position {
    pub name: String,
    /// The value nextval() returns next on the target, and whether the sequence
    /// is exhausted (then it is set to its bound, called).
    pub value: i64,
    pub called: bool,
    /// For the never-backwards comparison on the target.
    pub next: i128,
}

/// Where the target continues a sequence whose next value on the source is `next`.
pub fn continue_at(name: &str, next: i128, increment: i64, min: i64, max: i64, margin: i64) -> Result<Position, CutoverError> {
    let step = if increment > 0 { margin as i128 } else { -(margin as i128) };
    let want = next + step;
    let name = name.to_string();
    if (min as i128..=max as i128).contains(&want) {
        return Ok(Position { name, value: want as i64, called: false, next: want });
    }
    // Exhausted on the source already: the target is exhausted the same way.
    if !(min as i128..=max as i128).contains(&next) {
        let bound = if increment > 0 { max } else { min };
        return Ok(Position { name, value: bound, called: true, next });
    }
    Err(CutoverError::Refused(format!("sequence {name}: its next value {next} moved by sequence_margin {margin} is past its bounds [{min}, {max}]")))
}

/// Reads every sequence of the source's database.
pub async fn read(src: &Client, margin: i64) -> Result<Vec<Position>, CutoverError> {
    let rows = src
        .query(
            "SELECT format('%I.%I', schemaname, sequencename), increment_by, min_value, max_value, last_value, \
                    has_sequence_privilege(format('%I.%I', schemaname, sequencename), 'SELECT') \
             FROM pg_sequences ORDER BY 1",
            &[],
        )
        .await?;
    let unreadable: Vec<String> = rows.iter().filter(|r| !r.get::<_, bool>(5)).map(|r| r.get(0)).collect();
    if !unreadable.is_empty() {
        return Err(CutoverError::Refused(format!("the admin user cannot read these sequences on the source, so they cannot be copied: {}", unreadable.join(", "))));
    }
    // Never called: last_value NULL in the view; the relation has the raw value.
    let never: Vec<String> = rows.iter().filter(|r| r.get::<_, Option<i64>>(4).is_none()).map(|r| r.get(0)).collect();
    let mut raw = std::collections::HashMap::new();
    if !never.is_empty() {
        let sql: Vec<String> = never.iter().map(|n| format!("SELECT {}::text, last_value, is_called FROM {n}", quote_literal(n))).collect();
        for r in src.query(&sql.join(" UNION ALL "), &[]).await? {
            raw.insert(r.get::<_, String>(0), (r.get::<_, i64>(1), r.get::<_, bool>(2)));
        }
    }
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        let name: String = r.get(0);
        let (inc, min, max): (i64, i64, i64) = (r.get(1), r.get(2), r.get(3));
        let next = match r.get::<_, Option<i64>>(4) {
            Some(v) => v as i128 + inc as i128,
            None => match raw.get(&name) {
                Some((v, true)) => *v as i128 + inc as i128,
                Some((v, false)) => *v as i128,
                None => return Err(CutoverError::Database(format!("sequence {name} vanished while it was read"))),
            },
        };
        out.push(continue_at(&name, next, inc, min, max, margin)?);
    }
    Ok(out)
}

/// Sets the target's sequences to continue where the source's stopped, in one
/// statement (never backwards: a sequence already further on the target stays).
/// Sequences the admin user may not set (a managed service's admin without the
/// owner's rights) are set as their owner (`SET ROLE`), one statement per owner.
pub async fn apply(dst: &Client, positions: &[Position], rehearse: bool) -> Result<u64, CutoverError> {
    let (mut set, theirs) = apply_here(dst, positions, rehearse).await?;
    // Only where the admin user lacks the rights: one more statement per owner.
    let mut by_owner: std::collections::BTreeMap<String, Vec<Position>> = std::collections::BTreeMap::new();
    for (name, owner) in theirs {
        if let Some(p) = positions.iter().find(|p| p.name == name) {
            by_owner.entry(owner).or_default().push(p.clone());
        }
    }
    for (owner, theirs) in &by_owner {
        dst.batch_execute(&format!("SET ROLE {}", quote_ident(owner))).await.map_err(|e| {
            CutoverError::Refused(format!(
                "sequences owned by {owner} ({}) cannot be set on the target: the admin user may not set them and cannot SET ROLE {owner} ({}); GRANT {owner} TO the admin user",
                theirs.iter().map(|p| p.name.as_str()).collect::<Vec<_>>().join(", "),
                super::control::describe(&e)
            ))
        })?;
        let done = apply_here(dst, theirs, rehearse).await;
        dst.batch_execute("RESET ROLE").await?;
        let (n, left) = done?;
        if !left.is_empty() {
            return Err(CutoverError::Refused(format!("even as {owner}, these sequences cannot be set on the target: {}", left.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", "))));
        }
        set += n;
    }
    Ok(set)
}

/// One statement: sets what the current role may set; returns how many it set and
/// the sequences (with their owners) it may not.
async fn apply_here(dst: &Client, positions: &[Position], rehearse: bool) -> Result<(u64, Vec<(String, String)>), CutoverError> {
    if positions.is_empty() {
        return Ok((0, Vec::new()));
    }
    let names: Vec<&str> = positions.iter().map(|p| p.name.as_str()).collect();
    let values: Vec<i64> = positions.iter().map(|p| p.value).collect();
    let called: Vec<bool> = positions.iter().map(|p| p.called).collect();
    let next: Vec<String> = positions.iter().map(|p| p.next.to_string()).collect();
    let row = dst
        .query_one(
            "WITH t AS (SELECT * FROM unnest($1::text[], $2::int8[], $3::bool[], $4::text[]) t(s, v, called, next)), \
             m AS (SELECT t.*, q.increment_by AS inc, coalesce(q.last_value::numeric + q.increment_by, q.start_value) AS here, \
                          has_sequence_privilege(to_regclass(t.s), 'UPDATE') AND has_sequence_privilege(to_regclass(t.s), 'SELECT') AS mine, \
                          q.sequenceowner::text AS owner \
                   FROM t LEFT JOIN pg_sequences q ON format('%I.%I', q.schemaname, q.sequencename) = t.s) \
             SELECT coalesce(array_agg(s) FILTER (WHERE inc IS NULL), '{}'), \
                    count(CASE WHEN $5 THEN v ELSE setval(s::regclass, v, called) END) FILTER (WHERE inc IS NOT NULL AND mine AND ((inc > 0 AND here < next::numeric) OR (inc < 0 AND here > next::numeric))), \
                    coalesce(array_agg(s) FILTER (WHERE inc IS NOT NULL AND NOT mine), '{}'), \
                    coalesce(array_agg(owner) FILTER (WHERE inc IS NOT NULL AND NOT mine), '{}') \
             FROM m",
            &[&names, &values, &called, &next, &rehearse],
        )
        .await?;
    let missing: Vec<String> = row.get(0);
    if !missing.is_empty() {
        return Err(CutoverError::Refused(format!("sequences missing on the target: {}", missing.join(", "))));
    }
    let theirs: Vec<String> = row.get(2);
    let owners: Vec<String> = row.get(3);
    Ok((row.get::<_, i64>(1) as u64, theirs.into_iter().zip(owners).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ascending_descending_and_exhausted_sequences_continue_where_they_should() {
        let p = continue_at("a", 11, 1, 1, 100, 5).unwrap();
        assert_eq!((p.value, p.called), (16, false));
        let p = continue_at("d", -11, -1, -100, -1, 5).unwrap();
        assert_eq!((p.value, p.called), (-16, false), "a descending sequence moves down by the margin");
        let p = continue_at("x", 101, 1, 1, 100, 0).unwrap();
        assert_eq!((p.value, p.called), (100, true), "exhausted stays exhausted");
        assert!(continue_at("m", 99, 1, 1, 100, 5).is_err(), "the margin may not push a sequence past its bound");
    }
}
