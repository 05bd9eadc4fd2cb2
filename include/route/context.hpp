// s2lc — the context router: a pre-pass over a prompt that picks a domain module (or weights
// several) before decoding, with a calibrated confidence and a fallback to the base model.
//
//   auto examples = s2lc::route::read_examples("EXAMPLES.json");   // [{"domain", "text"}...]
//   auto router = s2lc::route::ContextRouter::fit(examples);         // C++ only, no external model
//   router.save("R.json");                                           // crash-safe
//   auto d = s2lc::route::ContextRouter::load("R.json").route(prompt_bytes);
//   // d.module ("base" when unsure), d.confidence, d.weights (one per module)
//
// Features: hashed byte (or token id) n-grams, log(1 + count), L2-normalised; and/or the mean of
// the engine's own embedding rows for the prompt's token ids (caller provides the table),
// L2-normalised and scaled by embed_weight. Models: multinomial logistic regression (softmax:
// one module), one-vs-rest logistic regression (sigmoid: several modules at once, Brainstacks'
// meta-router), or nearest centroid (cosine). Confidence is calibrated by temperature scaling on
// a held-out fifth of the examples (every fifth example of each domain; with fewer than 10
// held-out prompts per domain the temperature only softens), then the model is refit on all
// examples. Fitting is deterministic (full-batch Adam from zero).
//
// Serialized as JSON (format "s2lc-context-router"); weights are little-endian f32 in base64,
// so a reloaded router is bit-identical.
#pragma once

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "s2lc/error.hpp"
#include "s2lc/io/mapped_file.hpp"

namespace s2lc::route {

/// One labelled example prompt: bytes (text) or token ids, as symbols.
struct Example {
  std::string domain;
  std::vector<std::uint32_t> symbols;
};

/// The caller's embedding table [vocab, dim] (row per token id), borrowed. The fingerprint
/// (FNV-1a over shape and contents, computed once) ties a fitted router to its table.
struct EmbeddingTable {
  const float* data = nullptr;
  std::size_t vocab = 0, dim = 0;
  std::uint64_t fingerprint = 0;

  static EmbeddingTable of(const float* data, std::size_t vocab, std::size_t dim) {
    if (!data || vocab == 0 || dim == 0) throw invalid_argument("EmbeddingTable: empty table");
    EmbeddingTable t{data, vocab, dim, 0};
    std::uint64_t h = 0xcbf29ce484222325ull;
    auto eat = [&h](const void* p, std::size_t n) {
      const auto* b = static_cast<const unsigned char*>(p);
      for (std::size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 0x100000001b3ull;
    };
    const std::uint64_t shape[2] = {vocab, dim};
    eat(shape, sizeof shape);
    eat(data, vocab * dim * sizeof(float));
    t.fingerprint = h;
    return t;
  }
};

struct FeatureConfig {
  unsigned ngram_min = 1;
  unsigned ngram_max = 4;
  std::uint32_t buckets = 1u << 14;  ///< hashed n-gram space (power of two); 0 disables n-grams
  bool words = true;                  ///< also hash words ([A-Za-z0-9_]+ runs) and word bigrams
  std::size_t embed_dim = 0;          ///< 0: no embedding features
  float embed_weight = 1.0f;
  std::uint64_t table_fingerprint = 0;

