# A short real-model run of `defkv-engine tasks`: one passkey trial at 512 tokens, the full cache
# and two methods at 40% in both modes (threshold 0, so the compressed phase runs whatever the
# full cache scored), with the CSV and the SVG written. Prints SKIPPED when the model or the text
# is not cached (exit 3 of the engine).
set(csv ${WORKDIR}/tasks_smoke.csv)
set(svg ${WORKDIR}/tasks_smoke.svg)
file(REMOVE ${csv} ${svg})
include(${CMAKE_CURRENT_LIST_DIR}/run_engine.cmake)
run_engine("tasks" out tasks --tasks niah_single --contexts 512 --trials 1 --budgets 40% --methods snapkv,defensivekv
           --threshold 0 --quiet --csv ${csv} --svg ${svg})
foreach(want "Full cache, per task" "Query-agnostic" "Query-aware" "Summary, agnostic" "Summary, aware")
  string(FIND "${out}" "${want}" pos)
  if(pos EQUAL -1)
    message(FATAL_ERROR "the output has no '${want}':\n${out}")
  endif()
endforeach()
file(READ ${csv} text)
string(REGEX MATCHALL "\n(full|agnostic|aware),niah_single,512," rows "${text}")
list(LENGTH rows n)
if(NOT n EQUAL 5)
  message(FATAL_ERROR "expected 5 CSV rows (full + 2 modes x 2 methods), got ${n}:\n${text}")
endif()
file(READ ${svg} plot)
string(FIND "${plot}" "</svg>" pos)
if(pos EQUAL -1)
  message(FATAL_ERROR "the SVG is incomplete")
endif()
message("PASS: tasks smoke (${n} CSV rows)\n${out}")
