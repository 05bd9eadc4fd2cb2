// Tests for s2lc/io/safetensors.hpp: the validating reader (every rejection, with its message,
// tensor and byte offset), round trips of every dtype through the crash-safe writer, the real
// tinymoe fixtures, and the writer's behaviour on bad input.
#include <doctest/doctest.h>

#include "support.hpp"

#include <s2lc/io/safetensors.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <initializer_list>
#include <map>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include <sys/mman.h>

// The suite's own scope: the suites compile in unity groups (tests/CMakeLists.txt).
namespace suite_io_safetensors {

namespace {

namespace io = s2lc::io;
using s2lc::dtype;
using Bytes = std::vector<std::byte>;

constexpr const char* kLabel = "mem.safetensors";
constexpr std::uint64_t k2p40 = 1099511627776ull;  // 2^40

/// An in-memory safetensors file: 8-byte little-endian `length` (the header's size unless given),
/// the header text, then `data`.
Bytes make_file(std::string_view header, const Bytes& data = {}, std::optional<std::uint64_t> length = std::nullopt) {
  const std::uint64_t n = length.value_or(header.size());
  Bytes out(8);
  for (std::size_t i = 0; i < 8; ++i) out[i] = static_cast<std::byte>((n >> (8 * i)) & 0xFFu);
  for (char c : header) out.push_back(static_cast<std::byte>(c));
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

Bytes zeros(std::size_t n) { return Bytes(n, std::byte{0}); }

/// Deterministic pseudo-random bytes (every bit pattern, NaNs included, turns up).
Bytes pattern(std::size_t n, std::uint32_t seed) {
  Bytes b(n);
  std::uint32_t x = seed * 2654435761u + 12345u;
  for (auto& v : b) {
    x = x * 1664525u + 1013904223u;
    v = static_cast<std::byte>(x >> 24);
  }
  return b;
}

/// Pads a header with spaces so the data section (at 8 + size) starts at a multiple of 8.
std::string pad8(std::string header) {
  header.append((8 - header.size() % 8) % 8, ' ');
  return header;
}

/// `"name":{"dtype":"DT","shape":SHAPE,"data_offsets":OFFS}` (shape and offsets are raw JSON).
std::string entry(std::string_view name, std::string_view dt, std::string_view shape, std::string_view offsets) {
  // (append, not "\"" + std::string(name) + ...: a GCC 12 -Wrestrict false positive at -O3)
  std::string s = "\"";
  s.append(name).append("\":{\"dtype\":\"").append(dt).append("\",\"shape\":").append(shape);
  s.append(",\"data_offsets\":").append(offsets).append("}");
  return s;
}

std::string object(std::initializer_list<std::string> members) {
  std::string s = "{";
  for (const auto& m : members) s += (s.size() > 1 ? "," : "") + m;
  return s + "}";
}

/// The format_error parse_safetensors throws for `file`, or nullopt if it accepts it. Any other
/// exception escapes (and fails the test).
std::optional<s2lc::format_error> rejection(const Bytes& file) {
  try {
    (void)io::parse_safetensors(file, kLabel);
  } catch (const s2lc::format_error& e) {
    return e;
  }
  return std::nullopt;
}

bool contains(std::string_view hay, std::string_view needle) { return hay.find(needle) != std::string_view::npos; }

bool same_bytes(std::span<const std::byte> a, std::span<const std::byte> b) { return std::equal(a.begin(), a.end(), b.begin(), b.end()); }

std::span<const std::byte> as_bytes(const std::string& s) { return std::as_bytes(std::span<const char>(s.data(), s.size())); }

/// Files in `dir` (to spot left-over temporaries).
std::vector<std::string> listing(const std::filesystem::path& dir) {
  std::vector<std::string> names;
  for (const auto& e : std::filesystem::directory_iterator(dir)) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

/// An anonymous private mapping: large, zero-filled buffers that cost nothing until touched.
class AnonymousMap {
 public:
  explicit AnonymousMap(std::size_t n) : size_(n) {
    void* p = ::mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("mmap failed");
    data_ = static_cast<std::byte*>(p);
  }
  ~AnonymousMap() { ::munmap(data_, size_); }
  AnonymousMap(const AnonymousMap&) = delete;
  AnonymousMap& operator=(const AnonymousMap&) = delete;
  std::span<std::byte> bytes() const { return {data_, size_}; }

 private:
  std::byte* data_ = nullptr;
  std::size_t size_ = 0;
};

}  // namespace

#define CHECK_CONTAINS(str, needle) \
  CHECK_MESSAGE(contains((str), (needle)), "\"" << std::string(str) << "\" does not contain \"" << std::string(needle) << "\"")

namespace {

/// parse_safetensors must reject `file` with a message containing `needle`, naming `tensor`,
/// the byte offset `offset` and the file's label. An out-of-line function (not a macro) so its
/// assertions are compiled once, not at each of the dozens of call sites; CHECK_REJECTS below
/// records the call site.
[[gnu::noinline]] void check_rejects(int line, const Bytes& file, std::string_view needle, const std::string& tensor, std::uint64_t offset) {
  INFO("CHECK_REJECTS called from line " << line);
  const auto e = rejection(file);
  REQUIRE_MESSAGE(e.has_value(), "malformed file accepted");
  INFO("what(): " << std::string(e->what()));
  CHECK_CONTAINS(e->message(), needle);
  CHECK(e->file() == kLabel);
  CHECK(e->tensor() == tensor);
  REQUIRE(e->offset().has_value());
  CHECK(*e->offset() == offset);
  CHECK_CONTAINS(e->what(), std::string("file '") + kLabel + "'");
}

}  // namespace

/// parse_safetensors must reject `file_` with a message containing `needle_`, naming `tensor_`,
/// the byte offset `offset_` and the file's label.
#define CHECK_REJECTS(file_, needle_, tensor_, offset_) \
  check_rejects(__LINE__, (file_), (needle_), std::string(tensor_), static_cast<std::uint64_t>(offset_))

// ---------------------------------------------------------------------------------------------
// Valid files, including the edge cases the checks must not trip on.

TEST_CASE("safetensors: minimal and edge-case files are accepted") {
  SUBCASE("empty header object, no data") {
    const auto h = io::parse_safetensors(make_file("{}"), kLabel);
    CHECK(h.header_size == 2);
    CHECK(h.data_offset() == 10);
    CHECK(h.tensors.empty());
    CHECK(h.metadata.empty());
  }
  SUBCASE("metadata only, header padded with spaces and a newline") {
    const auto h = io::parse_safetensors(make_file("{\"__metadata__\":{\"format\":\"pt\",\"empty\":\"\"}}\n   "), kLabel);
    CHECK(h.tensors.empty());
    CHECK(h.metadata == std::map<std::string, std::string>{{"format", "pt"}, {"empty", ""}});
  }
  SUBCASE("tensors out of order in the header come back sorted by offset; scalars and empty tensors") {
    const std::string header = pad8(object({entry("c", "U8", "[3]", "[5,8]"), entry("z", "F32", "[0,4]", "[8,8]"),
                                            entry("a", "F32", "[]", "[0,4]"), entry("b", "I8", "[1,1]", "[4,5]"),
                                            entry("e", "U8", "[0]", "[0,0]")}));
    const Bytes data = pattern(8, 1);
    const Bytes file = make_file(header, data);
    const auto h = io::parse_safetensors(file, kLabel);
    REQUIRE(h.tensors.size() == 5);
    std::vector<std::string> order;
    for (const auto& t : h.tensors) order.push_back(t.name);
    CHECK(order == std::vector<std::string>{"e", "a", "b", "c", "z"});
    const auto* a = h.find("a");
    REQUIRE(a != nullptr);
    CHECK(a->type == dtype::f32);
    CHECK(a->shape.empty());
    CHECK(a->numel() == 1);
    CHECK(a->nbytes() == 4);
    const auto* z = h.find("z");
    REQUIRE(z != nullptr);
    CHECK(z->shape == std::vector<std::uint64_t>{0, 4});
    CHECK(z->numel() == 0);
    CHECK(z->begin == 8);
    CHECK(z->end == 8);
    CHECK(h.find("missing") == nullptr);
  }
  SUBCASE("a 1-byte tensor may sit at any offset; unknown extra fields in an entry are ignored") {
    const std::string header = object({entry("a", "U8", "[3]", "[0,3]"), entry("b", "BOOL", "[2]", "[3,5]")});
    CHECK(io::parse_safetensors(make_file(header, zeros(5)), kLabel).tensors.size() == 2);
    const std::string extra = R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"note":[1,{"x":null}]}})";
    CHECK(io::parse_safetensors(make_file(extra, zeros(1)), kLabel).tensors.size() == 1);
  }
  SUBCASE("a dimension that is large but does not overflow is checked against the data") {
    // 2^32 * (2^32 - 1) elements of U8 fit in 64 bits: the error is the missing data, not overflow.
    const std::string header = object({entry("a", "U8", "[4294967296,4294967295]", "[0,18446744069414584320]")});
    CHECK_REJECTS(make_file(header), "run past the end of the file", "a", 8 + header.size());
  }
}

