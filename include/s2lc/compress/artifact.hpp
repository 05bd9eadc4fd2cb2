// s2lc::compress — the .s2lc artifact: compressed groups plus copied-through tensors in one
// validated, memory-mappable container (s2lc/io/container.hpp), and the reader that rebuilds any
// tensor bit-reproducibly.
//
// Sections:
//   manifest        JSON: format, version, sources, options, the source metadata, every input
//                   tensor in input order (name, dtype, shape, source, and where it lives), and per
//                   group its members, grid, HED nodes and statistics.
//   g{i}.blocks     U32 [owners * blocks, 8]: one record per block of every owner (core nodes
//                   first, then members), grid row-major:
//                     kind, bits_a, bits_b, rank, basis, offset_a, offset_b, 0
//                   (offsets into g{i}.data; unused fields are 0).
//   g{i}.bases      U32 [bases, 6]: node, block, rows, bits, offset, 0.
//   g{i}.data       U8: payloads, each at a multiple of 64. A quantized payload [r, c] at b bits is
//                   its packed codes, then (at the next multiple of 4) r * ceil(c / group) bf16
//                   scales; a raw payload is r * c little-endian f32.
//   c{k}            a copied-through tensor, in its own dtype and shape.
#pragma once

#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "s2lc/compress/model.hpp"
#include "s2lc/compress/quant.hpp"
#include "s2lc/dtype.hpp"
#include "s2lc/error.hpp"
#include "s2lc/io/container.hpp"
#include "s2lc/io/safetensors.hpp"

