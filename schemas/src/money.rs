//! Exact money: integer micro-USD amounts, fractional rates, one half-even rounding.
//!
//! An amount is an `i64` of micro-USD (1 USD = 1_000_000), like USDC's 6 decimals. A rate may be
//! a fraction of a micro-USD (half a micro-dollar per input token), so a [`Rate`] keeps six more
//! decimals: it is an integer count of 10⁻⁶ µUSD. A [`Quantity`] keeps six decimals too. Rating
//! sums every component of an event at a common scale in `i128` and rounds once, half to even.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// Six decimal places: the scale of [`Rate`] (within a micro-dollar) and of [`Quantity`].
pub const SCALE: i64 = 1_000_000;

/// A price or cost rate in micro-USD, exact to 10⁻⁶ µUSD (`0.5` is half a micro-dollar).
///
/// In config it is written as a number (`5000`, `0.5`) or a decimal string (`"0.000001"`); a
/// float is read through its shortest decimal spelling, so `0.1` means exactly one tenth.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rate(i64);

impl Rate {
    pub const ZERO: Rate = Rate(0);

    /// A rate of a whole number of micro-USD.
    pub const fn from_micros(micros: i64) -> Rate {
        Rate(micros * SCALE)
    }

    /// The rate in 10⁻⁶ µUSD.
    pub const fn scaled(self) -> i64 {
        self.0
    }

    pub fn is_zero(self) -> bool {
        self.0 == 0
    }
}

impl std::str::FromStr for Rate {
    type Err = String;
    fn from_str(text: &str) -> Result<Rate, String> {
        let scaled = parse_decimal6(text)?;
        Ok(Rate(scaled))
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_decimal6(self.0 as i128))
    }
}

impl Serialize for Rate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Rate, D::Error> {
        d.deserialize_any(DecimalVisitor)
            .map(Rate)
            .map_err(serde::de::Error::custom)
    }
}

/// A usage quantity (`quantity` on the wire), exact to six decimals, always > 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Quantity(i64);

impl Quantity {
    pub const ONE: Quantity = Quantity(SCALE);
    /// The largest quantity one event may carry.
    pub const MAX: Quantity = Quantity(1_000_000_000 * SCALE);

    /// Parses a positive decimal of at most six fractional digits, at most [`Quantity::MAX`].
    pub fn parse(text: &str) -> Result<Quantity, String> {
        let scaled = parse_decimal6(text)?;
        if scaled <= 0 {
            return Err(format!("must be greater than 0 (got {text})"));
        }
        if scaled > Self::MAX.0 {
            return Err(format!("must be at most 1000000000 (got {text})"));
        }
        Ok(Quantity(scaled))
    }

    pub const fn from_scaled(scaled: i64) -> Quantity {
        Quantity(scaled)
    }

    /// The quantity in millionths, as stored (`quantity_micros`).
    pub const fn scaled(self) -> i64 {
        self.0
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_decimal6(self.0 as i128))
    }
}

/// Divides by `divisor` (> 0) rounding half to even, the banker's rounding finance expects:
/// 1529.5 → 1530 but 1528.5 → 1528, so rounding errors do not drift one way over many events.
pub fn div_round_half_even(value: i128, divisor: i128) -> i128 {
    debug_assert!(divisor > 0);
    let quotient = value.div_euclid(divisor);
    let remainder = value.rem_euclid(divisor);
    let twice = remainder * 2;
    if twice > divisor || (twice == divisor && quotient % 2 != 0) {
        quotient + 1
    } else {
        quotient
    }
}

/// Formats micro-USD as a decimal USD string with six decimals (`7550` → `"0.007550"`).
pub fn micros_to_usd(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let abs = micros.unsigned_abs();
    format!("{sign}{}.{:06}", abs / SCALE as u64, abs % SCALE as u64)
}

