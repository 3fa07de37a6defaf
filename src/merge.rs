//! `stoa db merge`: several stores into one, as a validated, resumable job (docs/merge.md).
//!
//! The order is fixed: validate every store (`merge::validate`), read the sources and decide the
//! plan (`merge::plan`, pure), refuse on a conflict whose rule is `refuse`, then run the job in
//! chunks, each written with its record in `merge_chunks` in one transaction of the target, and
//! verify every room against the sources at the end. A chunk's content is a function of the
//! sources and the job's options alone, so a job killed anywhere and started again with
//! `--job ID` skips the chunks recorded and writes the others exactly as the first run would
//! have. The sources are opened read-only; every statement is `store::merge`'s.

mod plan;
mod run;
mod validate;

pub use run::{DEFAULT_CHUNK_ROWS, JobOutcome, Progress, merge};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// What `stoa db merge` was asked.
#[derive(Clone, Debug)]
pub struct MergeArgs {
    /// Store URLs, in order: on a tie in time, an earlier source's message comes first.
    pub sources: Vec<String>,
    pub target: String,
    pub rules: Rules,
    /// Report what would be merged and every conflict; write nothing.
    pub dry_run: bool,
    /// Validate only; write nothing.
    pub validate_only: bool,
    /// Bring the target to this binary's schema first.
    pub migrate_target: bool,
    /// Resume (or re-run) this job.
    pub job: Option<String>,
    /// Messages per chunk.
    pub chunk_rows: usize,
    /// A pause after each chunk written (for tests that kill a merge in the middle).
    pub chunk_pause: std::time::Duration,
}

/// What the same room name in two sources becomes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoomRule {
    /// One room: the union of the histories, by time, numbered again (two nodes of a pair).
    #[default]
    Union,
    /// The later source's room gets `name-N` (N: its source's position, from 1).
    Rename,
    /// Refuse the merge.
    Refuse,
}

/// What the same user with different passwords in two sources becomes (the same password
/// hash is always one account).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UserRule {
    /// Refuse the merge.
    #[default]
    Refuse,
    /// Keep the account created last (the earlier source on a tie).
    Newer,
}

/// Two standings of one user in one room.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AffiliationRule {
    /// owner > admin > member > outcast > none.
    #[default]
    Stronger,
    /// Refuse the merge.
    Refuse,
}

/// The same (room, sender, client message id) twice.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageRule {
    /// Keep it once (its earliest copy).
    #[default]
    Once,
    /// Refuse the merge.
    Refuse,
}

impl RoomRule {
    /// The rule's name, as `--on-conflict rooms=` takes it.
    pub fn name(self) -> &'static str {
        match self {
            RoomRule::Union => "union",
            RoomRule::Rename => "rename",
            RoomRule::Refuse => "refuse",
        }
    }
}

impl UserRule {
    /// The rule's name, as `--on-conflict users=` takes it.
    pub fn name(self) -> &'static str {
        match self {
            UserRule::Refuse => "refuse",
            UserRule::Newer => "newer",
        }
    }
}

impl AffiliationRule {
    /// The rule's name, as `--on-conflict affiliations=` takes it.
    pub fn name(self) -> &'static str {
        match self {
            AffiliationRule::Stronger => "stronger",
            AffiliationRule::Refuse => "refuse",
        }
    }
}

impl MessageRule {
    /// The rule's name, as `--on-conflict messages=` takes it.
    pub fn name(self) -> &'static str {
        match self {
            MessageRule::Once => "once",
            MessageRule::Refuse => "refuse",
        }
    }
}

/// The conflict rules of a job (`--on-conflict KIND=RULE`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rules {
    pub rooms: RoomRule,
    pub users: UserRule,
    pub affiliations: AffiliationRule,
    pub messages: MessageRule,
}

