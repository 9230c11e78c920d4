// `defkv bench shard`: the communication of sharded selection (defkv_select_sharded, the
// sharded defkv_global) per layer selection, for the Llama-3.1-8B shape (H = 32, Hk = 8,
// d = 128, D = 4096, W = 32, 32 layers) split by KV heads over 2, 4 and 8 ranks at L = 8k and
// 32k. The figures are the library's own call schedule, recorded by the dry run of the real
// plans (core/shard.cpp: no data is read, nothing is computed), which is exactly what the
// engine's collectives receive: tests/mpi counts the same calls and bytes through MPI.
#include <cstdio>
#include <string>
#include <vector>

#include "context.hpp"
#include "shard.hpp"

namespace {

int32_t never_i64(void *, int64_t *, int64_t, int32_t) { return -1; } // a dry run calls nothing
int32_t never_f32(void *, float *, int64_t, int32_t) { return -1; }

defkv_tensor fake3(uintptr_t addr, int64_t a, int64_t b, int64_t c) {
    defkv_tensor t{};
    t.data = reinterpret_cast<void *>(addr);
    t.dtype = DEFKV_DTYPE_BF16;
    t.ndim = 3;
    t.shape[0] = a, t.shape[1] = b, t.shape[2] = c;
    return t;
}

} // namespace

int defkv_bench_shard(int argc, char **argv) {
    (void)argc, (void)argv;
    const int64_t H = 32, Hk = 8, d = 128, D = 4096, W = 32, NL = 32;
    defkv_context *ctx = nullptr;
    if (defkv_context_create(nullptr, &ctx) != DEFKV_SUCCESS) return 1;
    std::printf("sharded selection, Llama-3.1-8B shape (H=%lld, Hk=%lld, d=%lld, D=%lld, W=%lld, %lld layers), one "
                "sequence,\nKV heads split evenly over the ranks (TP); bytes = every call's payload and status word, "
                "as each rank passes it to its all-reduce\n\n",
                (long long)H, (long long)Hk, (long long)d, (long long)D, (long long)W, (long long)NL);
    std::printf("%-18s %6s %5s %7s %10s\n", "method", "L", "ranks", "calls", "bytes");
    const int methods[] = {DEFKV_METHOD_SNAPKV,         DEFKV_METHOD_ADA_SNAPKV, DEFKV_METHOD_CRITICALKV,
                           DEFKV_METHOD_ADA_CRITICALKV, DEFKV_METHOD_DEFENSIVEKV, DEFKV_METHOD_STREAMINGLLM,
                           DEFKV_METHOD_KNORM,          DEFKV_METHOD_TOVA,        DEFKV_METHOD_RANDOM};
    int rc = 0;
    for (int m : methods)
        for (int64_t L : {int64_t(8192), int64_t(32768)})
            for (int R : {2, 4, 8}) {
                const int64_t hk = Hk / R;
                defkv_collectives c{};
                c.struct_size = sizeof c, c.n_ranks = R, c.rank = 0;
                c.allreduce_i64 = never_i64, c.allreduce_f32 = never_f32;
                defkv_shard sh;
                defkv_shard_default(&sh);
                sh.n_kv_heads = static_cast<int32_t>(Hk), sh.kv_head_begin = 0, sh.kv_head_end = static_cast<int32_t>(hk);
                sh.heads = &c;
                defkv_sequence seq{};
                seq.queries = fake3(0x10000000, hk * (H / Hk), W, d);
                seq.keys = fake3(0x20000000, hk, L, d);
                seq.values = fake3(0x40000000, hk, L, d);
                defkv_layer layer{};
                layer.struct_size = sizeof layer, layer.n_seqs = 1, layer.seqs = &seq;
                layer.o_proj = fake3(0x60000000, D, hk * (H / Hk) * d, 1);
                layer.o_proj.ndim = 2;
                defkv_params p;
                defkv_params_default(&p);
                p.method = m, p.compression_ratio = 0.8;
                int64_t calls = 0, bytes = 0;
                if (defkv::shard_traffic(*ctx, &p, &layer, &sh, &calls, &bytes) != DEFKV_SUCCESS) {
                    std::fprintf(stderr, "%s\n", defkv_context_last_error(ctx));
                    rc = 1;
                    continue;
                }
                std::printf("%-18s %5lldk %5d %7lld %10lld%s\n", defkv_method_name(m), (long long)(L / 1024), R,
                            (long long)calls, (long long)bytes,
                            bytes > 65536 ? "  (over 64 KiB: an exact gather that grows with L)" : "");
            }
    // layer-defensivekv: per layer the defensivekv plan's reductions (defkv_global_add_layer, heads
    // group), and once per model the layer-adaptive top-k (defkv_global_select, model group).
    for (int R : {2, 4, 8}) {
        defkv_collectives c{};
        c.struct_size = sizeof c, c.n_ranks = R, c.rank = 0;
        c.allreduce_i64 = never_i64, c.allreduce_f32 = never_f32;
        defkv::ShardRun sr(&c, ctx->backend.get(), Hk, 0, H / Hk);
        sr.begin_dry();
        std::vector<defkv::ShardTopKJob> jobs(1);
        jobs[0].R_g = NL * Hk, jobs[0].L = 8192, jobs[0].k = 1;
        std::string msg;
        defkv::Exec x{*ctx->backend, *ctx->arena, &msg, &sr};
        x.ar.measure(); // a dry run: no buffer is handed out, no op runs
        (void)defkv::shard_top_k(x, sr, defkv::TopK::LAYER_ADAPTIVE, jobs, false);
        (void)sr.agree(&msg); // as shard_global_select issues it
        std::printf("%-18s %6s %5d %7lld %10lld  (defkv_global_select, once for all %lld layers: %.0f bytes per layer; "
                    "any L)\n",
                    "layer-defensivekv", "all", R, (long long)sr.scheduled_calls(), (long long)sr.scheduled_bytes(),
                    (long long)NL, static_cast<double>(sr.scheduled_bytes()) / static_cast<double>(NL));
    }
    std::printf("layer-defensivekv per layer (defkv_global_add_layer): the defensivekv rows above less its top-k "
                "(5 calls, 16456 bytes): 3 calls, the status agreement included\n");
    defkv_context_destroy(ctx);
    return rc;
}
