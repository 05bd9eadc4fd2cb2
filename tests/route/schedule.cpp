// Per-layer routing schedules (include/route/schedule.hpp): every Shape's value at each layer of
// stacks of 1, 4 and 5 layers against hand-computed numbers; user shapes and their size check;
// RoutingSchedule::at (max_k rounded to nearest, ties up, kept >= min_k; bad values rejected);
// top_k_router / top_p_router / capacity_for carry the scheduled values into routers that route
// accordingly; parse_shape round trip and its error.
#include <doctest/doctest.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <route/schedule.hpp>
#include <route/token.hpp>
#include <s2lc/error.hpp>

// The suite's own scope: the suites compile in unity groups (tests/CMakeLists.txt).
namespace suite_route_schedule {

namespace {

namespace rt = s2lc::route;

/// Values of s at every layer of an n-layer stack.
std::vector<double> values(const rt::LayerSchedule& s, std::size_t n) {
  std::vector<double> v(n);
  for (std::size_t l = 0; l < n; ++l) v[l] = s.at(l, n);
  return v;
}

void check_values(const rt::LayerSchedule& s, std::size_t n, const std::vector<double>& want) {
  CAPTURE(rt::shape_name(s.shape));
  CAPTURE(n);
  const auto got = values(s, n);
  REQUIRE(got.size() == want.size());
  for (std::size_t l = 0; l < n; ++l) {
    CAPTURE(l);
    CHECK(got[l] == doctest::Approx(want[l]).epsilon(1e-12).scale(1.0));
  }
}

rt::LayerSchedule make(rt::Shape shape, double lo, double hi, double periods = 1.0) {
  rt::LayerSchedule s;
  s.shape = shape, s.lo = lo, s.hi = hi, s.periods = periods;
  return s;
}

}  // namespace

TEST_CASE("route: schedule shapes give the hand-computed value at every layer (L = 1, 4, 5)") {
  using rt::Shape;
  // uniform: hi everywhere.
  const auto uni = make(Shape::uniform, 1.0, 3.0);
  check_values(uni, 1, {3.0});
  check_values(uni, 4, {3.0, 3.0, 3.0, 3.0});
  check_values(uni, 5, {3.0, 3.0, 3.0, 3.0, 3.0});
  // descending: hi -> lo; a single layer sits at x = 0 (hi).
  const auto desc = make(Shape::descending, 1.0, 4.0);
  check_values(desc, 1, {4.0});
  check_values(desc, 4, {4.0, 3.0, 2.0, 1.0});
  check_values(desc, 5, {4.0, 3.25, 2.5, 1.75, 1.0});
  // ascending: lo -> hi.
  const auto asc = make(Shape::ascending, 1.0, 4.0);
  check_values(asc, 1, {1.0});
  check_values(asc, 4, {1.0, 2.0, 3.0, 4.0});
  check_values(asc, 5, {1.0, 1.75, 2.5, 3.25, 4.0});
  // pyramid: lo at both ends, hi in the middle (L = 4 has no middle layer: 1 + 3 * 2/3 = 3).
  const auto pyr = make(Shape::pyramid, 1.0, 4.0);
  check_values(pyr, 1, {1.0});
  check_values(pyr, 4, {1.0, 3.0, 3.0, 1.0});
  check_values(pyr, 5, {1.0, 2.5, 4.0, 2.5, 1.0});
  // wave, one period: (1 - cos(2 pi x)) / 2 = 0, 3/4, 3/4, 0 at L = 4; 0, 1/2, 1, 1/2, 0 at L = 5.
  const auto wave = make(Shape::wave, 1.0, 3.0);
  check_values(wave, 1, {1.0});
  check_values(wave, 4, {1.0, 2.5, 2.5, 1.0});
  check_values(wave, 5, {1.0, 2.0, 3.0, 2.0, 1.0});
  // wave, two periods: hi at x = 1/4 and 3/4, lo at 0, 1/2, 1.
  const auto wave2 = make(Shape::wave, 1.0, 3.0, 2.0);
  check_values(wave2, 5, {1.0, 3.0, 1.0, 3.0, 1.0});
  check_values(wave2, 7, {1.0, 2.5, 2.5, 1.0, 2.5, 2.5, 1.0});  // cos(2 pi l / 3): 1, -1/2, -1/2, 1, ...
  // lo > hi works the same way (an inverted pyramid).
  check_values(make(Shape::pyramid, 4.0, 0.0), 5, {4.0, 2.0, 0.0, 2.0, 4.0});
  // user: values[l].
  rt::LayerSchedule user;
  user.shape = Shape::user;
  user.values = {0.5, 1.5, 2.5, 3.5};
  check_values(user, 4, {0.5, 1.5, 2.5, 3.5});
  user.values = {7.0};
  check_values(user, 1, {7.0});
}

TEST_CASE("route: schedule rejections: user size mismatch, layer out of range") {
  rt::LayerSchedule user;
  user.shape = rt::Shape::user;
  user.values = {1.0, 2.0, 3.0};
  CHECK_THROWS_WITH_AS(user.at(0, 4), doctest::Contains("schedule: user shape has 3 values for 4 layers"), s2lc::invalid_argument);
  CHECK_THROWS_WITH_AS(user.at(0, 2), doctest::Contains("user shape has 3 values for 2 layers"), s2lc::invalid_argument);
  CHECK(user.at(2, 3) == 3.0);
  const auto asc = make(rt::Shape::ascending, 0.0, 1.0);
  CHECK_THROWS_WITH_AS(asc.at(4, 4), doctest::Contains("schedule: layer 4 of 4"), s2lc::invalid_argument);
  CHECK_THROWS_WITH_AS(asc.at(0, 0), doctest::Contains("schedule: layer 0 of 0"), s2lc::invalid_argument);
  CHECK_THROWS_WITH_AS(user.at(3, 3), doctest::Contains("layer 3 of 3"), s2lc::invalid_argument);
}

TEST_CASE("route: RoutingSchedule::at rounds max_k to nearest (ties up), keeps it >= min_k, rejects bad values") {
  rt::RoutingSchedule s;
  // Defaults: 2 experts, capacity 1.25, top_p 1 at every layer.
  for (std::size_t l = 0; l < 3; ++l) {
    const auto r = s.at(l, 3);
    CHECK(r.max_k == 2);
    CHECK(r.capacity_factor == 1.25);
    CHECK(r.top_p == 1.0);
  }
  // Pyramid 1 -> 4 over 5 layers: 1, 2.5, 4, 2.5, 1 -> 1, 3, 4, 3, 1 (2.5 rounds up).
  s.max_k = make(rt::Shape::pyramid, 1.0, 4.0);
  const std::size_t want5[] = {1, 3, 4, 3, 1};
  for (std::size_t l = 0; l < 5; ++l) CHECK(s.at(l, 5).max_k == want5[l]);
  // User values: nearest integer, ties up, never below min_k (negative values too).
  s.max_k.shape = rt::Shape::user;
  s.max_k.values = {0.2, 2.5, 3.4999, 3.5, -2.0, 1.49};
  const std::size_t want_min1[] = {1, 3, 3, 4, 1, 1};
  for (std::size_t l = 0; l < 6; ++l) {
    CAPTURE(l);
    CHECK(s.at(l, 6).max_k == want_min1[l]);
  }
  s.min_k = 2;
  const std::size_t want_min2[] = {2, 3, 3, 4, 2, 2};
  for (std::size_t l = 0; l < 6; ++l) {
    CAPTURE(l);
    CHECK(s.at(l, 6).max_k == want_min2[l]);
  }
  s.min_k = 1;
  // The other two quantities follow their own shapes.
  s.capacity = make(rt::Shape::descending, 1.0, 2.0);
  s.top_p = make(rt::Shape::ascending, 0.5, 0.9);
  CHECK(s.at(0, 6).capacity_factor == doctest::Approx(2.0));
  CHECK(s.at(5, 6).capacity_factor == doctest::Approx(1.0));
  CHECK(s.at(1, 6).capacity_factor == doctest::Approx(1.8));
  CHECK(s.at(0, 6).top_p == doctest::Approx(0.5));
  CHECK(s.at(5, 6).top_p == doctest::Approx(0.9));
  CHECK(s.at(2, 6).top_p == doctest::Approx(0.66));
  // Rejections.
  s.max_k.values[2] = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS_WITH_AS(s.at(2, 6), doctest::Contains("schedule: expert count is not finite at layer 2"), s2lc::invalid_argument);
  s.max_k.values[2] = std::numeric_limits<double>::infinity();
  CHECK_THROWS_WITH_AS(s.at(2, 6), doctest::Contains("expert count is not finite at layer 2"), s2lc::invalid_argument);
  s.max_k.values[2] = 3.0;
  CHECK_NOTHROW(s.at(2, 6));
  s.capacity = make(rt::Shape::descending, 0.0, 1.0);  // 0 at the last layer
  CHECK_NOTHROW(s.at(4, 6));
  CHECK_THROWS_WITH_AS(s.at(5, 6), doctest::Contains("schedule: capacity factor must be > 0 at layer 5"), s2lc::invalid_argument);
  s.capacity = make(rt::Shape::uniform, 1.0, 1.0);
  s.top_p = make(rt::Shape::ascending, -0.5, 0.5);  // negative before the middle
  CHECK_THROWS_WITH_AS(s.at(0, 6), doctest::Contains("schedule: top_p must be >= 0 at layer 0"), s2lc::invalid_argument);
  CHECK_NOTHROW(s.at(5, 6));
  s.max_k.values.pop_back();
  CHECK_THROWS_WITH_AS(s.at(5, 6), doctest::Contains("user shape has 5 values for 6 layers"), s2lc::invalid_argument);
}

TEST_CASE("route: top_k_router / top_p_router / capacity_for produce the scheduled values") {
  rt::RoutingSchedule s;
  s.max_k = make(rt::Shape::pyramid, 1.0, 4.0);        // 1, 3, 4, 3, 1
  s.capacity = make(rt::Shape::descending, 1.0, 2.0);  // 2, 1.75, 1.5, 1.25, 1
  s.top_p = make(rt::Shape::uniform, 1.0, 1.0);        // p = 1: exactly max_k experts
  const std::size_t L = 5, T = 40, E = 8;
  const std::size_t want_k[] = {1, 3, 4, 3, 1};
  const double want_cap[] = {2.0, 1.75, 1.5, 1.25, 1.0};
  std::mt19937 rng(11);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> logits(T * E);
  for (auto& x : logits) x = nd(rng);
  for (std::size_t l = 0; l < L; ++l) {
    CAPTURE(l);
    const rt::TopK tk = s.top_k_router(l, L);
    CHECK(tk.k == want_k[l]);
    CHECK(tk.normalize);
    const rt::TopP tp = s.top_p_router(l, L);
    CHECK(tp.p == 1.0);
    CHECK(tp.min_k == 1);
    CHECK(tp.max_k == want_k[l]);
    CHECK(tp.normalize);
    const rt::Capacity cap = s.capacity_for(l, L);
    CHECK(cap.factor == doctest::Approx(want_cap[l]).epsilon(1e-12));
    CHECK(cap.min_capacity == 1);
    CHECK(cap.overflow == rt::Overflow::drop);
    CHECK(cap.priority == rt::Priority::token_order);
    const rt::Capacity cap2 = s.capacity_for(l, L, rt::Overflow::reroute, rt::Priority::score);
    CHECK(cap2.overflow == rt::Overflow::reroute);
    CHECK(cap2.priority == rt::Priority::score);
    CHECK(cap2.factor == cap.factor);
    // The routers route with the scheduled counts; the capacity is ceil(factor * routed / E).
    const auto rk = tk.route(logits.data(), T, E);
    auto rp = tp.route(logits.data(), T, E);
    CHECK(rk.slots == want_k[l]);
    CHECK(rp.slots == want_k[l]);
    for (std::size_t t = 0; t < T; ++t) CHECK(rp.active(t) == want_k[l]);
    CHECK(rp.expert == rk.expert);  // p = 1 with max_k = k: the same experts as top-k
    const auto rep = rt::apply_capacity(rp, cap, logits.data());
    CHECK(rep.capacity == static_cast<std::size_t>(std::ceil(want_cap[l] * static_cast<double>(T * want_k[l]) / static_cast<double>(E))));
  }
  // A threshold below 1: top_p_router carries p, and tokens use between min_k and max_k experts.
  s.top_p = make(rt::Shape::ascending, 0.3, 0.7);
  s.min_k = 2;
  for (std::size_t l = 0; l < L; ++l) {
    CAPTURE(l);
    const rt::TopP tp = s.top_p_router(l, L);
    CHECK(tp.p == doctest::Approx(0.3 + 0.1 * static_cast<double>(l)).epsilon(1e-12));
    const std::size_t hi = std::max<std::size_t>(2, want_k[l]);
    CHECK(tp.max_k == hi);
    CHECK(tp.min_k == 2);
    const auto r = tp.route(logits.data(), T, E);
    for (std::size_t t = 0; t < T; ++t) {
      CHECK(r.active(t) >= 2);
      CHECK(r.active(t) <= hi);
    }
  }
}

TEST_CASE("route: parse_shape round-trips every shape name and rejects unknown ones") {
  using rt::Shape;
  for (Shape v : {Shape::uniform, Shape::descending, Shape::ascending, Shape::pyramid, Shape::wave, Shape::user}) {
    const std::string name = rt::shape_name(v);
    CAPTURE(name);
    CHECK(rt::parse_shape(name) == v);
  }
  CHECK(std::string(rt::shape_name(Shape::pyramid)) == "pyramid");
  CHECK(std::string(rt::shape_name(Shape::wave)) == "wave");
  CHECK_THROWS_WITH_AS(rt::parse_shape("zigzag"),
                       doctest::Contains("unknown schedule shape 'zigzag' (uniform, descending, ascending, pyramid, wave, user)"),
                       s2lc::invalid_argument);
  CHECK_THROWS_WITH_AS(rt::parse_shape("Uniform"), doctest::Contains("unknown schedule shape 'Uniform'"), s2lc::invalid_argument);
  CHECK_THROWS_WITH_AS(rt::parse_shape(""), doctest::Contains("unknown schedule shape ''"), s2lc::invalid_argument);
}

}  // namespace suite_route_schedule
