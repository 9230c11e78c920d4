//! A loop of create / compress / compact / drop must not grow the process's memory.
//! (Its own test binary, so no other test allocates concurrently.)
mod common;

use defkv::{Context, Layer, Method, Params, Sequence, Tensor};

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages: u64 = s.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4
}

fn one_round(case: &common::Case) {
    let l = &case.layers[0];
    let mut keys = l.keys.clone();
    let mut values = l.values.clone();
    let ctx = Context::builder().threads(1).build().unwrap();
    let params = Params::new(Method::DEFENSIVEKV).compression_ratio(case.ratio).window(case.window).kernel(case.kernel);
    let mut layer = Layer::new(vec![Sequence::with_queries(
        Tensor::f32(&l.queries, &l.q_shape).unwrap(),
        Tensor::f32_mut(&mut keys, &l.kv_shape).unwrap(),
        Tensor::f32_mut(&mut values, &l.kv_shape).unwrap(),
    )])
    .with_o_proj(Tensor::f32(&l.o_proj, &l.o_shape).unwrap());
    let sel = ctx.select(&params, &layer).unwrap();
    ctx.compact_inplace(&mut layer, &sel).unwrap();
    let global_params = Params::new(Method::LAYER_DEFENSIVEKV).compression_ratio(case.ratio).window(case.window).kernel(case.kernel);
    let mut g = ctx.global(&global_params, 1).unwrap();
    g.add_layer(0, &layer).unwrap();
    g.select().unwrap();
    let _ = g.layer_selection(0).unwrap();
}

#[test]
fn create_compress_close_loop_does_not_grow() {
    let case = common::load_case("pub2-g1-L300");
    for _ in 0..20 {
        one_round(&case);
    }
    let before = rss_kib();
    let rounds = 300;
    for _ in 0..rounds {
        one_round(&case);
        if std::env::var_os("DEFKV_TEST_LEAK").is_some() {
            std::mem::forget(Context::new().unwrap()); // proves the test can fail
        }
    }
    let after = rss_kib();
    let grown = after.saturating_sub(before);
    eprintln!("rss before {before} KiB, after {rounds} more rounds {after} KiB (grew {grown} KiB)");
    // One round allocates well over 300 KiB (context, workspace, selection, copies of the
    // keys/values); a leak of any of it would exceed 4 MiB over 300 rounds.
    assert!(grown < 4096, "memory grew by {grown} KiB over {rounds} rounds");
}