  std::size_t dim() const noexcept { return buckets + embed_dim; }
};

enum class ContextModel { logistic, sigmoid, centroid, naive_bayes };

inline const char* model_name(ContextModel m) noexcept {
  switch (m) {
    case ContextModel::logistic: return "logistic";
    case ContextModel::sigmoid: return "sigmoid";
    case ContextModel::centroid: return "centroid";
    case ContextModel::naive_bayes: return "naive_bayes";
  }
  return "?";
}

struct FitOptions {
  ContextModel model = ContextModel::logistic;
  FeatureConfig features;
  unsigned epochs = 4;         ///< passes over the examples (logistic / sigmoid)
  float learning_rate = 0.5f;  ///< AdaGrad step
  float l2 = 1e-6f;            ///< weight decay per example step
  float nb_alpha = 0.1f;       ///< naive Bayes smoothing
  double threshold = 0.5;      ///< below this confidence the router falls back to the base
  bool calibrate = true;       ///< temperature scaling on a held-out fifth
};

/// What the router decided for one prompt.
struct ContextDecision {
  std::string module;              ///< chosen module name, or "base" (fallback)
  double confidence = 0;           ///< calibrated probability of the choice
  bool fallback = false;
  std::vector<double> scores;      ///< calibrated probability per module
  std::vector<double> weights;     ///< mixing weight per module (all 0: run the base alone)
};

namespace detail {

/// Sparse hashed n-gram features plus the dense embedding part, for one prompt.
struct FeatureVector {
  std::vector<std::uint32_t> idx;  ///< sorted, unique, < buckets
  std::vector<float> val;
  std::vector<float> dense;        ///< embed_dim entries (feature index buckets + j)
};

inline std::uint32_t ngram_bucket(const std::uint32_t* s, unsigned n, std::uint32_t buckets) noexcept {
  std::uint64_t h = 0xcbf29ce484222325ull ^ (0x9E3779B97F4A7C15ull * n);
  for (unsigned i = 0; i < n; ++i)
    for (unsigned b = 0; b < 4; ++b) h = (h ^ ((s[i] >> (8 * b)) & 0xFFu)) * 0x100000001b3ull;
  h ^= h >> 29;
  return static_cast<std::uint32_t>(h & (buckets - 1));
}

inline std::uint64_t mix_words(std::uint64_t a, std::uint64_t b) noexcept {
  std::uint64_t h = a * 0x9E3779B97F4A7C15ull ^ b;
  h ^= h >> 29;
  return h * 0xBF58476D1CE4E5B9ull ^ (h >> 32);
}

inline FeatureVector features(std::span<const std::uint32_t> s, const FeatureConfig& f, const EmbeddingTable* table) {
  FeatureVector v;
  if (f.buckets) {
    std::vector<std::uint32_t> all;
    for (unsigned n = f.ngram_min; n <= f.ngram_max; ++n)
      for (std::size_t i = 0; i + n <= s.size(); ++i) all.push_back(ngram_bucket(s.data() + i, n, f.buckets));
    if (f.words) {
      auto is_word = [](std::uint32_t c) { return (c >= '0' && c <= '9') || (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || c == '_'; };
      std::uint64_t prev = 0;
      for (std::size_t i = 0; i < s.size();) {
        if (!is_word(s[i])) { ++i; continue; }
        std::uint64_t h = 0x84222325cbf29ce4ull;
        std::size_t j = i;
        for (; j < s.size() && is_word(s[j]); ++j) h = (h ^ s[j]) * 0x100000001b3ull;
        h ^= h >> 31;
        all.push_back(static_cast<std::uint32_t>(h & (f.buckets - 1)));
        if (prev) all.push_back(static_cast<std::uint32_t>(mix_words(prev, h) & (f.buckets - 1)));
        prev = h;
        i = j;
      }
    }
    std::sort(all.begin(), all.end());
    double norm = 0;
    for (std::size_t i = 0; i < all.size();) {
      std::size_t j = i;
      while (j < all.size() && all[j] == all[i]) ++j;
      const float x = std::log1p(static_cast<float>(j - i));
      v.idx.push_back(all[i]);
      v.val.push_back(x);
      norm += static_cast<double>(x) * x;
      i = j;
    }
    if (norm > 0) {
      const float inv = static_cast<float>(1.0 / std::sqrt(norm));
      for (auto& x : v.val) x *= inv;
    }
  }
  if (f.embed_dim) {
    if (!table || !table->data) throw invalid_argument("context router: this router uses embeddings; pass the embedding table");
    if (table->dim != f.embed_dim || table->fingerprint != f.table_fingerprint)
      throw invalid_argument("context router: the embedding table differs from the one the router was fitted with (dim " +
                             std::to_string(table->dim) + " vs " + std::to_string(f.embed_dim) + ", or different contents)");
    std::vector<double> acc(f.embed_dim, 0.0);
    for (std::uint32_t t : s) {
      if (t >= table->vocab)
        throw invalid_argument("context router: token id " + std::to_string(t) + " outside the embedding table (" +
                               std::to_string(table->vocab) + " rows)");
      const float* row = table->data + static_cast<std::size_t>(t) * table->dim;
      for (std::size_t j = 0; j < f.embed_dim; ++j) acc[j] += row[j];
    }
    double norm = 0;
    for (double a : acc) norm += a * a;
    const double mul = norm > 0 ? f.embed_weight / std::sqrt(norm) : 0.0;
    v.dense.resize(f.embed_dim);
    for (std::size_t j = 0; j < f.embed_dim; ++j) v.dense[j] = static_cast<float>(acc[j] * mul);
  }
  return v;
}

/// s[m] = W[m, :] . x + b[m] for every class m.
inline void scores(const std::vector<float>& W, const std::vector<float>& b, std::size_t D, std::size_t buckets, const FeatureVector& x,
                   double* s) {
  for (std::size_t m = 0; m < b.size(); ++m) {
    const float* w = W.data() + m * D;
    double a = b[m];
    for (std::size_t i = 0; i < x.idx.size(); ++i) a += static_cast<double>(w[x.idx[i]]) * x.val[i];
    for (std::size_t j = 0; j < x.dense.size(); ++j) a += static_cast<double>(w[buckets + j]) * x.dense[j];
    s[m] = a;
  }
}

/// Calibrated probabilities from raw scores: softmax(s / T) or sigmoid(s / T).
inline void probabilities(const double* s, std::size_t M, double T, bool sigmoid, double* p) {
  if (sigmoid) {
    for (std::size_t m = 0; m < M; ++m) p[m] = 1.0 / (1.0 + std::exp(-s[m] / T));
    return;
  }
  double mx = -std::numeric_limits<double>::infinity(), z = 0;
  for (std::size_t m = 0; m < M; ++m) mx = std::max(mx, s[m] / T);
  for (std::size_t m = 0; m < M; ++m) z += p[m] = std::exp(s[m] / T - mx);
  for (std::size_t m = 0; m < M; ++m) p[m] /= z;
}

inline constexpr char kB64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Little-endian f32 as base64.
inline std::string floats_to_base64(const std::vector<float>& v) {
  std::string bytes(v.size() * 4, '\0');
  for (std::size_t i = 0; i < v.size(); ++i) {
    const std::uint32_t u = std::bit_cast<std::uint32_t>(v[i]);
    for (int b = 0; b < 4; ++b) bytes[i * 4 + static_cast<std::size_t>(b)] = static_cast<char>((u >> (8 * b)) & 0xFFu);
  }
  std::string out;
  out.reserve((bytes.size() + 2) / 3 * 4);
  for (std::size_t i = 0; i < bytes.size(); i += 3) {
    const std::size_t n = std::min<std::size_t>(3, bytes.size() - i);
    std::uint32_t w = 0;
    for (std::size_t k = 0; k < 3; ++k) w = w << 8 | (k < n ? static_cast<unsigned char>(bytes[i + k]) : 0u);
    for (std::size_t k = 0; k < 4; ++k) out.push_back(k <= n ? kB64[(w >> (18 - 6 * k)) & 63u] : '=');
  }
  return out;
}

/// Inverse of floats_to_base64; throws format_error (naming `where`) on bad characters or length.
inline std::vector<float> base64_to_floats(const std::string& s, std::size_t expect, const error_location& where) {
  auto val = [](char c) -> int {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
  };
  if (s.size() % 4 != 0) throw format_error("base64 length " + std::to_string(s.size()) + " is not a multiple of 4", where);
  std::string bytes;
  bytes.reserve(s.size() / 4 * 3);
  for (std::size_t i = 0; i < s.size(); i += 4) {
    std::uint32_t w = 0;
    int pad = 0;
    for (std::size_t k = 0; k < 4; ++k) {
      const char c = s[i + k];
      if (c == '=' && i + 4 == s.size() && k >= 2) {
        ++pad;
        w <<= 6;
        continue;
      }
      const int x = val(c);
      if (x < 0 || pad) throw format_error("bad base64 character at position " + std::to_string(i + k), where);
      w = w << 6 | static_cast<std::uint32_t>(x);
    }
    for (int k = 0; k < 3 - pad; ++k) bytes.push_back(static_cast<char>((w >> (16 - 8 * k)) & 0xFFu));
  }
  if (bytes.size() != expect * 4)
    throw format_error("expected " + std::to_string(expect) + " f32 values, found " + std::to_string(bytes.size()) + " bytes", where);
  std::vector<float> out(expect);
  for (std::size_t i = 0; i < expect; ++i) {
    std::uint32_t u = 0;
    for (int b = 0; b < 4; ++b) u |= static_cast<std::uint32_t>(static_cast<unsigned char>(bytes[i * 4 + static_cast<std::size_t>(b)])) << (8 * b);
    out[i] = std::bit_cast<float>(u);
    if (!std::isfinite(out[i])) throw format_error("value " + std::to_string(i) + " is not finite", where);
  }
  return out;
}

inline std::string read_text_file(const std::filesystem::path& path) {
  io::MappedFile f(path);
  return std::string(reinterpret_cast<const char*>(f.data()), f.size());
}

inline nlohmann::json parse_json(const std::string& text, const std::string& file) {
  try {
    return nlohmann::json::parse(text);
  } catch (const nlohmann::json::parse_error& e) {
    std::string msg = e.what();
    if (const auto p = msg.find("parse error"); p != std::string::npos) msg = msg.substr(p);
    throw format_error("invalid JSON: " + msg, {file, {}, e.byte > 0 ? std::optional<std::uint64_t>(e.byte - 1) : std::nullopt});
  } catch (const nlohmann::json::exception& e) {  // e.g. out_of_range 406: a number too large for a double
    throw format_error(std::string("invalid JSON: ") + e.what(), {file, {}, {}});
  }
}

}  // namespace detail

/// Text as symbols (one per byte).
inline std::vector<std::uint32_t> bytes_to_symbols(std::string_view text) {
  std::vector<std::uint32_t> s(text.size());
  for (std::size_t i = 0; i < text.size(); ++i) s[i] = static_cast<unsigned char>(text[i]);
  return s;
}

/// Parses EXAMPLES.json: a list of {"domain": name, "text": prompt} (or "tokens": [ids] instead of
/// "text"). Every malformed input is rejected naming the file, the element and the key.
inline std::vector<Example> parse_examples(const std::string& json_text, const std::string& file = "EXAMPLES.json") {
  const nlohmann::json j = detail::parse_json(json_text, file);
  if (!j.is_array()) throw format_error("expected a JSON array of {\"domain\": ..., \"text\": ...} objects, found " + std::string(j.type_name()), {file, {}, {}});
  std::vector<Example> out;
  out.reserve(j.size());
  for (std::size_t i = 0; i < j.size(); ++i) {
    const auto& e = j[i];
    const std::string at = "element " + std::to_string(i);
    auto bad = [&](const std::string& what) { throw format_error(at + ": " + what, {file, {}, {}}); };
    if (!e.is_object()) bad("expected an object, found " + std::string(e.type_name()));
    const auto d = e.find("domain");
    if (d == e.end()) bad("missing \"domain\"");
    if (!d->is_string()) bad("\"domain\" must be a string, found " + std::string(d->type_name()));
    Example ex;
    ex.domain = d->get<std::string>();
    if (ex.domain.empty()) bad("\"domain\" is empty");
    const auto t = e.find("text");
    const auto k = e.find("tokens");
    if (t != e.end() && k != e.end()) bad("has both \"text\" and \"tokens\"");
    if (t != e.end()) {
      if (!t->is_string()) bad("\"text\" must be a string, found " + std::string(t->type_name()));
      ex.symbols = bytes_to_symbols(t->get_ref<const std::string&>());
    } else if (k != e.end()) {
      if (!k->is_array()) bad("\"tokens\" must be an array of token ids");
      for (std::size_t q = 0; q < k->size(); ++q) {
        const auto& v = (*k)[q];
        if (!v.is_number_unsigned() || v.get<std::uint64_t>() > 0xFFFFFFFFull)
          bad("\"tokens\"[" + std::to_string(q) + "] is not a token id (unsigned 32-bit integer)");
        ex.symbols.push_back(static_cast<std::uint32_t>(v.get<std::uint64_t>()));
      }
    } else {
      bad("missing \"text\" (or \"tokens\")");
    }
    if (ex.symbols.empty()) bad("the prompt is empty");
    out.push_back(std::move(ex));
  }
  if (out.empty()) throw format_error("no examples", {file, {}, {}});
  return out;
}

inline std::vector<Example> read_examples(const std::filesystem::path& path) {
  return parse_examples(detail::read_text_file(path), path.string());
}

class ContextRouter {
 public:
  static constexpr const char* kFormat = "s2lc-context-router";
  static constexpr int kVersion = 1;

