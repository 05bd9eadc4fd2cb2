// libFuzzer harness for the safetensors reader (s2lc::io::parse_safetensors).
//
// Contract checked on every input:
//   * parse_safetensors either returns a header or throws an s2lc::error (a rejection). Any other
//     exception, a crash, or an ASan / UBSan report is a bug.
//   * An accepted header is internally consistent: every tensor's byte range lies inside the
//     input (each byte is read, so ASan sees any overrun), its size is numel * element size, it is
//     aligned to its element size, and the ranges tile the data section exactly.
//   * Re-serialising the accepted tensors + metadata with safetensors_layout gives a file the
//     reader accepts, with the same names, dtypes, shapes, bytes and metadata; serialising that
//     again gives the same bytes (the writer's layout is canonical).
//
// Built with -fsanitize=fuzzer by tests/fuzz/CMakeLists.txt; tests/fuzz/replay_main.cpp turns the
// same function into a corpus replayer for ordinary (g++) builds.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <map>
#include <span>
#include <string>
#include <vector>

#include <s2lc/io/safetensors.hpp>

namespace {

[[noreturn]] void fail(const char* what, const std::string& detail = {}) {
  std::fprintf(stderr, "safetensors_fuzz: invariant violated: %s %s\n", what, detail.c_str());
  std::fflush(stderr);
  std::abort();
}

void require(bool ok, const char* what, const std::string& detail = {}) {
  if (!ok) fail(what, detail);
}

/// FNV-1a over a tensor's bytes: reads every byte, so an out-of-bounds range trips ASan.
std::uint64_t checksum(std::span<const std::byte> bytes) {
  std::uint64_t h = 1469598103934665603ull;
  for (std::byte b : bytes) h = (h ^ static_cast<std::uint64_t>(b)) * 1099511628211ull;
  return h;
}

std::span<const std::byte> tensor_bytes(std::span<const std::byte> file, const s2lc::io::SafetensorsHeader& h,
                                        const s2lc::io::TensorInfo& t) {
  return file.subspan(static_cast<std::size_t>(h.data_offset() + t.begin), static_cast<std::size_t>(t.nbytes()));
}

/// Checks an accepted header against the file it came from; returns a checksum of all tensor data.
std::uint64_t check_header(std::span<const std::byte> file, const s2lc::io::SafetensorsHeader& h) {
  const std::uint64_t size = file.size();
  require(h.header_size >= 2 && h.header_size <= s2lc::io::safetensors_max_header, "header size out of range");
  require(h.data_offset() <= size, "data section starts past the end of the input");
  const std::uint64_t data_size = size - h.data_offset();
  std::uint64_t covered = 0;
  std::uint64_t sum = 0;
  for (const auto& t : h.tensors) {
    require(!t.name.empty() && t.name != "__metadata__", "bad tensor name", t.name);
    require(t.begin <= t.end && t.end <= data_size, "tensor range outside the data section", t.name);
    require(t.begin == covered, "tensors do not tile the data section", t.name);
    covered = t.end;
    std::uint64_t numel = 1;
    for (auto d : t.shape) require(!__builtin_mul_overflow(numel, d, &numel), "numel overflows", t.name);
    std::uint64_t nbytes = 0;
    require(!__builtin_mul_overflow(numel, s2lc::dtype_size(t.type), &nbytes), "byte size overflows", t.name);
    require(nbytes == t.nbytes() && numel == t.numel(), "byte size disagrees with the shape", t.name);
    require((h.data_offset() + t.begin) % s2lc::dtype_size(t.type) == 0, "tensor is misaligned", t.name);
    require(h.find(t.name) == &t, "find() does not return the tensor", t.name);
    sum ^= checksum(tensor_bytes(file, h, t));
  }
  require(covered == data_size, "data section not fully covered");
  return sum;
}

std::vector<std::byte> serialise(std::span<const s2lc::io::TensorData> tensors, const std::map<std::string, std::string>& metadata) {
  const auto [head, order] = s2lc::io::safetensors_layout(tensors, metadata, "fuzz-roundtrip");
  std::vector<std::byte> out(head.size());
  std::memcpy(out.data(), head.data(), head.size());
  for (std::size_t i : order) out.insert(out.end(), tensors[i].data.begin(), tensors[i].data.end());
  return out;
}

std::vector<s2lc::io::TensorData> tensor_data(std::span<const std::byte> file, const s2lc::io::SafetensorsHeader& h) {
  std::vector<s2lc::io::TensorData> td;
  td.reserve(h.tensors.size());
  for (const auto& t : h.tensors) td.push_back({t.name, t.type, t.shape, tensor_bytes(file, h, t)});
  return td;
}

void check_round_trip(std::span<const std::byte> file, const s2lc::io::SafetensorsHeader& h) {
  const auto td = tensor_data(file, h);
  const std::vector<std::byte> again = serialise(td, h.metadata);
  const auto h2 = s2lc::io::parse_safetensors(again, "fuzz-roundtrip");
  check_header(again, h2);
  require(h2.tensors.size() == h.tensors.size(), "round trip changed the tensor count");
  require(h2.metadata == h.metadata, "round trip changed the metadata");
  for (const auto& t : h.tensors) {
    const auto* t2 = h2.find(t.name);
    require(t2 != nullptr, "round trip lost a tensor", t.name);
    require(t2->type == t.type && t2->shape == t.shape, "round trip changed dtype or shape", t.name);
    const auto a = tensor_bytes(file, h, t);
    const auto b = tensor_bytes(again, h2, *t2);
    require(a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size()) == 0), "round trip changed the data", t.name);
  }
  // The writer's layout is a fixed point: writing what it wrote gives the same bytes.
  const auto td2 = tensor_data(again, h2);
  const std::vector<std::byte> third = serialise(td2, h2.metadata);
  require(third == again, "re-serialising the round-tripped file changed its bytes");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::span<const std::byte> file(reinterpret_cast<const std::byte*>(data), size);
  s2lc::io::SafetensorsHeader header;
  try {
    header = s2lc::io::parse_safetensors(file, "fuzz-input");
  } catch (const s2lc::error& e) {
    // An expected rejection. It must still say where: the label names the input.
    require(e.file() == "fuzz-input", "error does not name the file", e.what());
    return 0;
  } catch (const std::exception& e) {
    fail("parse_safetensors threw a non-s2lc exception:", e.what());
  } catch (...) {
    fail("parse_safetensors threw a non-std exception");
  }
  try {
    static volatile std::uint64_t sink = 0;
    sink = sink ^ check_header(file, header);
    check_round_trip(file, header);
  } catch (const std::exception& e) {
    fail("an accepted file failed the round trip:", e.what());
  }
  return 0;
}
