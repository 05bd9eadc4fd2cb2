# The s2lc command-line tool, run as a user would.
if(NOT TARGET s2lc_cli)
  return()
endif()
set(S2LC_EXE $<TARGET_FILE:s2lc_cli>)
function(s2lc_cli_test name rc)
  cmake_parse_arguments(A "" "STDOUT;STDERR;STDERR_LINES" "ARGS" ${ARGN})
  set(defs -DRC=${rc})
  if(DEFINED A_STDOUT)
    list(APPEND defs "-DSTDOUT=${A_STDOUT}")
  endif()
  if(DEFINED A_STDERR)
    list(APPEND defs "-DSTDERR=${A_STDERR}")
  endif()
  if(DEFINED A_STDERR_LINES)
    list(APPEND defs -DSTDERR_LINES=${A_STDERR_LINES})
  endif()
  string(REPLACE ";" "|" cmd "${S2LC_EXE};${A_ARGS}")
  add_test(NAME cli_${name} COMMAND ${CMAKE_COMMAND} "-DCMD=${cmd}" ${defs} -P ${CMAKE_CURRENT_SOURCE_DIR}/run_expect.cmake)
endfunction()

set(FIX ${CMAKE_CURRENT_SOURCE_DIR}/data)
s2lc_cli_test(help 0 ARGS --help STDOUT "inspect FILE")
s2lc_cli_test(version 0 ARGS --version STDOUT "^s2lc ${PROJECT_VERSION}\n$")
s2lc_cli_test(no_args 2 STDERR "usage: s2lc")
s2lc_cli_test(unknown_command 2 ARGS frobnicate STDERR "^s2lc: unknown command 'frobnicate'" STDERR_LINES 1)
s2lc_cli_test(inspect_unknown_flag 2 ARGS inspect --bogus ${FIX}/tinymoe-lora-c.safetensors
              STDERR "^s2lc: inspect: unknown option '--bogus'\n$" STDERR_LINES 1)
s2lc_cli_test(inspect_no_file 2 ARGS inspect STDERR "no input file" STDERR_LINES 1)
s2lc_cli_test(inspect_missing_file 1 ARGS inspect ${FIX}/does-not-exist.safetensors
              STDERR "^s2lc: error: file '.*does-not-exist.safetensors': cannot open" STDERR_LINES 1)
s2lc_cli_test(inspect_not_safetensors 1 ARGS inspect ${CMAKE_CURRENT_SOURCE_DIR}/CMakeLists.txt
              STDERR "^s2lc: error: file '.*CMakeLists.txt', byte offset 0: header length [0-9]+ runs past the end" STDERR_LINES 1)
s2lc_cli_test(inspect_fixture 0 ARGS inspect ${FIX}/tinymoe-upcycled-L1.safetensors
              STDOUT "layers\\.1\\.moe\\.experts\\.0\\.w1\\.weight +BF16 +\\[768, 256\\] +393216.*\n3 expert groups\n.*layers\\.1\\.moe\\.experts\\.\\{E\\}\\.w2\\.weight +BF16 +\\[256, 768\\] +8 experts \\(0-7\\)")
s2lc_cli_test(inspect_lora 0 ARGS inspect ${FIX}/tinymoe-lora-c.safetensors
              STDOUT "0 expert groups\n20 LoRA pairs\n.*base_model\\.model\\.layers\\.0\\.ffn\\.w2 +r=8 +\\[768 -> 256\\]")
s2lc_cli_test(inspect_shared_moe 0 ARGS inspect ${S2LC_SHARED_DATA_DIR}/tinymoe/moe-upcycled.safetensors
              STDOUT "126 tensors.*\n12 expert groups\n")
add_test(NAME cli_inspect_json_moe COMMAND ${CMAKE_COMMAND} -DS2LC=${S2LC_EXE}
         -DFILE=${S2LC_SHARED_DATA_DIR}/tinymoe/moe-upcycled.safetensors -P ${CMAKE_CURRENT_SOURCE_DIR}/inspect_json_check.cmake)

# compress / decompress / eval
add_test(NAME cli_compress_roundtrip COMMAND ${CMAKE_COMMAND} -DS2LC=${S2LC_EXE} -DFIX=${FIX}
         -DWORK=${CMAKE_CURRENT_BINARY_DIR}/cli_compress_roundtrip -P ${CMAKE_CURRENT_SOURCE_DIR}/compress_cli_check.cmake)
s2lc_cli_test(compress_no_output 2 ARGS compress ${FIX}/tinymoe-upcycled-L1.safetensors
              STDERR "^s2lc: compress: -o OUT.s2lc is required\n$" STDERR_LINES 1)
s2lc_cli_test(compress_two_targets 2 ARGS compress ${FIX}/tinymoe-upcycled-L1.safetensors -o x.s2lc --ratio 4 --energy 0.9
              STDERR "give one of --ratio, --energy, --max-error" STDERR_LINES 1)
s2lc_cli_test(compress_bad_bits 2 ARGS compress ${FIX}/tinymoe-upcycled-L1.safetensors -o x.s2lc --bits 3
              STDERR "--bits must be 8 or 4" STDERR_LINES 1)
