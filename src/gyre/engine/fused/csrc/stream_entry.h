// A module's Python entry for its streaming steps, included once per module (its first
// translation unit), after the generated steps: a plain CPython module (PyInit_<name>,
// METH_FASTCALL functions taking ints), ~1.2 us cheaper per call than a torch.ops schema and
// without pybind11's headers (+20-35 s of compile per translation unit). New tensors are
// wrapped with torch's exported THPVariable_Wrap (torch is pinned; the module hash includes its
// version). The including unit defines
//   GYRE_STEPS        the step table's entries: {"tag", &step_tag}, ... (each with a comma)
//   GYRE_MODULE_NAME  the module's name, a string literal
//   GYRE_PYINIT       PyInit_<the module's name>
#pragma once
#if !defined(GYRE_STEPS) || !defined(GYRE_MODULE_NAME) || !defined(GYRE_PYINIT)
#error "define GYRE_STEPS, GYRE_MODULE_NAME and GYRE_PYINIT before including stream_entry.h"
#endif
#include "runtime.h"
PyObject* THPVariable_Wrap(const at::TensorBase& var);  // libtorch_python
extern PyObject* THPVariableClass;  // torch.Tensor

namespace {

// torch.Tensor's instance layout (torch/csrc/autograd/python_variable.h, whose pybind11 headers
// would add ~20 s of compile): checked on every plan against data_ptr() seen from Python
struct PyTensor {
  PyObject_HEAD
  at::Tensor cdata;
};

struct StreamPlan {
  bool dbl = false, residual = false;
  std::vector<gyre_stream::Layer> layers;
  std::vector<int64_t> sizes;  // state sizes S_k
  int64_t out_size = 0, in_size = 0;
  gyre_stream::Work work;
  std::vector<double> ybuf[2], rbuf[2];
  // for step(): the module's parameters as registered, their storage and versions at make()
  bool objects = false, versions = false;
  std::vector<PyObject*> param_objs;  // strong references
  std::vector<at::Tensor> params;
  std::vector<const void*> param_ptrs;
  std::vector<int64_t> param_versions;
  ~StreamPlan() { for (PyObject* o : param_objs) Py_DECREF(o); }
};

const at::Tensor* tensor_of(PyObject* o, bool exact) {
  PyTypeObject* cls = reinterpret_cast<PyTypeObject*>(THPVariableClass);
  if (cls == nullptr || !(exact ? Py_TYPE(o) == cls : PyObject_TypeCheck(o, cls))) return nullptr;
  return &reinterpret_cast<PyTensor*>(o)->cdata;
}

const char* kCapsule = "gyre_stream_plan";

struct StepEntry { const char* tag; gyre_stream::StepFn fn; };
const StepEntry kSteps[] = {
GYRE_STEPS
  {nullptr, nullptr}};

bool as_i64(PyObject* o, int64_t* v) {
  *v = PyLong_AsLongLong(o);
  return !(*v == -1 && PyErr_Occurred());
}

void* as_ptr(PyObject* o) { return o == Py_None ? nullptr : PyLong_AsVoidPtr(o); }

bool i64_tuple(PyObject* o, std::vector<int64_t>* out) {
  PyObject* seq = PySequence_Fast(o, "expected a sequence of ints");
  if (!seq) return false;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  for (Py_ssize_t i = 0; i < n; ++i) {
    int64_t v;
    if (!as_i64(PySequence_Fast_GET_ITEM(seq, i), &v)) { Py_DECREF(seq); return false; }
    out->push_back(v);
  }
  Py_DECREF(seq);
  return true;
}

void plan_free(PyObject* cap) {
  delete static_cast<StreamPlan*>(PyCapsule_GetPointer(cap, kCapsule));
}

// make(dbl, residual, sizes, out_size, layers, params, param_ptrs, versions, param_impls):
// layers a sequence of (tag, units, vecs, mats, mat_ld, wih, wih_ld, bih, in_size, zone, rout,
// rout_ld, rbias) with
// pointers as ints; params the module's parameters in registration order, param_ptrs their
// data_ptr()s, param_impls their ._cdata (TensorImpl addresses)
PyObject* stream_make(PyObject*, PyObject* const* a, Py_ssize_t n) {
  if (n != 9) { PyErr_SetString(PyExc_TypeError, "make: 9 arguments"); return nullptr; }
  auto pl = std::make_unique<StreamPlan>();
  int64_t v;
  if (!as_i64(a[0], &v)) return nullptr;
  pl->dbl = v != 0;
  if (!as_i64(a[1], &v)) return nullptr;
  pl->residual = v != 0;
  if (!i64_tuple(a[2], &pl->sizes) || !as_i64(a[3], &pl->out_size)) return nullptr;
  if (pl->sizes.empty() || pl->sizes.size() > 16) {
    PyErr_SetString(PyExc_ValueError, "make: 1 to 16 state components");
    return nullptr;
  }
  PyObject* seq = PySequence_Fast(a[4], "make: layers must be a sequence");
  if (!seq) return nullptr;
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); ++i) {
    PyObject* t = PySequence_Fast_GET_ITEM(seq, i);
    if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 13) {
      Py_DECREF(seq);
      PyErr_SetString(PyExc_TypeError, "make: a layer is a tuple of 13");
      return nullptr;
    }
    gyre_stream::Layer ly;
    const char* tag = PyUnicode_AsUTF8(PyTuple_GET_ITEM(t, 0));
    for (const StepEntry* e = kSteps; tag && e->tag; ++e)
      if (std::strcmp(e->tag, tag) == 0) ly.fn = e->fn;
    std::vector<int64_t> units, vecs, mats, ld;
    bool ok = tag && ly.fn && i64_tuple(PyTuple_GET_ITEM(t, 1), &units) && units.size() <= 4 &&
              i64_tuple(PyTuple_GET_ITEM(t, 2), &vecs) && i64_tuple(PyTuple_GET_ITEM(t, 3), &mats) &&
              i64_tuple(PyTuple_GET_ITEM(t, 4), &ld) && mats.size() == ld.size() &&
              as_i64(PyTuple_GET_ITEM(t, 6), &ly.wih_ld) &&
              as_i64(PyTuple_GET_ITEM(t, 8), &ly.in_size) &&
              as_i64(PyTuple_GET_ITEM(t, 11), &ly.rout_ld);
    if (ok) {
      ly.wih = as_ptr(PyTuple_GET_ITEM(t, 5));
      ly.bih = as_ptr(PyTuple_GET_ITEM(t, 7));
      ly.rout = as_ptr(PyTuple_GET_ITEM(t, 10));
      ly.rbias = as_ptr(PyTuple_GET_ITEM(t, 12));
      PyObject* z = PySequence_Fast(PyTuple_GET_ITEM(t, 9), "zone rates");
      ok = z != nullptr && !PyErr_Occurred();
      for (Py_ssize_t k = 0; ok && k < PySequence_Fast_GET_SIZE(z); ++k) {
        ly.zone.push_back(PyFloat_AsDouble(PySequence_Fast_GET_ITEM(z, k)));
        ok = !PyErr_Occurred();
      }
      Py_XDECREF(z);
      ok = ok && ly.zone.size() == pl->sizes.size();
    }
    if (!ok) {
      Py_DECREF(seq);
      if (!PyErr_Occurred())
        PyErr_Format(PyExc_ValueError, "make: bad layer %zd (tag %s)", i, tag ? tag : "?");
      return nullptr;
    }
    for (size_t f = 0; f < units.size(); ++f) ly.units[f] = units[f];
    for (int64_t p : vecs) ly.vecs.push_back(reinterpret_cast<const void*>(p));
    for (int64_t p : mats) ly.mats.push_back(reinterpret_cast<const void*>(p));
    ly.mat_ld = ld;
    pl->layers.push_back(std::move(ly));
  }
  Py_DECREF(seq);
  if (pl->layers.empty()) { PyErr_SetString(PyExc_ValueError, "make: no layers"); return nullptr; }
  pl->in_size = pl->layers[0].in_size;
  std::vector<int64_t> ptrs, impls;
  if (!as_i64(a[7], &v) || !i64_tuple(a[6], &ptrs) || !i64_tuple(a[8], &impls)) return nullptr;
  pl->versions = v != 0;
  PyObject* ps = PySequence_Fast(a[5], "make: params must be a sequence");
  if (!ps) return nullptr;
  struct Release {  // ps, also when a check below throws
    PyObject* o;
    ~Release() { Py_DECREF(o); }
  } release{ps};
  pl->objects = size_t(PySequence_Fast_GET_SIZE(ps)) == ptrs.size() && ptrs.size() == impls.size();
  static_assert(sizeof(at::Tensor) == sizeof(void*), "at::Tensor is one TensorImpl pointer");
  for (Py_ssize_t i = 0; pl->objects && i < PySequence_Fast_GET_SIZE(ps); ++i) {
    PyObject* o = PySequence_Fast_GET_ITEM(ps, i);
    const at::Tensor* t = tensor_of(o, false);
    // the layout check, before anything is dereferenced: the word after the object header is
    // the TensorImpl Python reports, and through it the storage Python sees
    int64_t impl = 0;
    if (t) std::memcpy(&impl, static_cast<const void*>(t), sizeof(impl));
    // (an inference tensor has no version counter: its in-place updates would go unseen)
    if (!t || impl == 0 || impl != impls[i] || t->is_inference() ||
        reinterpret_cast<int64_t>(t->data_ptr()) != ptrs[i]) {
      pl->objects = false;
      break;
    }
    Py_INCREF(o);
    pl->param_objs.push_back(o);
    pl->params.push_back(*t);
    pl->param_ptrs.push_back(t->data_ptr());
    pl->param_versions.push_back(t->_version());
  }
  return PyCapsule_New(pl.release(), kCapsule, plan_free);
}

