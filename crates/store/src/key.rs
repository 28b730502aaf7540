//! Ordered key codec: string components end with 0xFF (never part of UTF-8), integers are
//! big-endian so that prefix and range scans follow numeric order.

const SEP: u8 = 0xFF;

#[derive(Debug, Default, Clone)]
pub struct Key(Vec<u8>);

impl Key {
    pub fn new() -> Self {
        Self(Vec::with_capacity(64))
    }

    pub fn str(mut self, part: &str) -> Self {
        self.0.extend_from_slice(part.as_bytes());
        self.0.push(SEP);
        self
    }

    pub fn u64(mut self, value: u64) -> Self {
        self.0.extend_from_slice(&value.to_be_bytes());
        self
    }

    pub fn into_vec(self) -> Vec<u8> {
        self.0
    }
}

/// Reads the components of a key written by [`Key`], in the same order.
pub struct KeyReader<'a> {
    rest: &'a [u8],
}

impl<'a> KeyReader<'a> {
    pub fn new(key: &'a [u8]) -> Self {
        Self { rest: key }
    }

    pub fn str(&mut self) -> Option<&'a str> {
        let end = self.rest.iter().position(|b| *b == SEP)?;
        let (part, rest) = self.rest.split_at(end);
        self.rest = &rest[1..];
        std::str::from_utf8(part).ok()
    }

    pub fn skip_str(mut self) -> Self {
        self.str();
        self
    }

    pub fn u64(&mut self) -> Option<u64> {
        let (bytes, rest) = self.rest.split_first_chunk::<8>()?;
        self.rest = rest;
        Some(u64::from_be_bytes(*bytes))
    }
}

/// Turns `prefix` into the smallest key greater than every key starting with it.
/// Returns `None` when no such key exists (the prefix is all 0xFF).
pub(super) fn prefix_successor(prefix: &mut Vec<u8>) -> Option<Vec<u8>> {
    while let Some(last) = prefix.pop() {
        if last != 0xFF {
            prefix.push(last + 1);
            return Some(std::mem::take(prefix));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_order() {
        let a = Key::new().str("!room:x").u64(255).into_vec();
        let b = Key::new().str("!room:x").u64(256).into_vec();
        assert!(a < b);
        let mut reader = KeyReader::new(&b);
        assert_eq!(reader.str(), Some("!room:x"));
        assert_eq!(reader.u64(), Some(256));
        assert_eq!(reader.u64(), None);
    }

    #[test]
    fn successor_skips_trailing_ff() {
        assert_eq!(prefix_successor(&mut vec![1, 0xFF]), Some(vec![2]));
        assert_eq!(prefix_successor(&mut vec![0xFF]), None);
    }
}
