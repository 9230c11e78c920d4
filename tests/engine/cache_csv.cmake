# `defkv-engine eval --cache contiguous` and `--cache paged` must write the same CSV (the
# user-visible path of engine_cache_parity, which compares the figures bit for bit in one
# process), and the paged run must print its page table. Prints SKIPPED when the model or the
# text is not cached (exit 3 of the engine).
# Three windows (the default is 16): the per-window CSV and the bootstrap columns are compared too.
set(args eval --contexts 256 --budgets 20% --continuation 16 --samples 3 --passkey-contexts 256 --passkey-trials 1
    --quiet)
# The paged run puts the fidelity settings on two threads (--threads 2): the figures must not
# depend on it either.
set(threads_contiguous 1)
set(threads_paged 2)
include(${CMAKE_CURRENT_LIST_DIR}/run_engine.cmake)
foreach(cache contiguous paged)
  run_engine("eval --cache ${cache}" out_${cache} ${args} --cache ${cache} --threads ${threads_${cache}}
             --csv ${WORKDIR}/cache_${cache}.csv)
  file(READ ${WORKDIR}/cache_${cache}.csv csv_${cache})
  file(READ ${WORKDIR}/cache_${cache}-windows.csv win_${cache})
endforeach()
if(NOT win_contiguous STREQUAL win_paged)
  message(FATAL_ERROR "the per-window CSVs differ:\ncontiguous:\n${win_contiguous}\npaged:\n${win_paged}")
endif()
string(REGEX MATCHALL "\n256,0.2000,snapkv,[0-9]" wrows "${win_paged}")
list(LENGTH wrows nw)
if(NOT nw EQUAL 3)
  message(FATAL_ERROR "the per-window CSV has ${nw} snapkv windows, expected 3:\n${win_paged}")
endif()
if(NOT csv_contiguous STREQUAL csv_paged)
  message(FATAL_ERROR "the CSVs differ:\ncontiguous:\n${csv_contiguous}\npaged:\n${csv_paged}")
endif()
string(FIND "${out_paged}" "pages before" pos)
if(pos EQUAL -1)
  message(FATAL_ERROR "the paged run printed no page table:\n${out_paged}")
endif()
string(REGEX MATCHALL "\nfidelity," rows "${csv_paged}")
list(LENGTH rows n)
if(n LESS 2)
  message(FATAL_ERROR "the CSV has ${n} fidelity rows")
endif()
message("PASS: identical CSVs (${n} fidelity rows and the passkey rows; ${nw} windows per setting)")
