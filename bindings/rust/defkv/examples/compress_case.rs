//! Compresses one golden case with one method and prints the kept entries per KV head.
//! Usage: compress_case [CASE] [METHOD]   (default pub2-g1-L300 defensivekv)
#[path = "../tests/common/mod.rs"]
mod common;

use defkv::{Context, Layer, Method, Params, Sequence, Tensor};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let case_name = args.get(1).map_or("pub2-g1-L300", |s| s.as_str());
    let method = Method::from_name(args.get(2).map_or("defensivekv", |s| s.as_str()))?;
    let case = common::load_case(case_name);
    let params = Params::new(method).compression_ratio(case.ratio).window(case.window).kernel(case.kernel);
    let ctx = Context::new()?;
    let layers: Vec<Layer> = case
        .layers
        .iter()
        .map(|l| {
            Ok(Layer::new(vec![Sequence::with_queries(
                Tensor::f32(&l.queries, &l.q_shape)?,
                Tensor::f32(&l.keys, &l.kv_shape)?,
                Tensor::f32(&l.values, &l.kv_shape)?,
            )])
            .with_o_proj(Tensor::f32(&l.o_proj, &l.o_shape)?))
        })
        .collect::<defkv::Result<_>>()?;
    let selections = if method == Method::LAYER_DEFENSIVEKV {
        let mut g = ctx.global(&params, layers.len() as i32)?;
        for (i, l) in layers.iter().enumerate() {
            g.add_layer(i as i32, l)?;
        }
        g.select()?;
        (0..layers.len()).map(|i| g.layer_selection(i as i32)).collect::<defkv::Result<Vec<_>>>()?
    } else {
        layers.iter().map(|l| ctx.select(&params, l)).collect::<defkv::Result<Vec<_>>>()?
    };
    println!("defkv {} {} {}", defkv::version(), case_name, method.name().unwrap_or("?"));
    for (i, sel) in selections.iter().enumerate() {
        for h in 0..sel.head_lens().len() {
            let kept = sel.kept(h);
            println!("layer {i} head {h}: kept {} entries, first {:?}", kept.len(), &kept[..kept.len().min(8)]);
        }
    }
    Ok(())
}
