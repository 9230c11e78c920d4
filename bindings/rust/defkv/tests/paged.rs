//! Paged caches through the safe API: the selection of a paged layer equals the contiguous
//! one, compaction in place and into new per-head pages moves the kept rows and frees the
//! expected pages, and bad block tables surface as errors with the library's message.
use defkv::{Context, Layer, Method, PageLayout, PagedKv, Params, Selection, Sequence, Status, Tensor};

const H: usize = 4;
const HK: usize = 2;
const D: usize = 8;
const W: usize = 4;
const PS: usize = 4;
const LENS: [usize; 2] = [37, 22];

fn lcg(seed: &mut u32) -> f32 {
    *seed = seed.wrapping_mul(1103515245).wrapping_add(12345);
    (*seed >> 8) as f32 / 16777216.0 - 0.5
}

/// Two sequences: queries [H, W, d], keys and values [Hk, L, d].
struct Batch {
    q: Vec<Vec<f32>>,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

fn batch() -> Batch {
    let mut seed = 7u32;
    let mut fill = |n: usize| (0..n).map(|_| lcg(&mut seed)).collect::<Vec<f32>>();
    let mut b = Batch { q: vec![], k: vec![], v: vec![] };
    for l in LENS {
        b.q.push(fill(H * W * D));
        b.k.push(fill(HK * l * D));
        b.v.push(fill(HK * l * D));
    }
    b
}

fn shuffled(n: usize) -> Vec<i32> {
    let mut p: Vec<i32> = (0..n as i32).collect();
    let mut seed = 11u32;
    for i in (1..n).rev() {
        seed = seed.wrapping_mul(1103515245).wrapping_add(12345);
        p.swap(i, (seed >> 8) as usize % (i + 1));
    }
    p
}

fn pages(l: usize) -> usize {
    (l + PS - 1) / PS
}

/// Element offset of token `t` of head `h` in page `page` of a pool of the layout.
fn slot(layout: PageLayout, page: i32, t: usize, h: usize) -> usize {
    if layout == PageLayout::NHD {
        ((page as usize * PS + t % PS) * HK + h) * D
    } else {
        (page as usize * PS + t % PS) * D
    }
}

/// A paged copy of the batch: pools full of NaN except where rows point, shuffled page ids.
struct Pools {
    layout: PageLayout,
    k: Vec<f32>,
    v: Vec<f32>,
    tables: Vec<i32>,
    stride: usize,
    n_pages: usize,
}

impl Pools {
    fn of(b: &Batch, layout: PageLayout, spare: usize) -> Pools {
        let per_seq = if layout == PageLayout::HEAD { HK } else { 1 };
        let stride = pages(LENS[0]);
        let n_pages = LENS.iter().map(|&l| per_seq * pages(l)).sum::<usize>() + spare;
        let per_page = if layout == PageLayout::NHD { PS * HK * D } else { PS * D };
        let mut p = Pools { layout, k: vec![f32::NAN; n_pages * per_page], v: vec![f32::NAN; n_pages * per_page],
                            tables: vec![0; per_seq * LENS.len() * stride], stride, n_pages };
        let ids = shuffled(n_pages);
        let mut next = 0;
        for (s, &l) in LENS.iter().enumerate() {
            for r in 0..per_seq {
                for i in 0..pages(l) {
                    p.tables[(s * per_seq + r) * stride + i] = ids[next];
                    next += 1;
                }
            }
            for h in 0..HK {
                let row = (s * per_seq + h % per_seq) * stride;
                for t in 0..l {
                    let o = slot(layout, p.tables[row + t / PS], t, h);
                    let src = (h * l + t) * D;
                    p.k[o..o + D].copy_from_slice(&b.k[s][src..src + D]);
                    p.v[o..o + D].copy_from_slice(&b.v[s][src..src + D]);
                }
            }
        }
        p
    }
    fn shape(&self) -> Vec<i64> {
        if self.layout == PageLayout::NHD {
            vec![self.n_pages as i64, PS as i64, HK as i64, D as i64]
        } else {
            vec![self.n_pages as i64, PS as i64, D as i64]
        }
    }
    /// Head h of sequence s holds `kept` (token positions) first in its row.
    fn check_kept(&self, what: &str, b: &Batch, row: usize, s: usize, h: usize, kept: &[i32]) {
        for (j, &t) in kept.iter().enumerate() {
            let o = slot(self.layout, self.tables[row * self.stride + j / PS], j, h);
            let src = (h * LENS[s] + t as usize) * D;
            assert_eq!(&self.k[o..o + D], &b.k[s][src..src + D], "{what}: seq {s} head {h} entry {j} (token {t})");
            assert_eq!(&self.v[o..o + D], &b.v[s][src..src + D], "{what}: seq {s} head {h} entry {j} (token {t})");
        }
    }
}

fn params() -> Params {
    Params::new(Method::ADA_SNAPKV).compression_ratio(0.6).window(W as i32) // heads keep different counts
}

fn dims(x: &[usize]) -> Vec<i64> {
    x.iter().map(|&n| n as i64).collect()
}

fn contiguous_selection(ctx: &Context, b: &Batch) -> Selection {
    let seqs = (0..LENS.len())
        .map(|s| {
            Sequence::with_queries(
                Tensor::new(&b.q[s], &dims(&[H, W, D])).unwrap(),
                Tensor::new(&b.k[s], &dims(&[HK, LENS[s], D])).unwrap(),
                Tensor::new(&b.v[s], &dims(&[HK, LENS[s], D])).unwrap(),
            )
        })
        .collect();
    ctx.select(&params(), &Layer::new(seqs)).unwrap()
}

fn queries(b: &Batch) -> Vec<Sequence<'_>> {
    b.q.iter().map(|q| Sequence::paged_queries(Tensor::new(q, &dims(&[H, W, D])).unwrap())).collect()
}

