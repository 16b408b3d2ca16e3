// stowage/checkpoint/pickle.hpp: a restricted unpickler for torch.save's data.pkl. It is a small
// stack machine that understands only the opcodes torch writes for state dicts (formats-spec
// §6.2/§6.3) and only the allow-listed globals (collections.OrderedDict, torch._utils rebuild
// functions, torch storage classes, torch dtypes, torch.Size). It never imports or calls
// anything: "calling" an allowed global just builds a record (an empty dict, a tensor
// description). Values live in an arena addressed by index, so hostile input can neither build
// reference cycles that leak nor deep structures whose destruction recurses.
#pragma once

#include <stowage/checkpoint/json_strict.hpp>
#include <stowage/config.hpp>
#include <stowage/core/dtype.hpp>
#include <stowage/core/error.hpp>

#include <cstdint>
#include <cstring>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace stowage::checkpoint {

/// What the persistent id of a storage said: ('storage', <class>, key, location, numel).
struct pickle_storage_ref {
  std::string key;
  std::optional<stowage::dtype> dtype;  ///< nullopt: torch.storage.UntypedStorage (numel = bytes)
  std::string location;
  std::int64_t numel = 0;
};

/// A tensor as _rebuild_tensor_v2/_v3 described it (not yet validated against its storage).
struct pickle_tensor {
  std::uint32_t storage = 0;  ///< index into pickle_result::storages
  stowage::dtype dtype = dtype::float32;
  std::int64_t offset = 0;  ///< in elements
  std::vector<std::int64_t> size, stride;
};

/// The state dict read from data.pkl: (name, tensor index) in dict order.
struct pickle_result {
  std::vector<pickle_storage_ref> storages;
  std::vector<pickle_tensor> tensors;
  std::vector<std::pair<std::string, std::uint32_t>> entries;
};

namespace detail {

enum class pk_kind : std::uint8_t {
  none,
  boolean,
  integer,
  floating,
  string,
  tuple,
  list,
  dict,
  global,
  storage,
  tensor
};

enum class pk_global : std::uint8_t {
  ordered_dict,
  rebuild_tensor_v2,
  rebuild_tensor_v3,
  rebuild_parameter,
  torch_size,
  storage_class,  // typed: dtype set; untyped: no dtype
  dtype_value,
};

struct pk_node {
  pk_kind kind = pk_kind::none;
  pk_global global = pk_global::ordered_dict;
  std::int64_t i = 0;                   // integer / boolean; storage or tensor index
  std::optional<stowage::dtype> dtype;  // storage class or dtype global
  std::string s;                        // string; a global's dotted name
  std::vector<std::uint32_t> items;     // tuple/list elements, dict keys and values interleaved
};

/// Maps an allowed `module.name` to its role; nullopt when the global is not on the list.
inline std::optional<pk_node> allowed_global(std::string_view module, std::string_view name) {
  pk_node n;
  n.kind = pk_kind::global;
  n.s = std::string(module) + "." + std::string(name);
  if (module == "collections" && name == "OrderedDict") {
    n.global = pk_global::ordered_dict;
    return n;
  }
  if (module == "torch._utils") {
    if (name == "_rebuild_tensor_v2")
      n.global = pk_global::rebuild_tensor_v2;
    else if (name == "_rebuild_tensor_v3")
      n.global = pk_global::rebuild_tensor_v3;
    else if (name == "_rebuild_parameter")
      n.global = pk_global::rebuild_parameter;
    else
      return std::nullopt;
    return n;
  }
  if (module == "torch.storage" && name == "UntypedStorage") {
    n.global = pk_global::storage_class;
    return n;
  }
  if (module != "torch") return std::nullopt;
  if (name == "Size") {
    n.global = pk_global::torch_size;
    return n;
  }
  struct storage_name {
    std::string_view name;
    dtype value;
  };
  static constexpr storage_name storages[] = {
      {"DoubleStorage", dtype::float64},
      {"FloatStorage", dtype::float32},
      {"HalfStorage", dtype::float16},
      {"BFloat16Storage", dtype::bfloat16},
      {"LongStorage", dtype::int64},
      {"IntStorage", dtype::int32},
      {"ShortStorage", dtype::int16},
      {"CharStorage", dtype::int8},
      {"ByteStorage", dtype::uint8},
      {"BoolStorage", dtype::bool_},
      {"ComplexFloatStorage", dtype::complex64},
      {"ComplexDoubleStorage", dtype::complex128},
  };
  for (const auto& st : storages) {
    if (st.name == name) {
      n.global = pk_global::storage_class;
      n.dtype = st.value;
      return n;
    }
  }
  // torch.<dtype>: real torch dtypes only (not accelerate's custom planning types).
  if (auto d = parse_dtype(name); d && *d != dtype::custom_int4 && *d != dtype::custom_int2 &&
                                  *d != dtype::custom_fp8 &&
                                  name.find('.') == std::string_view::npos) {
    n.global = pk_global::dtype_value;
    n.dtype = d;
    return n;
  }
  return std::nullopt;
}

/// The stack machine. `pkl` is data.pkl; `file` names the archive in errors; `on_storage` is
/// called once per distinct storage key (it validates the record and may throw).
class restricted_unpickler {
 public:
  static constexpr std::size_t max_nodes = std::size_t(1) << 26;

