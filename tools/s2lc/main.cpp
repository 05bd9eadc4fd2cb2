// s2lc — command-line tool. One file per subcommand; this one dispatches.
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

#include <s2lc/config.hpp>
#include <s2lc/error.hpp>

#include "cli.hpp"

namespace {

constexpr const char* kUsage =
    "usage: s2lc <command> [options]\n"
    "\n"
    "commands:\n"
    "  inspect FILE... [--json]   list tensors, dtypes, shapes and bytes of safetensors files,\n"
    "                             with the MoE expert groups and PEFT LoRA pairs they contain\n"
    "\n"
    "  s2lc --help | --version\n";

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty()) {
    std::fputs(kUsage, stderr);
    return 2;
  }
  const std::string cmd = args.front();
  args.erase(args.begin());
  try {
    if (cmd == "--help" || cmd == "-h" || cmd == "help") {
      std::fputs(kUsage, stdout);
      return 0;
    }
    if (cmd == "--version") {
      std::printf("s2lc %s\n", s2lc::version.string);
      return 0;
    }
    if (cmd == "inspect") return s2lc::cli::run_inspect(args);
    throw s2lc::cli::usage_error("unknown command '" + cmd + "' (try 's2lc --help')");
  } catch (const s2lc::cli::usage_error& e) {
    std::fprintf(stderr, "s2lc: %s\n", e.what());
    return 2;
  } catch (const s2lc::error& e) {
    std::fprintf(stderr, "s2lc: error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "s2lc: internal error: %s\n", e.what());
    return 3;
  }
}
