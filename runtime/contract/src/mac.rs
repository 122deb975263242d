//! A MAC address, parsed once at the edge into one canonical form that everything compares.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An Ethernet MAC address. Parsed once at the edge; inside pxelab only this canonical value is
/// compared, printed (`aa:bb:cc:dd:ee:ff`, lowercase) or used in file names.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mac([u8; 6]);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid MAC address {input:?}: expected six hex pairs such as 52:54:00:12:34:56")]
pub struct MacError {
    input: String,
}

impl Mac {
    pub const fn new(bytes: [u8; 6]) -> Mac {
        Mac(bytes)
    }

    /// A unicast, locally administered address from arbitrary bytes (e.g. random ones).
    pub fn local_unicast(mut bytes: [u8; 6]) -> Mac {
        bytes[0] = (bytes[0] | 0x02) & !0x01;
        Mac(bytes)
    }

    pub fn octets(&self) -> [u8; 6] {
        self.0
    }

    /// The dash-separated form, safe as a file name on every filesystem.
    pub fn file_stem(&self) -> String {
        self.to_string().replace(':', "-")
    }
}

impl FromStr for Mac {
    type Err = MacError;

    /// Accepts `aa:bb:cc:dd:ee:ff`, `aa-bb-cc-dd-ee-ff` and `aabbccddeeff`, in any case.
    fn from_str(s: &str) -> Result<Mac, MacError> {
        let err = || MacError {
            input: s.to_string(),
        };
        let hex: String = match s.len() {
            17 => {
                let sep = s.as_bytes()[2];
                if sep != b':' && sep != b'-' {
                    return Err(err());
                }
                let mut out = String::with_capacity(12);
                for (i, part) in s.split(sep as char).enumerate() {
                    if i > 5 || part.len() != 2 {
                        return Err(err());
                    }
                    out.push_str(part);
                }
                out
            }
            12 => s.to_string(),
            _ => return Err(err()),
        };
        let mut bytes = [0u8; 6];
        for (i, byte) in bytes.iter_mut().enumerate() {
            let pair = hex.get(2 * i..2 * i + 2).ok_or_else(err)?;
            if !pair.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err());
            }
            *byte = u8::from_str_radix(pair, 16).map_err(|_| err())?;
        }
        Ok(Mac(bytes))
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // By table, not `{:02x}` six times: a boot storm prints a MAC several times per reply.
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut text = [b':'; 17];
        for (i, b) in self.0.iter().enumerate() {
            text[3 * i] = HEX[usize::from(b >> 4)];
            text[3 * i + 1] = HEX[usize::from(b & 15)];
        }
        f.pad(std::str::from_utf8(&text).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Mac({self})")
    }
}

impl Serialize for Mac {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Mac, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_common_spellings_and_prints_one_form() {
        for input in ["52:54:00:AB:cd:0f", "52-54-00-ab-CD-0F", "525400abcd0f"] {
            let mac: Mac = input.parse().unwrap();
            assert_eq!(mac.to_string(), "52:54:00:ab:cd:0f");
        }
        let mac: Mac = "52:54:00:ab:cd:0f".parse().unwrap();
        assert_eq!(mac.file_stem(), "52-54-00-ab-cd-0f");
        // Tables (`lab vm list`, `lab status`) align MACs by width.
        assert_eq!(format!("{mac:<19}|"), "52:54:00:ab:cd:0f  |");
        assert_eq!(
            Mac::new([0, 1, 0xa0, 0xff, 0x10, 9]).to_string(),
            "00:01:a0:ff:10:09"
        );
    }

    #[test]
    fn rejects_malformed() {
        for input in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:0g",
            "52:54-00:ab:cd:0f",
            "52:54:00:ab:cd:0f:",
            "5254.00ab.cd0f",
            "+2:54:00:ab:cd:0f",
            "52:54:00:ab:cd:0f00",
            "ü2:54:00:ab:cd:0",
        ] {
            assert!(input.parse::<Mac>().is_err(), "{input:?} accepted");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(4096))]

        /// Any text: no panic, and whatever parses prints in the one form, which parses back.
        #[test]
        fn parsing_any_text_is_total_and_canonical(input in "\\PC{0,20}|[0-9a-fA-F:-]{10,19}") {
            if let Ok(mac) = input.parse::<Mac>() {
                let shown = mac.to_string();
                proptest::prop_assert_eq!(shown.parse::<Mac>(), Ok(mac));
                proptest::prop_assert_eq!(shown.clone(), shown.to_lowercase());
            }
        }

        /// Every spelling of every address means that address.
        #[test]
        fn every_spelling_is_the_same_address(bytes in proptest::array::uniform6(0u8..)) {
            let mac = Mac::new(bytes);
            let colons = mac.to_string();
            for spelling in [colons.to_uppercase(), colons.replace(':', "-"), colons.replace(':', "")] {
                proptest::prop_assert_eq!(spelling.parse::<Mac>(), Ok(mac));
            }
        }
    }

    #[test]
    fn local_unicast_sets_the_right_bits() {
        let mac = Mac::local_unicast([0xff; 6]);
        assert_eq!(mac.octets()[0] & 0x03, 0x02);
    }
}