// ---------------------------------------------------------------------------------------------
// The length prefix.

TEST_CASE("safetensors: rejects a file shorter than the 8-byte length prefix") {
  for (std::size_t n = 0; n < 8; ++n) {
    CAPTURE(n);
    const Bytes file(n, std::byte{0x02});
    CHECK_REJECTS(file, "truncated file: " + std::to_string(n) + " bytes", "", 0);
  }
}

TEST_CASE("safetensors: rejects a header length past the end of the file") {
  const std::string header = "{}";
  CHECK_REJECTS(make_file(header, {}, 3), "header length 3 runs past the end of the file (10 bytes)", "", 0);
  CHECK_REJECTS(make_file(header, zeros(100), 1000), "header length 1000 runs past the end", "", 0);
  // The largest length must not wrap around in 8 + N.
  CHECK_REJECTS(make_file(header, {}, ~std::uint64_t{0}), "header length 18446744073709551615 runs past the end", "", 0);
  CHECK_REJECTS(make_file(header, {}, std::uint64_t{1} << 63), "runs past the end", "", 0);
}

TEST_CASE("safetensors: rejects a header above the 100 MB limit, but not one of exactly 100 MB") {
  // A sparse zero-filled buffer: only the first page is ever touched.
  AnonymousMap map(8 + 100'000'001);
  auto buf = map.bytes();
  auto set_length = [&](std::uint64_t n) {
    for (std::size_t i = 0; i < 8; ++i) buf[i] = static_cast<std::byte>((n >> (8 * i)) & 0xFFu);
  };
  buf[8] = static_cast<std::byte>('[');
  set_length(100'000'001);
  try {
    (void)io::parse_safetensors(buf, kLabel);
    FAIL("a 100'000'001-byte header was accepted");
  } catch (const s2lc::format_error& e) {
    CHECK_CONTAINS(e.message(), "header length 100000001 exceeds the 100 MB limit");
    CHECK(e.offset() == std::optional<std::uint64_t>(0));
  }
  // Exactly the limit passes the size checks and fails on the content instead.
  set_length(100'000'000);
  CHECK_THROWS_WITH_AS((void)io::parse_safetensors(buf.first(8 + 100'000'000), kLabel), doctest::Contains("does not start with '{'"),
                       s2lc::format_error);
}

TEST_CASE("safetensors: rejects a header too short to hold a JSON object") {
  CHECK_REJECTS(make_file(""), "header of 0 bytes cannot hold a JSON object", "", 8);
  CHECK_REJECTS(make_file("{"), "header of 1 bytes cannot hold a JSON object", "", 8);
}

// ---------------------------------------------------------------------------------------------
// The JSON text.

