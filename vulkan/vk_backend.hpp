// The Vulkan backend (internal): one class whose members are defined by concern in
//   vk_device.cpp   loader, instance, device, features, pipelines (init/teardown);
//   vk_exec.cpp     buffers, binding windows, command recording, submission, the memory ops;
//   vk_scoring.cpp  attention, projected norm, key norm;
//   vk_select.cpp   the selection ops;
//   vk_compact.cpp  compaction.
// Ops are recorded into one command buffer with a barrier between dependent commands; nothing
// is submitted until a download() (or a host fallback, which downloads) needs the results, or
// an internal buffer must grow, so a plan whose buffers live on the device runs without a host
// round trip between its ops. Host-memory inputs are copied into a staging arena that is reused
// after each submission.
#pragma once
#define VK_NO_PROTOTYPES
#include <vulkan/vulkan.h>

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "backend.hpp"
#include "shaders/push.h"
#include "tensor.hpp"
#include "vk_device.hpp"

namespace defkv {
namespace vkb {

// Pipelines, indexed by name in vk_backend.cpp (k_pipe_names). The f64-arithmetic selection
// shaders come in two builds (device float64, or integer code: "<name>_soft"); row counts exist
// only on devices with shaderFloat64 enabled (fp64_).
enum Pipe {
    P_LOGITS, P_ATTN_LOAD, P_SOFTMAX, P_COLREDUCE, P_ATTN_FINISH, P_PNORM, P_KEYNORM, P_COPYSEL,
    P_SEL_ROWFILL, P_SEL_BYTES, P_SEL_ELEM, P_SEL_MAXRED, P_SEL_KEYS, P_SEL_SORT, P_SEL_MARK, P_SEL_INDEX,
    P_FIRST_F64,
    P_SEL_POOL = P_FIRST_F64, P_SEL_CLAMP, P_SEL_NORMW, P_SEL_ADDMUL, P_SEL_MASSKEYS, P_SEL_MASS,
    P_SEL_ROWCOUNT, // float64 only
    P_COUNT,
    P_PNORM_CM // pnorm_coopmat.comp, created apart (pnorm_cm_) and only where usable
};

struct AttnJob; // one attention op's state (vk_scoring.cpp)
struct CopyJob; // one compaction's bindings (vk_compact.cpp)
struct RowMap;  // where each head's rows lie, paged or not (vk_compact.cpp)

// Internal scratch buffers (grown on demand; a grown buffer's predecessor is released after the
// next submission).
enum Slot { S_ROWS, S_STATS, S_KEYS, S_TMP, S_COUNT };

struct Buffer {
    VkBuffer buf = VK_NULL_HANDLE;
    VkDeviceMemory mem = VK_NULL_HANDLE;
    VkDeviceSize size = 0;
    char *map = nullptr;
};

// Where a tensor's element 0 lives: a buffer and a byte offset.
struct Src {
    VkBuffer buf = VK_NULL_HANDLE;
    VkDeviceSize byte_base = 0;
    int64_t esize = 4;
};

// One descriptor binding.
struct Bind {
    VkBuffer buf = VK_NULL_HANDLE;
    VkDeviceSize off = 0, range = 0;
};
using Binds = Bind[DEFKV_BINDINGS];

inline bool fits_u32(int64_t x) { return x >= 0 && x <= static_cast<int64_t>(UINT32_MAX); }
inline uint32_t u32(int64_t x) { return static_cast<uint32_t>(x); }

#define VK_TRY(expr)                          \
    do {                                      \
        defkv_status st_ = (expr);            \
        if (st_ != DEFKV_SUCCESS) return st_; \
    } while (0)

class VulkanBackend final : public Backend {
public:
    ~VulkanBackend() override { teardown(); }
    int32_t kind() const override { return DEFKV_BACKEND_VULKAN; }
    const char *name() const override { return "vulkan"; }
    defkv_status init(const defkv_context_options &opts, std::string *msg);
    std::string describe_pnorm(int32_t v_dtype, int32_t o_dtype, int64_t d) const;

    // ---- memory (vk_exec.cpp) ----
    int32_t memory() const override { return DEFKV_MEMORY_VULKAN_BUFFER; }
    bool accepts(int32_t m) const override { return m == DEFKV_MEMORY_HOST || m == DEFKV_MEMORY_VULKAN_BUFFER; }
    defkv_status alloc(int64_t bytes, Buf *out, std::string *msg) override;
    void release(Buf *b) override;
    defkv_status upload(const Buf &dst, const void *src, int64_t bytes, std::string *msg) override;
    defkv_status download(void *dst, const Buf &src, int64_t bytes, std::string *msg) override;
    defkv_status fill_bytes(const Buf &dst, uint8_t value, int64_t bytes, std::string *msg) override;
    defkv_status copy(const Buf &dst, const Buf &src, int64_t bytes, std::string *msg) override;

