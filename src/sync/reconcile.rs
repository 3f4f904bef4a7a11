//! `ferry verify [--repair]`: compares the catalog, the bucket and the archive, and with
//! `--repair` re-uploads from the archive (or spool) copy any object missing or different in S3.
//! Also archive retention: a copy older than `archive.retain` is deleted only after a fresh
//! HEAD confirms that S3 still holds the same SHA-256.

use std::collections::HashMap;
use std::sync::Arc;

use base64::Engine;

use crate::catalog::{ops, State};
use crate::key::Key;
use crate::sync::upload::Ctx;

/// One inconsistency, printed as a line.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Finding {
    pub key: String,
    pub problem: String,
    /// What `--repair` did about it, if anything.
    pub repair: Option<String>,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct Report {
    pub checked: usize,
    pub findings: Vec<Finding>,
    /// Objects under the prefix that the catalog does not know (other nodes' uploads, or
    /// files put there by hand). Reported, never touched.
    pub unknown_objects: usize,
    /// Findings still unresolved (after repair, if asked).
    pub unresolved: usize,
    /// Archive copies hashed (`--archive`).
    pub archive_checked: usize,
}

/// Which archive copies `ferry verify --archive` hashes.
#[derive(Debug, Clone, Copy, Default)]
pub struct ArchiveCheck {
    /// Only rows archived within this long.
    pub since: Option<std::time::Duration>,
    /// Only this many, at random.
    pub sample: Option<usize>,
}

/// Hashes archive copies and reports every one that differs from the catalog's SHA-256 or
/// is missing. Nothing is changed: the copy may be the only evidence of what happened.
pub async fn check_archive(
    ctx: &Ctx,
    what: ArchiveCheck,
    report: &mut Report,
    progress: &crate::progress::Progress,
) -> anyhow::Result<()> {
    let since_ms = what.since.map(crate::catalog::ago).unwrap_or(i64::MIN);
    let sample = what.sample;
    let rows = ctx
        .catalog
        .read(move |c| ops::archived_rows(c, since_ms, sample))
        .await?;
    progress.update(|c| {
        c.files_total = rows.len() as u64;
        c.bytes_total = rows.iter().map(|r| r.stat.size).sum();
    });
    let findings_before = report.findings.len();
    let mut bytes_done = 0u64;
    for (done, row) in rows.into_iter().enumerate() {
        // Counted at the top: the rows before this one are done with, whichever way the
        // loop went on for them.
        let found = (report.findings.len() - findings_before) as u64;
        progress.update(|c| {
            c.files_done = done as u64;
            c.bytes_done = bytes_done;
            c.failures = found;
        });
        bytes_done += row.stat.size;
        let (Some(sha), Ok(key)) = (row.sha256.clone(), Key::new(&row.key, &ctx.cfg.s3.prefix))
        else {
            continue;
        };
        report.archive_checked += 1;
        let path = crate::sync::archive::find_copy(&ctx.archive, &key, row.stat.size)
            .unwrap_or_else(|| key.path_in(&ctx.archive));
        let p = path.clone();
        let got =
            tokio::task::spawn_blocking(move || crate::sync::archive::sha256_file(&p)).await?;
        let problem = match got {
            Ok(h) if h == sha => continue,
            Ok(h) => format!(
                "archive copy {} has SHA-256 {h}, the catalog (and S3) {sha}; left untouched",
                path.display()
            ),
            Err(e) => format!("archive copy {}: {e}", path.display()),
        };
        report.findings.push(Finding {
            key: row.key.clone(),
            problem,
            repair: None,
        });
        report.unresolved += 1;
    }
    let found = (report.findings.len() - findings_before) as u64;
    progress.update(|c| {
        c.files_done = c.files_total;
        c.bytes_done = c.bytes_total;
        c.failures = found;
    });
    Ok(())
}

/// Why S3's copy of `row` is not the catalog's, if it is not.
async fn s3_problem(ctx: &Ctx, key: &str, size: u64, sha: &str) -> Option<String> {
    s3_check(ctx, key, size, sha, true).await
}

