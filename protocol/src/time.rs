//! Timestamps in receipts (SPEC §2). No clock here: the caller passes the time.

/// RFC 3339 UTC with milliseconds, e.g. `2026-11-25T17:00:00.123Z`.
pub fn rfc3339_millis(unix_millis: u64) -> String {
    let millis = unix_millis % 1000;
    let secs = unix_millis / 1000;
    let (hour, minute, second) = (secs / 3600 % 24, secs / 60 % 60, secs % 60);
    let (year, month, day) = civil_from_days(secs / 86_400);
    format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{millis:03}Z")
}

/// Milliseconds since the Unix epoch of an RFC 3339 UTC timestamp as receipts carry it:
/// `YYYY-MM-DDTHH:MM:SS`, an optional fraction of 1 to 9 digits (kept to the millisecond), and
/// `Z`. `None` for anything else (another offset, a date that does not exist, before 1970).
pub fn parse_rfc3339_utc(ts: &str) -> Option<u64> {
    let b = ts.as_bytes();
    let digits = |from: usize, len: usize| -> Option<u64> {
        let part = b.get(from..from + len)?;
        part.iter().try_fold(0u64, |n, &d| {
            d.is_ascii_digit().then(|| n * 10 + u64::from(d - b'0'))
        })
    };
    let punctuation = [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':')];
    if punctuation.iter().any(|&(at, c)| b.get(at) != Some(&c)) {
        return None;
    }
    let (year, month, day) = (digits(0, 4)?, digits(5, 2)?, digits(8, 2)?);
    let (hour, minute, second) = (digits(11, 2)?, digits(14, 2)?, digits(17, 2)?);
    let mut millis = 0;
    let mut at = 19;
    if b.get(at) == Some(&b'.') {
        let count = b
            .get(at + 1..)?
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .count();
        if !(1..=9).contains(&count) {
            return None;
        }
        let kept = count.min(3);
        millis = digits(at + 1, kept)? * 10u64.pow(3 - kept as u32);
        at += 1 + count;
    }
    if b.get(at..) != Some(b"Z".as_slice())
        || year < 1970
        || hour > 23
        || minute > 59
        || second > 59
    {
        return None;
    }
    let days = days_from_civil(year, month, day)?;
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second;
    Some(secs * 1000 + millis)
}

/// Days since 1970-01-01 of a Gregorian date (H. Hinnant's `days_from_civil`), `None` when the
/// date does not exist.
fn days_from_civil(year: u64, month: u64, day: u64) -> Option<u64> {
    let leap = year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400));
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    let last = *month_days.get(usize::try_from(month).ok()?.checked_sub(1)?)?;
    if day == 0 || day > last {
        return None;
    }
    let y = if month <= 2 { year - 1 } else { year };
    let era = y / 400;
    let yoe = y % 400;
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    (era * 146_097 + doe).checked_sub(719_468)
}

/// Gregorian date of a day count since 1970-01-01 (H. Hinnant's `civil_from_days`).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_it_formats_and_nothing_else() {
        for millis in [
            0,
            1_795_626_000_123,
            951_782_400_000,
            4_102_444_799_999,
            1_709_164_800_001,
        ] {
            assert_eq!(parse_rfc3339_utc(&rfc3339_millis(millis)), Some(millis));
        }
        assert_eq!(
            parse_rfc3339_utc("2026-11-25T17:00:00Z"),
            Some(1_795_626_000_000)
        );
        assert_eq!(
            parse_rfc3339_utc("2026-11-25T17:00:00.1Z"),
            Some(1_795_626_000_100)
        );
        assert_eq!(
            parse_rfc3339_utc("2026-11-25T17:00:00.123456789Z"),
            Some(1_795_626_000_123)
        );
        for bad in [
            "",
            "x",
            "2026-11-25 17:00:00Z",
            "2026-11-25T17:00:00",
            "2026-11-25T17:00:00+01:00",
            "2026-11-25T17:00:00.Z",
            "2026-11-25T17:00:00.1234567890Z",
            "2026-02-30T00:00:00Z",
            "2025-02-29T00:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-11-25T24:00:00Z",
            "1969-12-31T23:59:59Z",
            "2026-11-25T17:00:00ZZ",
            "+026-11-25T17:00:00Z",
        ] {
            assert_eq!(parse_rfc3339_utc(bad), None, "{bad}");
        }
    }

    #[test]
    fn formats_known_instants() {
        assert_eq!(rfc3339_millis(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339_millis(1_795_626_000_123),
            "2026-11-25T17:00:00.123Z"
        );
        assert_eq!(rfc3339_millis(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(
            rfc3339_millis(4_102_444_799_999),
            "2099-12-31T23:59:59.999Z"
        );
    }
}