  restricted_unpickler(std::span<const std::byte> pkl, std::string file, std::string entry)
      : p_(pkl), file_(std::move(file)), entry_(std::move(entry)) {}

  pickle_result run(const std::function<void(const pickle_storage_ref&)>& on_storage) {
    pickle_result res;
    std::unordered_map<std::string, std::uint32_t> storage_by_key;
    std::unordered_map<std::uint32_t, std::uint32_t> memo;
    std::vector<std::uint32_t> stack;
    std::vector<std::size_t> marks;
    auto pop = [&]() -> std::uint32_t {
      if (stack.empty() || (!marks.empty() && stack.size() <= marks.back()))
        fail("stack underflow");
      const auto v = stack.back();
      stack.pop_back();
      return v;
    };
    auto pop_mark = [&]() -> std::vector<std::uint32_t> {
      if (marks.empty()) fail("no MARK on the stack");
      const std::size_t m = marks.back();
      marks.pop_back();
      std::vector<std::uint32_t> items(stack.begin() + static_cast<std::ptrdiff_t>(m), stack.end());
      stack.resize(m);
      return items;
    };
    auto top = [&]() -> std::uint32_t {
      if (stack.empty() || (!marks.empty() && stack.size() <= marks.back()))
        fail("stack underflow");
      return stack.back();
    };
    auto new_node = [&](pk_node n) -> std::uint32_t {
      if (nodes_.size() >= max_nodes) fail("too many objects");
      nodes_.push_back(std::move(n));
      return static_cast<std::uint32_t>(nodes_.size() - 1);
    };
    auto push_new = [&](pk_node n) { stack.push_back(new_node(std::move(n))); };
    auto simple = [](pk_kind k, std::int64_t v = 0) {
      pk_node n;
      n.kind = k;
      n.i = v;
      return n;
    };

    while (true) {
      op_at_ = pos_;
      const auto op = static_cast<std::uint8_t>(byte());
      switch (op) {
        case 0x80:  // PROTO
          byte();
          break;
        case '.': {  // STOP
          const auto result = pop();
          finish(result, res);
          return res;
        }
        case 'c': {  // GLOBAL
          const std::string module = line(), name = line();
          auto g = allowed_global(module, name);
          if (!g)
            fail("global `" + module + "." + name +
                 "` is not allowed (not a tensor/state-dict type)");
          push_new(std::move(*g));
          break;
        }
        case 'q':
          memo[static_cast<std::uint32_t>(byte())] = top();
          break;  // BINPUT
        case 'r':
          memo[static_cast<std::uint32_t>(uint_le(4))] = top();
          break;  // LONG_BINPUT
        case 'h':
        case 'j': {  // BINGET, LONG_BINGET
          const auto k = static_cast<std::uint32_t>(op == 'h' ? static_cast<std::uint8_t>(byte())
                                                              : uint_le(4));
          auto it = memo.find(k);
          if (it == memo.end()) fail("memo key " + std::to_string(k) + " was never stored");
          stack.push_back(it->second);
          break;
        }
        case '(':
          marks.push_back(stack.size());
          break;     // MARK
        case 't': {  // TUPLE
          pk_node n = simple(pk_kind::tuple);
          n.items = pop_mark();
          push_new(std::move(n));
          break;
        }
        case 0x85:
        case 0x86:
        case 0x87: {  // TUPLE1..3
          pk_node n = simple(pk_kind::tuple);
          n.items.resize(op - 0x84U);
          for (std::size_t k = n.items.size(); k-- > 0;) n.items[k] = pop();
          push_new(std::move(n));
          break;
        }
        case ')':
          push_new(simple(pk_kind::tuple));
          break;  // EMPTY_TUPLE
        case '}':
          push_new(simple(pk_kind::dict));
          break;  // EMPTY_DICT
        case ']':
          push_new(simple(pk_kind::list));
          break;     // EMPTY_LIST
        case 's': {  // SETITEM
          const auto v = pop(), k = pop();
          auto& d = node(top());
          if (d.kind != pk_kind::dict) fail("SETITEM on something that is not a dict");
          d.items.push_back(k);
          d.items.push_back(v);
          break;
        }
        case 'u': {  // SETITEMS
          auto items = pop_mark();
          if (items.size() % 2) fail("SETITEMS with an odd number of items");
          auto& d = node(top());
          if (d.kind != pk_kind::dict) fail("SETITEMS on something that is not a dict");
          d.items.insert(d.items.end(), items.begin(), items.end());
          break;
        }
        case 'a': {  // APPEND
          const auto v = pop();
          auto& l = node(top());
          if (l.kind != pk_kind::list) fail("APPEND on something that is not a list");
          l.items.push_back(v);
          break;
        }
        case 'e': {  // APPENDS
          auto items = pop_mark();
          auto& l = node(top());
          if (l.kind != pk_kind::list) fail("APPENDS on something that is not a list");
          l.items.insert(l.items.end(), items.begin(), items.end());
          break;
        }
        case 'b': {  // BUILD: the OrderedDict `_metadata` attribute; nothing else is needed
          const auto state = pop();
          const auto& target = node(top());
          const auto& st = node(state);
          const bool empty_state = st.kind == pk_kind::none ||
                                   (st.kind == pk_kind::dict && st.items.empty()) ||
                                   (st.kind == pk_kind::tuple && st.items.empty());
          if (target.kind != pk_kind::dict && !(target.kind == pk_kind::tensor && empty_state))
            fail("BUILD is only accepted on a dict (state-dict metadata)");
          break;
        }
        case 'R': {  // REDUCE
          const auto args = pop();
          const auto fn = pop();
          stack.push_back(reduce(fn, args, res, storage_by_key, on_storage));
          break;
        }
        case 'Q': {  // BINPERSID
          const auto pid = pop();
          stack.push_back(persistent_load(pid, res, storage_by_key, on_storage));
          break;
        }
        case 'J':
          push_new(simple(pk_kind::integer,
                          static_cast<std::int32_t>(static_cast<std::uint32_t>(uint_le(4)))));
          break;
        case 'K':
          push_new(simple(pk_kind::integer, static_cast<std::uint8_t>(byte())));
          break;
        case 'M':
          push_new(simple(pk_kind::integer, static_cast<std::int64_t>(uint_le(2))));
          break;
        case 0x8a: {  // LONG1: little-endian two's complement of n bytes
          const auto n = static_cast<std::uint8_t>(byte());
          if (n > 8) fail("integer wider than 64 bits");
          std::uint64_t v = 0;
          for (unsigned k = 0; k < n; ++k)
            v |= static_cast<std::uint64_t>(static_cast<std::uint8_t>(byte())) << (8 * k);
          if (n > 0 && n < 8 && (v >> (8 * n - 1)) & 1U) v |= ~std::uint64_t(0) << (8 * n);
          push_new(simple(pk_kind::integer, static_cast<std::int64_t>(v)));
          break;
        }
        case 'G': {  // BINFLOAT (big-endian)
          std::uint64_t v = 0;
          for (int k = 0; k < 8; ++k) v = (v << 8) | static_cast<std::uint8_t>(byte());
          pk_node n = simple(pk_kind::floating);
          n.i = static_cast<std::int64_t>(v);
          push_new(std::move(n));
          break;
        }
        case 'X':    // BINUNICODE
        case 'U': {  // SHORT_BINSTRING
          const std::uint64_t len = op == 'X' ? uint_le(4) : static_cast<std::uint8_t>(byte());
          if (len > p_.size() - pos_) fail("string runs past the end of data.pkl");
          pk_node n = simple(pk_kind::string);
          n.s.assign(reinterpret_cast<const char*>(p_.data()) + pos_,
                     static_cast<std::size_t>(len));
          pos_ += static_cast<std::size_t>(len);
          if (stowage::detail::find_invalid_utf8(n.s)) fail("string is not valid UTF-8");
          push_new(std::move(n));
          break;
        }
        case 0x88:
          push_new(simple(pk_kind::boolean, 1));
          break;  // NEWTRUE
        case 0x89:
          push_new(simple(pk_kind::boolean, 0));
          break;  // NEWFALSE
        case 'N':
          push_new(simple(pk_kind::none));
          break;  // NONE
        default: {
          char buf[8];
          std::snprintf(buf, sizeof buf, "0x%02x", op);
          fail(std::string("unsupported pickle opcode ") + buf +
               " (only the opcodes torch.save writes for state dicts are accepted)");
        }
      }
    }
  }

