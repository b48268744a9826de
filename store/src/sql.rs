//! The SQL store (sqlx): SQLite for a durable store on one machine, PostgreSQL for a store
//! shared by many gateway replicas. It can also hold the client application registry.
//!
//! Both dialects run the same statements (SQLite accepts `$1` placeholders and `RETURNING`),
//! except the writes of an issue, which go in one round trip: one string of four statements on
//! SQLite, one statement with data-modifying CTEs on PostgreSQL ([`WRITE_ISSUE_SQLITE`]); and a
//! rotation, which each dialect runs its own way:
//!
//! - **SQLite**: WAL, `synchronous=FULL` (a committed rotation survives a power loss, so a
//!   consumed token cannot come back), and every write transaction starts with
//!   `BEGIN IMMEDIATE`: sqlx's deferred `BEGIN` upgrades a read snapshot to a write and fails
//!   with `SQLITE_BUSY_SNAPSHOT` under concurrency (launchbadge/sqlx#853). Writers of one
//!   process also queue on an async mutex, so they wait in order instead of in SQLite's busy
//!   handler; `busy_timeout` still covers other processes on the same file. Rotations and
//!   issues are committed in groups, many requests per transaction and so per `fsync`
//!   (`group`: a request is answered only after the commit that holds it).
//! - **PostgreSQL**: a rotation is two statements, so two round trips (plus the pool's
//!   liveness check of the connection it acquires, and a third statement when it loses a race).
//!   It reads the presented token's row without a lock, decides on it, then consumes the token
//!   and writes the successor in one statement
//!   ([`ROTATE_POSTGRES`]: a conditional `UPDATE ... WHERE consumed_at IS NULL ... RETURNING`
//!   whose result the inserts select from), one transaction with no `BEGIN` or `COMMIT` of its
//!   own. Under READ COMMITTED a second updater of the row waits for the first, then
//!   re-evaluates the `WHERE` clause and finds nothing, so exactly one caller wins and the
//!   others write nothing; a token consumed or revoked between the read and the statement is
//!   left to that change the same way. Lock order, so that replicas never deadlock: a
//!   rotation waits for no row but the presented one (it skips a held predecessor), a family
//!   revocation first takes its family's advisory lock (one revocation of a family at a time),
//!   then locks the refresh rows newest generation first, and a purge skips held rows.
//!
//! Migrations for both dialects are embedded and applied at connect. Connection and pool
//! failures become [`StoreError::Unavailable`]; the pool tests connections before handing them
//! out, so service resumes by itself once the database is back.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::migrate::Migrator;
use sqlx::pool::PoolOptions;
use sqlx::postgres::{PgConnectOptions, PgPool};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqliteSynchronous};
use sqlx::{ConnectOptions, Connection};

use crate::clients::{ClientApplication, ClientRegistry, RegistryError};
use crate::config::{SqlConfig, expand_env};
use crate::*;

static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("migrations/postgres");

/// Rows deleted per statement by the purge, so that a large purge never holds the write lock
/// (SQLite) or a huge set of row locks (PostgreSQL) for long.
const PURGE_BATCH: i64 = 5000;

enum Backend {
    Sqlite {
        pool: SqlitePool,
        /// Serialises this process's write transactions (see the module docs).
        write: Arc<tokio::sync::Mutex<()>>,
        /// Where rotations and issues queue for their group's commit.
        group: group::Group,
    },
    Postgres(PgPool),
}

/// A token store (and client registry) in SQLite or PostgreSQL.
pub struct SqlStore {
    backend: Backend,
}

/// Runs `$body` with `$pool` bound to the concrete pool. The body is compiled once per dialect.
macro_rules! on_pool {
    ($self:expr, $pool:ident => $body:expr) => {
        match &$self.backend {
            Backend::Sqlite { pool: $pool, .. } => $body,
            Backend::Postgres($pool) => $body,
        }
    };
}

/// Runs `$body` inside a write transaction `$tx` (`BEGIN IMMEDIATE` on SQLite). The body
/// commits; dropping the transaction without commit rolls it back.
macro_rules! in_write_tx {
    ($self:expr, $map:expr, $tx:ident => $body:expr) => {
        match &$self.backend {
            Backend::Sqlite { pool, write, .. } => {
                let _serial = write.lock().await;
                #[allow(unused_mut)]
                let mut $tx = pool.begin_with("BEGIN IMMEDIATE").await.map_err($map)?;
                $body
            }
            Backend::Postgres(pool) => {
                #[allow(unused_mut)]
                let mut $tx = pool.begin().await.map_err($map)?;
                $body
            }
        }
    };
}

/// Sets one column of one client application in a write transaction; `NotFound` when no row
/// has that id. A macro, like [`in_write_tx!`], because the value is bound for either backend.
macro_rules! update_client {
    ($self:expr, $column:literal, $client_id:expr, $value:expr) => {{
        let n = in_write_tx!($self, map_registry_err, tx => {
            let n = sqlx::query(concat!("UPDATE client_applications SET ", $column, " = $2 WHERE client_id = $1"))
                .bind($client_id)
                .bind($value)
                .execute(&mut *tx)
                .await
                .map_err(map_registry_err)?
                .rows_affected();
            tx.commit().await.map_err(map_registry_err)?;
            n
        });
        if n == 0 {
            return Err(RegistryError::NotFound($client_id.to_owned()));
        }
        Ok(())
    }};
}

#[derive(sqlx::FromRow)]
struct AccessRow {
    client_id: String,
    subject: Option<String>,
    scope: String,
    metadata: String,
    family: Vec<u8>,
    issued_at: i64,
    expires_at: i64,
}

#[derive(sqlx::FromRow)]
struct ConsumedRow {
    client_id: String,
    subject: Option<String>,
    scope: String,
    metadata: String,
    family: Vec<u8>,
    generation: i64,
    issued_at: i64,
    expires_at: i64,
}

/// A refresh token's whole row, read before a rotation on PostgreSQL decides
/// ([`READ_REFRESH_POSTGRES`]).
#[derive(sqlx::FromRow)]
struct RefreshRow {
    #[sqlx(flatten)]
    token: ConsumedRow,
    consumed_at: Option<i64>,
    revoked: bool,
    replay: Option<Vec<u8>>,
    replay_until: Option<i64>,
}

