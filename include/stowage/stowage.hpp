// stowage/stowage.hpp: the umbrella header. Includes every public header that builds without
// CUDA; <stowage/cuda.hpp> adds the GPU parts.
#pragma once

#include <stowage/config.hpp>
#include <stowage/core/byte_size.hpp>
#include <stowage/core/diagnostics.hpp>
#include <stowage/core/dtype.hpp>
#include <stowage/core/error.hpp>
#include <stowage/core/memory_size.hpp>
#include <stowage/core/tensor_desc.hpp>
#include <stowage/module/init_empty.hpp>
#include <stowage/module/leaf_modules.hpp>
#include <stowage/module/module_list.hpp>
#include <stowage/module/module_tree.hpp>
#include <stowage/module/module_tree_json.hpp>
#include <stowage/module/parameter.hpp>
#include <stowage/module/reflection.hpp>
#include <stowage/module/to_module_tree.hpp>
#include <stowage/module/traverse.hpp>
#include <stowage/precision/concepts.hpp>
#include <stowage/precision/floating.hpp>
#include <stowage/storage/concepts.hpp>
#include <stowage/storage/deep_copy.hpp>
#include <stowage/storage/device.hpp>
#include <stowage/storage/host.hpp>
#include <stowage/storage/pinned_host.hpp>
