// The context router (include/route/context.hpp): every model fits and routes its own training
// prompts; the serialized form (file and JSON) reloads bit-identically and re-serializes to the
// same text; the fallback threshold and the multi-label weights behave as documented; the
// embedding-table features need the same table; malformed EXAMPLES.json and malformed router
// files are rejected naming the file, element and key. (Accuracy on real held-out prompts:
// tests/route/tinymoe.cpp.)
#include <doctest/doctest.h>

#include "support.hpp"

#include <route/context.hpp>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

// The suite's own scope: the suites compile in unity groups (tests/CMakeLists.txt).
namespace suite_route_context {

namespace {

namespace rt = s2lc::route;

std::vector<rt::Example> examples() { return rt::read_examples(s2lc::test::data_dir() / "route-examples.json"); }

void check_rejects(const std::string& json, const std::string& what) {
  CAPTURE(json);
  CHECK_THROWS_WITH_AS(rt::parse_examples(json, "ex.json"), doctest::Contains(what.c_str()), s2lc::format_error);
}

void check_router_rejects(const nlohmann::json& j, const std::string& what) {
  CAPTURE(what);
  CHECK_THROWS_WITH_AS(rt::ContextRouter::from_json(j, "r.json"), doctest::Contains(what.c_str()), s2lc::format_error);
}

}  // namespace

TEST_CASE("route: every context model learns its training prompts and reloads bit-identically") {
  const auto ex = examples();
  REQUIRE(ex.size() == 18);
  s2lc::test::TempDir dir;
  for (auto model : {rt::ContextModel::logistic, rt::ContextModel::sigmoid, rt::ContextModel::centroid, rt::ContextModel::naive_bayes}) {
    CAPTURE(rt::model_name(model));
    rt::FitOptions o;
    o.model = model;
    o.epochs = 20;
    o.threshold = 0.0;
    const auto r = rt::ContextRouter::fit(ex, o);
    CHECK(r.modules() == std::vector<std::string>{"c", "py", "en"});
    CHECK(r.calibrated());
    std::size_t ok = 0;
    for (const auto& e : ex) ok += r.route(std::span<const std::uint32_t>(e.symbols)).module == e.domain;
    CHECK(ok >= 17);

    const auto path = dir.path() / (std::string(rt::model_name(model)) + ".json");
    r.save(path);
    const auto back = rt::ContextRouter::load(path);
    CHECK(back == r);
    CHECK(back.to_json().dump() == r.to_json().dump());
    for (const auto& e : ex) {
      const auto a = r.route(std::span<const std::uint32_t>(e.symbols)), b = back.route(std::span<const std::uint32_t>(e.symbols));
      CHECK(a.module == b.module);
      CHECK(a.confidence == b.confidence);
      CHECK(a.scores == b.scores);
      CHECK(a.weights == b.weights);
    }
    // Fitting is deterministic.
    CHECK(rt::ContextRouter::fit(ex, o) == r);
  }
}

TEST_CASE("route: context decisions follow the threshold (base fallback, zero weights) and multi-label weights") {
  const auto ex = examples();
  const auto r = rt::ContextRouter::fit(ex);
  const std::string prompt = "int main(void) { return 0; }";
  const auto d = r.route(prompt, nullptr, 0.0);
  CHECK_FALSE(d.fallback);
  double sum = 0;
  for (std::size_t m = 0; m < 3; ++m) {
    sum += d.weights[m];
    CHECK(d.weights[m] == d.scores[m]);
  }
  CHECK(std::fabs(sum - 1.0) < 1e-12);
  CHECK(d.confidence == *std::max_element(d.scores.begin(), d.scores.end()));
  const auto vague = r.route("x = 1", nullptr, 0.0);
  REQUIRE(vague.confidence < 1.0);
  const auto sure = r.route("x = 1", nullptr, 1.0);  // below the threshold: the base, no weights
  CHECK(sure.fallback);
  CHECK(sure.module == "base");
  CHECK(sure.confidence == vague.confidence);
  CHECK(sure.scores == vague.scores);
  for (double w : sure.weights) CHECK(w == 0.0);

  rt::FitOptions o;
  o.model = rt::ContextModel::sigmoid;
  o.threshold = 0.3;
  const auto s = rt::ContextRouter::fit(ex, o);
  const auto m = s.route(prompt);
  for (std::size_t i = 0; i < 3; ++i) CHECK(m.weights[i] == (m.scores[i] >= 0.3 ? m.scores[i] : 0.0));
}

TEST_CASE("route: embedding features use the caller's table and refuse a different one") {
  std::vector<float> table(256 * 16);
  std::mt19937 rng(7);
  std::normal_distribution<float> n(0.0f, 1.0f);
  for (auto& v : table) v = n(rng);
  const auto T = rt::EmbeddingTable::of(table.data(), 256, 16);
  rt::FitOptions o;
  o.features.buckets = 0;  // embeddings only
  o.features.embed_dim = 1;
  o.epochs = 30;
  o.threshold = 0;
  const auto ex = examples();
  const auto r = rt::ContextRouter::fit(ex, o, &T);
  CHECK(r.features().embed_dim == 16);
  CHECK(r.features().table_fingerprint == T.fingerprint);
  std::size_t ok = 0;
  for (const auto& e : ex) ok += r.route(std::span<const std::uint32_t>(e.symbols), &T).module == e.domain;
  CHECK(ok >= 12);  // a random table still separates these prompts far above chance (6)
  CHECK_THROWS_WITH_AS(r.route("x"), doctest::Contains("pass the embedding table"), s2lc::invalid_argument);
  auto other = table;
  other[5] += 1.0f;
  const auto T2 = rt::EmbeddingTable::of(other.data(), 256, 16);
  CHECK_THROWS_WITH_AS(r.route("x", &T2), doctest::Contains("differs from the one the router was fitted with"), s2lc::invalid_argument);
  const std::vector<std::uint32_t> far = {3, 300};
  CHECK_THROWS_WITH_AS(r.route(std::span<const std::uint32_t>(far), &T), doctest::Contains("token id 300 outside the embedding table (256 rows)"),
                       s2lc::invalid_argument);
  const auto back = rt::ContextRouter::from_json(r.to_json());
  CHECK(back == r);
}

TEST_CASE("route: malformed EXAMPLES.json is rejected with the file, element and key") {
  check_rejects("[{\"domain\": \"c\", \"text\": \"x\"}", "file 'ex.json', byte offset");
  check_rejects("", "invalid JSON");
  check_rejects("{\"domain\": \"c\"}", "expected a JSON array");
  check_rejects("[]", "no examples");
  check_rejects("[3]", "element 0: expected an object, found number");
  check_rejects("[{\"text\": \"x\"}]", "element 0: missing \"domain\"");
  check_rejects("[{\"domain\": 1, \"text\": \"x\"}]", "element 0: \"domain\" must be a string");
  check_rejects("[{\"domain\": \"\", \"text\": \"x\"}]", "element 0: \"domain\" is empty");
  check_rejects("[{\"domain\": \"c\", \"text\": \"x\"}, {\"domain\": \"py\"}]", "element 1: missing \"text\"");
  check_rejects("[{\"domain\": \"c\", \"text\": [1]}]", "\"text\" must be a string, found array");
  check_rejects("[{\"domain\": \"c\", \"text\": \"\"}]", "the prompt is empty");
  check_rejects("[{\"domain\": \"c\", \"text\": \"a\", \"tokens\": [1]}]", "both \"text\" and \"tokens\"");
  check_rejects("[{\"domain\": \"c\", \"tokens\": [1, -2]}]", "\"tokens\"[1] is not a token id");
  check_rejects("[{\"domain\": \"c\", \"tokens\": \"12\"}]", "\"tokens\" must be an array");
  CHECK_THROWS_WITH_AS(rt::read_examples("/nonexistent/ex.json"), doctest::Contains("cannot open"), s2lc::io_error);
  // Well-formed but unusable: one domain only.
  const auto one = rt::parse_examples("[{\"domain\": \"c\", \"text\": \"x\"}, {\"domain\": \"c\", \"tokens\": [7, 8]}]");
  CHECK(one[1].symbols == std::vector<std::uint32_t>{7, 8});
  CHECK_THROWS_WITH_AS(rt::ContextRouter::fit(one), doctest::Contains("only one domain ('c')"), s2lc::invalid_argument);
}

TEST_CASE("route: malformed router files are rejected naming the key, and a failed save leaves nothing behind") {
  const auto r = rt::ContextRouter::fit(examples());
  const auto good = r.to_json();
  auto with = [&](const char* key, nlohmann::json v) {
    auto j = good;
    j[key] = std::move(v);
    return j;
  };
  auto without = [&](const char* key) {
    auto j = good;
    j.erase(key);
    return j;
  };
  check_router_rejects(nlohmann::json::array(), "expected a JSON object");
  check_router_rejects(with("format", "other"), "tensor 'format': not an s2lc context router");
  check_router_rejects(with("version", 9), "unsupported version");
  check_router_rejects(without("modules"), "tensor 'modules': missing key");
  check_router_rejects(with("modules", {"c", "c", "en"}), "appears twice");
  check_router_rejects(with("modules", {"c"}), "at least two modules");
  check_router_rejects(with("model", "forest"), "unknown model 'forest'");
  check_router_rejects(with("temperature", -1.0), "temperature must be positive");
  check_router_rejects(with("threshold", 2.0), "threshold must be in [0, 1]");
  check_router_rejects(with("temperature", "hot"), "tensor 'temperature': wrong type");
  check_router_rejects(with("weights_f32le", "AAAA"), "expected 49152 f32 values");
  check_router_rejects(with("weights_f32le", "A*AA"), "bad base64 character");
  check_router_rejects(with("bias_f32le", "AAA"), "not a multiple of 4");
  check_router_rejects(with("bias_f32le", rt::detail::floats_to_base64({1.0f, NAN, 0.0f})), "value 1 is not finite");
  auto f = good;
  f["features"]["buckets"] = 1000;
  check_router_rejects(f, "tensor 'features.buckets'");
  f = good;
  f["features"].erase("ngram_max");
  check_router_rejects(f, "tensor 'features.ngram_max': missing key");

  s2lc::test::TempDir dir;
  const auto bad = dir.path() / "R.json";
  { std::ofstream(bad) << "{\"format\": "; }
  CHECK_THROWS_WITH_AS(rt::ContextRouter::load(bad), doctest::Contains("invalid JSON"), s2lc::format_error);
  CHECK_THROWS_AS(r.save(dir.path() / "missing-dir" / "R.json"), s2lc::io_error);
  std::size_t files = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator(dir.path())) ++files;
  CHECK(files == 1);  // only the file written above; no temporary left over
}

}  // namespace suite_route_context
