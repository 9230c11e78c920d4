# Shared by the engine's CMake-script tests (included with -P scripts that set ENGINE):
# run_engine(<what> <out-var> <engine arguments>...) runs the engine; when the model or the text is
# not cached (the engine's exit 3) it prints SKIPPED (the tests' SKIP_REGULAR_EXPRESSION) and
# returns from the calling script, and any other failure is fatal. <out-var> receives stdout.
macro(run_engine what outvar)
  execute_process(COMMAND ${ENGINE} ${ARGN} RESULT_VARIABLE _run_engine_rc OUTPUT_VARIABLE ${outvar}
                  ERROR_VARIABLE _run_engine_err)
  if(_run_engine_rc EQUAL 3)
    message("SKIPPED: the model or the text is not cached; run tools/engine/fetch_assets.sh\n${_run_engine_err}")
    return()
  endif()
  if(NOT _run_engine_rc EQUAL 0)
    message(FATAL_ERROR "${what} failed (${_run_engine_rc}):\n${${outvar}}\n${_run_engine_err}")
  endif()
endmacro()
