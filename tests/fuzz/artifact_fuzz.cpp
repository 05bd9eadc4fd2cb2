// libFuzzer harness for the compressed-artifact reader (s2lc::compress::Artifact, built on the
// .s2lc container): the manifest JSON, the block records g{i}.blocks, the bases g{i}.bases and
// the payloads g{i}.data.
//
// Contract checked on every input:
//   * Artifact(bytes, label) either accepts the input or throws an s2lc::format_error naming the
//     input and a byte offset (a rejection). Any other exception, a crash, a hang, a leak or an
//     ASan / UBSan report is a bug.
//   * An accepted artifact can be used: every member of every group whose rows * cols * members
//     is at most 2^20 reconstructs (as stored, and at tiers 4 and 2) to a [rows, cols] matrix
//     whose every value is read; every tensor of at most 2^22 bytes yields tensor_bytes() of
//     numel x dtype size bytes (a copied tensor: exactly its section's bytes; an f32 member:
//     exactly its reconstruction). None of these may throw.
//
// The container's checksums would stop almost every mutation before the artifact reader, so each
// input is also tried with every section checksum and the table and header checksums recomputed
// (s2lc_fuzz::resealed_all, fixup.hpp): mutations of the manifest, the records and the payloads
// then reach the checks in artifact.hpp.
//
// Built with -fsanitize=fuzzer by tests/fuzz/CMakeLists.txt; tests/fuzz/replay_main.cpp turns the
// same function into a corpus replayer for ordinary (g++) builds.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include <s2lc/compress/artifact.hpp>
#include <s2lc/compress/model.hpp>
#include <s2lc/dtype.hpp>
#include <s2lc/error.hpp>

#include "fixup.hpp"

namespace {

namespace cz = s2lc::compress;

constexpr const char* kLabel = "fuzz-input";
constexpr std::uint64_t kMaxGroupValues = std::uint64_t{1} << 20;  // rows * cols * members
constexpr std::uint64_t kMaxTensorBytes = std::uint64_t{1} << 22;

[[noreturn]] void fail(const char* what, const std::string& detail = {}) {
  std::fprintf(stderr, "artifact_fuzz: invariant violated: %s %s\n", what, detail.c_str());
  std::fflush(stderr);
  std::abort();
}

void require(bool ok, const char* what, const std::string& detail = {}) {
  if (!ok) fail(what, detail);
}

/// a * b, or nullopt on overflow.
std::optional<std::uint64_t> mul(std::uint64_t a, std::uint64_t b) {
  std::uint64_t r = 0;
  if (__builtin_mul_overflow(a, b, &r)) return std::nullopt;
  return r;
}

/// FNV-1a over the bytes: reads every byte, so an out-of-bounds span trips ASan.
std::uint64_t checksum(std::span<const std::byte> bytes) {
  std::uint64_t h = 1469598103934665603ull;
  for (std::byte b : bytes) h = (h ^ static_cast<std::uint64_t>(b)) * 1099511628211ull;
  return h;
}

volatile std::uint64_t sink = 0;

void use(std::span<const std::byte> bytes) { sink = sink ^ checksum(bytes); }

void use(const s2lc::matrix& m) { use(std::as_bytes(std::span<const float>(m.data(), m.size()))); }

void check_accepted(const cz::Artifact& a) {
  const auto& groups = a.groups();
  for (std::size_t gi = 0; gi < groups.size(); ++gi) {
    const auto& g = groups[gi];
    const std::string ctx = "group " + std::to_string(gi);
    const auto area = mul(g.grid.rows, g.grid.cols);
    const auto values = area ? mul(*area, g.member_names.size()) : std::nullopt;
    require(g.residuals.size() == g.member_names.size(), "one residual per member", ctx);
    if (!values || *values > kMaxGroupValues) continue;
    for (std::uint32_t e = 0; e < g.member_names.size(); ++e)
      for (unsigned tier : {0u, 4u, 2u}) {
        const s2lc::matrix m = a.reconstruct(gi, e, tier);
        require(m.dimension() == 2 && m.shape()[0] == g.grid.rows && m.shape()[1] == g.grid.cols, "reconstruction has the wrong shape", ctx);
        use(m);
      }
  }
  for (const auto& t : a.tensors()) {
    std::optional<std::uint64_t> nbytes = s2lc::dtype_size(t.type);
    for (auto d : t.shape) nbytes = nbytes ? mul(*nbytes, d) : std::nullopt;
    if (!nbytes || *nbytes > kMaxTensorBytes) continue;
    const std::vector<std::byte> b = a.tensor_bytes(t);
    require(b.size() == *nbytes, "tensor_bytes has the wrong size", t.name);
    use(b);
    if (t.copy >= 0) {
      const auto s = a.container().bytes("c" + std::to_string(t.copy));
      require(b.size() == s.size() && std::memcmp(b.data(), s.data(), b.size()) == 0, "a copied tensor differs from its section", t.name);
    } else if (t.type == s2lc::dtype::f32) {
      const s2lc::matrix m = a.reconstruct(static_cast<std::size_t>(t.group), t.member);
      require(b.size() == 4 * m.size() && std::memcmp(b.data(), m.data(), b.size()) == 0, "an f32 tensor differs from its reconstruction", t.name);
    }
  }
}

void check_input(std::span<const std::byte> file) {
  std::optional<cz::Artifact> a;
  try {
    a.emplace(file, kLabel);
  } catch (const s2lc::format_error& e) {
    require(e.file() == kLabel && e.offset().has_value(), "error does not name the file and offset", e.what());
    require(*e.offset() <= file.size(), "error offset past the end of the input", e.what());
    return;
  } catch (const s2lc::error& e) {
    fail("a rejection that is not a format_error:", e.what());
  }
  check_accepted(*a);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::span<const std::byte> file(reinterpret_cast<const std::byte*>(data), size);
  try {
    check_input(file);
    if (const auto sealed = s2lc_fuzz::resealed_all(file); sealed && !std::equal(sealed->begin(), sealed->end(), file.begin(), file.end()))
      check_input(*sealed);
  } catch (const std::exception& e) {
    fail("unexpected exception:", e.what());
  } catch (...) {
    fail("a non-std exception escaped");
  }
  return 0;
}
