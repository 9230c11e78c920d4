//! Decode-time eviction through the safe API: a small stream (2 layers, H = 4, Hk = 2, d = 8,
//! window 4, interval 8, budget 12, capacity 48, defensivekv with an o_proj), a prompt of 20
//! tokens, then 40 decoding steps with the engine loop (K/V written at row head_lens[k] of each
//! head, append, push_queries, round when due), on contiguous [Hk, capacity, d] caches or
//! one-head-per-page caches.
use defkv::{Context, Method, PageLayout, PagedKv, Params, Status, StreamCache, StreamParams, Tensor};

const LAYERS: usize = 2;
const H: usize = 4;
const HK: usize = 2;
const D: usize = 8;
const W: usize = 4;
const CAP: usize = 48;
const BUDGET: usize = 12;
const INTERVAL: usize = 8;
const DM: usize = 16;
const PROMPT: usize = 20;
const STEPS: usize = 40;
const PS: usize = 4;
const MAX_PAGES: usize = CAP / PS;
const N_PAGES: usize = HK * MAX_PAGES;

fn lcg(seed: &mut u32) -> f32 {
    *seed = seed.wrapping_mul(1103515245).wrapping_add(12345);
    (*seed >> 8) as f32 / 16777216.0 - 0.5
}

fn params() -> Params {
    Params::new(Method::DEFENSIVEKV).window(W as i32)
}

fn stream_params() -> StreamParams {
    StreamParams::new(LAYERS as i32, H as i32, HK as i32, D as i32, CAP as i32, BUDGET as i64).interval(INTERVAL as i32)
}

type Entry = (Vec<f32>, Vec<f32>);

/// Every round's head lengths; checks budget + slack, the cache rows against the entries the
/// selection kept, the window (the last 4 appended entries) and the sinks.
fn run(paged: bool) -> Vec<Vec<i32>> {
    let ctx = Context::builder().threads(2).build().unwrap();
    let mut st = ctx.stream(&params(), &stream_params()).unwrap();
    let mut seed = 3u32;
    let o: Vec<f32> = (0..DM * H * D).map(|_| lcg(&mut seed)).collect();
    let tables: Vec<i32> = (0..HK * MAX_PAGES).map(|i| ((i * 7 + 3) % N_PAGES) as i32).collect(); // a permutation
    let row = |k: usize, r: usize| -> usize {
        if paged {
            (tables[k * MAX_PAGES + r / PS] as usize * PS + r % PS) * D
        } else {
            (k * CAP + r) * D
        }
    };
    let mut keys = vec![vec![0f32; HK * CAP * D]; LAYERS];
    let mut vals = vec![vec![0f32; HK * CAP * D]; LAYERS];
    let mut mirror: Vec<Vec<Vec<Entry>>> = vec![vec![vec![]; HK]; LAYERS];
    let mut written: Vec<Vec<Vec<Entry>>> = vec![vec![vec![]; HK]; LAYERS];
    let mut history = vec![];
    for s in 0..=STEPS {
        let n = if s == 0 { PROMPT } else { 1 };
        for l in 0..LAYERS {
            let lens = st.head_lens(l as i32).unwrap();
            for k in 0..HK {
                for i in 0..n {
                    let f = 1.0 + (written[l][k].len() % 3) as f32;
                    let e: Entry = ((0..D).map(|_| lcg(&mut seed)).collect(), (0..D).map(|_| lcg(&mut seed) * f).collect());
                    let at = row(k, lens[k] as usize + i);
                    keys[l][at..at + D].copy_from_slice(&e.0);
                    vals[l][at..at + D].copy_from_slice(&e.1);
                    mirror[l][k].push(e.clone());
                    written[l][k].push(e);
                }
            }
            st.append(l as i32, n as i32).unwrap();
            let w = n.min(W); // the prompt pushes its last window of queries
            let q: Vec<f32> = (0..H * w * D).map(|_| lcg(&mut seed) * 2.0).collect();
            st.push_queries(l as i32, &Tensor::new(&q, &[H as i64, w as i64, D as i64]).unwrap()).unwrap();
        }
        if s == 0 || !st.due().unwrap() {
            continue;
        }
        let sels = {
            let mut caches: Vec<StreamCache> = keys
                .iter_mut()
                .zip(vals.iter_mut())
                .map(|(k, v)| {
                    let c = if paged {
                        let dims = [N_PAGES as i64, PS as i64, D as i64];
                        StreamCache::paged(
                            PagedKv::new(PageLayout::HEAD, PS as i32, Tensor::new_mut(k, &dims).unwrap(),
                                         Tensor::new_mut(v, &dims).unwrap(), &tables, MAX_PAGES as i64, &[])
                            .n_kv_heads(HK as i32),
                        )
                    } else {
                        let dims = [HK as i64, CAP as i64, D as i64];
                        StreamCache::contiguous(Tensor::new_mut(k, &dims).unwrap(), Tensor::new_mut(v, &dims).unwrap())
                    };
                    c.with_o_proj(Tensor::new(&o, &[DM as i64, (H * D) as i64]).unwrap())
                })
                .collect();
            st.round_selections(&mut caches).unwrap()
        };
        let mut round = vec![];
        for l in 0..LAYERS {
            let lens = st.head_lens(l as i32).unwrap();
            assert_eq!(sels[l].head_lens(), &lens[..], "the selection's head lens");
            round.extend_from_slice(&lens);
            for k in 0..HK {
                let n = lens[k] as usize;
                assert!(n <= BUDGET + INTERVAL, "step {s} layer {l} head {k}: {n} entries, above budget + slack");
                mirror[l][k] = sels[l].kept(k).iter().map(|&i| mirror[l][k][i as usize].clone()).collect();
                for (r, e) in mirror[l][k].iter().enumerate() {
                    let at = row(k, r);
                    assert!(keys[l][at..at + D] == e.0[..] && vals[l][at..at + D] == e.1[..],
                            "step {s} layer {l} head {k}: cache row {r} is not the kept entry");
                }
                let wr = &written[l][k];
                for i in 1..=W {
                    let at = row(k, n - i);
                    assert!(keys[l][at..at + D] == wr[wr.len() - i].0[..], "step {s} layer {l} head {k}: window entry lost");
                }
                for (i, e) in wr.iter().enumerate().take(params_n_sink()) {
                    let at = row(k, i);
                    assert!(keys[l][at..at + D] == e.0[..], "step {s} layer {l} head {k}: sink {i} lost");
                }
            }
        }
        history.push(round);
    }
    assert!(history.len() >= 3, "{} rounds ran, expected at least 3", history.len());
    assert!(history.iter().flatten().any(|&n| (n as usize) < PROMPT), "no round evicted anything");
    history
}