  /// Fits a router from labelled examples (at least two domains). Modules are named by domain,
  /// in order of first appearance. `table` is required when features.embed_dim > 0 (it is set
  /// from the table: pass embed_dim = 1 to ask for embeddings).
  static ContextRouter fit(const std::vector<Example>& examples, FitOptions opt = {}, const EmbeddingTable* table = nullptr) {
    auto& f = opt.features;
    if (f.buckets && (f.buckets & (f.buckets - 1)) != 0) throw invalid_argument("context router: buckets must be a power of two");
    if (f.buckets && (f.ngram_min == 0 || f.ngram_max < f.ngram_min || f.ngram_max > 16))
      throw invalid_argument("context router: need 1 <= ngram_min <= ngram_max <= 16");
    if (f.embed_dim) {
      if (!table || !table->data) throw invalid_argument("context router: embedding features need the embedding table");
      f.embed_dim = table->dim;
      f.table_fingerprint = table->fingerprint;
    }
    if (f.dim() == 0) throw invalid_argument("context router: no features (n-grams disabled and no embeddings)");
    if (!(opt.threshold >= 0.0 && opt.threshold <= 1.0)) throw invalid_argument("context router: threshold must be in [0, 1]");
    ContextRouter r;
    r.features_ = f;
    r.model_ = opt.model;
    r.threshold_ = opt.threshold;
    std::vector<std::size_t> label(examples.size());
    for (std::size_t i = 0; i < examples.size(); ++i) {
      auto it = std::find(r.modules_.begin(), r.modules_.end(), examples[i].domain);
      if (it == r.modules_.end()) {
        r.modules_.push_back(examples[i].domain);
        it = r.modules_.end() - 1;
      }
      label[i] = static_cast<std::size_t>(it - r.modules_.begin());
    }
    if (r.modules_.size() < 2) throw invalid_argument("context router: the examples name only one domain ('" + r.modules_[0] + "'); need two or more");
    std::vector<detail::FeatureVector> X;
    X.reserve(examples.size());
    for (const auto& e : examples) X.push_back(detail::features(e.symbols, f, table));

    // Calibration: fit on four fifths, choose the temperature on the rest (every fifth example of
    // each domain), then refit on everything.
    std::vector<std::size_t> seen(r.modules_.size(), 0), train, held;
    for (std::size_t i = 0; i < X.size(); ++i) (seen[label[i]]++ % 5 == 4 ? held : train).push_back(i);
    r.temperature_ = 1.0;
    r.calibrated_ = false;
    if (opt.calibrate && !held.empty() && held.size() >= r.modules_.size()) {
      r.train(X, label, train, opt);
      r.temperature_ = r.fit_temperature(X, label, held);
      // A handful of held-out prompts, all classified right, would drive T to 0 (certainty):
      // with fewer than 10 per domain the temperature may only soften.
      if (held.size() < 10 * r.modules_.size()) r.temperature_ = std::max(r.temperature_, 1.0);
      r.calibrated_ = true;
    }
    std::vector<std::size_t> all(X.size());
    for (std::size_t i = 0; i < all.size(); ++i) all[i] = i;
    r.train(X, label, all, opt);
    return r;
  }

