#include "error.hpp"

#include <cstdarg>
#include <cstdio>
#include <cstring>

namespace defkv {

std::string fmt(const char *f, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, f);
    std::vsnprintf(buf, sizeof buf, f, ap);
    va_end(ap);
    return buf;
}

defkv_status with_prefix(defkv_status st, std::string *msg, const char *prefix) {
    // Messages that already name the function (resolve_layer's) keep a single prefix.
    if (st != DEFKV_SUCCESS && msg->compare(0, std::strlen(prefix), prefix) != 0)
        *msg = std::string(prefix) + ": " + *msg;
    return st;
}

} // namespace defkv
