// s2lc route — the prompt-level context router (include/route/context.hpp):
//   s2lc route fit EXAMPLES.json -o R.json [options]   fit from [{"domain", "text"}...]
//   s2lc route R.json [--json] < prompt                pick a module for the prompt on stdin
//   s2lc route eval R.json EXAMPLES.json [--json]      accuracy / calibration on labelled prompts
#include <chrono>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <iterator>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include <route/context.hpp>
#include <s2lc/io/safetensors.hpp>
#include <s2lc/tensor.hpp>

#include "cli.hpp"

namespace s2lc::cli {

namespace {

constexpr const char* kRouteUsage =
    "route: usage:\n"
    "  s2lc route fit EXAMPLES.json -o R.json [--model logistic|sigmoid|centroid|naive_bayes]\n"
    "        [--ngrams MIN-MAX] [--buckets N] [--no-words] [--epochs N] [--threshold X]\n"
    "        [--embeddings FILE.safetensors [--embedding-tensor NAME]] [--quiet]\n"
    "  s2lc route R.json [--json] [--threshold X] [--tokens] [--embeddings FILE ...] < prompt\n"
    "  s2lc route eval R.json EXAMPLES.json [--json] [--threshold X] [--embeddings FILE ...]";

struct TableHolder {
  matrix data;
  std::optional<route::EmbeddingTable> table;
  const route::EmbeddingTable* get() const { return table ? &*table : nullptr; }
};

/// Loads the embedding table [vocab, dim] from a safetensors file (the named tensor, or the
/// usual Hugging Face / llama names).
void load_table(TableHolder& h, const std::string& file, const std::string& tensor) {
  io::SafetensorsFile f(file);
  std::string name = tensor;
  if (name.empty()) {
    for (const char* c : {"model.embed_tokens.weight", "tok_embeddings.weight", "embed_tokens.weight", "transformer.wte.weight",
                          "model.embed_tokens"})
      if (f.find(c)) {
        name = c;
        break;
      }
    if (name.empty()) throw invalid_argument("no embedding table found (pass --embedding-tensor NAME)", {file, {}, {}});
  }
  h.data = load_matrix_f32(f, name);
  h.table = route::EmbeddingTable::of(h.data.data(), h.data.shape()[0], h.data.shape()[1]);
}

std::vector<std::uint32_t> read_stdin(bool tokens) {
  std::string in((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());
  if (!tokens) return route::bytes_to_symbols(in);
  std::vector<std::uint32_t> ids;
  std::istringstream ss(in);
  std::string w;
  while (ss >> w) ids.push_back(static_cast<std::uint32_t>(parse_count("token id", w)));
  return ids;
}

nlohmann::ordered_json decision_json(const route::ContextRouter& r, const route::ContextDecision& d) {
  nlohmann::ordered_json j;
  j["module"] = d.module;
  j["confidence"] = d.confidence;
  j["fallback"] = d.fallback;
  nlohmann::ordered_json w = nlohmann::ordered_json::object(), s = nlohmann::ordered_json::object();
  for (std::size_t m = 0; m < r.modules().size(); ++m) w[r.modules()[m]] = d.weights[m], s[r.modules()[m]] = d.scores[m];
  j["weights"] = w;
  j["scores"] = s;
  return j;
}

}  // namespace

int run_route(const std::vector<std::string>& args) {
  if (args.empty()) throw usage_error(kRouteUsage);
  const std::string mode = args[0] == "fit" || args[0] == "eval" ? args[0] : "route";
  std::vector<std::string> pos;
  std::string out, emb_file, emb_tensor;
  bool json = false, quiet = false, tokens = false;
  double threshold = -1;
  route::FitOptions opt;
  for (std::size_t i = mode == "route" ? 0 : 1; i < args.size(); ++i) {
    const std::string& a = args[i];
    auto value = [&]() -> const std::string& {
      if (i + 1 >= args.size()) throw usage_error(a + " needs a value");
      return args[++i];
    };
    if (a == "-o" || a == "--output") out = value();
    else if (a == "--json") json = true;
    else if (a == "--quiet") quiet = true;
    else if (a == "--tokens") tokens = true;
    else if (a == "--threshold") {
      threshold = parse_number(a, value());
      if (!(threshold >= 0 && threshold <= 1)) throw usage_error("--threshold must be in [0, 1]");
      opt.threshold = threshold;
    } else if (a == "--model") {
      const std::string& m = value();
      if (m == "logistic") opt.model = route::ContextModel::logistic;
      else if (m == "sigmoid") opt.model = route::ContextModel::sigmoid;
      else if (m == "centroid") opt.model = route::ContextModel::centroid;
      else if (m == "naive_bayes") opt.model = route::ContextModel::naive_bayes;
      else throw usage_error("--model must be logistic, sigmoid, centroid or naive_bayes, got '" + m + "'");
    } else if (a == "--ngrams") {
      const std::string& v = value();
      const auto dash = v.find('-');
      const std::string lo = dash == std::string::npos ? v : v.substr(0, dash), hi = dash == std::string::npos ? v : v.substr(dash + 1);
      opt.features.ngram_min = static_cast<unsigned>(parse_count(a, lo));
      opt.features.ngram_max = static_cast<unsigned>(parse_count(a, hi));
    } else if (a == "--buckets") opt.features.buckets = static_cast<std::uint32_t>(parse_count(a, value()));
    else if (a == "--no-words") opt.features.words = false;
    else if (a == "--epochs") opt.epochs = static_cast<unsigned>(parse_count(a, value()));
    else if (a == "--embeddings") emb_file = value();
    else if (a == "--embedding-tensor") emb_tensor = value();
    else if (!a.empty() && a[0] == '-') throw usage_error("route " + (mode == "route" ? std::string() : mode + " ") + ": unknown option '" + a + "'");
    else pos.push_back(a);
  }
  TableHolder table;
  if (!emb_file.empty()) load_table(table, emb_file, emb_tensor);

  if (mode == "fit") {
    if (pos.size() != 1 || out.empty()) throw usage_error("route fit: usage: s2lc route fit EXAMPLES.json -o R.json [options]");
    const auto examples = route::read_examples(pos[0]);
    if (table.get()) opt.features.embed_dim = 1;
    const auto t0 = std::chrono::steady_clock::now();
    const auto r = route::ContextRouter::fit(examples, opt, table.get());
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    r.save(out);
    if (!quiet) {
      std::string mods;
      for (const auto& m : r.modules()) mods += (mods.empty() ? "" : ", ") + m;
      std::fprintf(stderr, "s2lc: fitted a %s context router on %zu examples (%s) in %.3f s; temperature %.3g; wrote %s\n",
                   route::model_name(r.model()), examples.size(), mods.c_str(), secs, r.temperature(), out.c_str());
    }
    return 0;
  }
  if (mode == "eval") {
    if (pos.size() != 2) throw usage_error("route eval: usage: s2lc route eval R.json EXAMPLES.json [--json]");
    const auto r = route::ContextRouter::load(pos[0]);
    const auto examples = route::read_examples(pos[1]);
    const std::size_t M = r.modules().size();
    std::vector<std::size_t> n(M + 1, 0), ok(M + 1, 0);
    std::size_t correct = 0, fallback = 0, unknown = 0;
    double conf = 0;
    constexpr int kBins = 10;
    double bin_conf[kBins] = {}, bin_acc[kBins] = {}, bin_n[kBins] = {};
    for (const auto& e : examples) {
      const auto d = r.route(std::span<const std::uint32_t>(e.symbols), table.get(), threshold);
      std::size_t best = 0;
      for (std::size_t m = 1; m < M; ++m)
        if (d.scores[m] > d.scores[best]) best = m;
      std::size_t truth = M;
      for (std::size_t m = 0; m < M; ++m)
        if (r.modules()[m] == e.domain) truth = m;
      unknown += truth == M;
      const bool hit = best == truth;
      ++n[truth], ok[truth] += hit, correct += hit, fallback += d.fallback, conf += d.confidence;
      const int b = std::min(kBins - 1, static_cast<int>(d.confidence * kBins));
      bin_conf[b] += d.confidence, bin_acc[b] += hit, bin_n[b] += 1;
    }
    double ece = 0;
    for (int b = 0; b < kBins; ++b)
      if (bin_n[b] > 0) ece += std::fabs(bin_acc[b] - bin_conf[b]) / static_cast<double>(examples.size());
    nlohmann::ordered_json j;
    const double N = static_cast<double>(examples.size());
    j["examples"] = examples.size();
    j["accuracy"] = static_cast<double>(correct) / N;
    j["fallback_rate"] = static_cast<double>(fallback) / N;
    j["mean_confidence"] = conf / N;
    j["ece"] = ece;
    j["unknown_domain"] = unknown;
    nlohmann::ordered_json per = nlohmann::ordered_json::object();
    for (std::size_t m = 0; m < M; ++m)
      per[r.modules()[m]] = {{"examples", n[m]}, {"accuracy", n[m] ? static_cast<double>(ok[m]) / static_cast<double>(n[m]) : 0.0}};
    j["per_module"] = per;
    if (json) std::printf("%s\n", j.dump(2).c_str());
    else
      for (auto it = j.begin(); it != j.end(); ++it) std::printf("%-16s %s\n", it.key().c_str(), it.value().dump().c_str());
    return 0;
  }
  if (pos.size() != 1) throw usage_error(kRouteUsage);
  const auto r = route::ContextRouter::load(pos[0]);
  const auto prompt = read_stdin(tokens);
  const auto d = r.route(std::span<const std::uint32_t>(prompt), table.get(), threshold);
  const auto j = decision_json(r, d);
  if (json) std::printf("%s\n", j.dump().c_str());
  else std::printf("%s (confidence %.3f)\n", d.module.c_str(), d.confidence);
  return 0;
}

}  // namespace s2lc::cli
