// stowage/core/diagnostics.hpp: where stowage's warnings go. Library code never writes to
// stderr directly: it calls warn(), which forwards to a replaceable sink (stderr by default),
// so an application can route messages into its own logging or collect them in tests.
#pragma once

#include <stowage/config.hpp>

#include <cstdio>
#include <functional>
#include <mutex>
#include <string>
#include <string_view>
#include <utility>

namespace stowage {

enum class severity { info, warning };

using diagnostic_sink = std::function<void(severity, std::string_view)>;

namespace detail {
struct diagnostics_state {
  std::mutex mutex;
  diagnostic_sink sink;
};
inline diagnostics_state& diagnostics() {
  static diagnostics_state s;
  return s;
}
}  // namespace detail

/// Replaces the sink; returns the previous one. An empty sink restores the stderr default.
inline diagnostic_sink set_diagnostic_sink(diagnostic_sink sink) {
  auto& s = detail::diagnostics();
  std::lock_guard lock(s.mutex);
  return std::exchange(s.sink, std::move(sink));
}

/// Reports a message through the current sink.
inline void report(severity sev, std::string_view message) {
  auto& s = detail::diagnostics();
  std::lock_guard lock(s.mutex);
  if (s.sink) {
    s.sink(sev, message);
    return;
  }
  std::fprintf(stderr, "stowage: %s: %.*s\n", sev == severity::warning ? "warning" : "info",
               static_cast<int>(message.size()), message.data());
}
inline void warn(std::string_view message) { report(severity::warning, message); }

}  // namespace stowage
