//! Running a merge: validation, the plan, the job's chunks in the target, the verification.

use super::plan::{self, Plan, SourceInventory};
use super::validate::{self, Stores, label};
use super::{Conflict, MergeArgs, MergeError, Rules};
use crate::node::redact;
use crate::store::Store;
use crate::store::merge::{ChunkWrite, JobRow, SourceRoom};
use serde_json::{Value, json};
use sha2::Digest as _;
use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Users per chunk.
const USER_CHUNK_ROWS: usize = 1000;

/// Messages per chunk (one transaction of the target each), unless told otherwise.
pub const DEFAULT_CHUNK_ROWS: usize = 5000;

/// How a merge ended (errors are [`MergeError`]).
#[derive(Debug)]
pub enum JobOutcome {
    /// `--validate`: the report, no problem found.
    Validated { report: Value },
    /// `--dry-run`: the report with the plan and every conflict.
    Planned { report: Value },
    /// The job ran (or had run: `already_done`) and verified.
    Done { job: JobRow, already_done: bool },
}

/// Progress of a job: a bar at a terminal, otherwise a plain line every few seconds.
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    plain: bool,
    state: Mutex<(Instant, u64, u64)>,
}

/// How often a plain progress line is printed.
const PLAIN_PROGRESS_EVERY: Duration = Duration::from_secs(2);

impl Progress {
    /// A bar (`terminal`), plain lines on stderr, or nothing (`quiet`).
    pub fn new(terminal: bool, quiet: bool) -> Progress {
        let bar = (terminal && !quiet).then(|| {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{elapsed:>4} [{bar:40}] {pos}/{len} messages ({per_sec}, {eta} left) {msg}")
                    .expect("valid template"),
            );
            bar
        });
        Progress { bar, plain: !terminal && !quiet, state: Mutex::new((Instant::now(), 0, 0)) }
    }

    fn start(&self, total: u64) {
        if let Some(bar) = &self.bar {
            bar.set_length(total);
        }
        *self.state.lock().expect("progress lock") = (Instant::now(), 0, total);
    }

    fn advance(&self, messages: u64, room: &str) {
        if let Some(bar) = &self.bar {
            bar.inc(messages);
            bar.set_message(room.to_owned());
        }
        let mut state = self.state.lock().expect("progress lock");
        state.1 += messages;
        if self.plain && state.0.elapsed() >= PLAIN_PROGRESS_EVERY {
            state.0 = Instant::now();
            eprintln!("merge: {}/{} messages, at {room}", state.1, state.2);
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        if self.plain {
            let state = self.state.lock().expect("progress lock");
            eprintln!("merge: {}/{} messages written or already there", state.1, state.2);
        }
    }
}

/// The options a job keeps (a resumed job runs with these, not the command line's).
#[derive(serde::Serialize, serde::Deserialize)]
struct JobOptions {
    rules: Rules,
    chunk_rows: usize,
    /// SHA-256 of what was read from the sources: a resumed job refuses sources that changed.
    fingerprint: String,
}

