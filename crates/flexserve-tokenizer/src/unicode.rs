//! Character classes used by the pre-tokenizers and the GPT-2 byte <-> character map.

use unicode_general_category::{get_general_category, GeneralCategory as Gc};

/// The coarse class of one character, as the split rules see it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum CharClass {
    /// `\p{L}`
    Letter,
    /// `\p{N}`
    Number,
    /// `\s` (the whitespace set below)
    Space,
    /// Anything else: punctuation, symbols, marks, controls, unassigned.
    Other,
}

/// `\s`: ASCII tab..carriage return and space, plus the Unicode spaces and separators.
pub(crate) fn is_whitespace(c: char) -> bool {
    matches!(
        c,
        '\t'..='\r'
            | ' '
            | '\u{85}'
            | '\u{A0}'
            | '\u{1680}'
            | '\u{2000}'..='\u{200A}'
            | '\u{2028}'
            | '\u{2029}'
            | '\u{202F}'
            | '\u{205F}'
            | '\u{3000}'
    )
}

pub(crate) fn is_letter(c: char) -> bool {
    if c.is_ascii() {
        return c.is_ascii_alphabetic();
    }
    matches!(
        get_general_category(c),
        Gc::UppercaseLetter | Gc::LowercaseLetter | Gc::TitlecaseLetter | Gc::ModifierLetter | Gc::OtherLetter
    )
}

pub(crate) fn is_number(c: char) -> bool {
    if c.is_ascii() {
        return c.is_ascii_digit();
    }
    matches!(get_general_category(c), Gc::DecimalNumber | Gc::LetterNumber | Gc::OtherNumber)
}

/// `\p{P}`: the punctuation categories.
pub(crate) fn is_punctuation(c: char) -> bool {
    if c.is_ascii() {
        // ASCII punctuation per the Unicode tables: every graphic non-alphanumeric
        // character except the symbols $ + < = > ^ ` | ~.
        return c.is_ascii_punctuation() && !matches!(c, '$' | '+' | '<' | '=' | '>' | '^' | '`' | '|' | '~');
    }
    matches!(
        get_general_category(c),
        Gc::ConnectorPunctuation
            | Gc::DashPunctuation
            | Gc::OpenPunctuation
            | Gc::ClosePunctuation
            | Gc::InitialPunctuation
            | Gc::FinalPunctuation
            | Gc::OtherPunctuation
    )
}

/// `\p{M}`: combining marks.
pub(crate) fn is_mark(c: char) -> bool {
    !c.is_ascii() && matches!(get_general_category(c), Gc::NonspacingMark | Gc::SpacingMark | Gc::EnclosingMark)
}

pub(crate) fn classify(c: char) -> CharClass {
    if c.is_ascii() {
        return if c.is_ascii_alphabetic() {
            CharClass::Letter
        } else if c.is_ascii_digit() {
            CharClass::Number
        } else if is_whitespace(c) {
            CharClass::Space
        } else {
            CharClass::Other
        };
    }
    if is_letter(c) {
        CharClass::Letter
    } else if is_number(c) {
        CharClass::Number
    } else if is_whitespace(c) {
        CharClass::Space
    } else {
        CharClass::Other
    }
}

/// The reversible byte <-> character map of byte-level BPE: printable bytes map to
/// themselves, the others (controls, space, 0x7F..0xA0, 0xAD) to U+0100 onwards in
/// byte order, so every byte string becomes a string of visible characters.
pub(crate) struct ByteMap {
    to_char: [char; 256],
    /// Indexed by code point; every mapped character is below U+0144.
    to_byte: Vec<Option<u8>>,
}

impl ByteMap {
    pub(crate) fn new() -> ByteMap {
        let printable = |b: u8| matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF);
        let mut to_char = ['\0'; 256];
        let mut next_extra = 0x100u32;
        for b in 0..=255u8 {
            to_char[b as usize] = if printable(b) {
                char::from(b)
            } else {
                let c = char::from_u32(next_extra).expect("U+0100..U+0143 are valid chars");
                next_extra += 1;
                c
            };
        }
        let mut to_byte = vec![None; next_extra as usize];
        for (b, &c) in to_char.iter().enumerate() {
            to_byte[c as usize] = Some(b as u8);
        }
        ByteMap { to_char, to_byte }
    }

    /// The character of every byte, in byte order.
    pub(crate) fn chars(&self) -> &[char; 256] {
        &self.to_char
    }

    /// Appends the mapped form of `bytes` to `out`.
    pub(crate) fn encode_into(&self, bytes: &[u8], out: &mut String) {
        out.extend(bytes.iter().map(|&b| self.to_char[b as usize]));
    }

    /// Undoes the map. Characters outside it (which a well-formed vocabulary never
    /// holds) pass through as their own UTF-8.
    pub(crate) fn decode(&self, text: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(text.len());
        for c in text.chars() {
            match self.to_byte.get(c as usize).copied().flatten() {
                Some(b) => out.push(b),
                None => {
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_map_round_trips_every_byte() {
        let map = ByteMap::new();
        let all: Vec<u8> = (0..=255).collect();
        let mut s = String::new();
        map.encode_into(&all, &mut s);
        assert_eq!(s.chars().count(), 256);
        assert_eq!(map.decode(&s), all);
        // The well-known images of space and newline.
        let mut sp = String::new();
        map.encode_into(b" \n", &mut sp);
        assert_eq!(sp, "\u{120}\u{10A}");
    }

    #[test]
    fn classes() {
        assert_eq!(classify('a'), CharClass::Letter);
        assert_eq!(classify('é'), CharClass::Letter);
        assert_eq!(classify('你'), CharClass::Letter);
        assert_eq!(classify('7'), CharClass::Number);
        assert_eq!(classify('²'), CharClass::Number);
        assert_eq!(classify('\u{3000}'), CharClass::Space);
        assert_eq!(classify('\u{A0}'), CharClass::Space);
        assert_eq!(classify('!'), CharClass::Other);
        assert_eq!(classify('\u{301}'), CharClass::Other);
        assert!(is_punctuation('，') && is_punctuation('!') && !is_punctuation('$'));
    }
}