fn format_decimal6(scaled: i128) -> String {
    let sign = if scaled < 0 { "-" } else { "" };
    let abs = scaled.unsigned_abs();
    let whole = abs / SCALE as u128;
    let frac = abs % SCALE as u128;
    if frac == 0 {
        format!("{sign}{whole}")
    } else {
        let digits = format!("{frac:06}");
        format!("{sign}{whole}.{}", digits.trim_end_matches('0'))
    }
}

/// Parses a non-negative decimal into millionths: every spelling of a JSON number (`12`, `0.5`,
/// `1e-6`, `1.5E+3`; Python sends 0.000001 as `1e-06`) whose value is an exact multiple of
/// 0.000001. The exponent only moves the decimal point: nothing is rounded.
fn parse_decimal6(text: &str) -> Result<i64, String> {
    let text = text.trim();
    let not_a_number =
        || format!("`{text}` is not a non-negative decimal number like 5000, 0.5 or 1e-6");
    let too_large = || format!("`{text}` is too large");
    let (mantissa, exponent) = match text.split_once(['e', 'E']) {
        Some((m, e)) => (m, e.parse::<i32>().map_err(|_| not_a_number())?),
        None => (text, 0),
    };
    let (whole, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits_only = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() && frac.is_empty() || !digits_only(whole) || !digits_only(frac) {
        return Err(not_a_number());
    }
    // value = digits × 10^(exponent − fractional digits); in millionths, 6 more. A negative
    // shift drops that many trailing digits, which must be zeros.
    let shift = i64::from(exponent) - frac.len() as i64 + 6;
    let digits = whole
        .bytes()
        .chain(frac.bytes())
        .map(|b| i64::from(b - b'0'));
    let kept = (whole.len() + frac.len()) as i64 + shift.min(0);
    let mut scaled: i64 = 0;
    for (n, digit) in digits.enumerate() {
        if (n as i64) < kept {
            scaled = scaled
                .checked_mul(10)
                .and_then(|s| s.checked_add(digit))
                .ok_or_else(too_large)?;
        } else if digit != 0 {
            return Err(format!(
                "`{text}` has more than 6 decimal places; the finest unit is 0.000001"
            ));
        }
    }
    if scaled == 0 {
        return Ok(0);
    }
    u32::try_from(shift.max(0))
        .ok()
        .and_then(|shift| 10_i64.checked_pow(shift))
        .and_then(|power| scaled.checked_mul(power))
        .ok_or_else(too_large)
}

/// Reads a decimal from a TOML or JSON integer, float or string.
struct DecimalVisitor;

impl serde::de::Visitor<'_> for DecimalVisitor {
    type Value = i64;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a non-negative decimal number such as 5000, 0.5 or \"0.000001\"")
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<i64, E> {
        parse_decimal6(&v.to_string()).map_err(E::custom)
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<i64, E> {
        parse_decimal6(&v.to_string()).map_err(E::custom)
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<i64, E> {
        // Rust prints the shortest spelling that reads back as the same float: 0.1 → "0.1".
        if !v.is_finite() {
            return Err(E::custom("a rate must be a finite number"));
        }
        parse_decimal6(&format!("{v}")).map_err(E::custom)
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<i64, E> {
        parse_decimal6(v).map_err(E::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_even_rounds_ties_to_the_even_neighbour() {
        assert_eq!(div_round_half_even(15295, 10), 1530); // 1529.5 → 1530 (even)
        assert_eq!(div_round_half_even(15285, 10), 1528); // 1528.5 → 1528 (even)
        assert_eq!(div_round_half_even(15292, 10), 1529);
        assert_eq!(div_round_half_even(15296, 10), 1530);
        assert_eq!(div_round_half_even(5, 10), 0); // 0.5 → 0
        assert_eq!(div_round_half_even(15, 10), 2); // 1.5 → 2
        assert_eq!(div_round_half_even(0, 10), 0);
    }

    #[test]
    fn decimals_parse_exactly_to_millionths() {
        assert_eq!("0.5".parse::<Rate>().unwrap().scaled(), 500_000);
        assert_eq!("5000".parse::<Rate>().unwrap().scaled(), 5_000_000_000);
        assert_eq!("0.000001".parse::<Rate>().unwrap().scaled(), 1);
        assert_eq!(".25".parse::<Rate>().unwrap().scaled(), 250_000);
        assert_eq!("1.5000000".parse::<Rate>().unwrap().scaled(), 1_500_000);
    }

    /// JSON allows exponents, and Python's `json.dumps(0.000001)` sends `1e-06`: every
    /// spelling of an exact multiple of 0.000001 reads as that multiple, the rest are refused.
    #[test]
    fn exponents_move_the_decimal_point_exactly() {
        let scaled = |t: &str| t.parse::<Rate>().map(|r| r.scaled());
        for (text, millionths) in [
            ("1e-6", 1),
            ("1e-06", 1),
            ("1E-6", 1),
            ("10e-7", 1),
            ("1000000e-12", 1),
            ("0.1e-5", 1),
            ("1.5e-5", 15),
            ("2.5e0", 2_500_000),
            ("1e3", 1_000_000_000),
            ("1.5E+3", 1_500_000_000),
            ("0e9", 0),
            ("0.0e-400", 0),
            ("9.223372036854775807e12", i64::MAX),
        ] {
            assert_eq!(scaled(text), Ok(millionths), "{text}");
        }
        let err = scaled("9.223372036854775808e12").unwrap_err();
        assert!(err.ends_with("is too large"), "{err}");
        let err = scaled("1e-7").unwrap_err();
        assert_eq!(
            err,
            "`1e-7` has more than 6 decimal places; the finest unit is 0.000001"
        );
    }

    #[test]
    fn decimals_refuse_what_is_not_exact() {
        assert!("0.0000001".parse::<Rate>().is_err());
        assert!("-1".parse::<Rate>().is_err());
        assert!("1e-7".parse::<Rate>().is_err());
        assert!("1.5e-6".parse::<Rate>().is_err());
        assert!("1e".parse::<Rate>().is_err());
        assert!("e5".parse::<Rate>().is_err());
        assert!("1e5.5".parse::<Rate>().is_err());
        assert!("-1e-6".parse::<Rate>().is_err());
        assert!("1e400".parse::<Rate>().is_err());
        assert!("1e-400".parse::<Rate>().is_err());
        assert!("".parse::<Rate>().is_err());
        assert!(".".parse::<Rate>().is_err());
        assert!("99999999999999999999".parse::<Rate>().is_err());
    }

    #[test]
    fn toml_floats_read_through_their_shortest_spelling() {
        #[derive(Deserialize)]
        struct R {
            r: Rate,
        }
        let r: R = toml::from_str("r = 0.1").unwrap();
        assert_eq!(r.r.scaled(), 100_000);
        let r: R = toml::from_str("r = 3").unwrap();
        assert_eq!(r.r, Rate::from_micros(3));
        let r: R = toml::from_str("r = \"1.5\"").unwrap();
        assert_eq!(r.r.scaled(), 1_500_000);
        assert!(toml::from_str::<R>("r = -2").is_err());
    }

    #[test]
    fn quantity_must_be_positive_and_bounded() {
        assert_eq!(Quantity::parse("1").unwrap(), Quantity::ONE);
        assert_eq!(Quantity::parse("1.0").unwrap(), Quantity::ONE);
        assert_eq!(Quantity::parse("2.5").unwrap().scaled(), 2_500_000);
        assert!(Quantity::parse("0").is_err());
        assert!(Quantity::parse("1000000001").is_err());
        assert_eq!(Quantity::parse("1e-6").unwrap().scaled(), 1);
        assert_eq!(Quantity::parse("1e9").unwrap(), Quantity::MAX);
        assert!(Quantity::parse("1.000001e9").is_err());
        assert!(Quantity::parse("0e0").is_err());
    }

    #[test]
    fn micros_format_as_usd() {
        assert_eq!(micros_to_usd(7550), "0.007550");
        assert_eq!(micros_to_usd(1_000_000), "1.000000");
        assert_eq!(micros_to_usd(-1_500_000), "-1.500000");
    }
}
