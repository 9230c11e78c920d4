// Sharded selection: the call schedule, the exact global quantities the plans need, the
// distributed top-k, and defkv_select_sharded / the sharded defkv_global (shard.hpp).
#include "shard.hpp"

#include <algorithm>
#include <cstring>
#include <limits>
#include <memory>

#include "context.hpp"
#include "error.hpp"
#include "ops.hpp"
#include "outputs.hpp"

namespace defkv {

// ---- the call schedule --------------------------------------------------------------------

void ShardRun::begin_dry() {
    dry_ = true;
    schedule_.clear();
    pos_ = 0;
    failed_ = false;
}

defkv_status ShardRun::begin_real(std::string *msg) {
    dry_ = false;
    pos_ = 0;
    failed_ = false;
    if (!device()) return DEFKV_SUCCESS;
    int64_t need = 8;
    for (const Call &c : schedule_) need = std::max(need, (c.count + 1) * 8);
    if (scratch_ && scratch_->bytes >= need) return DEFKV_SUCCESS;
    scratch_.reset();
    Backend *be = be_;
    std::shared_ptr<Buf> holder(new Buf(), [be](Buf *p) { // before the device allocation: no leak if it throws
        be->release(p);
        delete p;
    });
    DEFKV_FORWARD(be_->alloc(need, holder.get(), msg));
    scratch_ = std::move(holder);
    return DEFKV_SUCCESS;
}

int64_t ShardRun::scheduled_bytes() const {
    int64_t b = 0;
    for (const Call &c : schedule_) b += (c.count + 1) * (c.kind == F32_MAX ? 4 : 8);
    return b;
}

defkv_status ShardRun::exchange(Kind kind, const Buf *data, int64_t count, const char *what, std::string *msg) {
    if (dry_) {
        if (active()) schedule_.push_back(Call{kind, count, what});
        return DEFKV_SUCCESS;
    }
    if (!active()) return DEFKV_SUCCESS;
    if (pos_ >= schedule_.size() || schedule_[pos_].kind != kind || schedule_[pos_].count != count)
        DEFKV_FAIL(DEFKV_ERROR_INTERNAL, "collective %zu (%s) does not match the schedule of the dry run", pos_, what);
    const size_t n = schedule_.size(), i = pos_++;
    const int64_t esz = kind == F32_MAX ? 4 : 8, bytes = (count + 1) * esz;
    const int32_t op = kind == I64_SUM ? DEFKV_REDUCE_SUM : DEFKV_REDUCE_MAX;
    // The status word: 1 (or 1.0f) once this rank has failed, else 0.
    int64_t word_i = failed_ ? 1 : 0;
    float word_f = failed_ ? 1.0f : 0.0f;
    const void *word = kind == F32_MAX ? static_cast<const void *>(&word_f) : static_cast<const void *>(&word_i);
    auto remote_of = [&](const void *w) {
        if (kind == F32_MAX) {
            float f;
            std::memcpy(&f, w, 4);
            return f != 0.0f;
        }
        int64_t v;
        std::memcpy(&v, w, 8);
        return v != 0;
    };
    int rc = 0;
    bool remote = false;
    defkv_status local = DEFKV_SUCCESS; // staging the status word or the payload failed here
    std::string local_msg;
    if (device() && !data && !scratch_)
        DEFKV_FAIL(DEFKV_ERROR_INTERNAL, "collective %zu (%s): the device scratch was not allocated", i, what);
    if (device()) {
        // The payload stays in device memory: only the status word goes up and comes back.
        const Buf buf = data ? *data : scratch_->at(0, bytes);
        if (!data) local = be_->fill_bytes(buf, 0, bytes, &local_msg);
        if (local == DEFKV_SUCCESS) local = be_->upload(buf.at(count * esz, esz), word, esz, &local_msg);
        void *p = buf.ptr<void>();
        rc = kind == F32_MAX ? c_->allreduce_f32(c_->user, static_cast<float *>(p), count + 1, op)
                             : c_->allreduce_i64(c_->user, static_cast<int64_t *>(p), count + 1, op);
        if (rc == 0 && local == DEFKV_SUCCESS) {
            uint8_t w[8];
            local = be_->download(w, buf.at(count * esz, esz), esz, &local_msg);
            if (local == DEFKV_SUCCESS) remote = remote_of(w);
        }
    } else {
        std::vector<uint8_t> host(static_cast<size_t>(bytes), 0);
        if (data && count) local = be_->download(host.data(), *data, count * esz, &local_msg);
        std::memcpy(host.data() + count * esz, word, static_cast<size_t>(esz));
        rc = kind == F32_MAX ? c_->allreduce_f32(c_->user, reinterpret_cast<float *>(host.data()), count + 1, op)
                             : c_->allreduce_i64(c_->user, reinterpret_cast<int64_t *>(host.data()), count + 1, op);
        if (rc == 0) {
            remote = remote_of(host.data() + count * esz);
            if (data && count && local == DEFKV_SUCCESS) local = be_->upload(*data, host.data(), count * esz, &local_msg);
        }
    }
    if (failed_) return DEFKV_ERROR_BACKEND_FAILURE; // draining: the message is already set
    if (rc != 0) {
        failed_ = true;
        DEFKV_FAIL(DEFKV_ERROR_BACKEND_FAILURE,
                   "the caller's collective (%s, call %zu of %zu of this selection: %s) failed on this rank (rank %d) "
                   "with code %d; the other ranks are told at the next call",
                   kind == F32_MAX ? "allreduce_f32" : "allreduce_i64", i + 1, n, what, c_->rank, rc);
    }
    if (local != DEFKV_SUCCESS) {
        failed_ = true;
        DEFKV_FAIL(local, "staging collective %zu of %zu (%s) on rank %d: %s; the other ranks are told at the next call",
                   i + 1, n, what, c_->rank, local_msg.c_str());
    }
    if (remote) {
        failed_ = true;
        DEFKV_FAIL(DEFKV_ERROR_BACKEND_FAILURE,
                   "another rank of the group failed (a collective or an op returned an error there), seen at call %zu "
                   "of %zu of this selection (%s) on rank %d; nothing was written",
                   i + 1, n, what, c_->rank);
    }
    return DEFKV_SUCCESS;
}

defkv_status ShardRun::reduce(Kind kind, const Buf &data, int64_t count, const char *what, std::string *msg) {
    return exchange(kind, &data, count, what, msg);
}

defkv_status ShardRun::agree(std::string *msg) {
    // A schedule without data calls (streamingllm, knorm, random, tova without TP: each rank's
    // selection is its own) makes no call at all, not even this one.
    if (schedule_.empty()) return DEFKV_SUCCESS;
    return exchange(I64_MAX, nullptr, 0, "status agreement (every rank succeeded; nothing is written otherwise)", msg);
}

defkv_status ShardRun::finish(defkv_status st, std::string *msg) {
    if (dry_ || !active() || st == DEFKV_SUCCESS) return st;
    failed_ = true;
    std::string keep = *msg;
    while (pos_ < schedule_.size()) {
        const Call c = schedule_[pos_];
        std::string ignored;
        (void)exchange(c.kind, nullptr, c.count, c.what, &ignored);
    }
    *msg = keep;
    return st;
}

// ---- the distributed top-k ----------------------------------------------------------------

defkv_status shard_top_k(Exec &x, ShardRun &sr, TopK mode, std::vector<ShardTopKJob> &jobs, bool measure_only) {
    std::string *msg = x.msg;
    Backend &be = x.be;
    const size_t B = jobs.size();
    std::vector<int64_t> off(B + 1, 0);
    for (size_t b = 0; b < B; b++) off[b + 1] = off[b] + jobs[b].R_g;
    // The calls' buffers (payload + status slot) and each job's per-row tie quota.
    const Buf hist = x.ar.take_n<int64_t>(static_cast<int64_t>(B) * kShardBins + 1);
    const Buf ties = x.ar.take_n<int64_t>(off[B] + 1);
    std::vector<Buf> take(B);
    for (size_t b = 0; b < B; b++) take[b] = x.ar.take_n<int64_t>(jobs[b].rows);
    if (measure_only) return DEFKV_SUCCESS;
    const bool real = !sr.dry();
    std::vector<int64_t> need(B), prefix(B, 0);
    std::vector<uint8_t> done(B);
    for (size_t b = 0; b < B; b++) {
        const ShardTopKJob &jb = jobs[b];
        need[b] = std::max<int64_t>(0, std::min(jb.k, jb.R_g * jb.L));
        done[b] = need[b] == 0 || need[b] == jb.R_g * jb.L; // nothing or everything
    }
    std::vector<int64_t> h(real ? B * kShardBins : 0);
    for (int r = 0; r < kShardRounds; r++) {
        const int shift = (kShardRounds - 1 - r) * kShardDigitBits;
        if (real)
            for (size_t b = 0; b < B; b++) {
                const ShardTopKJob &jb = jobs[b];
                const Buf hb = hist.at(static_cast<int64_t>(b) * kShardBins * 8, kShardBins * 8);
                if (done[b]) DEFKV_FORWARD(be.fill_bytes(hb, 0, kShardBins * 8, msg));
                else
                    DEFKV_FORWARD(be.shard_key_histogram(mode, jb.score, jb.tier, jb.rows * jb.L, shift,
                                                         static_cast<uint64_t>(prefix[b]), hb, msg));
            }
        DEFKV_FORWARD(sr.reduce(ShardRun::I64_SUM, hist, static_cast<int64_t>(B) * kShardBins, "top-k radix histogram", msg));
        if (!real) continue;
        DEFKV_FORWARD(be.download(h.data(), hist, static_cast<int64_t>(B) * kShardBins * 8, msg));
        for (size_t b = 0; b < B; b++) {
            if (done[b]) continue;
            const int64_t *hb = &h[b * kShardBins];
            int digit = -1;
            for (int bin = kShardBins - 1; bin >= 0; bin--) {
                if (hb[bin] < need[b]) need[b] -= hb[bin];
                else {
                    digit = bin;
                    break;
                }
            }
            if (digit < 0)
                DEFKV_FAIL(DEFKV_ERROR_INTERNAL, "sharded top-k: the histograms count fewer entries than the budget "
                                                 "(do the ranks hold the same sequences?)");
            prefix[b] = (prefix[b] << kShardDigitBits) | digit;
        }
    }
    // Ties at the threshold key, counted per global row: taken in global (row, position) order.
    if (real) {
        DEFKV_FORWARD(be.fill_bytes(ties, 0, off[B] * 8, msg));
        for (size_t b = 0; b < B; b++) {
            const ShardTopKJob &jb = jobs[b];
            if (done[b]) continue;
            for (int64_t r0 = 0, r1; r0 < jb.rows; r0 = r1) { // runs of consecutive global rows
                for (r1 = r0 + 1; r1 < jb.rows && jb.row_id[r1] == jb.row_id[r1 - 1] + 1;) r1++;
                const int64_t nr = r1 - r0, nl = nr * jb.L;
                DEFKV_FORWARD(be.shard_key_ties(mode, jb.score.at(r0 * jb.L * 4, nl * 4),
                                                jb.tier ? jb.tier.at(r0 * jb.L, nl) : Buf{}, nr, jb.L,
                                                static_cast<uint64_t>(prefix[b]),
                                                ties.at((off[b] + jb.row_id[r0]) * 8, nr * 8), msg));
            }
        }
    }
    DEFKV_FORWARD(sr.reduce(ShardRun::I64_SUM, ties, off[B], "top-k threshold ties", msg));
    if (!real) return DEFKV_SUCCESS;
    std::vector<int64_t> t(static_cast<size_t>(off[B]));
    DEFKV_FORWARD(be.download(t.data(), ties, off[B] * 8, msg));
    for (size_t b = 0; b < B; b++) {
        ShardTopKJob &jb = jobs[b];
        const int64_t n = jb.rows * jb.L;
        if (done[b]) {
            DEFKV_FORWARD(be.fill_bytes(jb.keep, need[b] > 0 ? 1 : 0, n, msg));
            continue;
        }
        std::vector<int64_t> before(static_cast<size_t>(jb.R_g) + 1, 0), quota(static_cast<size_t>(jb.rows));
        for (int64_t g = 0; g < jb.R_g; g++) before[g + 1] = before[g] + t[off[b] + g];
        for (int64_t r = 0; r < jb.rows; r++)
            quota[r] = std::max<int64_t>(0, std::min(need[b] - before[jb.row_id[r]], t[off[b] + jb.row_id[r]]));
        DEFKV_FORWARD(be.upload(take[b], quota.data(), jb.rows * 8, msg));
        DEFKV_FORWARD(be.shard_key_keep(mode, jb.score, jb.tier, jb.rows, jb.L, static_cast<uint64_t>(prefix[b]), take[b],
                                        jb.keep, msg));
    }
    return DEFKV_SUCCESS;
}

// ---- hooks of the plans ---------------------------------------------------------------------

namespace {

defkv_status need_rows(const Exec &x, const char *what) {
    std::string *msg = x.msg;
    if (!x.be.attention_rows())
        DEFKV_FAIL(DEFKV_ERROR_UNSUPPORTED,
                   "the %s backend's attention op does not write the per-head terms that %s under tensor parallelism "
                   "needs (AttentionOut::omega_rows / last_rows); use the CPU backend for this method with heads split",
                   x.be.name(), what);
    return DEFKV_SUCCESS;
}

} // namespace

int64_t shard_layer_heads(const Exec &x, int64_t local_Hk) { return x.sh ? x.sh->Hk_g : local_Hk; }

namespace {
// A run's arena-measuring pass (defkv_global's score_into) issues no collective: the schedule
// is recorded only when the shard run is dry too.
bool measuring(const Exec &x) { return x.ar.dry() && !x.sh->dry(); }
} // namespace

defkv_status shard_layer_max(Exec &x, const Buf &mx) {
    std::string *msg = x.msg;
    if (!x.sh) return DEFKV_SUCCESS;
    const Buf buf = x.ar.take_n<float>(2); // the maximum and the status slot
    if (measuring(x)) return DEFKV_SUCCESS;
    const bool real = !x.ar.dry() && x.sh->active();
    if (real) DEFKV_FORWARD(x.be.copy(buf, mx, 4, msg));
    DEFKV_FORWARD(x.sh->reduce(ShardRun::F32_MAX, buf, 1, "layer maximum (window sentinel)", msg));
    if (real) DEFKV_FORWARD(x.be.copy(mx, buf, 4, msg));
    return DEFKV_SUCCESS;
}

defkv_status shard_norm_weight(Exec &x, const SeqShape &s, const AttentionOut &a, const Buf &pn, const Buf &score) {
    std::string *msg = x.msg;
    if (!x.sh) {
        if (!x.ar.dry()) DEFKV_FORWARD(x.be.norm_weight(a.def_max, pn, s.Hk, s.P, score, s.L, msg));
        return DEFKV_SUCCESS;
    }
    DEFKV_FORWARD(need_rows(x, "defensivekv"));
    const ShardRun &sr = *x.sh;
    const int64_t Hk_g = sr.Hk_g, H_g = Hk_g * s.G, P = s.P, W = s.W, L = s.L;
    const int64_t n_pn = (Hk_g * P + 1) / 2, n_om = 2 * H_g * W; // pn as float pairs, omega as doubles
    const Buf m_g = x.ar.take_n<float>(Hk_g * P), pn_g = x.ar.take_n<float>(Hk_g * P),
              score_g = x.ar.take_n<float>(Hk_g * L), om_g = x.ar.take_n<double>(n_om),
              slots = x.ar.take_n<int64_t>(n_pn + n_om + 1);
    if (measuring(x)) return DEFKV_SUCCESS;
    if (!x.ar.dry()) {
        // Disjoint slots: every other rank adds integer zeros, so the bits arrive unchanged.
        DEFKV_FORWARD(x.be.fill_bytes(slots, 0, (n_pn + n_om) * 8, msg));
        DEFKV_FORWARD(x.be.copy(slots.at(sr.k0 * P * 4, s.Hk * P * 4), pn, s.Hk * P * 4, msg));
        for (int64_t part = 0; part < 2; part++)
            DEFKV_FORWARD(x.be.copy(slots.at((n_pn + part * H_g * W + sr.k0 * s.G * W) * 8, s.H * W * 8),
                                    a.omega_rows.at(part * s.H * W * 8, s.H * W * 8), s.H * W * 8, msg));
    }
    DEFKV_FORWARD(x.sh->reduce(ShardRun::I64_SUM, slots, n_pn + n_om,
                               "exact gather of the projected value norms and window-bias terms", msg));
    if (x.ar.dry()) return DEFKV_SUCCESS;
    // omega over every (h, w): the backend's own last sum of its attention op, on the global terms
    DEFKV_FORWARD(x.be.copy(om_g, slots.at(n_pn * 8, n_om * 8), n_om * 8, msg));
    DEFKV_FORWARD(x.be.omega_from_rows(om_g, H_g * W, a.omega, msg));
    // norm_weight over every KV head: the op itself, on global arrays, then this rank's rows
    DEFKV_FORWARD(x.be.copy(pn_g, slots.at(0, Hk_g * P * 4), Hk_g * P * 4, msg));
    DEFKV_FORWARD(x.be.fill_bytes(m_g, 0, Hk_g * P * 4, msg));
    DEFKV_FORWARD(x.be.copy(m_g.at(sr.k0 * P * 4, s.Hk * P * 4), a.def_max, s.Hk * P * 4, msg));
    DEFKV_FORWARD(x.be.fill_bytes(score_g, 0, Hk_g * L * 4, msg));
    DEFKV_FORWARD(x.be.norm_weight(m_g, pn_g, Hk_g, P, score_g, L, msg));
    return x.be.copy(score, score_g.at(sr.k0 * L * 4, s.Hk * L * 4), s.Hk * L * 4, msg);
}

defkv_status shard_tova_mean(Exec &x, const SeqShape &s, const AttentionOut &a) {
    std::string *msg = x.msg;
    if (!x.sh) return DEFKV_SUCCESS;
    DEFKV_FORWARD(need_rows(x, "tova"));
    const ShardRun &sr = *x.sh;
    const int64_t H_g = sr.Hk_g * s.G, n = s.L - 1, n_slots = (H_g * n + 1) / 2;
    const Buf rows_g = x.ar.take_n<float>(H_g * n), slots = x.ar.take_n<int64_t>(n_slots + 1);
    if (measuring(x)) return DEFKV_SUCCESS;
    if (!x.ar.dry()) {
        DEFKV_FORWARD(x.be.fill_bytes(slots, 0, n_slots * 8, msg));
        DEFKV_FORWARD(x.be.copy(slots.at(sr.k0 * s.G * n * 4, s.H * n * 4), a.last_rows, s.H * n * 4, msg));
    }
    DEFKV_FORWARD(x.sh->reduce(ShardRun::I64_SUM, slots, n_slots, "exact gather of the last query rows (tova)", msg));
    if (x.ar.dry()) return DEFKV_SUCCESS;
    // the mean over every query head: the backend's own last sum of its attention op
    DEFKV_FORWARD(x.be.copy(rows_g, slots.at(0, H_g * n * 4), H_g * n * 4, msg));
    return x.be.last_row_mean(rows_g, H_g, n, a.last_row_mean, msg);
}

defkv_status shard_fill_uniform(Exec &x, const Buf &score, int64_t Hk, int64_t L, uint64_t seed) {
    std::string *msg = x.msg;
    const int64_t k0 = x.sh ? x.sh->k0 : 0;
    if (k0 == 0) {
        if (!x.ar.dry()) DEFKV_FORWARD(x.be.fill_uniform(score, Hk, L, seed, msg));
        return DEFKV_SUCCESS;
    }
    const Buf all = x.ar.take_n<float>((k0 + Hk) * L);
    if (x.ar.dry()) return DEFKV_SUCCESS;
    DEFKV_FORWARD(x.be.fill_uniform(all, k0 + Hk, L, seed, msg));
    return x.be.copy(score, all.at(k0 * L * 4, Hk * L * 4), Hk * L * 4, msg);
}

defkv_status shard_head_top_k(Exec &x, const Buf &score, const Buf &tier, int64_t Hk, int64_t L, int64_t k,
                              const Buf &keep) {
    std::string *msg = x.msg;
    if (!x.sh) {
        if (!x.ar.dry()) DEFKV_FORWARD(x.be.top_k(TopK::HEAD_ADAPTIVE, score, tier, Hk, L, k, Buf{}, keep, msg));
        return DEFKV_SUCCESS;
    }
    std::vector<ShardTopKJob> jobs(1);
    ShardTopKJob &jb = jobs[0];
    jb.score = score, jb.tier = tier, jb.keep = keep;
    jb.rows = Hk, jb.L = L, jb.R_g = x.sh->Hk_g, jb.k = k;
    for (int64_t r = 0; r < Hk; r++) jb.row_id.push_back(x.sh->k0 + r);
    return shard_top_k(x, *x.sh, TopK::HEAD_ADAPTIVE, jobs, measuring(x));
}

// ---- defkv_select_sharded -------------------------------------------------------------------

namespace {

defkv_status check_collectives(const defkv_collectives *c, const char *name, const Backend &be, std::string *msg) {
    if (!c) return DEFKV_SUCCESS;
    if (c->struct_size < sizeof(defkv_collectives))
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "shard->%s->struct_size is %u, expected %zu", name, c->struct_size,
                   sizeof(defkv_collectives));
    if (c->memory != DEFKV_MEMORY_HOST && c->memory != DEFKV_MEMORY_CUDA_DEVICE)
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT,
                   "shard->%s->memory is %d; expected DEFKV_MEMORY_HOST (0) or DEFKV_MEMORY_CUDA_DEVICE (%d)", name,
                   c->memory, DEFKV_MEMORY_CUDA_DEVICE);
    if (c->memory == DEFKV_MEMORY_CUDA_DEVICE && be.kind() != DEFKV_BACKEND_CUDA)
        DEFKV_FAIL(DEFKV_ERROR_UNSUPPORTED,
                   "shard->%s->memory is DEFKV_MEMORY_CUDA_DEVICE but the context's backend is %s: device-memory "
                   "collectives need a CUDA context (use DEFKV_MEMORY_HOST)",
                   name, be.name());
    if (c->n_ranks < 1 || c->rank < 0 || c->rank >= c->n_ranks)
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "shard->%s: rank %d of n_ranks %d is out of range", name, c->rank,
                   c->n_ranks);
    if (c->n_ranks > 1 && (!c->allreduce_i64 || !c->allreduce_f32))
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "shard->%s: allreduce_i64 and allreduce_f32 are required", name);
    return DEFKV_SUCCESS;
}

