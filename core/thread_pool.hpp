// A small fixed pool: parallel_for(n, fn) runs fn(i) for i in [0, n) on the pool's threads
// and the caller's, and returns when all are done. Work items are claimed dynamically, so
// callers must make each item's result independent of which thread runs it.
//
// Failure containment (no exception may leave a worker thread, which would call
// std::terminate): an exception thrown by fn on any thread stops the claiming of further
// items, is held until every thread has left the job, and is rethrown in the calling thread
// (the first one, if several threads throw). parallel_for itself never allocates: the job is
// passed by reference (FnRef), not copied into a std::function.
//
// A worker that cannot be started (std::thread throwing std::system_error under RLIMIT_NPROC
// or RLIMIT_AS, or std::bad_alloc) does not throw from the constructor: the threads already
// started are stopped and joined, and ok() is false. The owner reports the failure.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

namespace defkv {

// A non-owning reference to a callable void(int64_t): no allocation, valid while the
// callable lives (parallel_for returns before its argument dies).
class FnRef {
public:
    template <class F, class = std::enable_if_t<!std::is_same<std::decay_t<F>, FnRef>::value>>
    FnRef(F &&f) // NOLINT(google-explicit-constructor): lambdas convert implicitly
        : obj_(const_cast<void *>(static_cast<const void *>(&f))),
          call_([](void *o, int64_t i) { (*static_cast<std::remove_reference_t<F> *>(o))(i); }) {}
    void operator()(int64_t i) const { call_(obj_, i); }

private:
    void *obj_;
    void (*call_)(void *, int64_t);
};

class ThreadPool {
public:
    explicit ThreadPool(int32_t n_threads);
    ~ThreadPool();
    ThreadPool(const ThreadPool &) = delete;
    ThreadPool &operator=(const ThreadPool &) = delete;
    int32_t size() const { return n_threads_; }
    // False when a worker thread could not be started (the pool then has no workers).
    bool ok() const { return ok_; }
    void parallel_for(int64_t n, FnRef fn);

private:
    void worker();
    void run_items(const FnRef &job, int64_t n);
    void shutdown();
    int32_t n_threads_;
    bool ok_ = true;
    std::vector<std::thread> threads_;
    std::mutex mu_;
    std::condition_variable cv_, done_cv_;
    const FnRef *job_ = nullptr;
    int64_t n_ = 0;
    std::atomic<int64_t> next_{0};
    int32_t active_ = 0;
    uint64_t generation_ = 0;
    bool stop_ = false;
    std::exception_ptr error_; // the first exception of the current job (guarded by mu_)
};

} // namespace defkv
