// Non-finite inputs: the reject check and the rows ranked lowest.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "context.hpp"
#include "error.hpp"
#include "ops.hpp"

namespace defkv {

// ---- non-finite inputs -------------------------------------------------------------------

namespace {

// Scans a [A, B, C] view (or 2-D with C=1) for a non-finite element; returns its index or -1.
bool find_nonfinite(ThreadPool &pool, const View &v, int64_t idx[3]) {
    const int64_t A = v.shape[0], B = v.shape[1], C = v.ndim == 3 ? v.shape[2] : 1;
    std::vector<int64_t> first(static_cast<size_t>(A), -1);
    pool.parallel_for(A, [&](int64_t a) {
        std::vector<float> row(static_cast<size_t>(C));
        for (int64_t b = 0; b < B; b++) {
            const int64_t off = v.ndim == 3 ? v.off3(a, b, 0) : v.off2(a, b);
            load_f32(v, off, C, v.ndim == 3 ? v.stride[2] : 1, row.data());
            for (int64_t c = 0; c < C; c++)
                if (!std::isfinite(row[c])) {
                    first[a] = b * C + c;
                    return;
                }
        }
    });
    for (int64_t a = 0; a < A; a++)
        if (first[a] >= 0) {
            idx[0] = a;
            idx[1] = first[a] / C;
            idx[2] = first[a] % C;
            return true;
        }
    return false;
}

} // namespace

// Flags [Hk, L] entries whose key or value row holds a non-finite value.
void flag_nonfinite_rows(ThreadPool &pool, const SeqInfo &si, bool keys, bool values, std::vector<uint8_t> *bad) {
    const int64_t Hk = si.s.Hk, L = si.s.L, d = si.s.d;
    bad->assign(static_cast<size_t>(Hk * L), 0);
    pool.parallel_for(Hk, [&](int64_t k) {
        std::vector<float> row(static_cast<size_t>(d));
        for (int64_t j = 0; j < L; j++) {
            bool b = false;
            if (keys) {
                load_f32(si.v.keys, si.v.keys.off3(k, j, 0), d, si.v.keys.stride[2], row.data());
                for (int64_t i = 0; i < d; i++) b |= !std::isfinite(row[i]);
            }
            if (values && !b) {
                load_f32(si.v.values, si.v.values.off3(k, j, 0), d, si.v.values.stride[2], row.data());
                for (int64_t i = 0; i < d; i++) b |= !std::isfinite(row[i]);
            }
            (*bad)[k * L + j] = b;
        }
    });
}

defkv_status check_inputs_finite(ThreadPool &pool, const Params &p, const SeqInfo &si, std::string *msg) {
    struct Named { const View *v; const char *name; bool policy_applies; };
    const int32_t m = p.method;
    const bool lowest = p.nonfinite == DEFKV_NONFINITE_LOWEST;
    std::vector<Named> list;
    if (method_needs_attention(m)) {
        if (si.v.queries.present()) list.push_back({&si.v.queries, "queries", false});
        if (si.v.attention.present()) list.push_back({&si.v.attention, "attention", false});
    }
    if (method_reads_keys(m)) list.push_back({&si.v.keys, "keys", true});
    if (method_reads_values(m)) {
        list.push_back({&si.v.values, "values", true});
        list.push_back({&si.v.o_proj, "o_proj", false});
    }
    for (const Named &n : list) {
        if (lowest && n.policy_applies) continue;
        // Device memory is not readable here: the scores' finiteness check after scoring
        // catches non-finite device inputs instead.
        if (n.v->memory != DEFKV_MEMORY_HOST) continue;
        int64_t idx[3];
        if (find_nonfinite(pool, *n.v, idx)) {
            if (n.v->ndim == 2)
                DEFKV_FAIL(DEFKV_ERROR_NON_FINITE, "%s: non-finite value at [%lld, %lld]%s", n.name, (long long)idx[0],
                           (long long)idx[1], "");
            DEFKV_FAIL(DEFKV_ERROR_NON_FINITE, "%s: non-finite value at [%lld, %lld, %lld]%s", n.name,
                       (long long)idx[0], (long long)idx[1], (long long)idx[2],
                       n.policy_applies ? " (params->nonfinite = DEFKV_NONFINITE_LOWEST would rank the entry lowest)" : "");
        }
    }
    return DEFKV_SUCCESS;
}

bool all_finite(const float *x, int64_t n, const uint8_t *bad) {
    for (int64_t i = 0; i < n; i++)
        if (!std::isfinite(x[i]) && !(bad && bad[i])) return false;
    return true;
}

} // namespace defkv