defkv_status check_shard(const defkv_shard *sh, bool global, const Backend &be, std::string *msg) {
    if (!sh) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "shard is NULL");
    if (sh->struct_size < sizeof(defkv_shard))
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "shard->struct_size is %u, expected sizeof(defkv_shard) = %zu",
                   sh->struct_size, sizeof(defkv_shard));
    if (sh->reserved0 != 0) DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "shard->reserved0 must be 0");
    if (sh->n_kv_heads < 1 || sh->kv_head_begin < 0 || sh->kv_head_end <= sh->kv_head_begin ||
        sh->kv_head_end > sh->n_kv_heads)
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT,
                   "shard holds KV heads [%d, %d) of n_kv_heads %d; expected a non-empty range inside [0, n_kv_heads)",
                   sh->kv_head_begin, sh->kv_head_end, sh->n_kv_heads);
    if (global && (sh->n_layers < 1 || sh->layer_begin < 0 || sh->layer_end <= sh->layer_begin ||
                   sh->layer_end > sh->n_layers))
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT,
                   "shard holds layers [%d, %d) of n_layers %d; expected a non-empty range inside [0, n_layers)",
                   sh->layer_begin, sh->layer_end, sh->n_layers);
    DEFKV_FORWARD(check_collectives(sh->heads, "heads", be, msg));
    DEFKV_FORWARD(check_collectives(sh->model, "model", be, msg));
    const bool all_heads = sh->kv_head_begin == 0 && sh->kv_head_end == sh->n_kv_heads;
    if (!all_heads && !sh->heads)
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT,
                   "shard holds KV heads [%d, %d) of %d but shard->heads is NULL (the other heads' ranks are needed)",
                   sh->kv_head_begin, sh->kv_head_end, sh->n_kv_heads);
    if (global && !sh->model && !(all_heads && sh->layer_begin == 0 && sh->layer_end == sh->n_layers))
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "shard holds part of the model but shard->model is NULL");
    return DEFKV_SUCCESS;
}

