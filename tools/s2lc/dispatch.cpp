// The one translation unit that owns s2lc's runtime-dispatch tables for the tools, tests and
// benches (built as the static library s2lc_dispatch).
#define S2LC_IMPLEMENTATION
#include <s2lc/dispatch.hpp>
