//! The harness talks to real servers: queries reach PostgreSQL and Redis, outages are real (clients
//! are refused while a server is down) and both come back on the same URL after a restart.

use std::time::Duration;

use farm_tests::{fresh_database, shared_redis, PgServer, RedisServer};
use sqlx::{Connection, PgConnection};

async fn select_one(url: &str) -> Result<i32, sqlx::Error> {
    let mut connection = PgConnection::connect(url).await?;
    sqlx::query_scalar("select 1").fetch_one(&mut connection).await
}

async fn redis_connection(url: &str) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(url)?;
    tokio::time::timeout(Duration::from_secs(5), client.get_multiplexed_async_connection())
        .await
        .unwrap_or_else(|_| {
            Err(redis::RedisError::from((
                redis::ErrorKind::IoError,
                "connect timed out",
            )))
        })
}

async fn ping(url: &str) -> redis::RedisResult<String> {
    let mut connection = redis_connection(url).await?;
    redis::cmd("PING").query_async(&mut connection).await
}

#[tokio::test]
async fn local_servers_answer_and_survive_restarts() {
    let pg = PgServer::start_local().expect("start PostgreSQL");
    let redis = RedisServer::start_local().expect("start Redis");

    let url = pg.create_database("harness").expect("create a database");
    assert_ne!(
        url,
        pg.create_database("harness").unwrap(),
        "each call gives a new database"
    );
    assert_eq!(select_one(&url).await.expect("select 1"), 1);
    assert_eq!(ping(&redis.url()).await.expect("PING"), "PONG");

    let mut connection = PgConnection::connect(&url).await.unwrap();
    sqlx::query("create table kept (v int)")
        .execute(&mut connection)
        .await
        .unwrap();
    sqlx::query("insert into kept values (42)")
        .execute(&mut connection)
        .await
        .unwrap();
    drop(connection);
    let mut redis_conn = redis_connection(&redis.url()).await.unwrap();
    let () = redis::cmd("SET")
        .arg("gone")
        .arg("1")
        .query_async(&mut redis_conn)
        .await
        .unwrap();
    drop(redis_conn);

    pg.stop().unwrap();
    redis.stop().unwrap();
    assert!(
        select_one(&url).await.is_err(),
        "PostgreSQL answers while stopped"
    );
    assert!(ping(&redis.url()).await.is_err(), "Redis answers while stopped");

    pg.resume().unwrap();
    redis.resume().unwrap();
    assert_eq!(select_one(&url).await.expect("select 1 after restart"), 1);
    assert_eq!(ping(&redis.url()).await.expect("PING after restart"), "PONG");
    let mut connection = PgConnection::connect(&url).await.unwrap();
    let kept: i32 = sqlx::query_scalar("select v from kept")
        .fetch_one(&mut connection)
        .await
        .unwrap();
    assert_eq!(kept, 42, "PostgreSQL keeps its data across a restart");
    drop(connection);
    let mut redis_conn = redis_connection(&redis.url()).await.unwrap();
    let gone: Option<String> = redis::cmd("GET")
        .arg("gone")
        .query_async(&mut redis_conn)
        .await
        .unwrap();
    assert_eq!(gone, None, "Redis runs without persistence");

    // A crash (SIGKILL to every PostgreSQL process) recovers too.
    pg.kill().unwrap();
    pg.resume().unwrap();
    assert_eq!(select_one(&url).await.expect("select 1 after crash recovery"), 1);
    pg.restart().unwrap();
    redis.restart().unwrap();
    assert_eq!(select_one(&url).await.unwrap(), 1);
    assert_eq!(ping(&redis.url()).await.unwrap(), "PONG");
}

/// The shared servers are the ones `cargo xtask test` passes in (`DATABASE_URL`, `REDIS_URL`), or
/// local ones when the variables are unset.
#[tokio::test]
async fn shared_servers_answer() {
    let url = fresh_database("shared");
    assert_eq!(select_one(&url).await.expect("select 1"), 1);
    assert_eq!(ping(&shared_redis().url()).await.expect("PING"), "PONG");
}