defkv_status check_layer_heads(const LayerInfo &li, const defkv_shard *sh, std::string *msg) {
    const int64_t local = sh->kv_head_end - sh->kv_head_begin;
    if (li.Hk != local)
        DEFKV_FAIL(DEFKV_ERROR_INVALID_ARGUMENT, "the layer's keys have %lld KV heads, the shard holds [%d, %d) = %lld",
                   (long long)li.Hk, sh->kv_head_begin, sh->kv_head_end, (long long)local);
    return DEFKV_SUCCESS;
}

// Scores every sequence; the head-adaptive ones are then selected together across ranks.
defkv_status score_and_select(Exec &x, const Params &p, const LayerInfo &li, const std::vector<std::vector<uint8_t>> &bad,
                              const defkv_shard *sh, bool check_finite, std::vector<SeqResult> *res) {
    std::string *msg = x.msg;
    res->assign(li.seqs.size(), SeqResult{});
    for (size_t b = 0; b < li.seqs.size(); b++) {
        const SeqShape &s = li.seqs[b].s;
        SeqResult &r = (*res)[b];
        r.L = s.L;
        if (!bad[b].empty()) {
            r.bad = x.ar.take_n<uint8_t>(s.Hk * s.L);
            if (!x.ar.dry()) DEFKV_FORWARD(x.be.upload(r.bad, bad[b].data(), s.Hk * s.L, msg));
        }
        DEFKV_FORWARD(with_prefix(run_plan(x, p, li.seqs[b], r.bad, &r.sc), msg, fmt("layer->seqs[%zu]", b).c_str()));
        r.keep = x.ar.take_n<uint8_t>(s.Hk * s.L);
        if (r.sc.mode == TopK::HEAD_ADAPTIVE) {
            SeqShape sg = s;
            sg.Hk = sh->n_kv_heads;
            r.sc.k = seq_kept_count(p, sg, 1);
        }
    }
    if (check_finite && !x.ar.dry()) DEFKV_FORWARD(check_scores_finite(x, p, *res, li.Hk));
    std::vector<ShardTopKJob> jobs;
    std::vector<size_t> job_seq;
    for (size_t b = 0; b < li.seqs.size(); b++) {
        SeqResult &r = (*res)[b];
        const SeqShape &s = li.seqs[b].s;
        if (r.sc.mode != TopK::HEAD_ADAPTIVE) {
            DEFKV_FORWARD(run_top_k(x, s, r.sc, r.keep));
            continue;
        }
        ShardTopKJob jb;
        jb.score = r.sc.score, jb.tier = r.sc.tier, jb.keep = r.keep;
        jb.rows = s.Hk, jb.L = s.L, jb.R_g = sh->n_kv_heads, jb.k = r.sc.k;
        for (int64_t k = 0; k < s.Hk; k++) jb.row_id.push_back(sh->kv_head_begin + k);
        jobs.push_back(std::move(jb));
        job_seq.push_back(b);
    }
    if (jobs.empty()) return DEFKV_SUCCESS;
    DEFKV_FORWARD(shard_top_k(x, *x.sh, TopK::HEAD_ADAPTIVE, jobs, false));
    if (x.ar.dry()) return DEFKV_SUCCESS;
    for (size_t b : job_seq) {
        SeqResult &r = (*res)[b];
        if (r.sc.max_kept) DEFKV_FORWARD(x.be.max_where(r.sc.out_score, r.sc.out_score, r.keep, li.Hk * r.L, msg));
    }
    return DEFKV_SUCCESS;
}