s2lc_cli_test(compress_bad_ratio 2 ARGS compress ${FIX}/tinymoe-upcycled-L1.safetensors -o x.s2lc --ratio abc
              STDERR "--ratio needs a number, got 'abc'" STDERR_LINES 1)
s2lc_cli_test(decompress_not_artifact 1 ARGS decompress ${FIX}/tinymoe-lora-c.safetensors -o x.safetensors
              STDERR "^s2lc: error: file '.*tinymoe-lora-c.safetensors'.*magic" STDERR_LINES 1)
s2lc_cli_test(eval_too_few 2 ARGS eval ${FIX}/tinymoe-lora-c.safetensors STDERR "eval: need" STDERR_LINES 1)

# bench apply: usage errors, and a small hot run printing every promised field (speed is not
# asserted: bench/RESULTS.md has the measurements).
s2lc_cli_test(bench_usage 2 ARGS bench STDERR "^s2lc: bench: usage: s2lc bench apply" STDERR_LINES 1)
s2lc_cli_test(bench_bad_option 2 ARGS bench apply --bogus STDERR "^s2lc: bench apply: unknown option '--bogus'\n$" STDERR_LINES 1)
s2lc_cli_test(bench_bad_rows 2 ARGS bench apply --rows x STDERR "^s2lc: --rows needs a non-negative integer, got 'x'\n$" STDERR_LINES 1)
s2lc_cli_test(bench_bad_morph 2 ARGS bench apply --morph 1 STDERR "--morph K needs 2 <= K <= 64" STDERR_LINES 1)
s2lc_cli_test(bench_bad_activations 2 ARGS bench apply --activations int4 STDERR "--activations must be f32 or int8, got 'int4'" STDERR_LINES 1)
s2lc_cli_test(bench_apply_json 0 ARGS bench apply --rows 300 --cols 257 --ratio 6 --batch 3 --morph 2 --activations int8 --hot --seconds 0.01 --json
              STDOUT "\"cold\": false,\n *\"cold_bytes\": 0,\n.*\"activations\": \"int8\",.*\"us_per_call\": [0-9.e+-]+,\n *\"openblas_us_per_call\": [0-9.e+-]+,.*\"int8_activations_us_per_call\": [0-9.e+-]+,\n *\"speedup_vs_openblas\": [0-9.e+-]+,.*\"fma_bound_us\": [0-9.e+-]+,\n *\"bound_us\": [0-9.e+-]+,\n *\"bound_ratio\": [0-9.e+-]+,.*\"morph_vs_single\": [0-9.e+-]+,\n *\"morph_bits\": 8,\n *\"morph_truncate\": false,\n *\"morph_rel_error\": [0-9.e+-]+\n}")
# --truncate: the hybrid's own-factor mixes cut to one expert's rank, with its error against the exact mix
s2lc_cli_test(bench_apply_truncate 0 ARGS bench apply --rows 300 --cols 257 --ratio 6 --batch 1 --morph 3 --truncate --morph-bits 4 --hot --seconds 0.01 --json
              STDOUT "\"morph_k\": 3,.*\"morph_vs_single\": [0-9.e+-]+,\n *\"morph_bits\": 4,\n *\"morph_truncate\": true,\n *\"morph_rel_error\": [0-9.e+-]+\n}")
# --target: the kernels run the named SIMD target (SSE4: x86-64 CPUs this old are not supported
# by the tests anyway), reported as "target" (neither AMX nor VNNI there); an unknown name lists the targets there are.
if(CMAKE_SYSTEM_PROCESSOR MATCHES "x86_64|AMD64")
  s2lc_cli_test(bench_apply_target 0 ARGS bench apply --rows 70 --cols 40 --batch 2 --target sse4 --hot --seconds 0.01 --json
                STDOUT "\"target\": \"SSE4\",\n *\"openblas_core\": \"[^\"]+\",\n *\"amx\": false,\n *\"vnni\": false,")
endif()
s2lc_cli_test(bench_bad_target 2 ARGS bench apply --target foo
              STDERR "^s2lc: --target foo: not a target of this build on this CPU \\(available: [A-Z0-9_ ]+\\)\n$" STDERR_LINES 1)
s2lc_cli_test(bench_bad_morph_bits 2 ARGS bench apply --morph 2 --morph-bits 2 STDERR "--morph-bits must be 8 or 4, got '2'" STDERR_LINES 1)
s2lc_cli_test(bench_truncate_alone 2 ARGS bench apply --truncate STDERR "--truncate applies to --morph K" STDERR_LINES 1)
s2lc_cli_test(bench_morph_bits_alone 2 ARGS bench apply --morph-bits 4 STDERR "--morph-bits applies to --morph K" STDERR_LINES 1)

# route fit / route / eval (the context router)
add_test(NAME cli_route_roundtrip COMMAND ${CMAKE_COMMAND} -DS2LC=${S2LC_EXE} -DFIX=${FIX}
         -DWORK=${CMAKE_CURRENT_BINARY_DIR}/cli_route_roundtrip -P ${CMAKE_CURRENT_SOURCE_DIR}/route_cli_check.cmake)
s2lc_cli_test(route_no_args 2 ARGS route STDERR "route: usage")
