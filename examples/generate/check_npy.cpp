// Test helper of stowage-generate: runs it on a tiny model with the fixture's prompt and
// --dump-logits, reads the .npy back (a minimal v1.0 reader: '<f4', C order, 1-D) and checks
// the logits against Transformers' logits of the last prompt position (fixture) within 1e-4.
// usage: check_npy GENERATE FIXTURE.json MODEL_DIR OUT.npy [extra stowage-generate args...]
#include "support/tiny_fixture.hpp"

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <initializer_list>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

using stowage_test::b64_floats;

namespace {

int fail(const std::string& why) {
  std::cerr << "check_npy: " << why << "\n";
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 5) return fail("usage: check_npy GENERATE FIXTURE.json MODEL_DIR OUT.npy [args...]");
  std::ifstream fin(argv[2]);
  const auto fx = nlohmann::json::parse(fin);
  const auto prompt = fx["prompt"].get<std::vector<std::int64_t>>();
  std::string ids;
  for (auto t : prompt) ids += (ids.empty() ? "" : ",") + std::to_string(t);
  std::remove(argv[4]);
  // Built by appends: GCC 12 warns (-Wrestrict, a false positive) on the operator+ chain.
  std::string cmd;
  for (const char* part :
       std::initializer_list<const char*>{"\"", argv[1], "\" \"", argv[3], "\" --prompt-ids "})
    cmd += part;
  cmd += ids;
  cmd += " --max-new-tokens 1 --dump-logits \"";
  cmd += argv[4];
  cmd += '"';
  for (int i = 5; i < argc; ++i) {
    cmd += " \"";
    cmd += argv[i];
    cmd += '"';
  }
  std::cout << cmd << "\n" << std::flush;
  if (std::system(cmd.c_str()) != 0) return fail("stowage-generate failed");

  // The .npy: magic, version 1.0, u16 header length, header dict, data.
  std::ifstream in(argv[4], std::ios::binary);
  const std::vector<char> f((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (f.size() < 10 || std::memcmp(f.data(), "\x93NUMPY", 6) != 0) return fail("not a .npy file");
  if (f[6] != 1 || f[7] != 0) return fail("not a v1.0 .npy file");
  const std::size_t hlen = static_cast<unsigned char>(f[8]) |
                           (static_cast<std::size_t>(static_cast<unsigned char>(f[9])) << 8);
  if ((10 + hlen) % 64 != 0) return fail("header not padded to 64 bytes");
  if (f.size() < 10 + hlen) return fail("truncated header");
  const std::string header(f.data() + 10, hlen);
  if (header.back() != '\n') return fail("header does not end with a newline");
  if (header.find("'descr': '<f4'") == std::string::npos) return fail("descr is not '<f4'");
  if (header.find("'fortran_order': False") == std::string::npos) return fail("not C order");
  const auto vocab = fx["vocab_size"].get<std::size_t>();
  if (header.find("'shape': (" + std::to_string(vocab) + ",)") == std::string::npos)
    return fail("shape is not (" + std::to_string(vocab) + ",): " + header);
  if (f.size() != 10 + hlen + vocab * 4) return fail("data size does not match the shape");
  std::vector<float> got(vocab);
  std::memcpy(got.data(), f.data() + 10 + hlen, vocab * 4);

  const auto all = b64_floats(fx["logits_all"]["f32le_b64"].get<std::string>());
  const float* want = all.data() + (prompt.size() - 1) * vocab;
  float worst = 0;
  for (std::size_t i = 0; i < vocab; ++i) worst = std::max(worst, std::abs(got[i] - want[i]));
  std::cout << "max |stowage - transformers| = " << worst << "\n";
  return worst <= 1e-4f ? 0 : fail("logits differ from Transformers' by more than 1e-4");
}
