// s2lc::io — what tensor names mean: Mixture-of-Experts expert groups and PEFT LoRA pairs.
//
// Expert groups: tensors whose names differ only in the integer after "experts." and that share
// dtype and shape, e.g. Mixtral  model.layers.0.block_sparse_moe.experts.{E}.w1.weight,
// Qwen-MoE / DeepSeek / OLMoE     model.layers.0.mlp.experts.{E}.gate_proj.weight,
// tinymoe                          layers.0.moe.experts.{E}.w1.weight.
// ("shared_experts.gate_proj" has no index and is not an expert group.)
//
// LoRA pairs (PEFT): <module>.lora_A[.<adapter>].weight [r, in] with <module>.lora_B[...] [out, r]
// (and lora_embedding_A / lora_embedding_B). The update is (lora_alpha / r) * B @ A.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include "s2lc/dtype.hpp"

namespace s2lc::io {

/// A tensor known by name, dtype and shape; `source` is a caller-defined index (e.g. the file).
struct TensorRef {
  std::string name;
  dtype type = dtype::f32;
  std::vector<std::uint64_t> shape;
  std::size_t source = 0;

  std::uint64_t nbytes() const noexcept {
    std::uint64_t n = dtype_size(type);
    for (auto d : shape) n *= d;
    return n;
  }
};

/// "[768, 256]".
inline std::string shape_string(const std::vector<std::uint64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

/// A tensor name split around its expert index.
struct ExpertName {
  std::string prefix;  ///< up to and including "experts."
  std::uint32_t expert = 0;
  std::string suffix;  ///< from the '.' after the index
  std::string pattern() const { return prefix + "{E}" + suffix; }
};

/// Splits `name` at the first "experts.<digits>." (or "experts.<digits>" at the end).
inline std::optional<ExpertName> parse_expert_name(std::string_view name) {
  constexpr std::string_view key = "experts.";
  for (std::size_t pos = name.find(key); pos != std::string_view::npos; pos = name.find(key, pos + 1)) {
    if (pos > 0 && name[pos - 1] != '.') continue;  // "shared_experts.", "num_experts." are not it
    const std::size_t digits = pos + key.size();
    std::size_t end = digits;
    while (end < name.size() && name[end] >= '0' && name[end] <= '9') ++end;
    if (end == digits || end - digits > 9) continue;
    if (end < name.size() && name[end] != '.') continue;
    ExpertName out;
    out.prefix = std::string(name.substr(0, digits));
    out.expert = static_cast<std::uint32_t>(std::stoul(std::string(name.substr(digits, end - digits))));
    out.suffix = std::string(name.substr(end));
    return out;
  }
  return std::nullopt;
}

/// Tensors of one MoE layer's experts that play the same role (same pattern, dtype and shape).
struct ExpertGroup {
  std::string pattern;                  ///< name with "{E}" for the expert index
  dtype type = dtype::f32;
  std::vector<std::uint64_t> shape;
  std::vector<std::uint32_t> experts;   ///< expert indices, ascending
  std::vector<std::size_t> members;     ///< indices into the input, in the order of `experts`

  std::string name_of(std::uint32_t expert) const {
    const auto p = pattern.find("{E}");
    return pattern.substr(0, p) + std::to_string(expert) + pattern.substr(p + 3);
  }
};

/// Finds expert groups (at least two members) among `tensors`, ordered by pattern. A name seen
/// twice (e.g. in two shards) counts once.
inline std::vector<ExpertGroup> find_expert_groups(std::span<const TensorRef> tensors) {
  using Key = std::tuple<std::string, dtype, std::vector<std::uint64_t>>;
  std::map<Key, std::map<std::uint32_t, std::size_t>> by_key;
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    const auto parsed = parse_expert_name(tensors[i].name);
    if (!parsed) continue;
    by_key[Key{parsed->pattern(), tensors[i].type, tensors[i].shape}].emplace(parsed->expert, i);
  }
  std::vector<ExpertGroup> groups;
  for (auto& [key, members] : by_key) {
    if (members.size() < 2) continue;
    ExpertGroup g;
    std::tie(g.pattern, g.type, g.shape) = key;
    for (auto [e, i] : members) {
      g.experts.push_back(e);
      g.members.push_back(i);
    }
    groups.push_back(std::move(g));
  }
  return groups;
}

/// A PEFT LoRA factor pair.
struct LoraPair {
  std::string module;     ///< e.g. "base_model.model.layers.0.attn.wq"
  std::string a_name, b_name;
  std::size_t a = 0, b = 0;  ///< indices into the input
  std::uint64_t rank = 0, in_features = 0, out_features = 0;
};

struct LoraScan {
  std::vector<LoraPair> pairs;
  std::vector<std::string> problems;  ///< unpaired factors and shape mismatches, one line each
};

namespace detail {
struct LoraName {
  std::string key;     ///< module + "|" + adapter suffix
  std::string module;
  bool is_a = false;
};
inline std::optional<LoraName> parse_lora_name(std::string_view name) {
  for (std::string_view tag : {".lora_A", ".lora_B", ".lora_embedding_A", ".lora_embedding_B"}) {
    const auto pos = name.find(tag);
    if (pos == std::string_view::npos) continue;
    const std::size_t after = pos + tag.size();
    if (after < name.size() && name[after] != '.') continue;
    LoraName out;
    out.module = std::string(name.substr(0, pos));
    out.is_a = tag.back() == 'A';
    const std::string kind = tag.find("embedding") != std::string_view::npos ? "emb" : "lin";
    out.key = out.module + "|" + kind + "|" + std::string(name.substr(after));
    return out;
  }
  return std::nullopt;
}
}  // namespace detail

/// Pairs lora_A / lora_B factors of the same source and checks their shapes: A [r, in], B [out, r].
inline LoraScan find_lora_pairs(std::span<const TensorRef> tensors) {
  std::map<std::string, std::pair<std::optional<std::size_t>, std::optional<std::size_t>>> by_key;
  std::map<std::string, std::string> module_of;
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    const auto parsed = detail::parse_lora_name(tensors[i].name);
    if (!parsed) continue;
    // Factors pair within one source (adapter file): two adapters may use the same names.
    const std::string key = std::to_string(tensors[i].source) + "|" + parsed->key;
    auto& slot = by_key[key];
    (parsed->is_a ? slot.first : slot.second) = i;
    module_of[key] = parsed->module;
  }
  LoraScan scan;
  for (auto& [key, ab] : by_key) {
    if (!ab.first || !ab.second) {
      const std::size_t have = ab.first ? *ab.first : *ab.second;
      scan.problems.push_back("'" + tensors[have].name + "' has no matching lora_" + (ab.first ? "B" : "A") + " factor");
      continue;
    }
    const auto& A = tensors[*ab.first];
    const auto& B = tensors[*ab.second];
    if (A.shape.size() != 2 || B.shape.size() != 2 || A.shape[0] != B.shape[1]) {
      scan.problems.push_back("'" + A.name + "' and '" + B.name + "' do not form A [r, in], B [out, r]");
      continue;
    }
    LoraPair p;
    p.module = module_of[key];
    p.a_name = A.name;
    p.b_name = B.name;
    p.a = *ab.first;
    p.b = *ab.second;
    p.rank = A.shape[0];
    p.in_features = A.shape[1];
    p.out_features = B.shape[0];
    scan.pairs.push_back(std::move(p));
  }
  return scan;
}

}  // namespace s2lc::io
