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
