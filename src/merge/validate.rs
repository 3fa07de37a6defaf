//! Validation, before anything is written: every store reachable, schemas this binary knows
//! (the target migrated only when asked, the sources never), no node serving any store, room
//! in the target, the privileges the merge needs. Each problem is one line naming the store and
//! what to do.

use super::MergeArgs;
use crate::node::redact;
use crate::store::Store;
use serde_json::{Value, json};
use std::time::Duration;

/// How recent a node state must be to count as a node still running.
const RECENT_NODE_STATE: Duration = Duration::from_secs(5);

/// The stores of a merge, open.
pub(super) struct Stores {
    pub sources: Vec<Store>,
    pub target: Store,
}

/// What validation found: the report (stored with the job, printed by `--validate` and
/// `--dry-run`), the problems (any one refuses the merge), and whether the target has the
/// Stoa schema now.
pub(super) struct Validation {
    pub report: Value,
    pub problems: Vec<String>,
    pub target_ready: bool,
}

/// `source N (URL)` or `target (URL)`, the password left out.
pub(super) fn label(i: Option<usize>, url: &str) -> String {
    match i {
        Some(i) => format!("source {} ({})", i + 1, redact(url)),
        None => format!("target ({})", redact(url)),
    }
}

/// Open every store and validate; `None` stores when one could not be opened.
pub(super) async fn validate(args: &MergeArgs) -> (Option<Stores>, Validation) {
    let mut problems = Vec::new();
    let mut stores_report = Vec::new();
    if args.sources.is_empty() {
        problems.push("no source: give --source URL once per store to merge".to_owned());
    }
    for (i, a) in args.sources.iter().enumerate() {
        if args.sources[..i].contains(a) {
            problems.push(format!("{} is given twice", label(Some(i), a)));
        }
        if *a == args.target {
            problems.push(format!("{} is also the target: merge into a database of its own", label(Some(i), a)));
        }
    }

    let mut sources = Vec::new();
    for (i, url) in args.sources.iter().enumerate() {
        match Store::open_read_only(url).await {
            Ok(s) => sources.push(s),
            Err(e) => problems.push(format!("{}: cannot open it ({e}): check the URL, that the server runs and that the user may log in", label(Some(i), url))),
        }
    }
    let target = match Store::open_merge_target(&args.target).await {
        Ok(t) => Some(t),
        Err(e) => {
            problems.push(format!("{}: cannot open it ({e}): check the URL, that the server runs and that the user may log in", label(None, &args.target)));
            None
        }
    };
    let (Some(target), true) = (target, sources.len() == args.sources.len()) else {
        return (None, Validation { report: json!({ "stores": stores_report }), problems, target_ready: false });
    };

    let known = Store::known_migrations();
    let mut needed_bytes: Option<u64> = Some(0);
    for (i, s) in sources.iter().enumerate() {
        let name = label(Some(i), s.url());
        let mut entry = json!({ "role": "source", "index": i + 1, "url": redact(s.url()), "backend": s.kind().as_str() });
        match s.applied_migrations().await {
            Ok(applied) => {
                entry["schema"] = json!(applied.last());
                schema_problems(&name, &applied, &known, false, &mut problems);
            }
            Err(e) => problems.push(format!("{name}: cannot read its schema version ({e}): does the user have SELECT on it?")),
        }
        serving(&name, s, &mut entry, &mut problems).await;
        match s.database_bytes().await {
            Ok(b) => {
                entry["bytes"] = json!(b);
                needed_bytes = needed_bytes.zip(b).map(|(n, b)| n + b);
            }
            Err(_) => needed_bytes = None,
        }
        stores_report.push(entry);
    }

    let name = label(None, target.url());
    let mut entry = json!({ "role": "target", "url": redact(target.url()), "backend": target.kind().as_str() });
    let mut target_ready = false;
    // Whether a node serves it first: never migrate a store in use, nor after any problem.
    serving(&name, &target, &mut entry, &mut problems).await;
    match target.applied_migrations().await {
        Ok(applied) => {
            let behind = known.iter().any(|k| !applied.contains(k));
            if behind && args.migrate_target && !args.dry_run && !args.validate_only && problems.is_empty() {
                match target.migrate().await {
                    Ok(()) => {
                        entry["migrated"] = json!(true);
                        target_ready = true;
                    }
                    Err(e) => problems.push(format!("{name}: migrating it failed ({e}): does the user have CREATE on it?")),
                }
            } else if behind && args.migrate_target {
                entry["would_migrate"] = json!(true);
            } else if behind {
                problems.push(format!(
                    "{name} is not at this binary's schema ({}): add --migrate-target, or run `stoa migrate` with it as [store] url",
                    applied.last().map_or("empty".to_owned(), |v| format!("at {v}"))
                ));
            } else {
                schema_problems(&name, &applied, &known, true, &mut problems);
                target_ready = !applied.iter().any(|a| !known.contains(a));
            }
            entry["schema"] = json!(if target_ready { known.last().cloned() } else { applied.last().cloned() });
        }
        Err(e) => problems.push(format!("{name}: cannot read its schema version ({e})")),
    }
    if target_ready && let Err(e) = target.probe_merge_privileges().await {
        problems.push(format!("{name}: the user lacks a privilege the merge needs (SELECT, INSERT, UPDATE, DELETE on the Stoa tables): {e}"));
    }
    let free = match target.data_directory().await {
        Ok(Some(dir)) if is_local(target.url()) => free_bytes(&dir),
        _ => None,
    };
    entry["free_bytes"] = json!(free);
    entry["needed_bytes_estimate"] = json!(needed_bytes);
    if let (Some(free), Some(needed)) = (free, needed_bytes)
        && needed > free
    {
        problems.push(format!("{name}: about {} MB are needed (the sources' size) and {} MB are free: make room first", needed >> 20, free >> 20));
    }
    stores_report.push(entry);
    (Some(Stores { sources, target }), Validation { report: json!({ "stores": stores_report }), problems, target_ready })
}