  /// Routes a prompt given as symbols (bytes or token ids). threshold < 0: the fitted one.
  ContextDecision route(std::span<const std::uint32_t> prompt, const EmbeddingTable* table = nullptr, double threshold = -1.0) const {
    const auto x = detail::features(prompt, features_, table);
    const std::size_t M = modules_.size();
    std::vector<double> s(M);
    detail::scores(W_, b_, features_.dim(), features_.buckets, x, s.data());
    ContextDecision d;
    d.scores.resize(M);
    detail::probabilities(s.data(), M, temperature_, model_ == ContextModel::sigmoid, d.scores.data());
    const double th = threshold < 0 ? threshold_ : threshold;
    std::size_t best = 0;
    for (std::size_t m = 1; m < M; ++m)
      if (d.scores[m] > d.scores[best]) best = m;
    d.confidence = d.scores[best];
    d.fallback = d.confidence < th;
    d.module = d.fallback ? "base" : modules_[best];
    d.weights.assign(M, 0.0);
    if (model_ == ContextModel::sigmoid) {
      for (std::size_t m = 0; m < M; ++m) d.weights[m] = d.scores[m] >= th ? d.scores[m] : 0.0;
    } else if (!d.fallback) {
      d.weights = d.scores;
    }
    return d;
  }
  ContextDecision route(std::string_view text, const EmbeddingTable* table = nullptr, double threshold = -1.0) const {
    const auto s = bytes_to_symbols(text);
    return route(std::span<const std::uint32_t>(s), table, threshold);
  }