namespace s2lc::compress {

static_assert(std::endian::native == std::endian::little, "the .s2lc reader maps little-endian records directly");

inline constexpr int artifact_version = 1;
inline constexpr std::size_t block_record_fields = 8;
inline constexpr std::size_t basis_record_fields = 6;

/// Where an input tensor lives in the artifact.
struct TensorEntry {
  std::string name;
  dtype type = dtype::f32;
  std::vector<std::uint64_t> shape;
  std::uint32_t source = 0;
  int group = -1;           ///< >= 0: member `member` of that group
  std::uint32_t member = 0;
  int copy = -1;            ///< >= 0: stored as section c{copy}
};

/// What goes into an artifact besides the compressed groups.
struct ArtifactContents {
  std::vector<std::string> sources;                     ///< input files (as given)
  std::vector<TensorEntry> tensors;                     ///< every input tensor, input order
  std::vector<std::span<const std::byte>> copies;       ///< data of copy k
  std::vector<std::map<std::string, std::string>> metadata;  ///< per source: safetensors __metadata__ to restore
  nlohmann::json options = nlohmann::json::object();
};

namespace detail {

inline std::size_t align_to(std::size_t n, std::size_t a) { return static_cast<std::size_t>(io::detail::align_up(n, a)); }

inline std::uint32_t put_qmatrix(std::vector<std::byte>& data, const QMatrix& q) {
  const std::size_t off = align_to(data.size(), 64);
  if (off > 0xFFFFFFFFu) throw invalid_argument("artifact: a group's data exceed 4 GiB");
  const std::size_t scales_at = off + align_to(q.codes.size(), 4);
  data.resize(scales_at + 2 * q.scales.size(), std::byte{0});
  std::memcpy(data.data() + off, q.codes.data(), q.codes.size());
  for (std::size_t i = 0; i < q.scales.size(); ++i) {
    data[scales_at + 2 * i] = static_cast<std::byte>(q.scales[i] & 0xFF);
    data[scales_at + 2 * i + 1] = static_cast<std::byte>(q.scales[i] >> 8);
  }
  return static_cast<std::uint32_t>(off);
}

inline std::uint32_t put_raw(std::vector<std::byte>& data, const std::vector<float>& v) {
  const std::size_t off = align_to(data.size(), 64);
  if (off > 0xFFFFFFFFu) throw invalid_argument("artifact: a group's data exceed 4 GiB");
  data.resize(off + 4 * v.size(), std::byte{0});
  for (std::size_t i = 0; i < v.size(); ++i) {
    const auto u = std::bit_cast<std::uint32_t>(v[i]);
    for (int b = 0; b < 4; ++b) data[off + 4 * i + static_cast<std::size_t>(b)] = static_cast<std::byte>((u >> (8 * b)) & 0xFF);
  }
  return static_cast<std::uint32_t>(off);
}

inline nlohmann::json stats_json(const GroupStats& s) {
  // Fractions at float precision: the manifest counts against the ratio of small groups.
  const double total = s.total_energy > 0 ? s.total_energy : 1.0;
  std::vector<float> levels;
  for (double e : s.level_energy) levels.push_back(static_cast<float>(e / total));
  std::vector<std::size_t> kinds(std::begin(s.blocks_by_kind), std::end(s.blocks_by_kind));
  return {{"energy", static_cast<float>(s.total_energy)}, {"levels", levels}, {"residual", static_cast<float>(s.residual_energy / total)},
          {"blocks", kinds}};
}

}  // namespace detail

/// Adds the artifact's sections to `out`.
inline void build_artifact(io::ContainerBuilder& out, const Compressed& c, const ArtifactContents& contents) {
  nlohmann::json m;
  m["format"] = "s2lc";
  m["version"] = artifact_version;
  m["sources"] = contents.sources;
  m["options"] = contents.options;
  m["metadata"] = contents.metadata;
  nlohmann::json tensors = nlohmann::json::array();
  for (const auto& t : contents.tensors) {
    nlohmann::json j{{"name", t.name}, {"dtype", std::string(dtype_name(t.type))}, {"shape", t.shape}, {"source", t.source}};
    if (t.group >= 0) j["group"] = t.group, j["member"] = t.member;
    if (t.copy >= 0) j["copy"] = t.copy;
    tensors.push_back(std::move(j));
  }
  m["tensors"] = std::move(tensors);
  nlohmann::json groups = nlohmann::json::array();
  for (const auto& g : c.groups) {
    nlohmann::json nodes = nlohmann::json::array();
    for (const auto& n : g.nodes) nodes.push_back({{"level", n.level}, {"parent", n.parent}, {"members", n.members}});
    groups.push_back({{"name", g.name}, {"dtype", std::string(dtype_name(g.type))}, {"rows", g.grid.rows}, {"cols", g.grid.cols},
                      {"block_rows", g.grid.block_rows}, {"block_cols", g.grid.block_cols}, {"quant_group", g.group_size},
                      {"members", g.member_names}, {"nodes", std::move(nodes)}, {"leaf", g.leaf}, {"stats", detail::stats_json(g.stats)}});
  }
  m["groups"] = std::move(groups);
  out.add_json("manifest", m);

  for (std::size_t gi = 0; gi < c.groups.size(); ++gi) {
    const auto& g = c.groups[gi];
    std::vector<std::byte> data;
    std::vector<std::uint32_t> records;
    auto add_blocks = [&](const BlockMatrix& bm) {
      for (const auto& b : bm.blocks) {
        std::uint32_t r[block_record_fields] = {static_cast<std::uint32_t>(b.kind), 0, 0, b.rank, 0, 0, 0, 0};
        switch (b.kind) {
          case block_kind::zero: break;
          case block_kind::raw: r[5] = detail::put_raw(data, b.raw); break;
          case block_kind::dense: r[1] = b.a.bits, r[5] = detail::put_qmatrix(data, b.a); break;
          case block_kind::lowrank:
            r[1] = b.a.bits, r[5] = detail::put_qmatrix(data, b.a);
            r[2] = b.b.bits, r[6] = detail::put_qmatrix(data, b.b);
            break;
          case block_kind::shared: r[4] = b.basis, r[2] = b.b.bits, r[6] = detail::put_qmatrix(data, b.b); break;
        }
        records.insert(records.end(), std::begin(r), std::end(r));
      }
    };
    for (const auto& n : g.nodes) add_blocks(n.core);
    for (const auto& r : g.residuals) add_blocks(r);
    std::vector<std::uint32_t> bases;
    for (const auto& b : g.bases) {
      const std::uint32_t off = detail::put_qmatrix(data, b.u);
      const std::uint32_t r[basis_record_fields] = {b.node, b.block, b.u.rows, b.u.bits, off, 0};
      bases.insert(bases.end(), std::begin(r), std::end(r));
    }
    const std::string p = "g" + std::to_string(gi) + ".";
    out.add_array<std::uint32_t>(p + "blocks", {records.size() / block_record_fields, block_record_fields}, records);
    out.add_array<std::uint32_t>(p + "bases", {bases.size() / basis_record_fields, basis_record_fields}, bases);
    out.add_bytes(p + "data", data);
  }
  for (std::size_t k = 0; k < contents.copies.size(); ++k) {
    const auto& t = contents.tensors[static_cast<std::size_t>(std::find_if(contents.tensors.begin(), contents.tensors.end(),
                                                                           [&](const TensorEntry& e) { return e.copy == static_cast<int>(k); }) -
                                                              contents.tensors.begin())];
    out.add_array("c" + std::to_string(k), t.type, t.shape, contents.copies[k]);
  }
}

/// An opened, fully validated .s2lc artifact.
class Artifact {
 public:
  /// Maps and validates the file at `path`.
  explicit Artifact(const std::filesystem::path& path) : mapped_(std::in_place, path), view_(mapped_->view()), label_(path.string()) { load(); }
  /// Validates an artifact held in memory (e.g. received over the network; the fuzz target). The
  /// groups are decoded into the Artifact; copied tensors and section views still point into
  /// `bytes`, which must outlive it.
  Artifact(std::span<const std::byte> bytes, std::string label)
      : view_(io::parse_container(bytes, label)), label_(std::move(label)) { load(); }

