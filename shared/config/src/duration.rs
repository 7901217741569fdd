//! Durations as the config writes them: "250ms", "5s", "1m", "1h".

use std::time::Duration;

/// The longest duration a config may name: a year is past any timeout or interval, and
/// keeps clock arithmetic (`now + timeout`, an ejection time times its count) far from
/// overflow.
pub const MAX: Duration = Duration::from_secs(365 * 24 * 3600);

/// Parses "<integer><unit>" with unit ms, s, m or h, up to [`MAX`].
pub fn parse(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("bad duration {text:?}: missing unit (ms, s, m, h)"))?;
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("bad duration {text:?}: expected a number then ms, s, m or h"))?;
    let ms = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1_000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ if unit.starts_with('.') => {
            return Err(format!(
                "bad duration {text:?}: whole numbers only (a smaller unit: ms, s, m, h)"
            ))
        }
        _ if unit.contains(|c: char| c.is_ascii_digit()) => {
            return Err(format!(
                "bad duration {text:?}: one number and one unit (ms, s, m, h)"
            ))
        }
        _ => {
            return Err(format!(
                "bad duration {text:?}: unknown unit {unit:?} (ms, s, m, h)"
            ))
        }
    };
    ms.map(Duration::from_millis)
        .filter(|d| *d <= MAX)
        .ok_or_else(|| format!("bad duration {text:?}: too large (at most 8760h)"))
}

/// [`parse`], for a period, which must not be zero.
pub fn parse_period(text: &str) -> Result<Duration, String> {
    parse(text).and_then(|d| match d.is_zero() {
        true => Err(format!("bad duration {text:?}: must be more than 0")),
        false => Ok(d),
    })
}

/// The shortest exact form: 1500ms stays "1500ms", 60s becomes "1m".
pub fn format(d: Duration) -> String {
    let ms = d.as_millis();
    match ms {
        0 => "0s".into(),
        _ if ms.is_multiple_of(3_600_000) => format!("{}h", ms / 3_600_000),
        _ if ms.is_multiple_of(60_000) => format!("{}m", ms / 60_000),
        _ if ms.is_multiple_of(1_000) => format!("{}s", ms / 1_000),
        _ => format!("{ms}ms"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit_and_round_trips() {
        for (text, ms) in [
            ("250ms", 250),
            ("5s", 5_000),
            ("1m", 60_000),
            ("2h", 7_200_000),
            ("8760h", 31_536_000_000),
        ] {
            let d = parse(text).unwrap();
            assert_eq!(d, Duration::from_millis(ms));
            assert_eq!(format(d), text);
        }
    }

    #[test]
    fn rejects_bad_durations() {
        for text in [
            "",
            "5",
            "s",
            "5 s",
            "-1s",
            "1.5s",
            "5sec",
            "99999999999999999999h",
            "18446744073709551615ms",
            "8761h",
        ] {
            assert!(parse(text).is_err(), "{text:?} should be rejected");
        }
        // What went wrong, said in the user's terms.
        let said = |text: &str| parse(text).unwrap_err();
        assert!(
            said("1.5s").contains("whole numbers only"),
            "{}",
            said("1.5s")
        );
        assert!(
            said("1m30s").contains("one number and one unit"),
            "{}",
            said("1m30s")
        );
        assert!(
            said("5sec").contains("unknown unit \"sec\""),
            "{}",
            said("5sec")
        );
        assert!(parse_period("0s").is_err());
        assert_eq!(parse_period("15s"), Ok(Duration::from_secs(15)));
    }
}
