//! Long work a person watches: `ferry sync --once` and `ferry verify` on a real pseudo-
//! terminal (util-linux `script`) draw one progress bar with the log above it, hold back the
//! per-file INFO lines, and end with a summary; piped, they print exactly the log lines
//! they always did and no terminal escape codes. Against a real s3s-fs.

mod common;

use std::process::Stdio;

use common::*;

const FILES: usize = 300;

/// Runs `ferry ARGS` on a pseudo-terminal 120 columns wide: (exit code, everything the
/// terminal received, bar redraws included).
fn on_pty(env: &Env, args: &str) -> (i32, String) {
    let inner = format!(
        "stty cols 120 rows 40; exec {} {args}",
        env!("CARGO_BIN_EXE_ferry")
    );
    let out = env
        .command_for("script", &["-qec", &inner, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .expect("script (util-linux) runs ferry on a pty");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn drop_files(env: &Env, tag: &str) {
    for i in 0..FILES {
        let key = format!("{tag}/{i:04}.bin");
        // Sizes vary so bytes and files are different counts.
        env.drop_file(&key, &content(&key, 1000 + (i % 7) * 3000));
    }
}

fn count(text: &str, needle: &str) -> usize {
    text.matches(needle).count()
}

#[test]
fn sync_once_and_verify_on_a_terminal_show_a_bar_and_a_summary_not_a_flood() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3::start(dir.path());
    let env = Env::for_s3(&s3);
    drop_files(&env, "tty");

    let (code, out) = on_pty(&env, "sync --once --timeout 5m");
    assert_eq!(code, 0, "sync --once on a pty:\n{out}");
    // The bar: files done of the total, bytes, a rate and an ETA, retries and failures.
    assert!(
        out.contains(&format!("/{FILES} files archived")),
        "no file counts in the bar:\n{out}"
    );
    assert!(out.contains("ETA "), "no ETA in the bar:\n{out}");
    assert!(
        out.contains("retries 0, failed 0"),
        "no trouble counts:\n{out}"
    );
    assert!(
        out.contains("KiB/"),
        "no byte counts or rate in the bar:\n{out}"
    );
    // The summary.
    assert!(
        out.contains(&format!("{FILES} of {FILES} archived, 0 vanished")),
        "{out}"
    );
    assert!(
        out.contains("retried, 0 failed"),
        "no summary of trouble:\n{out}"
    );
    // Not 2 x 300 per-file INFO lines scrolling the bar away.
    // ("archived" itself is also the bar's word; the upload line stands for the pair.)
    let flood = count(&out, "uploaded and verified");
    assert!(flood <= 5, "{flood} per-file lines on the terminal:\n{out}");
    assert_eq!(env.count("archived"), FILES as u64);

    for args in ["verify", "verify --archive"] {
        let (code, out) = on_pty(&env, args);
        assert_eq!(code, 0, "{args} on a pty:\n{out}");
        assert!(
            out.contains(&format!("/{FILES} files checked in S3")),
            "{args}: no bar:\n{out}"
        );
        assert!(out.contains("ETA "), "{args}: no ETA:\n{out}");
        assert!(
            out.contains(&format!("checked {FILES} uploaded file(s)")),
            "{args}: no summary:\n{out}"
        );
        if args.contains("--archive") {
            assert!(
                out.contains(&format!("/{FILES} files hashed in the archive")),
                "{args}: no archive bar:\n{out}"
            );
        }
    }
}

#[test]
fn piped_there_is_no_bar_and_every_log_line_stays() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3::start(dir.path());
    let env = Env::for_s3(&s3);
    drop_files(&env, "pipe");
    let out = env
        .command(&["sync", "--once", "--timeout", "5m"])
        .stdin(Stdio::null())
        .output()
        .expect("run ferry");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(!err.contains('\x1b'), "escape codes off a terminal:\n{err}");
    assert!(!err.contains("ETA"), "a bar off a terminal:\n{err}");
    assert_eq!(count(&err, "uploaded and verified"), FILES, "{err}");
    assert_eq!(
        err.lines().filter(|l| l.contains(" archived key=")).count(),
        FILES,
        "{err}"
    );
    // The one summary line scripts read, unchanged.
    assert!(
        err.contains(&format!(
            "ferry sync --once: {FILES} of {FILES} archived, 0 vanished"
        )),
        "{err}"
    );
    assert!(
        !err.contains("retried,"),
        "the terminal summary off a terminal"
    );
    let v = env
        .command(&["verify"])
        .stdin(Stdio::null())
        .output()
        .expect("run ferry verify");
    let text =
        String::from_utf8_lossy(&v.stdout).into_owned() + &String::from_utf8_lossy(&v.stderr);
    assert_eq!(v.status.code(), Some(0), "{text}");
    assert!(!text.contains('\x1b') && !text.contains("ETA"), "{text}");
}