defkv_status select_sharded_impl(defkv_context &ctx, const defkv_params *params, const defkv_layer *layer,
                                 const defkv_shard *sh, defkv_selection *out, bool dry_only, int64_t *calls,
                                 int64_t *bytes, std::string *msg) {
    Params p;
    DEFKV_FORWARD(resolve_params(params, &p, msg));
    DEFKV_FORWARD(check_shard(sh, false, *ctx.backend, msg));
    LayerInfo li;
    DEFKV_FORWARD(resolve_layer(ctx, layer, p, "defkv_select_sharded", &li, msg));
    DEFKV_FORWARD(check_layer_heads(li, sh, msg));
    ShardRun sr(sh->heads, ctx.backend.get(), sh->n_kv_heads, sh->kv_head_begin, li.H / li.Hk);
    std::vector<std::vector<uint8_t>> bad(li.seqs.size());
    Exec x{*ctx.backend, *ctx.arena, msg, &sr};
    std::vector<SeqResult> res;
    if (dry_only) {
        if (p.nonfinite == DEFKV_NONFINITE_LOWEST && (method_reads_keys(p.method) || method_reads_values(p.method)))
            for (size_t b = 0; b < li.seqs.size(); b++) bad[b].resize(static_cast<size_t>(li.Hk * li.seqs[b].s.L));
        x.ar.measure();
        sr.begin_dry();
        DEFKV_FORWARD(score_and_select(x, p, li, bad, sh, false, &res));
        DEFKV_FORWARD(sr.agree(msg));
        *calls = sr.scheduled_calls();
        *bytes = sr.scheduled_bytes();
        x.ar.measure();
        return x.ar.commit(msg);
    }
    DEFKV_FORWARD(check_selection(*ctx.backend, out, msg));
    DEFKV_FORWARD(check_output_pointers(*ctx.backend, *out, msg));
    DEFKV_FORWARD(check_selection_overlaps(*out, li.Hk * static_cast<int64_t>(li.seqs.size()), li.total_entries, &li, msg));
    if (out->indices && out->indices_capacity < li.total_entries)
        DEFKV_FAIL(DEFKV_ERROR_BUFFER_TOO_SMALL,
                   "out->indices_capacity is %lld; a sharded selection needs Hk_local * sum(L) = %lld (checked before "
                   "the collectives, so that no rank fails after them)",
                   (long long)out->indices_capacity, (long long)li.total_entries);
    // Errors from here on are agreed with the other ranks (the schedule is drained).
    defkv_status st = DEFKV_SUCCESS;
    for (size_t b = 0; b < li.seqs.size() && st == DEFKV_SUCCESS; b++)
        st = with_prefix(prepare_inputs(ctx, p, li.seqs[b], true, &bad[b], msg), msg, fmt("layer->seqs[%zu]", b).c_str());
    // The dry run fixes the schedule from the shapes alone (the same on every rank).
    std::vector<std::vector<uint8_t>> shape_bad(li.seqs.size());
    if (p.nonfinite == DEFKV_NONFINITE_LOWEST && (method_reads_keys(p.method) || method_reads_values(p.method)))
        for (size_t b = 0; b < li.seqs.size(); b++) shape_bad[b].resize(static_cast<size_t>(li.Hk * li.seqs[b].s.L));
    std::string dry_msg;
    Exec xd{*ctx.backend, *ctx.arena, &dry_msg, &sr};
    xd.ar.measure();
    sr.begin_dry();
    defkv_status dst = score_and_select(xd, p, li, shape_bad, sh, false, &res);
    if (dst == DEFKV_SUCCESS) dst = sr.agree(&dry_msg);
    if (dst == DEFKV_SUCCESS) dst = write_outputs(xd, li.Hk, res, out, true);
    if (dst != DEFKV_SUCCESS) {
        *msg = dry_msg;
        return dst;
    }
    // Device collectives: the scratch of the largest call first, so that a rank whose
    // workspace cannot grow still drains the schedule through it.
    DEFKV_FORWARD(sr.begin_real(msg));
    if (st == DEFKV_SUCCESS) st = x.ar.commit(msg);
    if (st == DEFKV_SUCCESS) st = score_and_select(x, p, li, bad, sh, true, &res);
    if (st == DEFKV_SUCCESS) st = sr.agree(msg);
    st = sr.finish(st, msg);
    if (st != DEFKV_SUCCESS) return st;
    return write_outputs(x, li.Hk, res, out, false);
}

} // namespace

