//! Sequences: logical replication does not copy them. One round trip per side:
//! read every sequence's last value on the source, set them all on the target.
//! Covers owned, standalone and identity sequences.

use anyhow::bail;
use tokio_postgres::Client;

pub async fn copy(src: &Client, dst: &Client, margin: i64) -> anyhow::Result<u64> {
    let row = src
        .query_one(
            "SELECT coalesce(array_agg(format('%I.%I', schemaname, sequencename)), '{}'), \
                    coalesce(array_agg(last_value), '{}'), coalesce(array_agg(max_value), '{}') \
             FROM pg_sequences WHERE last_value IS NOT NULL",
            &[],
        )
        .await?;
    let names: Vec<String> = row.get(0);
    let values: Vec<i64> = row.get(1);
    let maxes: Vec<i64> = row.get(2);
    for ((name, value), max) in names.iter().zip(&values).zip(&maxes) {
        match value.checked_add(margin) {
            Some(v) if v <= *max => {}
            _ => bail!("sequence {name}: {value} + sequence_margin {margin} is past its max_value {max}"),
        }
    }
    if names.is_empty() {
        return Ok(0);
    }
    let set: i64 = dst
        .query_one("SELECT count(setval(s::regclass, v + $3, true)) FROM unnest($1::text[], $2::int8[]) t(s, v)", &[&names, &values, &margin])
        .await?
        .get(0);
    Ok(set as u64)
}
