// Generates the committed seed corpus of the artifact fuzzer (tests/fuzz/corpus/artifact/): small
// valid compressed artifacts (each under 64 KB) written by compress() + build_artifact() from
// deterministic synthetic groups (4 members of 48 x 40 sharing a common part, a low-rank part on
// a shared column space, two cluster centres and noise; 16 x 16 blocks, quantization group 8),
// with options chosen so that together they hold every block kind:
//
//   valid-ratio.s2lc        ratio 10: dense, lowrank and shared blocks, shared bases
//   valid-energy-raw.s2lc   energy 1.0 (no floor): raw blocks
//   valid-ratio-drop.s2lc   ratio 40: blocks dropped (zero)
//   valid-calibrated.s2lc   ratio 8 with an input covariance (calibration)
//   valid-clusters.s2lc     ratio 3 with 2 clusters (cluster cores below the global one), F16
//   valid-copy.s2lc         ratio 6, BF16 members, plus two copied-through tensors (F32 and I32)
//
//   s2lc_fuzz_artifact_seeds DIR           writes the seeds into DIR (regenerate after a format change)
//   s2lc_fuzz_artifact_seeds --check DIR   exits 1 unless DIR holds exactly these seeds, byte for
//                                          byte (CTest fuzz_artifact_seeds_current); files named
//                                          regress-* (fuzzer reproducers) are left alone
//
// The compressor's SVDs and products go through OpenBLAS, whose kernels depend on the CPU; so
// that the bytes are the same on every x86-64 machine the program pins OpenBLAS to its generic
// kernels and one thread (OPENBLAS_CORETYPE=Prescott, OPENBLAS_NUM_THREADS=1: read when the
// library loads, so the program re-executes itself once with them set).
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <unistd.h>

#include <nlohmann/json.hpp>

#include <s2lc/compress/artifact.hpp>
#include <s2lc/compress/compressor.hpp>
#include <s2lc/compress/model.hpp>
#include <s2lc/dtype.hpp>
#include <s2lc/io/container.hpp>
#include <s2lc/tensor.hpp>

namespace {

namespace cz = s2lc::compress;
namespace io = s2lc::io;
using s2lc::dtype;
using s2lc::matrix;
using Bytes = std::vector<std::byte>;

constexpr std::size_t kRows = 48, kCols = 40, kMembers = 4;
constexpr std::size_t kMaxSeed = 64 * 1024;

/// Deterministic pseudo-Gaussian values (sum of four uniforms) from a 32-bit LCG: no <random>
/// distributions, whose output differs between standard libraries.
class Noise {
 public:
  explicit Noise(std::uint32_t seed) : x_(seed * 2654435761u + 12345u) {}
  float next() {
    double s = 0;
    for (int k = 0; k < 4; ++k) {
      x_ = x_ * 1664525u + 1013904223u;
      s += static_cast<double>(x_ >> 8) / 16777216.0 - 0.5;
    }
    return static_cast<float>(s);
  }
  matrix make(std::size_t r, std::size_t c, float scale) {
    matrix m = matrix::from_shape({r, c});
    for (auto& v : m) v = next() * scale;
    return m;
  }

