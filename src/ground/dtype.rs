//! The tensor types and file types every layer speaks of: ggml's type ids and block geometry, and
//! llama.cpp's file types. The one place for these facts; block math, the GGUF reader and writer,
//! the checkpoint reader's dtypes and the model all name types from here.
//! Facts: ggml/include/ggml.h `enum ggml_type`, ggml-common.h block structs,
//! include/llama.h `enum llama_ftype`.

/// ggml tensor types this tool reads or writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
    BF16,
}

/// (type, ggml id, name, elements per block, bytes per block)
const GGML_TYPES: &[(GgmlType, u32, &str, usize, usize)] = &[
    (GgmlType::F32, 0, "F32", 1, 4),
    (GgmlType::F16, 1, "F16", 1, 2),
    (GgmlType::Q4_0, 2, "Q4_0", 32, 18),
    (GgmlType::Q4_1, 3, "Q4_1", 32, 20),
    (GgmlType::Q5_0, 6, "Q5_0", 32, 22),
    (GgmlType::Q5_1, 7, "Q5_1", 32, 24),
    (GgmlType::Q8_0, 8, "Q8_0", 32, 34),
    (GgmlType::Q4K, 12, "Q4_K", 256, 144),
    (GgmlType::Q5K, 13, "Q5_K", 256, 176),
    (GgmlType::Q6K, 14, "Q6_K", 256, 210),
    (GgmlType::BF16, 30, "BF16", 1, 2),
];

impl GgmlType {
    fn row(self) -> &'static (GgmlType, u32, &'static str, usize, usize) {
        GGML_TYPES
            .iter()
            .find(|r| r.0 == self)
            .expect("every GgmlType has a table row")
    }
    pub fn id(self) -> u32 {
        self.row().1
    }
    pub fn name(self) -> &'static str {
        self.row().2
    }
    pub fn block_size(self) -> usize {
        self.row().3
    }
    pub fn type_size(self) -> usize {
        self.row().4
    }
    pub fn from_id(id: u32) -> Option<Self> {
        GGML_TYPES.iter().find(|r| r.1 == id).map(|r| r.0)
    }
    pub fn from_name(name: &str) -> Option<Self> {
        GGML_TYPES
            .iter()
            .find(|r| r.2.eq_ignore_ascii_case(name))
            .map(|r| r.0)
    }
    pub fn is_quantized(self) -> bool {
        self.block_size() > 1
    }
    /// Bytes needed for `n_elements` values, or None if not a whole number of blocks.
    pub fn bytes_for(self, n_elements: u64) -> Option<u64> {
        let bs = self.block_size() as u64;
        if !n_elements.is_multiple_of(bs) {
            return None;
        }
        (n_elements / bs).checked_mul(self.type_size() as u64)
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// `general.file_type` values (include/llama.h `enum llama_ftype`; not ggml_ftype).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileType {
    AllF32,
    MostlyF16,
    MostlyQ4_0,
    MostlyQ8_0,
    MostlyQ4KS,
    MostlyQ4KM,
    MostlyQ6K,
    MostlyBF16,
}

/// (file type, llama_ftype id, name used in file names and on the command line)
const FILE_TYPES: &[(FileType, u32, &str)] = &[
    (FileType::AllF32, 0, "F32"),
    (FileType::MostlyF16, 1, "F16"),
    (FileType::MostlyQ4_0, 2, "Q4_0"),
    (FileType::MostlyQ8_0, 7, "Q8_0"),
    (FileType::MostlyQ4KS, 14, "Q4_K_S"),
    (FileType::MostlyQ4KM, 15, "Q4_K_M"),
    (FileType::MostlyQ6K, 18, "Q6_K"),
    (FileType::MostlyBF16, 32, "BF16"),
];

impl FileType {
    fn row(self) -> &'static (FileType, u32, &'static str) {
        FILE_TYPES
            .iter()
            .find(|r| r.0 == self)
            .expect("every FileType has a table row")
    }
    pub fn id(self) -> u32 {
        self.row().1
    }
    pub fn name(self) -> &'static str {
        self.row().2
    }
    pub fn from_name(name: &str) -> Option<Self> {
        FILE_TYPES
            .iter()
            .find(|r| r.2.eq_ignore_ascii_case(name))
            .map(|r| r.0)
    }
    pub fn from_id(id: u32) -> Option<Self> {
        FILE_TYPES.iter().find(|r| r.1 == id).map(|r| r.0)
    }
    pub fn all() -> impl Iterator<Item = FileType> {
        FILE_TYPES.iter().map(|r| r.0)
    }
}

/// GGML_QNT_VERSION, written as general.quantization_version.
pub const GGML_QNT_VERSION: u32 = 2;

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn ids_round_trip() {
        for r in GGML_TYPES {
            assert_eq!(GgmlType::from_id(r.1), Some(r.0));
            assert_eq!(GgmlType::from_name(r.2), Some(r.0));
        }
        assert_eq!(GgmlType::Q4K.bytes_for(512), Some(288));
        assert_eq!(GgmlType::Q8_0.bytes_for(33), None);
        assert_eq!(FileType::MostlyQ4KM.id(), 15);
    }
}