impl RefreshRow {
    /// Whether `client_id` may consume it at `now`: the conditions of [`CONSUME_REFRESH`].
    fn consumable(&self, client_id: &str, now: UnixTime) -> bool {
        self.token.client_id == client_id
            && self.consumed_at.is_none()
            && !self.revoked
            && self.token.expires_at > now
    }

    fn probe(self) -> ProbeRow {
        ProbeRow {
            client_id: self.token.client_id,
            consumed_at: self.consumed_at,
            revoked: self.revoked,
            expires_at: self.token.expires_at,
            family: self.token.family,
            replay: self.replay,
            replay_until: self.replay_until,
        }
    }
}

#[derive(sqlx::FromRow)]
struct ProbeRow {
    client_id: String,
    consumed_at: Option<i64>,
    revoked: bool,
    expires_at: i64,
    family: Vec<u8>,
    replay: Option<Vec<u8>>,
    replay_until: Option<i64>,
}

#[derive(sqlx::FromRow)]
struct ClientRow {
    client_id: String,
    name: String,
    secret_digest: Vec<u8>,
    enabled: bool,
    scopes: String,
    grant_types: String,
    created_at: i64,
}

const SELECT_ACCESS: &str = "SELECT client_id, subject, scope, metadata, family, issued_at, expires_at \
     FROM access_tokens WHERE digest = $1 AND revoked = FALSE AND expires_at > $2";

const CONSUME_REFRESH: &str = "UPDATE refresh_tokens SET consumed_at = $3 \
     WHERE digest = $1 AND client_id = $2 AND consumed_at IS NULL AND revoked = FALSE \
       AND expires_at > $3 \
     RETURNING client_id, subject, scope, metadata, family, generation, issued_at, expires_at";

const PROBE_REFRESH: &str = "SELECT client_id, consumed_at, revoked, expires_at, family, replay, replay_until \
     FROM refresh_tokens WHERE digest = $1";

/// A rotation on PostgreSQL reads the presented token's row first, without a lock, and again
/// if its statement then finds the token changed.
const READ_REFRESH_POSTGRES: &str = "SELECT client_id, subject, scope, metadata, family, generation, \
     issued_at, expires_at, consumed_at, revoked, replay, replay_until \
     FROM refresh_tokens WHERE digest = $1";

/// Then, once the decision is taken on what it read, consumes the token and writes the
/// successor in one statement, which PostgreSQL runs as one transaction: one round trip
/// instead of `BEGIN`, [`CONSUME_REFRESH`], [`WRITE_ISSUE_POSTGRES`] and `COMMIT`. The
/// parameters are [`bind_issue`]'s (`$19`, the presented digest when a replay is kept, is not
/// used: the consumption names the token itself), then the presented digest (`$24`), the
/// client (`$25`) and the time (`$26`). `consumed` is [`CONSUME_REFRESH`]'s condition, checked
/// again under the row's lock: if the token was consumed, revoked or expired since it was read,
/// it matches nothing and so do the writes, which all read from it; the statement returns how
/// many rows it consumed (0 or 1). The kept replay is set by the consuming `UPDATE` itself, as
/// one statement may not change a row twice; the cleared generations are older than the
/// presented one (`$23`). The clearing skips a predecessor whose row another transaction holds,
/// so that a rotation waits for no row but the presented one and closes no lock cycle. In the
/// gateway the holder is a family revocation, which revokes the row, or a purge, which deletes
/// it. If the holder rolls back instead (a failed revocation, an operator's session), the
/// predecessor keeps its replay until its `replay_until` (at most `reuse_grace_secs`) or the
/// family's next rotation, which clears every older replay.
const ROTATE_POSTGRES: &str = "WITH consumed AS (UPDATE refresh_tokens \
     SET consumed_at = $26, replay = COALESCE($20, replay), replay_until = COALESCE($21, replay_until) \
     WHERE digest = $24 AND client_id = $25 AND consumed_at IS NULL AND revoked = FALSE \
       AND expires_at > $26 \
     RETURNING 1), \
     new_access AS (INSERT INTO access_tokens \
     (digest, client_id, subject, scope, metadata, issued_at, expires_at, family, generation) \
     SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9 FROM consumed), \
     new_refresh AS (INSERT INTO refresh_tokens \
     (digest, client_id, subject, scope, metadata, issued_at, expires_at, family, generation) \
     SELECT $10, $11, $12, $13, $14, $15, $16, $17, $18 FROM consumed WHERE $10 IS NOT NULL), \
     cleared AS (UPDATE refresh_tokens SET replay = NULL, replay_until = NULL \
     WHERE digest IN (SELECT digest FROM refresh_tokens \
       WHERE family = $22 AND generation < $23 AND replay IS NOT NULL FOR UPDATE SKIP LOCKED) \
       AND EXISTS (SELECT 1 FROM consumed)) \
     SELECT count(*) FROM consumed";

/// The writes of one issue, in one round trip to the database:
///
/// - the access token (`$1`..`$9`);
/// - the refresh token (`$10`..`$18`), when `$10` is not null;
/// - on a rotation with a replay window, the sealed response the presented token (`$19`) keeps
///   for its replay (`$20`, `$21`), when `$20` is not null;
/// - on a rotation, the end of the replays of the family's (`$22`) older generations (below
///   `$23`, the presented token's): only the immediate predecessor of the live token may replay.
///
/// SQLite runs the four statements of one string in one call on its connection's thread (one
/// hand-off instead of four). PostgreSQL runs one statement per query, so there the first three
/// are data-modifying CTEs; they touch different rows (the new token is generation `$23` + 1,
/// the presented one `$23`, the cleared ones older), which is what a single statement needs.
const WRITE_ISSUE_SQLITE: &str = "INSERT INTO access_tokens \
     (digest, client_id, subject, scope, metadata, issued_at, expires_at, family, generation) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9); \
     INSERT INTO refresh_tokens \
     (digest, client_id, subject, scope, metadata, issued_at, expires_at, family, generation) \
     SELECT $10, $11, $12, $13, $14, $15, $16, $17, $18 WHERE $10 IS NOT NULL; \
     UPDATE refresh_tokens SET replay = $20, replay_until = $21 \
     WHERE digest = $19 AND $20 IS NOT NULL; \
     UPDATE refresh_tokens SET replay = NULL, replay_until = NULL \
     WHERE family = $22 AND generation < $23 AND replay IS NOT NULL";