  const std::vector<std::string>& modules() const noexcept { return modules_; }
  const FeatureConfig& features() const noexcept { return features_; }
  ContextModel model() const noexcept { return model_; }
  double temperature() const noexcept { return temperature_; }
  double threshold() const noexcept { return threshold_; }
  bool calibrated() const noexcept { return calibrated_; }

  nlohmann::json to_json() const {
    nlohmann::json j;
    j["format"] = kFormat;
    j["version"] = kVersion;
    j["model"] = model_name(model_);
    j["modules"] = modules_;
    j["features"] = {{"ngram_min", features_.ngram_min},
                     {"ngram_max", features_.ngram_max},
                     {"buckets", features_.buckets},
                     {"embed_dim", features_.embed_dim},
                     {"embed_weight", features_.embed_weight},
                     {"table_fingerprint", features_.table_fingerprint}};
    j["temperature"] = temperature_;
    j["calibrated"] = calibrated_;
    j["threshold"] = threshold_;
    j["weights_f32le"] = detail::floats_to_base64(W_);
    j["bias_f32le"] = detail::floats_to_base64(b_);
    return j;
  }

  /// Reads a router written by to_json; every missing or malformed key is named.
  static ContextRouter from_json(const nlohmann::json& j, const std::string& file = "router.json") {
    auto where = [&](const std::string& key) { return error_location{file, key, {}}; };
    if (!j.is_object()) throw format_error("expected a JSON object", {file, {}, {}});
    auto get = [&](const nlohmann::json& o, const char* key, nlohmann::json::value_t type, const std::string& path) -> const nlohmann::json& {
      const auto it = o.find(key);
      if (it == o.end()) throw format_error("missing key", where(path));
      const bool ok = type == nlohmann::json::value_t::number_float ? it->is_number()
                      : type == nlohmann::json::value_t::number_unsigned ? (it->is_number_integer() && it->get<std::int64_t>() >= 0)
                                                                         : it->type() == type;
      if (!ok) throw format_error("wrong type (" + std::string(it->type_name()) + ")", where(path));
      return *it;
    };
    using vt = nlohmann::json::value_t;
    if (get(j, "format", vt::string, "format").get<std::string>() != kFormat)
      throw format_error("not an s2lc context router (format is not '" + std::string(kFormat) + "')", where("format"));
    if (get(j, "version", vt::number_unsigned, "version").get<int>() != kVersion)
      throw format_error("unsupported version (this build reads " + std::to_string(kVersion) + ")", where("version"));
    ContextRouter r;
    const std::string model = get(j, "model", vt::string, "model").get<std::string>();
    if (model == "logistic") r.model_ = ContextModel::logistic;
    else if (model == "sigmoid") r.model_ = ContextModel::sigmoid;
    else if (model == "centroid") r.model_ = ContextModel::centroid;
    else if (model == "naive_bayes") r.model_ = ContextModel::naive_bayes;
    else throw format_error("unknown model '" + model + "'", where("model"));
    const auto& mods = get(j, "modules", vt::array, "modules");
    for (const auto& m : mods) {
      if (!m.is_string() || m.get<std::string>().empty()) throw format_error("module names must be non-empty strings", where("modules"));
      if (std::find(r.modules_.begin(), r.modules_.end(), m.get<std::string>()) != r.modules_.end())
        throw format_error("module '" + m.get<std::string>() + "' appears twice", where("modules"));
      r.modules_.push_back(m.get<std::string>());
    }
    if (r.modules_.size() < 2) throw format_error("need at least two modules", where("modules"));
    const auto& f = get(j, "features", vt::object, "features");
    auto& F = r.features_;
    F.ngram_min = get(f, "ngram_min", vt::number_unsigned, "features.ngram_min").get<unsigned>();
    F.ngram_max = get(f, "ngram_max", vt::number_unsigned, "features.ngram_max").get<unsigned>();
    const auto buckets = get(f, "buckets", vt::number_unsigned, "features.buckets").get<std::uint64_t>();
    if (buckets > (1ull << 28) || (buckets & (buckets - 1)) != 0) throw format_error("buckets must be a power of two <= 2^28", where("features.buckets"));
    F.buckets = static_cast<std::uint32_t>(buckets);
    if (F.buckets && (F.ngram_min == 0 || F.ngram_max < F.ngram_min || F.ngram_max > 16))
      throw format_error("need 1 <= ngram_min <= ngram_max <= 16", where("features.ngram_max"));
    F.embed_dim = get(f, "embed_dim", vt::number_unsigned, "features.embed_dim").get<std::size_t>();
    if (F.embed_dim > (1u << 20)) throw format_error("embed_dim too large", where("features.embed_dim"));
    F.embed_weight = get(f, "embed_weight", vt::number_float, "features.embed_weight").get<float>();
    F.table_fingerprint = get(f, "table_fingerprint", vt::number_unsigned, "features.table_fingerprint").get<std::uint64_t>();
    if (F.dim() == 0) throw format_error("no features", where("features"));
    r.temperature_ = get(j, "temperature", vt::number_float, "temperature").get<double>();
    if (!(r.temperature_ > 0) || !std::isfinite(r.temperature_)) throw format_error("temperature must be positive", where("temperature"));
    r.calibrated_ = get(j, "calibrated", vt::boolean, "calibrated").get<bool>();
    r.threshold_ = get(j, "threshold", vt::number_float, "threshold").get<double>();
    if (!(r.threshold_ >= 0.0 && r.threshold_ <= 1.0)) throw format_error("threshold must be in [0, 1]", where("threshold"));
    const std::size_t M = r.modules_.size();
    r.W_ = detail::base64_to_floats(get(j, "weights_f32le", vt::string, "weights_f32le").get<std::string>(), M * F.dim(), where("weights_f32le"));
    r.b_ = detail::base64_to_floats(get(j, "bias_f32le", vt::string, "bias_f32le").get<std::string>(), M, where("bias_f32le"));
    return r;
  }

