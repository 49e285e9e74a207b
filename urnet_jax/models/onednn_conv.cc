// oneDNN convolutions as XLA FFI handlers: forward, input gradient and kernel gradient of a 2-D
// convolution with NHWC activations, HWIO kernels, float32, strides and explicit (top, bottom, left, right)
// zero padding, no dilation, one group. Built and registered by urnet_jax/models/onednn.py.
//
// Activations stay in XLA's NHWC layout (oneDNN's blocked activation formats would need reorders of every
// image); kernels are reordered to the format each primitive chooses (small copies). Primitives are created
// once per geometry and cached. XLA calls a handler from any of its threads, and oneDNN's own (library)
// scratchpad is shared by all primitives and may not move between threads, so every primitive uses a
// user scratchpad: a buffer per calling thread, grown as needed, used by one execution at a time.

#include <array>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <string>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

enum PassKind : int64_t { kForward = 0, kInputGrad = 1, kKernelGrad = 2 };

// pass, N, H, W, C_in, KH, KW, C_out, OH, OW, stride_h, stride_w, pad top, bottom, left, right
using Key = std::array<int64_t, 16>;

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

// A 64-byte aligned buffer of at least `bytes` owned by the calling thread (slot 0: the pass, 1: its reorder).
void* ThreadScratchpad(int slot, size_t bytes) {
  struct Buffer {
    void* data = nullptr;
    size_t size = 0;
    ~Buffer() { std::free(data); }
  };
  thread_local Buffer buffers[2];
  Buffer& buffer = buffers[slot];
  if (buffer.size < bytes) {
    std::free(buffer.data);
    buffer.size = (bytes + 63) / 64 * 64;
    buffer.data = std::aligned_alloc(64, buffer.size);
    if (buffer.data == nullptr) {
      buffer.size = 0;
      throw std::bad_alloc();
    }
  }
  return buffer.data;
}

dnnl::memory::desc Activations(int64_t n, int64_t h, int64_t w, int64_t c) {
  return dnnl::memory::desc({n, c, h, w}, dnnl::memory::data_type::f32, dnnl::memory::format_tag::nhwc);
}

dnnl::memory::desc Kernel(int64_t kh, int64_t kw, int64_t c_in, int64_t c_out) {
  return dnnl::memory::desc({c_out, c_in, kh, kw}, dnnl::memory::data_type::f32, dnnl::memory::format_tag::hwio);
}

// A cached pass: its primitive, the kernel format it chose and, when that is not XLA's HWIO, the reorder
// between the two (HWIO -> its format for the forward pass and the input gradient, its format -> HWIO for
// the kernel gradient). oneDNN's fast kernels want blocked kernels; the activations stay NHWC.
struct Pass {
  dnnl::primitive primitive;
  dnnl::memory::desc kernel;
  dnnl::memory::desc scratchpad;
  dnnl::reorder kernel_reorder;
  dnnl::memory::desc reorder_scratchpad;
  bool reorders_kernel = false;
};

