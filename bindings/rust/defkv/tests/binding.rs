//! Golden conformance, error paths and the zero-copy compaction of the safe API.
mod common;

use common::load_case;
use defkv::{Context, Layer, Method, Params, Sequence, Status, Tensor};

fn layer_of(l: &common::CaseLayer) -> Layer<'_> {
    Layer::new(vec![Sequence::with_queries(
        Tensor::f32(&l.queries, &l.q_shape).unwrap(),
        Tensor::f32(&l.keys, &l.kv_shape).unwrap(),
        Tensor::f32(&l.values, &l.kv_shape).unwrap(),
    )])
    .with_o_proj(Tensor::f32(&l.o_proj, &l.o_shape).unwrap())
}

#[test]
fn invalid_ratio_is_an_error_naming_the_argument() {
    let case = load_case("pub2-g1-L300");
    let ctx = Context::new().unwrap();
    let layer = layer_of(&case.layers[0]);
    let err = ctx.select(&Params::new(Method::SNAPKV).compression_ratio(1.5).window(case.window), &layer).unwrap_err();
    assert_eq!(err.status(), Status::INVALID_ARGUMENT);
    assert!(err.message().contains("compression_ratio"), "message: {}", err.message());
    assert!(err.to_string().contains("invalid argument"), "display: {err}");
}

#[test]
fn global_out_of_order_is_invalid_state() {
    let ctx = Context::new().unwrap();
    let mut g = ctx.global(&Params::new(Method::LAYER_DEFENSIVEKV), 2).unwrap();
    let err = g.layer_selection(0).unwrap_err();
    assert_eq!(err.status(), Status::INVALID_STATE, "{err}");
    let err = g.select().unwrap_err();
    assert_eq!(err.status(), Status::INVALID_STATE, "{err}");
    assert!(err.message().contains("was not added"), "{err}");
}

#[test]
fn global_rejects_wrong_method() {
    let ctx = Context::new().unwrap();
    let err = ctx.global(&Params::new(Method::SNAPKV), 2).err().expect("snapkv global must fail");
    assert_eq!(err.status(), Status::INVALID_ARGUMENT, "{err}");
    assert!(err.message().contains("method"), "{err}");
}

#[test]
fn unknown_method_name_and_bad_shapes() {
    let err = Method::from_name("no-such-method").unwrap_err();
    assert_eq!(err.status(), Status::INVALID_ARGUMENT);
    assert_eq!(Method::from_name("defensivekv").unwrap(), Method::DEFENSIVEKV);
    assert_eq!(Method::TOVA.name(), Some("tova"));
    let v = vec![0f32; 10];
    let err = Tensor::f32(&v, &[3, 4]).err().unwrap();
    assert_eq!(err.status(), Status::INVALID_ARGUMENT);
    assert!(err.message().contains("10 elements"), "{err}");
    let err = Tensor::f32(&v, &[2, 5]).unwrap().with_strides(&[5, 2]).err().unwrap();
    assert!(err.message().contains("strides"), "{err}");
}

#[test]
fn missing_o_proj_is_reported() {
    let case = load_case("pub2-g1-L300");
    let l = &case.layers[0];
    let layer = Layer::new(vec![Sequence::with_queries(
        Tensor::f32(&l.queries, &l.q_shape).unwrap(),
        Tensor::f32(&l.keys, &l.kv_shape).unwrap(),
        Tensor::f32(&l.values, &l.kv_shape).unwrap(),
    )]);
    let ctx = Context::new().unwrap();
    let err = ctx.select(&Params::new(Method::DEFENSIVEKV).window(case.window), &layer).unwrap_err();
    assert_eq!(err.status(), Status::INVALID_ARGUMENT);
    assert!(err.message().contains("o_proj"), "{err}");
}