TEST_CASE("safetensors: rejects invalid JSON, pointing at the error in the header") {
  {
    // 'x' is header byte 5: absolute offset 8 + 5.
    const auto e = rejection(make_file(R"({"a":x})"));
    REQUIRE(e);
    CHECK_CONTAINS(e->message(), "invalid JSON header");
    CHECK(e->offset() == std::optional<std::uint64_t>(13));
    CHECK(e->tensor().empty());
  }
  {
    const std::string header = R"({"a":{"dtype":"F32",}})";  // trailing comma at byte 19
    const auto e = rejection(make_file(header));
    REQUIRE(e);
    CHECK_CONTAINS(e->message(), "invalid JSON header");
    CHECK(e->offset() == std::optional<std::uint64_t>(8 + header.find('}')));
  }
  const std::vector<std::string> bad{R"({"a":1)", R"({"a":"unterminated})", "{} trailing", "{\"a\":\"\xff\xfe\"}", std::string("{\"a\":\"x\0y\"}", 11),
                                     R"({'a':1})", "{\"a\":1,}", "{\"a\":01}"};
  for (const std::string& header : bad) {
    CAPTURE(header);
    const auto e = rejection(make_file(header));
    REQUIRE(e);
    CHECK_CONTAINS(e->message(), "invalid JSON header");
    REQUIRE(e->offset());
    CHECK(*e->offset() >= 8);
    CHECK(*e->offset() <= 8 + header.size());  // inside the header (or just past it: unexpected end)
  }
}

TEST_CASE("safetensors: rejects a header that is not a JSON object") {
  for (const std::string header : {"[]", "[{\"a\":1}]", "\"{}\"", "12", "null", " {}", "\n{}"}) {
    CAPTURE(header);
    CHECK_REJECTS(make_file(header), "header does not start with '{'", "", 8);
  }
}

TEST_CASE("safetensors: rejects numbers too large for a double as a format_error (regression)") {
  // nlohmann reports these as out_of_range, not parse_error; the reader let it escape as a
  // non-s2lc exception. Found by tests/fuzz/safetensors_fuzz.cpp.
  for (const std::string header : {R"({"a":1e999})", R"({"a":{"dtype":"U8","shape":[-1e400],"data_offsets":[0,0]}})",
                                   R"({"__metadata__":{"k":"v"},"x":[1E+99999]})"}) {
    CAPTURE(header);
    CHECK_REJECTS(make_file(header), "number overflow", "", 8);
  }
}

TEST_CASE("safetensors: deeply nested JSON is rejected without exhausting the stack (regression)") {
  // The error message used to dump() the offending value, which recurses once per nesting level.
  const std::size_t depth = 200'000;
  const std::string nest = std::string(depth, '[') + std::string(depth, ']');
  const std::string in_shape = R"({"a":{"dtype":"U8","shape":[)" + nest + R"(],"data_offsets":[0,0]}})";
  const std::string in_offsets = R"({"a":{"dtype":"U8","shape":[],"data_offsets":[)" + nest + R"(,1]}})";
  for (const std::string& header : {in_shape, in_offsets}) {
    const auto e = rejection(make_file(header, zeros(1)));
    REQUIRE(e);
    CHECK_CONTAINS(e->message(), "must be a non-negative integer, got an array");
    CHECK(e->message().size() < 200);
    CHECK(e->tensor() == "a");
  }
  // Nesting the reader never needs to describe is fine too (metadata value, unknown field).
  const std::string meta = R"({"__metadata__":{"k":)" + nest + "}}";
  CHECK_REJECTS(make_file(meta), "__metadata__ value of 'k' is not a string", "__metadata__", 9);
  const std::string extra = R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":)" + nest + "}}";
  CHECK(io::parse_safetensors(make_file(extra, zeros(1)), kLabel).tensors.size() == 1);
}

TEST_CASE("safetensors: rejects duplicate tensor names") {
  const std::string a = entry("a", "U8", "[1]", "[0,1]");
  const std::string header = "{" + a + "," + a + "}";
  CHECK_REJECTS(make_file(header, zeros(1)), "tensor name appears twice", "a", 9);
  // Different entries under the same name are rejected too (not "last one wins").
  const std::string header2 = "{" + a + "," + entry("b", "U8", "[1]", "[1,2]") + "," + entry("a", "I8", "[1]", "[1,2]") + "}";
  CHECK_REJECTS(make_file(header2, zeros(2)), "tensor name appears twice", "a", 9);
  const std::string meta = R"({"__metadata__":{},"__metadata__":{"k":"v"}})";
  CHECK_REJECTS(make_file(meta), "tensor name appears twice", "__metadata__", 9);
}

TEST_CASE("safetensors: rejects fields repeated inside an entry or __metadata__") {
  // Two dtypes: a "last one wins" reader and a "first one wins" reader would disagree.
  const std::string twice = R"({"a":{"dtype":"U8","dtype":"I8","shape":[1],"data_offsets":[0,1]}})";
  CHECK_REJECTS(make_file(twice, zeros(1)), "field \"dtype\" appears twice in this entry", "a", 9);
  const std::string meta = R"({"__metadata__":{"k":"v","k":"w"}})";
  CHECK_REJECTS(make_file(meta), "field \"k\" appears twice in this entry", "__metadata__", 9);
  // The same field name in two different entries is of course fine.
  const std::string ok = "{" + entry("a", "U8", "[1]", "[0,1]") + "," + entry("b", "U8", "[1]", "[1,2]") + "}";
  CHECK(io::parse_safetensors(make_file(ok, zeros(2)), kLabel).tensors.size() == 2);
}

// ---------------------------------------------------------------------------------------------
// Entries.

