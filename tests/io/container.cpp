// Tests for s2lc/io/crc32c.hpp and s2lc/io/container.hpp: CRC-32C test vectors, bit-exact round
// trips of every dtype and rank through ContainerBuilder / ContainerFile, the documented byte
// layout, every rejection of a malformed container (with its message, section and byte offset),
// and the crash-safe writer.
#include <doctest/doctest.h>

#include "support.hpp"

#include <s2lc/io/container.hpp>
#include <s2lc/io/crc32c.hpp>

#include <algorithm>
#include <array>
#include <csignal>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <sys/resource.h>

// The suite's own scope: the suites compile in unity groups (tests/CMakeLists.txt).
namespace suite_io_container {

namespace {

namespace io = s2lc::io;
using s2lc::dtype;
using Bytes = std::vector<std::byte>;

constexpr const char* kLabel = "mem.s2lc";
constexpr std::uint64_t kMax64 = ~std::uint64_t{0};

/// Deterministic pseudo-random bytes.
Bytes pattern(std::size_t n, std::uint32_t seed) {
  Bytes b(n);
  std::uint32_t x = seed * 2654435761u + 12345u;
  for (auto& v : b) {
    x = x * 1664525u + 1013904223u;
    v = static_cast<std::byte>(x >> 24);
  }
  return b;
}

Bytes text_bytes(std::string_view s) {
  Bytes b(s.size());
  if (!s.empty()) std::memcpy(b.data(), s.data(), s.size());
  return b;
}

bool contains(std::string_view hay, std::string_view needle) { return hay.find(needle) != std::string_view::npos; }

bool same_bytes(std::span<const std::byte> a, std::span<const std::byte> b) { return std::equal(a.begin(), a.end(), b.begin(), b.end()); }

std::uint64_t align64(std::uint64_t v) { return (v + 63) / 64 * 64; }

void put_le(Bytes& b, std::uint64_t at, std::uint64_t v, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) b[static_cast<std::size_t>(at) + i] = static_cast<std::byte>((v >> (8 * i)) & 0xFFu);
}
std::uint64_t get_le(const Bytes& b, std::uint64_t at, std::size_t n) {
  std::uint64_t v = 0;
  for (std::size_t i = n; i-- > 0;) v = (v << 8) | static_cast<std::uint64_t>(b[static_cast<std::size_t>(at) + i]);
  return v;
}

/// Bit-at-a-time CRC-32C: the definition the slice-by-8 tables must agree with.
std::uint32_t crc32c_reference(std::span<const std::byte> data) {
  std::uint32_t c = 0xFFFFFFFFu;
  for (std::byte b : data) {
    c ^= static_cast<std::uint32_t>(b);
    for (int k = 0; k < 8; ++k) c = (c & 1u) != 0 ? (c >> 1) ^ 0x82F63B78u : c >> 1;
  }
  return ~c;
}

/// Recomputes the table checksum (when the header's table range is inside the file) and the
/// header checksum, so a test can reach the check behind them.
void reseal(Bytes& f) {
  const std::uint64_t off = get_le(f, 24, 8), size = get_le(f, 32, 8);
  if (off <= f.size() && size <= f.size() - off)
    put_le(f, 48, io::crc32c(std::span<const std::byte>(f).subspan(static_cast<std::size_t>(off), static_cast<std::size_t>(size))), 4);
  put_le(f, 60, io::crc32c(std::span<const std::byte>(f).first(60)), 4);
}

/// A hand-made container: any field may be wrong, so the reader's checks can be reached one by
/// one. Checksums are correct unless given; the table follows `body` at the next multiple of 64.
struct RawSection {
  std::string name;
  std::uint16_t kind = 1;
  std::uint8_t code = 0;  // U8
  std::vector<std::uint64_t> dims;
  std::uint64_t offset = 64;
  std::uint64_t size = 0;
  std::optional<std::uint32_t> crc;  // default: CRC of the file bytes [offset, offset + size), if inside
};

struct RawFile {
  Bytes body;  // file bytes [64, 64 + body.size())
  std::vector<RawSection> sections;
  Bytes table_tail;  // appended after the entries
  std::optional<std::uint64_t> section_count;

  /// Absolute offsets of each entry's fields (filled by serialise()).
  struct Fields {
    std::uint64_t entry, name, kind, dtype, rank, dims, offset, size, crc;
  };
  mutable std::vector<Fields> fields;
  mutable std::uint64_t table_offset = 0;

