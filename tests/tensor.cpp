// Tensor views and f32 loading over memory-mapped safetensors data.
#include <doctest/doctest.h>

#include <cstdint>
#include <vector>

#include <s2lc/tensor.hpp>

#include "support.hpp"

// The suite's own scope: the suites compile in unity groups (tests/CMakeLists.txt).
namespace suite_tensor {

TEST_CASE("tensor: bf16 fixture loads to f32 exactly and views share the mapping") {
  s2lc::io::SafetensorsFile f(s2lc::test::data_dir() / "tinymoe-upcycled-L1.safetensors");
  const std::string name = "layers.1.moe.experts.3.w2.weight";
  const auto raw = f.view<s2lc::bf16_t>(name);
  const auto view = s2lc::matrix_view<s2lc::bf16_t>(f, name);
  REQUIRE(view.shape()[0] == 256);
  REQUIRE(view.shape()[1] == 768);
  CHECK(&view(0, 0) == raw.data());         // a view, not a copy
  CHECK(&view(1, 0) == raw.data() + 768);   // row-major
  const s2lc::matrix w = s2lc::load_matrix_f32(f, name);
  REQUIRE(w.shape()[0] == 256);
  REQUIRE(w.shape()[1] == 768);
  double energy = 0;
  for (std::size_t r = 0; r < 256; ++r)
    for (std::size_t c = 0; c < 768; ++c) {
      REQUIRE(w(r, c) == s2lc::bf16_to_f32(view(r, c).bits));
      energy += static_cast<double>(w(r, c)) * w(r, c);
    }
  CHECK(energy > 1.0);  // real trained weights, not zeros

  const s2lc::array a = s2lc::load_f32(f, "layers.1.moe.gate.weight");
  CHECK(a.dimension() == 2);
  CHECK(a.shape()[0] == 8);
  CHECK(a.shape()[1] == 256);
}

TEST_CASE("tensor: f32 views and loading errors name the tensor") {
  s2lc::io::SafetensorsFile f(s2lc::test::data_dir() / "tinymoe-upcycled-L1-calib.safetensors");
  const auto x = s2lc::matrix_view<float>(f, "layers.1.ffn_input");
  CHECK(x.shape()[0] == 1024);
  CHECK(x.shape()[1] == 256);
  const s2lc::matrix m = s2lc::load_matrix_f32(f, "layers.1.ffn_input");
  CHECK(m(17, 5) == x(17, 5));
  CHECK_THROWS_WITH_AS(s2lc::load_matrix_f32(f, "layers.1.router_topk"), doctest::Contains("not a floating-point tensor"),
                       s2lc::invalid_argument);
  CHECK_THROWS_WITH_AS(s2lc::load_matrix_f32(f, "token_byte"), doctest::Contains("expected a 2-D tensor"), s2lc::invalid_argument);
  CHECK_THROWS_WITH_AS(s2lc::matrix_view<s2lc::bf16_t>(f, "layers.1.ffn_input"), doctest::Contains("stored as F32, requested as BF16"),
                       s2lc::invalid_argument);
  try {
    (void)s2lc::load_f32(f, "no.such.tensor");
    FAIL("expected an error");
  } catch (const s2lc::invalid_argument& e) {
    CHECK(e.tensor() == "no.such.tensor");
    CHECK(e.file().find("tinymoe-upcycled-L1-calib.safetensors") != std::string::npos);
  }
}

}  // namespace suite_tensor
