//! The SQLite and PostgreSQL schemas agree. Each backend migrates a fresh database with its
//! own files (`control-plane/migrations/<backend>/`); this test reads both back from the
//! databases' catalogs and compares, table by table: the columns (name, type family,
//! nullability, default, generated or not), the primary key, the indexes (unique constraints
//! and unique indexes alike, by their columns and predicate), the check constraints and the
//! triggers (timing, event, row or statement).
//!
//! Compared as they mean, not as they are spelled:
//! - names of constraints, indexes and triggers are not compared (a UNIQUE gets a generated
//!   name in each), nor the order of columns (every statement names its columns);
//! - a type is its family: SQLite's affinity rules on the declared type (`INT` in it: integer;
//!   `CHAR`, `CLOB`, `TEXT`: text), PostgreSQL's integers of every width are integer;
//! - SQLite's `INTEGER PRIMARY KEY` (the rowid) is NOT NULL and generated, as PostgreSQL's
//!   identity column;
//! - an expression (check, default, index predicate) is compared lower-cased, without
//!   PostgreSQL's casts (`'fu'::text`), with its `= ANY (ARRAY[…])` read as `IN (…)`, and
//!   without blanks and parentheses;
//! - what a trigger does is not compared (PL/pgSQL and SQLite's `RAISE` differ), nor
//!   PostgreSQL's functions (SQLite has none).
//!
//! Beyond that, a difference fails the test unless [`ALLOWED`] names it.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::{Backend, TestDb};
use signet_control_plane::storage::{PostgresStorage, SqliteStorage};

/// Differences between the backends that are meant, each as the test words it, with why.
/// An entry that no longer occurs fails the test too, so that the list stays true.
const ALLOWED: &[(&str, &str)] = &[];