#[test]
fn paged_select_and_compact() {
    let ctx = Context::new().unwrap();
    let b = batch();
    let want = contiguous_selection(&ctx, &b);
    let seq_lens: Vec<i32> = LENS.iter().map(|&l| l as i32).collect();
    let mut checks = 0;
    for layout in [PageLayout::NHD, PageLayout::HEAD] {
        let mut src = Pools::of(&b, layout, 3);
        let (sel, mut dst, freed_into, freed_inplace);
        {
            let shape = src.shape();
            let paged = PagedKv::new(layout, PS as i32, Tensor::new_mut(&mut src.k, &shape).unwrap(),
                                     Tensor::new_mut(&mut src.v, &shape).unwrap(), &src.tables, src.stride as i64, &seq_lens)
                .n_kv_heads(if layout == PageLayout::HEAD { HK as i32 } else { 0 });
            let mut layer = Layer::new(queries(&b)).with_paged(paged).unwrap();
            sel = ctx.select(&params(), &layer).unwrap();
            assert_eq!(sel.head_lens(), want.head_lens(), "{layout:?}");
            assert_eq!(sel.indices(), want.indices(), "{layout:?}");
            assert_eq!(sel.keep_mask(), want.keep_mask(), "{layout:?}");

            // New per-head pages, as many as pages_needed says, shuffled ids, NaN elsewhere.
            let (need, total) = defkv::pages_needed(sel.head_lens(), PS as i32).unwrap();
            assert_eq!(need, sel.head_lens().iter().map(|&n| pages(n as usize) as i32).collect::<Vec<_>>());
            assert_eq!(total, need.iter().map(|&n| n as i64).sum::<i64>());
            let stride = *need.iter().max().unwrap() as usize;
            let n_pages = total as usize + 2;
            dst = Pools { layout: PageLayout::HEAD, k: vec![f32::NAN; n_pages * PS * D], v: vec![f32::NAN; n_pages * PS * D],
                          tables: vec![0; need.len() * stride], stride, n_pages };
            let ids = shuffled(n_pages);
            let mut next = 0;
            for (r, &n) in need.iter().enumerate() {
                for i in 0..n as usize {
                    dst.tables[r * stride + i] = ids[next];
                    next += 1;
                }
            }
            let dshape = dst.shape();
            let mut dpaged = PagedKv::new(PageLayout::HEAD, PS as i32, Tensor::new_mut(&mut dst.k, &dshape).unwrap(),
                                          Tensor::new_mut(&mut dst.v, &dshape).unwrap(), &dst.tables, stride as i64, &[])
                .n_kv_heads(HK as i32);
            freed_into = ctx.compact_paged_into(&layer, &sel, &mut dpaged).unwrap();
            freed_inplace = ctx.compact_paged_inplace(&mut layer, &sel).unwrap();
        }
        // Into new pages: every source page is freed, row by row.
        let per_seq = if layout == PageLayout::HEAD { HK } else { 1 };
        let mut all = vec![];
        for r in 0..per_seq * LENS.len() {
            all.extend_from_slice(&src.tables[r * src.stride..r * src.stride + pages(LENS[r / per_seq])]);
        }
        assert_eq!(freed_into, all, "{layout:?} into new pages");
        for i in 0..sel.head_lens().len() {
            dst.check_kept("into new pages", &b, i, i / HK, i % HK, sel.kept(i));
        }
        checks += 1;
        // In place: the rows' pages past those still in use.
        let mut expect = vec![];
        for (s, &l) in LENS.iter().enumerate() {
            let lens = &sel.head_lens()[s * HK..(s + 1) * HK];
            for r in 0..per_seq {
                let keep = if per_seq == 1 { *lens.iter().max().unwrap() } else { lens[r] };
                let row = (s * per_seq + r) * src.stride;
                expect.extend_from_slice(&src.tables[row + pages(keep as usize)..row + pages(l)]);
            }
        }
        assert!(!expect.is_empty());
        assert_eq!(freed_inplace, expect, "{layout:?} in place");
        for i in 0..sel.head_lens().len() {
            let row = if layout == PageLayout::HEAD { i } else { i / HK };
            src.check_kept("in place", &b, row, i / HK, i % HK, sel.kept(i));
        }
        checks += 1;
    }
    assert_eq!(checks, 4);
}

