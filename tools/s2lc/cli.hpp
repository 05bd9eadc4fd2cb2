// s2lc CLI — shared pieces of the subcommands.
#pragma once

#include <stdexcept>
#include <string>
#include <vector>

namespace s2lc::cli {

/// Bad command line: printed as one line, exit code 2.
struct usage_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

int run_inspect(const std::vector<std::string>& args);
int run_compress(const std::vector<std::string>& args);
int run_decompress(const std::vector<std::string>& args);
int run_eval(const std::vector<std::string>& args);
int run_bench(const std::vector<std::string>& args);
int run_route(const std::vector<std::string>& args);

}  // namespace s2lc::cli
