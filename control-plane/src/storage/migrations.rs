//! Each backend's schema: the `.sql` files of `control-plane/migrations/<backend>/`, applied in
//! order. A database records the number of files it has applied in `schema_version`; a start
//! applies the ones after it, in one transaction.
//!
//! A file once released is never edited: a change is a new file, `000N_<what>.sql`, in both
//! directories (each in its own dialect), and `tests/schema_parity.rs` checks that the two
//! backends still agree.

/// Entry `i` takes a SQLite database from version `i` to `i + 1`.
pub(crate) const SQLITE: &[&str] = &[
    include_str!("../../migrations/sqlite/0001_initial.sql"),
    include_str!("../../migrations/sqlite/0002_commit_is_the_only_write.sql"),
    include_str!("../../migrations/sqlite/0003_same_keys_as_postgres.sql"),
    include_str!("../../migrations/sqlite/0004_idempotency_retention.sql"),
    include_str!("../../migrations/sqlite/0005_traces_scoped_by_tenant.sql"),
    include_str!("../../migrations/sqlite/0006_forward_deliveries.sql"),
    include_str!("../../migrations/sqlite/0007_fallback_repairs.sql"),
    include_str!("../../migrations/sqlite/0008_billing_reports.sql"),
    include_str!("../../migrations/sqlite/0009_one_unique_key_per_commit.sql"),
];

/// Entry `i` takes a PostgreSQL schema from version `i` to `i + 1`.
pub(crate) const POSTGRES: &[&str] = &[
    include_str!("../../migrations/postgres/0001_initial.sql"),
    include_str!("../../migrations/postgres/0002_expect_rows.sql"),
    include_str!("../../migrations/postgres/0003_commit_is_the_only_write.sql"),
    include_str!("../../migrations/postgres/0004_idempotency_retention.sql"),
    include_str!("../../migrations/postgres/0005_traces_scoped_by_tenant.sql"),
    include_str!("../../migrations/postgres/0006_forward_deliveries.sql"),
    include_str!("../../migrations/postgres/0007_fallback_repairs.sql"),
    include_str!("../../migrations/postgres/0008_billing_reports.sql"),
    include_str!("../../migrations/postgres/0009_one_unique_key_per_commit.sql"),
];

#[cfg(test)]
mod tests {
    use super::*;

    /// A file that is not listed would never run; one listed out of order would run at the
    /// wrong version.
    fn assert_lists_every_file(backend: &str, listed: &[&str]) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("migrations")
            .join(backend);
        let mut files: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        files.sort();
        assert_eq!(files.len(), listed.len(), "{backend}: {files:?}");
        for (i, (file, text)) in files.iter().zip(listed).enumerate() {
            assert!(
                file.starts_with(&format!("{:04}_", i + 1)) && file.ends_with(".sql"),
                "{backend}/{file} is not migration {}",
                i + 1
            );
            let on_disk = std::fs::read_to_string(dir.join(file)).unwrap();
            assert_eq!(&on_disk, text, "{backend}/{file} is listed at {}", i + 1);
        }
    }

    #[test]
    fn every_migration_file_is_listed_in_order() {
        assert_lists_every_file("sqlite", SQLITE);
        assert_lists_every_file("postgres", POSTGRES);
    }
}