// the whole stack, each layer's output its state component 0 or its folded read-out product,
// every input projection folded: outputs (y, state_0, ..., state_{K-1}), new tensors
template <typename T>
void run_stack(StreamPlan& pl, int64_t B, const T* x, T* const* in, T* const* out, T* y) {
  const int64_t L = pl.layers.size(), K = pl.sizes.size(), O = pl.out_size;
  void* sin[16];
  void* sout[16];
  const T* xin = x;
  for (int64_t l = 0; l < L; ++l) {
    for (int64_t k = 0; k < K; ++k) {
      sin[k] = in[k] ? in[k] + l * B * pl.sizes[k] : nullptr;
      sout[k] = out[k] + l * B * pl.sizes[k];
    }
    const auto& ly = pl.layers[l];
    ly.fn(pl.dbl, ly, B, xin, sin, sout, pl.work);
    const T* h = static_cast<const T*>(sout[0]);
    if (ly.rout) {  // the read-out product (two buffers: the previous one may be xin)
      auto& v = pl.rbuf[l % 2];
      if (v.size() < size_t(B * O)) v.resize(B * O);
      T* r = reinterpret_cast<T*>(v.data());
      linear<T>(r, O, h, pl.sizes[0], B, static_cast<const T*>(ly.rout), ly.rout_ld, pl.sizes[0],
                O, static_cast<const T*>(ly.rbias));
      h = r;
    }
    const bool last = l == L - 1;
    if (pl.residual && l > 0) {
      T* dst = y;
      if (!last) {
        auto& v = pl.ybuf[l % 2];
        if (v.size() < size_t(B * O)) v.resize(B * O);
        dst = reinterpret_cast<T*>(v.data());
      }
#pragma omp simd
      for (int64_t i = 0; i < B * O; ++i) dst[i] = h[i] + xin[i];
      xin = dst;
    } else if (last) {
      std::memcpy(y, h, sizeof(T) * B * O);
    } else {
      xin = h;
    }
  }
}

