#include "decode.hpp"

#include <defkv/defkv.h>

#include <algorithm>
#include <cstdint>
#include <chrono>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <random>

namespace defkv_engine {

namespace {

double now_s() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

defkv_tensor f32(const float *data, std::initializer_list<int64_t> shape) {
    defkv_tensor t;
    std::memset(&t, 0, sizeof t);
    t.data = const_cast<float *>(data);
    t.dtype = DEFKV_DTYPE_F32;
    t.ndim = (int32_t)shape.size();
    int i = 0;
    for (int64_t s : shape) t.shape[i++] = s;  // strides 0: contiguous
    t.memory = DEFKV_MEMORY_HOST;
    return t;
}

std::string api_error(defkv_context *ctx, const char *call, int32_t st) {
    return std::string(call) + " failed: " + defkv_status_string(st) + ": " + defkv_context_last_error(ctx);
}

// A slack no head reaches: rounds come every `interval` steps only.
constexpr int64_t kNoSlackRounds = int64_t(1) << 30;

bool weighted(int32_t method) {
    return method == DEFKV_METHOD_DEFENSIVEKV || method == DEFKV_METHOD_LAYER_DEFENSIVEKV;
}

// One decoding run: a per-head state cloned from the prefilled prompt, its stream (none for
// the full cache), and the bookkeeping that puts chunk ends where the rounds come.
class StreamRun {
public:
    StreamRun() = default;
    StreamRun(const StreamRun &) = delete;
    StreamRun &operator=(const StreamRun &) = delete;
    ~StreamRun() { defkv_stream_destroy(stream_); }

    // Registers the prompt (its rows and the last W queries captured by the prefill) and runs
    // the first round: the prompt compressed to the budget. The full cache only starts a new
    // segment there. max_rows: the most tokens the run will hold (prompt and continuation).
    bool start(defkv_context *ctx, Model &m, const KVState &prompt, const DecodeMethod &dm, int cap,
               const DecodeConfig &cfg, int max_rows, std::string *error);
    // Feeds n tokens, in chunks that end where rounds are due; logits [n_logits, V] of the last
    // n_logits tokens (may be null when n_logits is 0).
    bool advance(const int *tokens, int n, float *logits, int n_logits, std::string *error);

    int64_t rounds = 0;
    double entries_sum = 0;  // sum over the fed tokens of the mean live entries per head they attended
    int max_head = 0;
    double seconds = 0;

private:
    bool chunk(const int *tokens, int T, float *logits, int n_logits, std::string *error);
    bool round(std::string *error);
    void rebase_all();
    int longest_head() const;
    int64_t steps_to_budget_round() const;

