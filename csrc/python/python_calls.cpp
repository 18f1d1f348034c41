// The Python module projkernels._C: loading it registers the projkernels_C ops (the static
// initialisers of the other translation units), and it offers bound calls, what the eager API calls.
//
// Why bound calls: a call through torch.ops converts every argument from Python objects to a boxed
// stack each time, the table's tensors and the geometry's integers included.  For a small weight
// that conversion is a large share of the call: on the 2-core CPU machine of bench/RESULTS.md,
// about 1.3 us of a 4.2 us single-weight forward, where a native `(w * w).sum()` costs 2.7 us.  A
// bound call holds one configuration's table and geometry in C++ (converted once, when the
// configuration is built) and converts only the weights; then it calls the same op through the
// dispatcher, so the Autograd kernel, the device kernels and any Python dispatch mode (fake tensors
// under torch.compile or export) see exactly the call torch.ops would have made.
//
// Weights whose type overrides __torch_function__ (and any call made inside an active
// TorchFunctionMode) go through the boxed op of torch.ops instead, which honours the override, as
// every torch op does.  Like torch's own bindings, a call releases the GIL while the op runs, turns
// C++ warnings into Python warnings and C++ errors into the matching Python exceptions.  The
// objects are immutable: a copy (copy.copy, copy.deepcopy) is the object itself.
#include <ATen/PythonTorchFunctionTLS.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <mutex>
#include <set>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "op_common.h"  // op_handle

namespace projkernels {
namespace {

namespace py = pybind11;
using at::Tensor;

// A torch.Tensor or nn.Parameter (not a subclass of either), outside any TorchFunctionMode: what
// torch's own bindings call without looking for a __torch_function__ override.
bool plain_tensor(PyObject* obj) {
  return THPVariable_CheckExact(obj) && !at::impl::torch_function_mode_enabled();
}

// torch.ops.projkernels_C.<name>.default: the boxed op, for the calls a bound call does not make.
py::object boxed_op(const std::string& name) {
  return py::module_::import("torch").attr("ops").attr("projkernels_C").attr(name.c_str()).attr("default");
}

// One configuration of a single-weight symmetry (finite group or steerable): the public ops named
// at construction, each called as op(weight, table, geometry).
class SingleCall {
 public:
  using PenaltyEnergySig = std::tuple<Tensor, Tensor>(const Tensor&, at::TensorList, at::IntArrayRef);
  using WeightOutSig = Tensor(const Tensor&, at::TensorList, at::IntArrayRef);

  // spectrum_op may be empty: the symmetry has no spectrum (steerable ones), and spectrum() raises.
  SingleCall(std::string penalty_energy_op, std::string project_op, std::string spectrum_op,
             std::vector<Tensor> table, std::vector<int64_t> geometry)
      : pe_name_(std::move(penalty_energy_op)),
        project_name_(std::move(project_op)),
        spectrum_name_(std::move(spectrum_op)),
        table_(std::move(table)),
        geometry_(std::move(geometry)),
        pe_(op_handle<PenaltyEnergySig>(("projkernels_C::" + pe_name_).c_str())),
        project_(op_handle<WeightOutSig>(("projkernels_C::" + project_name_).c_str())) {
    if (!spectrum_name_.empty())
      spectrum_ = op_handle<WeightOutSig>(("projkernels_C::" + spectrum_name_).c_str());
  }

  py::object penalty_energy(py::handle weight) const {
    HANDLE_TH_ERRORS
    if (!plain_tensor(weight.ptr())) return boxed(pe_name_, weight);
    const Tensor& w = THPVariable_Unpack(weight.ptr());
    std::tuple<Tensor, Tensor> out;
    {
      py::gil_scoped_release no_gil;
      out = pe_.call(w, table_, geometry_);
    }
    return py::make_tuple(std::move(std::get<0>(out)), std::move(std::get<1>(out)));
    END_HANDLE_TH_ERRORS_PYBIND
  }

  py::object project(py::handle weight) const { return weight_out(project_, project_name_, weight); }

  py::object spectrum(py::handle weight) const {
    if (!spectrum_.has_value())
      throw py::type_error("spectrum: isotypic energies are defined for the finite groups only");
    return weight_out(*spectrum_, spectrum_name_, weight);
  }

  const std::vector<Tensor>& table() const { return table_; }
  const std::vector<int64_t>& geometry() const { return geometry_; }

 private:
  py::object weight_out(const c10::TypedOperatorHandle<WeightOutSig>& op, const std::string& name,
                        py::handle weight) const {
    HANDLE_TH_ERRORS
    if (!plain_tensor(weight.ptr())) return boxed(name, weight);
    const Tensor& w = THPVariable_Unpack(weight.ptr());
    Tensor out;
    {
      py::gil_scoped_release no_gil;
      out = op.call(w, table_, geometry_);
    }
    return py::cast(std::move(out));
    END_HANDLE_TH_ERRORS_PYBIND
  }

  py::object boxed(const std::string& name, py::handle weight) const {
    return boxed_op(name)(weight, table_, geometry_);
  }

