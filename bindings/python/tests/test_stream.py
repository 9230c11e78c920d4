"""Decode-time eviction streams through the Python binding.

A small stream as in the Go, Java and Rust tests: 2 layers, H = 4, Hk = 2, d = 8, window 4,
interval 8, budget 12, capacity 48, defensivekv with an o_proj; a prompt of 20 tokens, then 40
decoding steps with the engine loop (K/V written at row head_lens[k] of each head, append,
push_queries, round when due), on contiguous [Hk, capacity, d] arrays or on pages ("head": one
block-table row per KV head; "nhd": rows shared by the heads) with shuffled page ids. After every
round: the selection's head_lens are the stream's, no head holds more than budget + slack
entries, the cache rows are exactly the entries the selection kept (in order, tracked by a
mirror of everything written), the window (the last 4 appended entries) and the sinks (the first
4) are still there. The paged runs give the same head lengths and the same kept entries as the
contiguous one. Exact expectations: a stream within its budget evicts nothing and leaves the
caches as they were; a streamingllm stream keeps exactly the sinks and the most recent
budget - n_sink entries. Errors name the argument, change nothing, and a closed stream or
context raises instead of crashing.
"""
import gc
import unittest

import numpy as np

import defkv

LAYERS, H, HK, D, W, CAP, BUDGET, INTERVAL, DM = 2, 4, 2, 8, 4, 48, 12, 8, 16
PROMPT, STEPS, PS = 20, 40, 4
MAX_PAGES = CAP // PS
N_PAGES = HK * MAX_PAGES
N_SINK = 4  # the library's default


def stream_params(**fields):
    f = dict(n_layers=LAYERS, n_heads=H, n_kv_heads=HK, head_dim=D, capacity=CAP, interval=INTERVAL, budget=BUDGET)
    f.update(fields)
    return defkv.StreamParams(**f)


class _DLPack:
    """A DLPack producer over a NumPy array (exercises the binding's DLPack path)."""

    def __init__(self, a):
        self.a = a

    def __dlpack__(self, **kw):
        return self.a.__dlpack__()

    def __dlpack_device__(self):
        return self.a.__dlpack_device__()


