// s2lc — every per-target kernel body; the HWY_TARGET_INCLUDE of <s2lc/dispatch.hpp>.
// Add each new kernel's -inl.h here. (No include guard: re-included once per target.)
#include "s2lc/kernels/convert-inl.h"
#include "s2lc/kernels/qgemm-inl.h"
