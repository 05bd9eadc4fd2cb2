// Weight buffers of the benchmarks (bench/ and `s2lc bench apply`): std::vector storage that
// starts buffer_offset() bytes past a 64-byte boundary.
#pragma once

#include <cstddef>
#include <new>
#include <vector>

namespace s2lc::bench {

/// Bytes past a 64-byte boundary at which every Buffer starts: 0 (aligned, as engines allocate
/// weights: PyTorch to 64 bytes) unless --s2lc_buffer_offset=B says otherwise (std::vector's own
/// large allocations start 16 bytes past a boundary: --s2lc_buffer_offset=16).
inline std::size_t& buffer_offset() {
  static std::size_t offset = 0;  // set by main before any benchmark runs
  return offset;
}

/// std::vector storage at buffer_offset() past a 64-byte boundary.
template <class T>
struct BufferAlloc {
  using value_type = T;
  BufferAlloc() = default;
  template <class U>
  BufferAlloc(const BufferAlloc<U>&) noexcept {}
  T* allocate(std::size_t n) {
    char* p = static_cast<char*>(::operator new(n * sizeof(T) + 64, std::align_val_t{64}));
    return reinterpret_cast<T*>(p + buffer_offset());
  }
  void deallocate(T* p, std::size_t) noexcept { ::operator delete(reinterpret_cast<char*>(p) - buffer_offset(), std::align_val_t{64}); }
  template <class U>
  bool operator==(const BufferAlloc<U>&) const noexcept { return true; }
};

/// The benches' weight buffers (dense matrices, merge targets): see buffer_offset().
template <class T>
using Buffer = std::vector<T, BufferAlloc<T>>;

}  // namespace s2lc::bench
