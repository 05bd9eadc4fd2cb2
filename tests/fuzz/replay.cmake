# The safetensors fuzz harness as an ordinary program: replays the committed seed corpus and crash
# reproducers (tests/fuzz/corpus/safetensors) through LLVMFuzzerTestOneInput without libFuzzer, so
# every build (the "asan" preset included) re-checks them. include()d from tests/CMakeLists.txt;
# paths are relative to this file, so it works whichever directory includes it.
add_executable(s2lc_fuzz_replay
  ${CMAKE_CURRENT_LIST_DIR}/safetensors_fuzz.cpp
  ${CMAKE_CURRENT_LIST_DIR}/replay_main.cpp)
target_link_libraries(s2lc_fuzz_replay PRIVATE s2lc::s2lc s2lc_dev_flags)
add_test(NAME fuzz_replay_safetensors
  COMMAND s2lc_fuzz_replay ${CMAKE_CURRENT_LIST_DIR}/corpus/safetensors)
