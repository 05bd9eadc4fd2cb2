// A consumer of s2lc::s2lc (header-only, static SIMD dispatch): opens a real MoE slice, finds its
// expert groups and converts one expert to f32, checking the result against the scalar path.
#include <cstdio>

#include <s2lc/s2lc.hpp>

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s FILE.safetensors\n", argv[0]);
    return 2;
  }
  try {
    s2lc::io::SafetensorsFile f(argv[1]);
    const auto groups = s2lc::io::find_expert_groups(s2lc::io::tensor_refs(f));
    if (groups.empty()) return 1;
    const auto name = groups.front().name_of(groups.front().experts.front());
    const s2lc::matrix w = s2lc::load_matrix_f32(f, name);
    const auto raw = f.view<s2lc::bf16_t>(name);
    for (std::size_t i = 0; i < raw.size(); ++i)
      if (w.data()[i] != s2lc::bf16_to_f32(raw[i].bits)) return 1;
    std::printf("s2lc %s: %zu expert groups; %s is %zux%zu\n", s2lc::version.string, groups.size(), name.c_str(), w.shape()[0],
                w.shape()[1]);
    return 0;
  } catch (const s2lc::error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
