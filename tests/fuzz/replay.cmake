# The fuzz harnesses as ordinary programs: replay the committed seed corpora and crash reproducers
# (tests/fuzz/corpus/<reader>) through LLVMFuzzerTestOneInput without libFuzzer, so every build
# (the "asan" preset included) re-checks them. include()d from tests/CMakeLists.txt; paths are
# relative to this file, so it works whichever directory includes it.
add_executable(s2lc_fuzz_replay
  ${CMAKE_CURRENT_LIST_DIR}/safetensors_fuzz.cpp
  ${CMAKE_CURRENT_LIST_DIR}/replay_main.cpp)
target_link_libraries(s2lc_fuzz_replay PRIVATE s2lc::s2lc s2lc_dev_flags)
s2lc_sanitize_o0(s2lc_fuzz_replay)
add_test(NAME fuzz_replay_safetensors
  COMMAND s2lc_fuzz_replay ${CMAKE_CURRENT_LIST_DIR}/corpus/safetensors)

add_executable(s2lc_fuzz_replay_container
  ${CMAKE_CURRENT_LIST_DIR}/container_fuzz.cpp
  ${CMAKE_CURRENT_LIST_DIR}/replay_main.cpp)
target_link_libraries(s2lc_fuzz_replay_container PRIVATE s2lc::s2lc s2lc_dev_flags)
s2lc_sanitize_o0(s2lc_fuzz_replay_container)
add_test(NAME fuzz_replay_container
  COMMAND s2lc_fuzz_replay_container ${CMAKE_CURRENT_LIST_DIR}/corpus/container)

add_executable(s2lc_fuzz_replay_artifact
  ${CMAKE_CURRENT_LIST_DIR}/artifact_fuzz.cpp
  ${CMAKE_CURRENT_LIST_DIR}/replay_main.cpp)
target_link_libraries(s2lc_fuzz_replay_artifact PRIVATE s2lc::s2lc s2lc_dev_flags)
s2lc_sanitize_o0(s2lc_fuzz_replay_artifact)
add_test(NAME fuzz_replay_artifact
  COMMAND s2lc_fuzz_replay_artifact ${CMAKE_CURRENT_LIST_DIR}/corpus/artifact)

# The two seed checks compare bytes, so they run in the release build only (tests/CMakeLists.txt
# says why).
if(NOT S2LC_SANITIZE)
# The container seeds are generated (make_container_seeds.cpp); this check fails when the committed
# ones are stale, e.g. after a format change: regenerate with
#   <build>/bin/s2lc_fuzz_container_seeds tests/fuzz/corpus/container
add_executable(s2lc_fuzz_container_seeds ${CMAKE_CURRENT_LIST_DIR}/make_container_seeds.cpp)
target_link_libraries(s2lc_fuzz_container_seeds PRIVATE s2lc::s2lc s2lc_dev_flags)
add_test(NAME fuzz_container_seeds_current
  COMMAND s2lc_fuzz_container_seeds --check ${CMAKE_CURRENT_LIST_DIR}/corpus/container)

# The artifact seeds are generated too (make_artifact_seeds.cpp: compress() + build_artifact on
# synthetic groups, OpenBLAS pinned to its generic kernels); regenerate stale ones with
#   <build>/bin/s2lc_fuzz_artifact_seeds tests/fuzz/corpus/artifact
add_executable(s2lc_fuzz_artifact_seeds ${CMAKE_CURRENT_LIST_DIR}/make_artifact_seeds.cpp)
target_link_libraries(s2lc_fuzz_artifact_seeds PRIVATE s2lc::s2lc s2lc_dev_flags)
add_test(NAME fuzz_artifact_seeds_current
  COMMAND s2lc_fuzz_artifact_seeds --check ${CMAKE_CURRENT_LIST_DIR}/corpus/artifact)
endif()