    // ---- scoring (vk_scoring.cpp) ----
    defkv_status attention(const SeqViews &in, const SeqShape &s, float scale, int32_t kernel, const Buf &masked,
                           const AttentionOut &out, std::string *msg) override;
    defkv_status projected_norm(const SeqViews &in, const SeqShape &s, int64_t n_tokens, const Buf &masked,
                                const Buf &out, std::string *msg) override;
    defkv_status key_norm(const SeqViews &in, const SeqShape &s, const Buf &out, std::string *msg) override;
    // Writes omega_rows and last_rows; omega_from_rows and last_row_mean run attn_finish's sums.
    bool attention_rows() const override { return true; }
    defkv_status omega_from_rows(const Buf &rows, int64_t n, const Buf &omega, std::string *msg) override;
    defkv_status last_row_mean(const Buf &x, int64_t rows, int64_t n, const Buf &out, std::string *msg) override;

    // ---- selection (vk_select.cpp) ----
    defkv_status pool_group(const Buf &mean_w, int64_t H, int64_t G, int64_t P, int32_t kernel, const Buf &score,
                            int64_t L, std::string *msg) override;
    defkv_status clamp_at_mean(const Buf &x, int64_t rows, int64_t n, int64_t ld, std::string *msg) override;
    defkv_status norm_weight(const Buf &m, const Buf &pn, int64_t Hk, int64_t P, const Buf &score, int64_t L,
                             std::string *msg) override;
    defkv_status mass_threshold(const Buf &avg, int64_t Hk, int64_t P, const Buf &omega, int32_t omega_index,
                                double threshold, int64_t cap, const Buf &bad, const Buf &tier, int64_t L,
                                std::string *msg) override;
    defkv_status top_rows(const Buf &score, const Buf &rank_tier, const Buf &bad, int64_t rows, int64_t L,
                          int64_t j_end, const Buf &counts, int64_t count, const Buf &flag, std::string *msg) override;
    defkv_status masked_max(const Buf &x, const Buf &bad, int64_t rows, int64_t n, int64_t ld, const Buf &out,
                            std::string *msg) override;
    defkv_status fill(const Buf &x, int64_t rows, int64_t L, int64_t j0, int64_t j1, float value, const Buf &value_buf,
                      std::string *msg) override;
    defkv_status broadcast_row(const Buf &src, int64_t n, const Buf &x, int64_t rows, int64_t L,
                               std::string *msg) override;
    defkv_status fill_uniform(const Buf &x, int64_t rows, int64_t L, uint64_t seed, std::string *msg) override;
    defkv_status set_tier(const Buf &tier, int64_t rows, int64_t L, int64_t j0, int64_t j1, const Buf &flag,
                          uint8_t value, std::string *msg) override;
    defkv_status mark_bad(const Buf &score, const Buf &tier, const Buf &bad, int64_t n, std::string *msg) override;
    defkv_status fill_must(const Buf &score, const Buf &tier, const Buf &value_buf, int64_t n,
                           std::string *msg) override;
    defkv_status add_mul(const Buf &out, const Buf &a, float eps, const Buf &b, int64_t n, std::string *msg) override;
    defkv_status max_where(const Buf &out, const Buf &src, const Buf &flag, int64_t n, std::string *msg) override;
    defkv_status row_counts(const Buf &flag, int64_t rows, int64_t L, double factor, const Buf &counts,
                            std::string *msg) override;
    defkv_status top_k(TopK mode, const Buf &score, const Buf &tier, int64_t rows, int64_t L, int64_t k,
                       const Buf &counts, const Buf &keep, std::string *msg) override;
    defkv_status write_selection(const Buf &keep, int64_t Hk, int64_t L, int64_t head0, const Buf &head_lens,
                                 const Buf &cu, const Buf &indices, std::string *msg) override;

    // ---- compaction (vk_compact.cpp) ----
    defkv_status compact_inplace(const View &t, int64_t Hk, int64_t L, int64_t d, const Buf &cu, const Buf &idx,
                                 int64_t head0, std::string *msg) override;
    defkv_status compact_varlen(const View &src, int64_t Hk, int64_t d, const Buf &cu, const Buf &idx, int64_t head0,
                                const View &dst, std::string *msg) override;
    defkv_status compact_heads(const View &src, const View &dst, int64_t Hk, int64_t d, const Buf &cu, const Buf &idx,
                               int64_t head0, std::string *msg) override;
    // Keys and values in page pools: the scoring ops read them in runs of linearly addressed
    // tokens, compaction through row-offset tables (copysel.comp).
    bool paged_views() const override { return true; }

