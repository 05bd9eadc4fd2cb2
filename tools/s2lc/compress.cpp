// s2lc compress / decompress / eval.
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include <s2lc/compress/artifact.hpp>
#include <s2lc/compress/pipeline.hpp>
#include <s2lc/error.hpp>

#include "cli.hpp"

extern "C" void openblas_set_num_threads(int);  // the tools link OpenBLAS (BLA_VENDOR=OpenBLAS)

namespace s2lc::cli {
namespace {

namespace fs = std::filesystem;
namespace cz = s2lc::compress;

struct Args {
  std::vector<std::string> positional;
  std::vector<std::pair<std::string, std::string>> flags;  // value "" for switches
};

Args parse(const std::vector<std::string>& args, const std::vector<std::string>& with_value, const std::vector<std::string>& switches) {
  Args a;
  for (std::size_t i = 0; i < args.size(); ++i) {
    const std::string& s = args[i];
    if (s.size() > 1 && s[0] == '-') {
      if (std::find(switches.begin(), switches.end(), s) != switches.end()) {
        a.flags.emplace_back(s, "");
      } else if (std::find(with_value.begin(), with_value.end(), s) != with_value.end()) {
        if (i + 1 >= args.size()) throw usage_error(s + " needs a value");
        a.flags.emplace_back(s, args[++i]);
      } else {
        throw usage_error("unknown option '" + s + "'");
      }
    } else {
      a.positional.push_back(s);
    }
  }
  return a;
}

/// A progress bar on stderr: redrawn in place on a terminal, one line per stage otherwise.
struct Progress {
  bool tty = isatty(2) != 0;
  std::string printed;
  void operator()(const std::string& s, std::size_t done, std::size_t total) {
    if (tty) {
      const int width = 30;
      const int fill = total ? static_cast<int>(static_cast<double>(done) / static_cast<double>(total) * width) : width;
      std::fprintf(stderr, "\r%-9s [%s%s] %zu/%zu", s.c_str(), std::string(static_cast<std::size_t>(fill), '#').c_str(),
                   std::string(static_cast<std::size_t>(width - fill), '.').c_str(), done, total);
      if (done == total) std::fputc('\n', stderr);
    } else if (done == total && s != printed) {
      std::fprintf(stderr, "%-9s %zu/%zu done\n", s.c_str(), done, total);
      printed = s;
    }
    std::fflush(stderr);
  }
};

bool is_artifact(const fs::path& p) {
  std::FILE* f = std::fopen(p.c_str(), "rb");
  if (!f) return false;
  unsigned char m[4] = {};
  const bool ok = std::fread(m, 1, 4, f) == 4 && m[0] == 'S' && m[1] == '2' && m[2] == 'L' && m[3] == 'C';
  std::fclose(f);
  return ok;
}

}  // namespace

int run_compress(const std::vector<std::string>& args) {
  const Args a = parse(args, {"-o", "--ratio", "--energy", "--max-error", "--bits", "--calib", "--block", "--group", "--clusters",
                              "--threads", "--truncation-penalty", "--balance", "--seed"},
                       {"--no-shared-basis", "--no-global", "--quiet"});
  if (a.positional.empty()) throw usage_error("compress: need at least one input .safetensors file");
  cz::Options opt;
  std::optional<fs::path> out, calib;
  int targets = 0;
  bool quiet = false;
  nlohmann::json record = nlohmann::json::object();
  for (const auto& [k, v] : a.flags) {
    if (k == "-o") out = v;
    else if (k == "--ratio") opt.mode = cz::target_mode::ratio, opt.ratio = parse_number(k, v), ++targets;
    else if (k == "--energy") opt.mode = cz::target_mode::energy, opt.energy = parse_number(k, v), ++targets;
    else if (k == "--max-error") opt.mode = cz::target_mode::max_error, opt.max_error = parse_number(k, v), ++targets;
    else if (k == "--bits") {
      opt.bits = static_cast<unsigned>(parse_count(k, v));
      if (opt.bits != 8 && opt.bits != 4) throw usage_error("--bits must be 8 or 4");
    } else if (k == "--calib") calib = v;
    else if (k == "--block") {
      const auto x = v.find('x');
      opt.block_rows = parse_count(k, v.substr(0, x));
      opt.block_cols = x == std::string::npos ? opt.block_rows : parse_count(k, v.substr(x + 1));
      if (!opt.block_rows || !opt.block_cols) throw usage_error("--block must be positive");
    } else if (k == "--group") {
      opt.group = parse_count(k, v);
      if (!opt.group) throw usage_error("--group must be positive");
    } else if (k == "--clusters") opt.hed.clusters = v == "auto" ? -1 : static_cast<int>(parse_count(k, v));
    else if (k == "--threads") opt.threads = static_cast<unsigned>(parse_count(k, v));
    else if (k == "--truncation-penalty") opt.truncation_penalty = parse_number(k, v);
    else if (k == "--balance") {
      if (v != "group" && v != "block") throw usage_error("--balance is 'group' or 'block'");
      opt.balance = v == "group" ? cz::balance_mode::group : cz::balance_mode::block;
    } else if (k == "--seed") opt.hed.seed = parse_count(k, v);
    else if (k == "--no-shared-basis") opt.shared_basis = false;
    else if (k == "--no-global") opt.hed.global = 0;
    else if (k == "--quiet") quiet = true;
    record[k.substr(2 - (k == "-o" ? 1 : 0))] = v;
  }
  if (!out) throw usage_error("compress: -o OUT.s2lc is required");
  if (targets > 1) throw usage_error("compress: give one of --ratio, --energy, --max-error");
  if (opt.mode == cz::target_mode::ratio && !(opt.ratio >= 1)) throw usage_error("--ratio must be >= 1");
  if (opt.mode == cz::target_mode::energy && !(opt.energy >= 0 && opt.energy <= 1)) throw usage_error("--energy must be in [0, 1]");
  Progress progress;
  if (!quiet) opt.progress = [&](const std::string& s, std::size_t d, std::size_t t) { progress(s, d, t); };
  record.erase("o");
  openblas_set_num_threads(1);  // parallelism is over blocks; nested BLAS threads only contend
  std::vector<fs::path> inputs(a.positional.begin(), a.positional.end());
  const auto rep = cz::compress_files(inputs, *out, opt, calib, record);
  std::printf("wrote %s: %llu bytes; groups: %.0f -> %.0f bytes (ratio_total %.3f), %.2f s\n", out->c_str(),
              static_cast<unsigned long long>(rep.file_bytes), rep.original_bytes, rep.group_bytes,
              rep.group_bytes > 0 ? rep.original_bytes / rep.group_bytes : 0.0, rep.seconds);
  return 0;
}

int run_decompress(const std::vector<std::string>& args) {
  const Args a = parse(args, {"-o", "--tier"}, {});
  if (a.positional.size() != 1) throw usage_error("decompress: need exactly one .s2lc file");
  std::optional<fs::path> out;
  unsigned tier = 0;
  for (const auto& [k, v] : a.flags) {
    if (k == "-o") out = v;
    if (k == "--tier") {
      tier = static_cast<unsigned>(parse_count(k, v));
      if (!cz::valid_bits(tier)) throw usage_error("--tier must be 2 to 8");
    }
  }
  if (!out) throw usage_error("decompress: -o OUT is required");
  const cz::Artifact art(a.positional[0]);
  if (art.sources().size() == 1) {
    art.write_safetensors(*out, 0, tier);
    std::printf("wrote %s (%zu tensors)\n", out->c_str(), art.tensors().size());
    return 0;
  }
  // Several inputs: -o is a directory receiving one file per input, under the input's name.
  fs::create_directories(*out);
  for (std::uint32_t s = 0; s < art.sources().size(); ++s) {
    const fs::path p = *out / fs::path(art.sources()[s]).filename();
    art.write_safetensors(p, s, tier);
    std::printf("wrote %s\n", p.c_str());
  }
  return 0;
}

int run_eval(const std::vector<std::string>& args) {
  const Args a = parse(args, {"--calib"}, {"--json", "--baselines"});
  if (a.positional.size() < 2) throw usage_error("eval: need IN.safetensors... and OUT.s2lc (or a reconstruction .safetensors)");
  std::optional<fs::path> calib;
  bool json = false, baselines = false;
  for (const auto& [k, v] : a.flags) {
    if (k == "--calib") calib = v;
    if (k == "--json") json = true;
    if (k == "--baselines") baselines = true;
  }
  openblas_set_num_threads(1);
  const std::vector<fs::path> inputs(a.positional.begin(), a.positional.end() - 1);
  const fs::path result = a.positional.back();
  const cz::InputSet in = cz::open_inputs(inputs);
  std::unique_ptr<io::SafetensorsFile> cal;
  if (calib) cal = std::make_unique<io::SafetensorsFile>(*calib);
  std::optional<cz::Artifact> art;
  std::unique_ptr<io::SafetensorsFile> recon;
  if (is_artifact(result)) art.emplace(result);
  else recon = std::make_unique<io::SafetensorsFile>(result);

  nlohmann::json report;
  report["artifact"] = result.string();
  report["inputs"] = a.positional;
  nlohmann::json groups = nlohmann::json::array();
  cz::ErrorSums total;
  double total_orig = 0, total_bytes = 0, total_resid = 0;
  std::map<std::string, cz::ErrorSums> base_total;
  std::map<std::string, double> base_bytes;
  for (std::size_t g = 0; g < in.groups.size(); ++g) {
    const auto& grp = in.groups[g];
    std::vector<matrix> W;
    for (auto m : grp.members) W.push_back(load_matrix_f32(in.file_of(m), in.refs[m].name));
    std::vector<matrix> H;
    if (cal) H = cz::calibration_covariances(in, g, *cal);
    auto cov = [&](std::size_t e) -> const matrix* { return H.empty() ? nullptr : (H.size() == 1 ? &H[0] : &H[e]); };
    // Find the group in the artifact by its members.
    std::optional<std::size_t> ag;
    if (art) {
      for (std::size_t k = 0; k < art->groups().size() && !ag; ++k)
        if (art->groups()[k].member_names.size() == grp.members.size() && art->groups()[k].member_names[0] == in.refs[grp.members[0]].name &&
            art->groups()[k].name == grp.name)
          ag = k;
      if (!ag) throw invalid_argument("group '" + grp.name + "' of the inputs is not in the artifact", {result.string(), {}, {}});
    }
    cz::ErrorSums sums;
    for (std::size_t e = 0; e < W.size(); ++e) {
      matrix R;
      if (art) {
        R = art->reconstruct(*ag, static_cast<std::uint32_t>(e));
      } else {
        const auto& name = in.refs[grp.members[e]].name;
        if (!recon->find(name)) throw invalid_argument("reconstruction lacks tensor '" + name + "'", {result.string(), name, {}});
        R = load_matrix_f32(*recon, name);
        if (R.shape() != W[e].shape()) throw invalid_argument("shape differs from the input's", {result.string(), name, {}});
      }
      sums.add(W[e], R, cov(e));
    }
    const double orig = in.original_bytes(g);
    nlohmann::json j{{"name", grp.name}, {"members", grp.members.size()}, {"original_bytes", orig}, {"rel_fro_error", sums.rel_fro()}};
    if (!H.empty()) j["rel_out_error"] = sums.rel_out();
    j["calibrated"] = !H.empty();
    double bytes = orig;
    if (art) {
      const auto& cg = art->groups()[*ag];
      bytes = art->group_bytes(*ag);
      double resid = 0;
      for (const auto& r : cg.residuals)
        for (const auto& b : r.blocks) resid += static_cast<double>(b.payload_bytes());
      for (const auto& b : cg.bases) resid += static_cast<double>(b.u.storage_bytes());
      j["compressed_bytes"] = bytes;
      j["ratio_total"] = orig / bytes;
      if (resid > 0) j["ratio_residual"] = orig / resid;
      else j["ratio_residual"] = nullptr;
      const double te = cg.stats.total_energy > 0 ? cg.stats.total_energy : 1.0;
      j["energy"] = {{"global", cg.stats.level_energy.size() > 0 ? cg.stats.level_energy[0] / te : 0.0},
                     {"cluster", cg.stats.level_energy.size() > 1 ? cg.stats.level_energy[1] / te : 0.0},
                     {"subcluster", cg.stats.level_energy.size() > 2 ? cg.stats.level_energy[2] / te : 0.0},
                     {"residual", cg.stats.residual_energy / te}};
      j["nodes"] = cg.nodes.size();
      nlohmann::json kinds;
      for (std::size_t k = 0; k < 5; ++k) kinds[cz::block_kind_name(static_cast<cz::block_kind>(k))] = cg.stats.blocks_by_kind[k];
      j["blocks"] = kinds;
      total_resid += resid;
    }
    total_orig += orig;
    total_bytes += bytes;
    total.add(sums);
    if (baselines) {
      const std::size_t E = W.size(), m = W[0].shape()[0], n = W[0].shape()[1];
      const double esz = static_cast<double>(dtype_size(grp.type));
      nlohmann::json b;
      auto record = [&](const std::string& key, const cz::ErrorSums& s, double used, nlohmann::json extra) {
        extra["bytes"] = used;
        extra["ratio"] = orig / used;
        extra["rel_fro_error"] = s.rel_fro();
        if (!H.empty()) extra["rel_out_error"] = s.rel_out();
        b[key] = extra;
        base_total[key].add(s);
        base_bytes[key] += used;
      };
      // Per-member truncated SVD at the artifact's bytes (factors in the input dtype).
      {
        const auto r = static_cast<std::size_t>(std::floor(bytes / (static_cast<double>(E * (m + n)) * esz)));
        cz::ErrorSums s;
        for (std::size_t e = 0; e < E; ++e) s.add(W[e], cz::svd_baseline(W[e], std::min(r, std::min(m, n))), cov(e));
        record("svd", s, static_cast<double>(r * E * (m + n)) * esz, {{"rank", r}});
      }
      // D2-MoE style: the mean member in full plus per-member delta SVD.
      {
        matrix mean = xt::zeros<float>({m, n});
        for (const auto& w : W) mean += w;
        mean /= static_cast<float>(E);
        const double left = bytes - static_cast<double>(m * n) * esz;
        const auto r = left > 0 ? static_cast<std::size_t>(std::floor(left / (static_cast<double>(E * (m + n)) * esz))) : 0;
        cz::ErrorSums s;
        for (std::size_t e = 0; e < E; ++e) s.add(W[e], mean + cz::svd_baseline(matrix(W[e] - mean), std::min(r, std::min(m, n))), cov(e));
        record("d2", s, static_cast<double>(m * n + r * E * (m + n)) * esz, {{"rank", r}});
      }
      for (unsigned bits : {8u, 4u, 3u, 2u}) {
        cz::ErrorSums s;
        for (std::size_t e = 0; e < E; ++e) s.add(W[e], cz::rtn_baseline(W[e], bits), cov(e));
        record("int" + std::to_string(bits), s, static_cast<double>(E * m * n) * (bits + 0.5) / 8.0, {});
      }
      j["baselines"] = b;
    }
    groups.push_back(std::move(j));
  }
  nlohmann::json t{{"original_bytes", total_orig}, {"rel_fro_error", total.rel_fro()}};
  if (art) t["compressed_bytes"] = total_bytes, t["ratio_total"] = total_orig / total_bytes, t["ratio_residual"] = total_resid > 0 ? total_orig / total_resid : 0.0;
  if (cal) t["rel_out_error"] = total.rel_out();
  if (baselines) {
    nlohmann::json b;
    for (const auto& [k, s] : base_total) {
      b[k] = {{"bytes", base_bytes[k]}, {"ratio", total_orig / base_bytes[k]}, {"rel_fro_error", s.rel_fro()}};
      if (cal) b[k]["rel_out_error"] = s.rel_out();
    }
    t["baselines"] = b;
  }
  // LoRA adapters: the error of the update dW = B A itself, from r x r Gram matrices (dW is
  // never formed): ||BA - B^A^||^2 = tr(B'B AA') - 2 tr(B'B^ A^A') + tr(B^'B^ A^A^').
  {
    const auto scan = io::find_lora_pairs(in.refs);
    double num = 0, den = 0;
    std::size_t pairs = 0;
    auto reconstructed = [&](std::size_t ref) -> std::optional<matrix> {
      const int g = in.group_of[ref];
      if (g < 0) return std::nullopt;
      if (art) {
        for (std::size_t k = 0; k < art->groups().size(); ++k)
          if (art->groups()[k].name == in.groups[static_cast<std::size_t>(g)].name)
            return art->reconstruct(k, in.member_of[ref]);
        return std::nullopt;
      }
      if (!recon->find(in.refs[ref].name)) return std::nullopt;
      return load_matrix_f32(*recon, in.refs[ref].name);
    };
    auto gram = [](const matrix& x, const matrix& y, bool left) {  // left: x^T y ; else x y^T
      return left ? matrix(xt::linalg::dot(xt::transpose(x), y)) : matrix(xt::linalg::dot(x, xt::transpose(y)));
    };
    auto trace_prod = [](const matrix& x, const matrix& y) {  // tr(x y) for square x, y
      double tr = 0;
      for (std::size_t i = 0; i < x.shape()[0]; ++i)
        for (std::size_t j = 0; j < x.shape()[1]; ++j) tr += static_cast<double>(x(i, j)) * y(j, i);
      return tr;
    };
    for (const auto& p : scan.pairs) {
      const auto Ah = reconstructed(p.a), Bh = reconstructed(p.b);
      if (!Ah || !Bh) continue;
      const matrix A = load_matrix_f32(in.file_of(p.a), in.refs[p.a].name), B = load_matrix_f32(in.file_of(p.b), in.refs[p.b].name);
      const double ref = trace_prod(gram(B, B, true), gram(A, A, false));
      const double cross = trace_prod(gram(B, *Bh, true), gram(*Ah, A, false));
      const double self = trace_prod(gram(*Bh, *Bh, true), gram(*Ah, *Ah, false));
      num += std::max(0.0, ref - 2 * cross + self);
      den += ref;
      ++pairs;
    }
    if (pairs > 0) report["lora"] = {{"pairs", pairs}, {"rel_delta_error", den > 0 ? std::sqrt(num / den) : 0.0}};
  }
  report["groups"] = groups;
  report["total"] = t;
  if (json) {
    std::printf("%s\n", report.dump(1).c_str());
    return 0;
  }
  std::printf("%-48s %9s %9s %10s %10s\n", "group", "ratio", "r_resid", "rel_fro", cal ? "rel_out" : "");
  auto row = [&](const std::string& name, const nlohmann::json& j) {
    auto num = [&](const char* k) { return j.contains(k) && j[k].is_number() ? j[k].get<double>() : NAN; };
    std::printf("%-48s %9.3f %9.3f %10.5f %10s\n", name.c_str(), num("ratio_total"), num("ratio_residual"), num("rel_fro_error"),
                j.contains("rel_out_error") ? std::to_string(num("rel_out_error")).c_str() : "");
  };
  for (const auto& j : groups) row(j["name"].get<std::string>(), j);
  row("TOTAL", t);
  if (report.contains("lora"))
    std::printf("LoRA updates dW = B A: %zu pairs, rel error ||dW - dW^|| / ||dW|| = %.5f\n", report["lora"]["pairs"].get<std::size_t>(),
                report["lora"]["rel_delta_error"].get<double>());
  if (baselines) {
    std::printf("\nbaselines on the same groups (equal bytes for svd/d2; int-N at its own size)\n");
    std::printf("%-10s %9s %10s %10s\n", "baseline", "ratio", "rel_fro", cal ? "rel_out" : "");
    for (const auto& [k, v] : t["baselines"].items())
      std::printf("%-10s %9.3f %10.5f %10s\n", k.c_str(), v["ratio"].get<double>(), v["rel_fro_error"].get<double>(),
                  v.contains("rel_out_error") ? std::to_string(v["rel_out_error"].get<double>()).c_str() : "");
  }
  return 0;
}

}  // namespace s2lc::cli
