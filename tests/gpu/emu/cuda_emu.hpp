// A small CPU emulation of the CUDA features the defkv kernels use, so that the kernels can be
// executed (slowly) on a machine without a GPU: one user-space fiber per CUDA thread of a block,
// blocks one after another, __syncthreads and warp shuffles are barriers, shared memory is a
// per-launch static, WMMA fragments hold whole 16x16 tiles per lane with the documented
// row/column-major load semantics. It checks indexing and synchronisation logic, not timing,
// not memory-model corner cases and not the real tensor-core instruction behaviour.
// Test-only: never part of the library.
#pragma once
#include <math.h>
#include <stdint.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <memory>
#include <thread>
#include <sys/mman.h>
#include <ucontext.h>
#include <tuple>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static

// ---- types ----------------------------------------------------------------------------------

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
    dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct uint4 {
    unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return uint4{a, b, c, d}; }

struct __half {
    uint16_t bits;
};
struct __nv_bfloat16 {
    uint16_t bits;
};
inline float __half2float(__half h) {
    const uint32_t s = (h.bits >> 15) & 1, e = (h.bits >> 10) & 31, m = h.bits & 1023;
    float f;
    if (e == 0) f = std::ldexp(static_cast<float>(m), -24);
    else if (e == 31) f = m ? NAN : INFINITY;
    else f = std::ldexp(static_cast<float>(m | 1024), static_cast<int>(e) - 25);
    return s ? -f : f;
}
inline __half __float2half(float f) { // round to nearest even through double arithmetic
    __half r{0};
    if (std::isnan(f)) { r.bits = 0x7e00; return r; }
    const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
    double a = std::fabs(static_cast<double>(f));
    if (a == 0.0) { r.bits = sign; return r; }
    if (a >= 65520.0) { r.bits = sign | 0x7c00; return r; }
    int e;
    std::frexp(a, &e); // a = m * 2^e, m in [0.5, 1)
    int exp16 = e - 1 + 15;
    if (exp16 <= 0) { // subnormal: units of 2^-24
        const double q = std::nearbyint(a * 16777216.0);
        r.bits = sign | static_cast<uint16_t>(q);
        return r;
    }
    double q = std::nearbyint(std::ldexp(a, 10 - (e - 1))); // 1024..2048
    if (q >= 2048.0) { q /= 2; exp16++; }
    if (exp16 >= 31) { r.bits = sign | 0x7c00; return r; }
    r.bits = sign | static_cast<uint16_t>(exp16 << 10) | static_cast<uint16_t>(static_cast<int>(q) - 1024);
    return r;
}
inline float __bfloat162float(__nv_bfloat16 b) {
    const uint32_t u = static_cast<uint32_t>(b.bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline __nv_bfloat16 __float2bfloat16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    __nv_bfloat16 r;
    if ((u & 0x7fffffffu) > 0x7f800000u) { r.bits = static_cast<uint16_t>((u >> 16) | 0x40u); return r; }
    r.bits = static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    return r;
}

// ---- runtime --------------------------------------------------------------------------------

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorMemoryAllocation = 2 };
enum cudaMemcpyKind { cudaMemcpyHostToHost, cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice };
enum cudaMemoryType { cudaMemoryTypeUnregistered = 0, cudaMemoryTypeHost, cudaMemoryTypeDevice, cudaMemoryTypeManaged };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
typedef void *cudaStream_t;
#define cudaStreamNonBlocking 1
#define cudaStreamDefault 0
struct cudaDeviceProp {
    char name[256];
    int major, minor, multiProcessorCount;
};
struct cudaPointerAttributes {
    cudaMemoryType type;
    int device;
    void *devicePointer, *hostPointer;
};

namespace emu {
inline std::mutex &alloc_mu() { static std::mutex m; return m; }
inline std::map<uintptr_t, size_t> &allocs() { static std::map<uintptr_t, size_t> a; return a; }
} // namespace emu

