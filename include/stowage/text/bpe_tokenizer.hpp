// stowage/text/bpe_tokenizer.hpp: a byte-level BPE tokenizer that loads a Hugging Face
// tokenizer.json (GPT-2, Llama-3, Qwen2 and their relatives) and produces the ids the Python
// `tokenizers` package produces. std::regex has no \p{L}, so the three pre-tokenizer patterns
// in use are implemented as hand-written scanners that follow the regexes' leftmost-first
// alternation and backtracking exactly, over a generated Unicode category table
// (unicode_tables.hpp). Then: the GPT-2 byte-to-unicode mapping, merges applied by rank,
// added/special tokens split out first, TemplateProcessing for BOS, and the ByteLevel decoder.
//
// Supported tokenizer.json parts (anything else is rejected with a json_error naming the key):
//   normalizer: null or NFC (NFC is assumed, not applied: input must already be NFC)
//   pre_tokenizer: ByteLevel(use_regex=true) | Sequence[Split(<GPT-2/Llama-3/Qwen2 pattern>,
//                  Isolated), ByteLevel(use_regex=false)]
//   model: BPE (ignore_merges honoured; no dropout, no byte_fallback, no subword affixes)
//   post_processor: null | ByteLevel | TemplateProcessing (single sequence)
//   decoder: ByteLevel
#pragma once

#include <stowage/core/error.hpp>
#include <stowage/text/unicode_tables.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <cstdint>
#include <fstream>
#include <limits>
#include <map>
#include <optional>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace stowage::text {

/// Which split pattern the pre-tokenizer applies.
enum class pretokenizer_style : std::uint8_t {
  gpt2,    ///< 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
  llama3,  ///< case-insensitive contractions, [^\r\n\p{L}\p{N}]?\p{L}+, \p{N}{1,3}, ...
  qwen2,   ///< as llama3 with single digits (\p{N})
};

namespace detail {

inline bool in_ranges(std::span<const code_point_range> r, std::uint32_t cp) noexcept {
  auto it =
      std::upper_bound(r.begin(), r.end(), cp,
                       [](std::uint32_t c, const code_point_range& x) { return c < x.first; });
  return it != r.begin() && cp <= std::prev(it)->last;
}
inline bool is_letter(std::uint32_t cp) noexcept {
  if (cp < 0x80) return (cp | 0x20U) >= 'a' && (cp | 0x20U) <= 'z';
  return in_ranges(letter_ranges, cp);
}
inline bool is_number(std::uint32_t cp) noexcept {
  if (cp < 0x80) return cp >= '0' && cp <= '9';
  return in_ranges(number_ranges, cp);
}
/// \s in the regex engines' Unicode mode: the White_Space property.
inline bool is_space(std::uint32_t cp) noexcept {
  return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F ||
         cp == 0x205F || cp == 0x3000;
}
inline bool is_other(std::uint32_t cp) noexcept {
  return !is_space(cp) && !is_letter(cp) && !is_number(cp);
}

/// Code points with their byte offsets; an invalid UTF-8 byte becomes one "other" unit.
struct utf8_text {
  std::vector<std::uint32_t> cp;
  std::vector<std::size_t> off;  ///< cp.size() + 1 entries
};
inline utf8_text decode_utf8(std::string_view s) {
  utf8_text t;
  std::size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    std::uint32_t cp = 0xFFFD;
    std::size_t n = 1;
    auto cont = [&](std::size_t k) {
      return i + k < s.size() && (static_cast<unsigned char>(s[i + k]) & 0xC0) == 0x80;
    };
    if (c < 0x80) {
      cp = c;
    } else if ((c & 0xE0) == 0xC0 && c >= 0xC2 && cont(1)) {
      cp = ((c & 0x1FU) << 6) | (static_cast<unsigned char>(s[i + 1]) & 0x3FU);
      n = 2;
    } else if ((c & 0xF0) == 0xE0 && cont(1) && cont(2)) {
      cp = ((c & 0x0FU) << 12) | ((static_cast<unsigned char>(s[i + 1]) & 0x3FU) << 6) |
           (static_cast<unsigned char>(s[i + 2]) & 0x3FU);
      n = cp >= 0x800 && (cp < 0xD800 || cp > 0xDFFF) ? 3 : 1;
      if (n == 1) cp = 0xFFFD;
    } else if ((c & 0xF8) == 0xF0 && cont(1) && cont(2) && cont(3)) {
      cp = ((c & 0x07U) << 18) | ((static_cast<unsigned char>(s[i + 1]) & 0x3FU) << 12) |
           ((static_cast<unsigned char>(s[i + 2]) & 0x3FU) << 6) |
           (static_cast<unsigned char>(s[i + 3]) & 0x3FU);
      n = cp >= 0x10000 && cp <= 0x10FFFF ? 4 : 1;
      if (n == 1) cp = 0xFFFD;
    }
    t.cp.push_back(cp);
    t.off.push_back(i);
    i += n;
  }
  t.off.push_back(s.size());
  return t;
}