TEST_CASE("safetensors: rejects entries missing dtype, shape or data_offsets, and non-object entries") {
  CHECK_REJECTS(make_file(R"({"a":{"shape":[1],"data_offsets":[0,1]}})", zeros(1)), "entry has no \"dtype\"", "a", 9);
  CHECK_REJECTS(make_file(R"({"a":{"dtype":"U8","data_offsets":[0,1]}})", zeros(1)), "entry has no \"shape\"", "a", 9);
  CHECK_REJECTS(make_file(R"({"a":{"dtype":"U8","shape":[1]}})", zeros(1)), "entry has no \"data_offsets\"", "a", 9);
  CHECK_REJECTS(make_file(R"({"a":{}})"), "entry has no \"dtype\"", "a", 9);
  CHECK_REJECTS(make_file(R"({"a":[0,1]})"), "entry is not an object", "a", 9);
  CHECK_REJECTS(make_file(R"({"a":"F32"})"), "entry is not an object", "a", 9);
  CHECK_REJECTS(make_file(R"({"":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}})"), "empty tensor name", "", 9);
}

TEST_CASE("safetensors: rejects unknown dtypes") {
  for (const std::string dt : {"F33", "f32", "", "FLOAT", "F8", "BF16 ", "Q4_0"}) {
    CAPTURE(dt);
    CHECK_REJECTS(make_file(object({entry("a", dt, "[1]", "[0,1]")}), zeros(1)), "unknown dtype '" + dt + "'", "a", 9);
  }
  CHECK_REJECTS(make_file(R"({"a":{"dtype":4,"shape":[1],"data_offsets":[0,4]}})", zeros(4)), "dtype is not a string", "a", 9);
  CHECK_REJECTS(make_file(R"({"a":{"dtype":null,"shape":[1],"data_offsets":[0,4]}})", zeros(4)), "dtype is not a string", "a", 9);
}

TEST_CASE("safetensors: errors in a later entry name that tensor at its key's offset") {
  const std::string header = pad8(object({entry("first", "F32", "[2]", "[0,8]"), entry("second", "F99", "[2]", "[8,16]")}));
  CHECK_REJECTS(make_file(header, zeros(16)), "unknown dtype 'F99'", "second", 8 + header.find("\"second\""));
}

TEST_CASE("safetensors: rejects negative and non-integer dimensions") {
  CHECK_REJECTS(make_file(object({entry("a", "U8", "[-1]", "[0,0]")})), "shape dimension is negative (-1)", "a", 9);
  CHECK_REJECTS(make_file(object({entry("a", "U8", "[2,-3]", "[0,0]")})), "shape dimension is negative (-3)", "a", 9);
  for (const std::string dim : {"2.0", "2.5", "1e2", "\"2\"", "null", "true", "[2]", "{}", "18446744073709551616"}) {
    CAPTURE(dim);
    CHECK_REJECTS(make_file(object({entry("a", "U8", "[" + dim + "]", "[0,2]")}), zeros(2)), "shape dimension must be a non-negative integer",
                  "a", 9);
  }
  for (const std::string shape : {"2", "\"[2]\"", "{}", "null"}) {
    CAPTURE(shape);
    CHECK_REJECTS(make_file(object({entry("a", "U8", shape, "[0,2]")}), zeros(2)), "shape is not an array", "a", 9);
  }
}

TEST_CASE("safetensors: rejects shapes whose byte size overflows 64 bits") {
  CHECK_REJECTS(make_file(object({entry("a", "U8", "[1099511627776,1099511627776]", "[0,0]")})),
                "size of shape [1099511627776, 1099511627776] x U8 overflows 64 bits", "a", 9);
  // The element count fits; times the 4-byte element size it does not.
  CHECK_REJECTS(make_file(object({entry("a", "F32", "[4611686018427387904]", "[0,0]")})), "x F32 overflows 64 bits", "a", 9);
  // A later zero does not excuse an overflowed product (the reference implementation agrees).
  CHECK_REJECTS(make_file(object({entry("a", "U8", "[1099511627776,1099511627776,0]", "[0,0]")})), "overflows 64 bits", "a", 9);
  CHECK_REJECTS(make_file(object({entry("a", "U64", "[18446744073709551615,2]", "[0,0]")})), "overflows 64 bits", "a", 9);
}

TEST_CASE("safetensors: rejects malformed data_offsets") {
  for (const std::string offs : {"[0]", "[0,1,2]", "[]", "{\"begin\":0,\"end\":1}", "\"0,1\"", "null", "1"}) {
    CAPTURE(offs);
    CHECK_REJECTS(make_file(object({entry("a", "U8", "[1]", offs)}), zeros(1)), "data_offsets must be an array [begin, end]", "a", 9);
  }
  CHECK_REJECTS(make_file(object({entry("a", "U8", "[1]", "[-1,0]")}), zeros(1)), "data_offsets begin is negative (-1)", "a", 9);
  CHECK_REJECTS(make_file(object({entry("a", "U8", "[1]", "[0,-1]")}), zeros(1)), "data_offsets end is negative (-1)", "a", 9);
  CHECK_REJECTS(make_file(object({entry("a", "U8", "[1]", "[0,\"1\"]")}), zeros(1)), "data_offsets end must be a non-negative integer", "a", 9);
  CHECK_REJECTS(make_file(object({entry("a", "U8", "[1]", "[0.0,1]")}), zeros(1)), "data_offsets begin must be a non-negative integer", "a",
                9);
}

TEST_CASE("safetensors: rejects data_offsets that end before they begin") {
  CHECK_REJECTS(make_file(object({entry("a", "U8", "[0]", "[4,0]")}), zeros(4)), "data_offsets [4, 0] end before they begin", "a", 9);
}

TEST_CASE("safetensors: rejects byte counts that disagree with the shape") {
  {
    const std::string header = pad8(object({entry("a", "F32", "[2,3]", "[0,20]")}));
    CHECK_REJECTS(make_file(header, zeros(20)), "shape [2, 3] of F32 needs 24 bytes but data_offsets [0, 20] hold 20", "a",
                  8 + header.size());
  }
  {
    // The offset is that of the tensor's own data: 8 + N + begin.
    const std::string header = pad8(object({entry("a", "F64", "[1]", "[0,8]"), entry("b", "F32", "[2]", "[8,20]")}));
    CHECK_REJECTS(make_file(header, zeros(20)), "shape [2] of F32 needs 8 bytes but data_offsets [8, 20] hold 12", "b", 8 + header.size() + 8);
  }
  CHECK_REJECTS(make_file(object({entry("s", "I8", "[]", "[0,0]")})), "shape [] of I8 needs 1 bytes", "s", 8 + object({entry("s", "I8", "[]", "[0,0]")}).size());
  {
    const std::string header = object({entry("e", "U8", "[0,5]", "[0,4]")});
    CHECK_REJECTS(make_file(header, zeros(4)), "needs 0 bytes but data_offsets [0, 4] hold 4", "e", 8 + header.size());
  }
}

