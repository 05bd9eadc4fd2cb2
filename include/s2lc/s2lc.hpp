// s2lc — umbrella header: everything in the library.
//
//   #include <s2lc/s2lc.hpp>
//   s2lc::io::SafetensorsFile f("moe.safetensors");           // mmap + validate
//   auto groups = s2lc::io::find_expert_groups(s2lc::io::tensor_refs(f));
//   s2lc::matrix w = s2lc::load_matrix_f32(f, groups[0].name_of(0));
#pragma once

#include "s2lc/config.hpp"
#include "s2lc/error.hpp"
#include "s2lc/dtype.hpp"
#include "s2lc/kernels/convert.hpp"
#include "s2lc/io/mapped_file.hpp"
#include "s2lc/io/safetensors.hpp"
#include "s2lc/io/container.hpp"
#include "s2lc/io/names.hpp"
#include "s2lc/tensor.hpp"
#include "s2lc/linalg/qr.hpp"
#include "s2lc/linalg/svd.hpp"
#include "s2lc/linalg/cluster.hpp"
#include "s2lc/compress/quant.hpp"
#include "s2lc/compress/hed.hpp"
#include "s2lc/compress/model.hpp"
#include "s2lc/compress/compressor.hpp"
#include "s2lc/compress/artifact.hpp"
#include "s2lc/compress/pipeline.hpp"
#include "s2lc/kernels/qgemm.hpp"
#include "s2lc/plan.hpp"
#include "morph/parallel.hpp"
#include "morph/runtime.hpp"
#include "morph/grouped.hpp"
#include "morph/morph.hpp"
#include "morph/merge.hpp"
#include "route/token.hpp"
#include "route/schedule.hpp"
#include "route/context.hpp"
#include "route/safe_add.hpp"
