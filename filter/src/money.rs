//! ISO 4217 minor units and exact decimal → minor-unit conversion.
//!
//! Amounts are converted on their decimal digits, never through f64 arithmetic: `0.29 * 100` is
//! `28.999999999999996` in floating point, while an invoice must say 29.

use std::collections::BTreeMap;

/// The ISO 4217 table shipped with the filter (code → minor units).
const ISO4217_JSON: &str = include_str!("../registry/iso4217.json");

/// Largest integer a JSON number (an IEEE-754 double) carries exactly: 2^53.
pub const MAX_SAFE_INTEGER: u64 = 1 << 53;

/// Currency code → number of minor units (decimals).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurrencyTable(BTreeMap<String, u8>);

impl CurrencyTable {
    /// The built-in ISO 4217 table.
    pub fn iso4217() -> Result<Self, String> {
        let table: BTreeMap<String, u8> = serde_json::from_str(ISO4217_JSON)
            .map_err(|e| format!("built-in ISO 4217 table: {e}"))?;
        Ok(Self(table))
    }

    /// Adds or overrides currencies; codes must be three uppercase letters, minor units 0..=4.
    pub fn extend(&mut self, extra: &BTreeMap<String, u8>) -> Result<(), String> {
        for (code, &units) in extra {
            if !is_currency_code_shape(code) {
                return Err(format!("{code:?} is not a three-letter uppercase code"));
            }
            if units > 4 {
                return Err(format!("{code}: minor units {units} out of range 0..=4"));
            }
            self.0.insert(code.clone(), units);
        }
        Ok(())
    }

    pub fn minor_units(&self, code: &str) -> Option<u8> {
        self.0.get(code).copied()
    }

    pub fn contains(&self, code: &str) -> bool {
        self.0.contains_key(code)
    }
}

fn is_currency_code_shape(code: &str) -> bool {
    code.len() == 3 && code.bytes().all(|b| b.is_ascii_uppercase())
}

/// `amount` (a JSON number's shortest decimal form, e.g. `123.45`, `1e3`, `-0.5`, or a decimal
/// string) × 10^`minor_units`, which must be an integer of magnitude ≤ 2^53.
pub fn to_minor(amount: &str, minor_units: u8) -> Result<i64, String> {
    let decimal =
        Decimal::parse(amount).ok_or_else(|| format!("{amount:?} is not a decimal number"))?;
    // value = digits × 10^exponent; scaled = digits × 10^(exponent + minor_units)
    let scale = decimal.exponent + i64::from(minor_units);
    let digits = decimal.digits.trim_start_matches('0');
    let integer_digits: String = if scale >= 0 {
        if digits.is_empty() {
            String::new()
        } else {
            let zeros = usize::try_from(scale).map_err(|_| too_large(amount))?;
            if digits.len().saturating_add(zeros) > 16 {
                return Err(too_large(amount));
            }
            format!("{digits}{}", "0".repeat(zeros))
        }
    } else {
        let dropped = usize::try_from(-scale).unwrap_or(usize::MAX);
        let keep = digits.len().saturating_sub(dropped);
        let (kept, fraction) = digits.split_at(keep);
        if fraction.bytes().any(|b| b != b'0') {
            return Err(format!(
                "{amount} has more than {minor_units} decimal place(s) for its currency"
            ));
        }
        kept.to_owned()
    };
    if integer_digits.len() > 16 {
        return Err(too_large(amount));
    }
    let magnitude: u64 = if integer_digits.is_empty() {
        0
    } else {
        integer_digits.parse().map_err(|_| too_large(amount))?
    };
    if magnitude > MAX_SAFE_INTEGER {
        return Err(too_large(amount));
    }
    let magnitude = i64::try_from(magnitude).map_err(|_| too_large(amount))?;
    Ok(if decimal.negative {
        -magnitude
    } else {
        magnitude
    })
}

fn too_large(amount: &str) -> String {
    format!("{amount} in minor units exceeds 2^53")
}