#[test]
fn unavailable_backend_is_an_error() {
    // CUDA is not built into (or usable by) every library; when it is unavailable creating a
    // context on it must fail with BACKEND_UNAVAILABLE and a message.
    if defkv::Backend::CUDA.available().is_ok() {
        eprintln!("CUDA is available here; the unavailable-backend path is not exercised");
        return;
    }
    let err = Context::builder().backend(defkv::Backend::CUDA).build().err().unwrap();
    assert_eq!(err.status(), Status::BACKEND_UNAVAILABLE);
    assert!(!err.message().is_empty());
}

#[test]
fn compaction_writes_into_the_callers_buffers() {
    let case = load_case("pub1-g4-L1024");
    let l = &case.layers[0];
    let (hk, len, d) = (l.kv_shape[0] as usize, l.kv_shape[1] as usize, l.kv_shape[2] as usize);
    let mut keys = l.keys.clone();
    let mut values = l.values.clone();
    let keys_addr = keys.as_ptr();
    let ctx = Context::new().unwrap();
    let params = Params::new(Method::DEFENSIVEKV).compression_ratio(case.ratio).window(case.window).kernel(case.kernel);
    let sel;
    {
        let mut layer = Layer::new(vec![Sequence::with_queries(
            Tensor::f32(&l.queries, &l.q_shape).unwrap(),
            Tensor::f32_mut(&mut keys, &l.kv_shape).unwrap(),
            Tensor::f32_mut(&mut values, &l.kv_shape).unwrap(),
        )])
        .with_o_proj(Tensor::f32(&l.o_proj, &l.o_shape).unwrap());
        sel = ctx.select(&params, &layer).unwrap();
        ctx.compact_inplace(&mut layer, &sel).unwrap();
    }
    assert_eq!(keys.as_ptr(), keys_addr, "the caller's buffer itself was written");
    let mut moved = 0;
    for h in 0..hk {
        for (j, &t) in sel.kept(h).iter().enumerate() {
            let dst = (h * len + j) * d;
            let src = (h * len + t as usize) * d;
            assert_eq!(&keys[dst..dst + d], &l.keys[src..src + d], "head {h} row {j} keys");
            assert_eq!(&values[dst..dst + d], &l.values[src..src + d], "head {h} row {j} values");
            if t as usize != j {
                moved += 1;
            }
        }
    }
    assert!(moved > 0, "compaction moved no row: the test would not see a copy");
    assert_ne!(keys, l.keys, "the caller's keys changed in place");
}

#[test]
fn read_only_tensors_cannot_be_compacted() {
    let case = load_case("pub2-g1-L300");
    let l = &case.layers[0];
    let ctx = Context::new().unwrap();
    let mut layer = layer_of(l);
    let params = Params::new(Method::SNAPKV).compression_ratio(case.ratio).window(case.window).kernel(case.kernel);
    let sel = ctx.select(&params, &layer).unwrap();
    let err = ctx.compact_inplace(&mut layer, &sel).unwrap_err();
    assert_eq!(err.status(), Status::INVALID_ARGUMENT);
    assert!(err.message().contains("writable"), "{err}");
}

#[test]
fn errors_name_the_rust_method_called() {
    let case = load_case("pub2-g1-L300");
    let ctx = Context::new().unwrap();
    let layer = layer_of(&case.layers[0]);
    let err = ctx.select(&Params::new(Method::SNAPKV).compression_ratio(1.5), &layer).unwrap_err();
    assert!(err.message().starts_with("Context::select: "), "message: {}", err.message());
    assert!(!err.message().contains("defkv_kept_count"), "message: {}", err.message());
}