/// Validate, plan, and (unless a dry run) run or resume the job.
pub async fn merge(args: &MergeArgs, progress: &Progress) -> Result<JobOutcome, MergeError> {
    let (stores, validation) = validate::validate(args).await;
    let Some(Stores { sources, target }) = stores else { return Err(MergeError::Refused(validation.problems)) };
    let mut problems = validation.problems;
    let mut report = validation.report;

    // A resumed job runs with its own options.
    let mut rules = args.rules;
    let mut chunk_rows = args.chunk_rows.max(1);
    let mut resumed: Option<(JobRow, JobOptions)> = None;
    if let Some(id) = &args.job {
        let job = if validation.target_ready { target.merge_job(id).await.map_err(MergeError::store("reading the job"))? } else { None };
        let Some(job) = job else { return Err(MergeError::Refused(vec![format!("{}: no job {id}", label(None, &args.target))])) };
        if job.state == "done" {
            return Ok(JobOutcome::Done { job, already_done: true });
        }
        if job.state == "refused" {
            return Err(MergeError::Refused(vec![format!("job {id} was refused at validation and wrote nothing: start a new merge (without --job)")]));
        }
        let options: JobOptions = serde_json::from_str(&job.options)
            .map_err(|e| MergeError::Refused(vec![format!("job {id}: its options are unreadable ({e})")]))?;
        rules = options.rules;
        chunk_rows = options.chunk_rows;
        resumed = Some((job, options));
    }
    if !problems.is_empty() && (args.validate_only || resumed.is_some()) {
        return Err(MergeError::Refused(problems));
    }
    if args.validate_only {
        return Ok(JobOutcome::Validated { report });
    }

    // Read the sources and plan.
    let mut inventories = Vec::new();
    let mut per_source = Vec::new();
    let mut fingerprint = sha2::Sha256::new();
    let mut room_messages: BTreeMap<(usize, i64), u64> = BTreeMap::new();
    for (i, s) in sources.iter().enumerate() {
        let name = label(Some(i), s.url());
        let counts = s.merge_counts().await.map_err(MergeError::store(format!("reading {name}")))?;
        let rooms = s.merge_rooms().await.map_err(MergeError::store(format!("reading the rooms of {name}")))?;
        let users = s.merge_users().await.map_err(MergeError::store(format!("reading the users of {name}")))?;
        let by_room = s.merge_message_counts().await.map_err(MergeError::store(format!("counting the messages of {name}")))?;
        fingerprint.update(format!("source {i}\n"));
        for r in &rooms {
            let n = by_room.get(&r.id).copied().unwrap_or(0);
            room_messages.insert((i, r.id), n);
            fingerprint.update(format!("{}\t{}\t{}\t{n}\n", r.address, r.last_seq, r.epoch));
        }
        for u in &users {
            fingerprint.update(format!("{}\t{}\n", u.name, u.password_hash));
        }
        fingerprint.update(format!("{counts:?}\n"));
        per_source.push(json!({ "source": i + 1, "url": redact(s.url()), "backend": s.kind().as_str(), "counts": counts }));
        inventories.push(SourceInventory { rooms, users });
    }
    let fingerprint = hex::encode(fingerprint.finalize());
    let plan = plan::plan(&inventories, &rules);
    drop(inventories);
    let mut conflicts = plan.conflicts.clone();

    // Conflicts inside rooms: read up front when a rule refuses them or for a dry run.
    if args.dry_run || rules.affiliations == super::AffiliationRule::Refuse || rules.messages == super::MessageRule::Refuse {
        for room in plan.rooms.iter().filter(|r| r.parts.len() > 1) {
            conflicts.extend(room_content(&sources, room, &rules).await?.conflicts);
        }
    }
    problems.extend(conflicts.iter().filter(|c| c.refused).map(|c| format!("conflict: {}", c.line())));

    if let Some((job, options)) = &resumed
        && options.fingerprint != fingerprint
    {
        problems.push(format!("job {}: the sources changed since it started (rooms, messages or users differ): start a new job into an empty target", job.id));
    }

    // The target must not hold what the job will write, except what this job wrote itself.
    let done = match (&resumed, validation.target_ready) {
        (Some((job, _)), _) => target.merge_chunks_done(&job.id).await.map_err(MergeError::store("reading the job's chunks"))?,
        _ => BTreeMap::new(),
    };
    if validation.target_ready {
        let ours: HashSet<String> = plan.rooms.iter().enumerate().filter(|(n, _)| done.contains_key(&format!("room/{n}"))).map(|(_, r)| r.address.clone()).collect();
        let addresses: Vec<String> = plan.rooms.iter().map(|r| r.address.clone()).filter(|a| !ours.contains(a)).collect();
        let taken = target.existing_rooms(&addresses).await.map_err(MergeError::store("reading the target's rooms"))?;
        let mut taken: Vec<&String> = taken.iter().collect();
        taken.sort();
        if !taken.is_empty() {
            problems.push(format!(
                "{} already has {} of the rooms to merge ({}{}): merge into an empty target, or resume the job that wrote them with --job",
                label(None, &args.target),
                taken.len(),
                taken.iter().take(5).map(|s| s.as_str()).collect::<Vec<_>>().join(", "),
                if taken.len() > 5 { ", …" } else { "" }
            ));
        }
        let ours: HashSet<String> = plan
            .users
            .chunks(USER_CHUNK_ROWS)
            .enumerate()
            .filter(|(k, _)| done.contains_key(&format!("users/{k}")))
            .flat_map(|(_, page)| page.iter().map(|u| u.name.clone()))
            .collect();
        let names: Vec<String> = plan.users.iter().map(|u| u.name.clone()).filter(|n| !ours.contains(n)).collect();
        let taken = target.existing_users(&names).await.map_err(MergeError::store("reading the target's users"))?;
        if !taken.is_empty() {
            let mut taken: Vec<String> = taken.into_iter().collect();
            taken.sort();
            problems.push(format!("{} already has the users {}: merge into a target without them", label(None, &args.target), taken.join(", ")));
        }
    }

    let total_messages: u64 = plan.rooms.iter().flat_map(|r| r.parts.iter().map(|(i, row)| room_messages.get(&(*i, row.id)).copied().unwrap_or(0))).sum();
    report["sources"] = json!(per_source);
    report["plan"] = json!({ "rooms": plan.rooms.len(), "users": plan.users.len(), "messages_read": total_messages, "rooms_from_several_sources": plan.rooms.iter().filter(|r| r.parts.len() > 1).count() });
    report["conflicts"] = json!(conflicts);
    report["problems"] = json!(problems);
    if args.dry_run {
        return if problems.is_empty() { Ok(JobOutcome::Planned { report }) } else { Err(MergeError::Refused(problems)) };
    }
    if !problems.is_empty() {
        if validation.target_ready && resumed.is_none() {
            // Recorded so that `stoa db jobs` shows the refusal and its reasons; no data is written.
            let job = new_job(args, &rules, chunk_rows, &fingerprint, &report, "refused", Some(problems.join("\n")));
            // Best effort: the refusal may be that the user cannot write the target at all.
            if let Err(e) = target.insert_merge_job(&job).await {
                problems.push(format!("(the refused job could not be recorded in the target: {e})"));
            }
        }
        return Err(MergeError::Refused(problems));
    }

    let mut job = match resumed {
        Some((job, _)) => job,
        None => {
            let job = new_job(args, &rules, chunk_rows, &fingerprint, &report, "running", None);
            target.insert_merge_job(&job).await.map_err(MergeError::store("recording the job"))?;
            eprintln!("merge job {} started", job.id);
            job
        }
    };
    if job.state != "running" {
        job.state = "running".into();
        job.error = None;
        target.update_merge_job(&job).await.map_err(MergeError::store("recording the job"))?;
        eprintln!("merge job {} resumed ({} chunk(s) already done)", job.id, done.len());
    }

    let checker = Store::open_merge_target(&args.target).await.map_err(MergeError::store("opening a second connection to the target"))?;
    let run = Run { target: &target, checker: &checker, sources: &sources, job: job.id.clone(), done: &done, rules, chunk_rows, pause: args.chunk_pause, progress };
    progress.start(total_messages);
    let outcome = run.chunks(&plan).await;
    progress.finish();
    let (verified, written, skipped, room_conflicts) = match outcome {
        Ok(x) => x,
        Err(e) => {
            job.state = "failed".into();
            job.error = Some(e.to_string());
            job.finished_at = Some(crate::store::now_ms());
            let _ = target.update_merge_job(&job).await;
            return Err(e);
        }
    };
    conflicts.extend(room_conflicts);

    let failed = verified.iter().filter(|r| r["ok"] != true).count();
    let merged: u64 = verified.iter().map(|r| r["expected_messages"].as_u64().unwrap_or(0)).sum();
    let verification = json!({ "ok": failed == 0, "rooms": verified });
    let mut report: Value = serde_json::from_str(&job.report).unwrap_or(report);
    report["conflicts"] = json!(conflicts);
    job.report = report.to_string();
    job.counts = json!({
        "rooms": plan.rooms.len(),
        "users": plan.users.len(),
        "messages": merged,
        "messages_read": total_messages,
        "duplicates_dropped": total_messages - merged,
        "conflicts": conflicts.len(),
        "chunks_written": written,
        "chunks_already_done": skipped,
    })
    .to_string();
    job.verification = Some(verification.to_string());
    job.finished_at = Some(crate::store::now_ms());
    job.state = if failed == 0 { "done" } else { "failed" }.into();
    if failed > 0 {
        job.error = Some(format!("verification failed for {failed} room(s)"));
    }
    target.update_merge_job(&job).await.map_err(MergeError::store("recording the job's end"))?;
    if failed > 0 {
        return Err(MergeError::Verification(failed, job.id));
    }
    Ok(JobOutcome::Done { job, already_done: false })
}

