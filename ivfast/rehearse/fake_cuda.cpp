// A stand-in CUDA device for rehearsing the training step on fake tensors on a machine with no
// GPU (python -m ivfast.train --rehearse). Fake tensors hold no data and launch no kernel, but
// moving a module to "cuda", running autograd on it or asking for a CUDA generator goes through
// three C++ registries that a CPU build of torch leaves empty: the device guard, the CUDA hooks
// and the default generator. This library fills them with no-ops for one device, cuda:0.
// It is built and loaded only by ivfast.rehearse (never by training) and must never be loaded
// into a process that is meant to touch a real GPU.
#include <ATen/core/Generator.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/core/GeneratorImpl.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

namespace {

using c10::Device;
using c10::DeviceIndex;
using c10::DeviceType;
using c10::Stream;

thread_local DeviceIndex current_index = 0;

struct FakeCUDAGuard final : c10::impl::DeviceGuardImplInterface {
  DeviceType type() const override { return DeviceType::CUDA; }
  Device exchangeDevice(Device d) const override {
    Device old(DeviceType::CUDA, current_index);
    current_index = d.index() < 0 ? 0 : d.index();
    return old;
  }
  Device getDevice() const override { return Device(DeviceType::CUDA, current_index); }
  void setDevice(Device d) const override { current_index = d.index() < 0 ? 0 : d.index(); }
  void uncheckedSetDevice(Device d) const noexcept override { current_index = d.index() < 0 ? 0 : d.index(); }
  Stream getStream(Device d) const override { return Stream(Stream::DEFAULT, d); }
  Stream getNewStream(Device d, int) const override { return Stream(Stream::DEFAULT, d); }
  Stream getStreamFromGlobalPool(Device d, bool) const override { return Stream(Stream::DEFAULT, d); }
  Stream exchangeStream(Stream s) const override { return Stream(Stream::DEFAULT, s.device()); }
  DeviceIndex deviceCount() const noexcept override { return 1; }
  void destroyEvent(void*, const DeviceIndex) const noexcept override {}
  void record(void**, const Stream&, const DeviceIndex, const c10::EventFlag) const override {}
  void block(void*, const Stream&) const override {}
  bool queryEvent(void*) const override { return true; }
  bool queryStream(const Stream&) const override { return true; }
  void synchronizeStream(const Stream&) const override {}
  void synchronizeEvent(void*) const override {}
  void synchronizeDevice(const DeviceIndex) const override {}
  void recordDataPtrOnStream(const c10::DataPtr&, const Stream&) const override {}
};

// A generator that carries a seed and an offset and never draws: fake tensors draw nothing.
struct FakeCUDAGenerator final : c10::GeneratorImpl {
  uint64_t seed_ = 67280421310721ULL, offset_ = 0;
  FakeCUDAGenerator()
      : c10::GeneratorImpl(Device(DeviceType::CUDA, 0), c10::DispatchKeySet(c10::DispatchKey::CUDA)) {}
  void set_current_seed(uint64_t s) override { seed_ = s; offset_ = 0; }
  void set_offset(uint64_t o) override { offset_ = o; }
  uint64_t get_offset() const override { return offset_; }
  uint64_t current_seed() const override { return seed_; }
  uint64_t seed() override { return seed_; }
  void set_state(const c10::TensorImpl&) override {}
  c10::intrusive_ptr<c10::TensorImpl> get_state() const override {
    TORCH_CHECK(false, "the rehearsal's stand-in CUDA generator has no state to save");
  }
  FakeCUDAGenerator* clone_impl() const override {
    auto* g = new FakeCUDAGenerator();
    g->seed_ = seed_;
    g->offset_ = offset_;
    return g;
  }
};

struct FakeCUDAHooks final : at::CUDAHooksInterface {
  explicit FakeCUDAHooks(at::CUDAHooksArgs) {}
  void init() const override {}
  bool isBuilt() const override { return true; }
  bool isAvailable() const override { return true; }
  bool hasPrimaryContext(DeviceIndex) const override { return true; }
  DeviceIndex deviceCount() const override { return 1; }
  DeviceIndex current_device() const override { return current_index; }
  DeviceIndex getCurrentDevice() const override { return current_index; }
  void setCurrentDevice(DeviceIndex d) const override { current_index = d; }
  DeviceIndex exchangeDevice(DeviceIndex d) const override { auto o = current_index; current_index = d; return o; }
  DeviceIndex maybeExchangeDevice(DeviceIndex d) const override { return exchangeDevice(d); }
  int getNumGPUs() const override { return 1; }
  bool isPinnedPtr(const void*) const override { return false; }
  const at::Generator& getDefaultGenerator(DeviceIndex) const override {
    static at::Generator g = at::make_generator<FakeCUDAGenerator>();
    return g;
  }
  at::Generator getNewGenerator(DeviceIndex) const override { return at::make_generator<FakeCUDAGenerator>(); }
  void deviceSynchronize(DeviceIndex) const override {}
};

}  // namespace

C10_REGISTER_GUARD_IMPL(CUDA, FakeCUDAGuard);
namespace at::detail {
// Under the key getCUDAHooks() asks for, with preferred priority: on a CUDA build of torch (loaded after this library) the real hooks then
// skip their registration instead of replacing these.
C10_REGISTER_TYPED_CLASS_WITH_PRIORITY(CUDAHooksRegistry, "CUDAHooks", c10::REGISTRY_PREFERRED, FakeCUDAHooks);
}  // namespace at::detail

namespace {
FakeCUDAGuard the_guard;
}

// Whether torch's CUDA hooks are this library's (they are fixed at their first use, so the
// library must be loaded before torch: LD_PRELOAD).
extern "C" int ivfast_fake_cuda_hooks_active() {
  return dynamic_cast<const FakeCUDAHooks*>(&at::detail::getCUDAHooks()) != nullptr ? 1 : 0;
}

// Put this guard in the CUDA slot again: a CUDA build of torch registers its own after this
// library's static initialisers ran, and the last registration wins.
extern "C" void ivfast_fake_cuda_install_guard() {
  c10::impl::device_guard_impl_registry[static_cast<size_t>(DeviceType::CUDA)].store(&the_guard);
}