  /// Writes the router as JSON, crash-safely (temp file, fsync, rename).
  void save(const std::filesystem::path& path) const {
    const std::string text = to_json().dump(1) + "\n";
    io::write_atomically(path, [&](io::FileSink& out) { out.write(text.data(), text.size()); });
  }
  static ContextRouter load(const std::filesystem::path& path) {
    const std::string file = path.string();
    return from_json(detail::parse_json(detail::read_text_file(path), file), file);
  }

  friend bool operator==(const ContextRouter& a, const ContextRouter& b) {
    auto bits = [](const std::vector<float>& v) {
      std::vector<std::uint32_t> u(v.size());
      std::memcpy(u.data(), v.data(), v.size() * 4);
      return u;
    };
    return a.modules_ == b.modules_ && a.model_ == b.model_ && a.features_.ngram_min == b.features_.ngram_min &&
           a.features_.ngram_max == b.features_.ngram_max && a.features_.buckets == b.features_.buckets &&
           a.features_.embed_dim == b.features_.embed_dim && a.features_.embed_weight == b.features_.embed_weight &&
           a.features_.table_fingerprint == b.features_.table_fingerprint && a.temperature_ == b.temperature_ &&
           a.threshold_ == b.threshold_ && a.calibrated_ == b.calibrated_ && bits(a.W_) == bits(b.W_) && bits(a.b_) == bits(b.b_);
  }