Pass CreatePass(const Key& k) {
  const auto src = Activations(k[1], k[2], k[3], k[4]);
  const auto hwio = Kernel(k[5], k[6], k[4], k[7]);
  const auto any_kernel = dnnl::memory::desc(hwio.get_dims(), dnnl::memory::data_type::f32,
                                             dnnl::memory::format_tag::any);
  const auto dst = Activations(k[1], k[8], k[9], k[7]);
  const dnnl::memory::dims strides = {k[10], k[11]}, pad_low = {k[12], k[14]}, pad_high = {k[13], k[15]};
  const auto algorithm = dnnl::algorithm::convolution_direct;
  const auto attr = UserScratchpad();
  dnnl::convolution_forward::primitive_desc forward(Engine(), dnnl::prop_kind::forward_training, algorithm, src,
                                                    any_kernel, dst, strides, pad_low, pad_high, attr);
  Pass pass;
  switch (k[0]) {
    case kForward:
      pass.primitive = dnnl::convolution_forward(forward);
      pass.kernel = forward.weights_desc();
      pass.scratchpad = forward.scratchpad_desc();
      break;
    case kInputGrad: {
      dnnl::convolution_backward_data::primitive_desc input_grad(Engine(), algorithm, src, any_kernel, dst, strides,
                                                                 pad_low, pad_high, forward, attr);
      pass.primitive = dnnl::convolution_backward_data(input_grad);
      pass.kernel = input_grad.weights_desc();
      pass.scratchpad = input_grad.scratchpad_desc();
      break;
    }
    default: {
      dnnl::convolution_backward_weights::primitive_desc kernel_grad(Engine(), algorithm, src, any_kernel, dst,
                                                                     strides, pad_low, pad_high, forward, attr);
      pass.primitive = dnnl::convolution_backward_weights(kernel_grad);
      pass.kernel = kernel_grad.diff_weights_desc();
      pass.scratchpad = kernel_grad.scratchpad_desc();
    }
  }
  pass.reorders_kernel = pass.kernel != hwio;
  if (pass.reorders_kernel) {
    const auto reorder = k[0] == kKernelGrad
                             ? dnnl::reorder::primitive_desc(Engine(), pass.kernel, Engine(), hwio, attr)
                             : dnnl::reorder::primitive_desc(Engine(), hwio, Engine(), pass.kernel, attr);
    pass.kernel_reorder = dnnl::reorder(reorder);
    pass.reorder_scratchpad = reorder.scratchpad_desc();
  }
  return pass;
}

const Pass& CachedPass(const Key& key) {
  static std::mutex mutex;
  static std::map<Key, std::unique_ptr<Pass>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto& entry = cache[key];
  if (!entry) entry = std::make_unique<Pass>(CreatePass(key));
  return *entry;
}

// Runs one pass. `image` is the (N, H, W, C_in) input or its gradient, `kernel` the (KH, KW, C_in, C_out)
// kernel or its gradient, `output` the (N, OH, OW, C_out) output or its gradient; the pass writes one of
// them (forward: output, input gradient: image, kernel gradient: kernel) and reads the other two.
ffi::Error Run(PassKind kind, float* image, const ffi::Span<const int64_t>& image_dims, float* kernel,
               const ffi::Span<const int64_t>& kernel_dims, float* output,
               const ffi::Span<const int64_t>& output_dims, int64_t stride_h, int64_t stride_w, int64_t pad_top,
               int64_t pad_bottom, int64_t pad_left, int64_t pad_right) {
  if (image_dims.size() != 4 || kernel_dims.size() != 4 || output_dims.size() != 4) {
    return ffi::Error::InvalidArgument("onednn conv: expected 4-D NHWC activations and an HWIO kernel");
  }
  if (kernel_dims[2] != image_dims[3] || kernel_dims[3] != output_dims[3] || image_dims[0] != output_dims[0]) {
    return ffi::Error::InvalidArgument("onednn conv: channel or batch sizes do not match");
  }
  const Key key = {kind,           image_dims[0],  image_dims[1], image_dims[2],  image_dims[3], kernel_dims[0],
                   kernel_dims[1], kernel_dims[3], output_dims[1], output_dims[2], stride_h,      stride_w,
                   pad_top,        pad_bottom,     pad_left,       pad_right};
  try {
    const Pass& pass = CachedPass(key);
    auto image_memory = dnnl::memory(Activations(key[1], key[2], key[3], key[4]), Engine(), image);
    auto hwio_memory = dnnl::memory(Kernel(key[5], key[6], key[4], key[7]), Engine(), kernel);
    auto output_memory = dnnl::memory(Activations(key[1], key[8], key[9], key[7]), Engine(), output);
    auto kernel_memory = pass.reorders_kernel ? dnnl::memory(pass.kernel, Engine()) : hwio_memory;
    auto scratchpad = dnnl::memory(pass.scratchpad, Engine(), ThreadScratchpad(0, pass.scratchpad.get_size()));
    dnnl::stream stream(Engine());
    auto reorder_kernel = [&](dnnl::memory& from, dnnl::memory& to) {
      if (!pass.reorders_kernel) return;
      auto reorder_scratchpad = dnnl::memory(pass.reorder_scratchpad, Engine(),
                                             ThreadScratchpad(1, pass.reorder_scratchpad.get_size()));
      pass.kernel_reorder.execute(stream, {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to},
                                           {DNNL_ARG_SCRATCHPAD, reorder_scratchpad}});
    };
    switch (kind) {
      case kForward:
        reorder_kernel(hwio_memory, kernel_memory);
        pass.primitive.execute(stream, {{DNNL_ARG_SRC, image_memory}, {DNNL_ARG_WEIGHTS, kernel_memory},
                                        {DNNL_ARG_DST, output_memory}, {DNNL_ARG_SCRATCHPAD, scratchpad}});
        break;
      case kInputGrad:
        reorder_kernel(hwio_memory, kernel_memory);
        pass.primitive.execute(stream, {{DNNL_ARG_DIFF_SRC, image_memory}, {DNNL_ARG_WEIGHTS, kernel_memory},
                                        {DNNL_ARG_DIFF_DST, output_memory}, {DNNL_ARG_SCRATCHPAD, scratchpad}});
        break;
      case kKernelGrad:
        pass.primitive.execute(stream, {{DNNL_ARG_SRC, image_memory}, {DNNL_ARG_DIFF_WEIGHTS, kernel_memory},
                                        {DNNL_ARG_DIFF_DST, output_memory}, {DNNL_ARG_SCRATCHPAD, scratchpad}});
        reorder_kernel(kernel_memory, hwio_memory);
        break;
    }
    stream.wait();
  } catch (const dnnl::error& error) {
    return ffi::Error::Internal(std::string("onednn conv: ") + error.what());
  } catch (const std::bad_alloc&) {
    return ffi::Error::Internal("onednn conv: out of memory for its scratchpad");
  }
  return ffi::Error::Success();
}

