//! `stoa db …`: merge stores (`db merge`), and the merge jobs recorded in a store (`db jobs`,
//! `db job ID`). docs/merge.md.

use super::DbCommand;
use crate::merge::{JobOutcome, MergeArgs, Progress, Rules, job_json};
use crate::store::Store;
use anyhow::Context as _;
use serde_json::Value;
use std::io::IsTerminal as _;

/// Run `stoa db COMMAND`; `store_url` is the config's store (the default for `jobs` and `job`).
pub async fn run(store_url: impl FnOnce() -> anyhow::Result<String>, command: DbCommand) -> anyhow::Result<()> {
    match command {
        DbCommand::Merge(m) => {
            let mut rules = Rules::default();
            for spec in &m.on_conflict {
                rules.set(spec).map_err(|e| anyhow::anyhow!("--on-conflict {e}"))?;
            }
            let args = MergeArgs {
                sources: m.source,
                target: m.target,
                rules,
                dry_run: m.dry_run,
                validate_only: m.validate,
                migrate_target: m.migrate_target,
                job: m.job,
                chunk_rows: m.chunk_rows,
                chunk_pause: std::time::Duration::from_millis(m.chunk_pause_ms),
            };
            let json = m.format == "json";
            let writes = !args.dry_run && !args.validate_only;
            if writes && !m.yes {
                anyhow::ensure!(std::io::stdin().is_terminal(), "a merge writes the target: add --yes (or try --dry-run first)");
                let preview = crate::merge::merge(&MergeArgs { dry_run: true, ..args.clone() }, &Progress::new(false, true)).await;
                match preview {
                    Ok(JobOutcome::Planned { report }) => print!("{}", report_text(&report)),
                    Ok(_) => {}
                    Err(e) => return Err(e.into()),
                }
                eprint!("merge into {}? [y/N] ", crate::node::redact(&args.target));
                let mut answer = String::new();
                std::io::stdin().read_line(&mut answer).context("reading the answer")?;
                anyhow::ensure!(matches!(answer.trim(), "y" | "Y" | "yes"), "not merged");
            }
            let progress = Progress::new(std::io::stderr().is_terminal(), json);
            match crate::merge::merge(&args, &progress).await? {
                JobOutcome::Validated { report } | JobOutcome::Planned { report } => {
                    if json {
                        println!("{}", serde_json::to_string_pretty(&report)?);
                    } else {
                        print!("{}", report_text(&report));
                        println!("{}", if args.validate_only { "validation passed" } else { "dry run: nothing was written" });
                    }
                }
                JobOutcome::Done { job, already_done } => {
                    let v = job_json(&job);
                    if json {
                        println!("{}", serde_json::to_string_pretty(&v)?);
                    } else {
                        if already_done {
                            println!("job {} had finished: nothing to do", job.id);
                        }
                        print!("{}", job_text(&v));
                    }
                }
            }
        }
        DbCommand::Jobs { store, format } => {
            let store = open(store, store_url).await?;
            let jobs = store.merge_jobs().await.context("reading the merge jobs")?;
            let jobs: Vec<Value> = jobs.iter().map(job_json).collect();
            if format == "json" {
                println!("{}", serde_json::to_string_pretty(&jobs)?);
            } else {
                println!("{:<36} {:<8} {:<23} {:<23} COUNTS", "ID", "STATE", "STARTED", "FINISHED");
                for j in &jobs {
                    println!("{:<36} {:<8} {:<23} {:<23} {}", super::cell(&j["id"]), super::cell(&j["state"]), super::cell(&j["started"]), super::cell(&j["finished"]), counts_text(&j["counts"]));
                }
                if jobs.is_empty() {
                    println!("(no merge jobs)");
                }
            }
        }
        DbCommand::Job { id, store, format } => {
            let store = open(store, store_url).await?;
            let job = store.merge_job(&id).await.context("reading the merge job")?.with_context(|| format!("no merge job {id}"))?;
            let v = job_json(&job);
            if format == "json" {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", job_text(&v));
                print!("{}", report_text(&v["report"]));
            }
        }
    }
    Ok(())
}

async fn open(store: Option<String>, default: impl FnOnce() -> anyhow::Result<String>) -> anyhow::Result<Store> {
    let url = match store {
        Some(url) => url,
        None => default()?,
    };
    Store::open_read_only(&url).await.with_context(|| format!("opening {}", crate::node::redact(&url)))
}

fn counts_text(counts: &Value) -> String {
    let Some(map) = counts.as_object() else { return "-".into() };
    ["rooms", "users", "messages", "duplicates_dropped"]
        .iter()
        .filter_map(|k| map.get(*k).map(|v| format!("{k}={v}")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A job for people: its line, counts, error, and the verification per room.
fn job_text(v: &Value) -> String {
    let mut out = format!(
        "job {}: {} (started {}, finished {})\n",
        super::cell(&v["id"]),
        super::cell(&v["state"]),
        super::cell(&v["started"]),
        super::cell(&v["finished"])
    );
    out.push_str(&format!("  counts: {}\n", counts_text(&v["counts"])));
    if let Some(e) = v["error"].as_str() {
        out.push_str(&format!("  error: {e}\n"));
    }
    if let Some(rooms) = v["verification"]["rooms"].as_array() {
        out.push_str(&format!("  verification: {}\n", if v["verification"]["ok"] == true { "every room matches its sources" } else { "MISMATCH" }));
        for r in rooms {
            out.push_str(&format!(
                "    {} {} messages (expected {}), checksum {} {}\n",
                if r["ok"] == true { "ok " } else { "BAD" },
                r["messages"],
                r["expected_messages"],
                super::cell(&r["checksum"]),
                super::cell(&r["room"]),
            ));
        }
    }
    out
}

/// A validation report or dry run for people: the stores, what would be merged, the conflicts.
fn report_text(report: &Value) -> String {
    let mut out = String::new();
    for s in report["stores"].as_array().into_iter().flatten() {
        let role = match s["index"].as_u64() {
            Some(i) => format!("source {i}"),
            None => "target".into(),
        };
        out.push_str(&format!("{role}: {} ({}), schema {}", super::cell(&s["url"]), super::cell(&s["backend"]), super::cell(&s["schema"])));
        if let Some(free) = s["free_bytes"].as_u64() {
            out.push_str(&format!(", {} MB free", free >> 20));
        }
        out.push('\n');
    }
    for s in report["sources"].as_array().into_iter().flatten() {
        let c = &s["counts"];
        out.push_str(&format!(
            "source {}: {} rooms, {} messages, {} users, {} affiliations, {} plugin state keys\n",
            s["source"], c["rooms"], c["messages"], c["users"], c["affiliations"], c["plugin_state"]
        ));
    }
    if report["plan"].is_object() {
        let p = &report["plan"];
        out.push_str(&format!(
            "target gets: {} rooms ({} from several sources), {} users, {} messages read\n",
            p["rooms"], p["rooms_from_several_sources"], p["users"], p["messages_read"]
        ));
    }
    let conflicts: Vec<crate::merge::Conflict> = serde_json::from_value(report["conflicts"].clone()).unwrap_or_default();
    out.push_str(&format!("conflicts: {}\n", conflicts.len()));
    for c in conflicts {
        out.push_str(&format!("  {}\n", c.line()));
    }
    out
}
