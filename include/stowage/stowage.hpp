// stowage/stowage.hpp: the umbrella header. Includes every public header that builds without
// CUDA; <stowage/cuda.hpp> adds the GPU parts.
#pragma once

#include <stowage/config.hpp>
#include <stowage/core/byte_size.hpp>
#include <stowage/core/dtype.hpp>
#include <stowage/core/error.hpp>
#include <stowage/core/memory_size.hpp>
#include <stowage/core/tensor_desc.hpp>
#include <stowage/module/module_tree.hpp>
#include <stowage/module/module_tree_json.hpp>
#include <stowage/core/diagnostics.hpp>
#include <stowage/storage/concepts.hpp>
#include <stowage/storage/deep_copy.hpp>
#include <stowage/storage/device.hpp>
#include <stowage/storage/host.hpp>
#include <stowage/storage/pinned_host.hpp>
