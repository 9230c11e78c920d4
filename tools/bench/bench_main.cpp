// Standalone `defkv-bench`: the same as `defkv bench`.
int defkv_cmd_bench(int argc, char **argv);

int main(int argc, char **argv) {
    static char name[] = "bench";
    argv[0] = name;
    return defkv_cmd_bench(argc, argv);
}
