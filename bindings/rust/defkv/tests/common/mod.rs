//! A minimal safetensors reader for the golden conformance files (tests and the example only):
//! 8-byte little-endian header length, a flat JSON header, raw little-endian data.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;

pub struct Entry {
    pub dtype: String,
    pub shape: Vec<i64>,
    pub bytes: Vec<u8>,
}

pub struct SafeTensors {
    pub tensors: BTreeMap<String, Entry>,
    pub metadata: BTreeMap<String, String>,
}

enum Json {
    Str(String),
    Num(f64),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && (self.s[self.i] as char).is_ascii_whitespace() {
            self.i += 1;
        }
    }
    fn expect(&mut self, c: u8) {
        self.ws();
        assert_eq!(self.s[self.i], c, "bad safetensors header at byte {}", self.i);
        self.i += 1;
    }
    fn value(&mut self) -> Json {
        self.ws();
        match self.s[self.i] {
            b'"' => Json::Str(self.string()),
            b'[' => {
                self.i += 1;
                let mut v = Vec::new();
                self.ws();
                if self.s[self.i] == b']' {
                    self.i += 1;
                    return Json::Arr(v);
                }
                loop {
                    v.push(self.value());
                    self.ws();
                    let c = self.s[self.i];
                    self.i += 1;
                    if c == b']' {
                        return Json::Arr(v);
                    }
                    assert_eq!(c, b',');
                }
            }
            b'{' => {
                self.i += 1;
                let mut v = Vec::new();
                self.ws();
                if self.s[self.i] == b'}' {
                    self.i += 1;
                    return Json::Obj(v);
                }
                loop {
                    self.ws();
                    let k = self.string();
                    self.expect(b':');
                    v.push((k, self.value()));
                    self.ws();
                    let c = self.s[self.i];
                    self.i += 1;
                    if c == b'}' {
                        return Json::Obj(v);
                    }
                    assert_eq!(c, b',');
                }
            }
            _ => {
                let start = self.i;
                while self.i < self.s.len() && b"+-.eE0123456789".contains(&self.s[self.i]) {
                    self.i += 1;
                }
                let t = std::str::from_utf8(&self.s[start..self.i]).unwrap();
                Json::Num(t.parse().unwrap_or_else(|_| panic!("bad number {t:?} in header")))
            }
        }
    }
    fn string(&mut self) -> String {
        self.expect(b'"');
        let mut out = String::new();
        while self.s[self.i] != b'"' {
            if self.s[self.i] == b'\\' {
                self.i += 1;
                out.push(match self.s[self.i] {
                    b'n' => '\n',
                    b't' => '\t',
                    c => c as char,
                });
            } else {
                out.push(self.s[self.i] as char);
            }
            self.i += 1;
        }
        self.i += 1;
        out
    }
}

impl SafeTensors {
    pub fn read(path: &std::path::Path) -> SafeTensors {
        let buf = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let n = u64::from_le_bytes(buf[..8].try_into().unwrap()) as usize;
        let mut p = Parser { s: &buf[8..8 + n], i: 0 };
        let Json::Obj(top) = p.value() else { panic!("{}: header is not an object", path.display()) };
        let data = &buf[8 + n..];
        let mut tensors = BTreeMap::new();
        let mut metadata = BTreeMap::new();
        for (name, v) in top {
            let Json::Obj(fields) = v else { panic!("entry {name} is not an object") };
            if name == "__metadata__" {
                for (k, v) in fields {
                    if let Json::Str(s) = v {
                        metadata.insert(k, s);
                    }
                }
                continue;
            }
            let (mut dtype, mut shape, mut off) = (String::new(), Vec::new(), (0usize, 0usize));
            for (k, v) in fields {
                match (k.as_str(), v) {
                    ("dtype", Json::Str(s)) => dtype = s,
                    ("shape", Json::Arr(a)) => {
                        shape = a.iter().map(|x| if let Json::Num(n) = x { *n as i64 } else { panic!() }).collect()
                    }
                    ("data_offsets", Json::Arr(a)) => {
                        let f = |x: &Json| if let Json::Num(n) = x { *n as usize } else { panic!() };
                        off = (f(&a[0]), f(&a[1]));
                    }
                    _ => {}
                }
            }
            tensors.insert(name, Entry { dtype, shape, bytes: data[off.0..off.1].to_vec() });
        }
        SafeTensors { tensors, metadata }
    }
    pub fn get(&self, name: &str) -> &Entry {
        self.tensors.get(name).unwrap_or_else(|| panic!("tensor {name} missing"))
    }
    pub fn f32(&self, name: &str) -> Vec<f32> {
        let e = self.get(name);
        assert_eq!(e.dtype, "F32", "{name}");
        e.bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
    }
    pub fn i32(&self, name: &str) -> Vec<i32> {
        let e = self.get(name);
        assert_eq!(e.dtype, "I32", "{name}");
        e.bytes.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap())).collect()
    }
    pub fn u8(&self, name: &str) -> Vec<u8> {
        let e = self.get(name);
        assert_eq!(e.dtype, "U8", "{name}");
        e.bytes.clone()
    }
    pub fn meta(&self, key: &str) -> &str {
        self.metadata.get(key).unwrap_or_else(|| panic!("metadata {key} missing"))
    }
}

pub fn conformance_dir() -> PathBuf {
    match std::env::var_os("DEFKV_CONFORMANCE_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../tests/data/conformance"),
    }
}

pub const CASES: [&str; 4] = ["pub1-g4-L1024", "pub2-g1-L300", "pub3-g8-L700", "pub4-3layer-L512"];
pub const METHODS: [&str; 9] = [
    "snapkv", "ada-snapkv", "criticalkv", "ada-criticalkv", "defensivekv", "layer-defensivekv",
    "streamingllm", "knorm", "tova",
];

/// One layer's inputs of a case, owned.
pub struct CaseLayer {
    pub queries: Vec<f32>,
    pub keys: Vec<f32>,
    pub values: Vec<f32>,
    pub o_proj: Vec<f32>,
    pub q_shape: Vec<i64>,
    pub kv_shape: Vec<i64>,
    pub o_shape: Vec<i64>,
}

pub struct Case {
    pub layers: Vec<CaseLayer>,
    pub window: i32,
    pub kernel: i32,
    pub ratio: f64,
}

pub fn load_case(name: &str) -> Case {
    let st = SafeTensors::read(&conformance_dir().join(format!("{name}.case.safetensors")));
    let n: usize = st.meta("n_layers").parse().unwrap();
    let layers = (0..n)
        .map(|i| CaseLayer {
            queries: st.f32(&format!("layers.{i}.queries")),
            keys: st.f32(&format!("layers.{i}.keys")),
            values: st.f32(&format!("layers.{i}.values")),
            o_proj: st.f32(&format!("layers.{i}.o_proj")),
            q_shape: st.get(&format!("layers.{i}.queries")).shape.clone(),
            kv_shape: st.get(&format!("layers.{i}.keys")).shape.clone(),
            o_shape: st.get(&format!("layers.{i}.o_proj")).shape.clone(),
        })
        .collect();
    Case {
        layers,
        window: st.meta("window").parse().unwrap(),
        kernel: st.meta("kernel").parse().unwrap(),
        ratio: st.meta("compression_ratio").parse().unwrap(),
    }
}
