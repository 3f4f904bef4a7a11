//! The PostgreSQL harness itself (tests/common/pg.rs): a server starts and answers, a
//! SIGKILL really takes it down and a restart on the same port brings it back with its
//! committed data (crash recovery after a stale postmaster.pid), and servers run side by side.

mod common;

use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::pg;

#[test]
fn starts_answers_dies_on_kill_and_comes_back_with_its_data() {
    let t = Instant::now();
    let Some(mut pg) = pg::start_or_skip() else {
        return;
    };
    eprintln!("started in {:?} on {}", t.elapsed(), pg.url());
    assert_eq!(pg.psql("select 1"), "1");
    assert_eq!(
        pg.psql("select current_user, current_database()"),
        "ferry|ferry"
    );
    pg.psql("create table t (v int); insert into t values (1), (2)");
    let port = pg.port();

    pg.kill();
    let err = pg.try_psql("select 1").expect_err("psql after the kill");
    assert!(err.contains("Connection refused"), "{err}");
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());

    let t = Instant::now();
    pg.restart();
    eprintln!("restarted in {:?}", t.elapsed());
    assert_eq!(pg.port(), port);
    assert_eq!(pg.psql("select 1"), "1");
    assert_eq!(pg.psql("select sum(v) from t"), "3");
    assert!(
        pg.log()
            .contains("database system was interrupted; last known up at"),
        "no crash recovery in the log:\n{}",
        pg.log()
    );

    // Killed twice in a row, and a restart of a running server.
    pg.kill();
    pg.kill();
    pg.restart();
    pg.restart();
    assert_eq!(pg.psql("select count(*) from t"), "2");
    let err = pg.try_psql("select nope").expect_err("an SQL error");
    assert!(err.contains("column \"nope\" does not exist"), "{err}");
}

#[test]
fn three_servers_at_once() {
    let t = Instant::now();
    // Started concurrently: the ports and the SysV segments must not collide.
    let Some(servers) = (0..3)
        .map(|_| std::thread::spawn(pg::start_or_skip))
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect::<Option<Vec<pg::Postgres>>>()
    else {
        return;
    };
    eprintln!("3 started in {:?}", t.elapsed());
    let mut ports: Vec<u16> = servers.iter().map(|s| s.port()).collect();
    ports.sort();
    ports.dedup();
    assert_eq!(ports.len(), 3);
    for (i, s) in servers.iter().enumerate() {
        s.psql(&format!(
            "create table mine (v int); insert into mine values ({i})"
        ));
    }
    for (i, s) in servers.iter().enumerate() {
        assert_eq!(s.psql("select v from mine"), i.to_string());
    }
    // Dropped, each stops within the bound and leaves nothing listening, a crashed one too
    // (whose shared memory segment only the drop removes).
    let mut servers = servers;
    servers[1].kill();
    let t = Instant::now();
    drop(servers);
    assert!(t.elapsed() < Duration::from_secs(30));
    for p in ports {
        assert!(TcpStream::connect(("127.0.0.1", p)).is_err());
    }
}
