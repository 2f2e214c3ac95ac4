//! Fresh, isolated databases for tests in any crate of the workspace (zero2prod's
//! `spawn_app` idea): every test gets its own SQLite file or its own Postgres database.
//!
//! Postgres comes from `DATABASE_URL`. Without it a Postgres test is skipped with a note,
//! except under `CI=true`, where a skip would hide a broken pipeline: there it panics.

use std::path::Path;

/// True when running under CI, where backend tests must not skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// A `sqlite:` URL for a new database file inside `dir`.
pub fn sqlite_url(dir: &Path) -> String {
    format!("sqlite:{}", dir.join("holdfast.sqlite").display())
}

/// A `postgres://` URL for a brand-new, empty database on the `DATABASE_URL` server, or
/// `None` (with a note on stderr) when no server is configured outside CI.
pub async fn fresh_postgres_url(test: &str) -> Option<String> {
    let Ok(admin_url) = std::env::var("DATABASE_URL") else {
        assert!(
            !in_ci(),
            "{test}: DATABASE_URL is not set, and CI=true forbids skipping a Postgres test"
        );
        eprintln!("{test}: skipped on Postgres (set DATABASE_URL to run it)");
        return None;
    };
    match create_database(&admin_url, "holdfast_test").await {
        Ok(url) => Some(url),
        Err(e) => panic!("{test}: DATABASE_URL is set but no test database could be created: {e}"),
    }
}

/// Creates an empty database named `<prefix>_<random>` on the server of `admin_url` and
/// returns its URL.
pub async fn create_database(admin_url: &str, prefix: &str) -> Result<String, sqlx::Error> {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(admin_url).await?;
    let name = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
    sqlx::Executor::execute(&mut conn, format!("CREATE DATABASE {name}").as_str()).await?;
    let _ = conn.close().await;
    Ok(replace_db_name(admin_url, &name))
}

/// Drops the database `name` on the server of `admin_url` (its sessions are terminated).
pub async fn drop_database(admin_url: &str, name: &str) -> Result<(), sqlx::Error> {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(admin_url).await?;
    let quoted = name.replace('"', "\"\"");
    sqlx::Executor::execute(
        &mut conn,
        format!("DROP DATABASE IF EXISTS \"{quoted}\" WITH (FORCE)").as_str(),
    )
    .await?;
    let _ = conn.close().await;
    Ok(())
}

/// Swaps the database name in a Postgres URL, keeping credentials, host and parameters.
pub fn replace_db_name(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let path_start = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    let mut out = format!("{}/{}", &base[..path_start], name);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn replaces_the_database_name_only() {
        use super::replace_db_name as r;
        assert_eq!(
            r("postgres://u:p@h:5432/test", "x"),
            "postgres://u:p@h:5432/x"
        );
        assert_eq!(
            r("postgres://h/test?sslmode=disable", "x"),
            "postgres://h/x?sslmode=disable"
        );
        assert_eq!(r("postgres://h:5432", "x"), "postgres://h:5432/x");
    }
}
