// s2lc::compress — the end-to-end path the CLI runs, as a library API: gather groups from
// safetensors files, derive calibration covariances, compress to the requested target on the
// whole artifact, write it; and evaluate an artifact (or any reconstruction) against the
// originals and the baselines a user would otherwise use, at equal bytes.
//
// Groups: (1) the experts of a MoE layer that play the same role ("...experts.{E}.w1.weight",
// find_expert_groups); (2) same-named 2-D float tensors present in several input files (domain
// modules on one base, or the factors of several LoRA adapters), one member per file. Every other
// tensor is copied through unchanged.
//
// Calibration (--calib FILE): activations "<layer>.ffn_input" [N, d] where <layer> is the name up
// to and including "layers.<L>." For up/gate projections (w1, w3, gate_proj, up_proj) the input
// covariance is X^T X / N; for down projections (w2, down_proj) it is that of each expert's hidden
// activation silu(X W1^T) * (X W3^T), computed from the member's own w1/w3. Groups without
// matching activations use the plain Frobenius error (reported as "calibrated": false).
#pragma once

#include <cctype>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <nlohmann/json.hpp>
#include <xtensor-blas/xlinalg.hpp>

#include "s2lc/compress/artifact.hpp"
#include "s2lc/compress/compressor.hpp"
#include "s2lc/compress/quant.hpp"
#include "s2lc/io/container.hpp"
#include "s2lc/io/names.hpp"
#include "s2lc/io/safetensors.hpp"
#include "s2lc/linalg/svd.hpp"
#include "s2lc/tensor.hpp"

namespace s2lc::compress {

/// Input files, opened and validated, with the groups found in them.
struct InputSet {
  std::vector<std::filesystem::path> paths;
  std::vector<std::unique_ptr<io::SafetensorsFile>> files;
  std::vector<io::TensorRef> refs;                 ///< every tensor of every file
  struct Group {
    std::string name;
    dtype type = dtype::f32;
    std::vector<std::size_t> members;              ///< indices into refs
  };
  std::vector<Group> groups;
  std::vector<int> group_of;                       ///< per ref: group index or -1
  std::vector<std::uint32_t> member_of;            ///< per ref: member index in its group