inline const char *cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulated error"; }
inline const char *cudaGetErrorName(cudaError_t e) { return e == cudaSuccess ? "cudaSuccess" : "cudaErrorEmulated"; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaGetDeviceCount(int *n) { *n = 1; return cudaSuccess; }
inline cudaError_t cudaSetDevice(int) { return cudaSuccess; }
inline cudaError_t cudaGetDevice(int *d) { *d = 0; return cudaSuccess; }
enum cudaDeviceAttr { cudaDevAttrComputeCapabilityMajor = 75, cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
inline cudaError_t cudaDeviceGetAttribute(int *v, cudaDeviceAttr a, int) { // H100/H200
    *v = a == cudaDevAttrComputeCapabilityMajor ? 9 : 227 * 1024;
    return cudaSuccess;
}
inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp *p, int) {
    std::snprintf(p->name, sizeof p->name, "defkv CPU emulation");
    p->major = 9;
    p->minor = 0;
    p->multiProcessorCount = 1;
    return cudaSuccess;
}
// Device memory is mapped on its own pages, ends (rounded to 256 bytes) right before an
// inaccessible guard page and is never reused: cudaFree makes it inaccessible too (pages
// released). A kernel or copy that runs past an allocation or touches freed device memory
// faults at once instead of corrupting host memory.
namespace emu {
inline size_t map_bytes(size_t n) { return (n + 255) / 256 * 256 / 4096 * 4096 + 2 * 4096; }
inline char *map_base(void *p, size_t n) {
    const size_t r = (n + 255) / 256 * 256;
    return static_cast<char *>(p) + r - (map_bytes(n) - 4096);
}
// Tests of out-of-device-memory paths: every cudaMalloc of more than this many bytes fails.
inline std::atomic<size_t> &fail_above() {
    static std::atomic<size_t> v{~size_t{0}};
    return v;
}
} // namespace emu
inline cudaError_t cudaMalloc(void **p, size_t n) {
    if (n > emu::fail_above().load()) return cudaErrorMemoryAllocation;
    const size_t bytes = emu::map_bytes(n), r = (n + 255) / 256 * 256;
    void *m = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return cudaErrorMemoryAllocation;
    mprotect(static_cast<char *>(m) + bytes - 4096, 4096, PROT_NONE);
    *p = static_cast<char *>(m) + (bytes - 4096 - r);
    std::memset(*p, 0xCD, n); // device memory starts as garbage
    std::lock_guard<std::mutex> g(emu::alloc_mu());
    emu::allocs()[reinterpret_cast<uintptr_t>(*p)] = n;
    return cudaSuccess;
}
inline cudaError_t cudaFree(void *p) {
    if (!p) return cudaSuccess;
    {
        std::lock_guard<std::mutex> g(emu::alloc_mu());
        auto it = emu::allocs().find(reinterpret_cast<uintptr_t>(p));
        if (it == emu::allocs().end()) return cudaErrorInvalidValue;
        char *base = emu::map_base(p, it->second);
        const size_t bytes = emu::map_bytes(it->second);
        emu::allocs().erase(it);
        madvise(base, bytes, MADV_DONTNEED);
        mprotect(base, bytes, PROT_NONE);
    }
    return cudaSuccess;
}
inline cudaError_t cudaPointerGetAttributes(cudaPointerAttributes *a, const void *p) {
    std::lock_guard<std::mutex> g(emu::alloc_mu());
    const uintptr_t u = reinterpret_cast<uintptr_t>(p);
    auto it = emu::allocs().upper_bound(u);
    a->type = cudaMemoryTypeUnregistered;
    a->device = -1;
    if (it != emu::allocs().begin()) {
        --it;
        if (u < it->first + it->second) {
            a->type = cudaMemoryTypeDevice;
            a->device = 0;
        }
    }
    return cudaSuccess;
}
inline cudaError_t cudaMemcpy(void *d, const void *s, size_t n, cudaMemcpyKind) { std::memmove(d, s, n); return cudaSuccess; }
inline cudaError_t cudaMemcpyAsync(void *d, const void *s, size_t n, cudaMemcpyKind k, cudaStream_t = nullptr) {
    return cudaMemcpy(d, s, n, k);
}
inline cudaError_t cudaMemsetAsync(void *d, int v, size_t n, cudaStream_t = nullptr) { std::memset(d, v, n); return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned) { *s = reinterpret_cast<void *>(1); return cudaSuccess; }
inline cudaError_t cudaStreamDestroy(cudaStream_t) { return cudaSuccess; }
template <typename F> cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) { return cudaSuccess; }