defkv_status do_select_sharded(defkv_context &ctx, const defkv_params *params, const defkv_layer *layer,
                               const defkv_shard *shard, defkv_selection *out) {
    std::string *msg = &ctx.last_error;
    int64_t c = 0, b = 0;
    return with_prefix(select_sharded_impl(ctx, params, layer, shard, out, false, &c, &b, msg), msg,
                       "defkv_select_sharded");
}

defkv_status shard_traffic(defkv_context &ctx, const defkv_params *params, const defkv_layer *layer,
                           const defkv_shard *shard, int64_t *calls, int64_t *bytes) {
    std::string *msg = &ctx.last_error;
    return with_prefix(select_sharded_impl(ctx, params, layer, shard, nullptr, true, calls, bytes, msg), msg,
                       "shard_traffic");
}

// ---- the sharded defkv_global ---------------------------------------------------------------

namespace {

struct ShardGlobal {
    defkv_shard desc;
    ShardRun heads, model;
    ShardGlobal(const defkv_shard &d, Backend *be, int64_t G)
        : desc(d), heads(d.heads, be, d.n_kv_heads, d.kv_head_begin, G),
          model(d.model, be, d.n_kv_heads, d.kv_head_begin, G) {}
};

ShardGlobal &state(defkv_global &g) { return *static_cast<ShardGlobal *>(g.shard.get()); }

} // namespace