/// [`WRITE_ISSUE_SQLITE`] as one PostgreSQL statement.
const WRITE_ISSUE_POSTGRES: &str = "WITH new_access AS (INSERT INTO access_tokens \
     (digest, client_id, subject, scope, metadata, issued_at, expires_at, family, generation) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)), \
     new_refresh AS (INSERT INTO refresh_tokens \
     (digest, client_id, subject, scope, metadata, issued_at, expires_at, family, generation) \
     SELECT $10, $11, $12, $13, $14, $15, $16, $17, $18 WHERE $10 IS NOT NULL), \
     kept_replay AS (UPDATE refresh_tokens SET replay = $20, replay_until = $21 \
     WHERE digest = $19 AND $20 IS NOT NULL) \
     UPDATE refresh_tokens SET replay = NULL, replay_until = NULL \
     WHERE family = $22 AND generation < $23 AND replay IS NOT NULL";

const REVOKE_ACCESS: &str = "UPDATE access_tokens SET revoked = TRUE \
     WHERE digest = $1 AND revoked = FALSE AND expires_at > $2";

const REVOKE_REFRESH: &str = "UPDATE refresh_tokens SET revoked = TRUE \
     WHERE digest = $1 AND revoked = FALSE AND consumed_at IS NULL AND expires_at > $2";

// RETURNING whether each row was live, so the count covers live tokens only while consumed
// tombstones are revoked too (a replay of one then answers Invalid, not reuse again).
const REVOKE_FAMILY_ACCESS: &str = "UPDATE access_tokens SET revoked = TRUE \
     WHERE family = $1 AND revoked = FALSE RETURNING expires_at, CAST(NULL AS BIGINT) AS consumed_at";

const REVOKE_FAMILY_REFRESH: &str = "UPDATE refresh_tokens SET revoked = TRUE \
     WHERE family = $1 AND revoked = FALSE RETURNING expires_at, consumed_at";

/// [`REVOKE_FAMILY_REFRESH`] on PostgreSQL, where other replicas rotate the family meanwhile:
/// the rows are locked newest generation first, the order in which a rotation takes them
/// ([`ROTATE_POSTGRES`] consumes generation g, then ends g − 1's replay). In scan order, oldest
/// first, a revocation could hold g − 1 while it waited for g, and the rotation holding g then
/// waited for g − 1: a deadlock, which PostgreSQL broke by aborting one of them (40P01, a 503
/// to its client). The rotation now skips a held predecessor instead of waiting, so this order
/// is what keeps a rotation in progress whole: the revocation waits for the presented row
/// before it takes the older ones, and the rotation ends its predecessor's replay. SQLite has
/// one writer at a time and no `FOR UPDATE`.
const REVOKE_FAMILY_REFRESH_POSTGRES: &str = "UPDATE refresh_tokens SET revoked = TRUE \
     WHERE digest IN (SELECT digest FROM refresh_tokens WHERE family = $1 AND revoked = FALSE \
       ORDER BY generation DESC FOR UPDATE) \
     RETURNING expires_at, consumed_at";

/// Taken first by a family revocation on PostgreSQL, before any row: two revocations of one
/// family (a thief and the victim both presenting rotated tokens, a client's retry) then run one
/// after the other. At once, each takes rows across its passes newest first within a pass but
/// newer than what it holds in the next, and they could deadlock. Keyed by the family's first
/// eight bytes ([`revocation_lock_key`]); held until the transaction ends. Only revocations
/// take it, so a revocation waits for it holding nothing.
const LOCK_FAMILY_REVOCATION: &str = "SELECT pg_advisory_xact_lock($1)";

/// [`LOCK_FAMILY_REVOCATION`]'s key: two families sharing it only wait for each other.
fn revocation_lock_key(family: &[u8; 16]) -> i64 {
    let mut first = [0u8; 8];
    first.copy_from_slice(&family[..8]);
    i64::from_be_bytes(first)
}

const PURGE_ACCESS: &str = "DELETE FROM access_tokens WHERE digest IN \
     (SELECT digest FROM access_tokens WHERE expires_at <= $1 LIMIT $2)";

const PURGE_REFRESH: &str = "DELETE FROM refresh_tokens WHERE digest IN \
     (SELECT digest FROM refresh_tokens WHERE expires_at <= $1 LIMIT $2)";

/// [`PURGE_ACCESS`] and [`PURGE_REFRESH`] on PostgreSQL: rows another transaction holds are
/// skipped, left to a later purge, so a purge never waits. Its statements take rows in no set
/// order (an index scan by expiry, oldest first), a revocation newest generation first
/// ([`REVOKE_FAMILY_REFRESH_POSTGRES`]): waiting, the two could deadlock.
const PURGE_ACCESS_POSTGRES: &str = "DELETE FROM access_tokens WHERE digest IN \
     (SELECT digest FROM access_tokens WHERE expires_at <= $1 LIMIT $2 FOR UPDATE SKIP LOCKED)";

const PURGE_REFRESH_POSTGRES: &str = "DELETE FROM refresh_tokens WHERE digest IN \
     (SELECT digest FROM refresh_tokens WHERE expires_at <= $1 LIMIT $2 FOR UPDATE SKIP LOCKED)";

const COUNT_ACCESS: &str =
    "SELECT COUNT(*) FROM access_tokens WHERE revoked = FALSE AND expires_at > $1";

const COUNT_REFRESH: &str = "SELECT COUNT(*) FROM refresh_tokens \
     WHERE revoked = FALSE AND consumed_at IS NULL AND expires_at > $1";

#[derive(sqlx::FromRow)]
struct RevokedRow {
    expires_at: i64,
    consumed_at: Option<i64>,
}

