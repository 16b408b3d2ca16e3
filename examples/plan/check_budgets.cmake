# Runs stowage-plan --budgets-json --strategy auto for Llama-3.1-8B on {0: 20GB, 1: 20GB,
# cpu: 100GB} and compares with the budgets Transformers v5's resolver computed
# (tests/fixtures/llama/device_maps.json, case Llama-3.1-8B_2gpu20_cpu100_auto_bfloat16,
# "transformers" block): "auto" follows Transformers, not accelerate (whose GPU 0 budget differs).
execute_process(COMMAND "${PLAN}" --config "${EXAMPLES}/configs/Llama-3.1-8B/config.json"
                        --strategy auto --max-memory 0=20GB,1=20GB,cpu=100GB --budgets-json
                OUTPUT_VARIABLE out RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "stowage-plan failed (${rc})")
endif()
file(READ "${FIXTURES}/llama/device_maps.json" cases)
string(JSON ncases LENGTH "${cases}")
math(EXPR last "${ncases} - 1")
set(found FALSE)
foreach(i RANGE ${last})
  string(JSON id GET "${cases}" ${i} id)
  if(id STREQUAL "Llama-3.1-8B_2gpu20_cpu100_auto_bfloat16")
    set(found TRUE)
    string(JSON n LENGTH "${cases}" ${i} transformers budgets)
    math(EXPR lastk "${n} - 1")
    foreach(k RANGE ${lastk})
      string(JSON key GET "${cases}" ${i} transformers budgets ${k} 0)
      string(JSON want GET "${cases}" ${i} transformers budgets ${k} 1)
      string(JSON got GET "${out}" "${key}")
      if(NOT got STREQUAL want)
        message(FATAL_ERROR "budget ${key}: stowage ${got}, Transformers ${want}\n${out}")
      endif()
    endforeach()
  endif()
endforeach()
if(NOT found)
  message(FATAL_ERROR "case not in the fixture")
endif()