  const io::ContainerView& container() const noexcept { return view_; }
  const nlohmann::json& manifest() const noexcept { return manifest_; }
  const std::vector<CompressedGroup>& groups() const noexcept { return groups_; }
  const std::vector<TensorEntry>& tensors() const noexcept { return tensors_; }
  /// The safetensors __metadata__ of input file `source`.
  const std::map<std::string, std::string>& metadata(std::uint32_t source) const { return metadata_.at(source); }
  const std::vector<std::string>& sources() const noexcept { return sources_; }

  /// Bytes of the file attributable to group gi: its sections, their table entries and padding,
  /// and an equal share of the header, manifest and table overhead not owned by any section.
  double group_bytes(std::size_t gi) const {
    double own = 0, groups = 0, copies = 0;
    for (const auto& sec : view_.sections()) {
      const double padded = static_cast<double>(detail::align_to(sec.size, 64));
      const auto owner = group_of_section(sec.name);
      if (owner) {
        groups += padded;
        if (*owner == gi) own += padded;
      } else if (!sec.name.empty() && sec.name[0] == 'c') {
        copies += padded;
      }
    }
    // Everything that is neither a group's nor a copy's: header, manifest, table.
    const double shared = static_cast<double>(view_.file().size()) - groups - copies;
    return own + shared / static_cast<double>(std::max<std::size_t>(groups_.size(), 1));
  }

  /// The group a section belongs to: "g<i>.<anything>" -> i.
  static std::optional<std::size_t> group_of_section(std::string_view name) {
    if (name.size() < 3 || name[0] != 'g') return std::nullopt;
    std::size_t i = 1, v = 0;
    while (i < name.size() && name[i] >= '0' && name[i] <= '9' && i < 10) v = v * 10 + static_cast<std::size_t>(name[i++] - '0');
    if (i == 1 || i >= name.size() || name[i] != '.') return std::nullopt;
    return v;
  }

  /// Member e of group gi in f32 (tier: see reconstruct()).
  matrix reconstruct(std::size_t gi, std::uint32_t e, unsigned tier = 0) const {
    if (gi >= groups_.size()) throw invalid_argument("artifact: group " + std::to_string(gi) + " out of range", {label_, {}, {}});
    return compress::reconstruct(groups_[gi], e, tier);
  }

  /// The bytes of tensor t in its original dtype: reconstructed (rounded to nearest even for
  /// bf16/f16) or copied. Bit-reproducible.
  std::vector<std::byte> tensor_bytes(const TensorEntry& t, unsigned tier = 0) const {
    if (t.copy >= 0) {
      const auto b = view_.bytes("c" + std::to_string(t.copy));
      return {b.begin(), b.end()};
    }
    const matrix m = reconstruct(static_cast<std::size_t>(t.group), t.member, tier);
    std::vector<std::byte> out(m.size() * dtype_size(t.type));
    for (std::size_t i = 0; i < m.size(); ++i) {
      const float v = m.data()[i];
      switch (t.type) {
        case dtype::f32: std::memcpy(out.data() + 4 * i, &v, 4); break;
        case dtype::bf16: { const std::uint16_t h = f32_to_bf16(v); std::memcpy(out.data() + 2 * i, &h, 2); break; }
        case dtype::f16: { const std::uint16_t h = f32_to_f16(v); std::memcpy(out.data() + 2 * i, &h, 2); break; }
        case dtype::f64: { const double d = v; std::memcpy(out.data() + 8 * i, &d, 8); break; }
        default: throw format_error("compressed tensor has non-float dtype " + std::string(dtype_name(t.type)), where("manifest"));
      }
    }
    return out;
  }

  /// Writes every tensor of input file `source`, in input order, under its original name and
  /// dtype (crash-safe).
  void write_safetensors(const std::filesystem::path& out, std::uint32_t source = 0, unsigned tier = 0) const {
    if (source >= sources_.size()) throw invalid_argument("artifact: source " + std::to_string(source) + " out of range", {label_, {}, {}});
    std::vector<std::vector<std::byte>> buffers;
    buffers.reserve(tensors_.size());
    std::vector<io::TensorData> data;
    for (const auto& t : tensors_) {
      if (t.source != source) continue;
      buffers.push_back(tensor_bytes(t, tier));
      data.push_back({t.name, t.type, t.shape, buffers.back()});
    }
    io::write_safetensors(out, data, metadata_.at(source));
  }

