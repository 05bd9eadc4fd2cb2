// Corpus replayer: runs LLVMFuzzerTestOneInput (of the harness it is linked with:
// safetensors_fuzz.cpp, container_fuzz.cpp or artifact_fuzz.cpp) on every file named on the
// command line, or found (recursively) in a directory named there, without needing libFuzzer.
// Used by the CTest checks fuzz_replay_safetensors, fuzz_replay_container and fuzz_replay_artifact
// (tests/fuzz/replay.cmake) so the seed corpora and saved crash reproducers run in every build,
// including the ASan preset.
// Arguments starting with '-' (libFuzzer flags) are ignored. Exits 1 if a path does not exist or
// nothing was replayed; a failing input aborts (the harness's invariants) or trips a sanitizer.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size);

namespace {

bool replay(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  if (!in) {
    std::fprintf(stderr, "replay: cannot read %s\n", p.string().c_str());
    return false;
  }
  const std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  // Copy into an exactly-sized heap buffer so ASan catches reads one past the end.
  std::vector<std::uint8_t> buf(bytes.size());
  std::transform(bytes.begin(), bytes.end(), buf.begin(), [](char c) { return static_cast<std::uint8_t>(c); });
  std::fprintf(stderr, "replay: %s (%zu bytes)\n", p.string().c_str(), buf.size());
  LLVMFuzzerTestOneInput(buf.empty() ? nullptr : buf.data(), buf.size());
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  std::size_t count = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (!arg.empty() && arg[0] == '-') continue;
    const std::filesystem::path p(arg);
    std::error_code ec;
    if (std::filesystem::is_directory(p, ec)) {
      std::vector<std::filesystem::path> files;
      for (const auto& entry : std::filesystem::recursive_directory_iterator(p))
        if (entry.is_regular_file()) files.push_back(entry.path());
      std::sort(files.begin(), files.end());
      for (const auto& f : files)
        if (replay(f)) ++count;
    } else if (std::filesystem::is_regular_file(p, ec)) {
      if (replay(p)) ++count;
    } else {
      std::fprintf(stderr, "replay: no such file or directory: %s\n", arg.c_str());
      return 1;
    }
  }
  if (count == 0) {
    std::fprintf(stderr, "replay: no inputs (usage: %s CORPUS_DIR_OR_FILE...)\n", argc > 0 ? argv[0] : "replay");
    return 1;
  }
  std::fprintf(stderr, "replay: %zu inputs OK\n", count);
  return 0;
}