fn new_job(args: &MergeArgs, rules: &Rules, chunk_rows: usize, fingerprint: &str, report: &Value, state: &str, error: Option<String>) -> JobRow {
    let options = JobOptions { rules: *rules, chunk_rows, fingerprint: fingerprint.to_owned() };
    JobRow {
        id: uuid::Uuid::now_v7().to_string(),
        state: state.into(),
        started_at: crate::store::now_ms(),
        finished_at: (state != "running").then(crate::store::now_ms),
        sources: json!({ "sources": args.sources.iter().map(|s| redact(s)).collect::<Vec<_>>(), "target": redact(&args.target) }).to_string(),
        options: serde_json::to_string(&options).expect("options serialize"),
        report: report.to_string(),
        counts: "{}".into(),
        verification: None,
        error,
    }
}

/// A target room's content from its sources.
struct RoomContent {
    row: crate::store::entity::room::Model,
    affiliations: Vec<crate::store::entity::affiliation::Model>,
    plugin_state: Vec<crate::store::plugin_state::entity::Model>,
    history: Vec<crate::store::entity::message::Model>,
    conflicts: Vec<Conflict>,
    /// Messages read per source.
    from_sources: Vec<(usize, u64)>,
}

async fn room_content(sources: &[Store], room: &plan::PlannedRoom, rules: &Rules) -> Result<RoomContent, MergeError> {
    let mut parts: Vec<(usize, SourceRoom)> = Vec::new();
    let mut histories = Vec::new();
    let mut from_sources = Vec::new();
    for (i, row) in &room.parts {
        let name = label(Some(*i), sources[*i].url());
        let id = row.id;
        parts.push((*i, sources[*i].merge_room_parts(row.clone()).await.map_err(MergeError::store(format!("reading room {} of {name}", row.address)))?));
        let history = sources[*i].merge_messages(id).await.map_err(MergeError::store(format!("reading the messages of {} in {name}", row.address)))?;
        from_sources.push((*i + 1, history.len() as u64));
        histories.push((*i, history));
    }
    let (row, affiliations, plugin_state, mut conflicts) = plan::combine_room(&room.address, &parts, rules);
    let (history, more) = plan::resequence(histories, &room.address, rules);
    conflicts.extend(more);
    Ok(RoomContent { row, affiliations, plugin_state, history, conflicts, from_sources })
}

