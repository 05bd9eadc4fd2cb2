// Generates the committed seed corpus of the container fuzzer (tests/fuzz/corpus/container/):
// a few valid containers written by ContainerBuilder, and one file per class of rejection derived
// from them by patching a field (with the checksums recomputed where the seed is meant to reach a
// check behind them). All seeds are deterministic and under 4 KB.
//
//   s2lc_fuzz_container_seeds DIR           writes the seeds into DIR (regenerate after a format change)
//   s2lc_fuzz_container_seeds --check DIR   exits 1 unless DIR holds exactly these seeds, byte for
//                                           byte (CTest fuzz_container_seeds_current); files named
//                                           regress-* (fuzzer reproducers) are left alone
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include <s2lc/io/container.hpp>

namespace {

namespace io = s2lc::io;
using s2lc::dtype;
using Bytes = std::vector<std::byte>;

Bytes pattern(std::size_t n, std::uint32_t seed) {
  Bytes b(n);
  std::uint32_t x = seed * 2654435761u + 12345u;
  for (auto& v : b) {
    x = x * 1664525u + 1013904223u;
    v = static_cast<std::byte>(x >> 24);
  }
  return b;
}

std::uint64_t get(const Bytes& f, std::uint64_t at, std::size_t n) {
  std::uint64_t v = 0;
  for (std::size_t i = n; i-- > 0;) v = (v << 8) | static_cast<std::uint64_t>(f[static_cast<std::size_t>(at) + i]);
  return v;
}

void put(Bytes& f, std::uint64_t at, std::uint64_t v, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) f[static_cast<std::size_t>(at) + i] = static_cast<std::byte>((v >> (8 * i)) & 0xFFu);
}

std::uint32_t crc_of(const Bytes& f, std::uint64_t at, std::uint64_t n) {
  return io::crc32c(std::span<const std::byte>(f).subspan(static_cast<std::size_t>(at), static_cast<std::size_t>(n)));
}

/// Absolute offsets of a table entry's fields (in a well-formed table).
struct Entry {
  std::uint64_t name_length, kind, dtype, rank, dims, offset, size, crc;
};

std::vector<Entry> entries(const Bytes& f) {
  std::vector<Entry> out;
  std::uint64_t p = get(f, 24, 8);
  for (std::uint64_t i = 0, n = get(f, 16, 8); i < n; ++i) {
    Entry e{};
    e.name_length = p;
    e.kind = p + 2 + get(f, p, 2);
    e.dtype = e.kind + 2;
    e.rank = e.kind + 3;
    e.dims = e.kind + 4;
    e.offset = e.dims + 8 * get(f, e.rank, 1);
    e.size = e.offset + 8;
    e.crc = e.size + 8;
    p = e.crc + 4;
    out.push_back(e);
  }
  return out;
}

/// Recomputes the table and header checksums (the table range must be inside the file).
void reseal(Bytes& f) {
  const std::uint64_t off = get(f, 24, 8);
  put(f, 48, crc_of(f, off, f.size() - off), 4);
  put(f, 60, crc_of(f, 0, 60), 4);
}

/// Also recomputes every section's checksum (sections must be inside the file).
void reseal_all(Bytes& f) {
  for (const auto& e : entries(f)) put(f, e.crc, crc_of(f, get(f, e.offset, 8), get(f, e.size, 8)), 4);
  reseal(f);
}

Bytes text(std::string_view s) {
  Bytes b(s.size());
  if (!s.empty()) std::memcpy(b.data(), s.data(), s.size());
  return b;
}

