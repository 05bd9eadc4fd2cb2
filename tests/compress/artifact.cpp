// Tests for s2lc/compress/artifact.hpp: the .s2lc artifact round trip (every reconstruction equal
// to the in-memory compression bit for bit; write_safetensors restores every input tensor), and
// the reader's rejection of corrupt or inconsistent artifacts: a flipped data byte, and
// containers rebuilt from a good artifact with one manifest field or block record tampered (their
// checksums valid, so only the artifact reader can catch them), each a format_error naming the
// section and the byte offset.
#include <doctest/doctest.h>

#include "compress/synthetic.hpp"
#include "support.hpp"

#include <s2lc/compress/artifact.hpp>
#include <s2lc/compress/compressor.hpp>
#include <s2lc/compress/model.hpp>
#include <s2lc/compress/pipeline.hpp>
#include <s2lc/dtype.hpp>
#include <s2lc/error.hpp>
#include <s2lc/io/container.hpp>
#include <s2lc/io/safetensors.hpp>
#include <s2lc/tensor.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <random>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

// The suite's own scope: the suites compile in unity groups (tests/CMakeLists.txt).
namespace suite_compress_artifact {

extern "C" void openblas_set_num_threads(int);  // the tests link OpenBLAS (BLA_VENDOR=OpenBLAS)

// Under ASan + UBSan (the asan preset) the compressor runs about 10x slower: the fixture round trip
// (two full compressions) is skipped there (doctest::skip; run it with --no-skip); the synthetic
// round trip covers every block kind under the sanitizers.
using s2lc::test::kSanitized;

namespace {

namespace cz = s2lc::compress;
namespace io = s2lc::io;
using s2lc::matrix;
using Bytes = std::vector<std::byte>;

std::filesystem::path fixture() { return s2lc::test::data_dir() / "tinymoe-upcycled-L1.safetensors"; }

bool contains(std::string_view hay, std::string_view needle) { return hay.find(needle) != std::string_view::npos; }

bool same_bytes(std::span<const std::byte> a, std::span<const std::byte> b) { return std::equal(a.begin(), a.end(), b.begin(), b.end()); }

bool same_bits(const matrix& a, const matrix& b) {
  return a.shape() == b.shape() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

bool same_q(const cz::QMatrix& a, const cz::QMatrix& b) {
  return a.rows == b.rows && a.cols == b.cols && (a.rows == 0 || (a.bits == b.bits && a.group == b.group)) && a.codes == b.codes &&
         a.scales == b.scales;
}

/// The block structure of two groups agrees field by field (what the artifact stores of them).
void check_same_group(const cz::CompressedGroup& got, const cz::CompressedGroup& want) {
  CHECK(got.name == want.name);
  CHECK(got.member_names == want.member_names);
  CHECK(got.member_sources == want.member_sources);
  CHECK(got.type == want.type);
  CHECK(got.grid.rows == want.grid.rows);
  CHECK(got.grid.cols == want.grid.cols);
  CHECK(got.grid.block_rows == want.grid.block_rows);
  CHECK(got.grid.block_cols == want.grid.block_cols);
  CHECK(got.group_size == want.group_size);
  CHECK(got.leaf == want.leaf);
  // The block counts the compressor reported come back too.
  for (std::size_t k = 0; k < 5; ++k) CHECK(got.stats.blocks_by_kind[k] == want.stats.blocks_by_kind[k]);
  REQUIRE(got.nodes.size() == want.nodes.size());
  REQUIRE(got.residuals.size() == want.residuals.size());
  REQUIRE(got.bases.size() == want.bases.size());
  std::size_t differ = 0;
  auto same_blocks = [&](const cz::BlockMatrix& a, const cz::BlockMatrix& b) {
    REQUIRE(a.blocks.size() == b.blocks.size());
    for (std::size_t i = 0; i < a.blocks.size(); ++i) {
      const auto &x = a.blocks[i], &y = b.blocks[i];
      if (x.kind != y.kind) {
        ++differ;
        continue;
      }
      const bool rank_used = x.kind == cz::block_kind::lowrank || x.kind == cz::block_kind::shared;
      if ((rank_used && x.rank != y.rank) || (x.kind == cz::block_kind::shared && x.basis != y.basis) || !same_q(x.a, y.a) ||
          !same_q(x.b, y.b) || x.raw != y.raw)
        ++differ;
    }
  };
  for (std::size_t n = 0; n < got.nodes.size(); ++n) {
    CHECK(got.nodes[n].level == want.nodes[n].level);
    CHECK(got.nodes[n].parent == want.nodes[n].parent);
    CHECK(got.nodes[n].members == want.nodes[n].members);
    same_blocks(got.nodes[n].core, want.nodes[n].core);
  }
  for (std::size_t e = 0; e < got.residuals.size(); ++e) same_blocks(got.residuals[e], want.residuals[e]);
  for (std::size_t b = 0; b < got.bases.size(); ++b) {
    CHECK(got.bases[b].node == want.bases[b].node);
    CHECK(got.bases[b].block == want.bases[b].block);
    CHECK(same_q(got.bases[b].u, want.bases[b].u));
  }
  CHECK(differ == 0);
}

/// Every member of every group, at every tier, reconstructs bit for bit as in memory.
void check_same_reconstruction(const cz::Artifact& a, const cz::Compressed& c) {
  REQUIRE(a.groups().size() == c.groups.size());
  for (std::size_t g = 0; g < c.groups.size(); ++g) {
    check_same_group(a.groups()[g], c.groups[g]);
    for (std::uint32_t e = 0; e < c.groups[g].residuals.size(); ++e)
      for (unsigned tier : {0u, 8u, 4u, 2u}) {
        CAPTURE(g);
        CAPTURE(e);
        CAPTURE(tier);
        CHECK(same_bits(a.reconstruct(g, e, tier), cz::reconstruct(c.groups[g], e, tier)));
      }
  }
}

using s2lc::test::small_blocks;
using s2lc::test::synthetic_groups;

/// A good artifact of the fixture at ratio 8 (compressed once per process).
const Bytes& good_artifact() {
  static const Bytes bytes = [] {
    openblas_set_num_threads(1);
    s2lc::test::TempDir dir;
    cz::Options opt;
    opt.ratio = 8;
    opt.threads = 2;
    cz::compress_files({fixture()}, dir / "good.s2lc", opt);
    return s2lc::test::read_bytes(dir / "good.s2lc");
  }();
  return bytes;
}

/// The sections of a container, editable, and the container rebuilt from them (valid checksums).
struct Sections {
  struct Section {
    std::string name;
    io::section_kind kind;
    s2lc::dtype type;
    std::vector<std::uint64_t> shape;
    Bytes data;
  };
  std::vector<Section> list;

  [[gnu::noinline]] explicit Sections(const Bytes& file) {
    const auto v = io::parse_container(file, "good");
    for (const auto& s : v.sections()) list.push_back({s.name, s.kind, s.type, s.shape, Bytes(s.bytes.begin(), s.bytes.end())});
  }
  [[gnu::noinline]] Section& at(const std::string& name) {
    for (auto& s : list)
      if (s.name == name) return s;
    throw std::runtime_error("test harness: no section " + name);
  }
  [[gnu::noinline]] void erase(const std::string& name) {
    list.erase(std::remove_if(list.begin(), list.end(), [&](const Section& s) { return s.name == name; }), list.end());
  }
  [[gnu::noinline]] nlohmann::json manifest() {
    return nlohmann::json::parse(std::string(reinterpret_cast<const char*>(at("manifest").data.data()), at("manifest").data.size()));
  }
  [[gnu::noinline]] void set_manifest(const nlohmann::json& m) {
    const std::string text = m.dump();
    auto& s = at("manifest");
    s.data.assign(reinterpret_cast<const std::byte*>(text.data()), reinterpret_cast<const std::byte*>(text.data()) + text.size());
    s.shape = {text.size()};
  }
  /// Field f of record r of a U32 [n, width] section.
  [[gnu::noinline]] std::uint32_t get(const std::string& name, std::size_t r, std::size_t f) {
    auto& s = at(name);
    std::uint32_t v;
    std::memcpy(&v, s.data.data() + 4 * (r * s.shape[1] + f), 4);
    return v;
  }
  [[gnu::noinline]] void set(const std::string& name, std::size_t r, std::size_t f, std::uint32_t v) {
    auto& s = at(name);
    REQUIRE(4 * (r * s.shape[1] + f) + 4 <= s.data.size());
    std::memcpy(s.data.data() + 4 * (r * s.shape[1] + f), &v, 4);
  }
  [[gnu::noinline]] std::uint64_t offset_of(const std::string& name) const {
    io::ContainerBuilder b = builder();
    const Bytes bytes = b.to_bytes();
    const auto v = io::parse_container(bytes, "rebuilt");
    return v.at(name).offset;
  }
  [[gnu::noinline]] io::ContainerBuilder builder() const {
    io::ContainerBuilder b;
    for (const auto& s : list) {
      if (s.kind == io::section_kind::json) {
        b.add_json(s.name, nlohmann::json::parse(std::string(reinterpret_cast<const char*>(s.data.data()), s.data.size())));
      } else {
        b.add_array(s.name, s.type, s.shape, s.data);
      }
    }
    return b;
  }
  [[gnu::noinline]] Bytes bytes() const { return builder().to_bytes(); }
};

/// The format_error opening `file` throws, or nullopt if it opens. Any other exception escapes.
/// The file is opened both mapped and from memory (the fuzz target's path): they must agree.
[[gnu::noinline]] std::optional<s2lc::format_error> rejection(const Bytes& file) {
  s2lc::test::TempDir dir;
  s2lc::test::write_bytes(dir / "bad.s2lc", file);
  std::optional<s2lc::format_error> mapped, in_memory;
  try {
    const cz::Artifact a(dir / "bad.s2lc");
  } catch (const s2lc::format_error& e) {
    mapped = e;
  }
  try {
    const cz::Artifact a(std::span<const std::byte>(file), "mem.s2lc");
  } catch (const s2lc::format_error& e) {
    in_memory = e;
  }
  CHECK(mapped.has_value() == in_memory.has_value());
  if (mapped && in_memory) {
    CHECK(mapped->message() == in_memory->message());
    CHECK(mapped->tensor() == in_memory->tensor());
    CHECK(mapped->offset() == in_memory->offset());
    CHECK(mapped->file() == (dir / "bad.s2lc").string());
    CHECK(in_memory->file() == "mem.s2lc");
  }
  return mapped;
}

}  // namespace

#define CHECK_CONTAINS(str, needle) \
  CHECK_MESSAGE(contains((str), (needle)), "\"" << std::string(str) << "\" does not contain \"" << std::string(needle) << "\"")

namespace {

/// Opening `file` must fail with a format_error whose message contains `needle`, naming the
/// section `section` and a byte offset (`offset`, when given, exactly). An out-of-line function
/// (not a macro) so its assertions are compiled once, not at each of the dozens of call sites;
/// CHECK_REJECTS below records the call site.
[[gnu::noinline]] void check_rejects(int line, const Bytes& file, const std::string& section, std::string_view needle,
                                     std::optional<std::uint64_t> want_offset) {
  INFO("CHECK_REJECTS called from line " << line);
  const auto e = rejection(file);
  REQUIRE_MESSAGE(e.has_value(), "tampered artifact accepted");
  INFO("what(): " << std::string(e->what()));
  CHECK_CONTAINS(e->message(), needle);
  CHECK(e->tensor() == section);
  CHECK(e->offset().has_value());
  if (want_offset && e->offset()) CHECK(*e->offset() == *want_offset);
  CHECK_CONTAINS(e->what(), "'" + section + "'");
  CHECK_CONTAINS(e->what(), "byte offset");
}

}  // namespace

/// Opening `file_` must fail with a format_error whose message contains `needle_`, naming the
/// section `section_` and a byte offset (`offset_`, when given, exactly). Failures name the line
/// of the CHECK_REJECTS.
#define CHECK_REJECTS(file_, section_, needle_, offset_) \
  check_rejects(__LINE__, (file_), std::string(section_), (needle_), (offset_))

// ---------------------------------------------------------------------------------------------
// Round trips

TEST_CASE("compress: artifact round trip: compress_files output reconstructs bit for bit as the in-memory result" * doctest::skip(kSanitized)) {
  openblas_set_num_threads(1);
  s2lc::test::TempDir dir;
  cz::Options opt;
  opt.mode = cz::target_mode::energy;  // one allocation pass: compress_files == compress()
  opt.energy = 0.95;
  opt.threads = 2;
  const auto rep = cz::compress_files({fixture()}, dir / "out.s2lc", opt);
  CHECK(rep.passes == 1);
  const cz::Artifact a(dir / "out.s2lc");
  const auto in = cz::open_inputs({fixture()});
  const auto c = cz::compress(cz::group_inputs(in, nullptr), opt);
  check_same_reconstruction(a, c);
  REQUIRE(a.sources().size() == 1);
  CHECK(a.sources()[0] == "tinymoe-upcycled-L1.safetensors");
  CHECK(a.metadata(0) == in.files[0]->metadata());
  CHECK(a.manifest()["format"] == "s2lc");
  CHECK(a.manifest()["version"] == cz::artifact_version);
  // Every input tensor, in input order: 24 compressed members and the router gate copied.
  REQUIRE(a.tensors().size() == in.refs.size());
  for (std::size_t i = 0; i < in.refs.size(); ++i) {
    CHECK(a.tensors()[i].name == in.refs[i].name);
    CHECK(a.tensors()[i].type == in.refs[i].type);
    CHECK(a.tensors()[i].shape == in.refs[i].shape);
    CHECK((a.tensors()[i].copy >= 0) == (in.refs[i].name == "layers.1.moe.gate.weight"));
  }
}

TEST_CASE("compress: artifact round trip of every block kind and tier, edge blocks included") {
  const auto in = synthetic_groups();
  struct Case {
    const char* what;
    cz::Options opt;
  };
  std::vector<Case> cases;
  {
    cz::Options o;
    o.ratio = 6;
    cases.push_back({"ratio 6", small_blocks(o)});
    o.ratio = 20;
    cases.push_back({"ratio 20", small_blocks(o)});
    o.ratio = 2;
    o.bits = 4;
    cases.push_back({"ratio 2, 4 bits", small_blocks(o)});
    cz::Options e;
    e.mode = cz::target_mode::energy;
    e.energy = 1.0;
    e.energy_floor = 0;
    cases.push_back({"energy 1 (raw)", small_blocks(e)});
    e.energy = 0.9;
    e.hed.clusters = 0;
    cases.push_back({"energy 0.9, no clusters", small_blocks(e)});
  }
  std::size_t kinds[5] = {0, 0, 0, 0, 0}, with_bases = 0;
  for (const auto& cs : cases) {
    CAPTURE(cs.what);
    const auto c = cz::compress(in, cs.opt);
    for (const auto& g : c.groups) {
      for (std::size_t k = 0; k < 5; ++k) kinds[k] += g.stats.blocks_by_kind[k];
      with_bases += g.bases.size();
    }
    auto contents = s2lc::test::member_contents(in, "synthetic.safetensors");
    contents.metadata[0] = {{"note", "synthetic"}};
    io::ContainerBuilder b;
    cz::build_artifact(b, c, contents);
    s2lc::test::TempDir dir;
    b.write(dir / "s.s2lc");
    const cz::Artifact a(dir / "s.s2lc");
    check_same_reconstruction(a, c);
    CHECK(a.metadata(0).at("note") == "synthetic");
  }
  INFO("blocks over the cases: zero " << kinds[0] << ", dense " << kinds[1] << ", lowrank " << kinds[2] << ", shared " << kinds[3] << ", raw "
                                         << kinds[4] << "; " << with_bases << " shared bases");
  for (std::size_t k = 0; k < 5; ++k) CHECK(kinds[k] > 0);
  CHECK(with_bases > 0);
}

TEST_CASE("compress: Artifact::write_safetensors restores every tensor under its name and dtype, copies byte-identical") {
  s2lc::test::TempDir dir;
  s2lc::test::write_bytes(dir / "a.s2lc", good_artifact());
  const cz::Artifact a(dir / "a.s2lc");
  a.write_safetensors(dir / "out.safetensors");
  const io::SafetensorsFile orig(fixture()), out(dir / "out.safetensors");
  CHECK(out.tensors().size() == orig.tensors().size());
  CHECK(out.metadata() == orig.metadata());
  for (const auto& t : orig.tensors()) {
    CAPTURE(t.name);
    const auto* o = out.find(t.name);
    REQUIRE(o != nullptr);
    CHECK(o->type == t.type);
    CHECK(o->shape == t.shape);
    const auto it = std::find_if(a.tensors().begin(), a.tensors().end(), [&](const cz::TensorEntry& e) { return e.name == t.name; });
    REQUIRE(it != a.tensors().end());
    if (it->copy >= 0) {
      CHECK(same_bytes(out.bytes(t.name), orig.bytes(t.name)));
    } else {
      // The member's reconstruction, rounded to nearest even bf16.
      const matrix r = a.reconstruct(static_cast<std::size_t>(it->group), it->member);
      const auto got = out.bytes(t.name);
      REQUIRE(got.size() == 2 * r.size());
      std::size_t differ = 0;
      for (std::size_t i = 0; i < r.size(); ++i) {
        std::uint16_t h;
        std::memcpy(&h, got.data() + 2 * i, 2);
        if (h != s2lc::f32_to_bf16(r.data()[i])) ++differ;
      }
      CHECK(differ == 0);
      CHECK(same_bytes(got, a.tensor_bytes(*it)));
    }
  }
  CHECK(std::count_if(a.tensors().begin(), a.tensors().end(), [](const cz::TensorEntry& e) { return e.copy >= 0; }) == 1);
  // At a lower tier, too (the bytes differ from tier 0 but the layout does not).
  a.write_safetensors(dir / "out4.safetensors", 0, 4);
  const io::SafetensorsFile out4(dir / "out4.safetensors");
  CHECK(out4.tensors().size() == orig.tensors().size());
  CHECK(same_bytes(out4.bytes("layers.1.moe.gate.weight"), orig.bytes("layers.1.moe.gate.weight")));
  CHECK_FALSE(same_bytes(out4.bytes("layers.1.moe.experts.0.w1.weight"), out.bytes("layers.1.moe.experts.0.w1.weight")));
  CHECK_THROWS_AS(a.write_safetensors(dir / "x.safetensors", 1), s2lc::invalid_argument);
}

// ---------------------------------------------------------------------------------------------
// Rejections

// One test case (one process under ctest): the good artifact is compressed once.
TEST_CASE("compress: artifact rejects corrupt and inconsistent artifacts: a format_error naming the section and byte offset") {
  SUBCASE("the rebuilt good artifact opens (the tampering harness itself is sound)") {
    const Sections s(good_artifact());
    CHECK(s.bytes() == good_artifact());
    CHECK_FALSE(rejection(s.bytes()).has_value());
  }
  SUBCASE("a flipped byte in g0.data: the container checksum") {
    const auto& good = good_artifact();
    const auto v = io::parse_container(good, "good");
    const auto& data = v.at("g0.data");
    REQUIRE(data.size > 1000);
    Bytes bad = good;
    bad[static_cast<std::size_t>(data.offset) + 777] ^= std::byte{0x10};
    CHECK_REJECTS(bad, "g0.data", "checksum mismatch", data.offset);
  }
  SUBCASE("tampered block records, naming g0.blocks and the field's byte offset") {
    Sections s(good_artifact());
    const std::uint64_t blocks_at = s.offset_of("g0.blocks");
    const std::size_t n_records = s.at("g0.blocks").shape[0];
    const std::size_t data_size = s.at("g0.data").data.size();
    const std::size_t n_bases = s.at("g0.bases").shape[0];
    REQUIRE(n_records > 3);
    // Record 0 is block 0 (256 x 256) of the first owner.
    auto field_at = [&](std::size_t r, std::size_t f) -> std::optional<std::uint64_t> { return blocks_at + 4 * (r * 8 + f); };
    auto dense = [&](Sections& t, std::size_t r, std::uint32_t bits, std::uint32_t offset) {
      t.set("g0.blocks", r, 0, static_cast<std::uint32_t>(cz::block_kind::dense));
      t.set("g0.blocks", r, 1, bits);
      t.set("g0.blocks", r, 5, offset);
    };

    SUBCASE("unknown block kind") {
      s.set("g0.blocks", 1, 0, 5);
      CHECK_REJECTS(s.bytes(), "g0.blocks", "record 1: unknown block kind 5", field_at(1, 0));
      s.set("g0.blocks", 1, 0, 0xFFFFFFFFu);
      CHECK_REJECTS(s.bytes(), "g0.blocks", "unknown block kind 4294967295", field_at(1, 0));
    }
    SUBCASE("bits 9, 1 and 0") {
      for (std::uint32_t bits : {9u, 1u, 0u, 255u}) {
        CAPTURE(bits);
        dense(s, 2, bits, 0);
        CHECK_REJECTS(s.bytes(), "g0.blocks", "record 2: bits " + std::to_string(bits) + " not in 2..8", field_at(2, 1));
      }
    }
    SUBCASE("bits of a low-rank right factor") {
      // A valid left factor [1, 256] at 8 bits at offset 0: 256 code bytes, then 8 scales.
      for (std::size_t i = 0; i < 8; ++i) {
        const std::uint16_t one = 0x3F80;
        std::memcpy(s.at("g0.data").data.data() + 256 + 2 * i, &one, 2);
      }
      s.set("g0.blocks", 0, 0, static_cast<std::uint32_t>(cz::block_kind::lowrank));
      s.set("g0.blocks", 0, 1, 8), s.set("g0.blocks", 0, 2, 9), s.set("g0.blocks", 0, 3, 1);
      s.set("g0.blocks", 0, 5, 0), s.set("g0.blocks", 0, 6, 0);
      CHECK_REJECTS(s.bytes(), "g0.blocks", "bits 9 not in 2..8", field_at(0, 2));
    }
    SUBCASE("a payload offset past the end of g0.data") {
      const auto past = static_cast<std::uint32_t>((data_size + 63) / 64 * 64);
      dense(s, 0, 8, past);
      CHECK_REJECTS(s.bytes(), "g0.blocks", "runs past the end of g0.data", field_at(0, 5));
      dense(s, 0, 8, 0xFFFFFFC0u);
      CHECK_REJECTS(s.bytes(), "g0.blocks", "runs past the end of g0.data", field_at(0, 5));
      // A payload that starts inside but does not fit: a 256 x 256 int8 block is 64 KiB of codes.
      dense(s, 0, 8, static_cast<std::uint32_t>((data_size - 1000) / 64 * 64));
      CHECK_REJECTS(s.bytes(), "g0.blocks", "runs past the end of g0.data", field_at(0, 5));
    }
    SUBCASE("a misaligned payload offset") {
      dense(s, 0, 8, 64 + 4);
      CHECK_REJECTS(s.bytes(), "g0.blocks", "payload offset 68 is not a multiple of 64", field_at(0, 5));
    }
    SUBCASE("raw payloads: out of bounds, misaligned, non-finite") {
      s.set("g0.blocks", 0, 0, static_cast<std::uint32_t>(cz::block_kind::raw));
      s.set("g0.blocks", 0, 5, 32);
      CHECK_REJECTS(s.bytes(), "g0.blocks", "raw payload out of bounds", field_at(0, 5));
      s.set("g0.blocks", 0, 5, static_cast<std::uint32_t>((data_size + 63) / 64 * 64));
      CHECK_REJECTS(s.bytes(), "g0.blocks", "raw payload out of bounds", field_at(0, 5));
      REQUIRE(data_size >= 4 * 256 * 256);
      s.set("g0.blocks", 0, 5, 0);
      auto& data = s.at("g0.data").data;
      std::fill(data.begin(), data.begin() + 40, std::byte{0});  // values 0..9: zeros
      const std::uint32_t nan = 0x7FC00000u;
      std::memcpy(data.data() + 4 * 10, &nan, 4);
      CHECK_REJECTS(s.bytes(), "g0.data", "record 0: raw value 10 is not finite", s.offset_of("g0.data") + 40);
    }
    SUBCASE("a non-finite or negative scale") {
      // A dense int8 256 x 256 payload at offset 0: 65536 code bytes, then 256 * 8 bf16 scales.
      REQUIRE(data_size >= 65536 + 2 * 256 * 8);
      dense(s, 0, 8, 0);
      for (std::size_t i = 0; i < 3; ++i) {  // scales 0..2: 1.0
        const std::uint16_t one = 0x3F80;
        std::memcpy(s.at("g0.data").data.data() + 65536 + 2 * i, &one, 2);
      }
      for (std::uint16_t scale : {std::uint16_t{0x7FC0}, std::uint16_t{0x7F80}, std::uint16_t{0xBF80}}) {
        CAPTURE(scale);
        std::memcpy(s.at("g0.data").data.data() + 65536 + 2 * 3, &scale, 2);
        CHECK_REJECTS(s.bytes(), "g0.data", "record 0: scale 3 is negative or not finite", s.offset_of("g0.data") + 65536 + 6);
      }
    }
    SUBCASE("rank 0, and a rank past the block, for a low-rank block") {
      s.set("g0.blocks", 0, 0, static_cast<std::uint32_t>(cz::block_kind::lowrank));
      s.set("g0.blocks", 0, 1, 8), s.set("g0.blocks", 0, 2, 8), s.set("g0.blocks", 0, 5, 0), s.set("g0.blocks", 0, 6, 0);
      s.set("g0.blocks", 0, 3, 0);
      CHECK_REJECTS(s.bytes(), "g0.blocks", "record 0: rank 0 out of range", field_at(0, 3));
      s.set("g0.blocks", 0, 3, 257);
      CHECK_REJECTS(s.bytes(), "g0.blocks", "record 0: rank 257 out of range", field_at(0, 3));
    }
    SUBCASE("a basis index out of range") {
      s.set("g0.blocks", 0, 0, static_cast<std::uint32_t>(cz::block_kind::shared));
      s.set("g0.blocks", 0, 2, 8), s.set("g0.blocks", 0, 3, 1), s.set("g0.blocks", 0, 6, 0);
      for (auto basis : {static_cast<std::uint32_t>(n_bases), 0xFFFFFFFFu}) {
        s.set("g0.blocks", 0, 4, basis);
        CHECK_REJECTS(s.bytes(), "g0.blocks", "record 0: basis " + std::to_string(basis) + " does not exist", field_at(0, 4));
      }
    }
    SUBCASE("a wrong record count") {
      auto& b = s.at("g0.blocks");
      b.shape[0] -= 1;
      b.data.resize(b.data.size() - 32);
      CHECK_REJECTS(s.bytes(), "g0.blocks", "holds " + std::to_string(n_records - 1) + " records, the group needs " + std::to_string(n_records),
                    s.offset_of("g0.blocks"));
      b.shape[0] += 2;
      b.data.resize(b.data.size() + 64);
      CHECK_REJECTS(s.bytes(), "g0.blocks", "holds " + std::to_string(n_records + 1) + " records", s.offset_of("g0.blocks"));
    }
    SUBCASE("records of the wrong width or type") {
      auto& b = s.at("g0.blocks");
      b.shape = {n_records * 2, 4};
      CHECK_REJECTS(s.bytes(), "g0.blocks", "must be U32 [n, 8]", s.offset_of("g0.blocks"));
      b.shape = {n_records, 16};
      b.type = s2lc::dtype::u16;
      CHECK_REJECTS(s.bytes(), "g0.blocks", "must be U32 [n, 8]", s.offset_of("g0.blocks"));
    }
  }
  SUBCASE("tampered shared-basis records, naming their g{i}.bases") {
    Sections s(good_artifact());
    const auto m = s.manifest();
    // Find a group with a shared basis.
    std::size_t gi = 0;
    for (; gi < m["groups"].size(); ++gi)
      if (s.at("g" + std::to_string(gi) + ".bases").shape[0] > 0) break;
    REQUIRE_MESSAGE(gi < m["groups"].size(), "the fixture artifact has no shared basis to tamper with");
    const std::string name = "g" + std::to_string(gi) + ".bases";
    const std::uint64_t at = s.offset_of(name);
    SUBCASE("node out of range") {
      s.set(name, 0, 0, 1000);
      CHECK_REJECTS(s.bytes(), name, "basis 0: node or block out of range", at);
    }
    SUBCASE("block out of range") {
      s.set(name, 0, 1, 1000);
      CHECK_REJECTS(s.bytes(), name, "basis 0: node or block out of range", at);
    }
    SUBCASE("zero rows, too many rows") {
      s.set(name, 0, 2, 0);
      CHECK_REJECTS(s.bytes(), name, "basis 0: 0 rows for a block of", at + 8);
      s.set(name, 0, 2, 100000);
      CHECK_REJECTS(s.bytes(), name, "basis 0: 100000 rows for a block of", at + 8);
    }
    SUBCASE("bits 9") {
      s.set(name, 0, 3, 9);
      CHECK_REJECTS(s.bytes(), name, "record 0: bits 9 not in 2..8", at + 12);
    }
    SUBCASE("misaligned offset") {
      s.set(name, 0, 4, s.get(name, 0, 4) + 8);
      CHECK_REJECTS(s.bytes(), name, "is not a multiple of 64", at + 16);
    }
    SUBCASE("a shared block on a basis of another block position") {
      const std::string blocks = "g" + std::to_string(gi) + ".blocks";
      const std::uint32_t block = s.get(name, 0, 1);
      const auto& g = m["groups"][gi];
      auto cdiv = [](std::size_t a, std::size_t b) { return (a + b - 1) / b; };
      const std::size_t grid_blocks = cdiv(g["rows"].get<std::size_t>(), g["block_rows"].get<std::size_t>()) *
                                      cdiv(g["cols"].get<std::size_t>(), g["block_cols"].get<std::size_t>());
      REQUIRE(grid_blocks > 1);
      const std::size_t other = block == 0 ? 1 : 0;  // record `other` is block `other` of the first owner
      s.set(blocks, other, 0, static_cast<std::uint32_t>(cz::block_kind::shared));
      s.set(blocks, other, 2, 8), s.set(blocks, other, 3, 1), s.set(blocks, other, 4, 0), s.set(blocks, other, 6, 0);
      CHECK_REJECTS(s.bytes(), blocks, "basis 0 belongs to another block position", s.offset_of(blocks) + 4 * (other * 8 + 4));
    }
  }
  SUBCASE("inconsistent manifests, naming the manifest section and its byte offset") {
    Sections s(good_artifact());
    auto m = s.manifest();
    const std::uint64_t manifest_at = s.offset_of("manifest");  // the manifest is the first section
    auto rejects = [&](const nlohmann::json& changed, const std::string& needle) __attribute__((noinline)) {
      Sections t = s;
      t.set_manifest(changed);
      CHECK_REJECTS(t.bytes(), "manifest", needle, std::optional<std::uint64_t>(manifest_at));
    };
    SUBCASE("version 2") {
      m["version"] = 2;
      rejects(m, "unsupported artifact version 2");
    }
    SUBCASE("another format") {
      m["format"] = "gguf";
      rejects(m, "format is not \"s2lc\"");
    }
    SUBCASE("\"groups\" missing, or not an array") {
      m.erase("groups");
      rejects(m, "\"groups\" must be an array");
      m["groups"] = nlohmann::json::object();
      rejects(m, "\"groups\" must be an array");
    }
    SUBCASE("\"tensors\" missing") {
      m.erase("tensors");
      rejects(m, "\"tensors\" must be an array");
    }
    SUBCASE("a tensor entry referring to a missing copy section") {
      bool found = false;
      for (auto& t : m["tensors"])
        if (t.contains("copy")) t["copy"] = 7, found = true;
      REQUIRE(found);
      rejects(m, "its section 'c7' is missing");
    }
    SUBCASE("a copy entry whose dtype differs from its section") {
      for (auto& t : m["tensors"])
        if (t.contains("copy")) t["dtype"] = "F32";
      Sections t = s;
      t.set_manifest(m);
      CHECK_REJECTS(t.bytes(), "c0", "dtype or shape differ from section 'c0'", t.offset_of("c0"));
    }
    SUBCASE("a member path inconsistency: the leaf is a node that does not list the member") {
      auto& g = m["groups"][0];
      const auto E = g["members"].size();
      // A cluster node under the global core listing members 1..E-1, made member 0's leaf.
      std::vector<std::uint32_t> others;
      for (std::uint32_t e = 1; e < E; ++e) others.push_back(e);
      const auto n = g["nodes"].size();
      g["nodes"].push_back({{"level", 1}, {"parent", n > 0 ? 0 : -1}, {"members", others}});
      g["leaf"][0] = n;
      rejects(m, "member 0 is not in node " + std::to_string(n) + " on its path");
    }
    SUBCASE("a member missing from its own global node") {
      auto& g = m["groups"][0];
      REQUIRE(g["nodes"].size() > 0);
      REQUIRE(g["leaf"][0] == 0);
      auto& mem = g["nodes"][0]["members"];
      mem.erase(mem.begin());
      rejects(m, "member 0 is not in node 0 on its path");
    }
    SUBCASE("a leaf or parent out of range") {
      auto changed = m;
      changed["groups"][0]["leaf"][3] = 99;
      rejects(changed, "leaf out of range");
      changed = m;
      changed["groups"][0]["leaf"][3] = -2;
      rejects(changed, "leaf out of range");
      changed = m;
      changed["groups"][0]["nodes"].push_back({{"level", 1}, {"parent", 5}, {"members", {0}}});
      rejects(changed, "parent must be an earlier node or -1");
    }
    SUBCASE("a node member out of range") {
      m["groups"][0]["nodes"][0]["members"].push_back(8);
      rejects(m, "member index out of range");
    }
    SUBCASE("a member of a group missing from \"tensors\"") {
      auto& t = m["tensors"];
      for (std::size_t i = 0; i < t.size(); ++i)
        if (t[i]["name"] == "layers.1.moe.experts.3.w2.weight") {
          t.erase(i);
          break;
        }
      rejects(m, "member 'layers.1.moe.experts.3.w2.weight' of group");
    }
    SUBCASE("a tensor entry naming another member, or with another shape") {
      auto changed = m;
      for (auto& t : changed["tensors"])
        if (t.contains("group") && t["member"] == 0) t["member"] = 1;
      rejects(changed, "is not member 1 of group");
      changed = m;
      for (auto& t : changed["tensors"])
        if (t.contains("group")) t["shape"] = {1, 2};
      rejects(changed, "shape or dtype differ from its group's");
    }
    SUBCASE("group sizes zero or too large") {
      auto changed = m;
      changed["groups"][0]["block_rows"] = 0;
      rejects(changed, "sizes must be positive");
      changed = m;
      changed["groups"][0]["rows"] = 1ull << 25;
      rejects(changed, "exceeds");
      changed = m;
      changed["groups"][0]["rows"] = -1;
      rejects(changed, "must be a non-negative integer");
    }
    SUBCASE("numbers that are not integers, or that a plain get<int>() would wrap (all accepted before)") {
      for (const auto& v : {nlohmann::json(1.5), nlohmann::json(true), nlohmann::json(1.0)}) {
        auto changed = m;
        changed["version"] = v;
        rejects(changed, "\"version\" must be an integer");
      }
      auto changed = m;
      changed["version"] = 4294967297ull;  // 1 in 32 bits
      rejects(changed, "\"version\" = 4294967297 is outside");
      changed = m;
      changed["groups"][0]["leaf"][0] = 0.5;
      rejects(changed, "an element of \"leaf\" must be an integer");
      changed = m;
      changed["groups"][0]["leaf"][0] = 4294967296ull;  // 0 in 32 bits
      rejects(changed, "an element of \"leaf\" = 4294967296 is outside");
      changed = m;
      changed["groups"][0]["nodes"][0]["parent"] = 4294967295ull;  // -1 in 32 bits
      rejects(changed, "\"parent\" = 4294967295 is outside");
      changed = m;
      changed["groups"][0]["nodes"][0]["level"] = 3;
      rejects(changed, "\"level\" = 3 is outside [0, 2]");
      changed = m;
      changed["groups"][0]["nodes"][0]["members"][0] = 0.0;
      rejects(changed, "an element of \"members\" must be an integer");
      changed = m;
      changed["groups"][0]["nodes"][0]["members"][0] = 4294967296ull;  // 0 in 32 bits
      rejects(changed, "an element of \"members\" = 4294967296 is outside");
      changed = m;
      changed["tensors"][0]["shape"][0] = 768.0;
      rejects(changed, "an element of \"shape\" must be an integer");
    }
    SUBCASE("wrong JSON types") {
      auto changed = m;
      changed["groups"][0]["members"] = "all of them";
      rejects(changed, "\"members\" has the wrong type");
      changed = m;
      changed["groups"][0] = 17;
      rejects(changed, "missing \"name\"");
      changed = m;
      changed["metadata"] = nlohmann::json::array();
      rejects(changed, "\"metadata\" needs one object per source");
    }
  }
  SUBCASE("missing or mistyped sections") {
    Sections s(good_artifact());
    SUBCASE("no manifest") {
      s.erase("manifest");
      const auto e = rejection(s.bytes());
      REQUIRE(e.has_value());
      CHECK(e->tensor() == "manifest");
      CHECK_CONTAINS(e->what(), "byte offset");
    }
    SUBCASE("a manifest that is an array section") {
      s.at("manifest").kind = io::section_kind::array;
      CHECK_REJECTS(s.bytes(), "manifest", "json", s.offset_of("manifest"));
    }
    SUBCASE("a manifest that is not an object") {
      s.set_manifest(nlohmann::json::array({1, 2}));
      CHECK_REJECTS(s.bytes(), "manifest", "not a JSON object", s.offset_of("manifest"));
    }
    SUBCASE("a group's data, block or basis section") {
      for (const char* name : {"g1.data", "g1.blocks", "g1.bases"}) {
        CAPTURE(name);
        Sections t = s;
        t.erase(name);
        const auto e = rejection(t.bytes());
        REQUIRE_MESSAGE(e.has_value(), "artifact without a group section accepted");
        CHECK(e->tensor() == name);
        CHECK_CONTAINS(e->message(), "lacks section");
        CHECK_CONTAINS(e->what(), "byte offset");
      }
    }
  }
  SUBCASE("a record count that only matches after 64-bit overflow") {
    // 2^24 x 2^24 members in 1 x 1 blocks: 2^48 blocks each; 2^16 members need 2^64 records, which
    // wraps to 0 in 64 bits. An empty g0.blocks section must not be taken for that.
    Sections s(good_artifact());
    auto m = s.manifest();
    nlohmann::json g = m["groups"][0];
    const std::size_t E = std::size_t{1} << 16;
    std::vector<std::string> members(E);
    for (std::size_t e = 0; e < E; ++e) members[e] = std::string("m").append(std::to_string(e));  // (not "m" + ...: GCC 12 -Wrestrict false positive)
    g["rows"] = 1u << 24, g["cols"] = 1u << 24, g["block_rows"] = 1, g["block_cols"] = 1;
    g["members"] = members;
    g["nodes"] = nlohmann::json::array();
    g["leaf"] = std::vector<int>(E, -1);
    m["groups"] = nlohmann::json::array({g});
    m["tensors"] = nlohmann::json::array();
    s.set_manifest(m);
    s.at("g0.blocks").shape = {0, 8};
    s.at("g0.blocks").data.clear();
    s.at("g0.bases").shape = {0, 6};
    s.at("g0.bases").data.clear();
    CHECK_REJECTS(s.bytes(), "g0.blocks", "records, the group needs", s.offset_of("g0.blocks"));
  }
}

}  // namespace suite_compress_artifact

#undef CHECK_CONTAINS
#undef CHECK_REJECTS
