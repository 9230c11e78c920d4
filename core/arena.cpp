#include "context.hpp"
#include "error.hpp"

namespace defkv {

namespace {
constexpr int64_t kAlign = 256;
int64_t round_up(int64_t n) { return (n + kAlign - 1) / kAlign * kAlign; }
} // namespace

defkv_status Arena::commit(std::string *msg) {
    const int64_t need = used_;
    dry_ = false;
    used_ = 0;
    if (need <= buf_.bytes) return DEFKV_SUCCESS;
    Buf grown;
    DEFKV_FORWARD(be_->alloc(need, &grown, msg));
    be_->release(&buf_);
    buf_ = grown;
    return DEFKV_SUCCESS;
}

Buf Arena::take(int64_t bytes) {
    const int64_t at = used_;
    used_ += round_up(bytes > 0 ? bytes : 1);
    if (dry_) return Buf{};
    return buf_.at(at, bytes);
}

} // namespace defkv