TEST_CASE("safetensors: rejects data_offsets past the end of the file") {
  {
    const std::string header = object({entry("a", "U8", "[4]", "[0,4]"), entry("b", "U8", "[4]", "[4,8]")});
    const std::uint64_t base = 8 + header.size();
    CHECK_REJECTS(make_file(header, zeros(6)), "data_offsets [4, 8] run past the end of the file (data section holds 6 bytes)", "b", base + 4);
  }
  {
    // begin past the end too: the offset is clamped to the end of the file.
    const std::string header = object({entry("a", "U8", "[4]", "[10,14]")});
    CHECK_REJECTS(make_file(header, zeros(6)), "run past the end of the file", "a", 8 + header.size() + 6);
  }
  {
    const std::string header = object({entry("a", "U8", "[0]", "[18446744073709551615,18446744073709551615]")});
    CHECK_REJECTS(make_file(header, zeros(3)), "run past the end of the file (data section holds 3 bytes)", "a", 8 + header.size() + 3);
  }
}

TEST_CASE("safetensors: rejects overlapping tensors") {
  {
    const std::string header = object({entry("a", "U8", "[4]", "[0,4]"), entry("b", "U8", "[4]", "[2,6]")});
    CHECK_REJECTS(make_file(header, zeros(6)), "data [2, 6) overlaps tensor 'a' [0, 4)", "b", 8 + header.size() + 2);
  }
  {
    // Two names for the same bytes.
    const std::string header = object({entry("a", "U8", "[4]", "[0,4]"), entry("b", "I8", "[4]", "[0,4]")});
    CHECK_REJECTS(make_file(header, zeros(4)), "overlaps tensor 'a' [0, 4)", "b", 8 + header.size());
  }
  {
    // An empty tensor inside another one's data.
    const std::string header = object({entry("a", "U8", "[8]", "[0,8]"), entry("z", "U8", "[0]", "[4,4]")});
    CHECK_REJECTS(make_file(header, zeros(8)), "overlaps tensor 'a' [0, 8)", "z", 8 + header.size() + 4);
  }
  {
    // A tensor wholly inside a longer one listed later: still named against the right neighbour.
    const std::string header = object({entry("big", "U8", "[8]", "[0,8]"), entry("c", "U8", "[2]", "[8,10]"), entry("in", "U8", "[2]", "[8,10]")});
    CHECK_REJECTS(make_file(header, zeros(10)), "overlaps tensor 'c' [8, 10)", "in", 8 + header.size() + 8);
  }
}

TEST_CASE("safetensors: rejects gaps between tensors and before the first") {
  {
    const std::string header = object({entry("a", "U8", "[4]", "[0,4]"), entry("b", "U8", "[4]", "[8,12]")});
    CHECK_REJECTS(make_file(header, zeros(12)), "gap of 4 unused bytes before this tensor's data", "b", 8 + header.size() + 4);
  }
  {
    const std::string header = object({entry("a", "U8", "[4]", "[4,8]")});
    CHECK_REJECTS(make_file(header, zeros(8)), "gap of 4 unused bytes", "a", 8 + header.size());
  }
}

TEST_CASE("safetensors: rejects trailing bytes after the last tensor") {
  {
    const std::string header = object({entry("a", "U8", "[4]", "[0,4]")});
    CHECK_REJECTS(make_file(header, zeros(7)), "3 trailing bytes after the last tensor's data", "", 8 + header.size() + 4);
  }
  CHECK_REJECTS(make_file("{}", zeros(5)), "5 trailing bytes", "", 10);
  CHECK_REJECTS(make_file(R"({"__metadata__":{"a":"b"}})", zeros(1)), "1 trailing bytes", "", 8 + 26);
}

TEST_CASE("safetensors: rejects tensors not aligned to their element size in the file") {
  {
    const std::string header = pad8(object({entry("a", "U8", "[1]", "[0,1]"), entry("b", "F32", "[1]", "[1,5]")}));
    const std::uint64_t base = 8 + header.size();
    REQUIRE(base % 8 == 0);
    CHECK_REJECTS(make_file(header, zeros(5)), "data is not aligned to its 4-byte element size", "b", base + 1);
  }
  {
    const std::string header = pad8(object({entry("a", "F32", "[1]", "[0,4]"), entry("b", "F64", "[1]", "[4,12]")}));
    CHECK_REJECTS(make_file(header, zeros(12)), "not aligned to its 8-byte element size", "b", 8 + header.size() + 4);
  }
  {
    const std::string header = pad8(object({entry("a", "U8", "[1]", "[0,1]"), entry("b", "BF16", "[1]", "[1,3]")}));
    CHECK_REJECTS(make_file(header, zeros(3)), "not aligned to its 2-byte element size", "b", 8 + header.size() + 1);
  }
  {
    // Offsets relative to the data section are fine, but the header length puts the data at an
    // odd position in the file.
    std::string header = pad8(object({entry("a", "F32", "[1]", "[0,4]")})) + " ";
    CHECK_REJECTS(make_file(header, zeros(4)), "not aligned to its 4-byte element size", "a", 8 + header.size());
  }
}

