// See file_output.hpp.
#include "file_output.hpp"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

namespace defkv_st {
namespace {

bool fail(std::string* err, const std::string& msg) {
    if (err) *err = msg;
    return false;
}

std::string reason(int e) { return std::string("(") + std::strerror(e) + ")"; }

// ---- the temporary file a signal handler may have to remove --------------------------------
// The handler reads only these two objects and calls only unlink, sigaction and raise, all
// async-signal-safe. The path is published before the file is created (a signal in between
// finds nothing to unlink) and withdrawn after it has been renamed or removed.
constexpr size_t kMaxTempPath = 4096;
char g_temp_path[kMaxTempPath];
std::atomic<int> g_temp_state{0};  // 0 none, 1 being published, 2 published
static_assert(std::atomic<int>::is_always_lock_free, "the signal handler needs a lock-free flag");

// Publishes one temporary path for the lifetime of the object (when no other is published).
class TempRegistration {
public:
    explicit TempRegistration(const std::string& path) {
        if (path.size() >= kMaxTempPath) return;  // open() fails on such a path anyway
        int expected = 0;
        if (!g_temp_state.compare_exchange_strong(expected, 1)) return;
        std::memcpy(g_temp_path, path.c_str(), path.size() + 1);
        g_temp_state.store(2);
        mine_ = true;
    }
    ~TempRegistration() {
        if (mine_) g_temp_state.store(0);
    }
    TempRegistration(const TempRegistration&) = delete;
    TempRegistration& operator=(const TempRegistration&) = delete;

private:
    bool mine_ = false;
};

extern "C" void on_terminating_signal(int sig) {
    const int saved = errno;
    if (g_temp_state.load() == 2) ::unlink(g_temp_path);
    struct sigaction dfl {};
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    ::sigaction(sig, &dfl, nullptr);
    // Blocked while this handler runs: delivered with the default action when it returns, so
    // the process ends by this signal (the exit status says so) instead of exiting normally.
    ::raise(sig);
    errno = saved;
}

constexpr int kCleanupSignals[] = {SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGXFSZ};

// ---- writing ---------------------------------------------------------------------------------
bool write_all(int fd, const uint8_t* p, size_t n, int* saved_errno) {
    while (n > 0) {
        const ssize_t w = ::write(fd, p, std::min(n, size_t(1) << 30));
        if (w < 0) {
            if (errno == EINTR) continue;
            *saved_errno = errno;
            return false;
        }
        if (w == 0) {
            *saved_errno = EIO;
            return false;
        }
        p += w;
        n -= static_cast<size_t>(w);
    }
    return true;
}

// Into a character device or a FIFO, which stays what it is.
bool write_stream(const std::string& path, const uint8_t* data, size_t size, std::string* err) {
    // No O_CREAT, no O_TRUNC: this never creates or truncates a file, even if `path` changed
    // since it was classified; fstat below then refuses to write.
    const int fd = ::open(path.c_str(), O_WRONLY | O_NOCTTY | O_CLOEXEC);
    if (fd < 0) return fail(err, path + ": cannot open for writing " + reason(errno));
    struct stat st {};
    if (::fstat(fd, &st) != 0 || !(S_ISCHR(st.st_mode) || S_ISFIFO(st.st_mode))) {
        ::close(fd);
        return fail(err, path + ": changed while being opened (no longer a character device or FIFO); nothing written");
    }
    int e = 0;
    bool ok = write_all(fd, data, size, &e);
    if (::close(fd) != 0 && ok) {
        ok = false;
        e = errno;
    }
    if (!ok) return fail(err, path + ": write failed " + reason(e));
    return true;
}

// To a new temporary file next to `target`, renamed over it. `shown` is the path as given.
bool write_replacing(const std::string& shown, const std::string& target, const uint8_t* data, size_t size,
                     std::string* err) {
    const std::string stem = target + ".tmp." + std::to_string(static_cast<long>(::getpid())) + ".";
    for (int n = 0; n < 100; ++n) {
        const std::string tmp = stem + std::to_string(n);
        TempRegistration reg(tmp);
        // O_EXCL: never reuse a file or follow a link that is already there.
        const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
        if (fd < 0) {
            if (errno == EEXIST) continue;
            return fail(err, shown + ": cannot create " + reason(errno));
        }
        int e = 0;
        bool ok = write_all(fd, data, size, &e);
        if (::close(fd) != 0 && ok) {
            ok = false;
            e = errno;
        }
        if (!ok) {
            ::unlink(tmp.c_str());
            return fail(err, shown + ": write failed " + reason(e));
        }
        // What is at the target may have changed since it was classified: never rename over
        // anything but a regular file.
        struct stat st {};
        if (::lstat(target.c_str(), &st) == 0 && !S_ISREG(st.st_mode)) {
            ::unlink(tmp.c_str());
            return fail(err, shown + ": changed while being written (no longer a regular file); left as it is");
        }
        if (::rename(tmp.c_str(), target.c_str()) != 0) {
            e = errno;
            ::unlink(tmp.c_str());
            return fail(err, shown + ": cannot rename into place " + reason(e));
        }
        return true;
    }
    return fail(err, shown + ": cannot create a temporary file next to it (" + stem + "0..99 all exist)");
}

}  // namespace

bool classify_output(const std::string& path, OutputKind* kind, std::string* err) {
    if (path.empty()) return fail(err, "the output path is empty");
    struct stat st {};
    if (::stat(path.c_str(), &st) == 0) {
        if (S_ISREG(st.st_mode)) {
            *kind = OutputKind::kReplace;
            return true;
        }
        if (S_ISCHR(st.st_mode) || S_ISFIFO(st.st_mode)) {
            *kind = OutputKind::kStream;
            return true;
        }
        if (S_ISDIR(st.st_mode)) return fail(err, path + ": is a directory; give a file name");
        return fail(err, path + ": is a block device or a socket; refusing to write to it "
                                "(only regular files, character devices and FIFOs are written)");
    }
    const int e = errno;
    if (e != ENOENT) return fail(err, path + ": cannot examine " + reason(e));
    struct stat lst {};
    if (::lstat(path.c_str(), &lst) == 0 && S_ISLNK(lst.st_mode))
        return fail(err, path + ": is a symbolic link to a missing file; refusing to create its target");
    *kind = OutputKind::kNew;  // a missing directory on the way is reported when creating
    return true;
}

bool same_existing_file(const std::string& a, const std::string& b) {
    struct stat sa {}, sb {};
    if (::stat(a.c_str(), &sa) != 0 || ::stat(b.c_str(), &sb) != 0) return false;
    return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

bool same_file_as_fd(const std::string& path, int fd) {
    struct stat sp {}, sf {};
    if (::stat(path.c_str(), &sp) != 0 || ::fstat(fd, &sf) != 0) return false;
    return sp.st_dev == sf.st_dev && sp.st_ino == sf.st_ino;
}

bool write_output_file(const std::string& path, const void* data, size_t size, std::string* err) {
    try {
        if (size > 0 && !data) return fail(err, path + ": no data given");
        const uint8_t* bytes = static_cast<const uint8_t*>(data);
        OutputKind kind = OutputKind::kNew;
        if (!classify_output(path, &kind, err)) return false;
        if (kind == OutputKind::kStream) return write_stream(path, bytes, size, err);
        if (kind == OutputKind::kNew) return write_replacing(path, path, bytes, size, err);
        // Replace the file a link points to, not the link: the temporary file goes next to the
        // real file, so the rename stays within one directory and one file system.
        char* real = ::realpath(path.c_str(), nullptr);
        if (!real) return fail(err, path + ": cannot resolve " + reason(errno));
        const std::string target(real);
        std::free(real);
        return write_replacing(path, target, bytes, size, err);
    } catch (const std::exception& e) {  // std::string allocation
        return fail(err, path + ": " + e.what());
    }
}

void install_temp_file_cleanup() {
    static std::atomic<bool> installed{false};
    if (installed.exchange(true)) return;
    struct sigaction sa {};
    sa.sa_handler = on_terminating_signal;
    sigemptyset(&sa.sa_mask);
    for (int sig : kCleanupSignals) sigaddset(&sa.sa_mask, sig);  // one handler at a time
    for (int sig : kCleanupSignals) {
        struct sigaction old {};
        if (::sigaction(sig, nullptr, &old) != 0) continue;
        // Leave a signal the caller ignores (nohup) or handles itself as it is.
        if ((old.sa_flags & SA_SIGINFO) || old.sa_handler != SIG_DFL) continue;
        ::sigaction(sig, &sa, nullptr);
    }
}

}  // namespace defkv_st
