use super::*;

fn s(out: &mut Vec<u8>, v: &str) {
    out.extend((v.len() as u64).to_le_bytes());
    out.extend(v.as_bytes());
}

/// One metadata pair: key, value type, encoded value.
fn kv(key: &str, ty: u32, value: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    s(&mut b, key);
    b.extend(ty.to_le_bytes());
    b.extend(value);
    b
}

fn str_value(v: &str) -> Vec<u8> {
    let mut b = Vec::new();
    s(&mut b, v);
    b
}

fn array(elem: u32, n: u64, items: &[u8]) -> Vec<u8> {
    let mut b = elem.to_le_bytes().to_vec();
    b.extend(n.to_le_bytes());
    b.extend(items);
    b
}

fn tensor_info(name: &str, dims: &[u64], ty: u32, offset: u64) -> Vec<u8> {
    let mut b = Vec::new();
    s(&mut b, name);
    b.extend((dims.len() as u32).to_le_bytes());
    for d in dims {
        b.extend(d.to_le_bytes());
    }
    b.extend(ty.to_le_bytes());
    b.extend(offset.to_le_bytes());
    b
}

/// A whole file: header, pairs, tensor infos, padding to `align`, then `data`.
fn file(version: u32, kvs: &[Vec<u8>], infos: &[Vec<u8>], align: usize, data: &[u8]) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(version.to_le_bytes());
    b.extend((infos.len() as u64).to_le_bytes());
    b.extend((kvs.len() as u64).to_le_bytes());
    for x in kvs.iter().chain(infos) {
        b.extend(x);
    }
    while !b.len().is_multiple_of(align) {
        b.push(0);
    }
    b.extend(data);
    b
}

/// Every value type, arrays of arrays, alignment 64, an F32 and a Q8_0 tensor.
fn sample(version: u32) -> Vec<u8> {
    let mut nested = array(T_U8, 2, &[7, 8]);
    nested.extend(array(T_STRING, 1, &str_value("x")));
    let kvs = vec![
        kv("general.architecture", T_STRING, &str_value("llama")),
        kv("general.alignment", T_U32, &64u32.to_le_bytes()),
        kv("u8", T_U8, &[200]),
        kv("i8", T_I8, &[(-5i8) as u8]),
        kv("u16", T_U16, &60000u16.to_le_bytes()),
        kv("i16", T_I16, &(-300i16).to_le_bytes()),
        kv("u32", T_U32, &4_000_000_000u32.to_le_bytes()),
        kv("i32", T_I32, &(-7i32).to_le_bytes()),
        kv("u64", T_U64, &(1u64 << 40).to_le_bytes()),
        kv("i64", T_I64, &(-9i64).to_le_bytes()),
        kv("f32", T_F32, &1e-6f32.to_le_bytes()),
        kv("f64", T_F64, &0.25f64.to_le_bytes()),
        kv("bool", T_BOOL, &[1]),
        kv(
            "ints",
            T_ARRAY,
            &array(T_I32, 3, &[1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0]),
        ),
        kv(
            "strings",
            T_ARRAY,
            &array(T_STRING, 2, &[str_value("a"), str_value("bc")].concat()),
        ),
        kv("nested", T_ARRAY, &array(T_ARRAY, 2, &nested)),
    ];
    let infos = vec![
        tensor_info("a", &[4, 2], 0, 0),
        tensor_info("b", &[32], 8, 64),
    ];
    let mut data: Vec<u8> = (0..8).flat_map(|i| (i as f32).to_le_bytes()).collect();
    data.resize(64, 0);
    data.extend((0..34).map(|i| i as u8));
    file(version, &kvs, &infos, 64, &data)
}

fn write(bytes: &[u8]) -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("m.gguf");
    std::fs::write(&p, bytes).unwrap();
    (d, p)
}

fn open(bytes: &[u8]) -> Result<GgufFile, GgufError> {
    let (_d, p) = write(bytes);
    GgufFile::open(&p)
}

fn error(bytes: &[u8]) -> String {
    open(bytes).unwrap_err().to_string()
}

