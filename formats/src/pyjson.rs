//! JSON text as Python's `json.dumps` writes it, which is what transformers, PEFT and
//! bitsandbytes put in their files: floats in Python's `repr` (shortest round-trip digits,
//! exponent notation below 1e-4 and from 1e16, `1.0` rather than `1`), non-ASCII escaped.

use std::io;
use std::string::String;
use std::vec::Vec;

use serde_json::Value;
use serde_json::ser::{Formatter, PrettyFormatter};

/// Python's `repr(x)` for a float (`float_repr_style == "short"`).
pub(crate) fn float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    // Rust's `{:e}` gives the shortest round-trip digits as `d.ddde<exp>`.
    let sci = std::format!("{:e}", x.abs());
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let exp: i32 = exp.parse().unwrap_or(0);
    // Python's `decpt`: the value is 0.<digits> * 10^decpt.
    let decpt = exp + 1;
    let sign = if x.is_sign_negative() { "-" } else { "" };
    let n = digits.len() as i32;
    let body = if decpt <= -4 || decpt > 16 {
        let (first, rest) = digits.split_at(1);
        let frac = if rest.is_empty() {
            String::new()
        } else {
            std::format!(".{rest}")
        };
        let exp_sign = if exp < 0 { '-' } else { '+' };
        std::format!("{first}{frac}e{exp_sign}{:02}", exp.abs())
    } else if decpt <= 0 {
        std::format!("0.{}{digits}", "0".repeat((-decpt) as usize))
    } else if decpt >= n {
        std::format!("{digits}{}.0", "0".repeat((decpt - n) as usize))
    } else {
        let (int, frac) = digits.split_at(decpt as usize);
        std::format!("{int}.{frac}")
    };
    std::format!("{sign}{body}")
}

/// `json.dumps(value, indent=2, sort_keys=True)` (serde_json's maps are already sorted).
pub(crate) fn dumps_pretty(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, PyFormatter::default());
    // Serializing a `Value` into a Vec cannot fail.
    let _ = serde::Serialize::serialize(value, &mut ser);
    out
}

/// serde_json's pretty printer with Python's float and string rules.
#[derive(Default)]
struct PyFormatter {
    pretty: PrettyFormatter<'static>,
}

impl Formatter for PyFormatter {
    fn write_f32<W: ?Sized + io::Write>(&mut self, w: &mut W, value: f32) -> io::Result<()> {
        w.write_all(float_repr(f64::from(value)).as_bytes())
    }

    fn write_f64<W: ?Sized + io::Write>(&mut self, w: &mut W, value: f64) -> io::Result<()> {
        w.write_all(float_repr(value).as_bytes())
    }

    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        s: &str,
    ) -> io::Result<()> {
        // `ensure_ascii=True`: everything outside ' '..='~' that serde_json left unescaped.
        for c in s.chars() {
            if (' '..='~').contains(&c) {
                w.write_all(&[c as u8])?;
            } else {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    write!(w, "\\u{unit:04x}")?;
                }
            }
        }
        Ok(())
    }

    fn begin_array<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.pretty.begin_array(w)
    }
    fn end_array<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.pretty.end_array(w)
    }
    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        self.pretty.begin_array_value(w, first)
    }
    fn end_array_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.pretty.end_array_value(w)
    }
    fn begin_object<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.pretty.begin_object(w)
    }
    fn end_object<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.pretty.end_object(w)
    }
    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        self.pretty.begin_object_key(w, first)
    }
    fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.pretty.begin_object_value(w)
    }
    fn end_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.pretty.end_object_value(w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_float_repr() {
        // Expected strings are what CPython 3 prints for repr(x).
        let cases: [(f64, &str); 14] = [
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (1.0, "1.0"),
            (10000.0, "10000.0"),
            (1e-5, "1e-05"),
            (1.5e-5, "1.5e-05"),
            (1e-4, "0.0001"),
            (0.00012, "0.00012"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (1.234e20, "1.234e+20"),
            (1e100, "1e+100"),
            (-2.5, "-2.5"),
            (
                f64::from(0.052_073_568_105_697_63_f64 as f32),
                "0.05207356810569763",
            ),
        ];
        for (x, want) in cases {
            assert_eq!(float_repr(x), want, "{x:e}");
        }
    }

    #[test]
    fn pretty_matches_python_layout() {
        let v: Value =
            serde_json::from_str(r#"{"b": [1, 2.0], "a": {}, "c": "é", "d": []}"#).unwrap();
        let text = String::from_utf8(dumps_pretty(&v)).unwrap();
        // json.dumps(..., indent=2, sort_keys=True)
        let want = "{\n  \"a\": {},\n  \"b\": [\n    1,\n    2.0\n  ],\n  \"c\": \"\\u00e9\",\n  \"d\": []\n}";
        assert_eq!(text, want);
    }
}
