#include <doctest/doctest.h>

#include <string>

#include <s2lc/config.hpp>
#include <s2lc/error.hpp>

// The suite's own scope: the suites compile in unity groups (tests/CMakeLists.txt).
namespace suite_config {

TEST_CASE("config: version macros and value agree") {
  CHECK(s2lc::version.major == S2LC_VERSION_MAJOR);
  CHECK(s2lc::version.minor == S2LC_VERSION_MINOR);
  CHECK(s2lc::version.patch == S2LC_VERSION_PATCH);
  CHECK(std::string(s2lc::version.string) ==
        std::to_string(S2LC_VERSION_MAJOR) + "." + std::to_string(S2LC_VERSION_MINOR) + "." + std::to_string(S2LC_VERSION_PATCH));
}

TEST_CASE("error: message names file, tensor and byte offset") {
  const s2lc::format_error e("bad dtype", {"model.safetensors", "layers.0.w1", 1234});
  CHECK(std::string(e.what()) == "file 'model.safetensors', tensor 'layers.0.w1', byte offset 1234: bad dtype");
  CHECK(e.message() == "bad dtype");
  CHECK(e.file() == "model.safetensors");
  CHECK(e.tensor() == "layers.0.w1");
  REQUIRE(e.offset().has_value());
  CHECK(*e.offset() == 1234);
  const s2lc::io_error bare("plain");
  CHECK(std::string(bare.what()) == "plain");
  CHECK_FALSE(bare.offset().has_value());
  const s2lc::error only_offset("x", {{}, {}, 0});
  CHECK(std::string(only_offset.what()) == "byte offset 0: x");
}

}  // namespace suite_config
