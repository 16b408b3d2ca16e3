// Must not compile: a meta parameter has no bytes, so reading its data is a compile error that
// says how to get a bound view instead.
// expect: a parameter is a meta descriptor
#include <stowage/module/leaf_modules.hpp>
#include <stowage/precision/floating.hpp>

float first_weight(const stowage::linear<stowage::precision::fp32>& l) {
  return *l.weight.data<float>();
}
