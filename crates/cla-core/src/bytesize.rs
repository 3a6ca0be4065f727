//! Byte sizes typed by people (`80GiB`, `80GB`, `512MiB`, `1.5TiB`, `1000000`) and printed
//! for people (`80.00 GiB`), for memory budgets.

use crate::error::{ConfigError, Result};
use std::fmt;
use std::str::FromStr;

/// A number of bytes.
///
/// Parsing accepts a non-negative decimal number (`80`, `1.5`) followed by an optional unit,
/// with optional spaces between: `B` (or none) for bytes, the decimal units `kB`, `MB`,
/// `GB`, `TB`, `PB` (powers of 1000) and the binary units `KiB`, `MiB`, `GiB`, `TiB`, `PiB`
/// (powers of 1024). Units are case-insensitive (`gib` = `GiB`; bits are never meant).
/// A fractional result is rounded down to whole bytes, except that a fraction of a plain
/// byte (`1.5B`) is an error. At most 18 decimal places; exponents (`1e9`), signs and
/// values beyond `u64` are errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

/// The accepted forms, for error messages.
const FORMS: &str = "a number of bytes with an optional unit: B, kB, MB, GB, TB, PB \
                     (powers of 1000) or KiB, MiB, GiB, TiB, PiB (powers of 1024), \
                     e.g. 80GiB, 512MiB, 1.5TiB or 1000000";

impl ByteSize {
    /// The number of bytes.
    pub const fn bytes(self) -> u64 {
        self.0
    }

    /// Parses `input`; `key` names the flag or key for the error message.
    pub fn parse(key: &str, input: &str) -> Result<Self> {
        let bad = |reason: &str| ConfigError::BadQuantity {
            key: key.into(),
            input: input.into(),
            reason: reason.into(),
        };
        let t = input.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (number, unit) = t.split_at(split);
        let unit = unit.trim();
        if number.is_empty() {
            return Err(bad(&format!("expected {FORMS}")));
        }
        let multiplier: u64 = match unit.to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "kb" => 1_000,
            "mb" => 1_000_000,
            "gb" => 1_000_000_000,
            "tb" => 1_000_000_000_000,
            "pb" => 1_000_000_000_000_000,
            "kib" => 1 << 10,
            "mib" => 1 << 20,
            "gib" => 1 << 30,
            "tib" => 1 << 40,
            "pib" => 1 << 50,
            _ => return Err(bad(&format!("unknown unit `{unit}`; expected {FORMS}"))),
        };
        let (int_part, frac_part) = match number.split_once('.') {
            Some((i, f)) => (i, f),
            None => (number, ""),
        };
        if frac_part.contains('.') || (int_part.is_empty() && frac_part.is_empty()) {
            return Err(bad(&format!(
                "`{number}` is not a number; expected {FORMS}"
            )));
        }
        // Exact decimal arithmetic: bytes = int * multiplier + floor(frac * multiplier / 10^f)
        // where `frac` is the f fractional digits as an integer. With f <= 18 and the
        // multiplier below 2^50, `frac * multiplier` stays inside u128.
        const MAX_DECIMALS: usize = 18;
        if frac_part.len() > MAX_DECIMALS {
            return Err(bad(&format!(
                "more than {MAX_DECIMALS} decimal places; use a smaller unit"
            )));
        }
        let too_big = || bad("larger than 2^64 - 1 bytes");
        let digits = |d: &str| -> Result<u128> {
            if d.is_empty() {
                Ok(0)
            } else {
                d.parse::<u128>().map_err(|_| too_big())
            }
        };
        let int_value = digits(int_part)?;
        let frac_value = digits(frac_part)?;
        if multiplier == 1 && frac_value != 0 {
            return Err(bad(
                "a fraction of a byte; give whole bytes or a larger unit",
            ));
        }
        let scale = 10u128.pow(frac_part.len() as u32);
        let whole = int_value
            .checked_mul(u128::from(multiplier))
            .ok_or_else(too_big)?;
        let fraction = frac_value * u128::from(multiplier) / scale;
        let bytes = whole
            .checked_add(fraction)
            .and_then(|b| u64::try_from(b).ok())
            .ok_or_else(too_big)?;
        Ok(ByteSize(bytes))
    }
}

impl FromStr for ByteSize {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self> {
        Self::parse("size", s)
    }
}

/// Prints with the largest binary unit that keeps the number at least 1, two decimals
/// (`80.00 GiB`); below 1 KiB as plain bytes (`512 B`).
impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
        if self.0 < 1024 {
            return write!(f, "{} B", self.0);
        }
        let mut value = self.0 as f64 / 1024.0;
        let mut unit = 0;
        while value >= 1024.0 && unit + 1 < UNITS.len() {
            value /= 1024.0;
            unit += 1;
        }
        write!(f, "{value:.2} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<u64> {
        ByteSize::parse("--budget", s).map(ByteSize::bytes)
    }

    #[test]
    fn units() {
        assert_eq!(parse("80GiB"), Ok(80 << 30));
        assert_eq!(parse("80GB"), Ok(80_000_000_000));
        assert_eq!(parse("512MiB"), Ok(512 << 20));
        assert_eq!(parse("1.5TiB"), Ok(3 << 39));
        assert_eq!(parse("1000000"), Ok(1_000_000));
        assert_eq!(parse("42 B"), Ok(42));
        assert_eq!(parse(" 2 gib "), Ok(2 << 30));
        assert_eq!(parse("1kB"), Ok(1000));
        assert_eq!(parse("1KiB"), Ok(1024));
        assert_eq!(parse(".5KiB"), Ok(512));
        assert_eq!(parse("2.KiB"), Ok(2048));
        assert_eq!(parse("0"), Ok(0));
        // 0.1 MiB = 104857.6 bytes, rounded down.
        assert_eq!(parse("0.1MiB"), Ok(104_857));
        assert_eq!(parse("18446744073709551615"), Ok(u64::MAX));
        assert_eq!(parse("1.0B"), Ok(1));
        // 1 byte expressed in PiB needs 50 decimals; 18 are accepted.
        assert_eq!(parse("0.000000000000001PiB"), Ok(1));
    }

    #[test]
    fn rejects_bad_input_naming_the_key() {
        for bad in [
            "",
            "GiB",
            "abc",
            "80XB",
            "-1GiB",
            "1e9",
            "1.2.3GiB",
            ".",
            "1.5",
            "1.5B",
            "80 G",
            "NaN",
            "18446744073709551616",
            "20000PiB",
            "80GiB extra",
            "💾",
            "1.0000000000000000001GiB",
        ] {
            match parse(bad) {
                Err(ConfigError::BadQuantity { key, input, .. }) => {
                    assert_eq!(key, "--budget");
                    assert_eq!(input, bad);
                }
                other => panic!("{bad:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn display() {
        assert_eq!(ByteSize(512).to_string(), "512 B");
        assert_eq!(ByteSize(1536).to_string(), "1.50 KiB");
        assert_eq!(ByteSize(80 << 30).to_string(), "80.00 GiB");
        assert_eq!(ByteSize(u64::MAX).to_string(), "16.00 EiB");
    }
}
