//! Every golden case with every method must match the official keep sets exactly. Its own
//! test binary: see `concurrent_contexts_agree` for why nothing else runs beside it.
mod common;

use common::{load_case, SafeTensors, CASES, METHODS};
use defkv::{Context, Layer, Method, Params, Selection, Sequence, Tensor};

fn layer_of(l: &common::CaseLayer) -> Layer<'_> {
    Layer::new(vec![Sequence::with_queries(
        Tensor::f32(&l.queries, &l.q_shape).unwrap(),
        Tensor::f32(&l.keys, &l.kv_shape).unwrap(),
        Tensor::f32(&l.values, &l.kv_shape).unwrap(),
    )])
    .with_o_proj(Tensor::f32(&l.o_proj, &l.o_shape).unwrap())
}

fn run(ctx: &Context, case: &common::Case, method: Method) -> Vec<Selection> {
    let params = Params::new(method).compression_ratio(case.ratio).window(case.window).kernel(case.kernel);
    let layers: Vec<Layer> = case.layers.iter().map(layer_of).collect();
    if method == Method::LAYER_DEFENSIVEKV {
        let mut g = ctx.global(&params, layers.len() as i32).unwrap();
        for (i, l) in layers.iter().enumerate() {
            g.add_layer(i as i32, l).unwrap();
        }
        g.select().unwrap();
        (0..layers.len()).map(|i| g.layer_selection(i as i32).unwrap()).collect()
    } else {
        layers.iter().map(|l| ctx.select(&params, l).unwrap()).collect()
    }
}

#[test]
fn every_golden_case_and_method_matches_exactly() {
    all_cases_match();
}

fn all_cases_match() {
    let ctx = Context::new().unwrap();
    let mut checked = 0;
    for case_name in CASES {
        let case = load_case(case_name);
        for m in METHODS {
            let method = Method::from_name(m).unwrap();
            let exp = SafeTensors::read(&common::conformance_dir().join(format!("{case_name}.{m}.expected.safetensors")));
            let sels = run(&ctx, &case, method);
            assert_eq!(sels.len(), case.layers.len());
            for (i, sel) in sels.iter().enumerate() {
                let keep = exp.u8(&format!("layers.{i}.keep"));
                let lens = exp.i32(&format!("layers.{i}.head_lens"));
                assert_eq!(sel.head_lens(), &lens[..], "{case_name} {m} layer {i}: head_lens");
                assert_eq!(sel.keep_mask(), &keep[..], "{case_name} {m} layer {i}: keep set");
                // the index lists agree with the mask
                let l = case.layers[i].kv_shape[1] as usize;
                for h in 0..lens.len() {
                    let from_mask: Vec<i32> =
                        (0..l).filter(|&t| keep[h * l + t] == 1).map(|t| t as i32).collect();
                    assert_eq!(sel.kept(h), &from_mask[..], "{case_name} {m} layer {i} head {h}: indices");
                }
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 3 * 9 + 9 * 3, "layer results checked");
}


/// The header promises that different contexts may be used concurrently. Two threads with
/// their own contexts compress every case and must still match the golden files.
/// Ignored by default: with libdefkv 0.1.0 (commit bc5ab27) it fails intermittently (a wrong
/// keep set in one thread), which points to shared mutable state in the core; run it with
/// `cargo test --test conformance -- --ignored`.
#[test]
#[ignore]
fn concurrent_contexts_agree() {
    let threads: Vec<_> = (0..2)
        .map(|_| std::thread::spawn(|| for _ in 0..5 { all_cases_match() }))
        .collect();
    for t in threads {
        t.join().expect("a thread saw a wrong selection");
    }
}
