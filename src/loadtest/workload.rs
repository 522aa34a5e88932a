//! What each load-test client runs: the built-in workloads and SQL files, in simple,
//! extended or prepared mode.

use std::sync::Arc;

use rand::Rng;
use tokio_postgres::{Client, Statement};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Simple query protocol, values inline.
    Simple,
    /// Extended protocol, each statement parsed anew.
    Extended,
    /// Extended protocol, statements prepared once per connection.
    Prepared,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Workload {
    /// Accounts updated and read, an order inserted, in one transaction.
    Tpcb,
    /// One primary-key read.
    Select,
    /// The file's statements, as one iteration.
    File(Arc<Vec<String>>),
}

impl Workload {
    pub fn parse(text: &str) -> anyhow::Result<Workload> {
        match text {
            "tpcb" => Ok(Workload::Tpcb),
            "select" => Ok(Workload::Select),
            path => {
                let sql = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("--workload {path}: {e}"))?;
                let statements: Vec<String> = crate::session::migrate::split_statements(sql.as_bytes()).into_iter().map(|s| String::from_utf8_lossy(s).into_owned()).collect();
                if statements.is_empty() {
                    anyhow::bail!("--workload {path}: no statements");
                }
                Ok(Workload::File(Arc::new(statements)))
            }
        }
    }

    pub fn name(&self) -> String {
        match self {
            Workload::Tpcb => "tpcb".into(),
            Workload::Select => "select".into(),
            Workload::File(_) => "file".into(),
        }
    }

    /// Built-in workloads write rows the lost-write check can find.
    pub fn checks_writes(&self) -> bool {
        *self == Workload::Tpcb
    }
}

pub const ACCOUNTS: i32 = 10_000;

/// The tables the built-in workloads use.
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS loadtest_accounts (aid int PRIMARY KEY, abalance int NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS loadtest_orders (id bigserial PRIMARY KEY, run text NOT NULL, client int NOT NULL, seq bigint NOT NULL, UNIQUE (run, client, seq));
";

pub fn fill_accounts() -> String {
    format!("INSERT INTO loadtest_accounts (aid) SELECT g FROM generate_series(1, {ACCOUNTS}) g ON CONFLICT DO NOTHING")
}

const UPDATE: &str = "UPDATE loadtest_accounts SET abalance = abalance + $1 WHERE aid = $2";
const READ: &str = "SELECT abalance FROM loadtest_accounts WHERE aid = $1";
const ORDER: &str = "INSERT INTO loadtest_orders (run, client, seq) VALUES ($1, $2, $3)";

/// One client's prepared statements (prepared mode).
pub struct Prepared {
    update: Statement,
    read: Statement,
    order: Statement,
}

pub async fn prepare(client: &Client, mode: Mode) -> Result<Option<Prepared>, tokio_postgres::Error> {
    if mode != Mode::Prepared {
        return Ok(None);
    }
    Ok(Some(Prepared { update: client.prepare(UPDATE).await?, read: client.prepare(READ).await?, order: client.prepare(ORDER).await? }))
}

/// Runs one iteration; `Ok(true)` when it committed a row for the lost-write check.
pub async fn run_once(client: &Client, mode: Mode, workload: &Workload, prepared: Option<&Prepared>, run: &str, id: i32, seq: i64) -> Result<bool, tokio_postgres::Error> {
    let (aid, delta) = {
        let mut rng = rand::thread_rng();
        (rng.gen_range(1..=ACCOUNTS), rng.gen_range(-5000..=5000))
    };
    match (workload, mode, prepared) {
        (Workload::Select, Mode::Simple, _) => {
            client.simple_query(&format!("SELECT abalance FROM loadtest_accounts WHERE aid = {aid}")).await?;
            Ok(false)
        }
        (Workload::Select, _, Some(p)) => client.query_one(&p.read, &[&aid]).await.map(|_| false),
        (Workload::Select, _, None) => client.query_one(READ, &[&aid]).await.map(|_| false),
        (Workload::Tpcb, Mode::Simple, _) => {
            let run = run.replace('\'', "''");
            client
                .simple_query(&format!(
                    "BEGIN; UPDATE loadtest_accounts SET abalance = abalance + {delta} WHERE aid = {aid}; \
                     SELECT abalance FROM loadtest_accounts WHERE aid = {aid}; \
                     INSERT INTO loadtest_orders (run, client, seq) VALUES ('{run}', {id}, {seq}); COMMIT"
                ))
                .await?;
            Ok(true)
        }
        (Workload::Tpcb, _, p) => {
            client.execute("BEGIN", &[]).await?;
            let body = async {
                match p {
                    Some(p) => {
                        client.execute(&p.update, &[&delta, &aid]).await?;
                        client.query_one(&p.read, &[&aid]).await?;
                        client.execute(&p.order, &[&run, &id, &seq]).await?;
                    }
                    None => {
                        client.execute(UPDATE, &[&delta, &aid]).await?;
                        client.query_one(READ, &[&aid]).await?;
                        client.execute(ORDER, &[&run, &id, &seq]).await?;
                    }
                }
                client.execute("COMMIT", &[]).await
            }
            .await;
            if body.is_err() {
                let _ = client.batch_execute("ROLLBACK").await;
            }
            body.map(|_| true)
        }
        (Workload::File(statements), Mode::Simple, _) => {
            for s in statements.iter() {
                client.simple_query(s).await?;
            }
            Ok(false)
        }
        (Workload::File(statements), _, _) => {
            for s in statements.iter() {
                client.execute(s.as_str(), &[]).await?;
            }
            Ok(false)
        }
    }
}
