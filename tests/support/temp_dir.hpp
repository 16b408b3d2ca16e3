// tests/support/temp_dir.hpp: a scratch folder per test case, removed with everything in it when
// the case ends (also when it fails by exception). Shared by every test that writes checkpoints,
// offload folders or outputs, so that all of them name, create and clean their folders alike.
#pragma once

#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <string>
#include <string_view>
#include <system_error>

namespace stowage_test {

/// `<tmp>/stowage-<tag>-<pid>-<n>`, created empty (a leftover of a crashed run with the same pid
/// is removed first); n counts the folders of this process, so cases never share one.
class temp_dir {
 public:
  explicit temp_dir(std::string_view tag)
      : path(std::filesystem::temp_directory_path() /
             ("stowage-" + std::string(tag) + "-" + std::to_string(::getpid()) + "-" +
              std::to_string(counter().fetch_add(1)))) {
    std::filesystem::remove_all(path);
    std::filesystem::create_directories(path);
  }
  ~temp_dir() {
    std::error_code ec;  // cleanup must not throw from a destructor
    std::filesystem::remove_all(path, ec);
  }
  temp_dir(const temp_dir&) = delete;
  temp_dir& operator=(const temp_dir&) = delete;

  std::filesystem::path path;

 private:
  static std::atomic<int>& counter() {
    static std::atomic<int> n{0};
    return n;
  }
};

}  // namespace stowage_test
