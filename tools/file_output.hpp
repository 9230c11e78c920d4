// Writing an output file without damaging anything else (the defkv program's --output).
//
// What is at the output path decides how it is written (links are followed):
//   - nothing:              a new file, written to a temporary file next to it and renamed into place;
//   - a regular file:       replaced the same way, atomically; a link to it stays a link;
//   - a character device or a FIFO (/dev/null, /dev/stdout on a pipe or a terminal):
//                           written into directly, never replaced;
//   - anything else (a directory, a block device, a socket, a link to nothing): refused.
// The temporary file (OUT.tmp.PID.N, created exclusively) is removed on every error and, once
// install_temp_file_cleanup() has run, when SIGHUP, SIGINT, SIGQUIT, SIGTERM or SIGXFSZ ends
// the process. No exception leaves these functions.
#ifndef DEFKV_TOOLS_FILE_OUTPUT_HPP
#define DEFKV_TOOLS_FILE_OUTPUT_HPP

#include <cstddef>
#include <string>

namespace defkv_st {

enum class OutputKind {
    kNew,      // nothing there yet: created atomically
    kReplace,  // an existing regular file: replaced atomically
    kStream,   // a character device or FIFO: written into
};

// Decides how `path` would be written; false (with a one-line *err naming the path) when it
// must not be: a directory, a block device, a socket, a link to nothing, or a path that cannot
// be examined.
bool classify_output(const std::string& path, OutputKind* kind, std::string* err);

// True when both paths exist and name the same file (same device and inode, links followed),
// whatever their spelling: "in.st", "./in.st", a symbolic or hard link to it.
bool same_existing_file(const std::string& a, const std::string& b);

// True when path exists and is the file open as descriptor fd (e.g. --output /dev/stdout).
bool same_file_as_fd(const std::string& path, int fd);

// Writes size bytes to path as described above. On failure returns false with *err, and no
// temporary file is left; an existing file at path is unchanged.
bool write_output_file(const std::string& path, const void* data, size_t size, std::string* err);

// Installs handlers for SIGHUP, SIGINT, SIGQUIT, SIGTERM and SIGXFSZ (those not ignored) that
// unlink the temporary file being written, if any, then end the process by the same signal
// with its default action. Idempotent. Only one output file may be written at a time.
void install_temp_file_cleanup();

}  // namespace defkv_st

#endif  // DEFKV_TOOLS_FILE_OUTPUT_HPP
