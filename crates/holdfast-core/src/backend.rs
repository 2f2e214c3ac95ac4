//! Which database engine holds the durable state.

named_variants! {
    /// The two engines the durable store runs on: SQLite, the embedded default (one file
    /// shared by every local process), and PostgreSQL, for a fleet.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub enum Backend {
        #[default]
        Sqlite => "sqlite",
        Postgres => "postgres",
    }
}

impl Backend {
    /// The engine a store URL names: `sqlite:…`, or `postgres://…` / `postgresql://…`.
    pub fn of_url(url: &str) -> Option<Backend> {
        if url.starts_with("sqlite:") {
            Some(Backend::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(Backend::Postgres)
        } else {
            None
        }
    }
}

/// Debian's PostgreSQL server tool directories, `/usr/lib/postgresql/<version>/bin`, newest
/// version first (Debian keeps the server's tools, `initdb`, `pg_ctl`, `pg_basebackup`…, off
/// `PATH`).
pub fn debian_postgres_bin_dirs() -> Vec<std::path::PathBuf> {
    let mut versions: Vec<(u32, std::path::PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            Some((version, e.path().join("bin")))
        })
        .collect();
    versions.sort();
    versions.into_iter().rev().map(|(_, dir)| dir).collect()
}

#[cfg(test)]
mod tests {
    use super::Backend;

    #[test]
    fn urls_name_their_engine() {
        assert_eq!(Backend::of_url("sqlite:/x/y.db"), Some(Backend::Sqlite));
        assert_eq!(
            Backend::of_url("postgresql://h/db"),
            Some(Backend::Postgres)
        );
        assert_eq!(Backend::of_url("postgres://h/db"), Some(Backend::Postgres));
        assert_eq!(Backend::of_url("mysql://h/db"), None);
    }
}