/// What a room should hold after the merge, for the verification.
struct Expected {
    address: String,
    count: u64,
    checksum: String,
    epoch: i64,
    last_ts: i64,
    /// Messages per source room.
    from_sources: Vec<(usize, u64)>,
}

struct Run<'a> {
    target: &'a Store,
    /// A second connection to the target, for the verification.
    checker: &'a Store,
    sources: &'a [Store],
    job: String,
    done: &'a BTreeMap<String, u64>,
    rules: Rules,
    chunk_rows: usize,
    pause: Duration,
    progress: &'a Progress,
}

impl Run<'_> {
    /// Write one chunk unless the job did already; true if written.
    async fn chunk(&self, key: &str, write: ChunkWrite<'_>) -> Result<bool, MergeError> {
        if self.done.contains_key(key) {
            return Ok(false);
        }
        self.target.write_merge_chunk(&self.job, key, &write).await.map_err(MergeError::store(format!("writing chunk {key} into the target")))?;
        if !self.pause.is_zero() {
            tokio::time::sleep(self.pause).await;
        }
        Ok(true)
    }

    /// Every chunk of the plan, in order; returns the expected rooms, the chunks written and
    /// skipped, and the conflicts met inside rooms.
    async fn chunks(&self, plan: &Plan) -> Result<(Vec<Value>, u64, u64, Vec<Conflict>), MergeError> {
        let (mut written, mut skipped) = (0u64, 0u64);
        for (k, page) in plan.users.chunks(USER_CHUNK_ROWS).enumerate() {
            if self.chunk(&format!("users/{k}"), ChunkWrite::Users(page)).await? {
                written += 1;
            } else {
                skipped += 1;
            }
        }
        let mut verified = Vec::with_capacity(plan.rooms.len());
        let mut pending: Option<Expected> = None;
        let mut conflicts = Vec::new();
        // One room is read from the sources while the one before is written into the target
        // and the one before that is read back from it on a connection of its own (other
        // connections, other database processes): reads, writes and the verification overlap.
        let mut next = match plan.rooms.first() {
            Some(room) => Some(room_content(self.sources, room, &self.rules).await?),
            None => None,
        };
        for (n, room) in plan.rooms.iter().enumerate() {
            let mut c = next.take().expect("each room is read before its turn");
            if let Some(refused) = c.conflicts.iter().find(|c| c.refused) {
                return Err(MergeError::Refused(vec![format!("conflict: {}", refused.line())]));
            }
            conflicts.append(&mut c.conflicts);
            let ahead = async {
                match plan.rooms.get(n + 1) {
                    Some(room) => room_content(self.sources, room, &self.rules).await.map(Some),
                    None => Ok(None),
                }
            };
            let previous = pending.take();
            let check = async {
                match previous {
                    Some(e) => verify_room(self.checker, e).await.map(Some),
                    None => Ok(None),
                }
            };
            let (wrote, ahead, checked) = tokio::join!(self.write_room(n, &room.address, &c), ahead, check);
            let (w, s, last_ts) = wrote?;
            next = ahead?;
            verified.extend(checked?);
            written += w;
            skipped += s;
            pending = Some(Expected {
                address: room.address.clone(),
                count: c.history.len() as u64,
                checksum: plan::checksum(c.history.iter().map(|m| (m.seq, m.sender.as_str(), m.body.as_str()))),
                epoch: c.row.epoch,
                last_ts,
                from_sources: c.from_sources,
            });
        }
        if let Some(e) = pending {
            verified.push(verify_room(self.checker, e).await?);
        }
        Ok((verified, written, skipped, conflicts))
    }

    /// A room's chunks: its row, its messages, its end. Returns the chunks written and skipped,
    /// and the room's `last_ts`.
    async fn write_room(&self, n: usize, address: &str, c: &RoomContent) -> Result<(u64, u64, i64), MergeError> {
        let (mut written, mut skipped) = (0u64, 0u64);
        let mut count = |w: bool| if w { written += 1 } else { skipped += 1 };
        let room_chunk = ChunkWrite::Room { row: &c.row, affiliations: &c.affiliations, plugin_state: &c.plugin_state };
        count(self.chunk(&format!("room/{n}"), room_chunk).await?);
        for (k, part) in c.history.chunks(self.chunk_rows).enumerate() {
            count(self.chunk(&format!("room/{n}/m/{k}"), ChunkWrite::Messages { address, messages: part }).await?);
            self.progress.advance(part.len() as u64, address);
        }
        // Progress counts messages read: the duplicates dropped too.
        let read: u64 = c.from_sources.iter().map(|(_, n)| n).sum();
        self.progress.advance(read - c.history.len() as u64, address);
        let last_ts = c.history.last().map_or(0, |m| m.created_at);
        let end = ChunkWrite::RoomEnd { address, last_seq: c.history.len() as i64, last_ts, epoch: c.row.epoch };
        count(self.chunk(&format!("room/{n}/end"), end).await?);
        Ok((written, skipped, last_ts))
    }
}

/// Read a merged room back from the target: count, checksum of (seq, sender, body), last seq,
/// `last_ts` and epoch against what the sources give.
async fn verify_room(target: &Store, e: Expected) -> Result<Value, MergeError> {
    let log = target.merge_room_log(&e.address).await.map_err(MergeError::store(format!("reading room {} back from the target", e.address)))?;
    let (last_seq, last_ts, epoch, rows) = match log {
        Some((row, rows)) => (row.last_seq, row.last_ts, row.epoch, rows),
        None => (-1, -1, -1, Vec::new()),
    };
    let checksum = plan::checksum(rows.iter().map(|(seq, sender, body)| (*seq, sender.as_str(), body.as_str())));
    let ok = rows.len() as u64 == e.count && checksum == e.checksum && last_seq == e.count as i64 && epoch == e.epoch && last_ts == e.last_ts;
    Ok(json!({
        "room": e.address,
        "expected_messages": e.count,
        "messages": rows.len(),
        "expected_checksum": e.checksum,
        "checksum": checksum,
        "last_seq": last_seq,
        "last_ts": last_ts,
        "epoch": epoch,
        "from_sources": e.from_sources,
        "ok": ok,
    }))
}
