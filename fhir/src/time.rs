//! FHIR `date`, `dateTime` and `instant` text ↔ `Date` / `DateTime`, keeping the precision and
//! the UTC offset the source wrote (docs/schema.md §1).

use dossier_api::v1::{Date, DatePrecision, DateTime};

/// Days since 1970-01-01 of a civil date (proleptic Gregorian).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date of a day number (inverse of `days_from_civil`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        2 if y % 4 == 0 && (y % 100 != 0 || y % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

fn digits(s: &str, n: usize) -> Option<u32> {
    (s.len() == n && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse().ok())?
}

/// `YYYY`, `YYYY-MM` or `YYYY-MM-DD`.
fn parse_date_parts(s: &str) -> Option<(i64, u32, u32)> {
    let mut parts = s.split('-');
    let y = digits(parts.next()?, 4)?;
    let m = match parts.next() {
        None => 0,
        Some(p) => digits(p, 2).filter(|m| (1..=12).contains(m))?,
    };
    let d = match parts.next() {
        None => 0,
        Some(p) if m > 0 => {
            digits(p, 2).filter(|d| *d >= 1 && *d <= days_in_month(i64::from(y), m))?
        }
        Some(_) => return None,
    };
    if parts.next().is_some() || y == 0 {
        return None;
    }
    Some((i64::from(y), m, d))
}

/// A FHIR `date`.
pub fn parse_date(s: &str) -> Option<Date> {
    let (y, m, d) = parse_date_parts(s)?;
    Some(Date {
        year: y as u32,
        month: m,
        day: d,
    })
}

pub fn format_date(d: &Date) -> String {
    match (d.month, d.day) {
        (0, _) => format!("{:04}", d.year),
        (m, 0) => format!("{:04}-{m:02}", d.year),
        (m, day) => format!("{:04}-{m:02}-{day:02}", d.year),
    }
}

/// A FHIR `dateTime` (or `instant`): a partial date at 00:00 UTC, or a time with seconds, up to
/// six fraction digits (more only when they are zeros) and a zone.
pub fn parse_date_time(s: &str) -> Option<DateTime> {
    let Some((date, time)) = s.split_once('T') else {
        let (y, m, d) = parse_date_parts(s)?;
        let precision = match (m, d) {
            (0, _) => DatePrecision::Year,
            (_, 0) => DatePrecision::Month,
            _ => DatePrecision::Day,
        };
        return Some(DateTime {
            unix_micros: days_from_civil(y, m.max(1), d.max(1)) * 86_400_000_000,
            precision: precision as i32,
            utc_offset_minutes: 0,
        });
    };
    let (y, m, d) = parse_date_parts(date)?;
    if m == 0 || d == 0 {
        return None;
    }
    let (clock, offset) = if let Some(c) = time.strip_suffix('Z') {
        (c, 0i32)
    } else {
        let at = time.rfind(['+', '-'])?;
        let (c, z) = time.split_at(at);
        let sign = if z.starts_with('-') { -1 } else { 1 };
        let (hh, mm) = z[1..].split_once(':')?;
        let (hh, mm) = (digits(hh, 2)?, digits(mm, 2)?);
        if hh > 14 || mm > 59 {
            return None;
        }
        (c, sign * (hh * 60 + mm) as i32)
    };
    let (hms, fraction) = match clock.split_once('.') {
        Some((hms, f)) => (hms, f),
        None => (clock, ""),
    };
    let mut it = hms.split(':');
    let (h, mi, sec) = (
        digits(it.next()?, 2)?,
        digits(it.next()?, 2)?,
        digits(it.next()?, 2)?,
    );
    if it.next().is_some() || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    if !fraction.bytes().all(|b| b.is_ascii_digit())
        || (fraction.is_empty() && clock.contains('.'))
        || fraction.bytes().skip(6).any(|b| b != b'0')
    {
        return None;
    }
    let micros: i64 = format!("{:0<6}", &fraction[..fraction.len().min(6)])
        .parse()
        .ok()?;
    let local = days_from_civil(y, m, d) * 86_400
        + i64::from(h) * 3600
        + i64::from(mi) * 60
        + i64::from(sec.min(59));
    Some(DateTime {
        unix_micros: (local - i64::from(offset) * 60) * 1_000_000 + micros,
        precision: DatePrecision::Time as i32,
        utc_offset_minutes: offset,
    })
}

