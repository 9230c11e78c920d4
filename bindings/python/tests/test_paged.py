"""Paged caches through the Python binding: a batch of two sequences (L = 37, 22; Hk = 2, d = 8)
copied into pools of 4-token pages with shuffled page ids and NaN wherever no row points. The
paged selection equals the contiguous one; compaction into new pages and in place moves the kept
rows and frees the expected pages; a page id outside the pool is the library's error."""
import unittest

import numpy as np

import defkv

H, HK, D, W, PS = 4, 2, 8, 4, 4
LENS = [37, 22]


def pages(n):
    return (n + PS - 1) // PS


def batch():
    rng = np.random.default_rng(7)
    q = [rng.standard_normal((H, W, D), np.float32) for _ in LENS]
    k = [rng.standard_normal((HK, n, D), np.float32) for n in LENS]
    v = [rng.standard_normal((HK, n, D), np.float32) for n in LENS]
    return q, k, v


def paged_copy(k, v, layout, spare, seed=11):
    """Pools ("nhd" [N, PS, HK, D] or "head" [N, PS, D]) of NaN with the batch's rows where its
    shuffled block tables point."""
    per_seq = HK if layout == "head" else 1
    stride = pages(LENS[0])
    n = sum(per_seq * pages(l) for l in LENS) + spare
    shape = (n, PS, HK, D) if layout == "nhd" else (n, PS, D)
    kp, vp = np.full(shape, np.nan, np.float32), np.full(shape, np.nan, np.float32)
    ids = iter(np.random.default_rng(seed).permutation(n))
    tables = np.zeros((per_seq * len(LENS), stride), np.int32)
    for s, l in enumerate(LENS):
        for r in range(per_seq):
            tables[s * per_seq + r, :pages(l)] = [next(ids) for _ in range(pages(l))]
        for h in range(HK):
            row = tables[s * per_seq + h % per_seq]
            for t in range(l):
                if layout == "nhd":
                    kp[row[t // PS], t % PS, h], vp[row[t // PS], t % PS, h] = k[s][h, t], v[s][h, t]
                else:
                    kp[row[t // PS], t % PS], vp[row[t // PS], t % PS] = k[s][h, t], v[s][h, t]
    return kp, vp, tables


def rows_of(pool, row, n, h=None):
    """The first n token rows of a block-table row (of head h in an NHD pool)."""
    out = np.stack([pool[row[j // PS], j % PS] for j in range(n)]) if n else np.zeros((0,) + pool.shape[2:], np.float32)
    return out if h is None else out[:, h]


class PagedTest(unittest.TestCase):
    def setUp(self):
        self.q, self.k, self.v = batch()
        self.p = defkv.Params("ada-snapkv", compression_ratio=0.6, window=W)  # heads keep different counts

    def test_select_and_compact(self):
        checks = 0
        with defkv.Context() as ctx:
            want = ctx.select(self.p, seqs=[defkv.Sequence(self.k[s], self.v[s], queries=self.q[s]) for s in range(2)])
            for layout in ("nhd", "head"):
                kp, vp, tables = paged_copy(self.k, self.v, layout, 3)
                pk = defkv.PagedKV(layout, kp, vp, tables, LENS, page_size=PS, n_kv_heads=HK if layout == "head" else 0)
                sel = ctx.select(self.p, seqs=[defkv.Sequence(queries=q) for q in self.q], paged=pk)
                np.testing.assert_array_equal(sel.head_lens, want.head_lens)
                np.testing.assert_array_equal(sel.indices, want.indices)
                np.testing.assert_array_equal(sel.keep_mask, want.keep_mask)

                # Into new per-head pages: pages_needed per row, shuffled ids, NaN elsewhere.
                need, total = defkv.pages_needed(sel.head_lens, PS)
                np.testing.assert_array_equal(need, [pages(n) for n in sel.head_lens])
                self.assertEqual(total, int(need.sum()))
                dn = total + 2
                dk, dv = np.full((dn, PS, D), np.nan, np.float32), np.full((dn, PS, D), np.nan, np.float32)
                ids = iter(np.random.default_rng(5).permutation(dn))
                dtables = np.zeros((len(need), need.max()), np.int32)
                for r, n in enumerate(need):
                    dtables[r, :n] = [next(ids) for _ in range(n)]
                dst = defkv.PagedKV("head", dk, dv, dtables, page_size=PS, n_kv_heads=HK)
                freed = ctx.compact_paged(sel, pk, dst)
                per_seq = HK if layout == "head" else 1
                every = np.concatenate([tables[r, :pages(LENS[r // per_seq])] for r in range(len(tables))])
                np.testing.assert_array_equal(freed, every)
                for i in range(len(sel.head_lens)):
                    s, h = divmod(i, HK)
                    np.testing.assert_array_equal(rows_of(dk, dtables[i], sel.head_lens[i]), self.k[s][h, sel.kept(i)])
                    np.testing.assert_array_equal(rows_of(dv, dtables[i], sel.head_lens[i]), self.v[s][h, sel.kept(i)])
                checks += 1

                # In place: the rows' pages past those still in use.
                freed = ctx.compact_paged(sel, pk)
                expect = []
                for s, l in enumerate(LENS):
                    lens = sel.head_lens[s * HK:(s + 1) * HK]
                    for r in range(per_seq):
                        keep = lens.max() if per_seq == 1 else lens[r]
                        expect.extend(tables[s * per_seq + r, pages(keep):pages(l)])
                self.assertTrue(expect)
                np.testing.assert_array_equal(freed, expect)
                for i in range(len(sel.head_lens)):
                    s, h = divmod(i, HK)
                    row = tables[i] if layout == "head" else tables[s]
                    hh = h if layout == "nhd" else None
                    np.testing.assert_array_equal(rows_of(kp, row, sel.head_lens[i], hh), self.k[s][h, sel.kept(i)])
                    np.testing.assert_array_equal(rows_of(vp, row, sel.head_lens[i], hh), self.v[s][h, sel.kept(i)])
                checks += 1
        self.assertEqual(checks, 4)

    def test_page_outside_the_pool(self):
        kp, vp, tables = paged_copy(self.k, self.v, "nhd", 0)
        n = kp.shape[0]
        tables[0, 1] = n
        with defkv.Context() as ctx:
            with self.assertRaises(defkv.Error) as e:
                ctx.select(self.p, seqs=[defkv.Sequence(queries=q) for q in self.q],
                           paged=defkv.PagedKV("nhd", kp, vp, tables, LENS, page_size=PS))
            self.assertEqual(e.exception.status, defkv.Status.INVALID_ARGUMENT)
            self.assertIn("Context.select: layer->paged->block_tables[1] (row 0, page 1) is %d, outside the pool's "
                          "pages [0, %d)" % (n, n), e.exception.message)
            with self.assertRaises(defkv.Error) as e:
                ctx.select(self.p, seqs=[defkv.Sequence(queries=q) for q in self.q],
                           paged=defkv.PagedKV("nhd", kp, vp, tables[:1], LENS, page_size=PS))
            self.assertIn("block_tables has 1 rows, expected 2", e.exception.message)
        with self.assertRaises(defkv.Error) as e:
            defkv.pages_needed([3], 0)
        self.assertEqual(e.exception.message, "pages_needed: page_size is 0, expected >= 1")

    def test_next_slots(self):
        tables = np.array([[7, 2, 9], [4, 0, 1], [3, 5, 6], [8, 10, 11]], np.int32)
        page, offset = defkv.next_slots([5, 8, 0, 11], tables, 4)
        np.testing.assert_array_equal(page, [2, -1, -1, 11])
        np.testing.assert_array_equal(offset, [1, 0, 0, 3])
        with self.assertRaises(defkv.Error) as e:
            defkv.next_slots([13], tables[:1], 4)
        self.assertTrue(e.exception.message.startswith("next_slots: lens[0] is 13"), e.exception.message)


if __name__ == "__main__":
    unittest.main()
