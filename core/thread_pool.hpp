// A small fixed pool: parallel_for(n, fn) runs fn(i) for i in [0, n) on the pool's threads
// and the caller's, and returns when all are done. Work items are claimed dynamically, so
// callers must make each item's result independent of which thread runs it.
#pragma once
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>
#include <atomic>

namespace defkv {

class ThreadPool {
public:
    explicit ThreadPool(int32_t n_threads);
    ~ThreadPool();
    ThreadPool(const ThreadPool &) = delete;
    ThreadPool &operator=(const ThreadPool &) = delete;
    int32_t size() const { return n_threads_; }
    void parallel_for(int64_t n, const std::function<void(int64_t)> &fn);

private:
    void worker();
    int32_t n_threads_;
    std::vector<std::thread> threads_;
    std::mutex mu_;
    std::condition_variable cv_, done_cv_;
    const std::function<void(int64_t)> *job_ = nullptr;
    int64_t n_ = 0;
    std::atomic<int64_t> next_{0};
    int32_t active_ = 0;
    uint64_t generation_ = 0;
    bool stop_ = false;
};

} // namespace defkv