TEST_CASE("safetensors: rejects malformed __metadata__") {
  for (const std::string meta : {"\"x\"", "[]", "[\"a\",\"b\"]", "1", "null"}) {
    CAPTURE(meta);
    CHECK_REJECTS(make_file("{\"__metadata__\":" + meta + "}"), "__metadata__ must be an object of strings", "__metadata__", 9);
  }
  for (const std::string value : {"1", "null", "true", "[\"v\"]", "{\"x\":\"y\"}"}) {
    CAPTURE(value);
    CHECK_REJECTS(make_file(R"({"__metadata__":{"ok":"fine","k":)" + value + "}}"), "__metadata__ value of 'k' is not a string", "__metadata__",
                  9);
  }
  // Located at the __metadata__ key even when tensors come first.
  const std::string header = object({entry("a", "U8", "[1]", "[0,1]"), R"("__metadata__":7)"});
  CHECK_REJECTS(make_file(header, zeros(1)), "__metadata__ must be an object", "__metadata__", 8 + header.find("\"__metadata__\""));
}

TEST_CASE("safetensors: a header with 40 000 tensors parses completely") {
  // Parse time on many tensors (it was quadratic: 50 000 took 90 s) is measured in
  // bench/safetensors.cpp, not asserted here.
  std::vector<std::string> names;
  std::vector<io::TensorData> tensors;
  const Bytes one = zeros(1);
  const std::size_t count = 40'000;
  for (std::size_t i = 0; i < count; ++i) names.push_back("model.layers." + std::to_string(i) + ".mlp.experts.0.w1.weight");
  for (const auto& n : names) tensors.push_back({n, dtype::u8, {1}, one});
  const auto [head, order] = io::safetensors_layout(tensors, {}, "many");
  Bytes file(head.size() + count);
  std::memcpy(file.data(), head.data(), head.size());
  const auto h = io::parse_safetensors(file, "many");
  REQUIRE(h.tensors.size() == count);
  CHECK(order.size() == count);
  CHECK(h.tensors.back().end == count);
  CHECK(h.find(names[12345]) != nullptr);
}

// ---------------------------------------------------------------------------------------------
// SafetensorsFile on real files.

TEST_CASE("safetensors: SafetensorsFile rejects a truncated file and names its path") {
  s2lc::test::TempDir dir;
  const auto path = dir / "short.safetensors";
  for (std::size_t n : {0u, 5u}) {
    CAPTURE(n);
    s2lc::test::write_bytes(path, Bytes(n, std::byte{1}));
    try {
      io::SafetensorsFile f(path);
      FAIL("truncated file accepted");
    } catch (const s2lc::format_error& e) {
      CHECK(e.file() == path.string());
      CHECK_CONTAINS(e.message(), "truncated file: " + std::to_string(n) + " bytes");
      CHECK_CONTAINS(e.what(), "file '" + path.string() + "'");
      CHECK(e.offset() == std::optional<std::uint64_t>(0));
    }
  }
  // Cut off inside the data: the header promises 8 bytes, 5 remain.
  const std::string header = pad8(object({entry("a", "F64", "[1]", "[0,8]")}));
  const Bytes full = make_file(header, pattern(8, 3));
  const Bytes file(full.begin(), full.end() - 3);
  s2lc::test::write_bytes(path, file);
  try {
    io::SafetensorsFile f(path);
    FAIL("truncated data accepted");
  } catch (const s2lc::format_error& e) {
    CHECK(e.file() == path.string());
    CHECK(e.tensor() == "a");
    CHECK_CONTAINS(e.message(), "run past the end of the file (data section holds 5 bytes)");
  }
}

TEST_CASE("safetensors: SafetensorsFile on a missing path or a directory throws io_error") {
  s2lc::test::TempDir dir;
  const auto missing = dir / "does-not-exist.safetensors";
  try {
    io::SafetensorsFile f(missing);
    FAIL("opened a missing file");
  } catch (const s2lc::io_error& e) {
    CHECK(e.file() == missing.string());
    CHECK_CONTAINS(e.message(), "cannot open");
  }
  CHECK_THROWS_WITH_AS(io::SafetensorsFile(dir.path()), doctest::Contains("not a regular file"), s2lc::io_error);
}

TEST_CASE("safetensors: every dtype round-trips bit-exactly through write_safetensors and SafetensorsFile") {
  s2lc::test::TempDir dir;
  std::vector<std::string> names;
  std::vector<Bytes> payloads;
  std::vector<io::TensorData> tensors;
  std::uint32_t seed = 1;
  auto add = [&](const std::string& name, dtype t, std::vector<std::uint64_t> shape) {
    std::uint64_t numel = 1;
    for (auto d : shape) numel *= d;
    names.push_back(name);
    payloads.push_back(pattern(static_cast<std::size_t>(numel * s2lc::dtype_size(t)), seed++));
    tensors.push_back({name, t, std::move(shape), {}});
  };
  // Narrow and wide types interleaved, so the writer must reorder them to keep alignment.
  for (dtype t : s2lc::all_dtypes) {
    const std::string n(s2lc::dtype_name(t));
    add("t." + n, t, {3, 5});
    add("scalar." + n, t, {});
  }
  add("empty.f32", dtype::f32, {0, 7});
  add("empty.u8", dtype::u8, {3, 0});
  add("vec.bf16", dtype::bf16, {17});
  for (std::size_t i = 0; i < tensors.size(); ++i) tensors[i].data = payloads[i];
  const std::map<std::string, std::string> metadata{{"format", "pt"}, {"note", "ünïcødé ✓ \"quoted\"\n"}, {"empty", ""}};

  const auto path = dir / "all.safetensors";
  io::write_safetensors(path, tensors, metadata);
  CHECK(listing(dir.path()) == std::vector<std::string>{"all.safetensors"});

  io::SafetensorsFile f(path);
  CHECK(f.path() == path);
  CHECK(f.tensors().size() == tensors.size());
  CHECK(f.metadata() == metadata);
  CHECK(f.header().header_size % 8 == 0);
  std::uint64_t total = 0;
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    CAPTURE(names[i]);
    const auto* t = f.find(names[i]);
    REQUIRE(t != nullptr);
    CHECK(t->type == tensors[i].type);
    CHECK(t->shape == tensors[i].shape);
    CHECK(t->nbytes() == payloads[i].size());
    CHECK(same_bytes(f.bytes(*t), payloads[i]));
    CHECK(f.offset_of(*t) % s2lc::dtype_size(t->type) == 0);
    total += t->nbytes();
  }
  CHECK(f.file_size() == f.header().data_offset() + total);
  // Data are laid out widest element type first.
  for (std::size_t i = 1; i < f.tensors().size(); ++i)
    CHECK(s2lc::dtype_size(f.tensors()[i - 1].type) >= s2lc::dtype_size(f.tensors()[i].type));

  // Re-writing what was read (in the file's order, or the original order) gives the same bytes.
  std::vector<io::TensorData> again;
  for (const auto& t : f.tensors()) again.push_back({t.name, t.type, t.shape, f.bytes(t)});
  io::write_safetensors(dir / "again.safetensors", again, f.metadata());
  io::write_safetensors(dir / "again2.safetensors", tensors, metadata);
  const Bytes original = s2lc::test::read_bytes(path);
  CHECK(s2lc::test::read_bytes(dir / "again.safetensors") == original);
  CHECK(s2lc::test::read_bytes(dir / "again2.safetensors") == original);

  // The bytes safetensors_layout promises are the bytes written.
  const auto [head, order] = io::safetensors_layout(tensors, metadata, "layout");
  REQUIRE(head.size() <= original.size());
  CHECK(same_bytes(as_bytes(head), std::span<const std::byte>(original).first(head.size())));
  CHECK(order.size() == tensors.size());
}