fn schema_problems(name: &str, applied: &[String], known: &[String], target: bool, problems: &mut Vec<String>) {
    if let Some(unknown) = applied.iter().find(|a| !known.contains(a)) {
        problems.push(format!("{name} has migration {unknown}, which this stoa does not know: use the stoa version that wrote it"));
    } else if applied.is_empty() {
        problems.push(format!("{name} has no Stoa schema: is it the right database?"));
    } else if !target && let Some(missing) = known.iter().find(|k| !applied.contains(k)) {
        problems.push(format!(
            "{name} is at an older schema (it lacks {missing}): sources are never migrated; run `stoa migrate` on it (or on a copy) first"
        ));
    }
}

async fn serving(name: &str, store: &Store, entry: &mut Value, problems: &mut Vec<String>) {
    match store.serving_evidence(RECENT_NODE_STATE).await {
        Ok(evidence) => {
            entry["served_by_a_node"] = json!(evidence);
            if !evidence.is_empty() {
                problems.push(format!(
                    "{name} is in use: {}. Stop the rooms service of every node on it (stop the node), then merge again",
                    evidence.join("; ")
                ));
            }
        }
        Err(e) => problems.push(format!("{name}: cannot tell whether a node serves it ({e})")),
    }
}

/// Whether the database server of `url` runs on this machine (its data directory is then
/// ours to measure).
fn is_local(url: &str) -> bool {
    url::Url::parse(&url.replacen("mariadb:", "mysql:", 1))
        .map(|u| u.scheme() == "sqlite" || matches!(u.host_str(), None | Some("localhost" | "127.0.0.1" | "[::1]" | "::1" | "")))
        .unwrap_or(false)
}

/// Free bytes for an unprivileged writer on the file system of `dir`.
fn free_bytes(dir: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: a zeroed statvfs is a valid out-parameter; `path` is a NUL-terminated string
    // that outlives the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: see above.
    let r = unsafe { libc::statvfs(path.as_ptr(), &mut st) };
    (r == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
}