 private:
  void train(const std::vector<detail::FeatureVector>& X, const std::vector<std::size_t>& label, const std::vector<std::size_t>& use,
             const FitOptions& opt) {
    const std::size_t M = modules_.size(), D = features_.dim(), B = features_.buckets;
    W_.assign(M * D, 0.0f);
    b_.assign(M, 0.0f);
    // Class weights: every domain counts equally whatever its number of examples.
    std::vector<double> count(M, 0.0);
    for (auto i : use) count[label[i]] += 1;
    std::vector<double> cw(M);
    for (std::size_t m = 0; m < M; ++m) cw[m] = count[m] > 0 ? static_cast<double>(use.size()) / (static_cast<double>(M) * count[m]) : 0.0;

    if (model_ == ContextModel::centroid || model_ == ContextModel::naive_bayes) {
      std::vector<double> c(M * D, 0.0);
      for (auto i : use) {
        double* cm = c.data() + label[i] * D;
        for (std::size_t q = 0; q < X[i].idx.size(); ++q) cm[X[i].idx[q]] += X[i].val[q];
        for (std::size_t q = 0; q < X[i].dense.size(); ++q) cm[B + q] += X[i].dense[q];
      }
      if (model_ == ContextModel::naive_bayes) {
        // Multinomial naive Bayes over the normalised term frequencies (Rennie et al. 2003),
        // Laplace-smoothed with alpha; uniform class prior (domains count equally).
        const double alpha = static_cast<double>(opt.nb_alpha);
        for (std::size_t m = 0; m < M; ++m) {
          double tot = 0;
          for (std::size_t q = 0; q < D; ++q) tot += std::max(c[m * D + q], 0.0);
          const double den = std::log(tot + alpha * static_cast<double>(D));
          for (std::size_t q = 0; q < D; ++q) W_[m * D + q] = static_cast<float>(std::log(std::max(c[m * D + q], 0.0) + alpha) - den);
        }
        return;
      }
      for (std::size_t m = 0; m < M; ++m) {
        double n = 0;
        for (std::size_t q = 0; q < D; ++q) n += c[m * D + q] * c[m * D + q];
        const double inv = n > 0 ? 1.0 / std::sqrt(n) : 0.0;
        for (std::size_t q = 0; q < D; ++q) W_[m * D + q] = static_cast<float>(c[m * D + q] * inv);
      }
      return;
    }
    // Logistic regression by per-example AdaGrad (sparse updates), examples visited in a fixed
    // pseudo-random order (splitmix64 Fisher-Yates: the same on every platform).
    const bool sig = model_ == ContextModel::sigmoid;
    std::vector<float> hW(M * D, 0.0f);
    std::vector<double> hb(M, 0.0), s(M), p(M);
    std::vector<std::size_t> order = use;
    std::uint64_t rng = 0x5eed;
    const double lr = static_cast<double>(opt.learning_rate), decay = static_cast<double>(opt.l2);
    for (unsigned ep = 0; ep < opt.epochs; ++ep) {
      for (std::size_t i = order.size(); i > 1; --i) {
        rng += 0x9E3779B97F4A7C15ull;
        std::uint64_t z = rng;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        std::swap(order[i - 1], order[(z ^ (z >> 31)) % i]);
      }
      for (auto i : order) {
        const auto& x = X[i];
        detail::scores(W_, b_, D, B, x, s.data());
        detail::probabilities(s.data(), M, 1.0, sig, p.data());
        for (std::size_t m = 0; m < M; ++m) {
          const double g = (p[m] - (m == label[i] ? 1.0 : 0.0)) * cw[label[i]];
          float* w = W_.data() + m * D;
          float* h = hW.data() + m * D;
          auto step = [&](std::size_t q, double gq) {
            gq += decay * w[q];
            h[q] += static_cast<float>(gq * gq);
            w[q] -= static_cast<float>(lr * gq / (std::sqrt(static_cast<double>(h[q])) + 1e-8));
          };
          for (std::size_t q = 0; q < x.idx.size(); ++q) step(x.idx[q], g * x.val[q]);
          for (std::size_t q = 0; q < x.dense.size(); ++q) step(B + q, g * x.dense[q]);
          hb[m] += g * g;
          b_[m] -= static_cast<float>(lr * g / (std::sqrt(hb[m]) + 1e-8));
        }
      }
    }
  }