    // For tests: whether the float64 selection shaders run on this device (else those ops use
    // the host fallback), and the number of submissions so far.
    bool has_fp64() const { return fp64_; }
    int64_t submissions() const { return total_submits_; }

private:
    // ---- vk_device.cpp ----
    void teardown();
    defkv_status open_caller_device(const defkv_context_options &o, std::string *msg);
    defkv_status open_own_device(const defkv_context_options &o, std::string *msg);
    defkv_status read_device_limits(std::string *msg);
    defkv_status create_layout(std::string *msg);
    defkv_status create_pipelines(std::string *msg);
    defkv_status create_pipeline(const char *shader, const VkSpecializationInfo *spec, VkPipeline *out,
                                 std::string *msg);
    defkv_status create_pnorm_cm(std::string *msg);
    defkv_status create_command_objects(std::string *msg);
    void print_info() const;
    Pipe pnorm_pipe(int32_t v_dtype, int32_t o_dtype, int64_t d, uint32_t *tokens) const;

    // ---- vk_exec.cpp ----
    defkv_status make_buffer(VkDeviceSize bytes, Buffer *b, std::string *msg);
    void free_buffer(Buffer *b);
    void retire(Buffer *b); // free now, or after the next submission when commands may use it
    defkv_status ensure(Slot s, int64_t bytes, std::string *msg);
    Src own(Slot s, int64_t esize) const { return Src{bufs_[s].buf, 0, esize}; }
    // Room in the staging arena for every host input of one op (submitting first when it is
    // full), so that staging one input never recycles the arena under another.
    defkv_status reserve_staging(std::initializer_list<int64_t> bytes, std::string *msg);
    static int64_t host_extent(const View &v);
    // Host bytes into the staging arena (submitting first when it is full).
    defkv_status stage(const void *data, int64_t bytes, Src *out, int64_t esize, std::string *msg);
    // A tensor's element 0 (a VkBuffer view in place, a host view staged).
    defkv_status tensor_src(const View &v, Src *out, std::string *msg);
    // b itself when it is a VkBuffer (or absent), else its `bytes` bytes staged.
    defkv_status device_copy(const Buf &b, int64_t bytes, Buf *out, std::string *msg);
    // A window over elements [e0, e0 + n) of src no larger than `limit` bytes (default: the
    // test-lowerable window size); *base gets the element offset inside it.
    defkv_status window(const Src &src, int64_t e0, int64_t n, Bind *b, uint32_t *base, std::string *msg,
                        int64_t limit = 0);
    // A whole buffer span as one binding of at most the device's maxStorageBufferRange; *base
    // gets the offset of b.offset inside it in units of `unit` bytes.
    defkv_status bind_span(const Buf &b, int64_t unit, Bind *out, uint32_t *base, std::string *msg);
    int64_t cap_elems(int64_t esize) const { return (max_range_ - static_cast<int64_t>(align_) - 8) / esize; }
    defkv_status dispatch(Pipe p, const Bind *binds, const void *pc, uint32_t pc_bytes, uint32_t gx, uint32_t gy,
                          uint32_t gz, std::string *msg);
    // Grid-stride dispatch sizes.
    uint32_t groups_for(int64_t n, int64_t per_group) const;
    defkv_status begin_command(std::string *msg);
    defkv_status submit_wait(std::string *msg);
    defkv_status byte_op(const vkpc::PcBytes &pc, const Buf &o, const Buf &f, const Buf &x, std::string *msg);
    bool is_own(VkBuffer b, char **map) const;
    // The end of an op that wrote `outs`: when one of them is the caller's memory (not a buffer
    // of alloc() or of this backend), everything recorded is submitted and waited for, so a
    // public call returns with the caller's buffers written (the C API's calls are synchronous
    // on Vulkan). Ops on the context's own buffers return without waiting.
    defkv_status settle(std::initializer_list<VkBuffer> outs, std::string *msg);
    static VkBuffer vkbuf(const Buf &b) { return reinterpret_cast<VkBuffer>(b.handle); }
    void trace(const char *op, const std::string &detail);
    defkv_status vk_fail(VkResult r, const char *what, std::string *msg) const;
    // Drops everything recorded but not submitted: an op that fails half-way fails the call,
    // and the next call must not run its commands.
    void abandon();
    struct OpScope { // abandons unless the op reached ok()
        VulkanBackend *b;
        bool done = false;
        ~OpScope() {
            if (!done) b->abandon();
        }
        defkv_status ok() {
            done = true;
            return DEFKV_SUCCESS;
        }
    };