#[test]
fn every_value_type_and_the_tensor_data_read_back() {
    for version in [2, 3] {
        let f = open(&sample(version)).unwrap();
        assert_eq!(f.version(), version);
        assert_eq!(f.alignment(), 64);
        assert_eq!(f.get("u8"), Some(&Value::U8(200)));
        assert_eq!(f.get("i8"), Some(&Value::I8(-5)));
        assert_eq!(f.get("u16"), Some(&Value::U16(60000)));
        assert_eq!(f.get("i16"), Some(&Value::I16(-300)));
        assert_eq!(f.get_u64("u32").unwrap(), Some(4_000_000_000));
        assert_eq!(f.get("i32"), Some(&Value::I32(-7)));
        assert_eq!(f.get_u64("u64").unwrap(), Some(1 << 40));
        assert_eq!(f.get("i64"), Some(&Value::I64(-9)));
        assert_eq!(f.get_f64_decimal("f32").unwrap(), Some(1e-6));
        assert_eq!(f.get_f64("f64").unwrap(), Some(0.25));
        assert_eq!(f.get_bool("bool").unwrap(), Some(true));
        assert_eq!(f.get_str("general.architecture").unwrap(), Some("llama"));
        assert_eq!(
            f.get_array("ints").unwrap().and_then(Array::to_i64s),
            Some(vec![1, 2, 3])
        );
        assert_eq!(
            f.get_array("strings").unwrap().and_then(Array::as_strings),
            Some(&["a".to_string(), "bc".to_string()][..])
        );
        assert_eq!(
            f.get("nested"),
            Some(&Value::Array(Array::Array(vec![
                Array::U8(vec![7, 8]),
                Array::String(vec!["x".into()])
            ])))
        );
        let a = f.tensor("a").unwrap();
        assert_eq!(
            (a.shape(), a.n_bytes, a.ggml_type),
            (vec![2, 4], 32, GgmlType::F32)
        );
        assert_eq!(a.file_offset % 64, 0);
        let got: Vec<f32> = f
            .tensor_data(a)
            .unwrap()
            .chunks(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(got, (0..8).map(|i| i as f32).collect::<Vec<_>>());
        let b = f.tensor("b").unwrap();
        assert_eq!(b.file_offset, a.file_offset + 64);
        assert_eq!(f.tensor_data(b).unwrap(), (0..34).collect::<Vec<u8>>());
        assert_eq!(f.tensors().len(), 2);
    }
}

#[test]
fn every_truncation_is_one_clear_error() {
    let full = sample(3);
    let (_d, p) = write(&full);
    for len in 0..full.len() {
        std::fs::write(&p, &full[..len]).unwrap();
        let e = GgufFile::open(&p).unwrap_err().to_string();
        assert!(e.starts_with(&p.display().to_string()), "{len}: {e}");
        assert!(
            e.contains("truncated") || e.contains("no GGUF magic"),
            "prefix of {len} bytes: {e}"
        );
    }
}

#[test]
fn lying_counts_are_refused_before_anything_is_allocated() {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.extend(u64::MAX.to_le_bytes());
    assert!(error(&b).contains("claims 18446744073709551615 metadata pairs"));

    for value in [
        array(T_U8, 1 << 60, &[]),
        array(T_STRING, u64::MAX / 2, &[]),
        array(T_ARRAY, 1 << 40, &[]),
        array(T_U64, u64::MAX / 4, &[0; 8]),
    ] {
        let e = error(&file(3, &[kv("k", T_ARRAY, &value)], &[], 32, &[]));
        assert!(
            e.contains("claims") && e.contains("the value of key \"k\""),
            "{e}"
        );
    }
    let mut long = Vec::new();
    long.extend((1u64 << 62).to_le_bytes());
    let e = error(&file(3, &[kv("k", T_STRING, &long)], &[], 32, &[]));
    assert!(e.contains("needs 4611686018427387904 bytes"), "{e}");

    let e = error(&file(
        3,
        &[],
        &[tensor_info("t", &[1 << 32, 1 << 32, 1 << 32], 0, 0)],
        32,
        &[],
    ));
    assert!(e.contains("overflows"), "{e}");
    let e = error(&file(
        3,
        &[],
        &[tensor_info("t", &[1 << 62], 0, 0)],
        32,
        &[],
    ));
    assert!(e.contains("size in bytes overflows"), "{e}");
    // Dimensions that fit in u64 but whose data is not in the file.
    let e = error(&file(
        3,
        &[],
        &[tensor_info("t", &[1 << 20, 1 << 20], 0, 0)],
        32,
        &[],
    ));
    assert!(e.contains("runs past the end of the file"), "{e}");
}

#[test]
fn malformed_headers_name_what_is_wrong() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"GGUX\x03\0\0\0".to_vec(), "no GGUF magic"),
        (file(1, &[], &[], 32, &[]), "GGUF version 1"),
        (
            {
                let mut b = b"GGUF".to_vec();
                b.extend(3u32.to_be_bytes());
                b.extend([0; 16]);
                b
            },
            "big-endian",
        ),
        (file(7, &[], &[], 32, &[]), "unknown GGUF version 7"),
        (
            file(3, &[kv("k", 13, &[])], &[], 32, &[]),
            "unknown value type 13",
        ),
        (
            file(3, &[kv("k", T_ARRAY, &array(99, 0, &[]))], &[], 32, &[]),
            "array of unknown value type 99",
        ),
        (
            {
                let mut v = array(T_U8, 0, &[]);
                for _ in 0..20 {
                    v = array(T_ARRAY, 1, &v);
                }
                file(3, &[kv("k", T_ARRAY, &v)], &[], 32, &[])
            },
            "nests arrays more than 8 deep",
        ),
        (
            file(3, &[kv("k", T_U8, &[1]), kv("k", T_U8, &[2])], &[], 32, &[]),
            "has key \"k\" twice",
        ),
        (
            file(
                3,
                &[kv("k", T_STRING, &[2, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xfe])],
                &[],
                32,
                &[],
            ),
            "not valid UTF-8",
        ),
        (
            file(
                3,
                &[kv("general.alignment", T_U32, &24u32.to_le_bytes())],
                &[],
                32,
                &[],
            ),
            "power-of-two uint32",
        ),
        (
            file(
                3,
                &[kv("general.alignment", T_U64, &32u64.to_le_bytes())],
                &[],
                32,
                &[],
            ),
            "power-of-two uint32",
        ),
        (
            file(
                3,
                &[],
                &[tensor_info("t", &[4], 0, 0), tensor_info("t", &[4], 0, 32)],
                32,
                &[0; 64],
            ),
            "has tensor \"t\" twice",
        ),
        (
            file(3, &[], &[tensor_info("t", &[], 0, 0)], 32, &[]),
            "0 dimensions",
        ),
        (
            file(3, &[], &[tensor_info("t", &[1; 5], 0, 0)], 32, &[0; 4]),
            "5 dimensions",
        ),
        (
            file(3, &[], &[tensor_info("t", &[4], 0, 8)], 32, &[0; 48]),
            "not a multiple of the alignment",
        ),
        (
            file(3, &[], &[tensor_info("t", &[16, 2], 8, 0)], 32, &[0; 68]),
            "rows of 16 elements, not a multiple of the 32 of a Q8_0 block",
        ),
        (
            file(3, &[], &[tensor_info("t", &[32], 99, 0)], 32, &[0; 64]),
            "ggml type id 99",
        ),
        (
            file(3, &[], &[tensor_info("t", &[32], 4, 0)], 32, &[0; 64]),
            "Q4_2, a type ggml has removed",
        ),
    ];
    for (bytes, want) in cases {
        let e = error(&bytes);
        assert!(e.contains(want), "expected {want:?} in {e:?}");
        assert!(e.contains("m.gguf: "), "{e}");
    }
}

#[test]
fn typed_getters_refuse_the_wrong_type() {
    let f = open(&sample(3)).unwrap();
    let e = f.get_u64("general.architecture").unwrap_err().to_string();
    assert!(
        e.contains("general.architecture is a string, expected a non-negative integer"),
        "{e}"
    );
    assert!(f.get_u64("i32").is_err());
    assert!(f.get_f64("u32").is_err());
    assert!(f.get_str("u8").is_err());
    assert!(f.get_array("bool").is_err());
    assert_eq!(f.get_u64("missing").unwrap(), None);
}

#[test]
fn float32_metadata_reads_as_the_decimal_it_was_written_from() {
    assert_eq!(f32_decimal(1e-6), 1e-6);
    assert_eq!(f32_decimal(1e-5), 1e-5);
    assert_eq!(f32_decimal(500000.0), 500000.0);
    assert_ne!(f64::from(1e-6f32), 1e-6);
}
