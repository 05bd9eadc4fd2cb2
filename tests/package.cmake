# Consumers: an installed package found with find_package, and add_subdirectory vendoring.
foreach(mode find_package subdirectory)
  add_test(NAME consumer_${mode}
    COMMAND ${CMAKE_COMMAND} -DMODE=${mode} -DSOURCE_DIR=${PROJECT_SOURCE_DIR} -DBINARY_DIR=${PROJECT_BINARY_DIR}
            -DCXX=${CMAKE_CXX_COMPILER} -DFIXTURE=${CMAKE_CURRENT_SOURCE_DIR}/data/tinymoe-upcycled-L1.safetensors
            -P ${CMAKE_CURRENT_SOURCE_DIR}/consumer/run.cmake)
  set_tests_properties(consumer_${mode} PROPERTIES LABELS package TIMEOUT 600)
endforeach()
