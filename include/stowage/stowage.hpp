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