/// A decimal number as `digits × 10^exponent`.
struct Decimal {
    negative: bool,
    digits: String,
    exponent: i64,
}

impl Decimal {
    /// JSON number syntax, also accepting a leading `+`, leading zeros and a bare `.5` / `5.`,
    /// as amounts written by people and models do.
    fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        let (negative, rest) = match text.as_bytes().first()? {
            b'-' => (true, text.get(1..)?),
            b'+' => (false, text.get(1..)?),
            _ => (false, text),
        };
        let (mantissa, exponent) = match rest.find(['e', 'E']) {
            Some(at) => {
                let exp: i64 = rest.get(at + 1..)?.parse().ok()?;
                (rest.get(..at)?, exp)
            }
            None => (rest, 0),
        };
        let (int_part, frac_part) = match mantissa.split_once('.') {
            Some((i, f)) => (i, f),
            None => (mantissa, ""),
        };
        if int_part.is_empty() && frac_part.is_empty() {
            return None;
        }
        if !int_part
            .bytes()
            .chain(frac_part.bytes())
            .all(|b| b.is_ascii_digit())
        {
            return None;
        }
        // Exponents beyond this cannot produce a representable amount anyway.
        if exponent.abs() > 1000 {
            return None;
        }
        let frac_len = i64::try_from(frac_part.len()).ok()?;
        Some(Self {
            negative,
            digits: format!("{int_part}{frac_part}"),
            exponent: exponent - frac_len,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_on_decimal_digits_not_floats() {
        assert_eq!(to_minor("123.45", 2), Ok(12345));
        assert_eq!(to_minor("0.29", 2), Ok(29)); // 0.29*100 = 28.999999999999996 in f64
        assert_eq!(to_minor("1.1", 2), Ok(110));
        assert_eq!(to_minor("100", 2), Ok(10000));
        assert_eq!(to_minor("100.0", 0), Ok(100));
        assert_eq!(to_minor("1e3", 2), Ok(100000));
        assert_eq!(to_minor("1.5E-1", 3), Ok(150));
        assert_eq!(to_minor("-12.5", 2), Ok(-1250));
        assert_eq!(to_minor("-0", 2), Ok(0));
        assert_eq!(to_minor("0.000", 2), Ok(0));
        assert_eq!(to_minor("1234.567", 3), Ok(1234567));
        assert_eq!(to_minor(" 7 ", 0), Ok(7));
    }

    #[test]
    fn rejects_excess_precision_and_overflow() {
        assert!(to_minor("1.005", 2).unwrap_err().contains("decimal place"));
        assert!(to_minor("0.5", 0).is_err());
        assert_eq!(to_minor("90071992547409.92", 2), Ok(9007199254740992));
        assert!(to_minor("90071992547409.93", 2)
            .unwrap_err()
            .contains("2^53"));
        assert!(to_minor("1e300", 2).is_err());
        assert!(to_minor("1e-300", 2).is_err());
        for bad in ["", "-", ".", "abc", "1.2.3", "1e", "0x10", "1,5", "NaN"] {
            assert!(to_minor(bad, 2).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn table_has_iso_minor_units_and_extends() {
        let mut table = CurrencyTable::iso4217().unwrap();
        assert_eq!(table.minor_units("USD"), Some(2));
        assert_eq!(table.minor_units("JPY"), Some(0));
        assert_eq!(table.minor_units("KWD"), Some(3));
        assert_eq!(table.minor_units("CLF"), Some(4));
        assert!(!table.contains("XYZ"));
        assert!(!table.contains("usd"));
        let extra = BTreeMap::from([("XYZ".to_owned(), 1u8)]);
        table.extend(&extra).unwrap();
        assert_eq!(table.minor_units("XYZ"), Some(1));
        assert!(table
            .extend(&BTreeMap::from([("usd".to_owned(), 2u8)]))
            .is_err());
        assert!(table
            .extend(&BTreeMap::from([("ABC".to_owned(), 9u8)]))
            .is_err());
    }
}
