// The header-only (static dispatch) path: this TU compiles the kernels inline for its own target
// even though the rest of the test program uses runtime dispatch (distinct inline namespaces).
#undef S2LC_DYNAMIC_DISPATCH
#define S2LC_DYNAMIC_DISPATCH 0
#include <doctest/doctest.h>

#include <bit>
#include <cstdint>
#include <vector>

#include <s2lc/kernels/convert.hpp>

TEST_CASE("kernels: static (header-only) dispatch matches the scalar reference") {
  std::vector<float> in(1027);
  for (std::size_t i = 0; i < in.size(); ++i) in[i] = std::bit_cast<float>(static_cast<std::uint32_t>(i * 2654435761u));
  std::vector<std::uint16_t> h(in.size());
  std::vector<float> back(in.size());
  s2lc::kernels::f32_to_bf16(in, h);
  for (std::size_t i = 0; i < in.size(); ++i) REQUIRE(h[i] == s2lc::f32_to_bf16(in[i]));
  s2lc::kernels::bf16_to_f32(h, back);
  for (std::size_t i = 0; i < in.size(); ++i) REQUIRE(std::bit_cast<std::uint32_t>(back[i]) == std::bit_cast<std::uint32_t>(s2lc::bf16_to_f32(h[i])));
  s2lc::kernels::f32_to_f16(in, h);
  for (std::size_t i = 0; i < in.size(); ++i) REQUIRE(h[i] == s2lc::f32_to_f16(in[i]));
  s2lc::kernels::f16_to_f32(h, back);
  for (std::size_t i = 0; i < in.size(); ++i) REQUIRE(std::bit_cast<std::uint32_t>(back[i]) == std::bit_cast<std::uint32_t>(s2lc::f16_to_f32(h[i])));
}