impl Rules {
    /// Apply one `KIND=RULE` (`rooms=union|rename|refuse`, `users=refuse|newer`,
    /// `affiliations=stronger|refuse`, `messages=once|refuse`).
    pub fn set(&mut self, spec: &str) -> Result<(), String> {
        let (kind, rule) = spec.split_once('=').ok_or_else(|| format!("`{spec}`: write KIND=RULE, e.g. rooms=rename"))?;
        let bad = || format!("`{spec}`: unknown rule `{rule}` for {kind}");
        fn parse<T: serde::de::DeserializeOwned>(r: &str) -> Result<T, serde_json::Error> {
            serde_json::from_value(Value::String(r.to_owned()))
        }
        match kind {
            "rooms" => self.rooms = parse(rule).map_err(|_| bad())?,
            "users" => self.users = parse(rule).map_err(|_| bad())?,
            "affiliations" => self.affiliations = parse(rule).map_err(|_| bad())?,
            "messages" => self.messages = parse(rule).map_err(|_| bad())?,
            _ => return Err(format!("`{spec}`: unknown kind `{kind}` (rooms, users, affiliations, messages)")),
        }
        Ok(())
    }
}

/// A conflict met while planning: what, between which sources (1-based in reports), the rule
/// and its outcome; `refused` when the rule is to refuse.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conflict {
    pub kind: String,
    pub subject: String,
    /// Source indexes (0-based here; reports say `source N` from 1).
    pub sources: Vec<usize>,
    pub rule: String,
    pub outcome: String,
    pub refused: bool,
}

impl Conflict {
    fn new(kind: &str, subject: &str, sources: Vec<usize>, rule: &str, outcome: &str) -> Conflict {
        Conflict { kind: kind.into(), subject: subject.into(), sources, rule: rule.into(), outcome: outcome.into(), refused: false }
    }

    fn refused(kind: &str, subject: &str, sources: Vec<usize>, rule: &str, why: &str) -> Conflict {
        Conflict { refused: true, ..Conflict::new(kind, subject, sources, rule, &format!("refused: {why}")) }
    }

    /// One line for people.
    pub fn line(&self) -> String {
        let sources: Vec<String> = self.sources.iter().map(|s| (s + 1).to_string()).collect();
        format!("{} {} (sources {}), rule {}: {}", self.kind, self.subject, sources.join(" and "), self.rule, self.outcome)
    }
}

/// Why a merge did not run or did not finish.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    /// Validation found problems (each names its store and what to do); nothing was written.
    #[error("refused:\n  - {}", .0.join("\n  - "))]
    Refused(Vec<String>),
    /// The job ran and the verification found rooms that differ from the sources.
    #[error("verification failed for {0} room(s); see `stoa db job {1}`")]
    Verification(usize, String),
    /// A store failed while the job ran (the job can be resumed with `--job`).
    #[error("{context}: {source}")]
    Store { context: String, source: crate::store::StoreError },
}

impl MergeError {
    fn store(context: impl Into<String>) -> impl FnOnce(crate::store::StoreError) -> MergeError {
        let context = context.into();
        move |source| MergeError::Store { context, source }
    }
}

/// A job as JSON (for `stoa db jobs`/`job` and `/api/db/jobs`): its columns, the JSON ones
/// parsed, times in ms and as UTC text.
pub fn job_json(job: &crate::store::merge::JobRow) -> Value {
    let parse = |s: &str| serde_json::from_str::<Value>(s).unwrap_or(Value::String(s.to_owned()));
    json!({
        "id": job.id,
        "state": job.state,
        "started_ms": job.started_at,
        "started": crate::clock::readable_utc(job.started_at),
        "finished_ms": job.finished_at,
        "finished": job.finished_at.map(crate::clock::readable_utc),
        "sources": parse(&job.sources),
        "options": parse(&job.options),
        "counts": parse(&job.counts),
        "report": parse(&job.report),
        "verification": job.verification.as_deref().map(parse),
        "error": job.error,
    })
}
