// stowage/exec/cpu/embedding.hpp: token embedding lookup (nn.Embedding.forward): one row of the
// [vocab, hidden] table per id, widened to float32. An id outside the table is an error, not
// a read past the end.
#pragma once

#include <stowage/core/error.hpp>
#include <stowage/exec/cpu/weight_ref.hpp>

#include <cstdint>
#include <span>
#include <string>

namespace stowage::exec::cpu {

/// out[i, :] = table[ids[i], :]; out holds ids.size() * table.cols floats.
inline void embedding(const weight_ref& table, std::span<const std::int64_t> ids,
                      std::span<float> out) {
  check_readable(table);
  if (out.size() != ids.size() * static_cast<std::size_t>(table.cols))
    throw invalid_size("embedding '" + table.name + "': output has " + std::to_string(out.size()) +
                       " values, expected " + std::to_string(ids.size()) + " x " +
                       std::to_string(table.cols));
  for (std::size_t i = 0; i < ids.size(); ++i) {
    const std::int64_t id = ids[i];
    if (id < 0 || id >= table.rows)
      throw invalid_size("embedding '" + table.name + "': token id " + std::to_string(id) +
                         " at position " + std::to_string(i) + " is outside the vocabulary [0, " +
                         std::to_string(table.rows) + ")");
    decode_rows(table, id, id + 1, out.data() + i * static_cast<std::size_t>(table.cols));
  }
}

}  // namespace stowage::exec::cpu