StreamPlan* get_plan(PyObject* cap) {
  return static_cast<StreamPlan*>(PyCapsule_GetPointer(cap, kCapsule));
}

// new outputs, every layer run into them, then (y, state_0, ..., state_{K-1}) or, nested,
// (y, state) with state a tensor (K = 1) or a tuple
PyObject* run_and_wrap(StreamPlan& pl, int64_t B, bool unbatched, const void* x, void* const* in,
                       bool nested) {
  const int64_t K = pl.sizes.size(), L = pl.layers.size();
  at::Tensor outs[16], y;
  try {
    const auto opts = at::TensorOptions().dtype(pl.dbl ? at::kDouble : at::kFloat);
    void* out[16];
    for (int64_t k = 0; k < K; ++k) {
      outs[k] = unbatched ? at::empty({L, pl.sizes[k]}, opts) : at::empty({L, B, pl.sizes[k]}, opts);
      out[k] = outs[k].data_ptr();
    }
    y = unbatched ? at::empty({pl.out_size}, opts) : at::empty({B, pl.out_size}, opts);
    if (pl.dbl)
      run_stack<double>(pl, B, static_cast<const double*>(x), reinterpret_cast<double* const*>(in),
                        reinterpret_cast<double* const*>(out), y.data_ptr<double>());
    else
      run_stack<float>(pl, B, static_cast<const float*>(x), reinterpret_cast<float* const*>(in),
                       reinterpret_cast<float* const*>(out), y.data_ptr<float>());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  PyObject* items[17];
  bool ok = true;
  for (int64_t i = 0; i <= K; ++i) {
    items[i] = THPVariable_Wrap(i == 0 ? y : outs[i - 1]);
    ok = ok && items[i] != nullptr;
  }
  PyObject* res = nullptr;
  if (ok && !nested) {
    res = PyTuple_New(1 + K);
    for (int64_t i = 0; res && i <= K; ++i) PyTuple_SET_ITEM(res, i, items[i]);
  } else if (ok) {
    PyObject* state = K == 1 ? items[1] : PyTuple_New(K);
    for (int64_t k = 0; K > 1 && state && k < K; ++k) PyTuple_SET_ITEM(state, k, items[1 + k]);
    res = state ? PyTuple_New(2) : nullptr;
    if (res) {
      PyTuple_SET_ITEM(res, 0, items[0]);
      PyTuple_SET_ITEM(res, 1, state);
    } else if (state && K > 1) {
      Py_DECREF(state);  // owns items[1..K]
      Py_DECREF(items[0]);
      return nullptr;
    }
  }
  if (!res)
    for (int64_t i = 0; i <= K; ++i) Py_XDECREF(items[i]);
  return res;
}

// run(plan, B, unbatched, x, in_0, ..., in_{K-1}) -> (y, state_0, ..., state_{K-1})
PyObject* stream_run(PyObject*, PyObject* const* a, Py_ssize_t n) {
  StreamPlan* pl = n >= 4 ? get_plan(a[0]) : nullptr;
  if (!pl) { if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "run: bad call"); return nullptr; }
  const int64_t K = pl->sizes.size();
  int64_t B, unbatched;
  if (n != 4 + K || !as_i64(a[1], &B) || !as_i64(a[2], &unbatched)) {
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "run: bad arguments");
    return nullptr;
  }
  void* x = as_ptr(a[3]);
  void* in[16];
  for (int64_t k = 0; k < K; ++k) in[k] = as_ptr(a[4 + k]);
  if (PyErr_Occurred()) return nullptr;
  return run_and_wrap(*pl, B, unbatched != 0, x, in, false);
}

