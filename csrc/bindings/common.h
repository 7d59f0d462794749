// What the binding's files share: numpy checks whose messages say what was wrong, the named
// type quantized weights cross the boundary as, and the hand-over of engine buffers to numpy.
// Conversions only: nothing here computes.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/quant.h"

namespace gemma::bind {
namespace py = pybind11;

std::string shape_str(const py::array& a);

// a itself, once it is C-contiguous, of dtype T and ndim dimensions; else ValueError.
template <typename T>
const py::array& need(const py::array& a, const std::string& name, int ndim) {
  if (!a.dtype().is(py::dtype::of<T>()))
    throw py::value_error(name + ": expected dtype " + std::string(py::str(py::dtype::of<T>())) + ", got " +
                          std::string(py::str(a.dtype())));
  if (a.ndim() != ndim)
    throw py::value_error(name + ": expected " + std::to_string(ndim) + " dimensions, got shape " + shape_str(a));
  if (!(a.flags() & py::array::c_style)) throw py::value_error(name + ": must be C-contiguous");
  return a;
}
void need_dim(const py::array& a, const std::string& name, int axis, int64_t n);

DType parse_format(const std::string& name);  // a quantized format; ValueError for another name

// A quantized matrix as numpy arrays, in cpu/quant.h's row order (16-row groups): the C++
// side of gemma_cpp.quant.QuantizedWeight, the tuple (format, quants, scales[, mins]) that
// quantized weights cross the binding as, both ways. This struct is the one place its order
// is read or written.
//   int8 / int4 / int4m:
//     quants [rows, row_bytes(format, cols)], 1-byte elements
//     scales [rows, cols / 32] uint16 (fp16 bits)
//     mins   int4m only: as scales; None for int8 and int4
//   q4_k / q5_k / q6_k: (format, quants) only, quants [rows, cols / 256 * B] uint8 (the
//     super-blocks with their scales; B = format_info(format).block_bytes)
// Construction checks that the arrays agree with each other; a user of the weight checks
// rows and cols against what it expects.
struct QuantizedWeight {
  DType format = DType::Int8;
  py::array quants;
  py::object scales = py::none(), mins = py::none();
  int64_t n_rows = 0, n_cols = 0;

  QuantizedWeight(const std::string& fmt, py::array q, py::object d, py::object m, const std::string& name);
  int64_t rows() const { return n_rows; }
  int64_t cols() const { return n_cols; }
  // The kernels' view: pointers into the arrays, which must outlive it.
  Weight view() const;
  // From a (format, quants[, scales[, mins]]) tuple (or QuantizedWeight); errors name `name`.
  static QuantizedWeight from(const py::handle& o, const std::string& name);
  py::tuple to_tuple() const;
};

// A cache layer given as numpy (the attention hooks): k, v [rows, kv_heads, slots, head_dim],
// both float32, both uint16 (bf16 bits) or both int8 with k_scales, v_scales [rows, kv_heads,
// slots, head_dim / 32] uint16 (fp16 bits); valid [rows, slots] uint8. Checked; the view's
// pointers are the arrays', origin 0, capacity = slots.
KVLayerView kv_layer_view(const py::array& k, const py::array& v, const py::array& valid,
                          const py::object& k_scales = py::none(), const py::object& v_scales = py::none());

// A matrix for the CPU engine: a float32 array, a uint16 array of bfloat16 bits, or a
// quantized weight (any tuple). Checked to be [rows, cols] (rows < 0: any number of rows).
Weight as_weight(const py::handle& o, const std::string& name, int64_t rows, int64_t cols);

// A numpy array that takes over v's buffer (no copy): the array owns it from here on.
template <typename T>
py::array_t<T> to_numpy(std::vector<T>&& v, std::vector<py::ssize_t> shape) {
  auto* owned = new std::vector<T>(std::move(v));
  py::capsule owner(owned, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  return py::array_t<T>(std::move(shape), owned->data(), owner);
}

// The gemma_cpp._C._testing submodule: kernel and op hooks for tests and benchmarks.
void register_testing(py::module_& testing);  // testing.cpp: the CPU kernels
// cuda.cpp: cuda_status() in the module; in a CUDA build, the CUDA op hooks in _testing.
void register_cuda(py::module_& m, py::module_& testing);

}  // namespace gemma::bind