// ---- execution --------------------------------------------------------------------------------
// Each CUDA thread of a block is a user-space fiber (ucontext) on the calling OS thread. A fiber
// runs until it reaches a barrier: __syncthreads (released when every live thread of the block
// waits there) or a warp barrier (warp shuffles, WMMA stores: released when every live lane of
// the warp waits there). No runnable fiber and nothing to release is a deadlock (a divergent
// barrier): the emulation aborts with a message. Deterministic, blocks one after another.

namespace emu {

constexpr int kXchWords = 16;
struct Block {
    dim3 grid, block, cur;
    int nthreads = 0;
    std::vector<uint64_t> shfl;
    std::vector<uint32_t> xch; // kXchWords words per thread: warp-wide register exchanges (mma, ldmatrix)
    std::vector<unsigned char> dyn;
    unsigned char *dyn_aligned = nullptr; // 256-byte aligned start of dynamic shared memory
    std::vector<ucontext_t> ctx;
    std::vector<char> done;
    std::vector<char> state; // 0 runnable, 1 at __syncthreads, 2 at a warp barrier
    ucontext_t main;
    int tid = 0; // the fiber running now
    void (*entry)(Block *) = nullptr;
    void *launch = nullptr;
};
inline Block *&current() { static thread_local Block *b = nullptr; return b; }
inline unsigned char *dynamic_smem() { return current()->dyn_aligned; }
inline void wait_at(char what) { // 1: block barrier, 2: warp barrier
    Block *b = current();
    b->state[static_cast<size_t>(b->tid)] = what;
    swapcontext(&b->ctx[static_cast<size_t>(b->tid)], &b->main);
}
inline void yield() { wait_at(2); }

template <typename T> T shfl_xor(T v, int mask) {
    static_assert(sizeof(T) <= 8, "shuffle of a value wider than 8 bytes");
    Block *b = current();
    const int tid = b->tid, w = tid / 32;
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    b->shfl[static_cast<size_t>(tid)] = bits;
    yield(); // every lane of the warp has written
    const uint64_t o = b->shfl[static_cast<size_t>(w * 32 + ((tid % 32) ^ mask))];
    yield(); // every lane has read before any lane writes again
    T r;
    std::memcpy(&r, &o, sizeof(T));
    return r;
}

// A warp-wide exchange of up to kXchWords 32-bit words per lane: every lane publishes `n` words,
// waits until the whole warp has, then `read(lane, i)` returns word i of warp lane `lane`; a
// second warp barrier keeps any lane from publishing again before every lane has read. What the
// warp-collective instructions (mma.sync, ldmatrix) need to move operands between lanes.
inline int lane_id() { return current()->tid % 32; }
template <typename F> void warp_exchange(const uint32_t *mine, int n, F &&use) {
    Block *b = current();
    const int tid = b->tid, w = tid / 32;
    if (n > kXchWords) { std::fprintf(stderr, "emu: warp_exchange of %d words\n", n); std::abort(); }
    std::memcpy(&b->xch[static_cast<size_t>(tid) * kXchWords], mine, sizeof(uint32_t) * static_cast<size_t>(n));
    yield();
    const uint32_t *base = &b->xch[static_cast<size_t>(w) * 32 * kXchWords];
    use([base](int lane, int i) { return base[lane * kXchWords + i]; });
    yield();
}

template <typename... P> struct Launch {
    void (*k)(P...);
    dim3 grid, block;
    size_t smem;
    std::tuple<typename std::decay<P>::type...> *params = nullptr;

    static void fiber_entry_(unsigned hi, unsigned lo) {
        Block *b = reinterpret_cast<Block *>((static_cast<uintptr_t>(hi) << 32) | lo);
        auto *self = static_cast<Launch *>(b->launch);
        std::apply(self->k, *self->params);
        b->done[static_cast<size_t>(b->tid)] = 1;
        // returning resumes uc_link (the scheduler)
    }
    template <typename... A> void operator()(A &&...args) {
        std::tuple<typename std::decay<P>::type...> prm(static_cast<P>(args)...);
        params = &prm;
        Block b;
        b.grid = grid;
        b.block = block;
        b.nthreads = static_cast<int>(block.x * block.y * block.z);
        if (b.nthreads % 32 != 0 || b.nthreads > 1024) {
            std::fprintf(stderr, "emu: block size %d is not a multiple of 32 up to 1024\n", b.nthreads);
            std::abort();
        }
        b.shfl.assign(static_cast<size_t>(b.nthreads), 0);
        b.xch.assign(static_cast<size_t>(b.nthreads) * kXchWords, 0);
        b.dyn.assign(smem + 512, 0xAB);
        b.dyn_aligned = b.dyn.data() + (256 - reinterpret_cast<uintptr_t>(b.dyn.data()) % 256) % 256;
        b.ctx.resize(static_cast<size_t>(b.nthreads));
        b.done.assign(static_cast<size_t>(b.nthreads), 0);
        b.state.assign(static_cast<size_t>(b.nthreads), 0);
        b.launch = this;
        const size_t stack = 128 * 1024;
        static thread_local std::vector<char> stacks; // reused by every launch (grows only)
        if (stacks.size() < stack * static_cast<size_t>(b.nthreads)) stacks.resize(stack * static_cast<size_t>(b.nthreads));
        Block *saved = current();
        current() = &b;
        const uintptr_t bp = reinterpret_cast<uintptr_t>(&b);
        for (unsigned bz = 0; bz < grid.z; bz++)
            for (unsigned by = 0; by < grid.y; by++)
                for (unsigned bx = 0; bx < grid.x; bx++) {
                    b.cur = dim3(bx, by, bz);
                    for (int t = 0; t < b.nthreads; t++) {
                        ucontext_t &c = b.ctx[static_cast<size_t>(t)];
                        getcontext(&c);
                        c.uc_stack.ss_sp = &stacks[stack * static_cast<size_t>(t)];
                        c.uc_stack.ss_size = stack;
                        c.uc_link = &b.main;
                        makecontext(&c, reinterpret_cast<void (*)()>(&Launch::fiber_entry_), 2,
                                    static_cast<unsigned>(bp >> 32), static_cast<unsigned>(bp & 0xffffffffu));
                        b.done[static_cast<size_t>(t)] = 0;
                    }
                    std::fill(b.state.begin(), b.state.end(), 0);
                    for (;;) {
                        bool ran = false;
                        for (int t = 0; t < b.nthreads; t++) {
                            if (b.done[static_cast<size_t>(t)] || b.state[static_cast<size_t>(t)] != 0) continue;
                            b.tid = t;
                            ran = true;
                            swapcontext(&b.main, &b.ctx[static_cast<size_t>(t)]);
                        }
                        // release warps whose live lanes all wait at a warp barrier
                        bool released = false, any_live = false, all_block = true;
                        for (int w = 0; w < b.nthreads / 32; w++) {
                            bool all = true, some = false;
                            for (int l = w * 32; l < w * 32 + 32; l++) {
                                if (b.done[static_cast<size_t>(l)]) continue;
                                some = true;
                                if (b.state[static_cast<size_t>(l)] != 2) all = false;
                            }
                            if (some && all) {
                                for (int l = w * 32; l < w * 32 + 32; l++) b.state[static_cast<size_t>(l)] = 0;
                                released = true;
                            }
                        }
                        for (int t = 0; t < b.nthreads; t++) {
                            if (b.done[static_cast<size_t>(t)]) continue;
                            any_live = true;
                            if (b.state[static_cast<size_t>(t)] != 1) all_block = false;
                        }
                        if (!any_live) break;
                        if (all_block) {
                            std::fill(b.state.begin(), b.state.end(), 0);
                            released = true;
                        }
                        if (!ran && !released) {
                            std::fprintf(stderr, "emu: deadlock in block (%u, %u, %u): threads wait at different "
                                                 "barriers (divergent __syncthreads or shuffle)\n", bx, by, bz);
                            std::abort();
                        }
                    }
                }
        current() = saved;
    }
};
template <typename... P> Launch<P...> make_launch(void (*k)(P...), dim3 g, dim3 b, size_t smem = 0, cudaStream_t = nullptr) {
    return Launch<P...>{k, g, b, smem};
}

inline dim3 thread_index() {
    const Block *b = current();
    const unsigned t = static_cast<unsigned>(b->tid);
    return dim3(t % b->block.x, (t / b->block.x) % b->block.y, t / (b->block.x * b->block.y));
}

} // namespace emu