 private:
  std::optional<io::ContainerFile> mapped_;
  io::ContainerView view_;  ///< of mapped_, or of the caller's bytes during construction
  std::string label_;
  nlohmann::json manifest_;
  std::vector<CompressedGroup> groups_;
  std::vector<TensorEntry> tensors_;
  std::vector<std::map<std::string, std::string>> metadata_;
  std::vector<std::string> sources_;

  /// Where an error lies: `offset`, else the start of `section`, else (a missing section) the
  /// section table that lacks it, so every message names a byte offset.
  error_location where(const std::string& section, std::optional<std::uint64_t> offset = std::nullopt) const {
    if (!offset) {
      const auto* s = view_.find(section);
      offset = s != nullptr ? s->offset : view_.header().table_offset;
    }
    return {label_, section, offset};
  }
  [[noreturn]] void bad(const std::string& what, const std::string& section = "manifest", std::optional<std::uint64_t> offset = std::nullopt) const {
    throw format_error(what, where(section, offset));
  }

  /// A section the artifact must have (format_error if it is missing).
  const io::ContainerSection& section(const std::string& name) const {
    const auto* s = view_.find(name);
    if (s == nullptr) bad("the artifact lacks section '" + name + "' (the section table has no such entry)", name);
    return *s;
  }

  template <typename T>
  T get(const nlohmann::json& j, const char* key, const std::string& ctx) const {
    if (!j.is_object() || !j.contains(key)) bad(ctx + ": missing \"" + key + "\"");
    try {
      return j.at(key).get<T>();
    } catch (const nlohmann::json::exception&) {
      bad(ctx + ": \"" + key + "\" has the wrong type");
    }
  }

