// libFuzzer harness for the .s2lc container reader (s2lc::io::parse_container).
//
// Contract checked on every input:
//   * parse_container either returns a view or throws an s2lc::error naming the input (a
//     rejection). Any other exception, a crash, a hang, or an ASan / UBSan report is a bug.
//   * An accepted view is consistent with the bytes: every section lies inside [64, table_offset)
//     of the input (each byte is read, so ASan sees any overrun), at a multiple of 64, with
//     size == numel * dtype size, a valid unique name that find() returns, its stored checksum,
//     and no overlap with another section; json sections parse or throw a format_error naming
//     the section.
//   * container_checks::structure accepts whatever full accepts, and when it accepts something
//     full rejects, verify() throws the same error.
//   * Round trip: the accepted sections rebuilt with ContainerBuilder parse back to the same
//     names, kinds, dtypes, shapes, bytes and JSON; rebuilding that gives identical bytes.
//
// The header and table checksums make almost every mutation of a valid file fail at the header,
// so each input is also tried "resealed": with both checksums recomputed (when the table range
// is inside the input; s2lc_fuzz::resealed in fixup.hpp, shared with artifact_fuzz.cpp). That
// lets the fuzzer reach the table and section checks; the section checksums stay as they are, so
// corrupt data are still reported as checksum mismatches.
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

#include <s2lc/io/container.hpp>

#include "fixup.hpp"