// the plan's parameters are still the module's, unchanged: the same objects holding the same
// tensors (torch.utils.swap_tensors keeps the object and replaces the tensor under it), storage
// and versions
bool params_current(const StreamPlan& pl, PyObject* dict) {
  if (!PyDict_Check(dict) || size_t(PyDict_Size(dict)) != pl.param_objs.size()) return false;
  Py_ssize_t pos = 0, i = 0;
  PyObject *key, *value;
  while (PyDict_Next(dict, &pos, &key, &value)) {
    if (value != pl.param_objs[i]) return false;
    const at::Tensor& t = pl.params[i];
    const at::Tensor* now = tensor_of(value, false);
    if (now == nullptr || now->unsafeGetTensorImpl() != t.unsafeGetTensorImpl()) return false;
    if (t.data_ptr() != pl.param_ptrs[i] || (pl.versions && t._version() != pl.param_versions[i]))
      return false;
    ++i;
  }
  return true;
}

// a tensor step() can read in place: exactly torch.Tensor, CPU, strided, contiguous, the dtype
const at::Tensor* usable(PyObject* o, at::ScalarType dt, bool grad) {
  const at::Tensor* t = tensor_of(o, true);
  if (!t || !t->defined() || t->scalar_type() != dt || !t->is_cpu() ||
      t->layout() != at::kStrided || !t->is_contiguous() || (grad && t->requires_grad()))
    return nullptr;
  return t;
}

