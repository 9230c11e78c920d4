// defkv info FILE: tensors (name, dtype, shape, bytes) and metadata of a safetensors file.
#include <cstdio>
#include <string>

#include "cmd_common.hpp"
#include "safetensors.hpp"

namespace defkv_cli {

int cmd_info(int argc, char** argv) {
    if (argc == 2 && (std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h")) {
        std::printf("usage: defkv info FILE.safetensors\n");
        return kExitOk;
    }
    if (argc != 2) return error(kExitUsage, "info: expected exactly one FILE argument (usage: defkv info FILE)");
    defkv_st::SafeFile file;
    std::string err;
    if (!defkv_st::read_safetensors(argv[1], &file, &err)) return error(kExitError, err);
    std::printf("%s: %zu tensors, %zu metadata entries\n", argv[1], file.tensors.size(), file.metadata.size());
    for (const auto& t : file.tensors) {
        std::string shape = "[";
        for (size_t i = 0; i < t.shape.size(); ++i)
            shape += (i ? ", " : "") + std::to_string(t.shape[i]);
        shape += "]";
        std::printf("  %-32s %-5s %-20s %zu bytes\n", t.name.c_str(), defkv_st::dtype_name(t.dtype), shape.c_str(),
                    t.nbytes());
    }
    if (!file.metadata.empty()) std::printf("metadata:\n");
    for (const auto& kv : file.metadata) std::printf("  %s = %s\n", kv.first.c_str(), kv.second.c_str());
    return kExitOk;
}

}  // namespace defkv_cli