  std::string pe_name_, project_name_, spectrum_name_;
  std::vector<Tensor> table_;
  std::vector<int64_t> geometry_;
  c10::TypedOperatorHandle<PenaltyEnergySig> pe_;
  c10::TypedOperatorHandle<WeightOutSig> project_;
  std::optional<c10::TypedOperatorHandle<WeightOutSig>> spectrum_;
};

// One configuration of the whole-model op projkernels_C::multi_penalty: the layers' tables, the
// [2, L] constants and the geometry, called on the list of weights.
class MultiCall {
 public:
  using MultiPenaltySig = std::tuple<Tensor, Tensor, Tensor, Tensor>(at::TensorList, at::TensorList, at::TensorList,
                                                                     const Tensor&, at::IntArrayRef);

  MultiCall(std::vector<Tensor> offsets, std::vector<Tensor> inv_stab, Tensor consts, std::vector<int64_t> geometry)
      : offsets_(std::move(offsets)),
        inv_stab_(std::move(inv_stab)),
        consts_(std::move(consts)),
        geometry_(std::move(geometry)),
        op_(op_handle<MultiPenaltySig>("projkernels_C::multi_penalty")) {}

  py::object call(const py::sequence& weights) const {
    HANDLE_TH_ERRORS
    const size_t n = py::len(weights);
    std::vector<Tensor> ws;
    ws.reserve(n);
    for (size_t i = 0; i < n; ++i) {
      py::object w = weights[i];
      if (!plain_tensor(w.ptr())) {
        return boxed_op("multi_penalty")(weights, offsets_, inv_stab_, consts_, geometry_);
      }
      ws.push_back(THPVariable_Unpack(w.ptr()));
    }
    std::tuple<Tensor, Tensor, Tensor, Tensor> out;
    {
      py::gil_scoped_release no_gil;
      out = op_.call(ws, offsets_, inv_stab_, consts_, geometry_);
    }
    auto& [pen, eq, per_pen, per_eq] = out;
    return py::make_tuple(std::move(pen), std::move(eq), std::move(per_pen), std::move(per_eq));
    END_HANDLE_TH_ERRORS_PYBIND
  }

  const std::vector<Tensor>& offsets() const { return offsets_; }
  const std::vector<Tensor>& inv_stab() const { return inv_stab_; }
  const Tensor& consts() const { return consts_; }
  const std::vector<int64_t>& geometry() const { return geometry_; }

 private:
  std::vector<Tensor> offsets_, inv_stab_;
  Tensor consts_;
  std::vector<int64_t> geometry_;
  c10::TypedOperatorHandle<MultiPenaltySig> op_;
};


// The number of threads at::parallel_for runs n one-item ranges on, as compiled into this extension.
// at::parallel_for is a header template whose OpenMP branch exists only in translation units
// compiled with -fopenmp; without it every CPU kernel runs on one thread whatever
// torch.set_num_threads says, silently.  The tests call this to see the flag took effect.
int64_t parallel_threads(int64_t n) {
  std::set<int> seen;
  std::mutex lock;
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) {
    std::lock_guard<std::mutex> guard(lock);
    seen.insert(at::get_thread_num());
  });
  return static_cast<int64_t>(seen.size());
}
}  // namespace
}  // namespace projkernels

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using projkernels::MultiCall;
  using projkernels::SingleCall;
  m.doc() = "projkernels_C ops (registered on import) and the bound calls of the eager API";
  m.def("parallel_threads", &projkernels::parallel_threads, py::arg("n"),
        "threads at::parallel_for runs n one-item ranges on in this extension (1 without OpenMP)");
  py::class_<SingleCall>(m, "SingleCall",
                         "A single-weight configuration's public ops, bound to its table and geometry")
      .def(py::init<std::string, std::string, std::string, std::vector<at::Tensor>, std::vector<int64_t>>(),
           py::arg("penalty_energy_op"), py::arg("project_op"), py::arg("spectrum_op"), py::arg("table"),
           py::arg("geometry"))
      .def("penalty_energy", &SingleCall::penalty_energy, py::arg("weight"))
      .def("project", &SingleCall::project, py::arg("weight"))
      .def("spectrum", &SingleCall::spectrum, py::arg("weight"))
      .def("__copy__", [](py::object self) { return self; })
      .def("__deepcopy__", [](py::object self, py::object /*memo*/) { return self; })
      .def_property_readonly("table", &SingleCall::table)
      .def_property_readonly("geometry", &SingleCall::geometry);
  py::class_<MultiCall>(m, "MultiCall", "projkernels_C::multi_penalty bound to one list of layers' tables")
      .def(py::init<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor, std::vector<int64_t>>(),
           py::arg("offsets"), py::arg("inv_stab"), py::arg("consts"), py::arg("geometry"))
      .def("__call__", &MultiCall::call, py::arg("weights"))
      .def("__copy__", [](py::object self) { return self; })
      .def("__deepcopy__", [](py::object self, py::object /*memo*/) { return self; })
      .def_property_readonly("offsets", &MultiCall::offsets)
      .def_property_readonly("inv_stab", &MultiCall::inv_stab)
      .def_property_readonly("consts", &MultiCall::consts)
      .def_property_readonly("geometry", &MultiCall::geometry);
}