// step(plan, params, x, state) -> (y, state), or None where this fast entry does not apply
// (parameters changed, grad needed, anything unusual about x or state): the caller then takes
// the careful path. Only for stacks run() can take (folded projections, identity read-out).
PyObject* stream_step(PyObject*, PyObject* const* a, Py_ssize_t n) {
  StreamPlan* pl = n == 4 ? get_plan(a[0]) : nullptr;
  if (!pl) { if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "step: bad call"); return nullptr; }
  if (!pl->objects || !params_current(*pl, a[1])) Py_RETURN_NONE;
  const bool grad = c10::GradMode::is_enabled();
  if (grad) {
    for (const auto& p : pl->params) if (p.requires_grad()) Py_RETURN_NONE;
  }
  const at::ScalarType dt = pl->dbl ? at::kDouble : at::kFloat;
  const at::Tensor* x = usable(a[2], dt, grad);
  if (!x) Py_RETURN_NONE;
  const int64_t L = pl->layers.size(), K = pl->sizes.size();
  const bool unbatched = x->dim() == 1;
  if ((x->dim() != 1 && x->dim() != 2) || x->size(-1) != pl->in_size) Py_RETURN_NONE;
  const int64_t B = unbatched ? 1 : x->size(0);
  if (B == 0) Py_RETURN_NONE;
  void* in[16] = {};
  PyObject* st = a[3];
  if (st != Py_None) {
    PyObject* const* items = &st;
    Py_ssize_t count = 1;
    if (PyTuple_Check(st) || PyList_Check(st)) {
      items = PySequence_Fast_ITEMS(st);
      count = PySequence_Fast_GET_SIZE(st);
    }
    if (count != K) Py_RETURN_NONE;
    for (int64_t k = 0; k < K; ++k) {
      const at::Tensor* s = usable(items[k], dt, grad);
      if (!s) Py_RETURN_NONE;
      if (unbatched ? (s->dim() != 2 || s->size(0) != L || s->size(1) != pl->sizes[k])
                    : (s->dim() != 3 || s->size(0) != L || s->size(1) != B ||
                       s->size(2) != pl->sizes[k]))
        Py_RETURN_NONE;
      in[k] = s->data_ptr();
    }
  }
  return run_and_wrap(*pl, B, unbatched, x->data_ptr(), in, true);
}

// layer(plan, l, B, xin, in_0.., out_0..): one layer into caller-given (L, B, S_k) states; xin
// is the layer's input when its projection is folded, else its pre-activations (B, G*H)
PyObject* stream_layer(PyObject*, PyObject* const* a, Py_ssize_t n) {
  StreamPlan* pl = n >= 4 ? get_plan(a[0]) : nullptr;
  if (!pl) { if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "layer: bad call"); return nullptr; }
  const int64_t K = pl->sizes.size();
  int64_t l, B;
  if (n != 4 + 2 * K || !as_i64(a[1], &l) || !as_i64(a[2], &B) || l < 0 ||
      l >= int64_t(pl->layers.size())) {
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "layer: bad arguments");
    return nullptr;
  }
  const size_t es = pl->dbl ? sizeof(double) : sizeof(float);
  void* xin = as_ptr(a[3]);
  void* sin[16];
  void* sout[16];
  for (int64_t k = 0; k < K; ++k) {
    char* i = static_cast<char*>(as_ptr(a[4 + k]));
    sin[k] = i ? i + es * l * B * pl->sizes[k] : nullptr;
    sout[k] = static_cast<char*>(as_ptr(a[4 + K + k])) + es * l * B * pl->sizes[k];
  }
  if (PyErr_Occurred()) return nullptr;
  try {
    const auto& ly = pl->layers[l];
    ly.fn(pl->dbl, ly, B, xin, sin, sout, pl->work);
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  Py_RETURN_NONE;
}

// every entry as Python calls it: a C++ exception (torch's checks throw c10::Error) becomes a
// RuntimeError; one escaping into the interpreter's C frames would end the process
using Entry = PyObject* (*)(PyObject*, PyObject* const*, Py_ssize_t);
template <Entry F>
PyObject* guarded(PyObject* self, PyObject* const* a, Py_ssize_t n) {
  try {
    return F(self, a, n);
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  } catch (...) {
    PyErr_SetString(PyExc_RuntimeError, "gyre streaming entry: a C++ exception");
  }
  return nullptr;
}

PyMethodDef kStreamMethods[] = {
    {"make", (PyCFunction)(void (*)(void))guarded<stream_make>, METH_FASTCALL,
     "a streaming plan"},
    {"run", (PyCFunction)(void (*)(void))guarded<stream_run>, METH_FASTCALL,
     "one step, every layer"},
    {"step", (PyCFunction)(void (*)(void))guarded<stream_step>, METH_FASTCALL,
     "run() on tensors, or None"},
    {"layer", (PyCFunction)(void (*)(void))guarded<stream_layer>, METH_FASTCALL,
     "one step, one layer"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kStreamModule = {PyModuleDef_HEAD_INIT, GYRE_MODULE_NAME, "gyre streaming steps", -1,
                             kStreamMethods};

}  // namespace

PyMODINIT_FUNC GYRE_PYINIT(void) { return PyModule_Create(&kStreamModule); }
