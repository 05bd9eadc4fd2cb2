// Expert-group and LoRA-pair recognition from tensor names, on synthetic names of real model
// families and on the real tinymoe / PEFT files.
#include <doctest/doctest.h>

#include <string>
#include <vector>

#include <s2lc/io/names.hpp>
#include <s2lc/io/safetensors.hpp>

#include "support.hpp"

// The suite's own scope: the suites compile in unity groups (tests/CMakeLists.txt).
namespace suite_io_names {

using s2lc::dtype;
using s2lc::io::TensorRef;

TEST_CASE("names: expert index parsing across model families") {
  struct Case {
    const char* name;
    const char* pattern;
    unsigned expert;
  };
  const Case cases[] = {
      {"model.layers.3.block_sparse_moe.experts.7.w1.weight", "model.layers.3.block_sparse_moe.experts.{E}.w1.weight", 7},  // Mixtral
      {"model.layers.0.mlp.experts.59.gate_proj.weight", "model.layers.0.mlp.experts.{E}.gate_proj.weight", 59},          // Qwen-MoE/OLMoE
      {"model.layers.1.mlp.experts.255.down_proj.weight", "model.layers.1.mlp.experts.{E}.down_proj.weight", 255},        // DeepSeek
      {"layers.2.moe.experts.0.w3.weight", "layers.2.moe.experts.{E}.w3.weight", 0},                                      // tinymoe
      {"experts.4.w2", "experts.{E}.w2", 4},
      {"moe.experts.12", "moe.experts.{E}", 12},
  };
  for (const auto& c : cases) {
    CAPTURE(c.name);
    const auto p = s2lc::io::parse_expert_name(c.name);
    REQUIRE(p.has_value());
    CHECK(p->pattern() == c.pattern);
    CHECK(p->expert == c.expert);
  }
  for (const char* not_expert : {"model.layers.0.mlp.shared_experts.gate_proj.weight", "model.layers.0.mlp.experts.gate.weight",
                                 "layers.0.num_experts.3.x", "model.layers.0.mlp.experts.3a.w1", "expertsX.1.w", "layers.0.ffn.w1.weight"}) {
    CAPTURE(not_expert);
    CHECK_FALSE(s2lc::io::parse_expert_name(not_expert).has_value());
  }
}

TEST_CASE("names: expert groups need equal dtype and shape, two members, and span shards") {
  std::vector<TensorRef> t = {
      {"l.0.experts.1.w1.weight", dtype::bf16, {8, 4}, 0},
      {"l.0.experts.0.w1.weight", dtype::bf16, {8, 4}, 1},  // other shard
      {"l.0.experts.2.w1.weight", dtype::bf16, {8, 4}, 1},
      {"l.0.experts.3.w1.weight", dtype::f32, {8, 4}, 0},   // other dtype: its own (single) group
      {"l.0.experts.0.w2.weight", dtype::bf16, {4, 8}, 0},
      {"l.0.experts.1.w2.weight", dtype::bf16, {4, 9}, 0},  // other shape
      {"l.0.shared_experts.w1.weight", dtype::bf16, {8, 4}, 0},
      {"l.0.experts.2.w1.weight", dtype::bf16, {8, 4}, 2},  // same name again in a third shard
  };
  const auto groups = s2lc::io::find_expert_groups(t);
  REQUIRE(groups.size() == 1);
  CHECK(groups[0].pattern == "l.0.experts.{E}.w1.weight");
  CHECK(groups[0].experts == std::vector<std::uint32_t>{0, 1, 2});
  CHECK(groups[0].members == std::vector<std::size_t>{1, 0, 2});
  CHECK(groups[0].name_of(2) == "l.0.experts.2.w1.weight");
  CHECK(groups[0].shape == std::vector<std::uint64_t>{8, 4});
}

TEST_CASE("names: LoRA pairs, PEFT adapter names, unpaired factors and bad shapes") {
  std::vector<TensorRef> t = {
      {"base_model.model.l.0.q.lora_A.weight", dtype::f32, {8, 64}, 0},
      {"base_model.model.l.0.q.lora_B.weight", dtype::f32, {128, 8}, 0},
      {"base_model.model.l.0.v.lora_A.default.weight", dtype::f32, {4, 64}, 0},
      {"base_model.model.l.0.v.lora_B.default.weight", dtype::f32, {64, 4}, 0},
      {"base_model.model.l.1.q.lora_A.weight", dtype::f32, {8, 64}, 0},  // no B
      {"base_model.model.l.2.q.lora_A.weight", dtype::f32, {8, 64}, 0},
      {"base_model.model.l.2.q.lora_B.weight", dtype::f32, {64, 4}, 0},  // rank mismatch
      {"base_model.model.l.0.q.lora_A.weight", dtype::f32, {2, 64}, 1},  // same names, other adapter
      {"base_model.model.l.0.q.lora_B.weight", dtype::f32, {128, 2}, 1},
      {"base_model.model.embed.lora_embedding_A", dtype::f32, {8, 1000}, 0},
      {"base_model.model.embed.lora_embedding_B", dtype::f32, {32, 8}, 0},
      {"base_model.model.l.0.q.lora_Alpha", dtype::f32, {1}, 0},  // not a factor
  };
  const auto scan = s2lc::io::find_lora_pairs(t);
  REQUIRE(scan.pairs.size() == 4);
  CHECK(scan.problems.size() == 2);
  int seen_q = 0;
  for (const auto& p : scan.pairs) {
    if (p.module == "base_model.model.l.0.q") {
      ++seen_q;
      CHECK(p.in_features == 64);
      CHECK(p.out_features == 128);
      CHECK((p.rank == 8 || p.rank == 2));
      CHECK(t[p.a].source == t[p.b].source);
    }
    if (p.module == "base_model.model.l.0.v") CHECK(p.rank == 4);
    if (p.module == "base_model.model.embed") CHECK(p.out_features == 32);
  }
  CHECK(seen_q == 2);
}

TEST_CASE("names: real tinymoe MoE has 12 expert groups (4 layers x w1/w2/w3) of 8 experts") {
  s2lc::io::SafetensorsFile f(s2lc::test::shared_dir() / "tinymoe/moe-upcycled.safetensors");
  const auto refs = s2lc::io::tensor_refs(f);
  const auto groups = s2lc::io::find_expert_groups(refs);
  REQUIRE(groups.size() == 12);
  for (const auto& g : groups) {
    CHECK(g.experts.size() == 8);
    CHECK(g.type == dtype::bf16);
    const bool down = g.pattern.find(".w2.") != std::string::npos;
    CHECK(g.shape == (down ? std::vector<std::uint64_t>{256, 768} : std::vector<std::uint64_t>{768, 256}));
  }
  CHECK(s2lc::io::find_lora_pairs(refs).pairs.empty());
}

TEST_CASE("names: bundled fixture slice has layer 1's three expert groups") {
  s2lc::io::SafetensorsFile f(s2lc::test::data_dir() / "tinymoe-upcycled-L1.safetensors");
  const auto groups = s2lc::io::find_expert_groups(s2lc::io::tensor_refs(f));
  REQUIRE(groups.size() == 3);
  CHECK(groups[0].pattern == "layers.1.moe.experts.{E}.w1.weight");
  CHECK(groups[1].pattern == "layers.1.moe.experts.{E}.w2.weight");
  CHECK(groups[2].pattern == "layers.1.moe.experts.{E}.w3.weight");
}

TEST_CASE("names: real PEFT adapters pair every lora_A with its lora_B") {
  s2lc::io::SafetensorsFile c(s2lc::test::data_dir() / "tinymoe-lora-c.safetensors");
  const auto scan = s2lc::io::find_lora_pairs(s2lc::io::tensor_refs(c));
  CHECK(scan.pairs.size() == 20);  // 4 layers x (wq, wv, w1, w3, w2)
  CHECK(scan.problems.empty());
  for (const auto& p : scan.pairs) CHECK(p.rank == 8);

  std::vector<TensorRef> all;
  std::size_t source = 0;
  for (const char* dir : {"gpt2-imdb-winkitee", "gpt2-moviereview-gsj-rifat", "distilbert-imdb-brucechanjianle"}) {
    s2lc::io::SafetensorsFile f(s2lc::test::shared_dir() / "lora-real" / dir / "adapter_model.safetensors");
    auto r = s2lc::io::tensor_refs(f, source++);
    all.insert(all.end(), r.begin(), r.end());
  }
  const auto real = s2lc::io::find_lora_pairs(all);
  CHECK(real.pairs.size() == 36);  // 12 + 12 GPT-2 c_attn, 6 x (q_lin, v_lin) DistilBERT
  CHECK(real.problems.empty());
  for (const auto& p : real.pairs) {
    CHECK(p.rank == 8);
    CHECK(p.in_features == 768);
    CHECK((p.out_features == 2304 || p.out_features == 768));
  }
}

}  // namespace suite_io_names
