// stowage-generate compiled by nvcc (CUDA builds): the same program as main.cpp, in a
// translation unit where from_pretrained can run device maps with a GPU entry on the CUDA
// forward (docs/dispatch.md, "GPU execution"). CPU-only builds compile main.cpp with the C++
// compiler instead.
#include "main.cpp"