#define threadIdx (::emu::thread_index())
#define blockIdx (::emu::current()->cur)
#define blockDim (::emu::current()->block)
#define gridDim (::emu::current()->grid)
inline void __syncthreads() { ::emu::wait_at(1); }
// Fibers switch only at barriers, so a read-modify-write is atomic here.
template <typename T> T atomicAdd(T *p, T v) {
    const T old = *p;
    *p = old + v;
    return old;
}
template <typename T> T __shfl_xor_sync(unsigned, T v, int mask) { return ::emu::shfl_xor(v, mask); }
inline void __syncwarp_emu() { ::emu::yield(); }
inline bool emu_lane0() { return ::emu::current()->tid % 32 == 0; }

// ---- WMMA ----------------------------------------------------------------------------------------

namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
inline float to_f(float x) { return x; }
inline float to_f(__half x) { return __half2float(x); }
inline float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
// A fragment holds the whole tile (x[r][c]); only lane 0 of the warp computes with it and stores
// it (the real hardware spreads it over the lanes; the results are the same).
template <typename Use, int M, int N, int K, typename T, typename Layout = void> struct fragment {
    float x[16][16];
};
template <typename Use, int M, int N, int K, typename T, typename L>
void fill_fragment(fragment<Use, M, N, K, T, L> &f, float v) {
    for (auto &r : f.x) for (float &e : r) e = v;
}
// row_major: element (r, c) at p[r*ld + c]; col_major: at p[c*ld + r].
template <typename Use, int M, int N, int K, typename T, typename L, typename E>
void load_matrix_sync(fragment<Use, M, N, K, T, L> &f, const E *p, unsigned ld) {
    const bool col = std::is_same<L, col_major>::value;
    if ((reinterpret_cast<uintptr_t>(p) & 31) != 0 || ld % 8 != 0) {
        std::fprintf(stderr, "emu: wmma::load_matrix_sync: pointer not 32-byte aligned or ld %% 8 != 0\n");
        std::abort();
    }
    if (!emu_lane0()) return; // only lane 0's copy is ever stored (store_matrix_sync)
    for (int r = 0; r < 16; r++)
        for (int c = 0; c < 16; c++) f.x[r][c] = to_f(col ? p[c * ld + r] : p[r * ld + c]);
}
template <typename TA, typename TB, typename LA, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float> &d, const fragment<matrix_a, 16, 16, 16, TA, LA> &a,
              const fragment<matrix_b, 16, 16, 16, TB, LB> &b, const fragment<accumulator, 16, 16, 16, float> &c) {
    if (!emu_lane0()) return;
    float out[16][16];
    for (int r = 0; r < 16; r++)
        for (int n = 0; n < 16; n++) {
            float s = c.x[r][n];
            for (int k = 0; k < 16; k++) s += a.x[r][k] * b.x[k][n];
            out[r][n] = s;
        }
    std::memcpy(d.x, out, sizeof out);
}
inline void store_matrix_sync(float *p, const fragment<accumulator, 16, 16, 16, float> &f, unsigned ld, layout_t l) {
    if ((reinterpret_cast<uintptr_t>(p) & 31) != 0 || ld % 4 != 0) {
        std::fprintf(stderr, "emu: wmma::store_matrix_sync: pointer not 32-byte aligned or ld %% 4 != 0\n");
        std::abort();
    }
    if (emu_lane0())
        for (int r = 0; r < 16; r++)
            for (int c = 0; c < 16; c++) (l == mem_row_major ? p[r * ld + c] : p[c * ld + r]) = f.x[r][c];
    __syncwarp_emu();
}
} // namespace wmma
} // namespace nvcuda