 private:
  [[noreturn]] void fail(const std::string& what) const {
    throw checkpoint_error(file_, "", op_at_, entry_ + ": pickle: " + what);
  }
  std::byte byte() {
    if (pos_ >= p_.size()) fail("data.pkl ends before STOP (truncated pickle)");
    return p_[pos_++];
  }
  std::uint64_t uint_le(int n) {
    std::uint64_t v = 0;
    for (int k = 0; k < n; ++k)
      v |= static_cast<std::uint64_t>(static_cast<std::uint8_t>(byte())) << (8 * k);
    return v;
  }
  std::string line() {
    std::string s;
    while (true) {
      const char c = static_cast<char>(byte());
      if (c == '\n') return s;
      if (s.size() > 256) fail("GLOBAL name too long");
      s += c;
    }
  }
  pk_node& node(std::uint32_t i) { return nodes_[i]; }

  std::int64_t as_int(std::uint32_t i, const char* what) {
    const auto& n = node(i);
    if (n.kind != pk_kind::integer) fail(std::string(what) + " must be an integer");
    return n.i;
  }
  std::vector<std::int64_t> as_int_tuple(std::uint32_t i, const char* what) {
    const auto& n = node(i);
    if (n.kind != pk_kind::tuple) fail(std::string(what) + " must be a tuple of integers");
    std::vector<std::int64_t> out;
    for (auto x : n.items) out.push_back(as_int(x, what));
    return out;
  }