  /// An integer in [lo, hi] (hi >= 0). Floats and booleans are rejected: get<int>() would convert
  /// them (1.5 -> 1, true -> 1), and wrap numbers past its range (4294967297 -> 1).
  std::int64_t integer_value(const nlohmann::json& v, const std::string& what, std::int64_t lo, std::int64_t hi) const {
    if (!v.is_number_integer()) bad(what + " must be an integer");
    const bool in_range = v.is_number_unsigned()
                              ? v.get<std::uint64_t>() <= static_cast<std::uint64_t>(hi) && static_cast<std::int64_t>(v.get<std::uint64_t>()) >= lo
                              : v.get<std::int64_t>() >= lo && v.get<std::int64_t>() <= hi;
    if (!in_range) bad(what + " = " + v.dump() + " is outside [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
    return v.get<std::int64_t>();
  }
  std::int64_t integer(const nlohmann::json& j, const char* key, const std::string& ctx, std::int64_t lo, std::int64_t hi) const {
    if (!j.is_object() || !j.contains(key)) bad(ctx + ": missing \"" + key + "\"");
    return integer_value(j.at(key), ctx + ": \"" + key + "\"", lo, hi);
  }
  /// An array of integers, each in [lo, hi].
  std::vector<std::int64_t> integers(const nlohmann::json& j, const char* key, const std::string& ctx, std::int64_t lo, std::int64_t hi) const {
    if (!j.is_object() || !j.contains(key)) bad(ctx + ": missing \"" + key + "\"");
    const auto& v = j.at(key);
    if (!v.is_array()) bad(ctx + ": \"" + key + "\" must be an array of integers");
    std::vector<std::int64_t> out;
    out.reserve(v.size());
    for (const auto& x : v) out.push_back(integer_value(x, ctx + ": an element of \"" + key + "\"", lo, hi));
    return out;
  }

  std::uint64_t to_u64(const nlohmann::json& j, const char* key, const std::string& ctx, std::uint64_t max) const {
    const auto& v = j.contains(key) ? j.at(key) : nlohmann::json();
    if (!v.is_number_unsigned() && !(v.is_number_integer() && v.get<std::int64_t>() >= 0)) bad(ctx + ": \"" + key + "\" must be a non-negative integer");
    const auto x = v.get<std::uint64_t>();
    if (x > max) bad(ctx + ": \"" + key + "\" = " + std::to_string(x) + " exceeds " + std::to_string(max));
    return x;
  }

  void load() {
    if (section("manifest").kind != io::section_kind::json) bad("the manifest is not a json section");
    manifest_ = view_.json("manifest");
    const auto& m = manifest_;
    if (!m.is_object()) bad("the manifest is not a JSON object");
    if (get<std::string>(m, "format", "manifest") != "s2lc") bad("manifest: format is not \"s2lc\"");
    const auto version = integer(m, "version", "manifest", 0, std::numeric_limits<std::int32_t>::max());
    if (version != artifact_version) bad("manifest: unsupported artifact version " + std::to_string(version) + " (this reader: " + std::to_string(artifact_version) + ")");
    sources_ = get<std::vector<std::string>>(m, "sources", "manifest");
    const auto& sources = sources_;
    metadata_ = get<std::vector<std::map<std::string, std::string>>>(m, "metadata", "manifest");
    if (metadata_.size() != sources_.size()) bad("manifest: \"metadata\" needs one object per source");
    const auto& groups = m.contains("groups") && m["groups"].is_array() ? m["groups"] : (bad("manifest: \"groups\" must be an array"), m);
    for (std::size_t gi = 0; gi < groups.size(); ++gi) load_group(gi, groups[gi]);
    const auto& tensors = m.contains("tensors") && m["tensors"].is_array() ? m["tensors"] : (bad("manifest: \"tensors\" must be an array"), m);
    std::map<std::pair<std::uint32_t, std::string>, bool> seen;
    std::vector<std::vector<bool>> member_seen(groups_.size());
    for (std::size_t gi = 0; gi < groups_.size(); ++gi) {
      member_seen[gi].assign(groups_[gi].member_names.size(), false);
      groups_[gi].member_sources.assign(groups_[gi].member_names.size(), 0);  // as compress() gives them
    }
    for (std::size_t i = 0; i < tensors.size(); ++i) {
      const std::string ctx = "manifest: tensors[" + std::to_string(i) + "]";
      const auto& j = tensors[i];
      TensorEntry t;
      t.name = get<std::string>(j, "name", ctx);
      const auto dt = parse_dtype(get<std::string>(j, "dtype", ctx));
      if (!dt) bad(ctx + ": unknown dtype");
      t.type = *dt;
      for (auto d : integers(j, "shape", ctx, 0, std::numeric_limits<std::int64_t>::max())) t.shape.push_back(static_cast<std::uint64_t>(d));
      if (sources.empty()) bad(ctx + ": the manifest lists no sources");
      t.source = static_cast<std::uint32_t>(to_u64(j, "source", ctx, sources.size() - 1));
      if (seen[{t.source, t.name}]) bad(ctx + ": tensor '" + t.name + "' listed twice for one source");
      seen[{t.source, t.name}] = true;
      if (j.contains("group")) {
        t.group = static_cast<int>(to_u64(j, "group", ctx, groups_.empty() ? 0 : groups_.size() - 1));
        if (groups_.empty()) bad(ctx + ": refers to a group but there is none");
        const auto& g = groups_[static_cast<std::size_t>(t.group)];
        t.member = static_cast<std::uint32_t>(to_u64(j, "member", ctx, g.member_names.size() - 1));
        if (g.member_names[t.member] != t.name) bad(ctx + ": '" + t.name + "' is not member " + std::to_string(t.member) + " of group '" + g.name + "'");
        if (t.shape != std::vector<std::uint64_t>{g.grid.rows, g.grid.cols} || t.type != g.type) bad(ctx + ": shape or dtype differ from its group's");
        if (!is_float(t.type)) bad(ctx + ": a compressed tensor must have a float dtype");
        member_seen[static_cast<std::size_t>(t.group)][t.member] = true;
        groups_[static_cast<std::size_t>(t.group)].member_sources[t.member] = t.source;
      } else if (j.contains("copy")) {
        t.copy = static_cast<int>(to_u64(j, "copy", ctx, 0x7FFFFFFF));
        const std::string sec = "c" + std::to_string(t.copy);
        const auto* s = view_.find(sec);
        if (s == nullptr) bad(ctx + ": its section '" + sec + "' is missing");
        if (s->type != t.type || s->shape != t.shape) bad(ctx + ": dtype or shape differ from section '" + sec + "'", sec, s->offset);
      } else {
        bad(ctx + ": neither \"group\" nor \"copy\"");
      }
      tensors_.push_back(std::move(t));
    }
    for (std::size_t gi = 0; gi < groups_.size(); ++gi)
      for (std::size_t e = 0; e < member_seen[gi].size(); ++e)
        if (!member_seen[gi][e]) bad("manifest: member '" + groups_[gi].member_names[e] + "' of group '" + groups_[gi].name + "' is not in \"tensors\"");
  }

  void load_group(std::size_t gi, const nlohmann::json& j) {
    const std::string ctx = "manifest: groups[" + std::to_string(gi) + "]";
    CompressedGroup g;
    g.name = get<std::string>(j, "name", ctx);
    const auto dt = parse_dtype(get<std::string>(j, "dtype", ctx));
    if (!dt) bad(ctx + ": unknown dtype");
    g.type = *dt;
    constexpr std::uint64_t max_dim = 1u << 24;
    g.grid.rows = to_u64(j, "rows", ctx, max_dim);
    g.grid.cols = to_u64(j, "cols", ctx, max_dim);
    g.grid.block_rows = to_u64(j, "block_rows", ctx, max_dim);
    g.grid.block_cols = to_u64(j, "block_cols", ctx, max_dim);
    g.group_size = static_cast<unsigned>(to_u64(j, "quant_group", ctx, 1u << 20));
    if (g.grid.rows == 0 || g.grid.cols == 0 || g.grid.block_rows == 0 || g.grid.block_cols == 0 || g.group_size == 0)
      bad(ctx + ": sizes must be positive");
    g.member_names = get<std::vector<std::string>>(j, "members", ctx);
    if (g.member_names.empty() || g.member_names.size() > 1u << 16) bad(ctx + ": bad member count");
    const auto E = g.member_names.size();
    const auto& nodes = j.contains("nodes") && j["nodes"].is_array() ? j["nodes"] : (bad(ctx + ": \"nodes\" must be an array"), j);
    if (nodes.size() > E * 3 + 1) bad(ctx + ": too many nodes");
    for (std::size_t n = 0; n < nodes.size(); ++n) {
      const std::string nctx = ctx + ".nodes[" + std::to_string(n) + "]";
      CoreNode cn;
      cn.level = static_cast<int>(integer(nodes[n], "level", nctx, 0, 2));
      const auto parent = integer(nodes[n], "parent", nctx, std::numeric_limits<std::int32_t>::min(), std::numeric_limits<std::int32_t>::max());
      if (parent < -1 || parent >= static_cast<std::int64_t>(n)) bad(nctx + ": parent must be an earlier node or -1");
      cn.parent = static_cast<int>(parent);
      for (auto e : integers(nodes[n], "members", nctx, 0, std::numeric_limits<std::int32_t>::max())) {
        if (static_cast<std::uint64_t>(e) >= E) bad(nctx + ": member index out of range");
        cn.members.push_back(static_cast<std::uint32_t>(e));
      }
      g.nodes.push_back(std::move(cn));
    }
    for (auto l : integers(j, "leaf", ctx, std::numeric_limits<std::int32_t>::min(), std::numeric_limits<std::int32_t>::max()))
      g.leaf.push_back(static_cast<int>(l));
    if (g.leaf.size() != E) bad(ctx + ": \"leaf\" needs one entry per member");
    for (std::size_t e = 0; e < E; ++e) {
      if (g.leaf[e] < -1 || g.leaf[e] >= static_cast<int>(g.nodes.size())) bad(ctx + ": leaf out of range");
      // Every node on the path must list e (a cycle is impossible: parents come first).
      for (int n = g.leaf[e]; n >= 0; n = g.nodes[static_cast<std::size_t>(n)].parent) {
        const auto& mem = g.nodes[static_cast<std::size_t>(n)].members;
        if (std::find(mem.begin(), mem.end(), static_cast<std::uint32_t>(e)) == mem.end()) bad(ctx + ": member " + std::to_string(e) + " is not in node " + std::to_string(n) + " on its path");
      }
    }
    const std::string p = "g" + std::to_string(gi) + ".";
    const auto& data_sec = section(p + "data");
    const auto data = data_sec.bytes;
    const auto& blocks_sec = section(p + "blocks");
    const auto& bases_sec = section(p + "bases");
    if (blocks_sec.type != dtype::u32 || blocks_sec.shape.size() != 2 || blocks_sec.shape[1] != block_record_fields)
      bad("must be U32 [n, " + std::to_string(block_record_fields) + "]", blocks_sec.name, blocks_sec.offset);
    if (bases_sec.type != dtype::u32 || bases_sec.shape.size() != 2 || bases_sec.shape[1] != basis_record_fields)
      bad("must be U32 [n, " + std::to_string(basis_record_fields) + "]", bases_sec.name, bases_sec.offset);
    const std::size_t nb = g.grid.blocks();  // <= 2^48: rows, cols <= 2^24
    std::size_t records = 0;                 // (nodes + members) * nb may not fit in 64 bits
    const bool overflow = __builtin_mul_overflow(g.nodes.size() + E, nb, &records);
    if (overflow || blocks_sec.shape[0] != records)
      bad("holds " + std::to_string(blocks_sec.shape[0]) + " records, the group needs " +
              (overflow ? std::to_string(g.nodes.size() + E) + " x " + std::to_string(nb) + " (more than 2^64)" : std::to_string(records)),
          blocks_sec.name, blocks_sec.offset);
    auto field = [&](const io::ContainerSection& s, std::size_t rec, std::size_t f, std::size_t width) {
      std::uint32_t v;
      std::memcpy(&v, s.bytes.data() + 4 * (rec * width + f), 4);
      return v;  // little-endian hosts only (static_assert above)
    };
    std::size_t decoded = 0;  // payload bytes decoded so far (bounded by the data section)
    auto read_q = [&](const io::ContainerSection& s, std::size_t rec, std::size_t bits_field, std::size_t off_field, std::size_t width,
                      std::uint32_t rows, std::uint32_t cols) {
      const std::uint64_t at = s.offset + 4 * (rec * width + off_field);
      const std::uint32_t bits = field(s, rec, bits_field, width);
      if (!valid_bits(bits)) bad("record " + std::to_string(rec) + ": bits " + std::to_string(bits) + " not in 2..8", s.name, s.offset + 4 * (rec * width + bits_field));
      const std::size_t off = field(s, rec, off_field, width);
      if (off % 64 != 0) bad("record " + std::to_string(rec) + ": payload offset " + std::to_string(off) + " is not a multiple of 64", s.name, at);
      QMatrix q;
      q.rows = rows, q.cols = cols, q.bits = static_cast<std::uint8_t>(bits), q.group = g.group_size;
      const std::size_t cbytes = QMatrix::code_bytes(rows, cols, bits), nscales = QMatrix::scale_count(rows, cols, g.group_size);
      const std::size_t end = off + detail::align_to(cbytes, 4) + 2 * nscales;
      decoded += end - std::min(end, off);
      if (decoded > data.size())  // the writer never shares payloads: records pointing at the same bytes are forged
        bad("record " + std::to_string(rec) + ": the group's records decode more bytes (" + std::to_string(decoded) + ") than " + data_sec.name + " holds (" +
                std::to_string(data.size()) + ")", s.name, at);
      if (end > data.size()) bad("record " + std::to_string(rec) + ": payload [" + std::to_string(off) + ", " + std::to_string(end) + ") runs past the end of " + data_sec.name + " (" + std::to_string(data.size()) + " bytes)", s.name, at);
      const auto* src = reinterpret_cast<const std::uint8_t*>(data.data()) + off;
      q.codes.assign(src, src + cbytes);
      q.scales.resize(nscales);
      for (std::size_t i = 0; i < nscales; ++i) {
        const std::size_t k = detail::align_to(cbytes, 4) + 2 * i;
        q.scales[i] = static_cast<std::uint16_t>(src[k] | (src[k + 1] << 8));
        const float sv = bf16_to_f32(q.scales[i]);
        if (!(sv >= 0.0f) || !std::isfinite(sv)) bad("record " + std::to_string(rec) + ": scale " + std::to_string(i) + " is negative or not finite", data_sec.name, data_sec.offset + off + k);
      }
      return q;
    };
    // Bases first: shared blocks refer to them.
    for (std::size_t bi = 0; bi < bases_sec.shape[0]; ++bi) {
      Basis b;
      b.node = field(bases_sec, bi, 0, basis_record_fields);
      b.block = field(bases_sec, bi, 1, basis_record_fields);
      const std::uint32_t rows = field(bases_sec, bi, 2, basis_record_fields);
      if (b.node >= g.nodes.size() || b.block >= nb) bad("basis " + std::to_string(bi) + ": node or block out of range", bases_sec.name, bases_sec.offset + 4 * bi * basis_record_fields);
      const auto rb = static_cast<std::uint32_t>(g.grid.rb(b.block));
      if (rows == 0 || rows > rb) bad("basis " + std::to_string(bi) + ": " + std::to_string(rows) + " rows for a block of " + std::to_string(rb), bases_sec.name, bases_sec.offset + 4 * (bi * basis_record_fields + 2));
      b.u = read_q(bases_sec, bi, 3, 4, basis_record_fields, rows, rb);
      g.bases.push_back(std::move(b));
    }
    auto read_blocks = [&](BlockMatrix& bm, std::size_t owner) {
      bm.blocks.resize(nb);
      for (std::size_t b = 0; b < nb; ++b) {
        const std::size_t rec = owner * nb + b;
        const std::uint64_t at = blocks_sec.offset + 4 * rec * block_record_fields;
        const auto rb = static_cast<std::uint32_t>(g.grid.rb(b)), cb = static_cast<std::uint32_t>(g.grid.cb(b));
        Block& blk = bm.blocks[b];
        const std::uint32_t kind = field(blocks_sec, rec, 0, block_record_fields);
        if (kind > static_cast<std::uint32_t>(block_kind::raw)) bad("record " + std::to_string(rec) + ": unknown block kind " + std::to_string(kind), blocks_sec.name, at);
        blk.kind = static_cast<block_kind>(kind);
        blk.rank = field(blocks_sec, rec, 3, block_record_fields);
        switch (blk.kind) {
          case block_kind::zero: break;
          case block_kind::raw: {
            const std::size_t off = field(blocks_sec, rec, 5, block_record_fields);
            const std::size_t n = static_cast<std::size_t>(rb) * cb;
            if (off % 64 != 0 || off + 4 * n > data.size()) bad("record " + std::to_string(rec) + ": raw payload out of bounds", blocks_sec.name, at + 20);
            decoded += 4 * n;
            if (decoded > data.size())
              bad("record " + std::to_string(rec) + ": the group's records decode more bytes than " + data_sec.name + " holds", blocks_sec.name, at + 20);
            blk.raw.resize(n);
            std::memcpy(blk.raw.data(), data.data() + off, 4 * n);
            for (std::size_t i = 0; i < n; ++i)
              if (!std::isfinite(blk.raw[i])) bad("record " + std::to_string(rec) + ": raw value " + std::to_string(i) + " is not finite", data_sec.name, data_sec.offset + off + 4 * i);
            break;
          }
          case block_kind::dense: blk.a = read_q(blocks_sec, rec, 1, 5, block_record_fields, rb, cb); break;
          case block_kind::lowrank:
            if (blk.rank == 0 || blk.rank > std::min(rb, cb)) bad("record " + std::to_string(rec) + ": rank " + std::to_string(blk.rank) + " out of range", blocks_sec.name, at + 12);
            blk.a = read_q(blocks_sec, rec, 1, 5, block_record_fields, blk.rank, rb);
            blk.b = read_q(blocks_sec, rec, 2, 6, block_record_fields, blk.rank, cb);
            break;
          case block_kind::shared: {
            blk.basis = field(blocks_sec, rec, 4, block_record_fields);
            if (blk.basis >= g.bases.size()) bad("record " + std::to_string(rec) + ": basis " + std::to_string(blk.basis) + " does not exist", blocks_sec.name, at + 16);
            const auto& basis = g.bases[blk.basis];
            if (basis.block != b) bad("record " + std::to_string(rec) + ": basis " + std::to_string(blk.basis) + " belongs to another block position", blocks_sec.name, at + 16);
            if (blk.rank == 0 || blk.rank > basis.u.rows) bad("record " + std::to_string(rec) + ": rank " + std::to_string(blk.rank) + " exceeds its basis (" + std::to_string(basis.u.rows) + ")", blocks_sec.name, at + 12);
            blk.b = read_q(blocks_sec, rec, 2, 6, block_record_fields, blk.rank, cb);
            break;
          }
        }
      }
    };
    for (std::size_t n = 0; n < g.nodes.size(); ++n) read_blocks(g.nodes[n].core, n);
    g.residuals.resize(E);
    for (std::size_t e = 0; e < E; ++e) read_blocks(g.residuals[e], g.nodes.size() + e);
    // Statistics: informative only (nothing is rebuilt from them); block counts are recounted.
    for (const auto* bm : [&] {
           std::vector<const BlockMatrix*> all;
           for (const auto& n : g.nodes) all.push_back(&n.core);
           for (const auto& r : g.residuals) all.push_back(&r);
           return all;
         }())
      for (const auto& b : bm->blocks) g.stats.blocks_by_kind[static_cast<std::size_t>(b.kind)] += 1;
    if (j.contains("stats") && j["stats"].is_object()) {
      const auto& st = j["stats"];
      if (st.contains("energy") && st["energy"].is_number()) g.stats.total_energy = st["energy"].get<double>();
      if (st.contains("residual") && st["residual"].is_number()) g.stats.residual_energy = st["residual"].get<double>() * g.stats.total_energy;
      if (st.contains("levels") && st["levels"].is_array())
        for (const auto& v : st["levels"])
          if (v.is_number()) g.stats.level_energy.push_back(v.get<double>() * g.stats.total_energy);
    }
    groups_.push_back(std::move(g));
  }
};

}  // namespace s2lc::compress