impl SqlStore {
    /// Connects to `sqlite://PATH` (the file and its folder are created if missing) or
    /// `postgres://...`, then applies the embedded migrations. `${NAME}` in the URL is taken
    /// from the environment. Errors never contain the URL (it may hold a password).
    pub async fn connect(config: &SqlConfig) -> StoreResult<Self> {
        let url = expand_env(&config.url).map_err(StoreError::Backend)?;
        let connect_timeout = Duration::from_secs(config.connect_timeout_secs.max(1));
        let acquire_timeout = Duration::from_secs(config.acquire_timeout_secs.max(1));
        let backend = if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(&url)
                .map_err(|_| StoreError::Backend("invalid sqlite URL".into()))?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Full)
                .busy_timeout(acquire_timeout)
                // The group commit's statements for each batch size (group::batch), beside
                // the store's others.
                .statement_cache_capacity(256)
                // A batch's consumption returns a row per member: one channel's worth.
                .row_buffer_size(128);
            if let Some(dir) = options.get_filename().parent()
                && !dir.as_os_str().is_empty()
            {
                std::fs::create_dir_all(dir).map_err(|e| {
                    StoreError::Unavailable(format!("cannot create the sqlite folder: {e}"))
                })?;
            }
            let pool = pool_options(config).connect_lazy_with(options);
            with_timeout(connect_timeout, SQLITE_MIGRATIONS.run(&pool)).await?;
            let write = Arc::new(tokio::sync::Mutex::new(()));
            Backend::Sqlite {
                group: group::Group::start(pool.clone(), write.clone()),
                pool,
                write,
            }
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let mut options = PgConnectOptions::from_str(&url)
                .map_err(|_| StoreError::Backend("invalid postgres URL".into()))?;
            // Name the connections for pg_stat_activity unless the URL (or PGAPPNAME) did.
            if options.get_application_name().is_none() {
                options = options.application_name("gateway");
            }
            if let Some(schema) = &config.schema {
                check_schema_name(schema)?;
                create_schema(&options, schema, connect_timeout).await?;
                options = options.options([("search_path", schema.as_str())]);
            }
            let pool = pool_options(config).connect_lazy_with(options);
            with_timeout(connect_timeout, POSTGRES_MIGRATIONS.run(&pool)).await?;
            Backend::Postgres(pool)
        } else {
            return Err(StoreError::Backend(
                "store URL must start with sqlite: or postgres://".into(),
            ));
        };
        Ok(SqlStore { backend })
    }

    /// On SQLite, the transactions its writer has committed (each holds a group of rotations
    /// and issues, see `group`); `None` on PostgreSQL.
    pub fn sqlite_commits(&self) -> Option<u64> {
        match &self.backend {
            Backend::Sqlite { group, .. } => Some(group.commits()),
            Backend::Postgres(_) => None,
        }
    }

    /// On SQLite, the batches its writer has written in bulk (a batch whose bulk write failed
    /// is redone one by one and not counted); `None` on PostgreSQL.
    pub fn sqlite_bulk_writes(&self) -> Option<u64> {
        match &self.backend {
            Backend::Sqlite { group, .. } => Some(group.bulk_writes()),
            Backend::Postgres(_) => None,
        }
    }

    /// Closes the pool: waits for checked-out connections to come back, then closes them all.
    pub async fn close(&self) {
        on_pool!(self, pool => pool.close().await)
    }
}

fn pool_options<DB: sqlx::Database>(config: &SqlConfig) -> PoolOptions<DB> {
    PoolOptions::new()
        .max_connections(config.max_connections.max(1))
        .acquire_timeout(Duration::from_secs(config.acquire_timeout_secs.max(1)))
        // A connection that died while idle (database restarted, connection killed) is
        // replaced here instead of failing the request that would have used it.
        .test_before_acquire(true)
}

async fn with_timeout(
    limit: Duration,
    migrate: impl Future<Output = Result<(), sqlx::migrate::MigrateError>>,
) -> StoreResult<()> {
    match tokio::time::timeout(limit, migrate).await {
        Err(_) => Err(StoreError::Unavailable(
            "database not reachable within the connect timeout".into(),
        )),
        Ok(Err(sqlx::migrate::MigrateError::Execute(e))) => Err(map_err(e)),
        Ok(Err(e)) => Err(StoreError::Backend(format!("migration failed: {e}"))),
        Ok(Ok(())) => Ok(()),
    }
}

fn check_schema_name(schema: &str) -> StoreResult<()> {
    let mut chars = schema.chars();
    let ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && schema.len() <= 63;
    if ok {
        Ok(())
    } else {
        Err(StoreError::Backend(
            "schema must be lowercase letters, digits and _ (at most 63), not starting with a digit"
                .into(),
        ))
    }
}

async fn create_schema(
    options: &PgConnectOptions,
    schema: &str,
    limit: Duration,
) -> StoreResult<()> {
    let work = async {
        let mut conn = options.connect().await?;
        // The name was checked to be a plain lowercase identifier, so quoting is enough.
        let result = sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""))
            .execute(&mut conn)
            .await;
        let _ = conn.close().await;
        match result {
            // Two replicas creating the schema at once: one of them loses the race on the
            // catalog's unique index, and the schema exists either way.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("23505") => Ok(()),
            other => other.map(|_| ()),
        }
    };
    match tokio::time::timeout(limit, work).await {
        Err(_) => Err(StoreError::Unavailable(
            "database not reachable within the connect timeout".into(),
        )),
        Ok(r) => r.map_err(map_err),
    }
}

/// [`READ_REFRESH_POSTGRES`]: the presented token's row, if there is one.
async fn read_refresh_postgres(
    conn: &mut sqlx::PgConnection,
    presented: &Digest,
) -> StoreResult<Option<RefreshRow>> {
    sqlx::query_as(READ_REFRESH_POSTGRES)
        .bind(presented.as_bytes().as_slice())
        .fetch_optional(conn)
        .await
        .map_err(map_err)
}

/// Whether a PostgreSQL SQLSTATE means "try again later".
fn is_transient_sqlstate(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("53")
        || code.starts_with("57P")
        || code == "40001"
        || code == "40P01"
        || code == "25006"
}

