//! ggml tensor types: their names and block layouts, as ggml's `type_traits` define them.
//!
//! The table holds every type ggml has ever assigned an id, so the reader can bounds-check a
//! tensor of any type and name it in an error, even one we cannot dequantize.

use std::fmt;

/// A ggml tensor type id as stored in a GGUF tensor info.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GgmlType(pub u32);

/// How a type packs elements: `elements` values per block of `bytes` bytes. Rows are whole
/// blocks (a row's length is a multiple of `elements`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockLayout {
    pub elements: u64,
    pub bytes: u64,
}

/// (id, ggml name, (elements, bytes) per block); layout `None` for ids that were removed from
/// ggml (their files cannot be interpreted any more).
type Entry = (u32, &'static str, Option<(u64, u64)>);

const TABLE: &[Entry] = &[
    (0, "F32", Some((1, 4))),
    (1, "F16", Some((1, 2))),
    (2, "Q4_0", Some((32, 18))),
    (3, "Q4_1", Some((32, 20))),
    (4, "Q4_2", None),
    (5, "Q4_3", None),
    (6, "Q5_0", Some((32, 22))),
    (7, "Q5_1", Some((32, 24))),
    (8, "Q8_0", Some((32, 34))),
    (9, "Q8_1", Some((32, 40))),
    (10, "Q2_K", Some((256, 84))),
    (11, "Q3_K", Some((256, 110))),
    (12, "Q4_K", Some((256, 144))),
    (13, "Q5_K", Some((256, 176))),
    (14, "Q6_K", Some((256, 210))),
    (15, "Q8_K", Some((256, 292))),
    (16, "IQ2_XXS", Some((256, 66))),
    (17, "IQ2_XS", Some((256, 74))),
    (18, "IQ3_XXS", Some((256, 98))),
    (19, "IQ1_S", Some((256, 50))),
    (20, "IQ4_NL", Some((32, 18))),
    (21, "IQ3_S", Some((256, 110))),
    (22, "IQ2_S", Some((256, 82))),
    (23, "IQ4_XS", Some((256, 136))),
    (24, "I8", Some((1, 1))),
    (25, "I16", Some((1, 2))),
    (26, "I32", Some((1, 4))),
    (27, "I64", Some((1, 8))),
    (28, "F64", Some((1, 8))),
    (29, "IQ1_M", Some((256, 56))),
    (30, "BF16", Some((1, 2))),
    (31, "Q4_0_4_4", None),
    (32, "Q4_0_4_8", None),
    (33, "Q4_0_8_8", None),
    (34, "TQ1_0", Some((256, 54))),
    (35, "TQ2_0", Some((256, 66))),
    (36, "IQ4_NL_4_4", None),
    (37, "IQ4_NL_4_8", None),
    (38, "IQ4_NL_8_8", None),
    (39, "MXFP4", Some((32, 17))),
    (40, "NVFP4", Some((64, 36))),
    (41, "Q1_0", Some((128, 18))),
];

impl GgmlType {
    pub const F32: GgmlType = GgmlType(0);
    pub const F16: GgmlType = GgmlType(1);
    pub const Q4_0: GgmlType = GgmlType(2);
    pub const Q4_1: GgmlType = GgmlType(3);
    pub const Q5_0: GgmlType = GgmlType(6);
    pub const Q5_1: GgmlType = GgmlType(7);
    pub const Q8_0: GgmlType = GgmlType(8);
    pub const Q2_K: GgmlType = GgmlType(10);
    pub const Q3_K: GgmlType = GgmlType(11);
    pub const Q4_K: GgmlType = GgmlType(12);
    pub const Q5_K: GgmlType = GgmlType(13);
    pub const Q6_K: GgmlType = GgmlType(14);
    pub const IQ4_NL: GgmlType = GgmlType(20);
    pub const IQ4_XS: GgmlType = GgmlType(23);
    pub const BF16: GgmlType = GgmlType(30);

    fn entry(self) -> Option<&'static Entry> {
        TABLE.iter().find(|e| e.0 == self.0)
    }

    /// ggml's name for the type (`Q4_K`, `IQ4_XS`, ...), `None` for an id ggml never assigned.
    pub fn name(self) -> Option<&'static str> {
        self.entry().map(|e| e.1)
    }

    /// The block layout, `None` for unknown or removed types.
    pub fn layout(self) -> Option<BlockLayout> {
        self.entry()
            .and_then(|e| e.2)
            .map(|(elements, bytes)| BlockLayout { elements, bytes })
    }

    /// The type of a ggml name (`"Q4_K"`), case-insensitive.
    pub fn from_name(name: &str) -> Option<GgmlType> {
        TABLE
            .iter()
            .find(|e| e.1.eq_ignore_ascii_case(name))
            .map(|e| GgmlType(e.0))
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => f.write_str(n),
            None => write!(f, "unknown ggml type {}", self.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_names_round_trip() {
        for (i, e) in TABLE.iter().enumerate() {
            assert!(TABLE[i + 1..].iter().all(|o| o.0 != e.0 && o.1 != e.1));
            assert_eq!(GgmlType::from_name(e.1), Some(GgmlType(e.0)));
        }
        assert_eq!(GgmlType::IQ4_XS.to_string(), "IQ4_XS");
        assert_eq!(GgmlType(99).to_string(), "unknown ggml type 99");
        assert_eq!(
            GgmlType::Q6_K.layout(),
            Some(BlockLayout {
                elements: 256,
                bytes: 210
            })
        );
        assert_eq!(GgmlType(4).layout(), None);
    }
}