  /// The temperature minimising the held-out negative log-likelihood (golden-section search on
  /// log T in [-7, 7]).
  double fit_temperature(const std::vector<detail::FeatureVector>& X, const std::vector<std::size_t>& label,
                         const std::vector<std::size_t>& held) const {
    const std::size_t M = modules_.size();
    const bool sig = model_ == ContextModel::sigmoid;
    std::vector<double> S(held.size() * M);
    for (std::size_t h = 0; h < held.size(); ++h) detail::scores(W_, b_, features_.dim(), features_.buckets, X[held[h]], S.data() + h * M);
    auto nll = [&](double logT) {
      const double T = std::exp(logT);
      std::vector<double> p(M);
      double l = 0;
      for (std::size_t h = 0; h < held.size(); ++h) {
        detail::probabilities(S.data() + h * M, M, T, sig, p.data());
        for (std::size_t m = 0; m < M; ++m) {
          const bool y = m == label[held[h]];
          if (sig) l -= std::log(std::max(y ? p[m] : 1.0 - p[m], 1e-300));
          else if (y) l -= std::log(std::max(p[m], 1e-300));
        }
      }
      return l;
    };
    double a = -7.0, b = 7.0;
    const double gr = (std::sqrt(5.0) - 1.0) / 2.0;
    double c = b - gr * (b - a), d = a + gr * (b - a), fc = nll(c), fd = nll(d);
    for (int i = 0; i < 60; ++i) {
      if (fc <= fd) {
        b = d, d = c, fd = fc;
        c = b - gr * (b - a);
        fc = nll(c);
      } else {
        a = c, c = d, fc = fd;
        d = a + gr * (b - a);
        fd = nll(d);
      }
    }
    return std::exp((a + b) / 2.0);
  }

  std::vector<std::string> modules_;
  FeatureConfig features_;
  ContextModel model_ = ContextModel::logistic;
  double temperature_ = 1.0;
  double threshold_ = 0.5;
  bool calibrated_ = false;
  std::vector<float> W_;  ///< [modules, features.dim()]
  std::vector<float> b_;  ///< [modules]
};

}  // namespace s2lc::route