TEST_CASE("safetensors: typed views check the element type, at() names a missing tensor") {
  s2lc::test::TempDir dir;
  const std::vector<float> f32{1.5f, -2.0f, 3.25f};
  const std::vector<std::uint16_t> bf{0x3F80, 0xC000};
  const std::vector<io::TensorData> tensors{
      {"w", dtype::f32, {3}, std::as_bytes(std::span<const float>(f32))},
      {"h", dtype::bf16, {2, 1}, std::as_bytes(std::span<const std::uint16_t>(bf))},
  };
  const auto path = dir / "v.safetensors";
  io::write_safetensors(path, tensors);
  io::SafetensorsFile f(path);

  const auto w = f.view<float>("w");
  REQUIRE(w.size() == 3);
  CHECK(w[0] == 1.5f);
  CHECK(w[1] == -2.0f);
  CHECK(w[2] == 3.25f);
  const auto h = f.view<s2lc::bf16_t>("h");
  REQUIRE(h.size() == 2);
  CHECK(h[0].bits == 0x3F80);
  CHECK(h[1].bits == 0xC000);

  try {
    (void)f.view<double>("w");
    FAIL("view<double> of an F32 tensor");
  } catch (const s2lc::invalid_argument& e) {
    CHECK_CONTAINS(e.message(), "stored as F32, requested as F64");
    CHECK(e.tensor() == "w");
    CHECK(e.file() == path.string());
    CHECK(e.offset() == std::optional<std::uint64_t>(f.offset_of(f.at("w"))));
  }
  CHECK_THROWS_WITH_AS((void)f.view<std::uint16_t>("h"), doctest::Contains("stored as BF16, requested as U16"), s2lc::invalid_argument);
  CHECK_THROWS_WITH_AS((void)f.view<s2lc::f16_t>("h"), doctest::Contains("requested as F16"), s2lc::invalid_argument);

  try {
    (void)f.at("missing");
    FAIL("at() of a missing tensor");
  } catch (const s2lc::invalid_argument& e) {
    CHECK_CONTAINS(e.message(), "no such tensor");
    CHECK(e.tensor() == "missing");
    CHECK(e.file() == path.string());
    CHECK_CONTAINS(e.what(), "tensor 'missing'");
  }
  CHECK_THROWS_AS((void)f.bytes("missing"), s2lc::invalid_argument);
  CHECK_THROWS_AS((void)f.view<float>("missing"), s2lc::invalid_argument);
}

// ---------------------------------------------------------------------------------------------
// Real fixtures.

TEST_CASE("safetensors: the tinymoe layer-1 fixture reads, and re-writes to identical tensors") {
  const auto path = s2lc::test::data_dir() / "tinymoe-upcycled-L1.safetensors";
  io::SafetensorsFile f(path);
  CHECK(f.tensors().size() == 25);
  const auto& w1 = f.at("layers.1.moe.experts.0.w1.weight");
  CHECK(w1.type == dtype::bf16);
  CHECK(w1.shape == std::vector<std::uint64_t>{768, 256});
  CHECK(w1.nbytes() == 768u * 256u * 2u);
  CHECK(f.view<s2lc::bf16_t>("layers.1.moe.experts.0.w1.weight").size() == 768u * 256u);
  CHECK(f.metadata().count("format") == 1);
  const auto b = f.bytes(w1);
  CHECK(std::any_of(b.begin(), b.end(), [](std::byte x) { return x != std::byte{0}; }));
  std::uint64_t total = 0;
  for (const auto& t : f.tensors()) total += t.nbytes();
  CHECK(f.file_size() == f.header().data_offset() + total);

  s2lc::test::TempDir dir;
  std::vector<io::TensorData> tensors;
  for (const auto& t : f.tensors()) tensors.push_back({t.name, t.type, t.shape, f.bytes(t)});
  const auto copy = dir / "copy.safetensors";
  io::write_safetensors(copy, tensors, f.metadata());
  io::SafetensorsFile g(copy);
  CHECK(g.tensors().size() == f.tensors().size());
  CHECK(g.metadata() == f.metadata());
  for (const auto& t : f.tensors()) {
    CAPTURE(t.name);
    const auto* u = g.find(t.name);
    REQUIRE(u != nullptr);
    CHECK(u->type == t.type);
    CHECK(u->shape == t.shape);
    CHECK(same_bytes(g.bytes(*u), f.bytes(t)));
  }
}

