// s2lc::io — read-only memory-mapped files, and the crash-safe write primitive (temp file in the
// same directory, write, fsync, rename, fsync the directory) every s2lc writer uses.
#pragma once

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <functional>
#include <span>
#include <string>
#include <utility>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "s2lc/error.hpp"

namespace s2lc::io {

namespace detail {
inline std::string errno_text(int err) { return std::string(std::strerror(err)); }
}  // namespace detail

/// A read-only, private memory map of a whole file. Move-only; unmaps on destruction.
class MappedFile {
 public:
  MappedFile() = default;

  explicit MappedFile(std::filesystem::path path) : path_(std::move(path)) {
    const std::string p = path_.string();
    const int fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw io_error("cannot open: " + detail::errno_text(errno), {p, {}, {}});
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      const int err = errno;
      ::close(fd);
      throw io_error("cannot stat: " + detail::errno_text(err), {p, {}, {}});
    }
    if (!S_ISREG(st.st_mode)) {
      ::close(fd);
      throw io_error("not a regular file", {p, {}, {}});
    }
    size_ = static_cast<std::size_t>(st.st_size);
    if (size_ > 0) {
      void* m = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
      if (m == MAP_FAILED) {
        const int err = errno;
        ::close(fd);
        throw io_error("cannot mmap " + std::to_string(size_) + " bytes: " + detail::errno_text(err), {p, {}, {}});
      }
      data_ = static_cast<const std::byte*>(m);
    }
    ::close(fd);
  }

  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  MappedFile(MappedFile&& o) noexcept { swap(o); }
  MappedFile& operator=(MappedFile&& o) noexcept {
    if (this != &o) {
      MappedFile tmp(std::move(o));
      swap(tmp);
    }
    return *this;
  }
  ~MappedFile() {
    if (data_ != nullptr) ::munmap(const_cast<std::byte*>(data_), size_);
  }

  const std::byte* data() const noexcept { return data_; }
  std::size_t size() const noexcept { return size_; }
  std::span<const std::byte> bytes() const noexcept { return {data_, size_}; }
  const std::filesystem::path& path() const noexcept { return path_; }

 private:
  void swap(MappedFile& o) noexcept {
    std::swap(path_, o.path_);
    std::swap(data_, o.data_);
    std::swap(size_, o.size_);
  }
  std::filesystem::path path_;
  const std::byte* data_ = nullptr;
  std::size_t size_ = 0;
};

/// Sequential writer handed to write_atomically's callback. Every write is checked.
class FileSink {
 public:
  FileSink(int fd, std::string path) : fd_(fd), path_(std::move(path)) {}
  void write(const void* data, std::size_t n) {
    const auto* p = static_cast<const char*>(data);
    while (n > 0) {
      const ssize_t w = ::write(fd_, p, n);
      if (w < 0) {
        if (errno == EINTR) continue;
        throw io_error("write failed: " + detail::errno_text(errno), {path_, {}, written_});
      }
      p += w;
      n -= static_cast<std::size_t>(w);
      written_ += static_cast<std::uint64_t>(w);
    }
  }
  void write(std::span<const std::byte> bytes) { write(bytes.data(), bytes.size()); }
  std::uint64_t written() const noexcept { return written_; }

 private:
  int fd_;
  std::string path_;
  std::uint64_t written_ = 0;
};

/// Writes `path` crash-safely: the callback fills a temporary file in the same directory, which
/// is fsynced and renamed over `path`, then the directory is fsynced. If anything throws, the
/// temporary is removed and an existing `path` is left untouched.
inline void write_atomically(const std::filesystem::path& path, const std::function<void(FileSink&)>& fill) {
  const std::string target = path.string();
  std::filesystem::path dir = path.parent_path();
  if (dir.empty()) dir = ".";
  std::string tmpl = (dir / ("." + path.filename().string() + ".tmp.XXXXXX")).string();
  const int fd = ::mkstemp(tmpl.data());
  if (fd < 0) throw io_error("cannot create temporary file in '" + dir.string() + "': " + detail::errno_text(errno), {target, {}, {}});
  const std::string tmp = tmpl;
  auto fail = [&](const std::string& what, int err) {
    ::close(fd);
    ::unlink(tmp.c_str());
    throw io_error(what + ": " + detail::errno_text(err), {target, {}, {}});
  };
  try {
    FileSink sink(fd, target);
    fill(sink);
  } catch (...) {
    ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  if (::fchmod(fd, 0644) != 0) fail("cannot chmod temporary file", errno);
  if (::fsync(fd) != 0) fail("fsync failed", errno);
  if (::close(fd) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    throw io_error("close failed: " + detail::errno_text(err), {target, {}, {}});
  }
  if (::rename(tmp.c_str(), target.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    throw io_error("cannot rename temporary file into place: " + detail::errno_text(err), {target, {}, {}});
  }
  const int dfd = ::open(dir.string().c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

}  // namespace s2lc::io