/// Whether a database error means "try again later" (outage, overload, failover, lost race)
/// rather than a bug.
fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            // Asked by dialect: many SQLSTATEs are digits only ("08006", "40001") and would
            // read as SQLite result codes.
            if db
                .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                .is_some()
            {
                // PostgreSQL SQLSTATE: connection exception, insufficient resources, operator
                // intervention (shutdown), serialization failure, deadlock, read-only (failover).
                is_transient_sqlstate(&code)
            } else {
                // SQLite primary result codes: BUSY, LOCKED, READONLY, IOERR, FULL, CANTOPEN.
                code.parse::<u32>()
                    .is_ok_and(|n| matches!(n & 0xff, 5 | 6 | 8 | 10 | 13 | 14))
            }
        }
        _ => false,
    }
}

fn map_err(e: sqlx::Error) -> StoreError {
    // sqlx messages carry no bound values, so neither digests nor anything else from a request
    // reaches the error text.
    if is_transient(&e) {
        StoreError::Unavailable(e.to_string())
    } else {
        StoreError::Backend(e.to_string())
    }
}

fn map_registry_err(e: sqlx::Error) -> RegistryError {
    if is_transient(&e) {
        RegistryError::Unavailable(e.to_string())
    } else {
        RegistryError::Invalid(e.to_string())
    }
}

fn family_bytes(family: FamilyId) -> [u8; 16] {
    family.0.to_be_bytes()
}

fn family_from(bytes: &[u8]) -> StoreResult<FamilyId> {
    <[u8; 16]>::try_from(bytes)
        .map(|b| FamilyId(u128::from_be_bytes(b)))
        .map_err(|_| StoreError::Backend("corrupt family id in the token table".into()))
}

fn grant_from(
    client_id: String,
    subject: Option<String>,
    scope: String,
    metadata: &str,
) -> StoreResult<Arc<Grant>> {
    let metadata: BTreeMap<String, String> = serde_json::from_str(metadata)
        .map_err(|_| StoreError::Backend("corrupt metadata in the token table".into()))?;
    Ok(Arc::new(Grant {
        client_id,
        subject,
        scope,
        metadata,
    }))
}

fn metadata_json(grant: &Grant) -> StoreResult<String> {
    serde_json::to_string(&grant.metadata).map_err(|e| StoreError::Backend(e.to_string()))
}

fn consumed_from(row: ConsumedRow) -> StoreResult<RefreshToken> {
    Ok(RefreshToken {
        grant: grant_from(row.client_id, row.subject, row.scope, &row.metadata)?,
        family: family_from(&row.family)?,
        generation: u32::try_from(row.generation)
            .map_err(|_| StoreError::Backend("corrupt generation in the token table".into()))?,
        issued_at: row.issued_at,
        expires_at: row.expires_at,
    })
}

/// Why a refresh token could not be consumed, from its row (read when it was found
/// unconsumable, or after the conditional UPDATE matched nothing).
fn classify(probe: Option<ProbeRow>, client_id: &str, now: UnixTime) -> StoreResult<RotateOutcome> {
    let Some(p) = probe else {
        return Ok(RotateOutcome::Invalid);
    };
    if p.revoked || p.expires_at <= now {
        return Ok(RotateOutcome::Invalid);
    }
    if p.client_id != client_id {
        return Ok(RotateOutcome::WrongClient);
    }
    if p.consumed_at.is_some() {
        let replay = match (p.replay, p.replay_until) {
            (Some(sealed), Some(until)) if until > now => Some(Replay { sealed, until }),
            _ => None,
        };
        return Ok(RotateOutcome::AlreadyRotated {
            family: family_from(&p.family)?,
            replay,
        });
    }
    // Live, right client, unconsumed, yet the UPDATE did not match: only possible if the row
    // changed between the two statements. Refusing is the safe answer.
    tracing::debug!("refresh token changed between consume and probe; refused");
    Ok(RotateOutcome::Invalid)
}

/// Binds the 23 parameters of [`WRITE_ISSUE_SQLITE`] and [`WRITE_ISSUE_POSTGRES`] to the query
/// `$q`, in order: `$issue`'s tokens under their grants (metadata already serialized:
/// `$access_meta` for the access token's grant, `$meta` for the refresh token's; family
/// `$family`, generation `$gen`), then the rotation's part (`None` on a first issue): the
/// presented digest with its [`Replay`], and the family's bytes with the presented token's
/// generation. SQLite's group commit binds the same parameters for many issues in one query.
macro_rules! bind_issue {
    ($q:expr, $issue:expr, $access_meta:expr, $meta:expr, $family:expr, $gen:expr,
     $replay:expr, $older:expr) => {{
        let issue: &Issue = $issue;
        let (access_meta, meta): (&str, &str) = ($access_meta, $meta);
        let (family, generation): (&[u8], i64) = ($family, $gen);
        let (replay, older): (Option<(&Digest, &Replay)>, Option<(&[u8], i64)>) = ($replay, $older);
        let access_grant = issue.access_grant.as_ref().unwrap_or(&issue.grant);
        $q.bind(issue.access.digest.as_bytes().as_slice())
            .bind(access_grant.client_id.as_str())
            .bind(access_grant.subject.as_deref())
            .bind(access_grant.scope.as_str())
            .bind(access_meta)
            .bind(issue.issued_at)
            .bind(issue.access.expires_at)
            .bind(family)
            .bind(generation)
            .bind(
                issue
                    .refresh
                    .as_ref()
                    .map(|r| r.digest.as_bytes().as_slice()),
            )
            .bind(issue.grant.client_id.as_str())
            .bind(issue.grant.subject.as_deref())
            .bind(issue.grant.scope.as_str())
            .bind(meta)
            .bind(issue.issued_at)
            .bind(issue.refresh.as_ref().map(|r| r.expires_at))
            .bind(family)
            .bind(generation)
            .bind(replay.map(|(presented, _)| presented.as_bytes().as_slice()))
            .bind(replay.map(|(_, r)| r.sealed.as_slice()))
            .bind(replay.map(|(_, r)| r.until))
            .bind(older.map(|(family, _)| family))
            .bind(older.map(|(_, generation)| generation))
    }};
}