TEST_CASE("safetensors: the full shared tinymoe model opens") {
  io::SafetensorsFile f(s2lc::test::shared_dir() / "tinymoe/moe-upcycled.safetensors");
  CHECK(f.tensors().size() == 126);
  CHECK(f.find("layers.0.moe.experts.7.w2.weight") != nullptr);
  std::uint64_t total = 0;
  for (const auto& t : f.tensors()) total += t.nbytes();
  CHECK(f.file_size() == f.header().data_offset() + total);
}

// ---------------------------------------------------------------------------------------------
// The writer.

TEST_CASE("safetensors: a rejected write leaves the existing file byte-identical and no temporary files") {
  s2lc::test::TempDir dir;
  const auto path = dir / "model.safetensors";
  const Bytes a = pattern(8, 7);
  const Bytes b = pattern(7, 8);
  io::write_safetensors(path, std::vector<io::TensorData>{{"a", dtype::f32, {2}, a}}, {{"v", "1"}});
  const Bytes before = s2lc::test::read_bytes(path);
  REQUIRE(!before.empty());

  auto check_untouched = [&] {
    CHECK(s2lc::test::read_bytes(path) == before);
    CHECK(listing(dir.path()) == std::vector<std::string>{"model.safetensors"});
  };
  SUBCASE("duplicate names") {
    const std::vector<io::TensorData> t{{"x", dtype::u8, {8}, a}, {"x", dtype::u8, {8}, a}};
    CHECK_THROWS_WITH_AS(io::write_safetensors(path, t), doctest::Contains("tensor name given twice"), s2lc::invalid_argument);
    check_untouched();
  }
  SUBCASE("size mismatch") {
    const std::vector<io::TensorData> t{{"ok", dtype::u8, {8}, a}, {"x", dtype::f32, {2}, b}};
    try {
      io::write_safetensors(path, t);
      FAIL("size mismatch accepted");
    } catch (const s2lc::invalid_argument& e) {
      CHECK_CONTAINS(e.message(), "shape [2] of F32 needs 8 bytes, got 7");
      CHECK(e.tensor() == "x");
      CHECK(e.file() == path.string());
    }
    check_untouched();
  }
  SUBCASE("reserved or empty names") {
    CHECK_THROWS_WITH_AS(io::write_safetensors(path, std::vector<io::TensorData>{{"__metadata__", dtype::u8, {8}, a}}),
                         doctest::Contains("invalid tensor name"), s2lc::invalid_argument);
    CHECK_THROWS_WITH_AS(io::write_safetensors(path, std::vector<io::TensorData>{{"", dtype::u8, {8}, a}}), doctest::Contains("invalid tensor name"),
                         s2lc::invalid_argument);
    check_untouched();
  }
  SUBCASE("a shape whose size overflows (regression: the product wrapped to 0 and an unreadable file was written)") {
    const std::vector<io::TensorData> t{{"huge", dtype::u8, {k2p40, k2p40}, {}}};
    CHECK_THROWS_WITH_AS(io::write_safetensors(path, t), doctest::Contains("overflows 64 bits"), s2lc::invalid_argument);
    const std::vector<io::TensorData> t2{{"huge", dtype::f64, {std::uint64_t{1} << 61}, {}}};
    CHECK_THROWS_WITH_AS(io::write_safetensors(path, t2), doctest::Contains("overflows 64 bits"), s2lc::invalid_argument);
    check_untouched();
  }
  SUBCASE("names and metadata that are not UTF-8 (regression: nlohmann's type_error escaped)") {
    CHECK_THROWS_WITH_AS(io::write_safetensors(path, std::vector<io::TensorData>{{"bad\xff", dtype::u8, {8}, a}}),
                         doctest::Contains("not valid UTF-8"), s2lc::invalid_argument);
    CHECK_THROWS_WITH_AS(io::write_safetensors(path, std::vector<io::TensorData>{{"a", dtype::u8, {8}, a}}, {{"k", "\xc3"}}),
                         doctest::Contains("not valid UTF-8"), s2lc::invalid_argument);
    check_untouched();
  }
  SUBCASE("a failure while the data are being written") {
    // write_safetensors' own failure path: write_atomically with a sink that throws mid-way.
    CHECK_THROWS_WITH_AS(io::write_atomically(path,
                                              [&](io::FileSink& out) {
                                                out.write(a);
                                                throw std::runtime_error("disk full (simulated)");
                                              }),
                         "disk full (simulated)", std::runtime_error);
    check_untouched();
  }
  SUBCASE("a valid write replaces the file") {
    io::write_safetensors(path, std::vector<io::TensorData>{{"b", dtype::u8, {7}, b}});
    CHECK(s2lc::test::read_bytes(path) != before);
    CHECK(listing(dir.path()) == std::vector<std::string>{"model.safetensors"});
    io::SafetensorsFile f(path);
    REQUIRE(f.tensors().size() == 1);
    CHECK(same_bytes(f.bytes("b"), b));
    CHECK(f.metadata().empty());
  }
}

TEST_CASE("safetensors: writing into a missing directory throws io_error naming the path") {
  s2lc::test::TempDir dir;
  const auto path = dir / "no/such/dir/out.safetensors";
  const Bytes a = pattern(4, 1);
  try {
    io::write_safetensors(path, std::vector<io::TensorData>{{"a", dtype::f32, {1}, a}});
    FAIL("wrote into a missing directory");
  } catch (const s2lc::io_error& e) {
    CHECK(e.file() == path.string());
    CHECK_CONTAINS(e.message(), "cannot create temporary file");
    CHECK_CONTAINS(e.what(), path.string());
  }
  CHECK(!std::filesystem::exists(path));
}

TEST_CASE("safetensors: an empty tensor list writes a valid, empty file") {
  s2lc::test::TempDir dir;
  const auto path = dir / "empty.safetensors";
  io::write_safetensors(path, std::span<const io::TensorData>{});
  io::SafetensorsFile f(path);
  CHECK(f.tensors().empty());
  CHECK(f.metadata().empty());
  CHECK(f.file_size() == f.header().data_offset());
  CHECK(f.file_size() % 8 == 0);
}

}  // namespace suite_io_safetensors

#undef CHECK_CONTAINS
#undef CHECK_REJECTS
