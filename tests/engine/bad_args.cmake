# Runs defkv-engine with bad arguments; each must exit 2 (or 3 for a missing file) and name
# the offending argument on stderr.
set(cases
  "eval --budgets 150%|--budgets"
  "eval --contexts abc|--contexts"
  "eval --methods nosuchmethod|--methods"
  "eval --samples 0|--samples"
  "eval --cache ring|--cache"
  "eval --decode --methods snapkv|--methods"
  "eval --decode --caps 8|--caps"
  "eval --decode --interval 16|--interval"
  "demo --frobnicate|--frobnicate"
  "tasks --tasks nosuchtask|--tasks"
  "tasks --modes both|--modes"
  "tasks --contexts 100|--contexts"
  "tasks --trials 0|--trials"
  "tasks --threshold 150|--threshold"
  "tasks --keep-prefills -1|--keep-prefills"
  "tasks --budgets 1%|--budgets"
  "tasks --methods nosuchmethod|--methods"
  "tasks --model /nonexistent/model.gguf|model file not found"
  "eval --model /nonexistent/model.gguf|model file not found"
  "ppl --tokens|needs a value"
  "nosuchcommand|unknown command")
set(n 0)
foreach(c IN LISTS cases)
  string(FIND "${c}" "|" bar)
  string(SUBSTRING "${c}" 0 ${bar} shown)
  math(EXPR after "${bar} + 1")
  string(SUBSTRING "${c}" ${after} -1 expect)
  separate_arguments(parts UNIX_COMMAND "${shown}")
  execute_process(COMMAND ${ENGINE} ${parts} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(rc EQUAL 0 OR NOT rc MATCHES "^[0-9]+$")
    message(FATAL_ERROR "defkv-engine ${shown}: expected a non-zero exit, got '${rc}'\n${err}")
  endif()
  string(FIND "${err}" "${expect}" pos)
  if(pos EQUAL -1)
    message(FATAL_ERROR "defkv-engine ${shown}: stderr does not mention '${expect}':\n${err}")
  endif()
  math(EXPR n "${n} + 1")
endforeach()
if(n EQUAL 0)
  message(FATAL_ERROR "no case ran")
endif()
message(STATUS "${n} bad-argument cases rejected")
