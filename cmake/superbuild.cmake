# The shell that pip's builds run (see the top of CMakeLists.txt): it configures and builds the
# real project in ${CMAKE_BINARY_DIR}/native at every build (ninja there decides what is out of
# date) and installs the module it makes.
include(ExternalProject)

set(_native "${CMAKE_BINARY_DIR}/native")

# pybind11 comes from pip's isolated environment, a new folder at every install; the module's
# compile commands name its include folder, so a new path would recompile the bindings. A copy
# under the build folder, rewritten only where a file's content differs, keeps path and
# timestamps stable.
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c "import os, pybind11; print(os.path.dirname(pybind11.__file__))"
  OUTPUT_VARIABLE _pybind11_root OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _found)
if(NOT _found EQUAL 0 OR NOT EXISTS "${_pybind11_root}/share/cmake/pybind11/pybind11Config.cmake")
  message(FATAL_ERROR "gemma_cpp: pybind11 (with its CMake files) is not importable by ${Python_EXECUTABLE}")
endif()
set(_pybind11_copy "${CMAKE_BINARY_DIR}/pybind11")
file(GLOB_RECURSE _pybind11_files RELATIVE "${_pybind11_root}"
     "${_pybind11_root}/include/*" "${_pybind11_root}/share/*")
foreach(_f IN LISTS _pybind11_files)
  get_filename_component(_dir "${_pybind11_copy}/${_f}" DIRECTORY)
  file(MAKE_DIRECTORY "${_dir}")
  file(COPY_FILE "${_pybind11_root}/${_f}" "${_pybind11_copy}/${_f}" ONLY_IF_DIFFERENT)
endforeach()

# What the real build depends on, resolved here so that a change (an environment variable
# included) changes its configure command and so reconfigures it.
set(_args
  -DGEMMA_CPP_SUPERBUILD=OFF
  -DCMAKE_BUILD_TYPE=${CMAKE_BUILD_TYPE}
  -DGEMMA_CPP_MODULE_DIR=${_native}/module
  -Dpybind11_DIR=${_pybind11_copy}/share/cmake/pybind11
  -DPython_EXECUTABLE=${Python_EXECUTABLE}
  -DPython_ROOT_DIR=${Python_ROOT_DIR}
  -DPython_INCLUDE_DIR=${Python_INCLUDE_DIR}
  -DPython_FIND_REGISTRY=NEVER
  -DSKBUILD_PROJECT_VERSION=${SKBUILD_PROJECT_VERSION})
foreach(_v GEMMA_CPP_NATIVE GEMMA_CPP_CUDA GEMMA_CPP_SANITIZE)
  if(DEFINED ENV{${_v}})
    list(APPEND _args "-D${_v}=$ENV{${_v}}")
  elseif(DEFINED ${_v})
    list(APPEND _args "-D${_v}=${${_v}}")
  else()
    list(APPEND _args "-U${_v}")
  endif()
endforeach()
# CMake reads CUDAARCHS and CUDACXX at a build folder's first configure only; passed on as
# the variables they set, a later change reaches the real build too.
if(DEFINED ENV{CUDAARCHS})
  list(APPEND _args "-DCMAKE_CUDA_ARCHITECTURES=$ENV{CUDAARCHS}")
elseif(DEFINED CMAKE_CUDA_ARCHITECTURES)
  list(APPEND _args "-DCMAKE_CUDA_ARCHITECTURES=${CMAKE_CUDA_ARCHITECTURES}")
else()
  list(APPEND _args "-UCMAKE_CUDA_ARCHITECTURES")
endif()
if(DEFINED ENV{CUDACXX})
  list(APPEND _args "-DCMAKE_CUDA_COMPILER=$ENV{CUDACXX}")
elseif(DEFINED CMAKE_CUDA_COMPILER)
  list(APPEND _args "-DCMAKE_CUDA_COMPILER=${CMAKE_CUDA_COMPILER}")
endif()

ExternalProject_Add(gemma_cpp_native
  SOURCE_DIR "${CMAKE_SOURCE_DIR}"
  BINARY_DIR "${_native}"
  PREFIX "${CMAKE_BINARY_DIR}/native-steps"
  CMAKE_ARGS ${_args}
  BUILD_COMMAND "${Python_EXECUTABLE}" "${CMAKE_SOURCE_DIR}/cmake/build_progress.py"
                "${CMAKE_COMMAND}" --build <BINARY_DIR>
  BUILD_ALWAYS ON
  USES_TERMINAL_CONFIGURE ON
  USES_TERMINAL_BUILD ON
  INSTALL_COMMAND "")
install(DIRECTORY "${_native}/module/" DESTINATION gemma_cpp)