  std::uint32_t persistent_load(std::uint32_t pid, pickle_result& res,
                                std::unordered_map<std::string, std::uint32_t>& by_key,
                                const std::function<void(const pickle_storage_ref&)>& on_storage) {
    const auto& t = node(pid);
    if (t.kind != pk_kind::tuple || t.items.size() != 5)
      fail("persistent id must be ('storage', storage type, key, location, numel)");
    const auto& tag = node(t.items[0]);
    if (tag.kind != pk_kind::string || tag.s != "storage")
      fail("persistent id must start with 'storage'");
    const auto& cls = node(t.items[1]);
    if (cls.kind != pk_kind::global || cls.global != pk_global::storage_class)
      fail("persistent id names no storage class");
    const auto& key = node(t.items[2]);
    const auto& loc = node(t.items[3]);
    if (key.kind != pk_kind::string || loc.kind != pk_kind::string)
      fail("persistent id key and location must be strings");
    pickle_storage_ref ref{key.s, cls.dtype, loc.s, as_int(t.items[4], "storage numel")};
    if (ref.numel < 0) fail("storage `" + ref.key + "` has a negative element count");
    std::uint32_t si;
    if (auto it = by_key.find(ref.key); it != by_key.end()) {
      si = it->second;
      const auto& prev = res.storages[si];
      if (prev.dtype != ref.dtype || prev.numel != ref.numel)
        fail("storage `" + ref.key + "` is referenced with two different types or sizes");
    } else {
      on_storage(ref);
      si = static_cast<std::uint32_t>(res.storages.size());
      res.storages.push_back(ref);
      by_key.emplace(ref.key, si);
    }
    pk_node n;
    n.kind = pk_kind::storage;
    n.i = si;
    return new_node_checked(std::move(n));
  }

  std::uint32_t new_node_checked(pk_node n) {
    if (nodes_.size() >= max_nodes) fail("too many objects");
    nodes_.push_back(std::move(n));
    return static_cast<std::uint32_t>(nodes_.size() - 1);
  }

