// 2-D convolutions (NHWC input, HWIO kernel) as XLA FFI custom calls into oneDNN, in float32
// or in bfloat16 (bfloat16 input, kernel, output and gradients; oneDNN accumulates in float32,
// and the weight gradient is reduced in float32 and rounded once, when it is written out).
//
// XLA's own buffers are wrapped as oneDNN memory (nhwc / hwio strides): no copies of
// activations. The kernel is reordered into the blocked layout oneDNN picks (`any`), a small
// copy per call. Primitives are built once per shape and kept in a cache behind a mutex.
// Every oneDNN error becomes an FFI error (a Python exception), never a crash; the Python
// side (cvjax/ops/onednn.py) only sends shapes oneDNN supports.
//
// Scratchpads are the caller's (`scratchpad_mode::user`): every call hands each primitive a
// buffer owned by the calling thread. oneDNN's default, a library-managed "global"
// scratchpad, is a thread_local buffer sized when a primitive is *created* and looked up on
// the thread that *executes* it (oneDNN src/common/scratchpad.cpp). XLA runs custom calls on
// whichever of its threads is free, so a primitive built on one thread and run on another
// worked in a buffer sized for other primitives, or in none: wrong gradients, hangs and
// crashes once several calls were in flight (tests/test_convolution.py, the stress tests).

#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;

