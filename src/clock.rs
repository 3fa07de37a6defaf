//! Time: a process-wide monotonic clock for activity stamps, and for people Unix
//! milliseconds as UTC dates, with no time-zone database (operators
//! compare logs across machines, so everything printed is UTC and says so).

/// Milliseconds on a process-wide monotonic clock (room activity stamps; the registry's
/// sweeper compares them).
pub fn monotonic_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START.get_or_init(std::time::Instant::now).elapsed().as_millis() as u64
}

/// `(year, month, day)` of a day count since 1970-01-01 (proleptic Gregorian; Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The parts of `ms` (Unix milliseconds): date and time of day in UTC.
fn parts(ms: i64) -> (i64, u32, u32, i64, i64, i64) {
    let secs = ms.div_euclid(1000);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let tod = secs.rem_euclid(86_400);
    (y, m, d, tod / 3600, tod % 3600 / 60, tod % 60)
}

/// `2026-12-04T18:22:25Z` (ISO 8601, UTC, whole seconds): for JSON.
pub fn iso_utc(ms: i64) -> String {
    let (y, mo, d, h, mi, s) = parts(ms);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

/// `2026-12-04T18:22:25.123Z` (XEP-0082, UTC, milliseconds): for XMPP delay stamps.
pub fn iso_utc_millis(ms: i64) -> String {
    let (y, mo, d, h, mi, s) = parts(ms);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{:03}Z", ms.rem_euclid(1000))
}

/// `2026-12-04 18:22:25 UTC`: for tables people read.
pub fn readable_utc(ms: i64) -> String {
    let (y, mo, d, h, mi, s) = parts(ms);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02} UTC")
}

/// Milliseconds since the Unix epoch now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_milliseconds_become_utc_dates() {
        assert_eq!(iso_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(readable_utc(0), "1970-01-01 00:00:00 UTC");
        // `date -u -d @1796408545` = Fri Dec  4 18:22:25 UTC 2026
        assert_eq!(iso_utc(1_796_408_545_999), "2026-12-04T18:22:25Z");
        // A leap day and the day after.
        assert_eq!(iso_utc(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(iso_utc(951_868_800_000), "2000-03-01T00:00:00Z");
        assert_eq!(iso_utc(-1000), "1969-12-31T23:59:59Z");
    }
}
