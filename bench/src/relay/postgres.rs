//! A scratch PostgreSQL database per run, created through the admin URL and dropped after.

use anyhow::{bail, Context};
use sqlx::{Connection, PgConnection};

/// The scratch database currently alive, so Ctrl-C can drop it too.
static LIVE: parking_lot::Mutex<Option<(String, String)>> = parking_lot::Mutex::new(None);

/// A database created for this run; call [`ScratchDb::drop_db`] when done.
pub struct ScratchDb {
    admin_url: String,
    name: String,
    /// The URL of the new database, for the relay.
    pub url: String,
}

impl ScratchDb {
    pub async fn create(admin_url: &str) -> anyhow::Result<Self> {
        let name = format!(
            "orly_bench_{}_{:08x}",
            std::process::id(),
            rand::random::<u32>()
        );
        let url = with_database(admin_url, &name)?;
        let mut conn = PgConnection::connect(admin_url)
            .await
            .with_context(|| format!("connecting to PostgreSQL at {}", redact(admin_url)))?;
        sqlx::query(&format!(r#"CREATE DATABASE "{name}""#))
            .execute(&mut conn)
            .await
            .with_context(|| format!("creating database {name}"))?;
        conn.close().await?;
        *LIVE.lock() = Some((admin_url.to_string(), name.clone()));
        Ok(Self {
            admin_url: admin_url.to_string(),
            name,
            url,
        })
    }

    pub async fn drop_db(self) -> anyhow::Result<()> {
        LIVE.lock().take();
        drop_database(&self.admin_url, &self.name).await
    }
}

/// Drops the scratch database left by an interrupted run, if any.
pub async fn drop_live() {
    let live = LIVE.lock().take();
    if let Some((admin, name)) = live {
        if let Err(e) = drop_database(&admin, &name).await {
            eprintln!("could not drop scratch database {name}: {e:#}");
        }
    }
}

async fn drop_database(admin_url: &str, name: &str) -> anyhow::Result<()> {
    let mut conn = PgConnection::connect(admin_url).await?;
    sqlx::query(&format!(r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#))
        .execute(&mut conn)
        .await
        .with_context(|| format!("dropping database {name}"))?;
    conn.close().await?;
    Ok(())
}

/// `admin_url` with its database path replaced by `db` (query parameters kept).
fn with_database(admin_url: &str, db: &str) -> anyhow::Result<String> {
    let (base, query) = match admin_url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (admin_url, None),
    };
    let Some(scheme_end) = base.find("://") else {
        bail!("not a postgres:// URL: {}", redact(admin_url));
    };
    let authority_start = scheme_end + 3;
    let root = match base[authority_start..].find('/') {
        Some(slash) => &base[..authority_start + slash],
        None => base,
    };
    Ok(match query {
        Some(q) => format!("{root}/{db}?{q}"),
        None => format!("{root}/{db}"),
    })
}

/// The URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}{}", &url[..s + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::{redact, with_database};

    #[test]
    fn replaces_the_database() {
        let u = with_database(
            "postgres://u:p@127.0.0.1:5432/postgres?sslmode=disable",
            "x",
        )
        .unwrap();
        assert_eq!(u, "postgres://u:p@127.0.0.1:5432/x?sslmode=disable");
        assert_eq!(
            with_database("postgres://h", "x").unwrap(),
            "postgres://h/x"
        );
        assert_eq!(redact("postgres://u:p@h/db"), "postgres://u@h/db");
    }
}