#[test]
fn page_outside_the_pool_is_the_librarys_error() {
    let ctx = Context::new().unwrap();
    let b = batch();
    let mut src = Pools::of(&b, PageLayout::NHD, 0);
    let n = src.n_pages as i32;
    src.tables[1] = n;
    let seq_lens: Vec<i32> = LENS.iter().map(|&l| l as i32).collect();
    let shape = src.shape();
    let paged = PagedKv::new(PageLayout::NHD, PS as i32, Tensor::new(&src.k, &shape).unwrap(),
                             Tensor::new(&src.v, &shape).unwrap(), &src.tables, src.stride as i64, &seq_lens);
    let layer = Layer::new(queries(&b)).with_paged(paged).unwrap();
    let err = ctx.select(&params(), &layer).unwrap_err();
    assert_eq!(err.status(), Status::INVALID_ARGUMENT);
    let want = format!("layer->paged->block_tables[1] (row 0, page 1) is {n}, outside the pool's pages [0, {n})");
    assert!(err.message().starts_with("Context::select: ") && err.message().contains(&want), "{err}");

    // Read-only pools cannot be compacted; short tables are refused before the library reads.
    let sel = Selection::default();
    let mut layer = layer;
    let err = ctx.compact_paged_inplace(&mut layer, &sel).unwrap_err();
    assert!(err.message().contains("writable"), "{err}");
    let paged = PagedKv::new(PageLayout::NHD, PS as i32, Tensor::new(&src.k, &shape).unwrap(),
                             Tensor::new(&src.v, &shape).unwrap(), &src.tables[..5], src.stride as i64, &seq_lens);
    let err = Layer::new(queries(&b)).with_paged(paged).err().unwrap();
    assert!(err.message().contains("block_tables has 5 entries"), "{err}");
    let err = defkv::pages_needed(&[3], 0).unwrap_err();
    assert_eq!(err.message(), "pages_needed: page_size is 0, expected >= 1");
}

#[test]
fn next_slots_after_compaction() {
    let tables = [7, 2, 9, 4, 0, 1, 3, 5, 6, 8, 10, 11];
    let (pages, offsets) = defkv::next_slots(&[5, 8, 0, 11], &tables, 3, 4).unwrap();
    assert_eq!(pages, [2, -1, -1, 11]);
    assert_eq!(offsets, [1, 0, 0, 3]);
    let err = defkv::next_slots(&[13], &tables[..3], 3, 4).unwrap_err();
    assert_eq!(err.status(), Status::INVALID_ARGUMENT);
    assert!(err.message().starts_with("next_slots: lens[0] is 13"), "{err}");
}