namespace {

namespace io = s2lc::io;

constexpr const char* kLabel = "fuzz-input";

[[noreturn]] void fail(const char* what, const std::string& detail = {}) {
  std::fprintf(stderr, "container_fuzz: invariant violated: %s %s\n", what, detail.c_str());
  std::fflush(stderr);
  std::abort();
}

void require(bool ok, const char* what, const std::string& detail = {}) {
  if (!ok) fail(what, detail);
}

/// FNV-1a over a section's bytes: reads every byte, so an out-of-bounds span trips ASan.
std::uint64_t checksum(std::span<const std::byte> bytes) {
  std::uint64_t h = 1469598103934665603ull;
  for (std::byte b : bytes) h = (h ^ static_cast<std::uint64_t>(b)) * 1099511628211ull;
  return h;
}

/// Checks an accepted view against the bytes it came from.
void check_view(std::span<const std::byte> file, const io::ContainerView& v, bool checksums_verified) {
  const auto& h = v.header();
  const std::uint64_t size = file.size();
  require(v.file().data() == file.data() && v.file().size() == file.size(), "view does not cover the input");
  require(h.version_major == 1 && h.flags == 0, "bad version or flags accepted");
  require(h.file_size == size, "file_size disagrees with the input");
  require(h.table_offset >= 64 && h.table_offset % 64 == 0 && h.table_offset <= size && h.table_size == size - h.table_offset,
          "table range not validated");
  require(h.section_count == v.sections().size(), "section count disagrees with the sections");
  std::vector<const io::ContainerSection*> by_offset;
  static volatile std::uint64_t sink = 0;
  for (const auto& s : v.sections()) {
    require(io::detail::section_name_problem(s.name).empty(), "invalid name accepted", io::detail::printable_name(s.name));
    require(v.find(s.name) == &s, "find() does not return the section", s.name);
    require(s.shape.size() <= io::container_max_rank, "rank above 4 accepted", s.name);
    require(s.offset >= 64 && s.offset % 64 == 0, "misaligned section accepted", s.name);
    require(s.size <= h.table_offset && s.offset <= h.table_offset - s.size, "section outside [64, table_offset)", s.name);
    const auto nbytes = io::detail::section_nbytes(s.type, s.shape);
    require(nbytes.has_value() && *nbytes == s.size, "size disagrees with shape x dtype", s.name);
    require(s.bytes.data() == file.data() + s.offset && s.bytes.size() == s.size, "bytes do not view the section's range", s.name);
    if (s.kind == io::section_kind::json) require(s.type == s2lc::dtype::u8 && s.shape.size() == 1, "json section is not rank-1 U8", s.name);
    sink = sink ^ checksum(s.bytes);
    if (checksums_verified) require(io::crc32c(s.bytes) == s.crc, "checksum mismatch accepted", s.name);
    if (s.size > 0) by_offset.push_back(&s);
  }
  std::sort(by_offset.begin(), by_offset.end(), [](auto* a, auto* b) { return a->offset < b->offset; });
  for (std::size_t i = 1; i < by_offset.size(); ++i)
    require(by_offset[i - 1]->offset + by_offset[i - 1]->size <= by_offset[i]->offset, "overlapping sections accepted", by_offset[i]->name);
}

/// The JSON of a json section, or nullopt when it is rejected (which must be a format_error).
std::optional<nlohmann::json> json_of(const io::ContainerView& v, const io::ContainerSection& s) {
  try {
    return v.json(s.name);
  } catch (const s2lc::format_error& e) {
    require(e.file() == v.label() && e.tensor() == s.name && e.offset().has_value(), "json error does not name file, section and offset", e.what());
    require(*e.offset() >= s.offset && *e.offset() <= s.offset + s.size, "json error offset outside the section", e.what());
    return std::nullopt;
  }
}

io::ContainerBuilder rebuild(const io::ContainerView& v) {
  io::ContainerBuilder b;
  for (const auto& s : v.sections()) {
    if (s.kind == io::section_kind::json) {
      if (auto j = json_of(v, s)) b.add_json(s.name, *j);
    } else {
      b.add_array(s.name, s.type, s.shape, s.bytes);
    }
  }
  return b;
}

void check_round_trip(const io::ContainerView& v) {
  const std::vector<std::byte> again = rebuild(v).to_bytes();
  const auto w = io::parse_container(again, "fuzz-roundtrip");
  check_view(again, w, true);
  std::size_t k = 0;
  for (const auto& s : v.sections()) {
    std::optional<nlohmann::json> j;
    if (s.kind == io::section_kind::json && !(j = json_of(v, s))) continue;  // not carried over
    require(k < w.sections().size(), "round trip lost a section", s.name);
    const auto& t = w.sections()[k++];
    require(t.name == s.name && t.kind == s.kind && t.type == s.type && t.shape == s.shape, "round trip changed a section", s.name);
    if (j)
      require(w.json(t.name) == *j, "round trip changed the JSON", s.name);
    else
      require(std::equal(s.bytes.begin(), s.bytes.end(), t.bytes.begin(), t.bytes.end()), "round trip changed the data", s.name);
  }
  require(k == w.sections().size(), "round trip added sections");
  require(rebuild(w).to_bytes() == again, "re-serialising the round-tripped container changed its bytes");
}

void check_input(std::span<const std::byte> file) {
  std::optional<io::ContainerView> full, structure;
  std::string full_error;
  try {
    full = io::parse_container(file, kLabel);
  } catch (const s2lc::error& e) {
    require(e.file() == kLabel && e.offset().has_value(), "error does not name the file and offset", e.what());
    full_error = e.what();
  }
  try {
    structure = io::parse_container(file, kLabel, io::container_checks::structure);
  } catch (const s2lc::error& e) {
    require(e.file() == kLabel && e.offset().has_value(), "error does not name the file and offset", e.what());
    require(!full, "structure-only parsing rejects what full parsing accepts", e.what());
    require(full_error == e.what(), "structure-only and full parsing reject differently", full_error + " vs " + e.what());
  }
  if (structure) {
    check_view(file, *structure, false);
    std::string verify_error;
    try {
      structure->verify();
    } catch (const s2lc::format_error& e) {
      verify_error = e.what();
    }
    require(verify_error == full_error, "verify() disagrees with full parsing", verify_error + " vs " + full_error);
  }
  if (full) {
    check_view(file, *full, true);
    check_round_trip(*full);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::span<const std::byte> file(reinterpret_cast<const std::byte*>(data), size);
  try {
    check_input(file);
    if (const auto sealed = s2lc_fuzz::resealed(file)) check_input(*sealed);
  } catch (const std::exception& e) {
    fail("unexpected exception:", e.what());
  } catch (...) {
    fail("a non-std exception escaped");
  }
  return 0;
}
