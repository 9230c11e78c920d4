//! A program outside the defkv repository using the installed crates: compresses a golden case
//! with DefensiveKV and checks the kept entries against the expected file.
//! Usage: defkv-consumer CASE.safetensors EXPECTED.safetensors
use defkv::{Context, Layer, Method, Params, Sequence, Tensor};
use std::collections::HashMap;

/// The few fields of a safetensors file this program needs (its header is flat JSON).
struct File {
    header: String,
    data: Vec<u8>,
}

impl File {
    fn read(path: &str) -> File {
        let b = std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
        File { header: String::from_utf8(b[8..8 + n].to_vec()).unwrap(), data: b[8 + n..].to_vec() }
    }
    /// The text after `"key":` up to the closing bracket/brace/quote of the value.
    fn field<'a>(&'a self, from: usize, key: &str, close: char) -> (&'a str, usize) {
        let k = format!("\"{key}\"");
        let at = self.header[from..].find(&k).unwrap_or_else(|| panic!("no {key}")) + from + k.len();
        let open = at + self.header[at..].find(|c| c == '[' || c == '"').unwrap() + 1;
        let end = open + self.header[open..].find(close).unwrap();
        (&self.header[open..end], end)
    }
    fn nums(s: &str) -> Vec<usize> {
        s.split(',').map(|x| x.trim()).filter(|x| !x.is_empty()).map(|x| x.parse().unwrap()).collect()
    }
    fn tensor(&self, name: &str) -> (Vec<i64>, &[u8]) {
        let (_, at) = self.field(0, name, '"');
        let (shape, at) = self.field(at, "shape", ']');
        let (offs, _) = self.field(at, "data_offsets", ']');
        let o = File::nums(offs);
        (File::nums(shape).into_iter().map(|x| x as i64).collect(), &self.data[o[0]..o[1]])
    }
    fn f32(&self, name: &str) -> (Vec<i64>, Vec<f32>) {
        let (shape, raw) = self.tensor(name);
        (shape, raw.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect())
    }
    fn meta(&self, key: &str) -> String {
        self.field(0, key, '"').0.to_string()
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 {
        eprintln!("usage: defkv-consumer CASE.safetensors EXPECTED.safetensors");
        std::process::exit(2);
    }
    let (case, exp) = (File::read(&args[1]), File::read(&args[2]));
    let (qs, q) = case.f32("layers.0.queries");
    let (ks, mut k) = case.f32("layers.0.keys");
    let (_, mut v) = case.f32("layers.0.values");
    let (os, o) = case.f32("layers.0.o_proj");
    let params = Params::new(Method::DEFENSIVEKV)
        .compression_ratio(case.meta("compression_ratio").parse().unwrap())
        .window(case.meta("window").parse().unwrap())
        .kernel(case.meta("kernel").parse().unwrap());
    let ctx = Context::new().expect("context");
    let mut layer = Layer::new(vec![Sequence::with_queries(
        Tensor::new(&q, &qs).unwrap(),
        Tensor::new_mut(&mut k, &ks).unwrap(),
        Tensor::new_mut(&mut v, &ks).unwrap(),
    )])
    .with_o_proj(Tensor::new(&o, &os).unwrap());
    let sel = ctx.select(&params, &layer).unwrap_or_else(|e| panic!("{e}"));
    let (_, keep) = exp.tensor("layers.0.keep");
    let (_, lens) = exp.tensor("layers.0.head_lens");
    let lens: Vec<i32> = lens.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap())).collect();
    let mut diff: HashMap<&str, usize> = HashMap::new();
    *diff.entry("keep").or_default() += keep.iter().zip(sel.keep_mask()).filter(|(a, b)| a != b).count();
    *diff.entry("head_lens").or_default() += usize::from(lens != sel.head_lens());
    if keep.len() != sel.keep_mask().len() || diff.values().any(|&n| n > 0) {
        eprintln!("rust consumer: selection differs from {}: {diff:?}", args[2]);
        std::process::exit(1);
    }
    ctx.compact_inplace(&mut layer, &sel).unwrap_or_else(|e| panic!("{e}"));
    println!(
        "rust consumer: defkv {}: {} kept entries over {} heads match the expected file",
        defkv::version(),
        sel.indices().len(),
        sel.head_lens().len()
    );
}