class Engine:
    """A model's caches (contiguous, or page pools in layout "head" or "nhd") and a mirror of
    what each head holds, for the engine loop."""

    def __init__(self, layout, seed=3):
        self.layout = layout
        self.rng = np.random.default_rng(seed)
        self.o = self.rng.standard_normal((DM, H * D), np.float32)
        if layout == "head":
            # Head k owns block-table row k: a fixed, shuffled set of CAP/PS pages.
            self.tables = (np.arange(HK * MAX_PAGES).reshape(HK, MAX_PAGES) * 7 + 3) % N_PAGES
            shape = (N_PAGES, PS, D)
        elif layout == "nhd":
            self.tables = ((np.arange(MAX_PAGES) * 5 + 2) % MAX_PAGES)[None, :]  # one row, shared
            shape = (MAX_PAGES, PS, HK, D)
        else:
            shape = (HK, CAP, D)
        self.keys = [np.full(shape, np.nan, np.float32) for _ in range(LAYERS)]
        self.vals = [np.full(shape, np.nan, np.float32) for _ in range(LAYERS)]
        self.mirror = [[[] for _ in range(HK)] for _ in range(LAYERS)]   # live entries, in cache order
        self.written = [[[] for _ in range(HK)] for _ in range(LAYERS)]  # everything appended, in order
        self.next_id = 0

    def at(self, l, k, r):
        """(pool, index) of head k's row r in layer l."""
        if self.layout == "head":
            return self.tables[k, r // PS], r % PS
        if self.layout == "nhd":
            return self.tables[0, r // PS], r % PS, k
        return k, r

    def row(self, l, k, r):
        i = self.at(l, k, r)
        return self.keys[l][i], self.vals[l][i]

    def caches(self):
        out = []
        for l in range(LAYERS):
            if self.layout == "contiguous":
                out.append(defkv.StreamCache(self.keys[l], self.vals[l], o_proj=self.o))
            else:
                out.append(defkv.StreamCache(paged=defkv.PagedKV(self.layout, self.keys[l], self.vals[l], self.tables,
                                                                 page_size=PS, n_kv_heads=HK), o_proj=self.o))
        return out

    def step(self, st, n):
        """n tokens for every layer: K/V at each head's next rows, append, push_queries."""
        for l in range(LAYERS):
            lens = st.head_lens(l)
            for k in range(HK):
                for i in range(n):
                    e = (self.next_id, self.rng.standard_normal(D).astype(np.float32),
                         self.rng.standard_normal(D).astype(np.float32) * (1 + len(self.written[l][k]) % 3))
                    self.next_id += 1
                    i_at = self.at(l, k, int(lens[k]) + i)
                    self.keys[l][i_at], self.vals[l][i_at] = e[1], e[2]
                    self.mirror[l][k].append(e)
                    self.written[l][k].append(e)
            st.append(l, n)
            w = min(n, W)  # the prompt pushes its last window of queries
            st.push_queries(l, self.rng.standard_normal((H, w, D), np.float32) * 2)


class StreamTest(unittest.TestCase):
    def run_stream(self, layout):
        """Every round's head lengths and the final kept entry ids; checks every round."""
        eng = Engine(layout)
        history = []
        with defkv.Context(threads=2) as ctx, ctx.stream(defkv.Params("defensivekv", window=W), stream_params()) as st:
            caches = eng.caches()
            eng.step(st, PROMPT)
            for s in range(STEPS):
                eng.step(st, 1)
                if not st.due():
                    continue
                sels = st.round(caches)
                self.assertEqual(len(sels), LAYERS)
                rnd = []
                for l in range(LAYERS):
                    lens = st.head_lens(l)
                    np.testing.assert_array_equal(lens, sels[l].head_lens)
                    rnd.append(lens.tolist())
                    for k in range(HK):
                        n = int(lens[k])
                        self.assertLessEqual(n, BUDGET + INTERVAL, "step %d layer %d head %d" % (s, l, k))  # slack 0
                        kept = sels[l].kept(k)
                        self.assertEqual(len(kept), n)
                        self.assertTrue(np.all(np.diff(kept) > 0))
                        eng.mirror[l][k] = [eng.mirror[l][k][i] for i in kept]
                        for r, e in enumerate(eng.mirror[l][k]):
                            key, val = eng.row(l, k, r)
                            np.testing.assert_array_equal(key, e[1], "step %d layer %d head %d row %d" % (s, l, k, r))
                            np.testing.assert_array_equal(val, e[2])
                        wr = eng.written[l][k]
                        self.assertEqual([e[0] for e in eng.mirror[l][k][n - W:]], [e[0] for e in wr[-W:]], "window")
                        self.assertEqual([e[0] for e in eng.mirror[l][k][:N_SINK]], [e[0] for e in wr[:N_SINK]], "sinks")
                history.append(rnd)
            final = [[[e[0] for e in eng.mirror[l][k]] for k in range(HK)] for l in range(LAYERS)]
            for l in range(LAYERS):  # what the stream says is live is what the mirror holds
                self.assertEqual(st.head_lens(l).tolist(), [len(m) for m in final[l]])
        self.assertGreaterEqual(len(history), 3)
        self.assertTrue(any(n < PROMPT for r in history for lens in r for n in lens), "no round evicted anything")
        return history, final

    def test_contiguous_is_deterministic(self):
        self.assertEqual(self.run_stream("contiguous"), self.run_stream("contiguous"))

    def test_paged_equals_contiguous(self):
        a = self.run_stream("contiguous")
        self.assertEqual(self.run_stream("head"), a)
        self.assertEqual(self.run_stream("nhd"), a)

    def test_within_budget_evicts_nothing(self):
        # budget 44 >= everything appended (20 + 16): rounds run (interval) but keep every entry.
        eng = Engine("contiguous", seed=5)
        with defkv.Context(threads=2) as ctx, ctx.stream(defkv.Params("snapkv", window=W),
                                                         stream_params(budget=44)) as st:
            eng.step(st, PROMPT)
            rounds = 0
            for _ in range(16):
                eng.step(st, 1)
                if st.due():
                    before = [(k.copy(), v.copy()) for k, v in zip(eng.keys, eng.vals)]
                    sels = st.round(eng.caches())
                    rounds += 1
                    for l in range(LAYERS):
                        n = len(eng.written[l][0])
                        self.assertEqual(st.head_lens(l).tolist(), [n] * HK)
                        for k in range(HK):
                            np.testing.assert_array_equal(sels[l].kept(k), np.arange(n))
                        np.testing.assert_array_equal(eng.keys[l], before[l][0])
                        np.testing.assert_array_equal(eng.vals[l], before[l][1])
            self.assertEqual(rounds, 2)

    def test_streamingllm_keeps_sinks_and_recent(self):
        eng = Engine("contiguous", seed=9)
        with defkv.Context(threads=2) as ctx, ctx.stream(defkv.Params("streamingllm", window=W),
                                                         stream_params()) as st:
            eng.step(st, PROMPT)
            rounds = 0
            for _ in range(STEPS):
                eng.step(st, 1)
                if not st.due():
                    continue
                self.assertIsNone(st.round(eng.caches(), selections=False))
                rounds += 1
                for l in range(LAYERS):
                    self.assertEqual(st.head_lens(l).tolist(), [BUDGET] * HK)
                    for k in range(HK):
                        wr = eng.written[l][k]
                        want = wr[:N_SINK] + wr[len(wr) - (BUDGET - N_SINK):]
                        eng.mirror[l][k] = want
                        for r, e in enumerate(want):
                            np.testing.assert_array_equal(eng.row(l, k, r)[0], e[1])
                            np.testing.assert_array_equal(eng.row(l, k, r)[1], e[2])
            self.assertGreaterEqual(rounds, 3)

    def test_dlpack_inputs_select_as_numpy(self):
        # The same stream with queries, keys, values and o_proj given as DLPack producers.
        out = []
        for wrap in (lambda a: a, _DLPack):
            rng = np.random.default_rng(1)
            k = rng.standard_normal((1, HK, CAP, D), np.float32)[0]
            v = rng.standard_normal((HK, CAP, D), np.float32)
            o = rng.standard_normal((DM, H * D), np.float32)
            with defkv.Context(threads=2) as ctx, ctx.stream(defkv.Params("defensivekv", window=W),
                                                             stream_params(n_layers=1)) as st:
                st.append(0, 30)
                st.push_queries(0, wrap(rng.standard_normal((H, W, D), np.float32)))
                sel = st.round([defkv.StreamCache(wrap(k), wrap(v), o_proj=wrap(o))])[0]
                out.append((sel.head_lens.tolist(), sel.indices.tolist(), k.copy(), v.copy()))
        self.assertEqual(out[0][:2], out[1][:2])
        self.assertLess(sum(out[0][0]), 2 * 30)
        np.testing.assert_array_equal(out[0][2], out[1][2])
        np.testing.assert_array_equal(out[0][3], out[1][3])

    def assert_error(self, status, prefix, words, fn, *args, **kw):
        with self.assertRaises(defkv.Error) as cm:
            fn(*args, **kw)
        e = cm.exception
        self.assertEqual(e.status, status, e.message)
        self.assertTrue(e.message.startswith(prefix), e.message)
        for w in words:
            self.assertIn(w, e.message)

    def test_errors_name_the_argument_and_change_nothing(self):
        inv = defkv.Status.INVALID_ARGUMENT
        p = defkv.Params("defensivekv", window=W)
        with defkv.Context(threads=2) as ctx:
            self.assert_error(inv, "Context.stream: ", ["budget"], ctx.stream, p, stream_params(budget=7))
            self.assert_error(inv, "Context.stream: ", ["n_kv_heads"], ctx.stream, p, stream_params(n_kv_heads=3))
            self.assert_error(inv, "Context.stream: ", ["stream_params"], ctx.stream, p, {})
            self.assert_error(inv, "StreamParams: ", ["aggregation"], defkv.StreamParams, aggregation="mean")
            with self.assertRaises(AttributeError):
                defkv.StreamParams(budgett=3)
            st = ctx.stream(p, stream_params())
            rng = np.random.default_rng(2)
            k, v = rng.standard_normal((HK, CAP, D), np.float32), rng.standard_normal((HK, CAP, D), np.float32)
            o = rng.standard_normal((DM, H * D), np.float32)
            for l in range(LAYERS):
                st.append(l, 30)
                st.push_queries(l, rng.standard_normal((H, W, D), np.float32))
            k0, v0 = k.copy(), v.copy()
            good = [defkv.StreamCache(k, v, o_proj=o) for _ in range(LAYERS)]

            def unchanged():
                for l in range(LAYERS):
                    self.assertEqual(st.head_lens(l).tolist(), [30] * HK)
                np.testing.assert_array_equal(k, k0)
                np.testing.assert_array_equal(v, v0)

            self.assert_error(inv, "Stream.push_queries: queries", ["shape"], st.push_queries, 0,
                              np.zeros((H, 1, D + 1), np.float32))
            self.assert_error(defkv.Status.UNSUPPORTED, "Stream.push_queries: queries", ["int64"], st.push_queries, 0,
                              np.zeros((H, 1, D), np.int64))
            self.assert_error(inv, "Stream.push_queries: ", ["layer"], st.push_queries, LAYERS,
                              np.zeros((H, 1, D), np.float32))
            self.assert_error(inv, "Stream.head_lens: ", ["layer"], st.head_lens, -1)
            self.assert_error(inv, "Stream.append: ", ["layer"], st.append, "0", 1)
            self.assert_error(inv, "Stream.append: ", ["n"], st.append, 0, 2 ** 40)
            self.assert_error(defkv.Status.INVALID_STATE, "Stream.append: ", ["capacity"], st.append, 0, CAP)
            unchanged()
            self.assert_error(inv, "Stream.round: ", ["caches", "one per layer"], st.round, good[:1])
            self.assert_error(inv, "Stream.round: ", ["caches"], st.round, None)
            self.assert_error(inv, "Stream.round: ", ["caches[1].paged"], st.round,
                              [good[0], defkv.StreamCache(paged=k, o_proj=o)])
            ro = k.copy()
            ro.flags.writeable = False
            self.assert_error(inv, "Stream.round: caches[1].keys", ["read-only"], st.round,
                              [good[0], defkv.StreamCache(ro, v, o_proj=o)])
            # The library's own checks: a cache shorter than the heads, o_proj missing.
            self.assert_error(inv, "Stream.round: ", ["keys"], st.round,
                              [good[0], defkv.StreamCache(k[:, :20], v[:, :20], o_proj=o)])
            self.assert_error(inv, "Stream.round: ", ["o_proj"], st.round, [good[0], defkv.StreamCache(k, v)])
            unchanged()
            # After all that the stream still works.
            sels = st.round([dict(keys=k, values=v, o_proj=o)] * LAYERS)
            self.assertTrue(all(n <= BUDGET + INTERVAL for s in sels for n in s.head_lens))
            st.close()

    def test_use_after_close(self):
        state = defkv.Status.INVALID_STATE
        p = defkv.Params("snapkv", window=W)
        q = np.zeros((H, 1, D), np.float32)
        k = np.zeros((HK, CAP, D), np.float32)
        with defkv.Context() as ctx:
            with ctx.stream(p, stream_params()) as st:
                st.append(0, 1)
            for call, args in ((st.append, (0, 1)), (st.push_queries, (0, q)), (st.due, ()), (st.head_lens, (0,)),
                               (st.round, ([defkv.StreamCache(k, k)] * LAYERS,))):
                self.assert_error(state, "Stream.", ["closed"], call, *args)
            st.close()  # idempotent
            st2 = defkv.Stream(ctx, p, stream_params())
            st2.append(1, 3)
        # Closing the context closed st2.
        self.assert_error(state, "Stream.head_lens: ", ["closed"], st2.head_lens, 1)
        self.assert_error(state, "Stream.round: ", ["closed"], st2.round, [defkv.StreamCache(k, k)] * LAYERS)
        st2.close()
        self.assert_error(state, "Context.stream: ", ["closed"], ctx.stream, p, stream_params())
        # A stream keeps its context alive (here nothing else refers to it), and one dropped
        # without close() is freed by the collector.
        st3 = defkv.Context(threads=1).stream(p, stream_params())
        gc.collect()
        st3.append(0, 2)
        self.assertEqual(st3.head_lens(0).tolist(), [2] * HK)
        del st3
        gc.collect()


if __name__ == "__main__":
    unittest.main()