namespace {

struct Shape {
  int64_t n, h, w, c;    // Input, NHWC.
  int64_t kh, kw, o;     // Kernel HWIO: kh, kw, c / groups, o.
  int64_t oh, ow;        // Output spatial size.
  int64_t sh, sw, pt, pb, pl, pr, groups;
  memory::data_type dt;   // Of every buffer: f32 or bf16.
  auto key() const {
    return std::make_tuple(n, h, w, c, kh, kw, o, oh, ow, sh, sw, pt, pb, pl, pr, groups, dt);
  }
};

dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

memory::desc Act(int64_t n, int64_t h, int64_t w, int64_t c, memory::data_type dt) {
  return memory::desc({n, c, h, w}, dt, tag::nhwc);
}

// The HWIO kernel as oneDNN's (groups, O/g, I/g, KH, KW) weights, by strides.
memory::desc Hwio(const Shape& s) {
  int64_t ig = s.c / s.groups, og = s.o / s.groups;
  if (s.groups == 1)
    return memory::desc({s.o, ig, s.kh, s.kw}, s.dt,
                        memory::dims{1, s.o, s.kw * ig * s.o, ig * s.o});
  return memory::desc({s.groups, og, ig, s.kh, s.kw}, s.dt,
                      memory::dims{og, 1, s.o, s.kw * ig * s.o, ig * s.o});
}

memory::desc AnyWeights(const Shape& s, memory::data_type dt) {
  int64_t ig = s.c / s.groups, og = s.o / s.groups;
  if (s.groups == 1) return memory::desc({s.o, ig, s.kh, s.kw}, dt, tag::any);
  return memory::desc({s.groups, og, ig, s.kh, s.kw}, dt, tag::any);
}

// A reorder between the HWIO kernel and the layout a convolution primitive chose.
struct Reorder {
  dnnl::reorder::primitive_desc pd;
  dnnl::reorder prim;
};

struct Primitives {
  dnnl::convolution_forward::primitive_desc fwd_pd;
  dnnl::convolution_forward fwd;
  std::unique_ptr<Reorder> fwd_w;  // HWIO -> fwd_pd's weights layout, if they differ.
  dnnl::convolution_backward_data::primitive_desc bwd_data_pd;
  dnnl::convolution_backward_data bwd_data;
  std::unique_ptr<Reorder> bwd_data_w;
  dnnl::convolution_backward_weights::primitive_desc bwd_weights_pd;
  dnnl::convolution_backward_weights bwd_weights;
  std::unique_ptr<Reorder> bwd_weights_w;  // Its weights layout -> HWIO.
  // bfloat16 strided convolutions take their weight gradient in float32: x and dy are
  // converted first (oneDNN 3.2's bfloat16 kernel for it ran 20-50x slower than float32's on
  // AVX-512 BF16, ResNet-20's stride-2 convolutions: 1.1-1.9 s against 32-71 ms a call).
  std::unique_ptr<Reorder> x_to_f32, dy_to_f32;
};

std::unique_ptr<Reorder> ReorderIfNeeded(const memory::desc& from, const memory::desc& to) {
  if (from == to) return nullptr;
  dnnl::reorder::primitive_desc pd(Engine(), from, Engine(), to, UserScratchpad());
  return std::unique_ptr<Reorder>(new Reorder{pd, dnnl::reorder(pd)});
}

std::unique_ptr<Primitives> Build(const Shape& s) {
  auto& eng = Engine();
  auto p = std::make_unique<Primitives>();
  memory::dims strides{s.sh, s.sw}, pad_l{s.pt, s.pl}, pad_r{s.pb, s.pr};
  auto src = Act(s.n, s.h, s.w, s.c, s.dt), dst = Act(s.n, s.oh, s.ow, s.o, s.dt);
  // In bfloat16 the weight gradient is produced in float32 (its reduction over the batch stays
  // in float32) and rounded to bfloat16 by the reorder into the HWIO output.
  auto hwio = Hwio(s), any = AnyWeights(s, s.dt), any_diff = AnyWeights(s, memory::data_type::f32);
  p->fwd_pd = dnnl::convolution_forward::primitive_desc(
      eng, dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, src, any, dst,
      strides, pad_l, pad_r, UserScratchpad());
  p->fwd = dnnl::convolution_forward(p->fwd_pd);
  p->fwd_w = ReorderIfNeeded(hwio, p->fwd_pd.weights_desc());
  p->bwd_data_pd = dnnl::convolution_backward_data::primitive_desc(
      eng, dnnl::algorithm::convolution_direct, src, any, dst, strides, pad_l, pad_r, p->fwd_pd,
      UserScratchpad());
  p->bwd_data = dnnl::convolution_backward_data(p->bwd_data_pd);
  p->bwd_data_w = ReorderIfNeeded(hwio, p->bwd_data_pd.weights_desc());
  auto f32 = memory::data_type::f32;
  bool f32_weight_grad = s.dt == memory::data_type::bf16 && (s.sh > 1 || s.sw > 1);
  auto w_src = f32_weight_grad ? Act(s.n, s.h, s.w, s.c, f32) : src;
  auto w_dst = f32_weight_grad ? Act(s.n, s.oh, s.ow, s.o, f32) : dst;
  auto w_hint = f32_weight_grad
                    ? dnnl::convolution_forward::primitive_desc(
                          eng, dnnl::prop_kind::forward_training,
                          dnnl::algorithm::convolution_direct, w_src, any_diff, w_dst, strides,
                          pad_l, pad_r, UserScratchpad())
                    : p->fwd_pd;
  if (f32_weight_grad) {
    p->x_to_f32 = ReorderIfNeeded(src, w_src);
    p->dy_to_f32 = ReorderIfNeeded(dst, w_dst);
  }
  p->bwd_weights_pd = dnnl::convolution_backward_weights::primitive_desc(
      eng, dnnl::algorithm::convolution_direct, w_src, any_diff, w_dst, strides, pad_l, pad_r,
      w_hint, UserScratchpad());
  p->bwd_weights = dnnl::convolution_backward_weights(p->bwd_weights_pd);
  p->bwd_weights_w = ReorderIfNeeded(p->bwd_weights_pd.diff_weights_desc(), hwio);
  return p;
}

// Primitives are built once per shape; entries are never removed, so a pointer handed out
// stays valid. oneDNN primitives may execute concurrently from several threads.
const Primitives& Get(const Shape& s) {
  static std::mutex mu;
  static std::map<decltype(s.key()), std::unique_ptr<Primitives>> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto& slot = cache[s.key()];
  if (!slot) slot = Build(s);
  return *slot;
}

dnnl::stream& Stream() {
  thread_local dnnl::stream stream(Engine());
  return stream;
}

// The calling thread's scratchpad buffer, grown as needed. An XLA thread runs one custom call
// at a time and a call's primitives run one after another (oneDNN's CPU stream executes in
// the calling thread), so they can share it; a thread never sees another thread's buffer.
memory Scratchpad(const memory::desc& md) {
  thread_local std::unique_ptr<void, decltype(&std::free)> buffer(nullptr, &std::free);
  thread_local size_t capacity = 0;
  size_t size = md.get_size();
  if (size > capacity) {
    size_t rounded = (size + 4095) / 4096 * 4096;
    buffer.reset(std::aligned_alloc(4096, rounded));
    capacity = buffer ? rounded : 0;
    if (!buffer) throw dnnl::error(dnnl_out_of_memory, "cannot allocate a scratchpad");
  }
  return memory(md, Engine(), buffer.get());
}

// Executes `prim` of `pd` with `args` and a scratchpad of the calling thread.
void Run(const dnnl::primitive& prim, const dnnl::primitive_desc_base& pd,
         std::unordered_map<int, memory> args) {
  memory::desc scratch = pd.scratchpad_desc();
  if (scratch.get_size()) args.insert({DNNL_ARG_SCRATCHPAD, Scratchpad(scratch)});
  prim.execute(Stream(), args);
}

ffi::Error ShapeOf(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer y, int64_t sh, int64_t sw,
                   int64_t pt, int64_t pb, int64_t pl, int64_t pr, int64_t groups, Shape* out) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y.dimensions();
  if (xd.size() != 4 || wd.size() != 4 || yd.size() != 4)
    return ffi::Error::InvalidArgument("cvjax onednn conv: expected rank-4 NHWC/HWIO/NHWC");
  auto type = x.element_type();
  if ((type != ffi::F32 && type != ffi::BF16) || w.element_type() != type ||
      y.element_type() != type)
    return ffi::Error::InvalidArgument(
        "cvjax onednn conv: expected float32 or bfloat16, the same for every buffer");
  Shape& s = *out;
  s = Shape{xd[0], xd[1], xd[2], xd[3], wd[0], wd[1], wd[3], yd[1], yd[2],
          sh, sw, pt, pb, pl, pr, groups,
          type == ffi::BF16 ? memory::data_type::bf16 : memory::data_type::f32};
  if (groups < 1 || s.c != wd[2] * groups || s.o % groups || yd[0] != s.n || yd[3] != s.o)
    return ffi::Error::InvalidArgument("cvjax onednn conv: inconsistent shapes");
  return ffi::Error::Success();
}