defkv_status do_global_create_sharded(defkv_context &ctx, const defkv_params *params, const defkv_shard *shard,
                                      defkv_global **out) {
    std::string *msg = &ctx.last_error;
    const char *fn = "defkv_global_create_sharded";
    if (!out) return with_prefix(DEFKV_ERROR_INVALID_ARGUMENT, &(*msg = "global (the output pointer) is NULL"), fn);
    Params p;
    DEFKV_FORWARD(with_prefix(resolve_params(params, &p, msg), msg, fn));
    DEFKV_FORWARD(with_prefix(check_shard(shard, true, *ctx.backend, msg), msg, fn));
    if (p.method != DEFKV_METHOD_LAYER_DEFENSIVEKV)
        return with_prefix(DEFKV_ERROR_INVALID_ARGUMENT, &(*msg = "params->method must be layer-defensivekv"), fn);
    // The shards must tile heads x layers exactly once: every rank's ranges, gathered.
    const defkv_collectives *m = shard->model;
    if (m && m->n_ranks > 1 && m->allgather) {
        const int32_t mine[6] = {shard->n_kv_heads, shard->n_layers, shard->kv_head_begin, shard->kv_head_end,
                                 shard->layer_begin, shard->layer_end};
        std::vector<int32_t> all(static_cast<size_t>(6 * m->n_ranks));
        int rc = 0;
        if (m->memory == DEFKV_MEMORY_CUDA_DEVICE) { // [every rank's | this rank's] in device memory
            Backend &be = *ctx.backend;
            const int64_t bytes = static_cast<int64_t>(sizeof mine) * (m->n_ranks + 1);
            Buf dev;
            DEFKV_FORWARD(with_prefix(be.alloc(bytes, &dev, msg), msg, fn));
            const Buf send = dev.at(static_cast<int64_t>(sizeof mine) * m->n_ranks, sizeof mine);
            defkv_status st = be.upload(send, mine, sizeof mine, msg);
            if (st == DEFKV_SUCCESS) {
                rc = m->allgather(m->user, send.ptr<void>(), sizeof mine, dev.ptr<void>());
                if (rc == 0) st = be.download(all.data(), dev, static_cast<int64_t>(sizeof mine) * m->n_ranks, msg);
            }
            be.release(&dev);
            DEFKV_FORWARD(with_prefix(st, msg, fn));
        } else {
            rc = m->allgather(m->user, mine, sizeof mine, all.data());
        }
        if (rc != 0)
            return with_prefix(DEFKV_ERROR_BACKEND_FAILURE,
                               &(*msg = fmt("the caller's allgather failed on this rank with code %d", rc)), fn);
        std::vector<int32_t> cover(static_cast<size_t>(shard->n_kv_heads) * shard->n_layers, 0);
        for (int32_t r = 0; r < m->n_ranks; r++) {
            const int32_t *a = &all[6 * r];
            if (a[0] != shard->n_kv_heads || a[1] != shard->n_layers)
                return with_prefix(DEFKV_ERROR_INVALID_ARGUMENT,
                                   &(*msg = fmt("rank %d describes n_kv_heads %d and n_layers %d, this rank %d and %d", r,
                                                a[0], a[1], shard->n_kv_heads, shard->n_layers)),
                                   fn);
            for (int32_t l = std::max(0, a[4]); l < std::min(a[5], shard->n_layers); l++)
                for (int32_t k = std::max(0, a[2]); k < std::min(a[3], shard->n_kv_heads); k++)
                    cover[static_cast<size_t>(l) * shard->n_kv_heads + k]++;
        }
        for (size_t i = 0; i < cover.size(); i++)
            if (cover[i] != 1)
                return with_prefix(DEFKV_ERROR_INVALID_ARGUMENT,
                                   &(*msg = fmt("the shards hold layer %zu, KV head %zu %d times; they must tile the "
                                                "model exactly once",
                                                i / shard->n_kv_heads, i % shard->n_kv_heads, cover[i])),
                                   fn);
    }
    std::unique_ptr<defkv_global> g(new defkv_global);
    g->ctx = &ctx;
    g->params = p;
    g->n_layers = shard->layer_end - shard->layer_begin;
    g->layer0 = shard->layer_begin;
    g->added.assign(static_cast<size_t>(g->n_layers), 0);
    g->shard = std::make_shared<ShardGlobal>(*shard, ctx.backend.get(), 1);
    *out = g.release();
    return DEFKV_SUCCESS;
}

