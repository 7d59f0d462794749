#include "bindings/common.h"

namespace gemma::bind {

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

void need_dim(const py::array& a, const std::string& name, int axis, int64_t n) {
  if (a.shape(axis) != n)
    throw py::value_error(name + ": axis " + std::to_string(axis) + " must be " + std::to_string(n) + ", got shape " +
                          shape_str(a));
}

DType parse_format(const std::string& name) {
  const FormatInfo* f = format_by_name(name.c_str());
  if (f && is_quantized(f->dtype)) return f->dtype;
  std::string known;
  for (const FormatInfo& g : kFormats)
    if (is_quantized(g.dtype)) known += std::string(known.empty() ? "'" : ", '") + g.name + "'";
  throw py::value_error("unknown quantization '" + name + "': expected one of " + known);
}

namespace {
bool is_u16_matrix(const py::array& a) {
  return a.ndim() == 2 && a.dtype().is(py::dtype::of<uint16_t>()) && (a.flags() & py::array::c_style);
}
std::string dims(int64_t rows, int64_t cols) { return "(" + std::to_string(rows) + ", " + std::to_string(cols) + ")"; }
}  // namespace

QuantizedWeight::QuantizedWeight(const std::string& fmt, py::array q, py::object d, py::object m,
                                 const std::string& name)
    : format(parse_format(fmt)), quants(std::move(q)), scales(std::move(d)), mins(std::move(m)) {
  const bool one_byte = quants.ndim() == 2 && quants.itemsize() == 1 && (quants.flags() & py::array::c_style);
  if (is_kquant(format)) {
    if (!scales.is_none() || !mins.is_none())
      throw py::value_error(name + ": a " + fmt + " weight is (format, quants): its scales are inside the quants");
    const int64_t B = format_info(format).block_bytes;
    if (!one_byte || quants.shape(1) % B != 0)
      throw py::value_error(name + ": " + fmt + " quants must be a contiguous 2-D 1-byte array with rows of a multiple of " +
                            std::to_string(B) + " bytes (super-blocks of 256), got " + std::string(py::str(quants.dtype())) +
                            " " + shape_str(quants));
    n_rows = quants.shape(0);
    n_cols = quants.shape(1) / B * kQSuper;
    return;
  }
  if (format == DType::Int4m && mins.is_none())
    throw py::value_error(name + ": an int4m weight is (format, quants, scales, mins)");
  if (format != DType::Int4m && !mins.is_none())
    throw py::value_error(name + ": a quantized weight is (format, quants, scales); only int4m has mins");
  if (scales.is_none()) throw py::value_error(name + ": an " + fmt + " weight is (format, quants, scales[, mins])");
  const py::array sa = scales.cast<py::array>();
  if (!is_u16_matrix(sa))
    throw py::value_error(name + ": scales must be a contiguous 2-D uint16 array (fp16 bits), got " +
                          std::string(py::str(sa.dtype())) + " " + shape_str(sa));
  scales = sa;
  const int64_t rows = sa.shape(0), nb = sa.shape(1), qb = row_bytes(format, nb * kQBlock);
  if (!one_byte || quants.shape(0) != rows || quants.shape(1) != qb)
    throw py::value_error(name + ": quants must be a contiguous 1-byte array of shape " + dims(rows, qb) + ", got " +
                          shape_str(quants));
  if (format == DType::Int4m) {
    const py::array ma = mins.cast<py::array>();
    if (!is_u16_matrix(ma) || ma.shape(0) != rows || ma.shape(1) != nb)
      throw py::value_error(name + ": mins must be a contiguous uint16 array of shape " + dims(rows, nb) + ", got " +
                            shape_str(ma));
    mins = ma;
  }
  n_rows = rows;
  n_cols = nb * kQBlock;
}

Weight QuantizedWeight::view() const {
  Weight w;
  w.dtype = format;
  w.data = quants.data();
  if (!scales.is_none()) w.scales = static_cast<const uint16_t*>(scales.cast<py::array>().data());
  if (!mins.is_none()) w.mins = static_cast<const uint16_t*>(mins.cast<py::array>().data());
  w.rows = rows();
  w.cols = cols();
  w.ld = quants.shape(1);
  return w;
}

py::tuple QuantizedWeight::to_tuple() const {
  if (is_kquant(format)) return py::make_tuple(format_name(format), quants);
  if (format == DType::Int4m) return py::make_tuple(format_name(format), quants, scales, mins);
  return py::make_tuple(format_name(format), quants, scales);
}

QuantizedWeight QuantizedWeight::from(const py::handle& o, const std::string& name) {
  if (!py::isinstance<py::tuple>(o))
    throw py::value_error(name + ": expected a quantized weight, (format, quants, scales[, mins]), got " +
                          std::string(py::str(py::type::of(o))));
  const py::tuple t = py::reinterpret_borrow<py::tuple>(o);
  if (t.size() < 2 || t.size() > 4)
    throw py::value_error(name + ": a quantized weight is (format, quants, scales), for int4m "
                                 "(format, quants, scales, mins), for a K-quant (format, quants)");
  return QuantizedWeight(t[0].cast<std::string>(), t[1].cast<py::array>(),
                         t.size() >= 3 ? py::object(t[2]) : py::object(py::none()),
                         t.size() == 4 ? py::object(t[3]) : py::object(py::none()), name);
}

KVLayerView kv_layer_view(const py::array& k, const py::array& v, const py::array& valid, const py::object& k_scales,
                          const py::object& v_scales) {
  const bool bf16 = k.dtype().is(py::dtype::of<uint16_t>()), i8 = k.dtype().is(py::dtype::of<int8_t>());
  if (bf16) {
    need<uint16_t>(k, "k_cache", 4);
    need<uint16_t>(v, "v_cache", 4);
  } else if (i8) {
    need<int8_t>(k, "k_cache", 4);
    need<int8_t>(v, "v_cache", 4);
  } else {
    need<float>(k, "k_cache", 4);
    need<float>(v, "v_cache", 4);
  }
  for (int i = 0; i < 4; ++i) need_dim(v, "v_cache", i, k.shape(i));
  need<uint8_t>(valid, "valid", 2);
  need_dim(valid, "valid", 0, k.shape(0));
  need_dim(valid, "valid", 1, k.shape(2));
  KVLayerView kv;
  kv.k = k.data();
  kv.v = v.data();
  kv.dtype = bf16 ? DType::BF16 : i8 ? DType::Int8 : DType::F32;
  if (i8) {
    if (k.shape(3) % kQBlock != 0) throw py::value_error("an int8 cache needs head_dim a multiple of 32");
    for (const auto& [o, name, out] : {std::make_tuple(&k_scales, "k_scales", &kv.k_scales),
                                       std::make_tuple(&v_scales, "v_scales", &kv.v_scales)}) {
      if (o->is_none()) throw py::value_error(std::string("an int8 cache needs ") + name);
      const py::array a = o->cast<py::array>();
      need<uint16_t>(a, name, 4);
      for (int i = 0; i < 3; ++i) need_dim(a, name, i, k.shape(i));
      need_dim(a, name, 3, k.shape(3) / kQBlock);
      *out = static_cast<const uint16_t*>(a.data());
    }
  } else if (!k_scales.is_none() || !v_scales.is_none()) {
    throw py::value_error("scales go with an int8 cache only");
  }
  kv.kv_heads = k.shape(1);
  kv.span = k.shape(2);
  kv.head_dim = k.shape(3);
  kv.valid = static_cast<const uint8_t*>(valid.data());
  kv.capacity = k.shape(2);
  return kv;
}

Weight as_weight(const py::handle& o, const std::string& name, int64_t rows, int64_t cols) {
  if (py::isinstance<py::tuple>(o)) {
    if (cols % kQBlock != 0)
      throw py::value_error(name + ": quantized weights need an input size that is a multiple of 32, got " +
                            std::to_string(cols));
    const Weight w = QuantizedWeight::from(o, name).view();
    if ((rows >= 0 && w.rows != rows) || w.cols != cols)
      throw py::value_error(name + ": expected a " + dims(rows >= 0 ? rows : w.rows, cols) +
                            " matrix, got a quantized " + dims(w.rows, w.cols) + " one");
    return w;
  }
  const py::array a = py::reinterpret_borrow<py::object>(o).cast<py::array>();
  if (a.ndim() != 2 || (rows >= 0 && a.shape(0) != rows) || a.shape(1) != cols)
    throw py::value_error(name + ": expected shape " + dims(rows >= 0 ? rows : a.ndim() ? a.shape(0) : 0, cols) +
                          ", got " + shape_str(a));
  if (!(a.flags() & py::array::c_style)) throw py::value_error(name + ": weight array must be C-contiguous");
  Weight w;
  if (a.dtype().is(py::dtype::of<float>()))
    w.dtype = DType::F32;
  else if (a.dtype().is(py::dtype::of<uint16_t>()))
    w.dtype = DType::BF16;
  else
    throw py::value_error(name + ": weights must be float32 or uint16 (bfloat16 bits), got " +
                          std::string(py::str(a.dtype())));
  w.data = a.data();
  w.rows = a.shape(0);
  w.cols = w.ld = cols;
  return w;
}

}  // namespace gemma::bind