memory Wrap(const memory::desc& md, void* data) { return memory(md, Engine(), data); }

// Reorders `from` into a new buffer of `to_desc` when `r` is set, else returns `from`.
memory Reordered(const std::unique_ptr<Reorder>& r, memory from, const memory::desc& to_desc) {
  if (!r) return from;
  memory to(to_desc, Engine());
  Run(r->prim, r->pd, {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to}});
  return to;
}

ffi::Error ConvForwardImpl(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y,
                           int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl,
                           int64_t pr, int64_t groups) {
  Shape s;
  if (auto e = ShapeOf(x, w, *y, sh, sw, pt, pb, pl, pr, groups, &s); e.failure()) return e;
  try {
    const Primitives& p = Get(s);
    memory wm = Reordered(p.fwd_w, Wrap(Hwio(s), w.untyped_data()), p.fwd_pd.weights_desc());
    Run(p.fwd, p.fwd_pd, {{DNNL_ARG_SRC, Wrap(Act(s.n, s.h, s.w, s.c, s.dt), x.untyped_data())},
                          {DNNL_ARG_WEIGHTS, wm},
                          {DNNL_ARG_DST,
                           Wrap(Act(s.n, s.oh, s.ow, s.o, s.dt), y->untyped_data())}});
    Stream().wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("cvjax onednn conv forward: ") + e.what());
  }
  return ffi::Error::Success();
}

