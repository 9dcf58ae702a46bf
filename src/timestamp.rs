//! Timestamp text and time windows.
//!
//! We store timestamps as `YYYY-MM-DD HH:MM:SS[.ffffff]` with `+00:00` appended for aware
//! values (converted to UTC first). That is ISO 8601 with a space separator: Python's
//! `datetime.fromisoformat` (which both Flujo releases use to read it back) accepts it, and it
//! compares correctly as text against SQLite's `datetime('now', ...)`, so the user guide's SQL
//! gives right answers. Files written by Flujo itself hold `YYYY-MM-DDTHH:MM:SS[+HH:MM]`, whose
//! text order is only right to the calendar day; every window below therefore narrows rows with
//! an index-friendly text range first and then compares exact instants with `julianday()`.

use chrono::{DateTime, Duration, NaiveDate, Utc};

/// Whether two stored timestamp texts denote the same moment: identical text, or the same
/// instant once parsed (so Flujo's `T`-separated, offset-carrying text matches our UTC form).
/// An aware and a naive timestamp never match.
pub fn same_instant(a: &str, b: &str) -> bool {
    if a == b {
        return true;
    }
    match (parse(a), parse(b)) {
        (Some(Parsed::Aware(x)), Some(Parsed::Aware(y))) => x == y,
        (Some(Parsed::Naive(x)), Some(Parsed::Naive(y))) => x == y,
        _ => false,
    }
}

/// Whether one of two timestamp texts is naive and the other aware, with the naive one read as
/// UTC denoting the same instant: the mix-up of a caller passing `datetime.now()` where the
/// stored time carries an offset (or the reverse), rather than a real difference.
pub fn differ_only_in_awareness(a: &str, b: &str) -> bool {
    match (parse(a), parse(b)) {
        (Some(Parsed::Aware(x)), Some(Parsed::Naive(y)))
        | (Some(Parsed::Naive(y)), Some(Parsed::Aware(x))) => x.naive_utc() == y,
        _ => false,
    }
}

enum Parsed {
    Aware(DateTime<Utc>),
    Naive(chrono::NaiveDateTime),
}

fn parse(text: &str) -> Option<Parsed> {
    let normalized = text.trim().replacen(' ', "T", 1);
    if let Ok(aware) = DateTime::parse_from_rfc3339(&normalized) {
        return Some(Parsed::Aware(aware.with_timezone(&Utc)));
    }
    if let Ok(naive) = chrono::NaiveDateTime::parse_from_str(&normalized, "%Y-%m-%dT%H:%M:%S%.f") {
        return Some(Parsed::Naive(naive));
    }
    NaiveDate::parse_from_str(&normalized, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(Parsed::Naive)
}

/// A stored timestamp as the lists (`list_workflows` and the like) return it: always with an
/// offset. Naive text, which Flujo 0.4.35's runner saves, is read as UTC, as every time window
/// here and SQLite's own date functions read it; so `datetime.fromisoformat()` of a listed time
/// can be compared with an aware `datetime.now(timezone.utc)`, as the user guide's monitoring
/// example does. Aware text, and text that is no timestamp, is returned as stored.
pub fn listed_text(text: String) -> String {
    match parse(&text) {
        Some(Parsed::Naive(naive)) => naive.format("%Y-%m-%d %H:%M:%S%.6f+00:00").to_string(),
        _ => text,
    }
}

/// The current instant as stored text (aware, UTC).
pub fn now_text() -> String {
    Utc::now().format("%Y-%m-%d %H:%M:%S%.6f+00:00").to_string()
}

/// Timestamps Flujo writes carry offsets within +-14 h, so a whole day of slack on each side of
/// the text range keeps every row that the exact comparison might accept.
const TEXT_RANGE_SLACK: Duration = Duration::days(1);

/// Rows whose timestamp column lies after (or before) `cutoff`, for SQL such as
/// `col >= :text_low AND julianday(col) >= julianday(:cutoff)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimeWindow {
    /// The exact instant, as UTC text with microseconds.
    pub cutoff: String,
    /// A calendar day no later than any row at or after `cutoff`, in any stored format.
    pub text_low: String,
    /// A calendar day later than any row before `cutoff`, in any stored format.
    pub text_high: String,
}

impl TimeWindow {
    /// The window whose cutoff lies `age` before `now`. An age reaching past the start of
    /// year 0 (where SQLite's date functions stop) is clamped there: every row is newer.
    pub fn before(now: DateTime<Utc>, age: Duration) -> Self {
        let earliest = NaiveDate::from_ymd_opt(0, 1, 2)
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .map(|d| d.and_utc())
            .expect("a valid constant date");
        let cutoff = now
            .checked_sub_signed(age)
            .filter(|c| *c > earliest)
            .unwrap_or(earliest);
        let low = cutoff - TEXT_RANGE_SLACK;
        let high = cutoff + TEXT_RANGE_SLACK + Duration::days(1);
        TimeWindow {
            cutoff: cutoff.format("%Y-%m-%d %H:%M:%S%.6f").to_string(),
            text_low: low.format("%Y-%m-%d").to_string(),
            text_high: high.format("%Y-%m-%d").to_string(),
        }
    }
}