/// The serialized metadata of an issue's access token grant and of its refresh token's.
fn issue_metadata(issue: &Issue) -> StoreResult<(String, String)> {
    let access_grant = issue.access_grant.as_ref().unwrap_or(&issue.grant);
    Ok((metadata_json(access_grant)?, metadata_json(&issue.grant)?))
}

/// Runs [`WRITE_ISSUE_SQLITE`] or [`WRITE_ISSUE_POSTGRES`] (`$sql`) on `$tx` with the
/// parameters of [`bind_issue`] (the metadata serialized here). Evaluates to a
/// `StoreResult<()>`.
macro_rules! write_issue {
    ($tx:expr, $sql:expr, $issue:expr, $family:expr, $gen:expr, $replay:expr, $older:expr) => {
        async {
            let issue: &Issue = $issue;
            let family: [u8; 16] = $family;
            let (access_meta, meta) = issue_metadata(issue)?;
            bind_issue!(
                sqlx::query($sql),
                issue,
                &access_meta,
                &meta,
                family.as_slice(),
                $gen,
                $replay,
                $older
            )
            .execute(&mut *$tx)
            .await
            .map_err(map_err)?;
            Ok::<(), StoreError>(())
        }
        .await
    };
}

/// A rotation's statements on the open transaction `$tx`: consume the presented token with
/// one conditional `UPDATE ... RETURNING` ([`CONSUME_REFRESH`] in `$sql.0`), or read why it
/// cannot be consumed, writing nothing ([`PROBE_REFRESH`] in `$sql.1`); else evaluate `$decide`
/// (an expression of `$token`, the consumed token, giving a `StoreResult<RotateDecision>`) and
/// write the successor (the dialect's [`WRITE_ISSUE_SQLITE`] or [`WRITE_ISSUE_POSTGRES`] in
/// `$sql.2`). Each may be wrapped in other statements of the caller's (SQLite's group commit
/// adds its savepoints). Evaluates to the outcome and whether anything was written, for the
/// caller to commit; not committing rolls the consumption back.
macro_rules! rotate_in_tx {
    ($tx:expr, $sql:expr, $presented:expr, $client_id:expr, $now:expr,
     |$token:ident| $decide:expr) => {
        async {
            let (presented, client_id, now): (&Digest, &str, UnixTime) =
                ($presented, $client_id, $now);
            let (consume, probe, write): (&str, &str, &str) = $sql;
            let row: Option<ConsumedRow> = sqlx::query_as(consume)
                .bind(presented.as_bytes().as_slice())
                .bind(client_id)
                .bind(now)
                .fetch_optional(&mut *$tx)
                .await
                .map_err(map_err)?;
            let Some(row) = row else {
                let probe: Option<ProbeRow> = sqlx::query_as(probe)
                    .bind(presented.as_bytes().as_slice())
                    .fetch_optional(&mut *$tx)
                    .await
                    .map_err(map_err)?;
                return Ok((classify(probe, client_id, now)?, false));
            };
            let consumed = consumed_from(row)?;
            let decision: StoreResult<RotateDecision> = {
                let $token = &consumed;
                $decide
            };
            let issue = match decision? {
                RotateDecision::Reject => return Ok((RotateOutcome::Rejected, false)),
                RotateDecision::Rotate(issue) => issue,
            };
            let family = family_bytes(consumed.family);
            let generation = i64::from(consumed.generation) + 1;
            let replay = issue.replay.as_ref().map(|r| (presented, r));
            let older = Some((family.as_slice(), i64::from(consumed.generation)));
            write_issue!($tx, write, &issue, family, generation, replay, older)?;
            Ok::<_, StoreError>((RotateOutcome::Rotated { consumed }, true))
        }
        .await
    };
}

mod group;