// Input and weight gradients in one call; `need_dx` = 0 skips the input gradient (its
// output is then left unwritten: the caller does not use it).
ffi::Error ConvBackwardImpl(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer dy,
                            ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> dw,
                            int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl,
                            int64_t pr, int64_t groups, int64_t need_dx) {
  Shape s;
  if (auto e = ShapeOf(x, w, dy, sh, sw, pt, pb, pl, pr, groups, &s); e.failure()) return e;
  try {
    const Primitives& p = Get(s);
    auto src = Act(s.n, s.h, s.w, s.c, s.dt), dst = Act(s.n, s.oh, s.ow, s.o, s.dt);
    memory dy_m = Wrap(dst, dy.untyped_data());
    if (need_dx) {
      memory wm = Reordered(p.bwd_data_w, Wrap(Hwio(s), w.untyped_data()),
                            p.bwd_data_pd.weights_desc());
      Run(p.bwd_data, p.bwd_data_pd, {{DNNL_ARG_DIFF_DST, dy_m}, {DNNL_ARG_WEIGHTS, wm},
                                      {DNNL_ARG_DIFF_SRC, Wrap(src, dx->untyped_data())}});
    }
    memory dw_out = Wrap(Hwio(s), dw->untyped_data());
    memory dw_m = p.bwd_weights_w ? memory(p.bwd_weights_pd.diff_weights_desc(), Engine())
                                  : dw_out;
    memory x_w = Reordered(p.x_to_f32, Wrap(src, x.untyped_data()), p.bwd_weights_pd.src_desc());
    memory dy_w = Reordered(p.dy_to_f32, dy_m, p.bwd_weights_pd.diff_dst_desc());
    Run(p.bwd_weights, p.bwd_weights_pd, {{DNNL_ARG_SRC, x_w},
                                          {DNNL_ARG_DIFF_DST, dy_w},
                                          {DNNL_ARG_DIFF_WEIGHTS, dw_m}});
    if (p.bwd_weights_w)
      Run(p.bwd_weights_w->prim, p.bwd_weights_w->pd, {{DNNL_ARG_FROM, dw_m}, {DNNL_ARG_TO, dw_out}});
    Stream().wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("cvjax onednn conv backward: ") + e.what());
  }
  return ffi::Error::Success();
}

}  // namespace

#define CONV_ATTRS                                                                   \
  .Attr<int64_t>("stride_h").Attr<int64_t>("stride_w").Attr<int64_t>("pad_top")      \
      .Attr<int64_t>("pad_bottom").Attr<int64_t>("pad_left").Attr<int64_t>("pad_right") \
      .Attr<int64_t>("groups")

XLA_FFI_DEFINE_HANDLER_SYMBOL(CvjaxConvForward, ConvForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(CvjaxConvBackward, ConvBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() CONV_ATTRS
                                  .Attr<int64_t>("need_dx"));

// The oneDNN version the library runs with, for the log.
extern "C" const char* CvjaxOnednnVersion() {
  static std::string v = [] {
    auto* ver = dnnl_version();
    return std::to_string(ver->major) + "." + std::to_string(ver->minor) + "." +
           std::to_string(ver->patch) +
           (ver->cpu_runtime == DNNL_RUNTIME_OMP   ? " OpenMP"
            : ver->cpu_runtime == DNNL_RUNTIME_TBB ? " TBB"
                                                   : " other threading");
  }();
  return v.c_str();
}

// Whether oneDNN runs bfloat16 convolutions with the CPU's own bfloat16 instructions
// (AVX-512 BF16 or AMX): its effective instruction set, ONEDNN_MAX_CPU_ISA included, contains
// avx512_core_bf16 (the ISA values are nested bit masks).
extern "C" int CvjaxOnednnBf16() {
  unsigned isa = dnnl_get_effective_cpu_isa();
  return (isa & dnnl_cpu_isa_avx512_core_bf16) == dnnl_cpu_isa_avx512_core_bf16;
}

// The kernel oneDNN picks for a bfloat16 3x3 convolution of a CIFAR ResNet, for the log.
extern "C" const char* CvjaxOnednnBf16Kernel() {
  static std::string impl = [] {
    try {
      auto bf16 = memory::data_type::bf16;
      memory::desc act({128, 16, 32, 32}, bf16, tag::nhwc);
      memory::desc w({16, 16, 3, 3}, bf16, tag::any);
      dnnl::convolution_forward::primitive_desc pd(
          Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
          act, w, act, {1, 1}, {1, 1}, {1, 1});
      return std::string(pd.impl_info_str());
    } catch (const dnnl::error& e) {
      return std::string("none (") + e.what() + ")";
    }
  }();
  return impl.c_str();
}