std::map<std::string, Bytes> seeds() {
  std::map<std::string, Bytes> out;

  // --- valid
  out["valid-empty.s2lc"] = io::ContainerBuilder().to_bytes();
  {
    io::ContainerBuilder b;
    b.add_json("manifest", {{"format", "s2lc"}, {"version", 1}, {"experts", {0, 1, 2, 3}}, {"ratio", 0.25}, {"ok", true}, {"none", nullptr}});
    out["valid-manifest.s2lc"] = b.to_bytes();
  }
  io::ContainerBuilder mixed;
  mixed.add_json("manifest", {{"layers", {{{"name", "layers.0.moe"}, {"experts", 4}}}}});
  mixed.add_array("experts.3.coeff", dtype::f32, {2, 3}, pattern(24, 1));
  mixed.add_array("scale", dtype::f64, {}, pattern(8, 2));
  mixed.add_array("empty", dtype::bf16, {0, 4}, {});
  mixed.add_bytes("blob", pattern(5, 3));
  mixed.add_array("codes", dtype::u8, {1, 2, 1, 2}, pattern(4, 4));
  const Bytes good = mixed.to_bytes();
  out["valid-mixed.s2lc"] = good;
  {
    io::ContainerBuilder b;
    std::uint32_t seed = 10;
    for (dtype t : s2lc::all_dtypes) b.add_array(std::string(s2lc::dtype_name(t)), t, {2}, pattern(2 * s2lc::dtype_size(t), seed++));
    out["valid-all-dtypes.s2lc"] = b.to_bytes();
  }
  {
    io::ContainerBuilder b;
    b.add_bytes("专家.3.系数", pattern(3, 5));
    b.add_bytes(std::string(255, 'n'), pattern(1, 6));
    b.add_json("ünï", "cødé ✓");
    out["valid-unicode-names.s2lc"] = b.to_bytes();
  }

  // --- rejected: header
  const auto e = entries(good);  // manifest, experts.3.coeff, scale, empty, blob, codes
  auto patched = [&](std::uint64_t at, std::uint64_t v, std::size_t n, bool seal) {
    Bytes f = good;
    put(f, at, v, n);
    if (seal) reseal(f);
    return f;
  };
  out["bad-magic.s2lc"] = patched(4, 0x0A, 1, false);
  out["bad-version.s2lc"] = patched(8, 2, 2, true);
  out["bad-flags.s2lc"] = patched(12, 1, 4, true);
  out["bad-reserved.s2lc"] = patched(55, 1, 1, true);
  out["bad-header-checksum.s2lc"] = patched(20, 0xFF, 1, false);
  out["bad-file-size.s2lc"] = patched(40, good.size() + 64, 8, true);
  out["bad-truncated.s2lc"] = Bytes(good.begin(), good.begin() + static_cast<std::ptrdiff_t>(good.size() / 2));
  out["bad-table-offset.s2lc"] = patched(24, get(good, 24, 8) + 8, 8, true);
  out["bad-section-count.s2lc"] = patched(16, 1000, 8, true);
  out["bad-section-count-plus-one.s2lc"] = patched(16, e.size() + 1, 8, true);
  out["bad-table-checksum.s2lc"] = patched(e[2].crc - 1, get(good, e[2].crc - 1, 1) ^ 0x40, 1, false);

  // --- rejected: table entries (checksums recomputed so the entry check is reached)
  out["bad-kind.s2lc"] = patched(e[1].kind, 2, 2, true);
  out["bad-dtype.s2lc"] = patched(e[1].dtype, 15, 1, true);
  out["bad-rank.s2lc"] = patched(e[1].rank, 5, 1, true);
  out["bad-name-length.s2lc"] = patched(e[4].name_length, 0, 2, true);
  out["bad-name-utf8.s2lc"] = patched(e[4].name_length + 2, 0xFF, 1, true);
  {
    Bytes f = good;  // "codes" renamed "scale" (same length)
    const char* scale = "scale";
    for (std::size_t i = 0; i < 5; ++i) put(f, e[5].name_length + 2 + i, static_cast<unsigned char>(scale[i]), 1);
    reseal(f);
    out["bad-duplicate.s2lc"] = f;
  }
  out["bad-size-mismatch.s2lc"] = patched(e[1].size, 20, 8, true);
  out["bad-shape-overflow.s2lc"] = patched(e[1].dims, 1ull << 62, 8, true);
  out["bad-misaligned.s2lc"] = patched(e[1].offset, get(good, e[1].offset, 8) + 8, 8, true);
  {
    Bytes f = good;  // "blob" as 100 bytes at 2^64 - 64: offset + size wraps
    put(f, e[4].dims, 100, 8);
    put(f, e[4].size, 100, 8);
    put(f, e[4].offset, ~std::uint64_t{0} - 63, 8);
    reseal(f);
    out["bad-offset-overflow.s2lc"] = f;
  }
  out["bad-past-table.s2lc"] = patched(e[5].offset, get(good, 24, 8), 8, true);
  out["bad-overlap.s2lc"] = patched(e[2].offset, get(good, e[1].offset, 8), 8, true);
  out["bad-json-kind.s2lc"] = patched(e[1].kind, 0, 2, true);

  // --- rejected: section data
  {
    Bytes f = good;
    const std::uint64_t at = get(good, e[1].offset, 8) + 3;
    put(f, at, get(f, at, 1) ^ 0x01, 1);
    out["bad-section-checksum.s2lc"] = f;
  }
  {
    Bytes f = good;
    put(f, get(good, e[4].offset, 8) + 40, 0x5A, 1);  // padding after "blob"
    out["bad-padding.s2lc"] = f;
  }
  {
    // A valid container whose manifest is not JSON (accepted at open; json() rejects it).
    Bytes f = good;
    put(f, get(good, e[0].offset, 8) + 1, ',', 1);
    reseal_all(f);
    out["json-invalid.s2lc"] = f;
    Bytes g = good;
    const Bytes dup = text("{\"a\":1,\"a\":2}");
    const std::uint64_t at = get(good, e[0].offset, 8), len = get(good, e[0].size, 8);
    for (std::uint64_t i = 0; i < len; ++i) put(g, at + i, i < dup.size() ? static_cast<std::uint64_t>(dup[i]) : ' ', 1);
    reseal_all(g);
    out["json-duplicate-key.s2lc"] = g;
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

}  // namespace

int main(int argc, char** argv) {
  const bool check = argc == 3 && std::string_view(argv[1]) == "--check";
  if (argc != 2 && !check) {
    std::fprintf(stderr, "usage: %s [--check] DIR\n", argv[0]);
    return 2;
  }
  const std::filesystem::path dir = argv[argc - 1];
  const auto all = seeds();
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
      std::fprintf(stderr, "unexpected file %s (seeds come from make_container_seeds.cpp; reproducers are named regress-*)\n", name.c_str());
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