#[async_trait]
impl TokenStore for SqlStore {
    fn kind(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite { .. } => "sqlite",
            Backend::Postgres(_) => "postgres",
        }
    }

    async fn issue(&self, issue: Issue) -> StoreResult<()> {
        let pool = match &self.backend {
            Backend::Sqlite { group, .. } => return group.issue(issue).await,
            Backend::Postgres(pool) => pool,
        };
        let mut tx = pool.begin().await.map_err(map_err)?;
        let (family, generation) = (family_bytes(issue.family), i64::from(issue.generation));
        write_issue!(
            tx,
            WRITE_ISSUE_POSTGRES,
            &issue,
            family,
            generation,
            None,
            None
        )?;
        tx.commit().await.map_err(map_err)
    }

    async fn access_token(
        &self,
        digest: &Digest,
        now: UnixTime,
    ) -> StoreResult<Option<AccessToken>> {
        let row: Option<AccessRow> = on_pool!(self, pool => {
            sqlx::query_as(SELECT_ACCESS)
                .bind(digest.as_bytes().as_slice())
                .bind(now)
                .fetch_optional(pool)
                .await
                .map_err(map_err)?
        });
        row.map(|r| {
            Ok(AccessToken {
                family: family_from(&r.family)?,
                grant: grant_from(r.client_id, r.subject, r.scope, &r.metadata)?,
                issued_at: r.issued_at,
                expires_at: r.expires_at,
            })
        })
        .transpose()
    }

    async fn rotate(
        &self,
        presented: &Digest,
        client_id: &str,
        now: UnixTime,
        decide: &Decide<'_>,
    ) -> StoreResult<RotateOutcome> {
        let pool = match &self.backend {
            Backend::Sqlite { group, .. } => {
                return group.rotate(presented, client_id, now, decide).await;
            }
            Backend::Postgres(pool) => pool,
        };
        // Two round trips: read the token, decide, then consume it and write the successor
        // in one statement, which checks again that the token is consumable. A token that
        // cannot be consumed (or a rejected successor) writes nothing.
        let mut conn = pool.acquire().await.map_err(map_err)?;
        let row = match read_refresh_postgres(&mut conn, presented).await? {
            Some(row) if row.consumable(client_id, now) => row,
            other => return classify(other.map(RefreshRow::probe), client_id, now),
        };
        let consumed = consumed_from(row.token)?;
        let issue = match decide(&consumed) {
            // The read saw the token live and unconsumed, so a rejection (a scope beyond the
            // grant) is ordered before any rotation that consumed it since: the same answer the
            // memory store gives when the request comes first, and nothing is written. Reuse
            // detection is for a token seen consumed, which `classify` reports above.
            RotateDecision::Reject => return Ok(RotateOutcome::Rejected),
            RotateDecision::Rotate(issue) => issue,
        };
        let family = family_bytes(consumed.family);
        let generation = i64::from(consumed.generation);
        let (access_meta, meta) = issue_metadata(&issue)?;
        let rotated: i64 = bind_issue!(
            sqlx::query_scalar(ROTATE_POSTGRES),
            &issue,
            &access_meta,
            &meta,
            family.as_slice(),
            generation + 1,
            issue.replay.as_ref().map(|r| (presented, r)),
            Some((family.as_slice(), generation))
        )
        .bind(presented.as_bytes().as_slice())
        .bind(client_id)
        .bind(now)
        .fetch_one(&mut *conn)
        .await
        .map_err(map_err)?;
        if rotated == 1 {
            return Ok(RotateOutcome::Rotated { consumed });
        }
        // Consumed, revoked or expired since the read: read again and say why.
        let row = read_refresh_postgres(&mut conn, presented).await?;
        classify(row.map(RefreshRow::probe), client_id, now)
    }

    async fn revoke_token(&self, digest: &Digest) -> StoreResult<bool> {
        let now = crate::now();
        in_write_tx!(self, map_err, tx => {
            let mut found = sqlx::query(REVOKE_ACCESS)
                .bind(digest.as_bytes().as_slice())
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(map_err)?
                .rows_affected();
            if found == 0 {
                found = sqlx::query(REVOKE_REFRESH)
                    .bind(digest.as_bytes().as_slice())
                    .bind(now)
                    .execute(&mut *tx)
                    .await
                    .map_err(map_err)?
                    .rows_affected();
            }
            tx.commit().await.map_err(map_err)?;
            Ok(found > 0)
        })
    }

    async fn revoke_family(&self, family: FamilyId) -> StoreResult<Option<u64>> {
        // Under READ COMMITTED each statement sees a fresh snapshot. A rotation that commits a
        // new pair while the first UPDATE waits on its row is not in that UPDATE's snapshot,
        // but the row it waited on was then updated, so the loop runs again and the next
        // statement sees the new pair. It ends when a statement finds nothing left to revoke;
        // any later rotation finds its token revoked. (On SQLite the first pass is final.)
        // One transaction: a revocation that fails leaves the family as it was, and the reused
        // token still detects reuse when it is presented again. A rotation never waits for a
        // row the revocation holds but its own ([`ROTATE_POSTGRES`] skips a locked predecessor),
        // and a purge never waits at all, so the rows held by earlier passes close no cycle.
        let now = crate::now();
        let family = family_bytes(family);
        let (serialize, revoke_refresh) = match self.backend {
            Backend::Sqlite { .. } => (None, REVOKE_FAMILY_REFRESH),
            Backend::Postgres(_) => (Some(LOCK_FAMILY_REVOCATION), REVOKE_FAMILY_REFRESH_POSTGRES),
        };
        in_write_tx!(self, map_err, tx => {
            if let Some(lock) = serialize {
                sqlx::query(lock)
                    .bind(revocation_lock_key(&family))
                    .execute(&mut *tx)
                    .await
                    .map_err(map_err)?;
            }
            let mut live = 0u64;
            for _ in 0..32 {
                let mut rows: Vec<RevokedRow> = sqlx::query_as(REVOKE_FAMILY_ACCESS)
                    .bind(family.as_slice())
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(map_err)?;
                rows.extend(
                    sqlx::query_as::<_, RevokedRow>(revoke_refresh)
                        .bind(family.as_slice())
                        .fetch_all(&mut *tx)
                        .await
                        .map_err(map_err)?,
                );
                if rows.is_empty() {
                    break;
                }
                live += rows
                    .iter()
                    .filter(|r| r.consumed_at.is_none() && r.expires_at > now)
                    .count() as u64;
            }
            tx.commit().await.map_err(map_err)?;
            Ok(Some(live))
        })
    }

    async fn purge_expired(&self, now: UnixTime) -> StoreResult<u64> {
        let mut removed = 0;
        let statements = match self.backend {
            Backend::Sqlite { .. } => [PURGE_ACCESS, PURGE_REFRESH],
            Backend::Postgres(_) => [PURGE_ACCESS_POSTGRES, PURGE_REFRESH_POSTGRES],
        };
        for sql in statements {
            loop {
                let n = in_write_tx!(self, map_err, tx => {
                    let n = sqlx::query(sql)
                        .bind(now)
                        .bind(PURGE_BATCH)
                        .execute(&mut *tx)
                        .await
                        .map_err(map_err)?
                        .rows_affected();
                    tx.commit().await.map_err(map_err)?;
                    n
                });
                removed += n;
                if n < PURGE_BATCH as u64 {
                    break;
                }
            }
        }
        Ok(removed)
    }

    async fn count_live(&self, now: UnixTime) -> StoreResult<u64> {
        let mut total = 0i64;
        for sql in [COUNT_ACCESS, COUNT_REFRESH] {
            let n: i64 = on_pool!(self, pool => {
                sqlx::query_scalar(sql).bind(now).fetch_one(pool).await.map_err(map_err)?
            });
            total += n;
        }
        Ok(u64::try_from(total).unwrap_or(0))
    }

    async fn ping(&self) -> StoreResult<()> {
        on_pool!(self, pool => {
            sqlx::query("SELECT 1").execute(pool).await.map_err(map_err)?;
        });
        Ok(())
    }
}

fn app_from(row: ClientRow) -> Result<ClientApplication, RegistryError> {
    let corrupt =
        |what: &str| RegistryError::Invalid(format!("corrupt {what} for a client application"));
    Ok(ClientApplication {
        secret_digest: Digest::from_slice(&row.secret_digest)
            .ok_or_else(|| corrupt("secret digest"))?,
        scopes: serde_json::from_str(&row.scopes).map_err(|_| corrupt("scopes"))?,
        grant_types: serde_json::from_str(&row.grant_types).map_err(|_| corrupt("grant types"))?,
        client_id: row.client_id,
        name: row.name,
        enabled: row.enabled,
        created_at: row.created_at,
    })
}