    defkv_context *ctx_ = nullptr;
    Model *m_ = nullptr;
    KVState st_;
    defkv_stream *stream_ = nullptr;
    DecodeMethod dm_;
    int cap_ = 0, interval_ = 0, since_ = 0;
    int64_t slack_ = 0;
};

int StreamRun::longest_head() const {
    int mx = 0;
    for (size_t l = 0; l < st_.layers.size(); ++l)
        for (int k = 0; k < m_->config().n_kv_heads; ++k) mx = std::max(mx, st_.head_len((int)l, k));
    return mx;
}

// Steps until defkv_stream_due turns 1 by the budget (its rule: more than budget + slack per
// head over what a round's budget covers: a head for per-head methods, a layer's heads for
// head-adaptive ones, the model for layer-defensivekv); each step adds one entry per head.
int64_t StreamRun::steps_to_budget_round() const {
    const int Hk = m_->config().n_kv_heads, nl = (int)st_.layers.size();
    const int64_t over = cap_ + slack_;
    const int32_t m = dm_.method;
    if (m == DEFKV_METHOD_SNAPKV || m == DEFKV_METHOD_STREAMINGLLM) return over + 1 - longest_head();
    int64_t model = 0, steps = INT64_MAX;
    for (int l = 0; l < nl; ++l) {
        int64_t layer = 0;
        for (int k = 0; k < Hk; ++k) layer += st_.head_len(l, k);
        model += layer;
        if (m != DEFKV_METHOD_LAYER_DEFENSIVEKV)
            steps = std::min(steps, layer > over * Hk ? 0 : (over * Hk - layer) / Hk + 1);
    }
    if (m == DEFKV_METHOD_LAYER_DEFENSIVEKV) {
        const int64_t total = over * Hk * nl;
        steps = model > total ? 0 : (total - model) / ((int64_t)Hk * nl) + 1;
    }
    return steps;
}

void StreamRun::rebase_all() {
    const int Hk = m_->config().n_kv_heads;
    std::vector<int32_t> lens((size_t)Hk);
    for (size_t l = 0; l < st_.layers.size(); ++l) {
        for (int k = 0; k < Hk; ++k) lens[(size_t)k] = st_.head_len((int)l, k);
        st_.rebase((int)l, lens.data());
    }
    st_.n_tail = 0;
}

bool StreamRun::start(defkv_context *ctx, Model &m, const KVState &prompt, const DecodeMethod &dm, int cap,
                      const DecodeConfig &cfg, int max_rows, std::string *error) {
    const double t0 = now_s();
    ctx_ = ctx, m_ = &m, dm_ = dm, cap_ = cap, interval_ = cfg.interval;
    slack_ = cfg.slack < 0 ? kNoSlackRounds : cfg.slack > 0 ? cfg.slack : cfg.interval;
    const ModelConfig &c = m.config();
    const int P = prompt.n_tail;
    // Rows a head can need: the prompt before the first round; after a round the head's
    // share of the budget (per head, per layer or per model) plus the steps to the next.
    int64_t keep_max = cap;
    if (dm.method == DEFKV_METHOD_ADA_SNAPKV || dm.method == DEFKV_METHOD_DEFENSIVEKV) keep_max *= c.n_kv_heads;
    if (dm.method == DEFKV_METHOD_LAYER_DEFENSIVEKV) keep_max *= (int64_t)c.n_kv_heads * c.n_layers;
    int rows = dm.full ? max_rows : (int)std::min<int64_t>(max_rows, std::max<int64_t>(P, keep_max + interval_));
    rows = std::max(rows, dm.full ? P : std::max(cap, cfg.window + 1));
    st_ = prompt.clone(rows);
    if (dm.full) {
        rebase_all();
        seconds += now_s() - t0;
        return true;
    }
    defkv_params p;
    defkv_params_default(&p);
    p.method = dm.method;
    p.window = cfg.window;
    defkv_stream_params sp;
    defkv_stream_params_default(&sp);
    sp.n_layers = c.n_layers, sp.n_heads = c.n_heads, sp.n_kv_heads = c.n_kv_heads, sp.head_dim = c.head_dim;
    sp.capacity = rows, sp.interval = cfg.interval, sp.aggregation = dm.aggregation, sp.budget = cap;
    sp.slack = slack_, sp.decay = cfg.decay;
    int32_t s = defkv_stream_create(ctx, &p, &sp, &stream_);
    if (s != DEFKV_SUCCESS) {
        *error = api_error(ctx, "defkv_stream_create", s);
        return false;
    }
    for (int l = 0; l < c.n_layers; ++l) {
        const defkv_tensor q = f32(prompt.win_q[(size_t)l].data(), {c.n_heads, prompt.window, c.head_dim});
        if ((s = defkv_stream_append(stream_, l, P)) != DEFKV_SUCCESS ||
            (s = defkv_stream_push_queries(stream_, l, &q)) != DEFKV_SUCCESS) {
            *error = api_error(ctx, "defkv_stream_append/push_queries (prompt)", s);
            return false;
        }
    }
    const bool ok = round(error);
    max_head = std::max(max_head, longest_head());
    seconds += now_s() - t0;
    return ok;
}

bool StreamRun::round(std::string *error) {
    const ModelConfig &c = m_->config();
    const int NL = c.n_layers, Hk = c.n_kv_heads, d = c.head_dim;
    std::vector<defkv_stream_cache> caches((size_t)NL);
    std::vector<defkv_paged_kv> pk((size_t)NL);
    std::vector<int32_t> lens((size_t)Hk);
    for (int l = 0; l < NL; ++l) {
        // The stream and the engine must agree on every head's rows before the round.
        defkv_stream_head_lens(stream_, l, lens.data());
        for (int k = 0; k < Hk; ++k)
            if (lens[(size_t)k] != st_.head_len(l, k)) {
                *error = "internal: layer " + std::to_string(l) + " head " + std::to_string(k) + ": the stream has " +
                         std::to_string(lens[(size_t)k]) + " entries, the cache " + std::to_string(st_.head_len(l, k));
                return false;
            }
        defkv_stream_cache &cc = caches[(size_t)l];
        std::memset(&cc, 0, sizeof cc);
        if (st_.paged) {
            PagedCache &pc = *st_.paged;
            const PagedLayer &pl = pc.layers[(size_t)l];
            defkv_paged_kv &v = pk[(size_t)l];
            defkv_paged_kv_default(&v);
            v.layout = DEFKV_PAGE_HEAD;
            v.page_size = kPageSize;
            v.n_kv_heads = Hk;
            v.k_pages = f32(pc.head.k_data(), {pc.head.capacity(), kPageSize, d});
            v.v_pages = f32(pc.head.v_data(), {pc.head.capacity(), kPageSize, d});
            v.block_tables = pl.table.data();
            v.block_table_stride = pl.stride;
            cc.paged = &v;
        } else {
            LayerKV &kv = st_.layers[(size_t)l];
            cc.keys = f32(kv.head_k.data(), {Hk, st_.tail_cap, d});
            cc.values = f32(kv.head_v.data(), {Hk, st_.tail_cap, d});
        }
        if (weighted(dm_.method)) cc.o_proj = f32(m_->o_proj(l).data(), {c.d_model, (int64_t)c.n_heads * d});
    }
    const int32_t s = defkv_stream_round(stream_, caches.data(), nullptr);
    if (s != DEFKV_SUCCESS) {
        *error = api_error(ctx_, "defkv_stream_round", s);
        return false;
    }
    for (int l = 0; l < NL; ++l) {
        defkv_stream_head_lens(stream_, l, lens.data());
        st_.rebase(l, lens.data());
    }
    st_.n_tail = 0;
    since_ = 0;
    ++rounds;
    return true;
}

bool StreamRun::chunk(const int *tokens, int T, float *logits, int n_logits, std::string *error) {
    const ModelConfig &c = m_->config();
    const double per_head = (double)st_.cached_entries() / ((double)c.n_layers * c.n_kv_heads);
    entries_sum += T * per_head + 0.5 * T * (T + 1.0);
    if (!m_->forward(st_, tokens, T, logits, n_logits, stream_ ? T : 0, error)) return false;
    max_head = std::max(max_head, longest_head());
    since_ += T;
    if (!stream_) {
        if (since_ >= interval_) rebase_all(), since_ = 0;
        return true;
    }
    for (int l = 0; l < c.n_layers; ++l) {
        const defkv_tensor q = f32(st_.win_q[(size_t)l].data(), {c.n_heads, T, c.head_dim});
        int32_t s;
        if ((s = defkv_stream_append(stream_, l, T)) != DEFKV_SUCCESS ||
            (s = defkv_stream_push_queries(stream_, l, &q)) != DEFKV_SUCCESS) {
            *error = api_error(ctx_, "defkv_stream_append/push_queries", s);
            return false;
        }
    }
    int32_t due = 0;
    defkv_stream_due(stream_, &due);
    // The chunk was cut where the next round comes; the stream must agree (else the chunked
    // run would differ from step-by-step decoding).
    const bool expect = since_ >= interval_ || steps_to_budget_round() <= 0;
    if ((due != 0) != expect) {
        *error = "internal: defkv_stream_due says " + std::to_string(due) + " after a chunk of " + std::to_string(T) +
                 " tokens, expected " + std::to_string(expect);
        return false;
    }
    return !due || round(error);
}

bool StreamRun::advance(const int *tokens, int n, float *logits, int n_logits, std::string *error) {
    const double t0 = now_s();
    const int V = m_->config().vocab;
    for (int i = 0; i < n;) {
        int64_t T = std::min(n - i, interval_ - since_);
        if (stream_) T = std::min<int64_t>(T, steps_to_budget_round());  // the step the budget + slack is passed
        T = std::max<int64_t>(T, 1);
        // logits of this chunk's tokens at positions >= n - n_logits
        const int first = std::max(i, n - n_logits), nl = std::max(0, i + (int)T - first);
        if (!chunk(tokens + i, (int)T, nl ? logits + (size_t)(first - (n - n_logits)) * V : nullptr, nl, error))
            return false;
        i += (int)T;
    }
    seconds += now_s() - t0;
    return true;
}

struct RunSpec {
    DecodeMethod dm;
    int cap = 0;
};

bool run_specs(const DecodeConfig &cfg, std::vector<RunSpec> *specs, std::string *error) {
    specs->clear();
    RunSpec full;
    full.dm.name = "full";
    full.dm.full = true;
    specs->push_back(full);
    for (int cap : cfg.caps)
        for (const std::string &name : cfg.methods) {
            RunSpec r;
            r.cap = cap;
            if (!parse_decode_method(name, &r.dm, error)) return false;
            if (r.dm.full) continue;
            specs->push_back(r);
        }
    return true;
}

// Prefills the prompt into a per-head state, capturing its last W queries.
bool prefill_prompt(Model &m, const std::vector<int> &prompt, const DecodeConfig &cfg, KVState *pre,
                    std::string *error) {
    *pre = m.new_head_state((int)prompt.size(), cfg.cache);
    return m.prefill(*pre, prompt, 256, cfg.window, error);
}

}  // namespace

bool parse_decode_method(const std::string &name, DecodeMethod *out, std::string *error) {
    *out = DecodeMethod();
    out->name = name;
    if (name == "full") {
        out->full = true;
        return true;
    }
    if (name == "streamingllm") {
        out->method = DEFKV_METHOD_STREAMINGLLM;
        out->aggregation = DEFKV_STREAM_LATEST;
        return true;
    }
    const size_t dash = name.rfind('-');
    const std::string base = dash == std::string::npos ? name : name.substr(0, dash);
    const std::string agg = dash == std::string::npos ? "" : name.substr(dash + 1);
    int32_t id = 0;
    if (defkv_method_from_name(base.c_str(), &id) != DEFKV_SUCCESS ||
        (id != DEFKV_METHOD_SNAPKV && id != DEFKV_METHOD_ADA_SNAPKV && id != DEFKV_METHOD_DEFENSIVEKV &&
         id != DEFKV_METHOD_LAYER_DEFENSIVEKV) ||
        (agg != "latest" && agg != "max" && agg != "decay")) {
        *error = "unknown decoding method '" + name +
                 "' (full, streamingllm, or snapkv, ada-snapkv, defensivekv, layer-defensivekv with -latest, -max "
                 "or -decay)";
        return false;
    }
    out->method = id;
    out->aggregation = agg == "latest" ? DEFKV_STREAM_LATEST : agg == "max" ? DEFKV_STREAM_MAX : DEFKV_STREAM_MAX_DECAY;
    return true;
}

int64_t decode_kl_steps(const DecodeConfig &cfg) {
    const int64_t blocks = (cfg.tokens + cfg.interval - 1) / cfg.interval;
    return cfg.kl ? (int64_t)cfg.samples * blocks * (1 + (int64_t)cfg.caps.size() * (int64_t)cfg.methods.size()) : 0;
}

namespace {
// A retrieval run counts as many progress steps as the KL blocks of its length, so that the
// estimated time left weighs both parts alike.
int64_t retrieval_units(const DecodeConfig &cfg) {
    return std::max<int64_t>(1, (cfg.retrieval_lead / 2 + cfg.retrieval_gap + 48) / cfg.interval);
}
}  // namespace

int64_t decode_retrieval_steps(const DecodeConfig &cfg) {
    return cfg.retrieval ? (int64_t)cfg.retrieval_trials * (1 + (int64_t)cfg.caps.size() * (int64_t)cfg.methods.size()) *
                               retrieval_units(cfg)
                         : 0;
}

bool run_decode_kl(defkv_context *ctx, Model &m, const std::vector<int> &toks, const std::vector<int64_t> &offsets,
                   const DecodeConfig &cfg, Progress &prog, std::vector<DecodeKLResult> *out, std::string *error) {
    const int V = m.config().vocab, P = cfg.prompt, N = cfg.tokens;
    std::vector<RunSpec> specs;
    if (!run_specs(cfg, &specs, error)) return false;
    std::vector<float> ref((size_t)cfg.interval * V), refp((size_t)cfg.interval * V), cmp((size_t)cfg.interval * V);
    for (int w = 0; w < (int)offsets.size(); ++w) {
        const int64_t off = offsets[(size_t)w];
        if ((size_t)(off + P + N) > toks.size()) {
            *error = "the text is too short for a window at token " + std::to_string(off);
            return false;
        }
        const std::vector<int> prompt(toks.begin() + off, toks.begin() + off + P);
        const int *cont = toks.data() + off + P;
        KVState pre;
        if (!prefill_prompt(m, prompt, cfg, &pre, error)) return false;
        std::vector<std::unique_ptr<StreamRun>> runs;
        std::vector<DecodeKLResult> rows;
        for (const RunSpec &s : specs) {
            runs.push_back(std::make_unique<StreamRun>());
            if (!runs.back()->start(ctx, m, pre, s.dm, s.cap, cfg, P + N, error)) return false;
            DecodeKLResult r;
            r.window = w, r.offset = off, r.cap = s.cap, r.method = s.dm.name;
            rows.push_back(r);
        }
        // In lockstep, one block of `interval` tokens at a time: the full cache's log-probabilities
        // of the block, then every method's against them.
        for (int b0 = 0; b0 < N; b0 += cfg.interval) {
            const int T = std::min(cfg.interval, N - b0);
            for (size_t i = 0; i < runs.size(); ++i) {
                float *lp = i == 0 ? ref.data() : cmp.data();
                if (!runs[i]->advance(cont + b0, T, lp, T, error)) return false;
                for (int t = 0; t < T; ++t) log_softmax(lp + (size_t)t * V, V);
                if (i == 0)
                    for (size_t j = 0; j < (size_t)T * V; ++j) refp[j] = std::exp(ref[j]);
                DecodeKLResult &r = rows[i];
                for (int t = 0; t < T; ++t) {
                    const float *p = ref.data() + (size_t)t * V, *pe = refp.data() + (size_t)t * V,
                                *q = lp + (size_t)t * V;
                    double kl = 0;
                    if (i > 0) {
                        for (int v = 0; v < V; ++v) kl += (double)pe[v] * ((double)p[v] - (double)q[v]);
                        kl = std::max(0.0, kl);
                    }
                    r.kl.push_back(kl);
                    r.top1 += std::max_element(p, p + V) - p == std::max_element(q, q + V) - q;
                    ++r.tokens;
                }
                char what[96];
                std::snprintf(what, sizeof what, "decode KL window %d/%d %s B=%d", w + 1, (int)offsets.size(),
                              r.method.c_str(), r.cap);
                prog.step(what);
            }
        }
        for (size_t i = 0; i < runs.size(); ++i) {
            rows[i].rounds = runs[i]->rounds;
            rows[i].entries = runs[i]->entries_sum / N;
            rows[i].max_head = runs[i]->max_head;
            rows[i].seconds = runs[i]->seconds;
        }
        out->insert(out->end(), rows.begin(), rows.end());
    }
    return true;
}

bool run_decode_retrieval(defkv_context *ctx, Model &m, const std::vector<int> &toks,
                          const std::vector<int64_t> &offsets, const DecodeConfig &cfg, Progress &prog,
                          std::vector<DecodeRetrievalResult> *out, std::string *error) {
    const Tokenizer &tk = m.tokenizer();
    const int V = m.config().vocab, max_new = 8;
    std::vector<RunSpec> specs;
    if (!run_specs(cfg, &specs, error)) return false;
    const std::vector<int> header = tk.encode(
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz "
        "you about the important information there.\n",
        true);
    const std::vector<int> question = tk.encode("\nWhat is the pass key? The pass key is", false);
    if ((int)header.size() >= cfg.prompt) {
        *error = "the retrieval prompt's instruction (" + std::to_string(header.size()) +
                 " tokens) does not fit the prompt";
        return false;
    }
    std::mt19937_64 rng(cfg.seed ^ 0x5e7a11u);
    std::vector<float> logits((size_t)V);
    for (int t = 0; t < (int)offsets.size(); ++t) {
        const std::string key = std::to_string(10000 + (int)(rng() % 90000));
        const int lead = (int)(rng() % (uint64_t)(cfg.retrieval_lead + 1));
        const std::vector<int> needle =
            tk.encode("\nThe pass key is " + key + ". Remember it. " + key + " is the pass key.\n", false);
        const int64_t off = offsets[(size_t)t], book = cfg.prompt - (int64_t)header.size();
        if ((size_t)(off + book + lead + cfg.retrieval_gap) > toks.size()) {
            *error = "the text is too short for a retrieval window at token " + std::to_string(off);
            return false;
        }
        std::vector<int> prompt = header;
        prompt.insert(prompt.end(), toks.begin() + off, toks.begin() + off + book);
        const int64_t b = off + book;
        std::vector<int> fed(toks.begin() + b, toks.begin() + b + lead);
        fed.insert(fed.end(), needle.begin(), needle.end());
        fed.insert(fed.end(), toks.begin() + b + lead, toks.begin() + b + lead + cfg.retrieval_gap);
        fed.insert(fed.end(), question.begin(), question.end());
        KVState pre;
        if (!prefill_prompt(m, prompt, cfg, &pre, error)) return false;
        for (const RunSpec &s : specs) {
            StreamRun run;
            if (!run.start(ctx, m, pre, s.dm, s.cap, cfg, cfg.prompt + (int)fed.size() + max_new, error) ||
                !run.advance(fed.data(), (int)fed.size(), logits.data(), 1, error))
                return false;
            std::vector<int> gen;
            for (int i = 0; i < max_new; ++i) {  // greedy, every answer token through the stream too
                const int next = (int)(std::max_element(logits.begin(), logits.end()) - logits.begin());
                if (next == tk.eos || next == tk.token_id("<|endoftext|>")) break;
                gen.push_back(next);
                if (i + 1 < max_new && !run.advance(&next, 1, logits.data(), 1, error)) return false;
            }
            DecodeRetrievalResult r;
            r.trial = t, r.offset = off, r.cap = s.cap, r.method = s.dm.name, r.key = key;
            r.answer = tk.decode(gen);
            r.lead = lead, r.gap = cfg.retrieval_gap;
            r.correct = r.answer.find(key) != std::string::npos;
            r.trials = 1;
            r.rounds = run.rounds;
            out->push_back(r);
            char what[96];
            std::snprintf(what, sizeof what, "decode retrieval %d/%d %s B=%d", t + 1, (int)offsets.size(),
                          r.method.c_str(), r.cap);
            for (int64_t u = 0; u < retrieval_units(cfg); ++u) prog.step(what);
        }
    }
    return true;
}

}  // namespace defkv_engine