fn params_n_sink() -> usize {
    4 // the library's default n_sink
}

#[test]
fn stream_contiguous_is_deterministic() {
    assert_eq!(run(false), run(false));
}

#[test]
fn stream_paged_equals_contiguous() {
    assert_eq!(run(true), run(false));
}

#[test]
fn stream_errors() {
    let ctx = Context::new().unwrap();
    let err = ctx.stream(&params(), &StreamParams::new(LAYERS as i32, H as i32, HK as i32, D as i32, CAP as i32, 7))
        .err()
        .expect("budget below window + sinks");
    assert_eq!(err.status(), Status::INVALID_ARGUMENT);
    assert!(err.message().starts_with("Context::stream: sp->budget"), "{}", err.message());
    let mut st = ctx.stream(&params(), &stream_params()).unwrap();
    let q = vec![0f32; H * (D + 1)];
    let err = st.push_queries(0, &Tensor::new(&q, &[H as i64, 1, (D + 1) as i64]).unwrap()).unwrap_err();
    assert_eq!(err.status(), Status::INVALID_ARGUMENT);
    assert!(err.message().starts_with("Stream::push_queries: queries"), "{}", err.message());
    assert_eq!(st.round(&mut []).unwrap_err().status(), Status::INVALID_ARGUMENT);
    let err = st.append(0, (CAP + 1) as i32).unwrap_err();
    assert_eq!(err.status(), Status::INVALID_STATE);
    assert!(err.message().contains("capacity"), "{}", err.message());
    // Read-only caches are refused before the library sees them.
    let (kc, vc) = (vec![0f32; HK * CAP * D], vec![0f32; HK * CAP * D]);
    let dims = [HK as i64, CAP as i64, D as i64];
    let ro = StreamCache::contiguous(Tensor::new(&kc, &dims).unwrap(), Tensor::new(&vc, &dims).unwrap());
    let err = st.round(&mut [ro, ro]).unwrap_err();
    assert!(err.message().contains("writable"), "{}", err.message());
}
