# `defkv-engine eval --decode` on a tiny setting (64-token prompt, 128 teacher-forced tokens,
# rounds every 32, one retrieval trial): it runs end to end through the paged and the
# contiguous cache, the full cache's KL is 0, a stream whose budget is never reached (B = 1024
# > 64 + 128) gives the full cache's distributions bit for bit (KL max 0, top-1 100%) though
# its rounds ran, and at B = 48 eviction shows (KL > 0), so the zeros are not vacuous. The
# paged and the contiguous runs write the same figures. Prints SKIPPED when the model or the
# text is not cached (exit 3 of the engine).
set(args eval --decode --prompt 64 --tokens 128 --caps 48,1024 --methods snapkv-latest,defensivekv-max
    --samples 1 --interval 32 --retrieval-trials 1 --retrieval-gap 64 --retrieval-lead 8 --quiet)
include(${CMAKE_CURRENT_LIST_DIR}/run_engine.cmake)
foreach(cache paged contiguous)
  run_engine("eval --decode --cache ${cache}" out ${args} --cache ${cache} --csv ${WORKDIR}/decode_${cache}.csv)
  message("${out}")
endforeach()
# The figures without the seconds column (14th): the two caches must agree on everything else.
string(REPEAT "[^,]*," 13 first13)
foreach(cache paged contiguous)
  file(STRINGS ${WORKDIR}/decode_${cache}.csv lines)
  set(rows_${cache} "")
  foreach(line IN LISTS lines)
    string(REGEX REPLACE "^(${first13})[^,]*" "\\1" line "${line}")
    list(APPEND rows_${cache} "${line}")
  endforeach()
endforeach()
if(NOT rows_paged STREQUAL rows_contiguous)
  message(FATAL_ERROR "the paged and the contiguous cache give different figures:\n${rows_paged}\n${rows_contiguous}")
endif()
set(checks 0)
macro(expect_row regex what)
  set(found 0)
  foreach(line IN LISTS rows_paged)
    if(line MATCHES "${regex}")
      set(found 1)
    endif()
  endforeach()
  if(NOT found)
    message(FATAL_ERROR "${what}: no CSV row matches '${regex}':\n${rows_paged}")
  endif()
  math(EXPR checks "${checks} + 1")
endmacro()
# task,window,offset,cap,method,kl_mean,kl_p99,kl_max,top1,tokens,...,rounds,...
expect_row("^decode_kl,all,[0-9]+,0,full,0,0,0,1.00000,128," "the full cache's KL is 0")
foreach(m snapkv-latest defensivekv-max)
  expect_row("^decode_kl,all,[0-9]+,1024,${m},0,0,0,1.00000,128,[^,]*,[^,]*,[1-9]"
             "${m} at a budget never reached: KL 0 and top-1 100% after its rounds")
  expect_row("^decode_kl,all,[0-9]+,48,${m},[0-9.e-]*[1-9][0-9.e-]*,.*,128,[^,]*,[^,]*,[1-9]"
             "${m} at B = 48: eviction changes the distributions")
  expect_row("^decode_retrieval,all,,(48|1024),${m},.*,1,[0-9.]+$" "${m}: one retrieval trial ran")
endforeach()
expect_row("^decode_retrieval,all,,0,full,.*,1,1,1.00000$" "the full cache answers the key")
message("PASS: eval --decode, ${checks} checks")
