# conan/conanfile.py: the Conan 2 recipe of stowage, a header-only C++20 library.
#
# The recipe lives in conan/ and packages the repository one folder up (export_sources copies
# from there). Its dependencies are header-only and come from the system: the committed profile
# conan/profiles/debian12-gcc12 lists them under [platform_requires], so
#
#     conan create conan -pr:a conan/profiles/debian12-gcc12 --no-remote
#
# needs no remote. Conan's CMakeDeps writes nothing for platform requirements, so consumers
# load stowage's OWN installed stowageConfig.cmake (cmake_find_mode "none", builddirs "."),
# which find_dependency()s Eigen3, Boost, cereal and nlohmann_json the way the build did.
import os
import re

from conan import ConanFile
from conan.tools.build import check_min_cppstd
from conan.tools.cmake import CMake, CMakeDeps, CMakeToolchain, cmake_layout
from conan.tools.files import copy, load

required_conan_version = ">=2.0"


class StowageConan(ConanFile):
    name = "stowage"
    description = ("Big-model inference for C++: zero-memory model structure, compile-time "
                   "placement policies, device maps, offload and quantized checkpoints")
    license = "Apache-2.0"
    topics = ("header-only", "inference", "offload", "device-map", "safetensors", "cuda")
    package_type = "header-library"
    implements = ["auto_header_only"]
    settings = "os", "arch", "compiler", "build_type"
    options = {"with_cuda": [True, False]}
    default_options = {"with_cuda": False}
    no_copy_source = True

    # What of the repository the package is built from (relative to the repository root).
    _sources = ("CMakeLists.txt", "LICENSE", "cmake/*", "include/*", "tests/*", "examples/*",
                "bench/*")

    @property
    def _repo_root(self):
        return os.path.normpath(os.path.join(self.recipe_folder, os.pardir))

    @property
    def _build_tests(self):
        # Opt-in: `-c user.stowage:build_tests=True` builds and runs the unit tests in build().
        return self.conf.get("user.stowage:build_tests", default=False, check_type=bool)

    def set_version(self):
        # One source of truth for the version: project(stowage VERSION x.y.z) in CMakeLists.txt.
        text = load(self, os.path.join(self._repo_root, "CMakeLists.txt"))
        m = re.search(r"project\(\s*stowage\s+VERSION\s+([0-9]+(?:\.[0-9]+)*)", text)
        if not m:
            raise RuntimeError("conan/conanfile.py: no project(stowage VERSION x.y.z) in CMakeLists.txt")
        self.version = m.group(1)

    def export_sources(self):
        for pattern in self._sources:
            copy(self, pattern, src=self._repo_root, dst=self.export_sources_folder,
                 excludes=("build*", ".git*", "**/__pycache__/*", "*.pyc"))

    def requirements(self):
        # Ranges, so that the versions a system ships ([platform_requires]) satisfy them.
        self.requires("eigen/[>=3.4 <4]")
        self.requires("boost/[>=1.74]")
        self.requires("cereal/[>=1.3.2 <2]")
        self.requires("nlohmann_json/[>=3.11 <4]")

    def build_requirements(self):
        if self._build_tests:
            self.test_requires("catch2/[>=2.13 <4]")
            self.test_requires("benchmark/[>=1.7]")

    def validate(self):
        check_min_cppstd(self, 20)

    def layout(self):
        cmake_layout(self)

    def generate(self):
        tc = CMakeToolchain(self)
        tc.cache_variables["STOWAGE_BUILD_TESTS"] = self._build_tests
        tc.cache_variables["STOWAGE_BUILD_EXAMPLES"] = False
        tc.cache_variables["STOWAGE_BUILD_BENCHMARKS"] = False
        tc.cache_variables["STOWAGE_ENABLE_CUDA"] = bool(self.options.with_cuda)
        tc.cache_variables["STOWAGE_INSTALL"] = True
        tc.generate()
        # Writes nothing for platform requirements; real Conan packages (on a machine with a
        # remote) would get their config files here.
        CMakeDeps(self).generate()

    def build(self):
        cmake = CMake(self)
        cmake.configure()
        if self._build_tests:
            cmake.build()
            cmake.ctest(cli_args=["--output-on-failure"])

    def package(self):
        CMake(self).install()
        copy(self, "LICENSE", src=self.source_folder,
             dst=os.path.join(self.package_folder, "licenses"))

    def package_info(self):
        self.cpp_info.bindirs = []
        self.cpp_info.libdirs = []
        # Consumers find share/cmake/stowage/stowageConfig.cmake (ours) through the package
        # root, not a CMakeDeps-generated file that would lack the platform dependencies.
        self.cpp_info.set_property("cmake_find_mode", "none")
        self.cpp_info.builddirs = ["."]