/// Like [`s3_problem`], but only S3's own evidence counts: a full-object SHA-256 checksum,
/// else the object read back and hashed. Our `sha256` user metadata is what we said, not
/// what S3 holds, so it never licenses deleting a copy.
async fn s3_strict_problem(ctx: &Ctx, key: &str, size: u64, sha: &str) -> Option<String> {
    s3_check(ctx, key, size, sha, false).await
}

/// HEAD (size, deletion marker, full-object checksum), then our `sha256` metadata when
/// `trust_metadata`, else the object read back.
async fn s3_check(
    ctx: &Ctx,
    key: &str,
    size: u64,
    sha: &str,
    trust_metadata: bool,
) -> Option<String> {
    let obj = format!("{}{}", ctx.cfg.s3.prefix, key);
    let h = match ctx.store.head(&obj).await {
        Err(e) if e.is_not_found() => return Some("missing in S3".into()),
        Err(e) => return Some(format!("cannot HEAD: {}", e.message)),
        Ok(h) => h,
    };
    if h.metadata.contains_key("ferry-deleted") {
        return Some("S3 holds a deletion marker".into());
    }
    if h.size != size {
        return Some(format!("S3 has {} bytes, catalog {}", h.size, size));
    }
    let b64 = hex::decode(sha)
        .map(|b| base64::engine::general_purpose::STANDARD.encode(b))
        .unwrap_or_default();
    if let Some(c) = h.checksum_sha256.as_deref().filter(|c| !c.contains('-')) {
        return (c != b64).then(|| format!("S3's SHA-256 {c} is not the catalog's {b64}"));
    }
    if trust_metadata {
        match h.metadata.get("sha256") {
            Some(m) if m.eq_ignore_ascii_case(sha) => return None,
            Some(m) => {
                return Some(format!(
                    "S3 object metadata says SHA-256 {m}, catalog {sha}"
                ))
            }
            None => {}
        }
    }
    // Nothing cheap to compare (or nothing we may trust): read it back.
    match ctx.store.read_back(&obj).await {
        Ok((n, s)) if n == size && s == sha => None,
        Ok((_, s)) => Some(format!("S3 holds SHA-256 {s}, catalog {sha}")),
        Err(e) => Some(format!("cannot read back: {}", e.message)),
    }
}

pub async fn run(
    ctx: Arc<Ctx>,
    repair: bool,
    progress: &crate::progress::Progress,
) -> anyhow::Result<Report> {
    let rows = ctx
        .catalog
        .read(|c| ops::rows_in(c, &[State::Verified, State::Archived]))
        .await?;
    let mut report = Report::default();
    let listing: HashMap<String, u64> = ctx.store.list_all().await?.into_iter().collect();
    let mut known = std::collections::HashSet::new();
    for row in &rows {
        known.insert(format!("{}{}", ctx.cfg.s3.prefix, row.key));
    }
    let deleted = ctx
        .catalog
        .read(|c| ops::rows_in(c, &[State::Deleted]))
        .await?;
    for row in &deleted {
        known.insert(format!("{}{}", ctx.cfg.s3.prefix, row.key));
    }
    report.unknown_objects = listing.keys().filter(|k| !known.contains(*k)).count();

    progress.update(|c| {
        c.files_total = rows.len() as u64;
        c.bytes_total = rows.iter().map(|r| r.stat.size).sum();
    });
    let mut bytes_done = 0u64;
    for (done, row) in rows.into_iter().enumerate() {
        // Counted at the top: the rows before this one are done with, whichever way the
        // loop went on for them.
        let found = report.findings.len() as u64;
        progress.update(|c| {
            c.files_done = done as u64;
            c.bytes_done = bytes_done;
            c.failures = found;
        });
        bytes_done += row.stat.size;
        report.checked += 1;
        let Some(sha) = row.sha256.clone() else {
            continue;
        };
        let Ok(key) = Key::new(&row.key, &ctx.cfg.s3.prefix) else {
            continue;
        };
        let archive_copy = crate::sync::archive::find_copy(&ctx.archive, &key, row.stat.size)
            .unwrap_or_else(|| key.path_in(&ctx.archive));
        if row.state == State::Archived && !archive_copy.is_file() {
            report.findings.push(Finding {
                key: row.key.clone(),
                problem: "archive copy missing".into(),
                repair: None,
            });
        }
        let Some(problem) = s3_problem(&ctx, &row.key, row.stat.size, &sha).await else {
            continue;
        };
        let mut finding = Finding {
            key: row.key.clone(),
            problem,
            repair: None,
        };
        if repair {
            let spool_copy = key.path_in(&ctx.spool);
            let source = [archive_copy, spool_copy]
                .into_iter()
                .find(|p| p.symlink_metadata().is_ok_and(|m| m.is_file()));
            finding.repair = Some(match source {
                None => "no archive or spool copy to re-upload from".into(),
                Some(p) => match ctx.upload_copy(&key, row.gen, &p, &sha).await {
                    Ok(()) => format!("re-uploaded from {} and verified", p.display()),
                    Err(e) => format!("re-upload failed: {e}"),
                },
            });
        }
        report.findings.push(finding);
    }
    let found = report.findings.len() as u64;
    progress.update(|c| {
        c.files_done = c.files_total;
        c.bytes_done = c.bytes_total;
        c.failures = found;
    });
    report.unresolved = report
        .findings
        .iter()
        .filter(|f| {
            !f.repair
                .as_deref()
                .is_some_and(|r| r.starts_with("re-uploaded"))
        })
        .count();
    Ok(report)
}

