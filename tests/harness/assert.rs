//! Checks on frames and rooms that panic with context: error answers, contiguous seqs, and a
//! room that still works both ways.

use serde_json::Value;

use super::client::{Client, is_message};

/// Assert that `answer` is an error with `code`.
#[track_caller]
pub fn assert_error(answer: &Value, code: &str, context: &str) {
    assert_eq!(answer["op"], "error", "{context}: expected error {code}, got {answer}");
    assert_eq!(answer["code"], code, "{context}: expected error {code}, got {answer}");
}

/// The seqs of a list of `message` frames.
pub fn seqs(frames: &[Value]) -> Vec<u64> {
    frames.iter().map(|f| f["seq"].as_u64().expect("message has a seq")).collect()
}

/// Assert `seqs` is exactly `1..=n`.
#[track_caller]
pub fn assert_contiguous(seqs: &[u64], n: u64, context: &str) {
    let expected: Vec<u64> = (1..=n).collect();
    if seqs != expected.as_slice() {
        let first_bad = seqs.iter().zip(&expected).position(|(a, b)| a != b);
        panic!("{context}: seqs are not 1..={n}: got {} seqs, first mismatch at index {first_bad:?}", seqs.len());
    }
}

/// Both clients are in `room`: `a` sends, gets an ack and `b` receives it, then the other way.
pub async fn assert_room_works(a: &mut Client, b: &mut Client, room: &str, tag: &str) {
    one_way(a, b, room, tag).await;
    one_way(b, a, room, tag).await;
}

async fn one_way(from: &mut Client, to: &mut Client, room: &str, tag: &str) {
    let cid = format!("check-{tag}-{}", from.user);
    let seq = from.send_acked(room, &format!("still works ({tag})"), &cid).await;
    let got = to.wait_for(&format!("message {cid}"), |f| is_message(f, room) && f["cid"] == cid.as_str()).await;
    assert_eq!(got["seq"].as_u64(), Some(seq), "{tag}: {} got {cid} with another seq", to.user);
    assert_eq!(got["from"], from.user.as_str());
}