inline void append_utf8(std::string& out, std::uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

/// Length (in code points) of the pattern's match at i; every position matches something
/// (each code point is \s, \p{L}, \p{N} or neither), so matches tile the text.
inline std::size_t match_at(const std::vector<std::uint32_t>& c, std::size_t i,
                            pretokenizer_style st) {
  const std::size_t n = c.size();
  auto valid = [&](std::size_t k) { return k < n; };
  auto lower = [](std::uint32_t x) { return x < 0x80 ? (x | 0x20U) : x; };
  auto run = [&](std::size_t k, auto pred) {
    while (k < n && pred(c[k])) ++k;
    return k;
  };
  const bool ci = st != pretokenizer_style::gpt2;  // (?i:...) contractions
  // 1. contractions
  if (c[i] == '\'' && valid(i + 1)) {
    auto eq = [&](std::size_t k, char ch) {
      return valid(k) && (ci ? lower(c[k]) : c[k]) == static_cast<std::uint32_t>(ch);
    };
    if (eq(i + 1, 's') || eq(i + 1, 't') || eq(i + 1, 'm') || eq(i + 1, 'd')) return 2;
    if ((eq(i + 1, 'r') && eq(i + 2, 'e')) || (eq(i + 1, 'v') && eq(i + 2, 'e')) ||
        (eq(i + 1, 'l') && eq(i + 2, 'l')))
      return 3;
  }
  if (st == pretokenizer_style::gpt2) {
    const std::size_t s0 = c[i] == ' ' ? i + 1 : i;  // " ?" then a class run
    if (valid(s0) && is_letter(c[s0])) return run(s0, is_letter) - i;
    if (valid(s0) && is_number(c[s0])) return run(s0, is_number) - i;
    if (valid(s0) && is_other(c[s0])) return run(s0, is_other) - i;
  } else {
    // [^\r\n\p{L}\p{N}]?\p{L}+
    const std::uint32_t x = c[i];
    if (x != '\r' && x != '\n' && !is_letter(x) && !is_number(x) && valid(i + 1) &&
        is_letter(c[i + 1]))
      return run(i + 1, is_letter) - i;
    if (is_letter(x)) return run(i, is_letter) - i;
    // \p{N}{1,3} or \p{N}
    if (is_number(x)) {
      const std::size_t maxd = st == pretokenizer_style::llama3 ? 3 : 1;
      std::size_t k = i;
      while (k < n && k - i < maxd && is_number(c[k])) ++k;
      return k - i;
    }
    //  ?[^\s\p{L}\p{N}]+[\r\n]*
    const std::size_t s0 = x == ' ' ? i + 1 : i;
    if (valid(s0) && is_other(c[s0])) {
      std::size_t k = run(s0, is_other);
      k = run(k, [](std::uint32_t y) { return y == '\r' || y == '\n'; });
      return k - i;
    }
    // \s*[\r\n]+ : up to the end of the last \r\n group inside the whitespace run
    const std::size_t e = run(i, is_space);
    std::size_t last = e;
    for (std::size_t k = e; k > i; --k)
      if (c[k - 1] == '\r' || c[k - 1] == '\n') {
        last = k;
        break;
      }
    if (last != e || (e > i && (c[e - 1] == '\r' || c[e - 1] == '\n'))) return last - i;
  }
  // \s+(?!\S) then \s+
  const std::size_t e = run(i, is_space);
  if (e > i) {
    if (e == n || e - i == 1) return e - i;  // at the end, or a single space before \S: plain \s+
    return e - 1 - i;                        // leave the last space to the next piece
  }
  return 1;  // unreachable for valid classes; keeps progress guaranteed
}

/// The GPT-2 byte -> printable code point table.
inline const std::array<std::uint32_t, 256>& byte_to_unicode() {
  static const std::array<std::uint32_t, 256> t = [] {
    std::array<std::uint32_t, 256> a{};
    std::uint32_t extra = 0;
    for (std::uint32_t b = 0; b < 256; ++b) {
      const bool keep =
          (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      a[b] = keep ? b : 256 + extra++;
    }
    return a;
  }();
  return t;
}

}  // namespace detail

/// One added (special or not) token of tokenizer.json.
struct added_token {
  std::int64_t id = 0;
  std::string content;
  bool special = false;
  bool lstrip = false;
  bool rstrip = false;
};

class bpe_tokenizer {
 public:
  static bpe_tokenizer from_file(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw io_error(path, "cannot open tokenizer.json");
    std::stringstream ss;
    ss << in.rdbuf();
    nlohmann::json j = nlohmann::json::parse(ss.str(), nullptr, false);
    if (j.is_discarded()) throw json_error(path, "not valid JSON");
    return from_json(j, path);
  }

  static bpe_tokenizer from_json(const nlohmann::json& j,
                                 const std::string& src = "<tokenizer.json>") {
    bpe_tokenizer t;
    auto fail = [&](const std::string& key, const std::string& what) {
      throw json_error(src + ": " + key, what);
    };
    if (!j.is_object()) fail("", "expected an object");
    // normalizer
    if (auto it = j.find("normalizer"); it != j.end() && !it->is_null()) {
      if (!it->is_object() || it->value("type", "") != "NFC")
        fail("normalizer", "only null or NFC is supported");
    }
    // pre-tokenizer
    const auto pt = j.value("pre_tokenizer", nlohmann::json());
    if (!pt.is_object()) fail("pre_tokenizer", "expected an object");
    const std::string ptype = pt.value("type", "");
    if (ptype == "ByteLevel") {
      if (!pt.value("use_regex", true))
        fail("pre_tokenizer.use_regex", "ByteLevel without a split pattern is not supported");
      t.style_ = pretokenizer_style::gpt2;
      t.add_prefix_space_ = pt.value("add_prefix_space", false);
    } else if (ptype == "Sequence") {
      const auto& seq = pt.at("pretokenizers");
      if (!seq.is_array() || seq.size() != 2 || seq[0].value("type", "") != "Split" ||
          seq[1].value("type", "") != "ByteLevel")
        fail("pre_tokenizer.pretokenizers", "expected [Split, ByteLevel]");
      const auto& sp = seq[0];
      if (sp.value("behavior", "") != "Isolated" || sp.value("invert", false))
        fail("pre_tokenizer.pretokenizers[0].behavior",
             "only Isolated, not inverted, is supported");
      const std::string pat = sp.contains("pattern") && sp["pattern"].contains("Regex")
                                  ? sp["pattern"]["Regex"].get<std::string>()
                                  : std::string();
      if (pat == llama3_pattern)
        t.style_ = pretokenizer_style::llama3;
      else if (pat == qwen2_pattern)
        t.style_ = pretokenizer_style::qwen2;
      else if (pat == gpt2_pattern)
        t.style_ = pretokenizer_style::gpt2;
      else
        fail("pre_tokenizer.pretokenizers[0].pattern.Regex",
             "unsupported split pattern '" + pat + "'");
      if (seq[1].value("use_regex", true))
        fail("pre_tokenizer.pretokenizers[1].use_regex", "expected false after a Split");
      t.add_prefix_space_ = seq[1].value("add_prefix_space", false);
    } else {
      fail("pre_tokenizer.type",
           "'" + ptype + "' is not supported (ByteLevel or Sequence[Split, ByteLevel])");
    }
    // model
    const auto& m = j.at("model");
    if (m.value("type", "") != "BPE") fail("model.type", "only BPE is supported");
    if (m.contains("dropout") && !m["dropout"].is_null())
      fail("model.dropout", "BPE dropout is not supported");
    if (m.value("byte_fallback", false))
      fail("model.byte_fallback", "not supported by the byte-level tokenizer");
    for (const char* k : {"continuing_subword_prefix", "end_of_word_suffix"})
      if (m.contains(k) && !m[k].is_null() && !m[k].get<std::string>().empty())
        fail(std::string("model.") + k, "not supported");
    t.ignore_merges_ = m.value("ignore_merges", false);
    for (const auto& [tok, id] : m.at("vocab").items()) {
      if (!id.is_number_integer() || id.get<std::int64_t>() < 0)
        fail("model.vocab." + tok, "expected an id >= 0");
      t.vocab_.emplace(tok, id.get<std::int64_t>());
    }
    std::int64_t rank = 0;
    for (const auto& mg : m.at("merges")) {
      std::string a, b;
      if (mg.is_string()) {
        const auto s = mg.get<std::string>();
        const auto sp = s.find(' ');
        if (sp == std::string::npos)
          fail("model.merges[" + std::to_string(rank) + "]", "expected 'left right'");
        a = s.substr(0, sp);
        b = s.substr(sp + 1);
      } else if (mg.is_array() && mg.size() == 2) {
        a = mg[0].get<std::string>();
        b = mg[1].get<std::string>();
      } else {
        fail("model.merges[" + std::to_string(rank) + "]", "expected a string or a pair");
      }
      const auto ia = t.vocab_.find(a), ib = t.vocab_.find(b), im = t.vocab_.find(a + b);
      if (ia == t.vocab_.end() || ib == t.vocab_.end() || im == t.vocab_.end())
        fail("model.merges[" + std::to_string(rank) + "]",
             "'" + a + "' + '" + b + "' is not in the vocabulary");
      t.merges_.emplace(pair_key(ia->second, ib->second), std::pair{rank, im->second});
      ++rank;
    }
    // added tokens
    if (auto it = j.find("added_tokens"); it != j.end() && it->is_array())
      for (const auto& a : *it) {
        added_token at;
        at.id = a.at("id").get<std::int64_t>();
        at.content = a.at("content").get<std::string>();
        at.special = a.value("special", false);
        at.lstrip = a.value("lstrip", false);
        at.rstrip = a.value("rstrip", false);
        if (at.content.empty()) fail("added_tokens", "empty content");
        t.added_.push_back(at);
      }
    // id -> token
    std::int64_t max_id = -1;
    for (const auto& [k, v] : t.vocab_) max_id = std::max(max_id, v);
    for (const auto& a : t.added_) max_id = std::max(max_id, a.id);
    t.id_to_token_.assign(static_cast<std::size_t>(max_id + 1), std::string());
    t.is_added_.assign(t.id_to_token_.size(), 0);
    for (const auto& [k, v] : t.vocab_) t.id_to_token_[static_cast<std::size_t>(v)] = k;
    for (const auto& a : t.added_) {
      t.id_to_token_[static_cast<std::size_t>(a.id)] = a.content;
      t.is_added_[static_cast<std::size_t>(a.id)] = a.special ? 2 : 1;
    }
    const auto& bu = detail::byte_to_unicode();
    for (std::size_t b = 0; b < 256; ++b) {
      std::string s;
      detail::append_utf8(s, bu[b]);
      const auto it = t.vocab_.find(s);
      t.byte_id_[b] = it == t.vocab_.end() ? -1 : it->second;
      t.unicode_to_byte_.emplace(bu[b], static_cast<std::uint8_t>(b));
    }
    // post-processor
    if (auto it = j.find("post_processor"); it != j.end() && !it->is_null()) {
      const std::string type = it->value("type", "");
      if (type == "TemplateProcessing") {
        for (const auto& piece : it->at("single")) {
          if (piece.contains("Sequence")) {
            t.template_.push_back(-1);
          } else if (piece.contains("SpecialToken")) {
            const auto name = piece["SpecialToken"].at("id").get<std::string>();
            const auto& st = it->at("special_tokens").at(name);
            for (const auto& id : st.at("ids")) t.template_.push_back(id.get<std::int64_t>());
          } else {
            fail("post_processor.single", "unknown template piece");
          }
        }
      } else if (type != "ByteLevel") {
        fail("post_processor.type",
             "'" + type + "' is not supported (TemplateProcessing, ByteLevel)");
      }
    }
    if (auto it = j.find("decoder");
        it != j.end() && !it->is_null() && it->value("type", "") != "ByteLevel")
      fail("decoder.type", "only ByteLevel is supported");
    return t;
  }

  pretokenizer_style style() const noexcept { return style_; }
  std::size_t vocab_size() const noexcept { return id_to_token_.size(); }
  std::optional<std::int64_t> token_to_id(std::string_view tok) const {
    for (const auto& a : added_)
      if (a.content == tok) return a.id;
    auto it = vocab_.find(std::string(tok));
    return it == vocab_.end() ? std::nullopt : std::optional<std::int64_t>(it->second);
  }
  const std::vector<added_token>& added_tokens() const noexcept { return added_; }

  /// The pre-tokenizer's pieces of `text` (byte ranges), before byte mapping; exposed for tests.
  std::vector<std::string> pre_tokenize(std::string_view text) const {
    std::vector<std::string> out;
    const auto u = detail::decode_utf8(text);
    for (std::size_t i = 0; i < u.cp.size();) {
      const std::size_t len = detail::match_at(u.cp, i, style_);
      out.emplace_back(text.substr(u.off[i], u.off[i + len] - u.off[i]));
      i += len;
    }
    return out;
  }

  /// Ids of `text`; with add_special_tokens the post-processor's template (e.g. BOS) is applied.
  std::vector<std::int64_t> encode(std::string_view text, bool add_special_tokens = false) const {
    std::vector<std::int64_t> ids;
    // Split out added tokens (leftmost match; the longest at that position).
    std::size_t pos = 0;
    while (pos <= text.size()) {
      std::size_t best_at = text.size(), best_len = 0;
      const added_token* best = nullptr;
      for (const auto& a : added_) {
        const auto f = text.find(a.content, pos);
        if (f == std::string_view::npos) continue;
        if (f < best_at || (f == best_at && a.content.size() > best_len)) {
          best_at = f;
          best_len = a.content.size();
          best = &a;
        }
      }
      std::size_t seg_end = best ? best_at : text.size();
      std::size_t next = best ? best_at + best_len : text.size() + 1;
      if (best && best->lstrip)
        while (seg_end > pos && detail::is_space(static_cast<unsigned char>(text[seg_end - 1])))
          --seg_end;
      if (best && best->rstrip)
        while (next < text.size() && detail::is_space(static_cast<unsigned char>(text[next])))
          ++next;
      encode_plain(text.substr(pos, seg_end - pos), ids, pos == 0);
      if (!best) break;
      ids.push_back(best->id);
      pos = next;
    }
    if (!add_special_tokens || template_.empty()) return ids;
    std::vector<std::int64_t> out;
    for (auto t : template_)
      if (t < 0)
        out.insert(out.end(), ids.begin(), ids.end());
      else
        out.push_back(t);
    return out;
  }

  /// Text of `ids` (ByteLevel decoder; invalid UTF-8 becomes U+FFFD as Python's lossy decode).
  std::string decode(std::span<const std::int64_t> ids, bool skip_special_tokens = false) const {
    std::string bytes;
    for (std::size_t k = 0; k < ids.size(); ++k) {
      const auto id = ids[k];
      if (id < 0 || static_cast<std::size_t>(id) >= id_to_token_.size() ||
          (id_to_token_[static_cast<std::size_t>(id)].empty() &&
           !is_added_[static_cast<std::size_t>(id)]))
        throw invalid_size("bpe_tokenizer::decode: id " + std::to_string(id) + " at position " +
                           std::to_string(k) + " is not in the vocabulary");
      if (skip_special_tokens && is_added_[static_cast<std::size_t>(id)] == 2) continue;
      const std::string& tok = id_to_token_[static_cast<std::size_t>(id)];
      const auto u = detail::decode_utf8(tok);
      std::string mapped;
      bool all = true;
      for (auto cp : u.cp) {
        auto it = unicode_to_byte_.find(cp);
        if (it == unicode_to_byte_.end()) {
          all = false;
          break;
        }
        mapped += static_cast<char>(it->second);
      }
      bytes += all ? mapped : tok;
    }
    return lossy_utf8(bytes);
  }

  static constexpr std::string_view gpt2_pattern =
      R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
  static constexpr std::string_view llama3_pattern =
      R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
  static constexpr std::string_view qwen2_pattern =
      R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

 private:
  static std::uint64_t pair_key(std::int64_t a, std::int64_t b) noexcept {
    return (static_cast<std::uint64_t>(a) << 32) | static_cast<std::uint64_t>(b);
  }

  static std::string lossy_utf8(const std::string& b) {
    std::string out;
    const auto u = detail::decode_utf8(b);
    for (std::size_t i = 0; i < u.cp.size(); ++i) {
      if (u.cp[i] == 0xFFFD &&
          !(u.off[i + 1] - u.off[i] == 3 && b.compare(u.off[i], 3, "\xEF\xBF\xBD") == 0))
        out += "\xEF\xBF\xBD";
      else
        out.append(b, u.off[i], u.off[i + 1] - u.off[i]);
    }
    return out;
  }

  void encode_plain(std::string_view text, std::vector<std::int64_t>& ids, bool at_start) const {
    if (text.empty()) return;
    std::string buf;
    if (add_prefix_space_ && at_start && text.front() != ' ') {
      buf = " ";
      buf += text;
      text = buf;
    }
    for (const auto& piece : pre_tokenize(text)) bpe(piece, ids);
  }

  void bpe(const std::string& piece, std::vector<std::int64_t>& ids) const {
    const auto& bu = detail::byte_to_unicode();
    if (ignore_merges_) {
      std::string mapped;
      for (unsigned char b : piece) detail::append_utf8(mapped, bu[b]);
      if (auto it = vocab_.find(mapped); it != vocab_.end()) {
        ids.push_back(it->second);
        return;
      }
    }
    std::vector<std::int64_t> sym;
    sym.reserve(piece.size());
    for (unsigned char b : piece) {
      if (byte_id_[b] < 0)
        throw model_error("bpe_tokenizer: byte 0x" + std::to_string(b) +
                          " has no token in the vocabulary");
      sym.push_back(byte_id_[b]);
    }
    // Repeatedly merge the adjacent pair of lowest rank (leftmost on ties), as the BPE model does.
    while (sym.size() > 1) {
      std::int64_t best_rank = std::numeric_limits<std::int64_t>::max(), best_id = -1;
      std::size_t best_i = 0;
      for (std::size_t i = 0; i + 1 < sym.size(); ++i) {
        auto it = merges_.find(pair_key(sym[i], sym[i + 1]));
        if (it != merges_.end() && it->second.first < best_rank) {
          best_rank = it->second.first;
          best_id = it->second.second;
          best_i = i;
        }
      }
      if (best_id < 0) break;
      sym[best_i] = best_id;
      sym.erase(sym.begin() + static_cast<std::ptrdiff_t>(best_i) + 1);
    }
    ids.insert(ids.end(), sym.begin(), sym.end());
  }

  pretokenizer_style style_ = pretokenizer_style::gpt2;
  bool add_prefix_space_ = false;
  bool ignore_merges_ = false;
  std::unordered_map<std::string, std::int64_t> vocab_;
  std::unordered_map<std::uint64_t, std::pair<std::int64_t, std::int64_t>> merges_;
  std::vector<added_token> added_;
  std::vector<std::string> id_to_token_;
  std::vector<std::uint8_t> is_added_;  ///< 0 no, 1 added, 2 special
  std::array<std::int64_t, 256> byte_id_{};
  std::unordered_map<std::uint32_t, std::uint8_t> unicode_to_byte_;
  std::vector<std::int64_t> template_;  ///< -1 marks the sequence
};

}  // namespace stowage::text
