# Runs one libFuzzer target for a bounded time (ctest calls this through tests/fuzz/CMakeLists.txt).
# -DFUZZER=<exe> -DWORK=<working corpus dir> -DSEEDS=<seed corpus dir, may be absent>
# -DSECONDS=<max_total_time> -DARTIFACTS=<folder for crashing inputs>.
# Fails when the fuzzer reports a crash, leak, timeout or OOM.
file(REMOVE_RECURSE "${WORK}")
file(MAKE_DIRECTORY "${WORK}")
set(dirs "${WORK}")
if(IS_DIRECTORY "${SEEDS}")
  list(APPEND dirs "${SEEDS}")  # read-only seeds: libFuzzer writes new inputs to the first dir
endif()
file(MAKE_DIRECTORY "${ARTIFACTS}")
execute_process(
  COMMAND "${FUZZER}" -max_total_time=${SECONDS} -timeout=10 -rss_limit_mb=2048
          -print_final_stats=1 -artifact_prefix=${ARTIFACTS}/ ${dirs}
  RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "fuzzer ${FUZZER} failed (exit ${rc}); the crashing input is in ${ARTIFACTS}/")
endif()
