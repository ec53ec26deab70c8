//! FHIR search within one patient, `<Type>?patient=<id>&code=<system>|<code>&date=ge<date>…`,
//! mapped onto Dossier's search (docs/schema.md §6). Supported parameters: `patient` (or
//! `subject=Patient/<id>`), `code` (one `system|code`), `date` with prefixes `ge`, `gt`, `le`,
//! `lt` (and `eq`/none: that day or instant's precision), `status` (comma separated), `_count`.
//! Anything else is refused by name, never ignored.

use crate::time::parse_date_time;

/// A FHIR search string as Dossier's search parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SearchParams {
    pub fhir_type: String,
    pub patient: String,
    pub code: String,
    /// Clinical date at or after (unix micros).
    pub since_micros: Option<i64>,
    /// Clinical date before (unix micros).
    pub until_micros: Option<i64>,
    pub statuses: Vec<String>,
    pub count: Option<u32>,
}

/// Decodes `%XX` escapes and `+` (as a space) of a query component.
fn decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = s
                    .get(i + 1..i + 3)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("bad escape in {s:?}"))?;
                out.push(hex);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8 once decoded"))
}

/// The length of the period a FHIR date or dateTime names, in micros (its precision).
fn period_micros(value: &str) -> i64 {
    const DAY: i64 = 86_400_000_000;
    match value.len() {
        4 => 366 * DAY, // a year: the end is clamped below by the next year's start
        7 => 31 * DAY,
        10 => DAY,
        _ => 1,
    }
}

/// The start of the period after the one `value` names (a year, month, day or instant).
fn after_period(value: &str, start: i64) -> Result<i64, String> {
    match value.len() {
        4 => {
            let y: i32 = value.parse().map_err(|_| format!("bad year {value:?}"))?;
            parse_date_time(&format!("{:04}", y + 1))
                .map(|d| d.unix_micros)
                .ok_or_else(|| format!("bad year {value:?}"))
        }
        7 => {
            let (y, m) = value.split_once('-').ok_or("bad month")?;
            let (y, m): (i32, u32) = (
                y.parse().map_err(|_| "bad year")?,
                m.parse().map_err(|_| "bad month")?,
            );
            let (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
            parse_date_time(&format!("{y:04}-{m:02}"))
                .map(|d| d.unix_micros)
                .ok_or_else(|| format!("bad month {value:?}"))
        }
        _ => Ok(start + period_micros(value)),
    }
}

/// Parses `<Type>?<param>=<value>&…`.
pub fn parse_search(query: &str) -> Result<SearchParams, String> {
    let (fhir_type, rest) = query.split_once('?').unwrap_or((query, ""));
    if fhir_type.is_empty() || !fhir_type.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err(format!("{fhir_type:?} is not a FHIR type"));
    }
    let mut p = SearchParams {
        fhir_type: fhir_type.to_owned(),
        ..SearchParams::default()
    };
    for pair in rest.split('&').filter(|s| !s.is_empty()) {
        let (name, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("parameter {pair:?} has no value"))?;
        let value = decode(value)?;
        match name {
            "patient" => p.patient = value,
            "subject" | "subject:Patient" => {
                p.patient = value.strip_prefix("Patient/").unwrap_or(&value).to_owned()
            }
            "code" => {
                if value.contains(',') || !value.contains('|') {
                    return Err("code takes one system|code".into());
                }
                p.code = value;
            }
            "status" => p.statuses = value.split(',').map(str::to_owned).collect(),
            "_count" => {
                p.count = Some(
                    value
                        .parse()
                        .map_err(|_| format!("_count {value:?} is not a count"))?,
                )
            }
            "date" => {
                let (prefix, date) = match value.get(..2) {
                    Some(x @ ("ge" | "gt" | "le" | "lt" | "eq")) => (x, &value[2..]),
                    _ => ("eq", value.as_str()),
                };
                let start = parse_date_time(date)
                    .ok_or_else(|| format!("date {date:?} is not a FHIR date or dateTime"))?
                    .unix_micros;
                let end = after_period(date, start)?;
                let tighten_since = |p: &mut SearchParams, v: i64| {
                    p.since_micros = Some(p.since_micros.map_or(v, |s| s.max(v)))
                };
                let tighten_until = |p: &mut SearchParams, v: i64| {
                    p.until_micros = Some(p.until_micros.map_or(v, |u| u.min(v)))
                };
                match prefix {
                    "ge" => tighten_since(&mut p, start),
                    "gt" => tighten_since(&mut p, end),
                    "lt" => tighten_until(&mut p, start),
                    "le" => tighten_until(&mut p, end),
                    _ => {
                        tighten_since(&mut p, start);
                        tighten_until(&mut p, end);
                    }
                }
            }
            other => {
                return Err(format!(
                    "search parameter {other:?} is not supported (patient, code, date, status, _count)"
                ));
            }
        }
    }
    if p.patient.is_empty() {
        return Err("patient= is required: search runs within one patient".into());
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fhir_search_strings_map_to_dossier_search() {
        let p = parse_search("Observation?patient=p1&code=http://loinc.org%7C2339-0&date=ge2024-01-01&date=lt2025&status=final,amended&_count=5").unwrap();
        assert_eq!(p.fhir_type, "Observation");
        assert_eq!(p.patient, "p1");
        assert_eq!(p.code, "http://loinc.org|2339-0");
        assert_eq!(p.since_micros, Some(1_704_067_200_000_000));
        assert_eq!(p.until_micros, Some(1_735_689_600_000_000));
        assert_eq!(p.statuses, vec!["final", "amended"]);
        assert_eq!(p.count, Some(5));
        // A day without prefix is that day; le includes it.
        let d = parse_search("Condition?subject=Patient/p2&date=2024-02-29").unwrap();
        assert_eq!(d.patient, "p2");
        assert_eq!(
            d.until_micros.unwrap() - d.since_micros.unwrap(),
            86_400_000_000
        );
        let le = parse_search("Condition?patient=p&date=le2024-12").unwrap();
        assert_eq!(le.until_micros, Some(1_735_689_600_000_000));
    }

    #[test]
    fn unknown_or_bad_parameters_are_refused_by_name() {
        for (q, needle) in [
            ("Observation?patient=p&foo=1", "\"foo\""),
            ("Observation?code=http://loinc.org|1", "patient"),
            ("Observation?patient=p&code=1234", "system|code"),
            ("Observation?patient=p&date=ge2024-13-01", "2024-13-01"),
            ("Obs/x?patient=p", "FHIR type"),
        ] {
            let e = parse_search(q).unwrap_err();
            assert!(e.contains(needle), "{q}: {e}");
        }
    }
}