 private:
  std::uint32_t x_;
};

/// a [r, k] times b [k, c], in a fixed order (no BLAS).
matrix product(const matrix& a, const matrix& b) {
  const std::size_t r = a.shape()[0], k = a.shape()[1], c = b.shape()[1];
  matrix out = matrix::from_shape({r, c});
  for (std::size_t i = 0; i < r; ++i)
    for (std::size_t j = 0; j < c; ++j) {
      float s = 0;
      for (std::size_t t = 0; t < k; ++t) s += a(i, t) * b(t, j);
      out(i, j) = s;
    }
  return out;
}

/// The synthetic group: W_e = common + centre[e % 2] + U V_e (U shared by all members) + noise.
cz::GroupInput synthetic_group(dtype type) {
  Noise n(7);
  const matrix common = n.make(kRows, kCols, 1.0f);
  const matrix centre[2] = {n.make(kRows, kCols, 0.4f), n.make(kRows, kCols, 0.4f)};
  const matrix U = n.make(kRows, 3, 0.6f);
  cz::GroupInput g;
  g.name = "layers.0.moe.experts.{E}.w1.weight";
  g.type = type;
  for (std::uint32_t e = 0; e < kMembers; ++e) {
    const matrix low = product(U, n.make(3, kCols, 0.6f));
    const matrix noise = n.make(kRows, kCols, 0.03f);
    matrix w = matrix::from_shape({kRows, kCols});
    for (std::size_t i = 0; i < w.size(); ++i)
      w.data()[i] = common.data()[i] + centre[e % 2].data()[i] + low.data()[i] + noise.data()[i];
    if (type != dtype::f32)  // members hold what the original dtype can represent
      for (auto& v : w) v = type == dtype::bf16 ? s2lc::bf16_to_f32(s2lc::f32_to_bf16(v)) : s2lc::f16_to_f32(s2lc::f32_to_f16(v));
    g.weights.push_back(std::move(w));
    g.member_names.push_back("layers.0.moe.experts." + std::to_string(e) + ".w1.weight");
    g.member_sources.push_back(0);
  }
  return g;
}

/// H = X^T X / N of deterministic activations X [64, cols] with uneven channel scales.
matrix covariance() {
  Noise n(11);
  const std::size_t N = 64;
  matrix X = n.make(N, kCols, 1.0f);
  for (std::size_t i = 0; i < N; ++i)
    for (std::size_t j = 0; j < kCols; ++j) X(i, j) *= 0.25f + static_cast<float>(j % 5);
  matrix H = matrix::from_shape({kCols, kCols});
  for (std::size_t a = 0; a < kCols; ++a)
    for (std::size_t b = 0; b < kCols; ++b) {
      double s = 0;
      for (std::size_t i = 0; i < N; ++i) s += static_cast<double>(X(i, a)) * X(i, b);
      H(a, b) = static_cast<float>(s / static_cast<double>(N));
    }
  return H;
}

cz::Options base_options() {
  cz::Options o;
  o.block_rows = 16;  // 48 x 40 -> a 3 x 3 grid, the last column of blocks 8 wide
  o.block_cols = 16;
  o.group = 8;
  o.threads = 1;
  return o;
}

struct Seed {
  std::string name;
  cz::GroupInput group;
  cz::Options opt;
  nlohmann::json flags;  ///< as the CLI records them in the manifest's "options"
  bool copies = false;
  std::vector<cz::block_kind> kinds;  ///< block kinds the seed must hold
  bool clusters = false;              ///< must have cores below the global one
};

/// A copied-through tensor's data: deterministic bytes of the given size.
Bytes pattern(std::size_t n, std::uint32_t seed) {
  Bytes b(n);
  std::uint32_t x = seed * 2654435761u + 12345u;
  for (auto& v : b) {
    x = x * 1664525u + 1013904223u;
    v = static_cast<std::byte>(x >> 24);
  }
  return b;
}

Bytes build(const Seed& s) {
  const std::vector<cz::GroupInput> in{s.group};
  const cz::Compressed c = cz::compress(in, s.opt);
  cz::ArtifactContents contents;
  contents.sources = {"synthetic.safetensors"};
  contents.metadata.push_back({{"format", "pt"}});
  contents.options = s.flags;
  contents.options["calibrated"] = {!s.group.covariance.empty()};
  // Input order: (copies first, then) the members.
  Bytes router, steps;
  if (s.copies) {
    router = pattern(4 * kMembers * kCols, 1);
    for (std::size_t i = 0; i < router.size(); i += 4) router[i + 3] = std::byte{0x3c};  // finite floats
    steps = pattern(4 * 3, 2);
    cz::TensorEntry t;
    t.name = "layers.0.moe.gate.weight";
    t.type = dtype::f32;
    t.shape = {kMembers, kCols};
    t.copy = 0;
    contents.tensors.push_back(t);
    contents.copies.push_back(router);
    t.name = "step";
    t.type = dtype::i32;
    t.shape = {3};
    t.copy = 1;
    contents.tensors.push_back(t);
    contents.copies.push_back(steps);
  }
  for (std::uint32_t e = 0; e < s.group.member_names.size(); ++e) {
    cz::TensorEntry t;
    t.name = s.group.member_names[e];
    t.type = s.group.type;
    t.shape = {kRows, kCols};
    t.group = 0;
    t.member = e;
    contents.tensors.push_back(t);
  }
  io::ContainerBuilder b;
  cz::build_artifact(b, c, contents);
  return b.to_bytes();
}

/// Problems of a generated seed: too large, not readable back, or missing what it is for.
std::string problems(const Seed& s, const Bytes& bytes) {
  if (bytes.size() >= kMaxSeed) return std::to_string(bytes.size()) + " bytes (seeds must stay under 64 KB)";
  try {
    const cz::Artifact a(bytes, s.name);
    const auto& g = a.groups().at(0);
    for (auto k : s.kinds)
      if (g.stats.blocks_by_kind[static_cast<std::size_t>(k)] == 0) return std::string("no ") + cz::block_kind_name(k) + " block";
    if (s.clusters && g.nodes.size() < 2) return "no cluster cores";
    if (s.copies && a.container().find("c0") == nullptr) return "no copied tensor";
    for (std::uint32_t e = 0; e < g.member_names.size(); ++e) (void)a.reconstruct(0, e, 2);
  } catch (const std::exception& e) {
    return std::string("does not open: ") + e.what();
  }
  return {};
}

std::vector<Seed> seed_specs() {
  using K = cz::block_kind;
  std::vector<Seed> out;
  const cz::GroupInput f32 = synthetic_group(dtype::f32);
  {
    Seed s{"valid-ratio.s2lc", f32, base_options(), {{"ratio", "10"}, {"block", "16"}, {"group", "8"}}, false, {K::dense, K::lowrank, K::shared}, false};
    s.opt.ratio = 10;
    out.push_back(s);
  }
  {
    Seed s{"valid-energy-raw.s2lc", f32, base_options(), {{"energy", "1"}, {"block", "16"}, {"group", "8"}}, false, {K::raw}, false};
    s.opt.mode = cz::target_mode::energy;
    s.opt.energy = 1.0;
    s.opt.energy_floor = 0;
    out.push_back(s);
  }
  {
    Seed s{"valid-ratio-drop.s2lc", f32, base_options(), {{"ratio", "40"}, {"block", "16"}, {"group", "8"}}, false, {K::zero}, false};
    s.opt.ratio = 40;
    out.push_back(s);
  }
  {
    Seed s{"valid-calibrated.s2lc", f32, base_options(), {{"ratio", "8"}, {"block", "16"}, {"group", "8"}, {"calib", "calib.safetensors"}}, false,
           {K::dense, K::lowrank, K::shared}, false};
    s.group.covariance = {covariance()};
    s.opt.ratio = 8;
    out.push_back(s);
  }
  {
    Seed s{"valid-clusters.s2lc", synthetic_group(dtype::f16), base_options(), {{"ratio", "3"}, {"block", "16"}, {"group", "8"}, {"clusters", "2"}}, false,
           {K::dense, K::lowrank, K::shared}, true};
    s.opt.ratio = 3;  // of F16 originals
    s.opt.hed.clusters = 2;
    out.push_back(s);
  }
  {
    Seed s{"valid-copy.s2lc", synthetic_group(dtype::bf16), base_options(), {{"ratio", "6"}, {"block", "16"}, {"group", "8"}}, true, {}, false};
    s.opt.ratio = 6;
    out.push_back(s);
  }
  return out;
}

Bytes read_file(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  const std::vector<char> c((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  Bytes b(c.size());
  if (!c.empty()) std::memcpy(b.data(), c.data(), c.size());
  return b;
}

/// Re-executes the program with OpenBLAS pinned (see the file comment); returns only if that
/// was done already or cannot be done.
void pin_openblas(char** argv) {
  if (const char* pinned = std::getenv("S2LC_SEEDS_PINNED"); pinned != nullptr && std::string_view(pinned) == "1") return;
  ::setenv("OPENBLAS_CORETYPE", "Prescott", 1);
  ::setenv("OPENBLAS_NUM_THREADS", "1", 1);
  ::setenv("S2LC_SEEDS_PINNED", "1", 1);
  ::execv("/proc/self/exe", argv);
  std::fprintf(stderr, "warning: cannot re-execute with OpenBLAS pinned (%s); the seeds may differ from the committed ones\n", std::strerror(errno));
}

}  // namespace

int main(int argc, char** argv) {
  const bool check = argc == 3 && std::string_view(argv[1]) == "--check";
  if (argc != 2 && !check) {
    std::fprintf(stderr, "usage: %s [--check] DIR\n", argv[0]);
    return 2;
  }
  pin_openblas(argv);
  const std::filesystem::path dir = argv[argc - 1];
  std::map<std::string, Bytes> all;
  int bad = 0;
  for (const auto& s : seed_specs()) {
    Bytes bytes = build(s);
    if (const std::string why = problems(s, bytes); !why.empty()) {
      std::fprintf(stderr, "seed %s: %s (adjust its options in make_artifact_seeds.cpp)\n", s.name.c_str(), why.c_str());
      ++bad;
    }
    all[s.name] = std::move(bytes);
  }
  if (bad != 0) return 1;
  if (!check) {
    std::filesystem::create_directories(dir);
    for (const auto& [name, bytes] : all) {
      std::ofstream out(dir / name, std::ios::binary | std::ios::trunc);
      out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
      if (!out) {
        std::fprintf(stderr, "cannot write %s\n", (dir / name).string().c_str());
        return 1;
      }
    }
    std::printf("wrote %zu seeds to %s\n", all.size(), dir.string().c_str());
    return 0;
  }
  int stale = 0;
  for (const auto& [name, bytes] : all) {
    if (!std::filesystem::is_regular_file(dir / name) || read_file(dir / name) != bytes) {
      std::fprintf(stderr, "seed %s is missing or stale\n", name.c_str());
      ++stale;
    }
  }
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(dir, ec)) {
    const std::string name = entry.path().filename().string();
    if (all.count(name) == 0 && name.rfind("regress-", 0) != 0) {
      std::fprintf(stderr, "unexpected file %s (seeds come from make_artifact_seeds.cpp; reproducers are named regress-*)\n", name.c_str());
      ++stale;
    }
  }
  if (ec) {
    std::fprintf(stderr, "cannot list %s: %s\n", dir.string().c_str(), ec.message().c_str());
    return 1;
  }
  if (stale != 0) {
    std::fprintf(stderr, "%d seed file(s) differ: regenerate with %s %s\n", stale, argv[0], dir.string().c_str());
    return 1;
  }
  std::printf("%zu seeds current in %s\n", all.size(), dir.string().c_str());
  return 0;
}
