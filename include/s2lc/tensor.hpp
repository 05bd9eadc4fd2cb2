// s2lc — tensor aliases (xtensor) and non-owning views over memory-mapped tensor data.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <vector>
#include <string_view>

#include <xtensor/xadapt.hpp>
#include <xtensor/xarray.hpp>
#include <xtensor/xtensor.hpp>

#include "s2lc/dtype.hpp"
#include "s2lc/error.hpp"
#include "s2lc/io/safetensors.hpp"
#include "s2lc/kernels/convert.hpp"

namespace s2lc {

namespace detail {
inline void require_2d(const io::SafetensorsFile& file, const io::TensorInfo& info) {
  if (info.shape.size() != 2)
    throw invalid_argument("expected a 2-D tensor, shape has " + std::to_string(info.shape.size()) + " dimensions",
                           {file.path().string(), info.name, file.offset_of(info)});
}
inline void require_float(const io::SafetensorsFile& file, const io::TensorInfo& info) {
  if (!is_float(info.type))
    throw invalid_argument("not a floating-point tensor (" + std::string(dtype_name(info.type)) + ")",
                           {file.path().string(), info.name, file.offset_of(info)});
}
}  // namespace detail

/// Owning row-major f32 matrix / vector / n-d array.
using matrix = xt::xtensor<float, 2>;
using vector = xt::xtensor<float, 1>;
using array = xt::xarray<float>;

/// Non-owning, read-only row-major matrix view over `rows * cols` elements at `data` (no copy).
template <typename T>
auto matrix_view(const T* data, std::size_t rows, std::size_t cols) {
  return xt::adapt(data, rows * cols, xt::no_ownership(), std::array<std::size_t, 2>{rows, cols});
}

/// Non-owning view of a 2-D tensor of a mapped safetensors file; T must be its stored dtype.
template <typename T>
auto matrix_view(const io::SafetensorsFile& file, std::string_view name) {
  const auto& info = file.at(name);
  detail::require_2d(file, info);
  const auto v = file.view<T>(name);
  return matrix_view(v.data(), static_cast<std::size_t>(info.shape[0]), static_cast<std::size_t>(info.shape[1]));
}

/// Converts `n` elements of a floating dtype stored at `src` to f32 (exact for f16/bf16/f32).
inline void convert_to_f32(dtype type, const std::byte* src, float* dst, std::size_t n) {
  switch (type) {
    case dtype::f32: std::memcpy(dst, src, n * sizeof(float)); return;
    case dtype::bf16: kernels::bf16_to_f32(reinterpret_cast<const std::uint16_t*>(src), dst, n); return;
    case dtype::f16: kernels::f16_to_f32(reinterpret_cast<const std::uint16_t*>(src), dst, n); return;
    case dtype::f64:
      for (std::size_t i = 0; i < n; ++i) {
        double d;
        std::memcpy(&d, src + i * sizeof(double), sizeof d);
        dst[i] = static_cast<float>(d);
      }
      return;
    default: throw invalid_argument("cannot convert " + std::string(dtype_name(type)) + " to F32");
  }
}

/// Loads a floating tensor of a safetensors file as an owning f32 array of the same shape.
inline array load_f32(const io::SafetensorsFile& file, std::string_view name) {
  const auto& info = file.at(name);
  detail::require_float(file, info);
  std::vector<std::size_t> shape(info.shape.begin(), info.shape.end());
  array out = array::from_shape(shape);
  convert_to_f32(info.type, file.bytes(info).data(), out.data(), out.size());
  return out;
}

/// Loads a 2-D floating tensor as an owning f32 matrix.
inline matrix load_matrix_f32(const io::SafetensorsFile& file, std::string_view name) {
  const auto& info = file.at(name);
  detail::require_2d(file, info);
  detail::require_float(file, info);
  matrix out = matrix::from_shape({static_cast<std::size_t>(info.shape[0]), static_cast<std::size_t>(info.shape[1])});
  convert_to_f32(info.type, file.bytes(info).data(), out.data(), out.size());
  return out;
}

}  // namespace s2lc