defkv_status shard_global_add(defkv_global &g, int32_t layer_index, const defkv_layer *layer) {
    std::string *msg = &g.ctx->last_error;
    ShardGlobal &sg = state(g);
    const char *fn = "defkv_global_add_layer";
    if (layer_index < sg.desc.layer_begin || layer_index >= sg.desc.layer_end)
        return with_prefix(DEFKV_ERROR_INVALID_ARGUMENT,
                           &(*msg = fmt("layer_index is %d; this rank holds layers [%d, %d)", layer_index,
                                        sg.desc.layer_begin, sg.desc.layer_end)),
                           fn);
    const int32_t local = layer_index - g.layer0;
    if (g.selected || g.added[local]) return global_add_local(g, local, layer); // the usual state errors
    LayerInfo li;
    DEFKV_FORWARD(with_prefix(resolve_layer(*g.ctx, layer, g.params, fn, &li, msg), msg, fn));
    DEFKV_FORWARD(with_prefix(check_layer_heads(li, &sg.desc, msg), msg, fn));
    // The heads group's schedule of this layer, from a dry run of the plan on its shapes.
    sg.heads = ShardRun(sg.desc.heads, g.ctx->backend.get(), sg.desc.n_kv_heads, sg.desc.kv_head_begin, li.H / li.Hk);
    {
        Exec xd{*g.ctx->backend, *g.ctx->arena, msg, &sg.heads};
        xd.ar.measure();
        sg.heads.begin_dry();
        std::vector<SeqResult> res(li.seqs.size());
        for (size_t b = 0; b < li.seqs.size(); b++) {
            Buf bad;
            DEFKV_FORWARD(with_prefix(run_plan(xd, g.params, li.seqs[b], bad, &res[b].sc), msg, fn));
        }
        DEFKV_FORWARD(sg.heads.agree(msg)); // add_impl's, after the layer is scored
        xd.ar.measure();
        DEFKV_FORWARD(with_prefix(xd.ar.commit(msg), msg, fn));
    }
    DEFKV_FORWARD(with_prefix(sg.heads.begin_real(msg), msg, fn));
    defkv_status st = global_add_local(g, local, layer); // the plans with the heads group (global.cpp)
    return sg.heads.finish(st, msg);
}