/// Deletes archive copies older than `retain` whose object S3 still holds with the same
/// SHA-256 (a fresh HEAD). Anything unconfirmed is kept and logged. Returns how many went.
pub async fn prune_archive(ctx: &Ctx, retain: std::time::Duration) -> anyhow::Result<usize> {
    let before = crate::catalog::ago(retain);
    let rows = ctx
        .catalog
        .read(move |c| ops::prunable(c, before, 1000))
        .await?;
    let mut pruned = 0;
    for row in rows {
        let (Some(sha), Ok(key)) = (row.sha256.clone(), Key::new(&row.key, &ctx.cfg.s3.prefix))
        else {
            continue;
        };
        let path = key.path_in(&ctx.archive);
        if path.symlink_metadata().is_ok() {
            // The copy's own bytes first: deleting a copy that is not what S3 holds would
            // lose the only one of its kind.
            let p = path.clone();
            let ino = match tokio::task::spawn_blocking(move || {
                crate::sync::archive::sha256_with_inode(&p)
            })
            .await?
            {
                Ok((h, ino)) if h == sha => ino,
                Ok((h, _)) => {
                    tracing::warn!(key = %row.key, path = %path.display(), sha256 = %h, catalog = %sha, "archive copy kept past archive.retain: its bytes are not the verified ones");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(key = %row.key, error = %e, "archive copy kept past archive.retain: cannot hash it");
                    continue;
                }
            };
            if let Some(problem) = s3_strict_problem(ctx, &row.key, row.stat.size, &sha).await {
                tracing::warn!(key = %row.key, problem, "archive copy kept past archive.retain: S3 does not confirm it");
                continue;
            }
            // A newer version may have been archived under this name while S3 was asked:
            // only the copy that was hashed goes.
            let p = path.clone();
            match tokio::task::spawn_blocking(move || crate::sync::archive::remove_if_same(&p, ino))
                .await?
            {
                Ok(true) => {}
                Ok(false) => {
                    tracing::info!(key = %row.key, "archive copy replaced by a newer version meanwhile; kept");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(key = %row.key, error = %e, "cannot remove an expired archive copy");
                    continue;
                }
            }
            if let Some(parent) = path.parent() {
                crate::sync::archive::remove_empty_parents(
                    &ctx.archive,
                    parent,
                    std::time::Duration::ZERO,
                    std::time::SystemTime::now(),
                );
            }
            tracing::info!(key = %row.key, "archive copy removed after archive.retain (S3 re-confirmed)");
            pruned += 1;
        }
        let (k, gen) = (row.key.clone(), row.gen);
        ctx.catalog
            .write(move |c| ops::mark_pruned(c, &k, gen))
            .await?;
    }
    Ok(pruned)
}