  const io::SafetensorsFile& file_of(std::size_t ref) const { return *files[refs[ref].source]; }
  double original_bytes(std::size_t g) const {
    double n = 0;
    for (auto i : groups[g].members) n += static_cast<double>(refs[i].nbytes());
    return n;
  }
};

inline InputSet open_inputs(const std::vector<std::filesystem::path>& paths) {
  if (paths.empty()) throw invalid_argument("no input files");
  InputSet in;
  in.paths = paths;
  for (std::size_t s = 0; s < paths.size(); ++s) {
    in.files.push_back(std::make_unique<io::SafetensorsFile>(paths[s]));
    for (auto& r : io::tensor_refs(*in.files.back(), s)) in.refs.push_back(std::move(r));
  }
  in.group_of.assign(in.refs.size(), -1);
  in.member_of.assign(in.refs.size(), 0);
  auto eligible = [&](const io::TensorRef& r) { return r.shape.size() == 2 && is_float(r.type) && r.shape[0] > 0 && r.shape[1] > 0; };
  // (1) expert groups, per source file.
  for (std::size_t s = 0; s < paths.size(); ++s) {
    std::vector<io::TensorRef> mine;
    std::vector<std::size_t> index;
    for (std::size_t i = 0; i < in.refs.size(); ++i)
      if (in.refs[i].source == s && eligible(in.refs[i])) mine.push_back(in.refs[i]), index.push_back(i);
    for (const auto& g : io::find_expert_groups(mine)) {
      InputSet::Group ig;
      ig.name = paths.size() > 1 ? paths[s].filename().string() + ":" + g.pattern : g.pattern;
      ig.type = g.type;
      for (auto m : g.members) ig.members.push_back(index[m]);
      in.groups.push_back(std::move(ig));
    }
  }
  // (2) same-named tensors across files.
  if (paths.size() > 1) {
    std::vector<bool> taken(in.refs.size(), false);
    for (const auto& g : in.groups)
      for (auto m : g.members) taken[m] = true;
    std::map<std::tuple<std::string, dtype, std::vector<std::uint64_t>>, std::vector<std::size_t>> by_name;
    for (std::size_t i = 0; i < in.refs.size(); ++i)
      if (!taken[i] && eligible(in.refs[i])) by_name[{in.refs[i].name, in.refs[i].type, in.refs[i].shape}].push_back(i);
    for (auto& [key, members] : by_name) {
      if (members.size() < 2) continue;
      InputSet::Group ig;
      ig.name = std::get<0>(key);
      ig.type = std::get<1>(key);
      ig.members = members;
      in.groups.push_back(std::move(ig));
    }
  }
  for (std::size_t g = 0; g < in.groups.size(); ++g)
    for (std::size_t m = 0; m < in.groups[g].members.size(); ++m) {
      in.group_of[in.groups[g].members[m]] = static_cast<int>(g);
      in.member_of[in.groups[g].members[m]] = static_cast<std::uint32_t>(m);
    }
  return in;
}

namespace detail {

/// "layers.3." of "model.layers.3.mlp.experts.1.w2.weight" (empty when there is none).
inline std::string layer_prefix(const std::string& name) {
  const auto p = name.find("layers.");
  if (p == std::string::npos) return {};
  std::size_t q = p + 7;
  while (q < name.size() && std::isdigit(static_cast<unsigned char>(name[q]))) ++q;
  if (q == p + 7 || q >= name.size() || name[q] != '.') return {};
  return name.substr(0, q + 1);
}

/// The role of a projection from its name: 'u' up/gate (input = layer input), 'd' down, 0 other.
inline char projection_role(const std::string& name) {
  for (const char* s : {".w1.", ".w3.", ".gate_proj.", ".up_proj."})
    if (name.find(s) != std::string::npos) return 'u';
  for (const char* s : {".w2.", ".down_proj."})
    if (name.find(s) != std::string::npos) return 'd';
  return 0;
}

inline std::optional<std::string> sibling(const std::string& name, const char* from, const char* to) {
  const auto p = name.find(from);
  if (p == std::string::npos) return std::nullopt;
  return name.substr(0, p) + to + name.substr(p + std::strlen(from));
}

inline matrix covariance(const matrix& X) {
  matrix H = xt::linalg::dot(xt::transpose(X), X);
  H /= static_cast<float>(X.shape()[0]);
  return H;
}

}  // namespace detail

/// Covariances for group g from calibration file `calib`; empty when it has no matching data.
inline std::vector<matrix> calibration_covariances(const InputSet& in, std::size_t g, const io::SafetensorsFile& calib) {
  const auto& grp = in.groups[g];
  const auto& first = in.refs[grp.members[0]];
  const std::string layer = detail::layer_prefix(first.name);
  const char role = detail::projection_role(first.name);
  if (layer.empty() || role == 0 || !calib.find(layer + "ffn_input")) return {};
  const matrix X = load_matrix_f32(calib, layer + "ffn_input");
  if (role == 'u') {
    if (X.shape()[1] != first.shape[1]) return {};
    return {detail::covariance(X)};
  }
  std::vector<matrix> out;
  for (auto m : grp.members) {
    const auto& ref = in.refs[m];
    const auto& file = *in.files[ref.source];
    std::optional<std::string> n1, n3;
    for (auto [d, u1, u3] : {std::tuple{".w2.", ".w1.", ".w3."}, std::tuple{".down_proj.", ".gate_proj.", ".up_proj."}})
      if (!n1) n1 = detail::sibling(ref.name, d, u1), n3 = detail::sibling(ref.name, d, u3);
    if (!n1 || !n3 || !file.find(*n1) || !file.find(*n3)) return {};
    const matrix W1 = load_matrix_f32(file, *n1), W3 = load_matrix_f32(file, *n3);
    if (W1.shape()[1] != X.shape()[1] || W1.shape() != W3.shape() || W1.shape()[0] != ref.shape[1]) return {};
    matrix a = xt::linalg::dot(X, xt::transpose(W1));
    const matrix b = xt::linalg::dot(X, xt::transpose(W3));
    for (std::size_t i = 0; i < a.size(); ++i) {
      const float v = a.data()[i];
      a.data()[i] = v / (1.0f + std::exp(-v)) * b.data()[i];
    }
    out.push_back(detail::covariance(a));
  }
  return out;
}

/// Loads every group's members (f32) and, with `calib`, their covariances.
inline std::vector<GroupInput> group_inputs(const InputSet& in, const io::SafetensorsFile* calib) {
  std::vector<GroupInput> out;
  for (std::size_t g = 0; g < in.groups.size(); ++g) {
    GroupInput gi;
    gi.name = in.groups[g].name;
    gi.type = in.groups[g].type;
    for (auto m : in.groups[g].members) {
      gi.member_names.push_back(in.refs[m].name);
      gi.member_sources.push_back(static_cast<std::uint32_t>(in.refs[m].source));
      gi.weights.push_back(load_matrix_f32(in.file_of(m), in.refs[m].name));
    }
    if (calib != nullptr) gi.covariance = calibration_covariances(in, g, *calib);
    out.push_back(std::move(gi));
  }
  return out;
}

/// What compress_files reports.
struct CompressReport {
  double original_bytes = 0;   ///< of all group members
  double group_bytes = 0;      ///< artifact bytes attributable to the groups
  std::uint64_t file_bytes = 0;
  double seconds = 0;
  std::size_t passes = 0;
};

/// Compresses `inputs` into the artifact `out` (crash-safe write). In ratio mode the allocation
/// is repeated with the container overhead measured on the previous pass until the groups'
/// ratio is within 1 % of the target (at most 4 passes).
inline CompressReport compress_files(const std::vector<std::filesystem::path>& inputs, const std::filesystem::path& out,
                                     Options opt, const std::optional<std::filesystem::path>& calib_path = std::nullopt,
                                     nlohmann::json options_json = nlohmann::json::object()) {
  const auto t0 = std::chrono::steady_clock::now();
  const InputSet in = open_inputs(inputs);
  std::unique_ptr<io::SafetensorsFile> calib;
  if (calib_path) calib = std::make_unique<io::SafetensorsFile>(*calib_path);
  const auto groups = group_inputs(in, calib.get());

  ArtifactContents contents;
  for (const auto& p : inputs) contents.sources.push_back(p.filename().string());
  for (const auto& f : in.files) contents.metadata.push_back(f->metadata());
  contents.options = std::move(options_json);
  int copies = 0;
  for (std::size_t i = 0; i < in.refs.size(); ++i) {
    TensorEntry t;
    t.name = in.refs[i].name;
    t.type = in.refs[i].type;
    t.shape = in.refs[i].shape;
    t.source = static_cast<std::uint32_t>(in.refs[i].source);
    if (in.group_of[i] >= 0) {
      t.group = in.group_of[i];
      t.member = in.member_of[i];
    } else {
      t.copy = copies++;
      contents.copies.push_back(in.file_of(i).bytes(t.name));
    }
    contents.tensors.push_back(std::move(t));
  }
  nlohmann::json calibrated = nlohmann::json::array();
  for (const auto& g : groups) calibrated.push_back(!g.covariance.empty());
  contents.options["calibrated"] = calibrated;

  CompressReport rep;
  for (std::size_t g = 0; g < in.groups.size(); ++g) rep.original_bytes += in.original_bytes(g);
  double copy_bytes = 0;
  for (const auto& c : contents.copies) copy_bytes += static_cast<double>(detail::align_to(c.size(), 64));

  Compressor comp(groups, opt);
  comp.analyse();
  std::size_t overhead = 0;
  std::vector<std::byte> bytes;
  for (rep.passes = 1;; ++rep.passes) {
    const Compressed c = comp.finish(overhead);
    io::ContainerBuilder b;
    build_artifact(b, c, contents);
    const double size = static_cast<double>(b.file_size());
    double payload = 0;
    for (const auto& g : c.groups) payload += static_cast<double>(g.payload_bytes());
    rep.group_bytes = size - copy_bytes;
    if (opt.mode != target_mode::ratio || rep.passes >= 4 || groups.empty() ||
        std::fabs(rep.original_bytes / rep.group_bytes / opt.ratio - 1.0) < 0.01) {
      if (opt.progress) opt.progress("write", 0, 1);
      b.write(out);
      rep.file_bytes = b.file_size();
      break;
    }
    overhead = static_cast<std::size_t>(std::max(0.0, rep.group_bytes - payload));
  }
  rep.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return rep;
}

// ---------------------------------------------------------------------------------------------
// Evaluation

/// Errors of one reconstruction of a group.
struct ErrorSums {
  double err = 0, ref = 0;          ///< sum ||W - W^||^2, sum ||W||^2
  double out_err = 0, out_ref = 0;  ///< the same through the calibration covariance
  void add(const matrix& W, const matrix& R, const matrix* H) {
    const matrix D = W - R;
    err += detail::sq_norm(D);
    ref += detail::sq_norm(W);
    if (H != nullptr) {
      const matrix DH = xt::linalg::dot(D, *H), WH = xt::linalg::dot(W, *H);
      for (std::size_t i = 0; i < D.size(); ++i) out_err += static_cast<double>(DH.data()[i]) * D.data()[i], out_ref += static_cast<double>(WH.data()[i]) * W.data()[i];
    }
  }
  void add(const ErrorSums& o) { err += o.err, ref += o.ref, out_err += o.out_err, out_ref += o.out_ref; }
  double rel_fro() const { return ref > 0 ? std::sqrt(err / ref) : 0.0; }
  double rel_out() const { return out_ref > 0 ? std::sqrt(out_err / out_ref) : 0.0; }
};

/// Round-to-nearest symmetric int-N in groups of 32 along rows with a 16-bit scale (the
/// baseline of ../shared/tools/baseline.py): ratio vs 16-bit weights is 16 / (N + 0.5).
inline matrix rtn_baseline(const matrix& W, unsigned bits, std::size_t group = 32) {
  matrix R = W;
  const float q = static_cast<float>((1u << (bits - 1)) - 1u);
  const std::size_t rows = W.shape()[0], cols = W.shape()[1];
  for (std::size_t r = 0; r < rows; ++r)
    for (std::size_t c0 = 0; c0 < cols; c0 += group) {
      const std::size_t n = std::min(group, cols - c0);
      float amax = 0;
      for (std::size_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(W(r, c0 + i)));
      const float s = amax > 0 ? amax / q : 1.0f;
      for (std::size_t i = 0; i < n; ++i) R(r, c0 + i) = std::clamp(std::nearbyint(W(r, c0 + i) / s), -q - 1, q) * s;
    }
  return R;
}

/// Best rank-r approximation (bf16 factors counted by the caller).
inline matrix svd_baseline(const matrix& W, std::size_t r) {
  if (r == 0) return xt::zeros<float>(W.shape());
  return linalg::truncate(linalg::svd(W), r).reconstruct();
}

}  // namespace s2lc::compress
