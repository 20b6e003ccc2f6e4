"""Builds the pybind11 extension ``ivfast._C`` from ``csrc/`` by driving CMakeLists.txt.

Metadata lives in pyproject.toml. ``kernels/`` (Triton kernels) installs as ``ivfast.kernels``
so that it never shadows Hugging Face's top-level ``kernels`` package.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: Path):
        super().__init__(name, sources=[])
        self.sourcedir = str(sourcedir)


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        cmake = shutil.which("cmake")
        if cmake is None:
            sys.exit("ivfast: building ivfast._C needs cmake >= 3.18, which was not found on PATH. "
                     "Install it (`apt-get install cmake` or `pip install cmake`) and retry.")
        cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
        if cxx is None:
            sys.exit("ivfast: building ivfast._C needs a C++17 compiler (g++ >= 9 or clang++ >= 10), "
                     "none was found. Install one (`apt-get install g++`) or set CXX, and retry.")
        import pybind11

        extdir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_type = os.environ.get("IVFAST_BUILD_TYPE", "Debug" if self.debug else "Release")
        build_temp = Path(self.build_temp) / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}",
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_CXX_COMPILER={cxx}",
        ]
        try:
            subprocess.run([cmake, ext.sourcedir, *args], cwd=build_temp, check=True)
            subprocess.run([cmake, "--build", ".", "--config", build_type, "-j", str(os.cpu_count() or 2)],
                           cwd=build_temp, check=True)
        except subprocess.CalledProcessError as e:
            sys.exit(f"ivfast: building ivfast._C failed ({e}); the CMake output above says why.")


setup(
    packages=find_packages(include=["ivfast", "ivfast.*"]) + ["ivfast.kernels"],
    package_dir={"ivfast": "ivfast", "ivfast.kernels": "kernels"},
    package_data={"ivfast": ["configs/*.yaml", "eval/configs/*.yaml", "_C.pyi", "py.typed", "rehearse/*.cpp"]},
    ext_modules=[CMakeExtension("ivfast._C", ROOT)],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