  std::uint32_t reduce(std::uint32_t fn, std::uint32_t args_i, pickle_result& res,
                       std::unordered_map<std::string, std::uint32_t>&,
                       const std::function<void(const pickle_storage_ref&)>&) {
    const auto& f = node(fn);
    if (f.kind != pk_kind::global) fail("REDUCE of something that is not a global");
    if (node(args_i).kind != pk_kind::tuple) fail("REDUCE arguments must be a tuple");
    const std::vector<std::uint32_t> args = node(args_i).items;
    switch (f.global) {
      case pk_global::ordered_dict: {
        if (!args.empty()) fail("collections.OrderedDict is only accepted with no arguments");
        pk_node n;
        n.kind = pk_kind::dict;
        return new_node_checked(std::move(n));
      }
      case pk_global::torch_size: {
        if (args.size() != 1 || node(args[0]).kind != pk_kind::tuple)
          fail("torch.Size expects one tuple");
        (void)as_int_tuple(args[0], "torch.Size element");
        return args[0];
      }
      case pk_global::rebuild_parameter: {
        if (args.size() != 3 || node(args[0]).kind != pk_kind::tensor)
          fail("torch._utils._rebuild_parameter expects (tensor, requires_grad, hooks)");
        return args[0];
      }
      case pk_global::rebuild_tensor_v2:
      case pk_global::rebuild_tensor_v3: {
        const bool v3 = f.global == pk_global::rebuild_tensor_v3;
        const std::size_t base = v3 ? 7 : 6;
        if (args.size() != base && args.size() != base + 1)
          fail(f.s + " expects " + std::to_string(base) + " or " + std::to_string(base + 1) +
               " arguments");
        const auto& st = node(args[0]);
        if (st.kind != pk_kind::storage) fail(f.s + ": first argument is not a storage");
        pickle_tensor t;
        t.storage = static_cast<std::uint32_t>(st.i);
        t.offset = as_int(args[1], "storage offset");
        t.size = as_int_tuple(args[2], "size");
        t.stride = as_int_tuple(args[3], "stride");
        if (t.size.size() != t.stride.size())
          fail(f.s + ": size and stride have different lengths");
        if (node(args[4]).kind != pk_kind::boolean) fail(f.s + ": requires_grad must be a bool");
        if (node(args[5]).kind != pk_kind::dict)
          fail(f.s + ": backward hooks must be an OrderedDict");
        if (!node(args[5]).items.empty()) fail(f.s + ": backward hooks are not supported");
        const auto& sref = res.storages[t.storage];
        if (v3) {
          const auto& d = node(args[6]);
          if (d.kind != pk_kind::global || d.global != pk_global::dtype_value)
            fail(f.s + ": dtype argument is not a torch dtype");
          t.dtype = *d.dtype;
          if (sref.dtype && *sref.dtype != t.dtype)
            fail(f.s + ": dtype differs from the storage's type");
        } else {
          if (!sref.dtype)
            fail(f.s + ": an UntypedStorage needs _rebuild_tensor_v3 (with a dtype)");
          t.dtype = *sref.dtype;
        }
        if (args.size() == base + 1) {
          const auto& m = node(args[base]);
          if (m.kind != pk_kind::none && m.kind != pk_kind::dict)
            fail(f.s + ": metadata must be a dict or None");
        }
        pk_node n;
        n.kind = pk_kind::tensor;
        n.i = static_cast<std::int64_t>(res.tensors.size());
        res.tensors.push_back(std::move(t));
        return new_node_checked(std::move(n));
      }
      default:
        fail("REDUCE of `" + f.s + "`, which is not an allowed callable");
    }
  }

  void finish(std::uint32_t result, pickle_result& res) {
    const auto& d = node(result);
    if (d.kind != pk_kind::dict)
      fail("the pickled object is not a dict (stowage reads state dicts only)");
    std::unordered_map<std::string, std::size_t> pos;
    for (std::size_t k = 0; k + 1 < d.items.size(); k += 2) {
      const auto& key = node(d.items[k]);
      const auto& val = node(d.items[k + 1]);
      if (key.kind != pk_kind::string) fail("state-dict key is not a string");
      if (val.kind != pk_kind::tensor)
        throw checkpoint_error(file_, key.s, std::nullopt,
                               entry_ +
                                   ": state-dict entry is not a tensor (nested dicts and other "
                                   "objects are not supported)");
      const auto ti = static_cast<std::uint32_t>(val.i);
      if (auto it = pos.find(key.s); it != pos.end()) {
        res.entries[it->second].second = ti;  // Python dict semantics: last value, first position
      } else {
        pos.emplace(key.s, res.entries.size());
        res.entries.emplace_back(key.s, ti);
      }
    }
  }

  std::span<const std::byte> p_;
  std::string file_, entry_;
  std::size_t pos_ = 0, op_at_ = 0;
  std::vector<pk_node> nodes_;
};

}  // namespace detail

}  // namespace stowage::checkpoint