const CLIENT_COLUMNS: &str =
    "client_id, name, secret_digest, enabled, scopes, grant_types, created_at";

#[async_trait]
impl ClientRegistry for SqlStore {
    async fn get(&self, client_id: &str) -> Result<Option<Arc<ClientApplication>>, RegistryError> {
        let sql = format!("SELECT {CLIENT_COLUMNS} FROM client_applications WHERE client_id = $1");
        let row: Option<ClientRow> = on_pool!(self, pool => {
            sqlx::query_as(&sql)
                .bind(client_id)
                .fetch_optional(pool)
                .await
                .map_err(map_registry_err)?
        });
        row.map(|r| app_from(r).map(Arc::new)).transpose()
    }

    async fn list(&self) -> Result<Vec<ClientApplication>, RegistryError> {
        let sql = format!("SELECT {CLIENT_COLUMNS} FROM client_applications ORDER BY client_id");
        let rows: Vec<ClientRow> = on_pool!(self, pool => {
            sqlx::query_as(&sql).fetch_all(pool).await.map_err(map_registry_err)?
        });
        rows.into_iter().map(app_from).collect()
    }

    async fn add(&self, app: ClientApplication) -> Result<(), RegistryError> {
        let scopes = serde_json::to_string(&app.scopes)
            .map_err(|e| RegistryError::Invalid(e.to_string()))?;
        let grant_types = serde_json::to_string(&app.grant_types)
            .map_err(|e| RegistryError::Invalid(e.to_string()))?;
        let sql = format!(
            "INSERT INTO client_applications ({CLIENT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)"
        );
        let result = in_write_tx!(self, map_registry_err, tx => {
            let r = sqlx::query(&sql)
                .bind(app.client_id.as_str())
                .bind(app.name.as_str())
                .bind(app.secret_digest.as_bytes().as_slice())
                .bind(app.enabled)
                .bind(scopes.as_str())
                .bind(grant_types.as_str())
                .bind(app.created_at)
                .execute(&mut *tx)
                .await;
            match r {
                Ok(_) => tx.commit().await.map(|_| ()),
                Err(e) => Err(e),
            }
        });
        match result {
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                Err(RegistryError::Invalid(format!(
                    "a client application with id {:?} already exists",
                    app.client_id
                )))
            }
            other => other.map_err(map_registry_err),
        }
    }

    async fn set_enabled(&self, client_id: &str, enabled: bool) -> Result<(), RegistryError> {
        update_client!(self, "enabled", client_id, enabled)
    }

    async fn set_secret(&self, client_id: &str, digest: Digest) -> Result<(), RegistryError> {
        update_client!(
            self,
            "secret_digest",
            client_id,
            digest.as_bytes().as_slice()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_are_plain_identifiers() {
        assert!(check_schema_name("gw_test_01").is_ok());
        assert!(check_schema_name("_x").is_ok());
        for bad in ["", "1abc", "a-b", "a\"; drop", "Upper", &"a".repeat(64)] {
            assert!(check_schema_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn unknown_and_wrong_client_and_replay_windows() {
        assert_eq!(classify(None, "a", 10).unwrap(), RotateOutcome::Invalid);
        let probe = |client: &str, consumed: Option<i64>, revoked, until: Option<i64>| ProbeRow {
            client_id: client.into(),
            consumed_at: consumed,
            revoked,
            expires_at: 100,
            family: vec![0; 16],
            replay: until.map(|_| vec![1, 2, 3]),
            replay_until: until,
        };
        assert_eq!(
            classify(Some(probe("b", None, false, None)), "a", 10).unwrap(),
            RotateOutcome::WrongClient
        );
        assert_eq!(
            classify(Some(probe("a", None, true, None)), "a", 10).unwrap(),
            RotateOutcome::Invalid
        );
        assert_eq!(
            classify(Some(probe("a", Some(5), false, None)), "a", 100).unwrap(),
            RotateOutcome::Invalid
        );
        assert_eq!(
            classify(Some(probe("a", Some(5), false, Some(20))), "a", 10).unwrap(),
            RotateOutcome::AlreadyRotated {
                family: FamilyId(0),
                replay: Some(Replay {
                    sealed: vec![1, 2, 3],
                    until: 20
                })
            }
        );
        assert_eq!(
            classify(Some(probe("a", Some(5), false, Some(20))), "a", 20).unwrap(),
            RotateOutcome::AlreadyRotated {
                family: FamilyId(0),
                replay: None
            }
        );
    }

    #[test]
    fn outages_are_transient() {
        assert!(is_transient(&sqlx::Error::PoolTimedOut));
        assert!(is_transient(&sqlx::Error::Io(std::io::Error::other(
            "reset"
        ))));
        assert!(!is_transient(&sqlx::Error::RowNotFound));
        assert!(matches!(
            map_err(sqlx::Error::PoolClosed),
            StoreError::Unavailable(_)
        ));
    }

    /// PostgreSQL's SQLSTATEs made of digits only are read as SQLSTATEs, not as SQLite result
    /// codes: a server that has become read-only (25006, as after a failover) is unavailable,
    /// a statement it cannot parse (42601) is not.
    #[tokio::test]
    #[ignore = "needs TEST_DATABASE_URL (PostgreSQL)"]
    async fn postgres_errors_are_classified_by_their_sqlstate() {
        let url = std::env::var("TEST_DATABASE_URL").expect("TEST_DATABASE_URL");
        let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect");
        sqlx::query("SET default_transaction_read_only = on")
            .execute(&mut conn)
            .await
            .expect("set read-only");
        let read_only = sqlx::query("CREATE TABLE gw_read_only_probe (x int)")
            .execute(&mut conn)
            .await
            .expect_err("a read-only session refuses to create a table");
        assert_eq!(
            read_only
                .as_database_error()
                .and_then(|d| d.code())
                .as_deref(),
            Some("25006")
        );
        assert!(matches!(map_err(read_only), StoreError::Unavailable(_)));
        let syntax = sqlx::query("SELEC 1")
            .execute(&mut conn)
            .await
            .expect_err("not SQL");
        assert!(matches!(map_err(syntax), StoreError::Backend(_)));
    }
}
