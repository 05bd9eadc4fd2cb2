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
    "  compress IN.safetensors... -o OUT.s2lc [--ratio R | --energy E | --max-error X]\n"
    "           [--bits 8|4] [--calib C.safetensors] [--block N|RxC] [--group G]\n"
    "           [--clusters auto|0|K] [--no-global] [--no-shared-basis] [--threads N]\n"
    "           [--truncation-penalty P] [--balance group|block] [--seed S] [--quiet]\n"
    "                             compress MoE expert groups (and same-named tensors across\n"
    "                             files) into a .s2lc artifact; default --ratio 8\n"
    "  decompress OUT.s2lc -o RECON.safetensors [--tier B]\n"
    "                             every input tensor under its name and dtype (several inputs:\n"
    "                             -o is a directory, one file per input)\n"
    "  eval IN.safetensors... OUT.s2lc|RECON.safetensors [--calib C] [--baselines] [--json]\n"
    "                             ratios and errors per group and in total, optionally against\n"
    "                             SVD, D2-MoE-style and int-N baselines at equal bytes\n"
    "  bench apply [--rows M] [--cols N] [--ratio R] [--batch B] [--threads T]\n"
    "              [--morph K [--truncate] [--morph-bits 8|4]] [--activations f32|int8]\n"
    "              [--target avx3_dl|avx3|avx2|sse4|...] [--hot] [--json]\n"
    "                             compressed apply vs OpenBLAS dense f32 and the bandwidth\n"
    "                             bound, measured in one run (cold unless --hot); --target:\n"
    "                             the kernels run that SIMD target instead of the best one\n"
    "  route fit EXAMPLES.json -o R.json [--model logistic|sigmoid|centroid|naive_bayes]\n"
    "            [--ngrams A-B] [--buckets N] [--threshold X] [--embeddings FILE]\n"
    "                             fit the prompt-level context router from labelled prompts\n"
    "                             ([{\"domain\": name, \"text\": prompt}, ...])\n"
    "  route R.json [--json] < PROMPT\n"
    "                             pick a module for the prompt: {\"module\", \"confidence\",\n"
    "                             \"weights\"} (\"base\" when unsure)\n"
    "  route eval R.json EXAMPLES.json [--json]\n"
    "                             accuracy, fallback rate and calibration on labelled prompts\n"
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
    if (cmd == "compress") return s2lc::cli::run_compress(args);
    if (cmd == "decompress") return s2lc::cli::run_decompress(args);
    if (cmd == "eval") return s2lc::cli::run_eval(args);
    if (cmd == "bench") return s2lc::cli::run_bench(args);
    if (cmd == "route") return s2lc::cli::run_route(args);
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
