// Compiled against single_include/ alone (not include/): the amalgamation is self-contained.
#include <s2lc/s2lc.hpp>

#include <cstdio>

#ifdef S2LC_KERNELS_CONVERT_INL_H_
#else
#error "expected the kernels to be compiled inline (static dispatch)"
#endif

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  s2lc::io::SafetensorsFile f(argv[1]);
  const auto groups = s2lc::io::find_expert_groups(s2lc::io::tensor_refs(f));
  const s2lc::matrix w = s2lc::load_matrix_f32(f, groups.at(0).name_of(0));
  const auto raw = f.view<s2lc::bf16_t>(groups.at(0).name_of(0));
  for (std::size_t i = 0; i < raw.size(); ++i)
    if (w.data()[i] != s2lc::bf16_to_f32(raw[i].bits)) return 1;
  std::printf("single header: %zu expert groups\n", groups.size());
  return groups.size() == 3 ? 0 : 1;
}
