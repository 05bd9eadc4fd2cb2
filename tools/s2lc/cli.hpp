// s2lc CLI — shared pieces of the subcommands.
#pragma once

#include <cmath>
#include <cstddef>
#include <stdexcept>
#include <string>
#include <vector>

namespace s2lc::cli {

/// Bad command line: printed as one line, exit code 2.
struct usage_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// A flag's finite number, or a usage_error naming the flag.
inline double parse_number(const std::string& flag, const std::string& v) {
  try {
    std::size_t used = 0;
    const double d = std::stod(v, &used);
    if (used != v.size() || !std::isfinite(d)) throw std::invalid_argument(v);
    return d;
  } catch (const std::exception&) {
    throw usage_error(flag + " needs a number, got '" + v + "'");
  }
}

/// A flag's non-negative integer (at most 1e9), or a usage_error naming the flag.
inline std::size_t parse_count(const std::string& flag, const std::string& v) {
  double d = -1;
  try {
    d = parse_number(flag, v);
  } catch (const usage_error&) {
  }
  if (d < 0 || d != std::floor(d) || d > 1e9) throw usage_error(flag + " needs a non-negative integer, got '" + v + "'");
  return static_cast<std::size_t>(d);
}

int run_inspect(const std::vector<std::string>& args);
int run_compress(const std::vector<std::string>& args);
int run_decompress(const std::vector<std::string>& args);
int run_eval(const std::vector<std::string>& args);
int run_bench(const std::vector<std::string>& args);
int run_route(const std::vector<std::string>& args);

}  // namespace s2lc::cli