/// How far back a query or cleanup reaches: "N hours/days back", already checked to be a
/// finite, non-negative number. Requests carry this rather than the caller's number, so a bad
/// one is refused where it comes in, before a file is opened or a lock waited for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Age(Duration);

impl Age {
    pub fn hours(amount: f64, what: &str) -> Result<Age, String> {
        Age::from_units(amount, 3600.0, what)
    }

    pub fn days(amount: f64, what: &str) -> Result<Age, String> {
        Age::from_units(amount, 86_400.0, what)
    }

    fn from_units(amount: f64, unit_seconds: f64, what: &str) -> Result<Age, String> {
        if !amount.is_finite() || amount < 0.0 {
            return Err(format!("{what} must be a finite number >= 0, got {amount}"));
        }
        let micros = amount * unit_seconds * 1e6;
        // Anything beyond chrono's range reaches back before year 0: clamp to "everything".
        let micros = if micros > i64::MAX as f64 / 2.0 {
            i64::MAX / 2
        } else {
            micros as i64
        };
        Ok(Age(Duration::microseconds(micros)))
    }

    /// The window of stored times older than this age, as of now.
    pub fn window(self) -> TimeWindow {
        TimeWindow::before(Utc::now(), self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn window_brackets_the_cutoff_by_whole_days() {
        let now = Utc.with_ymd_and_hms(2026, 11, 27, 4, 28, 10).unwrap();
        let w = TimeWindow::before(now, Duration::hours(24));
        assert_eq!(w.cutoff, "2026-11-26 04:28:10.000000");
        assert_eq!(w.text_low, "2026-11-25");
        assert_eq!(w.text_high, "2026-11-28");
    }

    #[test]
    fn awareness_alone_is_told_from_a_different_instant() {
        assert!(differ_only_in_awareness(
            "2026-11-27 04:28:10+00:00",
            "2026-11-27T04:28:10"
        ));
        assert!(differ_only_in_awareness(
            "2026-11-27 04:28:10",
            "2026-11-27T09:58:10+05:30"
        ));
        assert!(!differ_only_in_awareness(
            "2026-11-27 04:28:10+00:00",
            "2026-11-27 04:28:11"
        ));
        assert!(!differ_only_in_awareness(
            "2026-11-27 04:28:10+00:00",
            "2026-11-27 04:28:10+00:00"
        ));
    }

    #[test]
    fn same_instant_matches_across_flujos_and_our_spelling() {
        assert!(same_instant(
            "2026-11-27 04:28:10+00:00",
            "2026-11-27T04:28:10+00:00"
        ));
        assert!(same_instant(
            "2026-11-27 04:28:10.5+00:00",
            "2026-11-27T09:58:10.500+05:30"
        ));
        assert!(same_instant("2026-11-27 04:28:10", "2026-11-27T04:28:10"));
        assert!(same_instant("2024-01-01", "2024-01-01 00:00:00"));
        assert!(!same_instant(
            "2026-11-27 04:28:10+00:00",
            "2026-11-27 04:28:10"
        ));
        assert!(!same_instant(
            "2026-11-27 04:28:10+00:00",
            "2026-11-27 04:28:11+00:00"
        ));
        assert!(!same_instant("yesterday", "today"));
    }

    #[test]
    fn listed_times_always_carry_an_offset() {
        assert_eq!(
            listed_text("2024-01-02T03:04:05.678901".into()),
            "2024-01-02 03:04:05.678901+00:00"
        );
        assert_eq!(
            listed_text("2024-01-02 03:04:05".into()),
            "2024-01-02 03:04:05.000000+00:00"
        );
        assert_eq!(
            listed_text("2024-05-06".into()),
            "2024-05-06 00:00:00.000000+00:00"
        );
        for kept in [
            "2026-11-27 04:28:10.500000+00:00",
            "2026-11-27T09:58:10.500+05:30",
            "yesterday",
        ] {
            assert_eq!(listed_text(kept.into()), kept);
        }
    }

    #[test]
    fn absurd_ages_are_rejected_or_clamped() {
        assert!(Age::hours(-1.0, "hours_back").is_err());
        assert!(Age::hours(f64::NAN, "hours_back").is_err());
        assert!(Age::hours(f64::INFINITY, "hours_back").is_err());
        assert_eq!(
            Age::hours(1.5, "hours_back"),
            Ok(Age(Duration::minutes(90)))
        );
        let huge = Age::days(1e300, "days_old").unwrap();
        assert_eq!(huge.window().cutoff, "0000-01-02 00:00:00.000000");
    }
}
