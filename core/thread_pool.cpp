#include "thread_pool.hpp"

namespace defkv {

ThreadPool::ThreadPool(int32_t n_threads) : n_threads_(n_threads < 1 ? 1 : n_threads) {
    for (int32_t i = 1; i < n_threads_; i++) threads_.emplace_back([this] { worker(); });
}

ThreadPool::~ThreadPool() {
    {
        std::lock_guard<std::mutex> lk(mu_);
        stop_ = true;
    }
    cv_.notify_all();
    for (auto &t : threads_) t.join();
}

void ThreadPool::worker() {
    uint64_t seen = 0;
    for (;;) {
        const std::function<void(int64_t)> *job;
        int64_t n;
        {
            std::unique_lock<std::mutex> lk(mu_);
            cv_.wait(lk, [&] { return stop_ || generation_ != seen; });
            if (stop_) return;
            seen = generation_;
            // The generation we woke for may already be finished (parallel_for returned and
            // cleared the job): then there is nothing to claim, and touching next_ would
            // steal an index from the next generation.
            if (!job_) continue;
            job = job_;
            n = n_;
            active_++;
        }
        for (int64_t i; (i = next_.fetch_add(1)) < n;) (*job)(i);
        {
            std::lock_guard<std::mutex> lk(mu_);
            if (--active_ == 0) done_cv_.notify_all();
        }
    }
}

void ThreadPool::parallel_for(int64_t n, const std::function<void(int64_t)> &fn) {
    if (n <= 0) return;
    if (n_threads_ == 1 || n == 1) {
        for (int64_t i = 0; i < n; i++) fn(i);
        return;
    }
    {
        std::lock_guard<std::mutex> lk(mu_);
        job_ = &fn;
        n_ = n;
        next_.store(0);
        generation_++;
    }
    cv_.notify_all();
    for (int64_t i; (i = next_.fetch_add(1)) < n;) fn(i);
    std::unique_lock<std::mutex> lk(mu_);
    // Wait until every worker that picked up this generation has left the loop.
    done_cv_.wait(lk, [&] { return active_ == 0; });
    job_ = nullptr;
    n_ = 0;
}

} // namespace defkv
