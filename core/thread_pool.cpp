#include "thread_pool.hpp"

namespace defkv {

ThreadPool::ThreadPool(int32_t n_threads) : n_threads_(n_threads < 1 ? 1 : n_threads) {
    try {
        threads_.reserve(static_cast<size_t>(n_threads_ - 1));
        for (int32_t i = 1; i < n_threads_; i++) threads_.emplace_back([this] { worker(); });
    } catch (...) {
        // std::system_error (no thread could be created) or std::bad_alloc: stop and join what
        // started, so neither this constructor nor the destructor of threads_ terminates.
        shutdown();
        threads_.clear();
        ok_ = false;
    }
}

ThreadPool::~ThreadPool() { shutdown(); }

void ThreadPool::shutdown() {
    {
        std::lock_guard<std::mutex> lk(mu_);
        stop_ = true;
    }
    cv_.notify_all();
    for (auto &t : threads_)
        if (t.joinable()) t.join();
}

void ThreadPool::run_items(const FnRef &job, int64_t n) {
    for (int64_t i; (i = next_.fetch_add(1)) < n;) {
        try {
            job(i);
        } catch (...) {
            next_.store(n); // claim nothing more
            std::lock_guard<std::mutex> lk(mu_);
            if (!error_) error_ = std::current_exception(); // refers to the thrown object: no allocation
        }
    }
}

void ThreadPool::worker() {
    uint64_t seen = 0;
    for (;;) {
        const FnRef *job;
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
        run_items(*job, n);
        {
            std::lock_guard<std::mutex> lk(mu_);
            if (--active_ == 0) done_cv_.notify_all();
        }
    }
}

void ThreadPool::parallel_for(int64_t n, FnRef fn) {
    if (n <= 0) return;
    if (threads_.empty() || n == 1) {
        for (int64_t i = 0; i < n; i++) fn(i);
        return;
    }
    {
        std::lock_guard<std::mutex> lk(mu_);
        job_ = &fn;
        n_ = n;
        next_.store(0);
        error_ = nullptr;
        generation_++;
    }
    cv_.notify_all();
    run_items(fn, n);
    std::exception_ptr err;
    {
        std::unique_lock<std::mutex> lk(mu_);
        // Wait until every worker that picked up this generation has left the loop: only then
        // may fn (and what it references) go away, also when an item threw.
        done_cv_.wait(lk, [&] { return active_ == 0; });
        job_ = nullptr;
        n_ = 0;
        err = std::move(error_);
        error_ = nullptr;
    }
    if (err) std::rethrow_exception(err);
}

} // namespace defkv
