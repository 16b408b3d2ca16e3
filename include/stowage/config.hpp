// stowage/config.hpp: version, feature macros and the overridable assertion/throw hooks.
// Every other header includes this one first.
#pragma once

#define STOWAGE_VERSION_MAJOR 0
#define STOWAGE_VERSION_MINOR 1
#define STOWAGE_VERSION_PATCH 0
#define STOWAGE_VERSION_STRING "0.1.0"

#if __cplusplus < 202002L
#error "stowage needs C++20 (-std=c++20)"
#endif

// STOWAGE_WITH_CUDA is defined (to 1) by the stowage::cuda CMake target. Code that needs the
// CUDA runtime is guarded by it; everything else builds and runs without a GPU.
#if defined(STOWAGE_WITH_CUDA) && !STOWAGE_WITH_CUDA
#undef STOWAGE_WITH_CUDA
#endif

// Preconditions that a correct program never violates (not input validation: bad input always
// throws a typed stowage::error). Override before including stowage to route to your own handler.
#ifndef STOWAGE_ASSERT
#include <cassert>
#define STOWAGE_ASSERT(cond, msg) assert((cond) && (msg))
#endif

// Host code reports failures with exceptions; device code never does.
#if defined(__CUDACC__)
#define STOWAGE_HOST_DEVICE __host__ __device__
#else
#define STOWAGE_HOST_DEVICE
#endif