ShardRun *shard_global_heads(defkv_global &g) { return g.shard ? &state(g).heads : nullptr; }

defkv_status shard_global_select(defkv_global &g) {
    std::string *msg = &g.ctx->last_error;
    ShardGlobal &sg = state(g);
    const char *fn = "defkv_global_select";
    if (g.selected) return with_prefix(DEFKV_ERROR_INVALID_STATE, &(*msg = "already called"), fn);
    defkv_status st = DEFKV_SUCCESS;
    for (int32_t l = 0; l < g.n_layers && st == DEFKV_SUCCESS; l++)
        if (!g.added[l]) {
            *msg = fmt("layer %d was not added (defkv_global_add_layer); the other ranks are told", l + g.layer0);
            st = DEFKV_ERROR_INVALID_STATE;
        }
    // Sequences: known from the first added layer. A rank without them cannot join the
    // schedule's shapes: it fails alone (documented: add every layer before selecting).
    if (g.seq_lens.empty()) return with_prefix(st != DEFKV_SUCCESS ? st : DEFKV_ERROR_INVALID_STATE, msg, fn);
    const int64_t Hk = g.Hk, NL = g.n_layers, Hk_g = sg.desc.n_kv_heads, NL_g = sg.desc.n_layers;
    std::vector<ShardTopKJob> jobs(g.seq_lens.size());
    for (size_t b = 0; b < jobs.size(); b++) {
        ShardTopKJob &jb = jobs[b];
        SeqShape s;
        s.Hk = Hk_g, s.L = g.seq_lens[b];
        jb.rows = NL * Hk, jb.L = s.L, jb.R_g = NL_g * Hk_g;
        jb.k = std::min(jb.R_g * s.L, seq_kept_count(g.params, s, NL_g));
        jb.score = g.seqs[b].score, jb.tier = g.seqs[b].tier, jb.keep = g.seqs[b].keep;
        for (int64_t l = 0; l < NL; l++)
            for (int64_t k = 0; k < Hk; k++) jb.row_id.push_back((g.layer0 + l) * Hk_g + sg.desc.kv_head_begin + k);
    }
    ShardRun &sr = sg.model;
    Exec x{*g.ctx->backend, *g.ctx->arena, msg, &sr};
    x.ar.measure();
    sr.begin_dry();
    DEFKV_FORWARD(with_prefix(shard_top_k(x, sr, TopK::LAYER_ADAPTIVE, jobs, false), msg, fn));
    DEFKV_FORWARD(sr.agree(msg));
    DEFKV_FORWARD(with_prefix(sr.begin_real(msg), msg, fn));
    if (st == DEFKV_SUCCESS) st = x.ar.commit(msg);
    if (st == DEFKV_SUCCESS) st = shard_top_k(x, sr, TopK::LAYER_ADAPTIVE, jobs, false);
    if (st == DEFKV_SUCCESS) st = sr.agree(msg);
    st = sr.finish(st, msg);
    if (st != DEFKV_SUCCESS) return with_prefix(st, msg, fn);
    g.selected = true;
    return DEFKV_SUCCESS;
}

} // namespace defkv
