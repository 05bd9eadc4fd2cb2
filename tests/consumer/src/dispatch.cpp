// The one TU that owns the runtime-dispatch tables (consumer linking s2lc::dynamic).
#define S2LC_IMPLEMENTATION
#include <s2lc/dispatch.hpp>