    // ---- vk_scoring.cpp ----
    defkv_status attn_logits(const AttnJob &j, int64_t h, int64_t wb0, int64_t nb, std::string *msg);
    defkv_status attn_load(const AttnJob &j, int64_t h, int64_t wb0, int64_t nb, std::string *msg);
    defkv_status attn_reduce(const AttnJob &j, int64_t h, int64_t wb0, int64_t nb, std::string *msg);
    defkv_status attn_finish(const AttnJob &j, std::string *msg);

    // ---- vk_select.cpp ----
    bool on_device(std::initializer_list<const Buf *> bufs) const;
    defkv_status sort_keys(const Bind &keys, int64_t n, int64_t seg, std::string *msg);
    defkv_status rank_and_mark(vkpc::PcKeys pc, const Buf &score, const Buf &tier, const Buf &bad, const Buf &counts,
                               const Buf &out, std::string *msg);

    // ---- vk_compact.cpp ----
    defkv_status compact_prepare(const View &t, int64_t Hk, int64_t d, const Buf &cu, const Buf &idx, int64_t head0,
                                 CopyJob *j, std::string *msg);
    defkv_status compact_device_inplace(const View &t, int64_t Hk, int64_t d, const Buf &cu, const Buf &idx,
                                        int64_t head0, std::string *msg);
    defkv_status compact_device_varlen(const View &t, int64_t Hk, int64_t d, const Buf &cu, const Buf &idx,
                                       int64_t head0, const View &dst, std::string *msg);
    defkv_status compact_device_heads(const View &src, const View &dst, int64_t Hk, int64_t d, const Buf &cu,
                                      const Buf &idx, int64_t head0, std::string *msg);
    defkv_status bind_rows(const CopyJob &j, const Src &s, const RowMap &m, int64_t k, Bind *b, uint32_t *base,
                           uint32_t *tab_at, std::string *msg);
    defkv_status host_cu(const Buf &cu, int64_t head0, int64_t Hk, std::vector<int32_t> *hcu, std::string *msg);
    // The most bytes of a tensor one window of `limit` bytes holds, whatever its alignment.
    int64_t window_bytes(int64_t limit) const { return limit - static_cast<int64_t>(align_) - 3; }
    defkv_status host_selection(const Buf &cu, const Buf &idx, int64_t head0, int64_t Hk, std::vector<int32_t> *hcu,
                                std::vector<int32_t> *hidx, int64_t *idx0, std::string *msg);

    Device dv_;
    InstanceFns &fi_ = dv_.fi;
    DeviceFns &fd_ = dv_.fd;
    VkDevice &dev_ = dv_.dev;
    VkPhysicalDeviceProperties &props_ = dv_.props;
    int64_t max_range_ = 0; // binding window (DEFKV_VULKAN_MAX_RANGE may lower it)
    VkDeviceSize align_ = 4;
    uint32_t sq_floats_ = 0, sv_floats_ = 0;
    bool fp64_ = false;
    bool trace_ = false;
    int64_t n_dispatch_ = 0, n_submit_ = 0, total_submits_ = 0;

    VkPipeline pnorm_cm_ = VK_NULL_HANDLE;
    uint32_t cm_nsg_ = 4, cm_nb_ = 64, cm_dmax_ = 0;
    std::string pnorm_why_;

    VkDescriptorSetLayout dsl_ = VK_NULL_HANDLE;
    VkPipelineLayout layout_ = VK_NULL_HANDLE;
    VkPipeline pipes_[P_COUNT] = {};
    std::vector<VkDescriptorPool> pools_;
    size_t pool_at_ = 0;
    uint32_t sets_used_ = 0;
    VkCommandPool cmdpool_ = VK_NULL_HANDLE;
    VkCommandBuffer cmd_ = VK_NULL_HANDLE;
    bool recording_ = false, need_barrier_ = false;
    VkFence fence_ = VK_NULL_HANDLE;
    Buffer dummy_;
    Buffer bufs_[S_COUNT];
    Buffer staging_;
    int64_t staged_ = 0;
    std::vector<Buffer> retired_;
    std::unordered_map<VkBuffer, Buffer> owned_; // alloc()'s buffers
};

} // namespace vkb
} // namespace defkv