#[derive(Debug, Clone, PartialEq, Eq)]
struct Column {
    family: String,
    not_null: bool,
    default: Option<String>,
    generated: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Index {
    unique: bool,
    columns: Vec<String>,
    predicate: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Trigger {
    timing: String,
    event: String,
    orientation: String,
}

#[derive(Debug, Default)]
struct Table {
    columns: BTreeMap<String, Column>,
    primary_key: Vec<String>,
    /// Every index but the primary key's.
    indexes: BTreeSet<Index>,
    checks: BTreeSet<String>,
    triggers: BTreeSet<Trigger>,
}

type Schema = BTreeMap<String, Table>;

/// Lower-cased, without casts, `= any (array[…])` as `in (…)`, without blanks and parentheses.
fn normalize(expression: &str) -> String {
    let lower = expression.to_lowercase();
    let mut uncast = String::with_capacity(lower.len());
    let mut rest = lower.as_str();
    while let Some(at) = rest.find("::") {
        uncast.push_str(&rest[..at]);
        rest =
            rest[at + 2..].trim_start_matches(|c: char| c.is_alphanumeric() || "_[]".contains(c));
    }
    uncast.push_str(rest);
    uncast
        .replace("= any (array[", " in (")
        .replace("])", ")")
        .chars()
        .filter(|c| !c.is_whitespace() && *c != '(' && *c != ')')
        .collect()
}

/// SQLite's affinity of a declared type (https://sqlite.org/datatype3.html, 3.1).
fn sqlite_family(declared: &str) -> String {
    let t = declared.to_uppercase();
    let family = if t.contains("INT") {
        "integer"
    } else if t.contains("CHAR") || t.contains("CLOB") || t.contains("TEXT") {
        "text"
    } else if t.contains("BLOB") || t.is_empty() {
        "blob"
    } else if t.contains("REAL") || t.contains("FLOA") || t.contains("DOUB") {
        "real"
    } else {
        "numeric"
    };
    family.into()
}

fn postgres_family(data_type: &str) -> String {
    match data_type {
        "smallint" | "integer" | "bigint" => "integer",
        "text" | "character varying" | "character" => "text",
        "bytea" => "blob",
        "real" | "double precision" => "real",
        "numeric" => "numeric",
        other => other,
    }
    .into()
}

/// The expressions of the `CHECK (…)` clauses of a `CREATE TABLE` statement.
fn check_clauses(create_table: &str) -> Vec<String> {
    let upper = create_table.to_uppercase();
    let bytes = upper.as_bytes();
    let is_word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut clauses = Vec::new();
    let mut from = 0;
    while let Some(found) = upper[from..].find("CHECK") {
        let start = from + found;
        from = start + "CHECK".len();
        let alone = (start == 0 || !is_word(bytes[start - 1]))
            && bytes.get(from).is_none_or(|b| !is_word(*b));
        let open = from + (upper[from..].len() - upper[from..].trim_start().len());
        if !alone || bytes.get(open) != Some(&b'(') {
            continue;
        }
        let (mut depth, mut quoted) = (0, false);
        for (i, b) in bytes.iter().enumerate().skip(open) {
            match b {
                b'\'' => quoted = !quoted,
                b'(' if !quoted => depth += 1,
                b')' if !quoted => {
                    depth -= 1;
                    if depth == 0 {
                        clauses.push(normalize(&create_table[open..=i]));
                        from = i;
                        break;
                    }
                }
                _ => {}
            }
        }
    }
    clauses
}

/// Timing, event and orientation of a SQLite `CREATE TRIGGER` (always FOR EACH ROW).
fn sqlite_trigger(create_trigger: &str) -> Trigger {
    let words: Vec<String> = create_trigger
        .split_whitespace()
        .map(str::to_uppercase)
        .collect();
    let at = words
        .iter()
        .position(|w| ["BEFORE", "AFTER", "INSTEAD"].contains(&w.as_str()))
        .unwrap_or_else(|| panic!("no timing in {create_trigger}"));
    let (timing, event) = if words[at] == "INSTEAD" {
        ("INSTEAD OF".to_owned(), words[at + 2].clone())
    } else {
        (words[at].clone(), words[at + 1].clone())
    };
    Trigger {
        timing,
        event,
        orientation: "ROW".into(),
    }
}

fn sqlite_schema(path: &std::path::Path) -> Schema {
    let conn = rusqlite::Connection::open(path).unwrap();
    let strings = |sql: &str, arg: &str| -> Vec<(String, Option<String>)> {
        conn.prepare(sql)
            .unwrap()
            .query_map([arg], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    let tables: Vec<(String, String)> = conn
        .prepare(
            "SELECT name, sql FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite_%'",
        )
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let mut schema = Schema::new();
    for (name, sql) in tables {
        let mut table = Table::default();
        let columns: Vec<(String, String, bool, Option<String>, i64)> = conn
            .prepare("SELECT name, type, \"notnull\", dflt_value, pk FROM pragma_table_info(?1)")
            .unwrap()
            .query_map([&name], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let mut key: Vec<(i64, String)> = columns
            .iter()
            .filter(|c| c.4 > 0)
            .map(|c| (c.4, c.0.clone()))
            .collect();
        key.sort();
        table.primary_key = key.into_iter().map(|(_, c)| c).collect();
        for (column, declared, not_null, default, pk) in &columns {
            let rowid =
                *pk > 0 && table.primary_key.len() == 1 && declared.eq_ignore_ascii_case("INTEGER");
            let column_info = Column {
                family: sqlite_family(declared),
                not_null: *not_null || rowid,
                default: default.as_deref().map(normalize),
                generated: rowid,
            };
            table.columns.insert(column.clone(), column_info);
        }
        let indexes: Vec<(String, bool, String)> = conn
            .prepare("SELECT name, \"unique\", origin FROM pragma_index_list(?1)")
            .unwrap()
            .query_map([&name], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        for (index, unique, origin) in indexes.into_iter().filter(|i| i.2 != "pk") {
            let columns = strings(
                "SELECT name, NULL FROM pragma_index_info(?1) ORDER BY seqno",
                &index,
            );
            let create = strings(
                "SELECT coalesce(sql, ''), NULL FROM sqlite_schema WHERE name = ?1",
                &index,
            );
            let create = create.first().map_or("", |c| c.0.as_str());
            let predicate = create
                .to_uppercase()
                .find(" WHERE ")
                .map(|at| normalize(&create[at + " WHERE ".len()..]));
            assert!(
                origin != "c" || !create.is_empty(),
                "{index}: no CREATE INDEX"
            );
            table.indexes.insert(Index {
                unique,
                columns: columns.into_iter().map(|c| c.0).collect(),
                predicate,
            });
        }
        table.checks = check_clauses(&sql).into_iter().collect();
        for (create, _) in strings(
            "SELECT sql, NULL FROM sqlite_schema WHERE type = 'trigger' AND tbl_name = ?1",
            &name,
        ) {
            table.triggers.insert(sqlite_trigger(&create));
        }
        schema.insert(name, table);
    }
    schema
}

async fn postgres_schema(client: &tokio_postgres::Client) -> Schema {
    let schema_name: String = client
        .query_one("SELECT current_schema()::text", &[])
        .await
        .unwrap()
        .get(0);
    let schema_name = &schema_name;
    let rows = |sql: &'static str| async move { client.query(sql, &[schema_name]).await.unwrap() };
    let mut schema = Schema::new();
    for row in rows(
        "SELECT table_name::text FROM information_schema.tables
         WHERE table_schema = $1 AND table_type = 'BASE TABLE'",
    )
    .await
    {
        schema.insert(row.get(0), Table::default());
    }
    for row in rows(
        "SELECT table_name::text, column_name::text, data_type::text, is_nullable::text,
                column_default::text, is_identity::text
         FROM information_schema.columns WHERE table_schema = $1",
    )
    .await
    {
        let default: Option<String> = row.get(4);
        let generated = row.get::<_, String>(5) == "YES"
            || default
                .as_deref()
                .is_some_and(|d| d.starts_with("nextval("));
        let column = Column {
            family: postgres_family(row.get(2)),
            not_null: row.get::<_, String>(3) == "NO",
            default: default.filter(|_| !generated).as_deref().map(normalize),
            generated,
        };
        let name: String = row.get(0);
        if let Some(table) = schema.get_mut(&name) {
            table.columns.insert(row.get(1), column);
        }
    }
    for row in rows(
        "SELECT t.relname::text, i.indisprimary, i.indisunique,
                ARRAY(SELECT a.attname::text
                      FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k (attnum, ord)
                      JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = k.attnum
                      ORDER BY k.ord) AS columns,
                pg_get_expr(i.indpred, i.indrelid) AS predicate
         FROM pg_index i
         JOIN pg_class t ON t.oid = i.indrelid
         JOIN pg_namespace n ON n.oid = t.relnamespace
         WHERE n.nspname = $1",
    )
    .await
    {
        let name: String = row.get(0);
        let Some(table) = schema.get_mut(&name) else {
            continue;
        };
        let columns: Vec<String> = row.get(3);
        if row.get::<_, bool>(1) {
            table.primary_key = columns;
        } else {
            table.indexes.insert(Index {
                unique: row.get(2),
                columns,
                predicate: row.get::<_, Option<&str>>(4).map(normalize),
            });
        }
    }
    for row in rows(
        "SELECT t.relname::text, pg_get_constraintdef(c.oid)
         FROM pg_constraint c
         JOIN pg_class t ON t.oid = c.conrelid
         JOIN pg_namespace n ON n.oid = t.relnamespace
         WHERE n.nspname = $1 AND c.contype = 'c'",
    )
    .await
    {
        let name: String = row.get(0);
        let definition: &str = row.get(1);
        let expression = definition.strip_prefix("CHECK ").unwrap_or(definition);
        if let Some(table) = schema.get_mut(&name) {
            table.checks.insert(normalize(expression));
        }
    }
    for row in rows(
        "SELECT event_object_table::text, action_timing::text, event_manipulation::text,
                action_orientation::text
         FROM information_schema.triggers WHERE trigger_schema = $1",
    )
    .await
    {
        let name: String = row.get(0);
        if let Some(table) = schema.get_mut(&name) {
            table.triggers.insert(Trigger {
                timing: row.get(1),
                event: row.get(2),
                orientation: row.get(3),
            });
        }
    }
    schema
}

/// Every difference, worded `<table>: …`.
fn differences(sqlite: &Schema, postgres: &Schema) -> Vec<String> {
    fn one_sided<T: Ord + std::fmt::Debug>(
        table: &str,
        what: &str,
        sqlite: &BTreeSet<T>,
        postgres: &BTreeSet<T>,
        out: &mut Vec<String>,
    ) {
        for only in sqlite.difference(postgres) {
            out.push(format!("{table}: {what} {only:?} only in SQLite"));
        }
        for only in postgres.difference(sqlite) {
            out.push(format!("{table}: {what} {only:?} only in PostgreSQL"));
        }
    }
    let mut out = Vec::new();
    let names: BTreeSet<&String> = sqlite.keys().chain(postgres.keys()).collect();
    for name in names {
        let (s, p) = match (sqlite.get(name), postgres.get(name)) {
            (Some(s), Some(p)) => (s, p),
            (Some(_), None) => {
                out.push(format!("{name}: table only in SQLite"));
                continue;
            }
            (None, _) => {
                out.push(format!("{name}: table only in PostgreSQL"));
                continue;
            }
        };
        let columns: BTreeSet<&String> = s.columns.keys().chain(p.columns.keys()).collect();
        for column in columns {
            let (sc, pc) = (s.columns.get(column), p.columns.get(column));
            if sc != pc {
                out.push(format!(
                    "{name}: column {column}: SQLite {sc:?}, PostgreSQL {pc:?}"
                ));
            }
        }
        if s.primary_key != p.primary_key {
            out.push(format!(
                "{name}: primary key: SQLite {:?}, PostgreSQL {:?}",
                s.primary_key, p.primary_key
            ));
        }
        one_sided(name, "index", &s.indexes, &p.indexes, &mut out);
        one_sided(name, "check", &s.checks, &p.checks, &mut out);
        one_sided(name, "trigger", &s.triggers, &p.triggers, &mut out);
    }
    out
}

/// Both backends' schemas, each migrated by the backend from nothing. With `drift`, SQL run on
/// the SQLite database after its migrations.
async fn both_schemas(drift: &str) -> (Schema, Schema) {
    let sqlite_db = TestDb::new(Backend::Sqlite).await;
    let path = std::path::PathBuf::from(&sqlite_db.env["SP_DB_PATH"]);
    drop(SqliteStorage::open(&path).unwrap());
    if !drift.is_empty() {
        rusqlite::Connection::open(&path)
            .unwrap()
            .execute_batch(drift)
            .unwrap();
    }
    let sqlite = sqlite_schema(&path);

    let postgres_db = TestDb::new(Backend::Postgres).await;
    let url = &postgres_db.env["SP_POSTGRES_URL"];
    drop(PostgresStorage::connect(url, 1).await.unwrap());
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let task = tokio::spawn(connection);
    let postgres = postgres_schema(&client).await;
    drop(client);
    let _ = task.await;
    postgres_db.cleanup().await;
    (sqlite, postgres)
}

#[tokio::test]
async fn sqlite_and_postgres_have_the_same_schema() {
    let (sqlite, postgres) = both_schemas("").await;
    assert!(
        sqlite.contains_key("receipts") && sqlite.len() == postgres.len(),
        "{:?} / {:?}",
        sqlite.keys(),
        postgres.keys()
    );
    let found = differences(&sqlite, &postgres);
    let unexpected: Vec<&String> = found
        .iter()
        .filter(|d| !ALLOWED.iter().any(|(allowed, _)| allowed == d))
        .collect();
    let stale: Vec<&str> = ALLOWED
        .iter()
        .map(|(allowed, _)| *allowed)
        .filter(|allowed| !found.iter().any(|d| d == allowed))
        .collect();
    let list = |items: Vec<&str>| items.join("\n  ");
    assert!(
        unexpected.is_empty(),
        "the schemas differ (add a migration to the backend that lacks it):\n  {}",
        list(unexpected.iter().map(|d| d.as_str()).collect())
    );
    assert!(
        stale.is_empty(),
        "allowed differences that no longer occur (remove them from ALLOWED):\n  {}",
        list(stale)
    );
}

/// The comparison sees what a migration on one side only would change.
#[tokio::test]
async fn a_change_on_one_side_is_a_difference() {
    let (sqlite, postgres) = both_schemas(
        "ALTER TABLE receipts ADD COLUMN note TEXT;
         CREATE UNIQUE INDEX traces_tenant ON traces (tenant);
         CREATE INDEX ledger_month ON usage_ledger (month) WHERE vex > 0;
         CREATE TABLE extra (id INTEGER PRIMARY KEY, n INTEGER CHECK (n IN (1, 2)));
         CREATE TRIGGER no_new_keys AFTER INSERT ON signing_keys BEGIN SELECT 1; END;",
    )
    .await;
    let found = differences(&sqlite, &postgres);
    for expected in [
        "receipts: column note: SQLite Some(Column { family: \"text\", not_null: false, default: None, generated: false }), PostgreSQL None",
        "traces: index Index { unique: true, columns: [\"tenant\"], predicate: None } only in SQLite",
        "usage_ledger: index Index { unique: false, columns: [\"month\"], predicate: Some(\"vex>0\") } only in SQLite",
        "extra: table only in SQLite",
        "signing_keys: trigger Trigger { timing: \"AFTER\", event: \"INSERT\", orientation: \"ROW\" } only in SQLite",
    ] {
        assert!(found.iter().any(|d| d == expected), "{expected}\nnot in {found:#?}");
    }
    assert_eq!(found.len(), 5, "{found:#?}");
}

#[test]
fn expressions_compare_across_dialects() {
    assert_eq!(
        normalize("((meter = ANY (ARRAY['vex'::text, 'fu'::text])))"),
        normalize("meter IN ('vex', 'fu')")
    );
    assert_eq!(normalize("(state = 'pending'::text)"), "state='pending'");
    assert_ne!(normalize("units > 0"), normalize("units >= 0"));
    assert_eq!(
        check_clauses("CREATE TABLE t (a INTEGER CHECK (a > 0), checked TEXT, CHECK(a IN (1, 2)))"),
        ["a>0", "ain1,2"]
    );
}