using F32 = ffi::Buffer<ffi::F32>;
using F32Result = ffi::ResultBuffer<ffi::F32>;

ffi::Error Forward(F32 image, F32 kernel, F32Result output, int64_t stride_h, int64_t stride_w, int64_t pad_top,
                   int64_t pad_bottom, int64_t pad_left, int64_t pad_right) {
  return Run(kForward, image.typed_data(), image.dimensions(), kernel.typed_data(), kernel.dimensions(),
             output->typed_data(), output->dimensions(), stride_h, stride_w, pad_top, pad_bottom, pad_left,
             pad_right);
}

ffi::Error InputGrad(F32 output_grad, F32 kernel, F32Result image_grad, int64_t stride_h, int64_t stride_w,
                     int64_t pad_top, int64_t pad_bottom, int64_t pad_left, int64_t pad_right) {
  return Run(kInputGrad, image_grad->typed_data(), image_grad->dimensions(), kernel.typed_data(),
             kernel.dimensions(), output_grad.typed_data(), output_grad.dimensions(), stride_h, stride_w, pad_top,
             pad_bottom, pad_left, pad_right);
}

ffi::Error KernelGrad(F32 image, F32 output_grad, F32Result kernel_grad, int64_t stride_h, int64_t stride_w,
                      int64_t pad_top, int64_t pad_bottom, int64_t pad_left, int64_t pad_right) {
  return Run(kKernelGrad, image.typed_data(), image.dimensions(), kernel_grad->typed_data(),
             kernel_grad->dimensions(), output_grad.typed_data(), output_grad.dimensions(), stride_h, stride_w,
             pad_top, pad_bottom, pad_left, pad_right);
}

auto Binding() {
  return ffi::Ffi::Bind()
      .Arg<F32>()
      .Arg<F32>()
      .Ret<F32>()
      .Attr<int64_t>("stride_h")
      .Attr<int64_t>("stride_w")
      .Attr<int64_t>("pad_top")
      .Attr<int64_t>("pad_bottom")
      .Attr<int64_t>("pad_left")
      .Attr<int64_t>("pad_right");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(UrnetOnednnConvForward, Forward, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(UrnetOnednnConvInputGrad, InputGrad, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(UrnetOnednnConvKernelGrad, KernelGrad, Binding());