pub fn format_date_time(t: &DateTime) -> String {
    let day = t.unix_micros.div_euclid(86_400_000_000);
    let precision = DatePrecision::try_from(t.precision).unwrap_or(DatePrecision::Time);
    match precision {
        DatePrecision::Year | DatePrecision::Month | DatePrecision::Day => {
            let (y, m, d) = civil_from_days(day);
            match precision {
                DatePrecision::Year => format!("{y:04}"),
                DatePrecision::Month => format!("{y:04}-{m:02}"),
                _ => format!("{y:04}-{m:02}-{d:02}"),
            }
        }
        DatePrecision::Time | DatePrecision::Unspecified => {
            let offset = i64::from(t.utc_offset_minutes);
            let local = t.unix_micros + offset * 60_000_000;
            let (secs, micros) = (local.div_euclid(1_000_000), local.rem_euclid(1_000_000));
            let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
            let s = secs.rem_euclid(86_400);
            // Milliseconds as three digits (the form of most sources: Synthea, Java, JavaScript
            // write `.580`), finer fractions as six.
            let fraction = if micros == 0 {
                String::new()
            } else if micros % 1000 == 0 {
                format!(".{:03}", micros / 1000)
            } else {
                format!(".{micros:06}")
            };
            let zone = format!(
                "{}{:02}:{:02}",
                if offset < 0 { '-' } else { '+' },
                offset.abs() / 60,
                offset.abs() % 60
            );
            format!(
                "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}{fraction}{zone}",
                s / 3600,
                s % 3600 / 60,
                s % 60
            )
        }
    }
}

/// Server instants (`Meta.last_updated_micros`) as FHIR `instant` in UTC.
pub fn format_instant(unix_micros: i64) -> String {
    format_date_time(&DateTime {
        unix_micros,
        precision: DatePrecision::Time as i32,
        utc_offset_minutes: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sample_times() {
        let t = parse_date_time("2011-10-14T23:37:54.530+00:00").unwrap();
        assert_eq!(t.unix_micros, 1_318_635_474_530_000);
        assert_eq!(format_date_time(&t), "2011-10-14T23:37:54.530+00:00");
        let t = parse_date_time("2019-02-16T16:36:10-05:00").unwrap();
        assert_eq!(t.utc_offset_minutes, -300);
        assert_eq!(format_date_time(&t), "2019-02-16T16:36:10-05:00");
        assert_eq!(
            parse_date_time("1991-06").unwrap().precision,
            DatePrecision::Month as i32
        );
        assert_eq!(
            format_date_time(&parse_date_time("1991-06").unwrap()),
            "1991-06"
        );
        assert_eq!(
            format_date(&parse_date("1957-02-29").unwrap_or_default()),
            "0000"
        );
        assert!(parse_date("1957-02-29").is_none());
        assert!(parse_date("1956-02-29").is_some());
        for bad in [
            "2011-10-14T23:37",
            "2011-13",
            "2011-10-14T23:37:54.1234567+00:00",
            "11-10-14",
            "2011-10-14T23:37:54",
        ] {
            assert!(parse_date_time(bad).is_none(), "{bad}");
        }
        assert!(parse_date_time("2011-10-14T23:37:54.1234560Z").is_some());
    }

    proptest! {
        #[test]
        fn date_times_round_trip(secs in -2_000_000_000i64..4_000_000_000, micros in 0i64..1_000_000, offset in -840i32..=840) {
            let t = DateTime {
                unix_micros: secs * 1_000_000 + micros,
                precision: DatePrecision::Time as i32,
                utc_offset_minutes: offset,
            };
            prop_assert_eq!(parse_date_time(&format_date_time(&t)), Some(t));
        }

        #[test]
        fn civil_days_round_trip(day in -800_000i64..800_000) {
            let (y, m, d) = civil_from_days(day);
            prop_assert_eq!(days_from_civil(y, m, d), day);
        }
    }
}
