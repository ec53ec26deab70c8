//! Check digits of the code and identifier systems Dossier validates.

/// Belgian national number (INSZ/NISS) or BIS number: 11 ASCII digits; the last two are
/// 97 − (first nine mod 97), or, for people born in 2000 or later, 97 − ((2 000 000 000 + first
/// nine) mod 97). The month (digits 3–4) is 00–12, plus 20 or 40 for a BIS number; the day
/// (digits 5–6) 00–31.
pub fn insz_is_valid(value: &str) -> bool {
    let b = value.as_bytes();
    if b.len() != 11 || !b.iter().all(u8::is_ascii_digit) {
        return false;
    }
    let num = |range: std::ops::Range<usize>| {
        b[range]
            .iter()
            .fold(0u64, |acc, d| acc * 10 + u64::from(d - b'0'))
    };
    let (first, check, month, day) = (num(0..9), num(9..11), num(2..4), num(4..6));
    let month_ok = matches!(month, 0..=12 | 20..=32 | 40..=52);
    if !month_ok || day > 31 {
        return false;
    }
    check == 97 - first % 97 || check == 97 - (2_000_000_000 + first) % 97
}

/// The INSZ/NISS number of nine leading digits (birth date YYMMDD and serial), with its check
/// digits by the rule of the century: `born_2000_or_later` prefixes a '2' before the mod 97.
pub fn insz_with_check(first9: u64, born_2000_or_later: bool) -> String {
    let n = first9 % 1_000_000_000;
    let base = if born_2000_or_later {
        2_000_000_000 + n
    } else {
        n
    };
    format!("{n:09}{:02}", 97 - base % 97)
}

/// LOINC code: `[0-9]{1,7}-[0-9]`, the last digit being the mod-10 check digit of the rest
/// (LOINC's own algorithm: double every other digit from the right of the number part).
pub fn loinc_is_valid(code: &str) -> bool {
    let Some((number, check)) = code.split_once('-') else {
        return false;
    };
    if number.is_empty()
        || number.len() > 7
        || check.len() != 1
        || !number.bytes().all(|c| c.is_ascii_digit())
        || !check.bytes().all(|c| c.is_ascii_digit())
    {
        return false;
    }
    let mut sum = 0u32;
    for (i, d) in number.bytes().rev().enumerate() {
        let d = u32::from(d - b'0');
        sum += if i % 2 == 0 {
            let x = d * 2;
            x / 10 + x % 10
        } else {
            d
        };
    }
    let want = (10 - sum % 10) % 10;
    u32::from(check.as_bytes()[0] - b'0') == want
}

const VERHOEFF_D: [[u8; 10]; 10] = [
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
    [1, 2, 3, 4, 0, 6, 7, 8, 9, 5],
    [2, 3, 4, 0, 1, 7, 8, 9, 5, 6],
    [3, 4, 0, 1, 2, 8, 9, 5, 6, 7],
    [4, 0, 1, 2, 3, 9, 5, 6, 7, 8],
    [5, 9, 8, 7, 6, 0, 4, 3, 2, 1],
    [6, 5, 9, 8, 7, 1, 0, 4, 3, 2],
    [7, 6, 5, 9, 8, 2, 1, 0, 4, 3],
    [8, 7, 6, 5, 9, 3, 2, 1, 0, 4],
    [9, 8, 7, 6, 5, 4, 3, 2, 1, 0],
];
const VERHOEFF_P: [[u8; 10]; 8] = [
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
    [1, 5, 7, 6, 2, 8, 3, 0, 9, 4],
    [5, 8, 0, 3, 7, 9, 6, 1, 4, 2],
    [8, 9, 1, 6, 0, 4, 3, 5, 2, 7],
    [9, 4, 5, 3, 1, 2, 6, 8, 7, 0],
    [4, 2, 8, 6, 5, 7, 3, 9, 0, 1],
    [2, 7, 9, 3, 8, 0, 6, 4, 1, 5],
    [7, 0, 4, 6, 9, 1, 3, 2, 5, 8],
];

/// SNOMED CT concept id: `[1-9][0-9]{5,17}` with a valid Verhoeff check digit and the partition
/// (second and third digits from the right) of a concept: `00` or `10`.
pub fn snomed_is_valid(code: &str) -> bool {
    let b = code.as_bytes();
    if !(6..=18).contains(&b.len()) || !b.iter().all(u8::is_ascii_digit) || b[0] == b'0' {
        return false;
    }
    let partition = &code[b.len() - 3..b.len() - 1];
    if partition != "00" && partition != "10" {
        return false;
    }
    let mut c = 0usize;
    for (i, d) in b.iter().rev().enumerate() {
        c = usize::from(VERHOEFF_D[c][usize::from(VERHOEFF_P[i % 8][usize::from(d - b'0')])]);
    }
    c == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn insz_examples() {
        assert!(insz_is_valid("85073003328"));
        // Born 2000-01-01: the '2' prefix rule.
        assert!(insz_is_valid("00010100105"));
        assert_eq!(insz_with_check(101_001, true), "00010100105");
        assert_eq!(insz_with_check(850_730_033, false), "85073003328");
        assert!(!insz_is_valid("85073003329"));
        assert!(!insz_is_valid("8507300332"));
        assert!(!insz_is_valid("85.07.30-033.28"));
        // Month 13 is neither a month nor a BIS month.
        assert!(!insz_is_valid(&with_check("851330033")));
        // A BIS number (month + 40).
        assert!(insz_is_valid(&with_check("854730033")));
    }

    fn with_check(first9: &str) -> String {
        insz_with_check(first9.parse().unwrap(), false)
    }

    proptest! {
        /// Every number built by the rule is accepted, and a change of any one digit breaks the
        /// rule it satisfied (mod 97 catches every single-digit change); it can pass only by the
        /// other century's rule, and then not by the one it was built with.
        #[test]
        fn insz_catches_single_digit_errors(
            yy in 0u64..100, mm in 1u64..13, dd in 1u64..29, serial in 1u64..999,
            pos in 0usize..11, delta in 1u8..10,
        ) {
            let first9 = format!("{yy:02}{mm:02}{dd:02}{serial:03}");
            let good = with_check(&first9);
            prop_assert!(insz_is_valid(&good));
            let mut bad = good.clone().into_bytes();
            bad[pos] = b'0' + (bad[pos] - b'0' + delta) % 10;
            let bad = String::from_utf8(bad).unwrap();
            let n: u64 = bad[..9].parse().unwrap();
            let c: u64 = bad[9..].parse().unwrap();
            prop_assert_ne!(c, 97 - n % 97, "{} still satisfies the pre-2000 rule", bad);
        }
    }

    #[test]
    fn loinc_codes() {
        // From the Synthea sample: body height, heart rate, glucose, HbA1c.
        for code in ["8302-2", "8867-4", "2339-0", "4548-4", "29463-7", "72514-3"] {
            assert!(loinc_is_valid(code), "{code}");
        }
        for code in ["8302-3", "8302", "-2", "83022-", "12345678-9", "8302-22"] {
            assert!(!loinc_is_valid(code), "{code}");
        }
    }

    #[test]
    fn snomed_codes() {
        // Hypertension, prediabetes, anemia, an encounter type (from the sample).
        for code in ["38341003", "15777000", "271737000", "185349003"] {
            assert!(snomed_is_valid(code), "{code}");
        }
        for code in ["38341004", "0834100", "12345", "38341013"] {
            assert!(!snomed_is_valid(code), "{code}");
        }
    }
}
