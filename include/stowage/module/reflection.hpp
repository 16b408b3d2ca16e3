// stowage/module/reflection.hpp: what stowage needs to know about a module type at compile time.
// A module's class name (Transformers' Python class name, used for no-split matching and for the
// module tree), and a uniform way to walk the members of a module struct reflected with
// BOOST_HANA_DEFINE_STRUCT, so member names become checkpoint keys without being written twice.
#pragma once

#include <stowage/config.hpp>

#include <boost/hana/accessors.hpp>
#include <boost/hana/concept/struct.hpp>
#include <boost/hana/for_each.hpp>
#include <boost/hana/string.hpp>

#include <concepts>
#include <string_view>
#include <type_traits>

namespace stowage {

/// A type that names its own Python class with `static constexpr std::string_view class_name`.
template <class T>
concept has_static_class_name = requires {
  { T::class_name } -> std::convertible_to<std::string_view>;
};

namespace detail {
template <class T>
constexpr std::string_view default_module_class_name() {
  if constexpr (has_static_class_name<T>)
    return std::string_view(T::class_name);
  else
    return {};  // "not a module": module_type<T> is false
}
}  // namespace detail

/// The class name of module type T as Transformers spells it ("LlamaDecoderLayer", "Linear").
/// Read from `T::class_name`; a type that cannot carry one (a type from another library)
/// gets it by specialising this variable template:
///   template <> inline constexpr std::string_view stowage::module_class_name_v<my_block> = "X";
/// Empty for a type that is not a module.
template <class T>
inline constexpr std::string_view module_class_name_v = detail::default_module_class_name<T>();

/// A module whose class name depends on run-time data: one C++ type serves several
/// Transformers classes (llama_decoder_layer is "LlamaDecoderLayer", "MistralDecoderLayer" or
/// "Qwen2DecoderLayer" by the config's model_type). `m.runtime_class_name()` wins over the
/// static name when the module tree is built.
template <class T>
concept has_runtime_class_name = requires(const T& m) {
  { m.runtime_class_name() } -> std::convertible_to<std::string_view>;
};

/// The class name of this module object: runtime_class_name() when it has one, else
/// module_class_name_v<T>.
template <class T>
constexpr std::string_view module_class_name(const T& m) {
  if constexpr (has_runtime_class_name<T>)
    return std::string_view(m.runtime_class_name());
  else
    return module_class_name_v<T>;
}

/// A struct whose members are visible to stowage: declared with BOOST_HANA_DEFINE_STRUCT.
template <class T>
concept reflected_struct = boost::hana::Struct<std::remove_cvref_t<T>>::value;

/// A module type: a reflected struct with a (non-empty) class name.
template <class T>
concept module_type = reflected_struct<T> &&(!module_class_name_v<std::remove_cvref_t<T>>.empty());

/// Calls f(std::string_view member_name, member&) for every member of a reflected struct, in
/// declaration order (which is the registration order a torch module's __init__ gives).
template <reflected_struct S, class F>
constexpr void for_each_member(S&& s, F&& f) {
  boost::hana::for_each(boost::hana::accessors<std::remove_cvref_t<S>>(), [&](auto pair) {
    using member_key = std::remove_cvref_t<decltype(boost::hana::first(pair))>;
    f(std::string_view(boost::hana::to<char const*>(member_key{})), boost::hana::second(pair)(s));
  });
}

}  // namespace stowage