  Bytes serialise() const {
    table_offset = 64 + align64(body.size());
    Bytes f(static_cast<std::size_t>(table_offset), std::byte{0});
    std::copy(body.begin(), body.end(), f.begin() + 64);
    fields.clear();
    Bytes table;
    for (const auto& s : sections) {
      Fields at{};
      auto pos = [&] { return table_offset + table.size(); };
      auto put = [&](std::uint64_t v, std::size_t n) {
        for (std::size_t i = 0; i < n; ++i) table.push_back(static_cast<std::byte>((v >> (8 * i)) & 0xFFu));
      };
      at.entry = pos();
      put(s.name.size(), 2);
      at.name = pos();
      for (char c : s.name) table.push_back(static_cast<std::byte>(c));
      at.kind = pos();
      put(s.kind, 2);
      at.dtype = pos();
      put(s.code, 1);
      at.rank = pos();
      put(s.dims.size(), 1);
      at.dims = pos();
      for (auto d : s.dims) put(d, 8);
      at.offset = pos();
      put(s.offset, 8);
      at.size = pos();
      put(s.size, 8);
      at.crc = pos();
      std::uint32_t crc = 0;
      if (s.crc) {
        crc = *s.crc;
      } else if (s.offset <= f.size() && s.size <= f.size() - s.offset) {
        crc = io::crc32c(std::span<const std::byte>(f).subspan(static_cast<std::size_t>(s.offset), static_cast<std::size_t>(s.size)));
      }
      put(crc, 4);
      fields.push_back(at);
    }
    table.insert(table.end(), table_tail.begin(), table_tail.end());
    f.insert(f.end(), table.begin(), table.end());
    std::copy(io::container_magic.begin(), io::container_magic.end(), f.begin());
    put_le(f, 8, 1, 2);
    put_le(f, 16, section_count.value_or(sections.size()), 8);
    put_le(f, 24, table_offset, 8);
    put_le(f, 32, table.size(), 8);
    put_le(f, 40, f.size(), 8);
    reseal(f);
    return f;
  }
};

/// Two valid sections laid out by hand: "a" = 100 bytes of U8 at 64, "b" = F32 [4, 2] at 192.
RawFile two_sections() {
  RawFile r;
  r.body = pattern(192, 5);
  std::fill(r.body.begin() + 100, r.body.begin() + 128, std::byte{0});  // padding after "a"
  std::fill(r.body.begin() + 160, r.body.end(), std::byte{0});          // padding after "b"
  r.sections = {{"a", 1, 0, {100}, 64, 100, {}}, {"b", 1, 10, {4, 2}, 192, 32, {}}};
  return r;
}

/// A builder-made container with a JSON manifest, arrays of several dtypes and ranks, raw bytes
/// and an empty array.
io::ContainerBuilder sample_builder() {
  io::ContainerBuilder b;
  b.add_json("manifest", {{"format", "s2lc"}, {"experts", 8}, {"names", {"w1", "w2"}}, {"note", "ünïcødé ✓"}});
  const Bytes coeff = pattern(3 * 5 * 4, 11);
  b.add_array("experts.3.coeff", dtype::f32, {3, 5}, coeff);
  const Bytes idx = pattern(7 * 8, 12);
  b.add_array("experts.3.index", dtype::i64, {7}, idx);
  b.add_bytes("blob", pattern(130, 13));
  b.add_array("empty", dtype::bf16, {0, 9}, {});
  b.add_array("scalar", dtype::f64, {}, pattern(8, 14));
  return b;
}

/// The format_error parse_container throws for `file`, or nullopt if it accepts it. Any other
/// exception escapes (and fails the test).
std::optional<s2lc::format_error> rejection(const Bytes& file, io::container_checks checks = io::container_checks::full) {
  try {
    (void)io::parse_container(file, kLabel, checks);
  } catch (const s2lc::format_error& e) {
    return e;
  }
  return std::nullopt;
}

/// Files in `dir` (to spot left-over temporaries).
std::vector<std::string> listing(const std::filesystem::path& dir) {
  std::vector<std::string> names;
  for (const auto& e : std::filesystem::directory_iterator(dir)) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

}  // namespace

#define CHECK_CONTAINS(str, needle) \
  CHECK_MESSAGE(contains((str), (needle)), "\"" << std::string(str) << "\" does not contain \"" << std::string(needle) << "\"")

namespace {

/// parse_container must reject `file` with a message containing `needle`, naming the section
/// `section` ("" for none), the byte offset `offset` and the file's label. An out-of-line
/// function (not a macro) so its assertions are compiled once, not at each of the dozens of call
/// sites; CHECK_REJECTS below records the call site.
[[gnu::noinline]] void check_rejects(int line, const Bytes& file, std::string_view needle, const std::string& section, std::uint64_t offset) {
  INFO("CHECK_REJECTS called from line " << line);
  const auto e = rejection(file);
  REQUIRE_MESSAGE(e.has_value(), "malformed container accepted");
  INFO("what(): " << std::string(e->what()));
  CHECK_CONTAINS(e->message(), needle);
  CHECK(e->file() == kLabel);
  CHECK(e->tensor() == section);
  REQUIRE(e->offset().has_value());
  CHECK(*e->offset() == offset);
  CHECK_CONTAINS(e->what(), std::string("file '") + kLabel + "'");
}

}  // namespace

/// parse_container must reject `file_` with a message containing `needle_`, naming the section
/// `section_` ("" for none), the byte offset `offset_` and the file's label.
#define CHECK_REJECTS(file_, needle_, section_, offset_) \
  check_rejects(__LINE__, (file_), (needle_), std::string(section_), static_cast<std::uint64_t>(offset_))

// ---------------------------------------------------------------------------------------------
// CRC-32C.

TEST_CASE("container: crc32c matches the standard test vectors, at compile time too") {
  constexpr auto digits = [] {
    std::array<std::byte, 9> a{};
    for (std::size_t i = 0; i < a.size(); ++i) a[i] = static_cast<std::byte>('1' + i);
    return a;
  }();
  static_assert(io::crc32c(digits) == 0xE3069283u);
  static_assert(io::crc32c(std::span<const std::byte>{}) == 0u);
  CHECK(io::crc32c(text_bytes("123456789")) == 0xE3069283u);
  CHECK(io::crc32c(text_bytes("a")) == 0xC1D04330u);
  // RFC 3720 (iSCSI), appendix B.4.
  Bytes b(32);
  std::fill(b.begin(), b.end(), std::byte{0});
  CHECK(io::crc32c(b) == 0x8A9136AAu);
  std::fill(b.begin(), b.end(), std::byte{0xFF});
  CHECK(io::crc32c(b) == 0x62A8AB43u);
  for (std::size_t i = 0; i < 32; ++i) b[i] = static_cast<std::byte>(i);
  CHECK(io::crc32c(b) == 0x46DD794Eu);
  for (std::size_t i = 0; i < 32; ++i) b[i] = static_cast<std::byte>(31 - i);
  CHECK(io::crc32c(b) == 0x113FDB5Cu);
}

TEST_CASE("container: crc32c slice-by-8 equals the bitwise definition, incremental equals one-shot") {
  const Bytes data = pattern(1000, 3);
  const std::span<const std::byte> all(data);
  // Every length and start alignment of the 8-byte loop and the byte tail.
  for (std::size_t start = 0; start < 9; ++start)
    for (std::size_t n = 0; n + start <= 80; ++n) {
      CAPTURE(start);
      CAPTURE(n);
      CHECK(io::crc32c(all.subspan(start, n)) == crc32c_reference(all.subspan(start, n)));
    }
  CHECK(io::crc32c(all) == crc32c_reference(all));
  const std::uint32_t whole = io::crc32c(all);
  for (std::size_t cut = 0; cut <= data.size(); ++cut) {
    CAPTURE(cut);
    CHECK(io::crc32c_extend(io::crc32c(all.first(cut)), all.subspan(cut)) == whole);
  }
  // Many small pieces of uneven sizes.
  std::uint32_t c = 0;
  for (std::size_t pos = 0, step = 1; pos < data.size(); pos += step, step = step % 13 + 1)
    c = io::crc32c_extend(c, all.subspan(pos, std::min(step, data.size() - pos)));
  CHECK(c == whole);
  CHECK(io::crc32c_extend(0, all) == whole);
  CHECK(io::crc32c_extend(whole, {}) == whole);
}

// ---------------------------------------------------------------------------------------------
// Round trips and layout.

TEST_CASE("container: every dtype and rank 0..4 round-trips bit-exactly through write and ContainerFile") {
  s2lc::test::TempDir dir;
  io::ContainerBuilder b;
  struct Expect {
    std::string name;
    dtype type;
    std::vector<std::uint64_t> shape;
    Bytes data;
  };
  std::vector<Expect> expect;
  std::uint32_t seed = 100;
  const std::vector<std::vector<std::uint64_t>> shapes{{}, {5}, {3, 2}, {2, 1, 3}, {1, 2, 3, 2}, {4, 0}};
  for (dtype t : s2lc::all_dtypes)
    for (const auto& shape : shapes) {
      std::uint64_t numel = 1;
      for (auto d : shape) numel *= d;
      Expect e{std::string(s2lc::dtype_name(t)) + ".r" + std::to_string(shape.size()) + (numel == 0 ? ".empty" : ""), t, shape,
               pattern(static_cast<std::size_t>(numel * s2lc::dtype_size(t)), seed++)};
      b.add_array(e.name, t, e.shape, e.data);
      expect.push_back(std::move(e));
    }
  const nlohmann::json manifest = {{"format", "s2lc"}, {"version", 1}, {"experts", {0, 1, 2}}, {"ratio", 0.125}, {"text", "ünïcødé ✓ \"q\"\n"}};
  b.add_json("manifest", manifest);
  const Bytes raw = pattern(1000, 7);
  b.add_bytes("raw", raw);
  const std::vector<float> typed{1.5f, -2.0f, 3.25f, 0.0f, 1e-30f, -7.0f};
  b.add_array<float>("typed", {2, 3}, typed);
  CHECK(b.size() == expect.size() + 3);
  CHECK(b.contains("manifest"));
  CHECK(!b.contains("nope"));

  const auto path = dir / "all.s2lc";
  b.write(path);
  CHECK(listing(dir.path()) == std::vector<std::string>{"all.s2lc"});
  const Bytes on_disk = s2lc::test::read_bytes(path);
  CHECK(on_disk == b.to_bytes());
  CHECK(on_disk.size() == b.file_size());

  const io::ContainerFile f = io::ContainerFile::open(path);
  CHECK(f.path() == path);
  CHECK(f.file_size() == on_disk.size());
  CHECK(f.header().version_major == 1);
  CHECK(f.header().version_minor == 0);
  CHECK(f.header().section_count == expect.size() + 3);
  REQUIRE(f.sections().size() == expect.size() + 3);
  for (std::size_t i = 0; i < expect.size(); ++i) {
    const auto& e = expect[i];
    CAPTURE(e.name);
    const auto& s = f.sections()[i];  // table order is insertion order
    CHECK(s.name == e.name);
    CHECK(s.kind == io::section_kind::array);
    CHECK(s.type == e.type);
    CHECK(s.shape == e.shape);
    CHECK(s.size == e.data.size());
    CHECK(s.crc == io::crc32c(e.data));
    CHECK(same_bytes(s.bytes, e.data));
    CHECK(same_bytes(f.bytes(e.name), e.data));
    CHECK(f.find(e.name) == &s);
  }
  CHECK(f.json("manifest") == manifest);
  CHECK(f.at("manifest").kind == io::section_kind::json);
  CHECK(f.at("manifest").type == dtype::u8);
  CHECK(same_bytes(f.bytes("raw"), raw));
  CHECK(f.at("raw").shape == std::vector<std::uint64_t>{1000});
  const auto t = f.array<float>("typed");
  CHECK(std::vector<float>(t.begin(), t.end()) == typed);
  CHECK(f.array<double>("F64.r0").size() == 1);
  CHECK(f.array<s2lc::bf16_t>("BF16.r1").size() == 5);
  CHECK(f.array<std::int64_t>("I64.r4").size() == 12);
  CHECK(f.array<std::uint8_t>("U8.r2.empty").empty());
  CHECK(f.find("missing") == nullptr);

  // Every section starts at a multiple of 64 of the file and of memory; data run in order, with
  // less than 64 bytes of zero padding between them; the table follows at a multiple of 64.
  std::uint64_t end = 64;
  for (const auto& s : f.sections()) {
    CAPTURE(s.name);
    CHECK(s.offset % 64 == 0);
    CHECK(reinterpret_cast<std::uintptr_t>(s.bytes.data()) % 64 == 0);
    CHECK(s.offset == align64(end));
    for (std::uint64_t i = end; i < s.offset; ++i) CHECK(on_disk[static_cast<std::size_t>(i)] == std::byte{0});
    end = s.offset + s.size;
  }
  CHECK(f.header().table_offset == align64(end));
  CHECK(f.header().table_offset + f.header().table_size == f.file_size());

  // Moving the file object keeps its views valid (the mapping does not move).
  const auto before = f.bytes("raw").data();
  io::ContainerFile moved = io::ContainerFile::open(path);
  io::ContainerFile target(std::move(moved));
  CHECK(same_bytes(target.bytes("raw"), raw));
  CHECK(before != nullptr);

  // Re-building from what was read gives the same bytes.
  io::ContainerBuilder again;
  for (const auto& s : f.sections()) {
    if (s.kind == io::section_kind::json)
      again.add_json(s.name, f.json(s.name));
    else
      again.add_array(s.name, s.type, s.shape, s.bytes);
  }
  CHECK(again.to_bytes() == on_disk);
}

TEST_CASE("container: the bytes are laid out as documented") {
  io::ContainerBuilder b;
  b.add_json("m", {{"k", 1}});  // 7 bytes: {"k":1}
  const Bytes w = pattern(24, 2);
  b.add_array("w", dtype::bf16, {3, 4}, w);
  const Bytes f = b.to_bytes();
  REQUIRE(f.size() >= 64);
  const std::array<std::uint8_t, 8> magic{'S', '2', 'L', 'C', 0x0D, 0x0A, 0x1A, 0x0A};
  for (std::size_t i = 0; i < 8; ++i) CHECK(static_cast<std::uint8_t>(f[i]) == magic[i]);
  CHECK(get_le(f, 8, 2) == 1);    // version_major
  CHECK(get_le(f, 10, 2) == 0);   // version_minor
  CHECK(get_le(f, 12, 4) == 0);   // flags
  CHECK(get_le(f, 16, 8) == 2);   // section_count
  const std::uint64_t table_offset = get_le(f, 24, 8), table_size = get_le(f, 32, 8);
  CHECK(table_offset == 192);     // header, "m" padded to 64, "w" padded to 64
  CHECK(get_le(f, 40, 8) == f.size());
  CHECK(table_offset + table_size == f.size());
  const std::span<const std::byte> all(f);
  CHECK(get_le(f, 48, 4) == io::crc32c(all.subspan(static_cast<std::size_t>(table_offset))));
  for (std::size_t i = 52; i < 60; ++i) CHECK(f[i] == std::byte{0});
  CHECK(get_le(f, 60, 4) == io::crc32c(all.first(60)));
  // Section data.
  CHECK(same_bytes(all.subspan(64, 7), text_bytes("{\"k\":1}")));
  CHECK(same_bytes(all.subspan(128, 24), w));
  // Table entry 0: "m", json, U8, rank 1, [7], offset 64, size 7, crc.
  std::uint64_t p = table_offset;
  CHECK(get_le(f, p, 2) == 1);
  CHECK(static_cast<char>(f[static_cast<std::size_t>(p + 2)]) == 'm');
  CHECK(get_le(f, p + 3, 2) == 0);   // kind json
  CHECK(get_le(f, p + 5, 1) == 0);   // U8
  CHECK(get_le(f, p + 6, 1) == 1);   // rank
  CHECK(get_le(f, p + 7, 8) == 7);   // dims[0]
  CHECK(get_le(f, p + 15, 8) == 64);
  CHECK(get_le(f, p + 23, 8) == 7);
  CHECK(get_le(f, p + 31, 4) == io::crc32c(all.subspan(64, 7)));
  p += 35;
  // Table entry 1: "w", array, BF16 (code 9), rank 2, [3, 4], offset 128, size 24, crc.
  CHECK(get_le(f, p, 2) == 1);
  CHECK(static_cast<char>(f[static_cast<std::size_t>(p + 2)]) == 'w');
  CHECK(get_le(f, p + 3, 2) == 1);
  CHECK(get_le(f, p + 5, 1) == 9);
  CHECK(get_le(f, p + 6, 1) == 2);
  CHECK(get_le(f, p + 7, 8) == 3);
  CHECK(get_le(f, p + 15, 8) == 4);
  CHECK(get_le(f, p + 23, 8) == 128);
  CHECK(get_le(f, p + 31, 8) == 24);
  CHECK(get_le(f, p + 39, 4) == io::crc32c(w));
  CHECK(p + 43 == f.size());
  // The dtype codes are the documented table.
  const dtype by_code[] = {dtype::u8,  dtype::i8,  dtype::u16, dtype::i16, dtype::u32,     dtype::i32,     dtype::u64,    dtype::i64,
                           dtype::f16, dtype::bf16, dtype::f32, dtype::f64, dtype::boolean, dtype::f8_e5m2, dtype::f8_e4m3};
  for (std::size_t c = 0; c < std::size(by_code); ++c) {
    CHECK(io::container_dtype_code(by_code[c]) == c);
    CHECK(io::container_dtype_from_code(static_cast<std::uint8_t>(c)) == by_code[c]);
  }
  CHECK(!io::container_dtype_from_code(15).has_value());
  CHECK(!io::container_dtype_from_code(255).has_value());
}

TEST_CASE("container: an empty container is a 64-byte header and an empty table") {
  const io::ContainerBuilder b;
  const Bytes f = b.to_bytes();
  CHECK(f.size() == 64);
  const auto v = io::parse_container(f, kLabel);
  CHECK(v.sections().empty());
  CHECK(v.header().table_offset == 64);
  CHECK(v.header().table_size == 0);
  CHECK(v.find("x") == nullptr);
  CHECK(v.label() == kLabel);
}

TEST_CASE("container: valid edge cases are accepted: minor versions, 255-byte and UTF-8 names, empty sections anywhere, gaps") {
  SUBCASE("a newer minor version") {
    Bytes f = sample_builder().to_bytes();
    put_le(f, 10, 7, 2);
    reseal(f);
    CHECK(io::parse_container(f, kLabel).header().version_minor == 7);
  }
  SUBCASE("names of 255 bytes and multi-byte UTF-8") {
    io::ContainerBuilder b;
    const std::string long_name(255, 'n');
    b.add_bytes(long_name, pattern(3, 1));
    b.add_bytes("专家.3.系数", pattern(3, 2));
    b.add_bytes("emoji.\xF0\x9F\x98\x80", pattern(3, 3));
    const Bytes f = b.to_bytes();
    const auto v = io::parse_container(f, kLabel);
    CHECK(v.find(long_name) != nullptr);
    CHECK(v.find("专家.3.系数") != nullptr);
    CHECK(v.find("emoji.\xF0\x9F\x98\x80") != nullptr);
  }
  SUBCASE("empty sections may share offsets with each other and with data; unused aligned gaps are allowed") {
    RawFile r = two_sections();
    r.body.resize(r.body.size() + 128, std::byte{0});  // a 128-byte hole before the table
    r.sections.push_back({"e1", 1, 10, {0}, 64, 0, {}});
    r.sections.push_back({"e2", 1, 0, {0, 3}, 64, 0, {}});
    r.sections.push_back({"e3", 1, 0, {0}, 256, 0, {}});
    r.sections.push_back({"e4", 1, 0, {0}, r.body.size() + 64, 0, {}});  // at the table offset itself
    const Bytes f = r.serialise();
    const auto v = io::parse_container(f, kLabel);
    CHECK(v.sections().size() == 6);
    CHECK(v.at("e4").offset == v.header().table_offset);
    CHECK(v.at("e4").bytes.empty());
  }
  SUBCASE("sections out of file order in the table keep the table order") {
    RawFile r = two_sections();
    std::swap(r.sections[0], r.sections[1]);
    const Bytes f = r.serialise();
    const auto v = io::parse_container(f, kLabel);
    CHECK(v.sections()[0].name == "b");
    CHECK(v.sections()[1].name == "a");
  }
}

TEST_CASE("container: 20 000 sections parse and are found by name") {
  io::ContainerBuilder b;
  for (int i = 0; i < 20000; ++i) b.add_bytes("layers." + std::to_string(i % 97) + ".experts." + std::to_string(i), pattern(1, static_cast<std::uint32_t>(i)));
  const Bytes f = b.to_bytes();
  const auto v = io::parse_container(f, kLabel);
  REQUIRE(v.sections().size() == 20000);
  for (int i = 0; i < 20000; i += 1) {
    const std::string n = "layers." + std::to_string(i % 97) + ".experts." + std::to_string(i);
    const auto* s = v.find(n);
    REQUIRE(s != nullptr);
    CHECK(s == &v.sections()[static_cast<std::size_t>(i)]);
  }
}

// ---------------------------------------------------------------------------------------------
// Rejections: the header.

TEST_CASE("container: rejects a bad magic, naming the bytes found") {
  const Bytes good = sample_builder().to_bytes();
  for (std::size_t i = 0; i < 8; ++i) {
    CAPTURE(i);
    Bytes f = good;
    f[i] ^= std::byte{0x20};
    CHECK_REJECTS(f, "bad magic", "", 0);
  }
  const Bytes st = text_bytes("\x10\0\0\0\0\0\0\0{\"a\":1}        ");  // a safetensors file
  CHECK_REJECTS(st, "(not an s2lc container)", "", 0);
  CHECK_REJECTS(text_bytes("S2LC\n"), "bad magic 53 32 4C 43 0A, expected 53 32 4C 43 0D 0A 1A 0A", "", 0);
}

TEST_CASE("container: rejects the file truncated at every length, and with bytes appended") {
  const Bytes good = sample_builder().to_bytes();
  REQUIRE(io::parse_container(good, kLabel).sections().size() == 6);
  for (std::size_t n = 0; n < good.size(); ++n) {
    CAPTURE(n);
    const Bytes f(good.begin(), good.begin() + static_cast<std::ptrdiff_t>(n));
    if (n < 64)
      CHECK_REJECTS(f, "truncated file: " + std::to_string(n) + " bytes, the header alone takes 64", "", n);
    else
      CHECK_REJECTS(f, "the header records a file size of " + std::to_string(good.size()) + " bytes but the file has " + std::to_string(n) +
                           " (truncated file)", "", 40);
  }
  Bytes longer = good;
  longer.push_back(std::byte{0});
  CHECK_REJECTS(longer, "(trailing bytes or a corrupt header)", "", 40);
}

TEST_CASE("container: rejects an unknown major version, before the header checksum") {
  Bytes f = sample_builder().to_bytes();
  put_le(f, 8, 2, 2);
  CHECK_REJECTS(f, "unsupported format version 2.0 (this reader reads version 1.x)", "", 8);
  reseal(f);
  CHECK_REJECTS(f, "unsupported format version 2.0", "", 8);
  put_le(f, 8, 0, 2);
  reseal(f);
  CHECK_REJECTS(f, "unsupported format version 0.0", "", 8);
}

TEST_CASE("container: rejects unknown flags and non-zero reserved bytes") {
  const Bytes good = sample_builder().to_bytes();
  for (std::uint32_t flags : {1u, 0x80000000u, 0xFFFFFFFFu}) {
    CAPTURE(flags);
    Bytes f = good;
    put_le(f, 12, flags, 4);
    reseal(f);
    CHECK_REJECTS(f, "unknown flags " + io::detail::hex32(flags), "", 12);
  }
  for (std::size_t i = 52; i < 60; ++i) {
    CAPTURE(i);
    Bytes f = good;
    f[i] = std::byte{1};
    reseal(f);
    CHECK_REJECTS(f, "reserved header bytes [52, 60) are not zero", "", i);
  }
}

TEST_CASE("container: rejects a file_size that disagrees with the file") {
  const Bytes good = sample_builder().to_bytes();
  for (std::uint64_t size : {std::uint64_t{0}, std::uint64_t{64}, good.size() - 1, good.size() + 1, kMax64}) {
    CAPTURE(size);
    Bytes f = good;
    put_le(f, 40, size, 8);
    reseal(f);
    CHECK_REJECTS(f, "the header records a file size of " + std::to_string(size), "", 40);
  }
}

TEST_CASE("container: every flipped bit of the header is caught") {
  const Bytes good = sample_builder().to_bytes();
  for (std::size_t i = 0; i < 64; ++i)
    for (int bit = 0; bit < 8; ++bit) {
      CAPTURE(i);
      CAPTURE(bit);
      Bytes f = good;
      f[i] ^= static_cast<std::byte>(1u << bit);
      if (i < 8)
        CHECK_REJECTS(f, "bad magic", "", 0);
      else if (i < 10)
        CHECK_REJECTS(f, "unsupported format version", "", 8);
      else
        CHECK_REJECTS(f, "header checksum mismatch (stored " + io::detail::hex32(static_cast<std::uint32_t>(get_le(f, 60, 4))) + ", computed " +
                             io::detail::hex32(io::crc32c(std::span<const std::byte>(f).first(60))) + ")", "", 60);
    }
}

TEST_CASE("container: rejects a section table outside the file or misplaced") {
  const Bytes good = sample_builder().to_bytes();
  const std::uint64_t size = good.size();
  const std::uint64_t toff = get_le(good, 24, 8);
  auto with = [&](std::uint64_t table_offset, std::uint64_t table_size) {  // header checksum resealed, table checksum kept
    Bytes f = good;
    put_le(f, 24, table_offset, 8);
    put_le(f, 32, table_size, 8);
    put_le(f, 60, io::crc32c(std::span<const std::byte>(f).first(60)), 4);
    return f;
  };
  CHECK_REJECTS(with(0, size), "section table offset 0 is not a multiple of 64", "", 24);
  CHECK_REJECTS(with(toff + 1, size - toff - 1), "is not a multiple of 64", "", 24);
  CHECK_REJECTS(with(align64(size) + 64, 0), "does not end at the end of the " + std::to_string(size) + "-byte file", "", 32);
  CHECK_REJECTS(with(kMax64 - 63, 64), "does not end at the end", "", 32);  // offset + size wraps to 0
  CHECK_REJECTS(with(toff, kMax64), "does not end at the end", "", 32);
  CHECK_REJECTS(with(toff, size - toff - 1), "does not end at the end", "", 32);
  CHECK_REJECTS(with(toff - 64, size - toff), "does not end at the end", "", 32);
  // Moved to an earlier multiple of 64 with a consistent size: the table now starts in data.
  CHECK_REJECTS(with(toff - 64, size - toff + 64), "section table checksum mismatch", "", toff - 64);
}

TEST_CASE("container: rejects section counts the table cannot hold, before allocating") {
  const Bytes good = sample_builder().to_bytes();
  const std::uint64_t table_size = get_le(good, 32, 8);
  for (std::uint64_t count : {kMax64, std::uint64_t{1} << 40, table_size / 27 + 1}) {
    CAPTURE(count);
    Bytes f = good;
    put_le(f, 16, count, 8);
    reseal(f);
    CHECK_REJECTS(f, std::to_string(count) + " sections cannot fit in a " + std::to_string(table_size) + "-byte section table", "", 16);
  }
  // Plausible counts that disagree with the entries.
  RawFile r = two_sections();
  r.sections[0].name = std::string(40, 'a');  // a table long enough for 3 entries of the minimum size
  r.section_count = 3;
  const Bytes more = r.serialise();
  CHECK_REJECTS(more, "section table entry #2 is cut off: needs 2 bytes for its name length, the table has 0 left", "", r.fields[1].crc + 4);
  r.section_count = 1;
  const Bytes fewer = r.serialise();
  CHECK_REJECTS(fewer, "trailing bytes after the last section table entry", "", r.fields[1].entry);
}

TEST_CASE("container: every flipped byte of the section table is caught by its checksum") {
  const Bytes good = sample_builder().to_bytes();
  const std::uint64_t toff = get_le(good, 24, 8);
  for (std::size_t i = static_cast<std::size_t>(toff); i < good.size(); ++i) {
    CAPTURE(i);
    Bytes f = good;
    f[i] ^= std::byte{0x01};
    CHECK_REJECTS(f, "section table checksum mismatch (stored " + io::detail::hex32(static_cast<std::uint32_t>(get_le(f, 48, 4))), "", toff);
  }
  Bytes f = good;
  f[48] ^= std::byte{0x80};  // the stored table checksum itself, with the header checksum resealed
  put_le(f, 60, io::crc32c(std::span<const std::byte>(f).first(60)), 4);
  CHECK_REJECTS(f, "section table checksum mismatch", "", toff);
}

// ---------------------------------------------------------------------------------------------
// Rejections: table entries.

TEST_CASE("container: rejects empty, overlong, NUL-containing and non-UTF-8 section names") {
  for (const std::string& name : {std::string(), std::string(256, 'x'), std::string(65535, 'x')}) {
    CAPTURE(name.size());
    RawFile r = two_sections();
    r.sections[1].name = name;
    const Bytes f = r.serialise();
    CHECK_REJECTS(f, "section table entry #1: name length " + std::to_string(name.size()) + " is outside 1..255", "", r.fields[1].entry);
  }
  {
    RawFile r = two_sections();
    r.sections[0].name = std::string("a\0b", 3);
    const Bytes f = r.serialise();
    CHECK_REJECTS(f, "section table entry #0: section name \"a\\x00b\" contains a NUL byte", "", r.fields[0].name);
  }
  for (const char* bad : {"\xFF", "a\xC0\x80", "\xED\xA0\x80", "\xF4\x90\x80\x80", "\xE2\x82", "\xC3", "\x80x", "\xF8\x88\x80\x80\x80"}) {
    CAPTURE(std::string(bad).size());
    RawFile r = two_sections();
    r.sections[1].name = bad;
    const Bytes f = r.serialise();
    CHECK_REJECTS(f, "section table entry #1: section name \"", "", r.fields[1].name);
    CHECK_REJECTS(f, "\" is not valid UTF-8", "", r.fields[1].name);
  }
  // A name running past the end of the table.
  RawFile r = two_sections();
  r.sections.resize(1);
  r.sections[0].name = std::string(40, 'a');  // a table long enough for 2 entries of the minimum size
  r.table_tail = {std::byte{9}, std::byte{0}, std::byte{'x'}};
  r.section_count = 2;
  const Bytes f = r.serialise();
  CHECK_REJECTS(f, "section table entry #1 is cut off: needs 9 bytes for its name bytes, the table has 1 left", "", r.fields[0].crc + 6);
}

TEST_CASE("container: rejects duplicate section names, naming the second entry") {
  RawFile r = two_sections();
  r.sections[1].name = "a";
  const Bytes f = r.serialise();
  CHECK_REJECTS(f, "section name appears twice (table entries #0 and #1)", "a", r.fields[1].name);
  RawFile r3 = two_sections();
  r3.sections.push_back({"a", 1, 0, {0}, 64, 0, {}});
  const Bytes f3 = r3.serialise();
  CHECK_REJECTS(f3, "(table entries #0 and #2)", "a", r3.fields[2].name);
}

TEST_CASE("container: rejects unknown kinds and dtype codes, and ranks above 4") {
  for (std::uint16_t kind : {std::uint16_t{2}, std::uint16_t{0xFFFF}}) {
    RawFile r = two_sections();
    r.sections[1].kind = kind;
    const Bytes f = r.serialise();
    CHECK_REJECTS(f, "unknown section kind " + std::to_string(kind) + " (0 = json, 1 = array)", "b", r.fields[1].kind);
  }
  for (std::uint8_t code : {std::uint8_t{15}, std::uint8_t{255}}) {
    RawFile r = two_sections();
    r.sections[1].code = code;
    const Bytes f = r.serialise();
    CHECK_REJECTS(f, "unknown dtype code " + std::to_string(code), "b", r.fields[1].dtype);
  }
  {
    RawFile r = two_sections();
    r.sections[1].dims = {1, 1, 2, 1, 4};
    const Bytes f = r.serialise();
    CHECK_REJECTS(f, "rank 5 exceeds 4", "b", r.fields[1].rank);
    r.sections[1].dims = {1, 2, 1, 4};  // rank 4 is fine
    CHECK(!rejection(r.serialise()).has_value());
  }
  {  // A rank byte of 255 with a short table: the rank is checked before the dims are read.
    RawFile r = two_sections();
    const Bytes good = r.serialise();
    Bytes f = good;
    f[static_cast<std::size_t>(r.fields[1].rank)] = std::byte{255};
    reseal(f);
    CHECK_REJECTS(f, "rank 255 exceeds 4", "b", r.fields[1].rank);
    f[static_cast<std::size_t>(r.fields[1].rank)] = std::byte{4};
    reseal(f);
    CHECK_REJECTS(f, "section table entry #1 is cut off: needs 52 bytes for its dimensions, offset, size and checksum, the table has 36 left", "b",
                  r.fields[1].dims);
  }
}

TEST_CASE("container: rejects sizes that disagree with shape x dtype, and shapes whose size overflows") {
  {
    RawFile r = two_sections();
    r.sections[1].size = 28;
    const Bytes f = r.serialise();
    CHECK_REJECTS(f, "shape [4, 2] of F32 needs 32 bytes but the entry records 28", "b", r.fields[1].size);
  }
  {
    RawFile r = two_sections();
    r.sections[1].dims = {};  // a scalar F32 is 4 bytes
    const Bytes f = r.serialise();
    CHECK_REJECTS(f, "shape [] of F32 needs 4 bytes but the entry records 32", "b", r.fields[1].size);
  }
  for (const auto& dims : {std::vector<std::uint64_t>{1ull << 40, 1ull << 40}, std::vector<std::uint64_t>{1ull << 62},
                           std::vector<std::uint64_t>{kMax64, 2}, std::vector<std::uint64_t>{0, kMax64, kMax64}}) {
    RawFile r = two_sections();
    r.sections[1].dims = dims;
    const Bytes f = r.serialise();
    if (dims[0] == 0)  // a zero dimension: no overflow, 0 bytes
      CHECK_REJECTS(f, "needs 0 bytes but the entry records 32", "b", r.fields[1].size);
    else
      CHECK_REJECTS(f, "x F32 overflows 64 bits", "b", r.fields[1].dims);
  }
  {  // A json section must be a rank-1 U8 array.
    RawFile r = two_sections();
    r.sections[1].kind = 0;
    const Bytes f = r.serialise();
    CHECK_REJECTS(f, "a json section must be a rank-1 U8 array, got F32 of rank 2", "b", r.fields[1].kind);
    r.sections[0].kind = 0;
    r.sections[0].dims = {10, 10};
    r.sections[1].kind = 1;
    const Bytes f2 = r.serialise();
    CHECK_REJECTS(f2, "a json section must be a rank-1 U8 array, got U8 of rank 2", "a", r.fields[0].kind);
  }
}

TEST_CASE("container: rejects misaligned offsets and data inside the header") {
  for (std::uint64_t off : {std::uint64_t{0}, std::uint64_t{32}, std::uint64_t{65}, std::uint64_t{96}, std::uint64_t{127}}) {
    CAPTURE(off);
    RawFile r = two_sections();
    r.sections[0].offset = off;
    r.sections[0].dims = {1};
    r.sections[0].size = 1;
    const Bytes f = r.serialise();
    CHECK_REJECTS(f, "data offset " + std::to_string(off) + " is not a multiple of 64 at or after the 64-byte header", "a", r.fields[0].offset);
  }
}

TEST_CASE("container: rejects data past the table and offset + size overflows, without wrapping") {
  {
    RawFile r = two_sections();
    r.sections[1].dims = {8, 3};  // 96 bytes at 192: runs into the table at 256
    r.sections[1].size = 96;
    const Bytes f = r.serialise();
    CHECK_REJECTS(f, "data [192, 288) run past the start of the section table at 256", "b", r.fields[1].offset);
  }
  {
    RawFile r = two_sections();
    r.sections[1].offset = 1ull << 40;
    const Bytes f = r.serialise();
    CHECK_REJECTS(f, "run past the start of the section table", "b", r.fields[1].offset);
  }
  {
    RawFile r = two_sections();
    r.sections[0].offset = kMax64 - 63;  // a multiple of 64
    const Bytes f = r.serialise();
    CHECK_REJECTS(f, "data offset " + std::to_string(kMax64 - 63) + " + size 100 overflows 64 bits", "a", r.fields[0].offset);
  }
  {
    RawFile r = two_sections();
    r.sections[0].dims = {kMax64};
    r.sections[0].size = kMax64;
    const Bytes f = r.serialise();
    CHECK_REJECTS(f, "data offset 64 + size " + std::to_string(kMax64) + " overflows 64 bits", "a", r.fields[0].offset);
  }
}

TEST_CASE("container: rejects overlapping sections, naming both") {
  {
    RawFile r = two_sections();
    r.sections[1].offset = 128;  // "a" is [64, 164)
    const Bytes f = r.serialise();
    CHECK_REJECTS(f, "data [128, 160) overlap section 'a' [64, 164)", "b", 128);
  }
  {
    RawFile r = two_sections();
    r.sections[1].offset = 64;  // same start: the shorter sorts first
    const Bytes f = r.serialise();
    CHECK_REJECTS(f, "data [64, 164) overlap section 'b' [64, 96)", "a", 64);
  }
  {  // A third section covering both; the first overlap in file order is reported.
    RawFile r = two_sections();
    r.body.resize(r.body.size() + 64, std::byte{0});
    r.sections.push_back({"c", 1, 0, {256}, 64, 256, {}});
    const Bytes f = r.serialise();
    CHECK_REJECTS(f, "data [64, 320) overlap section 'a' [64, 164)", "c", 64);
  }
}

// ---------------------------------------------------------------------------------------------
// Rejections: section data.

TEST_CASE("container: a flipped byte in any section is a checksum mismatch naming that section") {
  const Bytes good = sample_builder().to_bytes();
  const auto v = io::parse_container(good, kLabel);
  for (const auto& s : v.sections()) {
    for (std::uint64_t k = 0; k < s.size; ++k) {
      CAPTURE(s.name);
      CAPTURE(k);
      Bytes f = good;
      const auto at = static_cast<std::size_t>(s.offset + k);
      f[at] ^= std::byte{0x10};
      const std::uint32_t computed = io::crc32c(std::span<const std::byte>(f).subspan(static_cast<std::size_t>(s.offset), static_cast<std::size_t>(s.size)));
      CHECK_REJECTS(f, "checksum mismatch (stored " + io::detail::hex32(s.crc) + ", computed " + io::detail::hex32(computed) + ")", s.name, s.offset);
      // Structure-only parsing accepts it; verify() then finds it.
      const auto lazy = io::parse_container(f, kLabel, io::container_checks::structure);
      CHECK_THROWS_WITH_AS(lazy.verify(), doctest::Contains(("tensor '" + s.name + "', byte offset " + std::to_string(s.offset) + ": checksum mismatch").c_str()),
                           s2lc::format_error);
    }
  }
}

TEST_CASE("container: an empty section must store the checksum of no bytes (regression: found by fuzzing)") {
  // verify() skipped empty sections, so a corrupt stored CRC of an empty section went unnoticed
  // (reproducer: tests/fuzz/corpus/container/regress-empty-section-checksum.s2lc).
  RawFile r = two_sections();
  r.sections.push_back({"e", 1, 0, {0}, 192, 0, 0x200u});
  const Bytes f = r.serialise();
  CHECK_REJECTS(f, "checksum mismatch (stored 0x00000200, computed 0x00000000)", "e", 192);
  CHECK(!rejection(f, io::container_checks::structure).has_value());
  r.sections.back().crc = 0;
  CHECK(!rejection(r.serialise()).has_value());
}

TEST_CASE("container: a non-zero byte in the padding is rejected") {
  const Bytes good = sample_builder().to_bytes();
  const auto v = io::parse_container(good, kLabel);
  std::vector<bool> used(good.size(), false);
  for (std::size_t i = 0; i < 64; ++i) used[i] = true;
  for (std::size_t i = static_cast<std::size_t>(v.header().table_offset); i < good.size(); ++i) used[i] = true;
  for (const auto& s : v.sections())
    for (std::uint64_t k = 0; k < s.size; ++k) used[static_cast<std::size_t>(s.offset + k)] = true;
  std::size_t checked = 0;
  for (std::size_t i = 0; i < good.size(); ++i) {
    if (used[i]) continue;
    CAPTURE(i);
    Bytes f = good;
    f[i] = std::byte{0xA5};
    CHECK_REJECTS(f, "non-zero byte A5 in the padding before", "", i);
    CHECK(!rejection(f, io::container_checks::structure).has_value());
    ++checked;
  }
  CHECK(checked > 100);
}

TEST_CASE("container: the error message names the file, section and offset in one line") {
  Bytes f = sample_builder().to_bytes();
  const auto v = io::parse_container(f, kLabel);
  const auto& s = v.at("experts.3.coeff");
  const std::uint64_t off = s.offset;
  const std::uint32_t stored = s.crc;
  f[static_cast<std::size_t>(off)] ^= std::byte{1};
  const std::uint32_t computed = io::crc32c(std::span<const std::byte>(f).subspan(static_cast<std::size_t>(off), static_cast<std::size_t>(s.size)));
  const auto e = rejection(f);
  REQUIRE(e.has_value());
  CHECK(std::string(e->what()) == "file 'mem.s2lc', tensor 'experts.3.coeff', byte offset " + std::to_string(off) + ": checksum mismatch (stored " +
                                      io::detail::hex32(stored) + ", computed " + io::detail::hex32(computed) + ")");
}

// ---------------------------------------------------------------------------------------------
// Accessors.

TEST_CASE("container: json() rejects invalid JSON and repeated keys as format_errors at the offset, kinds are checked") {
  auto json_file = [](std::string_view text, RawFile& r) {
    r.body = text_bytes(text);
    r.sections = {{"manifest", 0, 0, {text.size()}, 64, text.size(), {}}, {"w", 1, 10, {0}, 64, 0, {}}};
    return r.serialise();
  };
  {
    RawFile r;
    const Bytes f = json_file("{\"a\": [1, 2,, 3]}", r);
    const auto v = io::parse_container(f, kLabel);  // the JSON is parsed on demand, not at open
    try {
      (void)v.json("manifest");
      FAIL("invalid JSON accepted");
    } catch (const s2lc::format_error& e) {
      CHECK_CONTAINS(e.message(), "invalid JSON");
      CHECK(e.tensor() == "manifest");
      CHECK(e.file() == kLabel);
      CHECK(e.offset() == std::optional<std::uint64_t>(64 + 12));
    }
  }
  for (std::string_view text : {std::string_view("{\"a\":1e999}"), std::string_view(""), std::string_view("{\"a\":\"\xFF\"}"),
                                std::string_view("[1] trailing")}) {
    CAPTURE(std::string(text));
    RawFile r;
    const Bytes f = json_file(text, r);
    const auto v = io::parse_container(f, kLabel);
    CHECK_THROWS_WITH_AS((void)v.json("manifest"), doctest::Contains("tensor 'manifest'"), s2lc::format_error);
  }
  {
    RawFile r;
    const Bytes f = json_file("{\"k\":{\"x\":1,\"x\":2}}", r);
    const auto v = io::parse_container(f, kLabel);
    CHECK_THROWS_WITH_AS((void)v.json("manifest"), doctest::Contains("JSON key \"x\" appears twice in one object"), s2lc::format_error);
  }
  {
    RawFile r;
    const Bytes f = json_file("[1, {\"a\": null}]", r);
    const auto v = io::parse_container(f, kLabel);
    CHECK(v.json("manifest") == nlohmann::json::parse("[1, {\"a\": null}]"));
    CHECK_THROWS_WITH_AS((void)v.json("w"), doctest::Contains("is an array section, not json"), s2lc::invalid_argument);
    CHECK_THROWS_WITH_AS((void)v.array<std::uint8_t>("manifest"), doctest::Contains("is a json section, not an array"), s2lc::invalid_argument);
  }
}

TEST_CASE("container: typed views check dtype and memory alignment, at() names a missing section and the file") {
  const Bytes good = sample_builder().to_bytes();
  const auto v = io::parse_container(good, kLabel);
  CHECK(v.array<float>("experts.3.coeff").size() == 15);
  try {
    (void)v.array<double>("experts.3.coeff");
    FAIL("array<double> of an F32 section");
  } catch (const s2lc::invalid_argument& e) {
    CHECK_CONTAINS(e.message(), "stored as F32, requested as F64");
    CHECK(e.tensor() == "experts.3.coeff");
    CHECK(e.file() == kLabel);
    CHECK(e.offset() == std::optional<std::uint64_t>(v.at("experts.3.coeff").offset));
  }
  CHECK_THROWS_WITH_AS((void)v.array<std::uint64_t>("experts.3.index"), doctest::Contains("stored as I64, requested as U64"), s2lc::invalid_argument);
  try {
    (void)v.at("experts.4.coeff");
    FAIL("at() of a missing section");
  } catch (const s2lc::invalid_argument& e) {
    CHECK(std::string(e.what()) == "file 'mem.s2lc', tensor 'experts.4.coeff': no such section");
  }
  CHECK_THROWS_AS((void)v.bytes("missing"), s2lc::invalid_argument);
  CHECK_THROWS_AS((void)v.json("missing"), s2lc::invalid_argument);
  CHECK_THROWS_AS((void)v.array<float>("missing"), s2lc::invalid_argument);

  // The same file at an odd address in memory: parsing works, typed views refuse to misalign.
  std::vector<std::byte> shifted(good.size() + 1);
  std::copy(good.begin(), good.end(), shifted.begin() + 1);
  const std::span<const std::byte> odd = std::span<const std::byte>(shifted).subspan(1);
  const auto w = io::parse_container(odd, kLabel);
  CHECK(same_bytes(w.bytes("experts.3.coeff"), v.bytes("experts.3.coeff")));
  CHECK(w.array<std::uint8_t>("blob").size() == 130);
  CHECK_THROWS_WITH_AS((void)w.array<float>("experts.3.coeff"), doctest::Contains("not aligned to 4 bytes in memory"), s2lc::invalid_argument);
}

// ---------------------------------------------------------------------------------------------
// ContainerFile and the writer.

TEST_CASE("container: ContainerFile names its path in format errors, and throws io_error for a missing file") {
  s2lc::test::TempDir dir;
  const auto path = dir / "bad.s2lc";
  Bytes f = sample_builder().to_bytes();
  s2lc::test::write_bytes(path, Bytes(f.begin(), f.begin() + 100));
  try {
    const io::ContainerFile c(path);
    FAIL("truncated file accepted");
  } catch (const s2lc::format_error& e) {
    CHECK(e.file() == path.string());
    CHECK_CONTAINS(e.what(), "file '" + path.string() + "', byte offset 40: the header records a file size");
  }
  const std::uint64_t blob = io::parse_container(f, kLabel).at("blob").offset;
  f[static_cast<std::size_t>(blob + 5)] ^= std::byte{0xFF};
  s2lc::test::write_bytes(path, f);
  CHECK_THROWS_WITH_AS(io::ContainerFile::open(path), doctest::Contains(("tensor 'blob', byte offset " + std::to_string(blob) + ": checksum mismatch").c_str()),
                       s2lc::format_error);
  const io::ContainerFile lazy(path, io::container_checks::structure);
  CHECK(lazy.bytes("blob").size() == 130);
  CHECK_THROWS_WITH_AS(lazy.verify(), doctest::Contains("checksum mismatch"), s2lc::format_error);

  const auto missing = dir / "missing.s2lc";
  try {
    const io::ContainerFile c(missing);
    FAIL("opened a missing file");
  } catch (const s2lc::io_error& e) {
    CHECK(e.file() == missing.string());
    CHECK_CONTAINS(e.message(), "cannot open");
  }
}

TEST_CASE("container: the builder rejects invalid sections when they are added, naming them") {
  io::ContainerBuilder b;
  b.add_bytes("x", pattern(4, 1));
  CHECK_THROWS_WITH_AS(b.add_bytes("x", pattern(4, 1)), doctest::Contains("tensor 'x': section name given twice"), s2lc::invalid_argument);
  CHECK_THROWS_WITH_AS(b.add_json("x", 1), doctest::Contains("section name given twice"), s2lc::invalid_argument);
  CHECK_THROWS_WITH_AS(b.add_bytes("", {}), doctest::Contains("section name is empty"), s2lc::invalid_argument);
  CHECK_THROWS_WITH_AS(b.add_bytes(std::string(256, 'n'), {}), doctest::Contains("section name of 256 bytes exceeds 255"), s2lc::invalid_argument);
  CHECK_THROWS_WITH_AS(b.add_bytes(std::string("a\0b", 3), {}), "tensor 'a\\x00b': section name \"a\\x00b\" contains a NUL byte", s2lc::invalid_argument);
  CHECK_THROWS_WITH_AS(b.add_bytes("bad\xFF", {}), "tensor 'bad\\xFF': section name \"bad\\xFF\" is not valid UTF-8", s2lc::invalid_argument);
  CHECK_THROWS_WITH_AS(b.add_array("r5", dtype::u8, {1, 1, 1, 1, 1}, pattern(1, 1)), doctest::Contains("rank 5 exceeds 4"), s2lc::invalid_argument);
  CHECK_THROWS_WITH_AS(b.add_array("s", dtype::f32, {2, 3}, pattern(23, 1)), doctest::Contains("tensor 's': shape [2, 3] of F32 needs 24 bytes, got 23"),
                       s2lc::invalid_argument);
  CHECK_THROWS_WITH_AS(b.add_array("o", dtype::f64, {1ull << 61}, {}), doctest::Contains("overflows 64 bits"), s2lc::invalid_argument);
  CHECK_THROWS_WITH_AS(b.add_json("j", nlohmann::json("\xC3")), doctest::Contains("JSON value cannot be serialised"), s2lc::invalid_argument);
  CHECK(b.size() == 1);  // nothing rejected was added
  const Bytes f = b.to_bytes();
  const auto v = io::parse_container(f, kLabel);
  CHECK(v.sections().size() == 1);
}

TEST_CASE("container: the builder copies the caller's bytes") {
  io::ContainerBuilder b;
  Bytes data = pattern(16, 9);
  const Bytes original = data;
  b.add_array("w", dtype::u32, {4}, data);
  std::fill(data.begin(), data.end(), std::byte{0});
  data = Bytes();
  const Bytes f = b.to_bytes();
  CHECK(same_bytes(io::parse_container(f, kLabel).bytes("w"), original));
}

TEST_CASE("container: a failed write leaves no file, an existing target untouched, and no temporary") {
  s2lc::test::TempDir dir;
  const io::ContainerBuilder b = sample_builder();

  SUBCASE("into a missing directory") {
    const auto path = dir / "no/such/dir/out.s2lc";
    try {
      b.write(path);
      FAIL("wrote into a missing directory");
    } catch (const s2lc::io_error& e) {
      CHECK(e.file() == path.string());
      CHECK_CONTAINS(e.message(), "cannot create temporary file");
    }
    CHECK(!std::filesystem::exists(path));
    CHECK(listing(dir.path()).empty());
  }

  SUBCASE("a write that fails midway (file size limit) over an existing file") {
    const auto path = dir / "model.s2lc";
    io::ContainerBuilder small;
    small.add_bytes("old", pattern(10, 1));
    small.write(path);
    const Bytes before = s2lc::test::read_bytes(path);
    REQUIRE(b.file_size() > 512);
    // RLIMIT_FSIZE makes write() fail with EFBIG past 512 bytes (SIGXFSZ ignored), as a full disk would.
    struct rlimit old_limit {};
    REQUIRE(::getrlimit(RLIMIT_FSIZE, &old_limit) == 0);
    const auto old_handler = std::signal(SIGXFSZ, SIG_IGN);
    struct rlimit limit = old_limit;
    limit.rlim_cur = 512;
    REQUIRE(::setrlimit(RLIMIT_FSIZE, &limit) == 0);
    std::optional<s2lc::io_error> failure;
    try {
      b.write(path);
    } catch (const s2lc::io_error& e) {
      failure = e;
    }
    ::setrlimit(RLIMIT_FSIZE, &old_limit);
    std::signal(SIGXFSZ, old_handler);
    REQUIRE(failure.has_value());
    CHECK_CONTAINS(failure->message(), "write failed");
    CHECK(failure->file() == path.string());
    CHECK(s2lc::test::read_bytes(path) == before);
    CHECK(listing(dir.path()) == std::vector<std::string>{"model.s2lc"});
    // And a write that succeeds replaces it.
    b.write(path);
    CHECK(s2lc::test::read_bytes(path) == b.to_bytes());
    CHECK(listing(dir.path()) == std::vector<std::string>{"model.s2lc"});
  }

  SUBCASE("over a directory") {
    const auto path = dir / "taken";
    std::filesystem::create_directory(path);
    CHECK_THROWS_WITH_AS(b.write(path), doctest::Contains("cannot rename temporary file into place"), s2lc::io_error);
    CHECK(std::filesystem::is_directory(path));
    CHECK(listing(dir.path()) == std::vector<std::string>{"taken"});
  }
}

}  // namespace suite_io_container

#undef CHECK_CONTAINS
#undef CHECK_REJECTS