/// A preallocated head-major cache [Hk, Lmax, d] holding L < Lmax tokens: a strided view of
/// the whole buffer selects what the contiguous [Hk, L, d] cache selects, and compaction
/// writes into the big buffer.
#[test]
fn strided_view_of_a_cache_with_spare_capacity() {
    let case = load_case("pub2-g1-L300");
    let l = &case.layers[0];
    let (hk, len, d) = (l.kv_shape[0] as usize, l.kv_shape[1] as usize, l.kv_shape[2] as usize);
    let lmax = len + 37;
    let big = |src: &[f32]| {
        let mut b = vec![f32::NAN; hk * lmax * d]; // rows past L must never be read
        for h in 0..hk {
            b[h * lmax * d..h * lmax * d + len * d].copy_from_slice(&src[h * len * d..(h + 1) * len * d]);
        }
        b
    };
    let (mut bk, mut bv) = (big(&l.keys), big(&l.values));
    let shape = [hk as i64, len as i64, d as i64];
    let strides = [(lmax * d) as i64, d as i64, 1];
    let params = Params::new(Method::DEFENSIVEKV).compression_ratio(case.ratio).window(case.window).kernel(case.kernel);
    let ctx = Context::new().unwrap();
    let want = ctx.select(&params, &layer_of(l)).unwrap();
    // One element short of the strided extent is refused.
    let short = hk * lmax * d - (lmax - len) * d - 1;
    assert!(Tensor::strided(&bk[..short], &shape, &strides).is_err());
    let mut layer = Layer::new(vec![Sequence::with_queries(
        Tensor::new(&l.queries, &l.q_shape).unwrap(),
        Tensor::strided_mut(&mut bk, &shape, &strides).unwrap(),
        Tensor::strided_mut(&mut bv, &shape, &strides).unwrap(),
    )])
    .with_o_proj(Tensor::new(&l.o_proj, &l.o_shape).unwrap());
    let got = ctx.select(&params, &layer).unwrap();
    assert!(!got.indices().is_empty());
    assert_eq!(got.indices(), want.indices());
    ctx.compact_inplace(&mut layer, &got).unwrap();
    drop(layer);
    for h in 0..hk {
        for (j, &tok) in got.kept(h).iter().enumerate() {
            assert_eq!(bk[h * lmax * d + j * d], l.keys[(h * len + tok as usize) * d], "head {h} row {j}");
        }
    }
}

/// half::bf16 / half::f16 slices are accepted directly and select what the f32 data selects
/// when the values are exactly representable (every f32 rounded to bf16 first).
#[cfg(feature = "half")]
#[test]
fn half_types_are_accepted() {
    use half::{bf16, f16};
    let case = load_case("pub2-g1-L300");
    let l = &case.layers[0];
    let to_bf = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>();
    let (q, k, v, o) = (to_bf(&l.queries), to_bf(&l.keys), to_bf(&l.values), to_bf(&l.o_proj));
    let back = |v: &[bf16]| v.iter().map(|x| x.to_f32()).collect::<Vec<_>>();
    let (qf, kf, vf, of) = (back(&q), back(&k), back(&v), back(&o));
    let params = Params::new(Method::DEFENSIVEKV).compression_ratio(case.ratio).window(case.window).kernel(case.kernel);
    let ctx = Context::new().unwrap();
    let layer = Layer::new(vec![Sequence::with_queries(
        Tensor::new(&q, &l.q_shape).unwrap(),
        Tensor::new(&k, &l.kv_shape).unwrap(),
        Tensor::new(&v, &l.kv_shape).unwrap(),
    )])
    .with_o_proj(Tensor::new(&o, &l.o_shape).unwrap());
    assert_eq!(Tensor::new(&q, &l.q_shape).unwrap().dtype(), defkv::Dtype::BF16);
    let got = ctx.select(&params, &layer).unwrap();
    let reference = Layer::new(vec![Sequence::with_queries(
        Tensor::new(&qf, &l.q_shape).unwrap(),
        Tensor::new(&kf, &l.kv_shape).unwrap(),
        Tensor::new(&vf, &l.kv_shape).unwrap(),
    )])
    .with_o_proj(Tensor::new(&of, &l.o_shape).unwrap());
    let want = ctx.select(&params, &reference).unwrap();
    assert!(!got.indices().is_empty());
    assert_eq!(got.indices(), want.indices());
    let h16 = vec![f16::from_f32(0.5); 8];
    assert_eq!(Tensor::new(&h16, &[2, 4]).unwrap().dtype(), defkv::Dtype::F16);
}
