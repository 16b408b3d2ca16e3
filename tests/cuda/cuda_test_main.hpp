// Catch2 main for GPU tests: include it in exactly one place per test program (after defining
// nothing). Without a CUDA device the program says so and exits with 4, ctest's "skipped" code.
#pragma once
#define CATCH_CONFIG_RUNNER
#include <cuda_runtime_api.h>
#include <catch2/catch.hpp>

#include <cstdio>

int main(int argc, char** argv) {
  int n = 0;
  const cudaError_t rc = cudaGetDeviceCount(&n);
  if (rc != cudaSuccess || n == 0) {
    std::printf("SKIPPED: no CUDA device available (%s); GPU tests run on machines with one.\n",
                rc != cudaSuccess ? cudaGetErrorString(rc) : "0 devices");
    return 4;
  }
  return Catch::Session().run(argc, argv);
}
