// The thread pool's failure containment: an exception thrown by a job item on a worker thread
// must not escape that thread (std::terminate) but reach the caller of parallel_for, after
// every thread has left the job; the pool stays usable. (The C API turns a std::bad_alloc
// from a job into DEFKV_ERROR_OUT_OF_MEMORY.)
#include <csetjmp>
#include <cstdarg>
#include <cstddef>
#include <cstdint>
extern "C" {
#include <cmocka.h>
}
#include <atomic>
#include <chrono>
#include <new>
#include <stdexcept>
#include <thread>
#include <vector>

#include "thread_pool.hpp"

using defkv::ThreadPool;

static int g_checks = 0;

static void test_worker_exception_reaches_caller(void **) {
    ThreadPool pool(4);
    const std::thread::id caller = std::this_thread::get_id();
    int from_worker = 0;
    for (int rep = 0; rep < 300 && from_worker < 20; rep++) {
        std::atomic<int> done{0};
        bool caught = false;
        try {
            pool.parallel_for(64, [&](int64_t i) {
                // items take a while, so the workers (woken after the caller starts) get some
                std::this_thread::sleep_for(std::chrono::microseconds(50));
                if (std::this_thread::get_id() != caller && i % 7 == 3) throw std::bad_alloc();
                done++;
            });
        } catch (const std::bad_alloc &) {
            caught = true;
            from_worker++;
        }
        // either no worker ran an item that throws (all on the caller), or the caller got it
        if (!caught) assert_int_equal(done.load(), 64);
        // the pool still works
        std::atomic<int64_t> sum{0};
        pool.parallel_for(100, [&](int64_t i) { sum += i; });
        assert_int_equal(sum.load(), 4950);
        g_checks++;
    }
    assert_true(from_worker > 0);
}

static void test_caller_exception_waits_for_workers(void **) {
    ThreadPool pool(3);
    for (int rep = 0; rep < 200; rep++) {
        std::vector<int> touched(256, 0); // must outlive every worker's use: parallel_for waits
        bool caught = false;
        try {
            pool.parallel_for(256, [&](int64_t i) {
                touched[static_cast<size_t>(i)] = 1;
                if (i == 0 || i == 100) throw std::runtime_error("item failed");
            });
        } catch (const std::runtime_error &) {
            caught = true;
        }
        assert_true(caught);
        g_checks++;
    }
}

static void test_checks_ran(void **) { assert_true(g_checks >= 200); }

int main() {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_worker_exception_reaches_caller),
        cmocka_unit_test(test_caller_exception_waits_for_workers),
        cmocka_unit_test(test_checks_ran),
    };
    return cmocka_run_group_tests(tests, nullptr, nullptr);
}
