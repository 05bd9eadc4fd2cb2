// s2lc inspect FILE... [--json]: tensors, dtypes, shapes, bytes, expert groups and LoRA pairs.
// Expert groups and LoRA pairs are found across all files given (sharded checkpoints).
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include <s2lc/io/names.hpp>
#include <s2lc/io/safetensors.hpp>

#include "cli.hpp"

namespace s2lc::cli {
namespace {

using nlohmann::ordered_json;

std::string experts_str(const std::vector<std::uint32_t>& e) {
  bool contiguous = true;
  for (std::size_t i = 1; i < e.size(); ++i) contiguous = contiguous && e[i] == e[i - 1] + 1;
  if (contiguous) return std::to_string(e.front()) + "-" + std::to_string(e.back());
  std::string s;
  for (std::size_t i = 0; i < e.size(); ++i) s += (i ? "," : "") + std::to_string(e[i]);
  return s;
}

}  // namespace

int run_inspect(const std::vector<std::string>& args) {
  bool json = false;
  std::vector<std::string> paths;
  for (const auto& a : args) {
    if (a == "--json") json = true;
    else if (a == "--help" || a == "-h") {
      std::puts("usage: s2lc inspect FILE... [--json]");
      return 0;
    } else if (a.size() > 1 && a[0] == '-') throw usage_error("inspect: unknown option '" + a + "'");
    else paths.push_back(a);
  }
  if (paths.empty()) throw usage_error("inspect: no input file (usage: s2lc inspect FILE... [--json])");

  std::vector<std::unique_ptr<io::SafetensorsFile>> files;
  std::vector<io::TensorRef> refs;
  for (std::size_t i = 0; i < paths.size(); ++i) {
    files.push_back(std::make_unique<io::SafetensorsFile>(paths[i]));
    auto r = io::tensor_refs(*files.back(), i);
    refs.insert(refs.end(), r.begin(), r.end());
  }
  const auto groups = io::find_expert_groups(refs);
  const auto lora = io::find_lora_pairs(refs);

  if (json) {
    ordered_json out;
    out["files"] = ordered_json::array();
    for (const auto& f : files) {
      ordered_json jf;
      jf["path"] = f->path().string();
      jf["size_bytes"] = f->file_size();
      jf["header_bytes"] = f->header().header_size;
      jf["metadata"] = f->metadata();
      jf["tensors"] = ordered_json::array();
      for (const auto& t : f->tensors())
        jf["tensors"].push_back({{"name", t.name}, {"dtype", dtype_name(t.type)}, {"shape", t.shape},
                                 {"bytes", t.nbytes()}, {"offset", f->offset_of(t)}});
      out["files"].push_back(std::move(jf));
    }
    out["expert_groups"] = ordered_json::array();
    for (const auto& g : groups) {
      ordered_json jt = ordered_json::array();
      std::uint64_t bytes = 0;
      for (auto m : g.members) {
        jt.push_back({{"name", refs[m].name}, {"file", refs[m].source}});
        bytes += refs[m].nbytes();
      }
      out["expert_groups"].push_back({{"pattern", g.pattern}, {"dtype", dtype_name(g.type)}, {"shape", g.shape},
                                      {"n_experts", g.experts.size()}, {"experts", g.experts}, {"bytes", bytes},
                                      {"tensors", jt}});
    }
    out["lora_pairs"] = ordered_json::array();
    for (const auto& p : lora.pairs)
      out["lora_pairs"].push_back({{"module", p.module}, {"lora_A", p.a_name}, {"lora_B", p.b_name}, {"rank", p.rank},
                                   {"in_features", p.in_features}, {"out_features", p.out_features}});
    out["lora_problems"] = lora.problems;
    std::puts(out.dump(2).c_str());
    return 0;
  }

  for (const auto& f : files) {
    std::printf("%s: %llu bytes, %zu tensors, header %llu bytes\n", f->path().c_str(),
                static_cast<unsigned long long>(f->file_size()), f->tensors().size(),
                static_cast<unsigned long long>(f->header().header_size));
    for (const auto& [k, v] : f->metadata()) {
      const std::string shown = v.size() > 72 ? v.substr(0, 69) + "..." : v;
      std::printf("  metadata %s = %s\n", k.c_str(), shown.c_str());
    }
    std::size_t w = 4;
    for (const auto& t : f->tensors()) w = std::max(w, t.name.size());
    std::printf("  %-*s  %-7s  %-16s  %12s  %12s\n", static_cast<int>(w), "name", "dtype", "shape", "bytes", "offset");
    for (const auto& t : f->tensors())
      std::printf("  %-*s  %-7s  %-16s  %12llu  %12llu\n", static_cast<int>(w), t.name.c_str(),
                  std::string(dtype_name(t.type)).c_str(), io::shape_string(t.shape).c_str(),
                  static_cast<unsigned long long>(t.nbytes()), static_cast<unsigned long long>(f->offset_of(t)));
  }
  std::printf("%zu expert groups\n", groups.size());
  for (const auto& g : groups) {
    std::uint64_t bytes = 0;
    for (auto m : g.members) bytes += refs[m].nbytes();
    std::printf("  %-48s %-5s %-12s %3zu experts (%s)  %llu bytes\n", g.pattern.c_str(), std::string(dtype_name(g.type)).c_str(),
                io::shape_string(g.shape).c_str(), g.experts.size(), experts_str(g.experts).c_str(),
                static_cast<unsigned long long>(bytes));
  }
  std::printf("%zu LoRA pairs\n", lora.pairs.size());
  for (const auto& p : lora.pairs)
    std::printf("  %-56s r=%llu  [%llu -> %llu]\n", p.module.c_str(), static_cast<unsigned long long>(p.rank),
                static_cast<unsigned long long>(p.in_features), static_cast<unsigned long long>(p.out_features));
  for (const auto& p : lora.problems) std::printf("  warning: %s\n", p.c_str());
  return 0;
}

}  // namespace s2lc::cli
