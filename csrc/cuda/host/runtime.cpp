// host/runtime.cpp -- the emulated GPU of the host build: fibers, the block scheduler, warp collectives,
// __syncthreads, cp.async groups, dynamic shared memory and the runtime API subset. See runtime.h for the model.
#include "runtime.h"

#include <cxxabi.h>
#include <dlfcn.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define BIVLM_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define BIVLM_ASAN 1
#endif
#endif
#if defined(BIVLM_ASAN)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

// ---- context switch ------------------------------------------------------------------------------------------
// x86-64: a hand-written switch (callee-saved registers, MXCSR and the x87 control word; the System V ABI lets
// everything else be clobbered across a call). ~20x faster than swapcontext, which makes a sigprocmask system
// call per switch -- and a warp collective costs two switches per lane. Elsewhere: ucontext.
#if defined(__x86_64__) && !defined(BIVLM_HOST_UCONTEXT)
#define BIVLM_FAST_SWITCH 1
extern "C" void bivlm_host_switch(void** save_sp, void* new_sp);
asm(R"(
  .text
  .globl bivlm_host_switch
  .type bivlm_host_switch, @function
bivlm_host_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size bivlm_host_switch, .-bivlm_host_switch
  .section .note.GNU-stack,"",@progbits
  .text
)");
#endif

namespace bivlm {
namespace host {

namespace {

constexpr size_t kStackBytes = 256 * 1024;  // per GPU thread; mapped lazily, a PROT_NONE guard page below it
constexpr int kMaxThreads = 1024;
constexpr size_t kMaxDynamicSmem = 227 * 1024;  // sm_90's opt-in maximum per block

enum class State { kRunnable, kWarpWait, kBlockWait, kExited };

struct AsyncGroup {
  struct Copy {
    void* dst;
    unsigned char bytes[16];
    int size;
  };
  std::vector<Copy> copies;
};

}  // namespace

struct ThreadState {
#if defined(BIVLM_FAST_SWITCH)
  void* sp = nullptr;  // saved stack pointer while switched out
#else
  ucontext_t ctx;
#endif
  void* stack = nullptr;  // usable stack (above the guard page)
  uint3 tid{0, 0, 0};
  int linear = 0;
  State state = State::kExited;
  const char* op = nullptr;  // collective being waited in
  unsigned mask = 0;
  void* data = nullptr;
  void* fake_stack = nullptr;                 // ASan bookkeeping across switches
  std::vector<AsyncGroup> async_done;         // committed cp.async groups, oldest first
  AsyncGroup async_open;                      // issued since the last commit
};

namespace {

struct Machine {
  std::vector<ThreadState> threads = std::vector<ThreadState>(kMaxThreads);
#if defined(BIVLM_FAST_SWITCH)
  void* main_sp = nullptr;
#else
  ucontext_t main_ctx;
#endif
  const void* main_stack_bottom = nullptr;
  size_t main_stack_size = 0;
  ThreadState* current = nullptr;
  const LaunchConfig* cfg = nullptr;
  uint3 block{0, 0, 0};
  int nthreads = 0;
  unsigned char* smem = nullptr;  // malloc'd per launch at exactly cfg->smem bytes
  void (*body)(void*) = nullptr;
  void* body_ctx = nullptr;
  cudaError_t last_error = cudaSuccess;
  long launches = 0;
  std::map<const void*, long> per_kernel;
};

Machine& M() {
  static Machine m;
  return m;
}

void* map_stack() {
  const size_t page = 4096;
  void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                 -1, 0);
  if (p == MAP_FAILED) fatal("cannot map a %zu-byte fiber stack", kStackBytes);
  mprotect(p, page, PROT_NONE);  // overflow faults instead of corrupting the next stack
  return static_cast<char*>(p) + page;
}

// Switch from the scheduler into thread t, and back when it yields or exits.
void enter(ThreadState& t) {
  Machine& m = M();
  m.current = &t;
#if defined(BIVLM_ASAN)
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, t.stack, kStackBytes);
#endif
#if defined(BIVLM_FAST_SWITCH)
  bivlm_host_switch(&m.main_sp, t.sp);
#else
  swapcontext(&m.main_ctx, &t.ctx);
#endif
#if defined(BIVLM_ASAN)
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  m.current = nullptr;
}

// From a fiber back to the scheduler (exiting: the fiber's stack is dead and will be reused).
void leave(ThreadState& t, bool exiting) {
  Machine& m = M();
#if defined(BIVLM_ASAN)
  __sanitizer_start_switch_fiber(exiting ? nullptr : &t.fake_stack, m.main_stack_bottom, m.main_stack_size);
#else
  (void)exiting;
#endif
#if defined(BIVLM_FAST_SWITCH)
  bivlm_host_switch(&t.sp, m.main_sp);
#else
  swapcontext(&t.ctx, &m.main_ctx);
#endif
#if defined(BIVLM_ASAN)
  __sanitizer_finish_switch_fiber(t.fake_stack, &m.main_stack_bottom, &m.main_stack_size);
#endif
}

void flush_async(ThreadState& t, size_t keep);

[[noreturn]] void fiber_main() {
  Machine& m = M();
#if defined(BIVLM_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &m.main_stack_bottom, &m.main_stack_size);
#endif
  ThreadState& t = *m.current;
  m.body(m.body_ctx);
  // A thread's outstanding cp.async copies still land (nobody can read them without a wait, but keep the
  // memory effects of the GPU).
  t.async_done.push_back(std::move(t.async_open));
  t.async_open = AsyncGroup{};
  flush_async(t, 0);
  t.state = State::kExited;
  // A lane that exits while others of its warp wait for it in a collective: a hang on a GPU.
  Machine& mm = M();
  const int w0 = t.linear / 32 * 32;
  const int lane = t.linear % 32;
  for (int l = w0; l < w0 + 32 && l < mm.nthreads; ++l) {
    const ThreadState& o = mm.threads[l];
    if (o.state == State::kWarpWait && (o.mask >> lane & 1u))
      fatal("lane %d exited while lane %d waits for it in %s (mask 0x%08x)", lane, l - w0, o.op, o.mask);
  }
  leave(t, true);
  fatal("an exited fiber was resumed");  // never returns: there is no frame to return to
}

void flush_async(ThreadState& t, size_t keep) {
  while (t.async_done.size() > keep) {
    for (const AsyncGroup::Copy& c : t.async_done.front().copies) std::memcpy(c.dst, c.bytes, c.size);
    t.async_done.erase(t.async_done.begin());
  }
}

bool all_live_at_barrier() {
  Machine& m = M();
  bool any = false;
  for (int i = 0; i < m.nthreads; ++i) {
    const State s = m.threads[i].state;
    if (s == State::kExited) continue;
    if (s != State::kBlockWait) return false;
    any = true;
  }
  return any;
}

void release_barrier() {
  Machine& m = M();
  for (int i = 0; i < m.nthreads; ++i)
    if (m.threads[i].state == State::kBlockWait) m.threads[i].state = State::kRunnable;
}

[[noreturn]] void deadlock() {
  Machine& m = M();
  std::fprintf(stderr, "bivlm host build: deadlock in block (%u,%u,%u) of %s; waiting threads:\n", m.block.x,
               m.block.y, m.block.z, m.cfg->name);
  int shown = 0;
  for (int i = 0; i < m.nthreads && shown < 16; ++i) {
    const ThreadState& t = m.threads[i];
    if (t.state == State::kWarpWait) {
      std::fprintf(stderr, "  thread %d (warp %d lane %d) in %s mask 0x%08x\n", i, i / 32, i % 32, t.op, t.mask);
      ++shown;
    } else if (t.state == State::kBlockWait) {
      std::fprintf(stderr, "  thread %d (warp %d lane %d) in __syncthreads\n", i, i / 32, i % 32);
      ++shown;
    }
  }
  fatal("deadlock: no thread of the block can proceed");
}

void run_block() {
  Machine& m = M();
  const dim3 b = m.cfg->block;
  for (int i = 0; i < m.nthreads; ++i) {
    ThreadState& t = m.threads[i];
    if (t.stack == nullptr) t.stack = map_stack();
#if defined(BIVLM_ASAN)
    __asan_unpoison_memory_region(t.stack, kStackBytes);  // frames left by the previous block's fiber
#endif
    t.linear = i;
    t.tid = uint3{static_cast<unsigned>(i) % b.x, static_cast<unsigned>(i) / b.x % b.y,
                  static_cast<unsigned>(i) / (b.x * b.y)};
    t.state = State::kRunnable;
    t.op = nullptr;
    t.mask = 0;
    t.data = nullptr;
    t.async_done.clear();
    t.async_open = AsyncGroup{};
#if defined(BIVLM_FAST_SWITCH)
    // The frame bivlm_host_switch pops: MXCSR/x87 control word, r15..r12, rbx, rbp, then it returns into
    // fiber_main with the stack aligned as after a call (a zero return address above it: fiber_main never returns).
    uint64_t* top = reinterpret_cast<uint64_t*>(static_cast<char*>(t.stack) + kStackBytes);
    top[-1] = 0;
    top[-2] = reinterpret_cast<uint64_t>(&fiber_main);
    for (int r = 3; r <= 8; ++r) top[-r] = 0;  // rbp, rbx, r12, r13, r14, r15
    top[-9] = 0x1F80u | (uint64_t{0x037Fu} << 32);  // default MXCSR, x87 control word
    t.sp = top - 9;
#else
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = t.stack;
    t.ctx.uc_stack.ss_size = kStackBytes;
    t.ctx.uc_link = nullptr;
    makecontext(&t.ctx, fiber_main, 0);
#endif
  }
  int alive = m.nthreads;
  while (alive > 0) {
    bool progressed = false;
    for (int i = 0; i < m.nthreads; ++i) {
      ThreadState& t = m.threads[i];
      if (t.state != State::kRunnable) continue;
      enter(t);
      progressed = true;
      if (t.state == State::kExited) {
        --alive;
        if (all_live_at_barrier()) release_barrier();  // exited threads do not hold a barrier back
      }
    }
    if (!progressed && alive > 0) deadlock();
  }
}

}  // namespace

// ---- API used by the kernels and ptx.cuh ---------------------------------------------------------------------

void fatal(const char* fmt, ...) {
  Machine& m = M();
  std::fflush(stdout);
  std::fprintf(stderr, "bivlm host build: ");
  va_list ap;
  va_start(ap, fmt);
  std::vfprintf(stderr, fmt, ap);
  va_end(ap);
  if (m.cfg != nullptr) {
    std::fprintf(stderr, " [kernel %s (%s:%d), block (%u,%u,%u)", m.cfg->name, m.cfg->file, m.cfg->line, m.block.x,
                 m.block.y, m.block.z);
    if (m.current != nullptr)
      std::fprintf(stderr, ", thread (%u,%u,%u) = warp %d lane %d", m.current->tid.x, m.current->tid.y,
                   m.current->tid.z, m.current->linear / 32, m.current->linear % 32);
    std::fprintf(stderr, "]");
  }
  std::fprintf(stderr, "\n");
  std::abort();
}

static ThreadState& current_thread(const char* what) {
  ThreadState* t = M().current;
  if (t == nullptr) fatal("%s used outside a kernel", what);
  return *t;
}

const uint3& thread_idx() { return current_thread("threadIdx").tid; }
const uint3& block_idx() {
  current_thread("blockIdx");
  return M().block;
}
const dim3& block_dim() {
  current_thread("blockDim");
  return M().cfg->block;
}
const dim3& grid_dim() {
  current_thread("gridDim");
  return M().cfg->grid;
}
int linear_tid() { return current_thread("a thread index").linear; }

void syncthreads() {
  ThreadState& t = current_thread("__syncthreads");
  t.state = State::kBlockWait;
  if (all_live_at_barrier()) {
    release_barrier();
    return;
  }
  leave(t, false);
}

void warp_collective(unsigned mask, const char* op, void* data, CombineFn combine) {
  Machine& m = M();
  ThreadState& t = current_thread(op);
  const int lane = t.linear % 32;
  const int w0 = t.linear - lane;
  if (!(mask >> lane & 1u)) fatal("%s: the calling lane %d is not in its mask 0x%08x", op, lane, mask);
  t.state = State::kWarpWait;
  t.op = op;
  t.mask = mask;
  t.data = data;
  bool complete = true;
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    if (w0 + l >= m.nthreads) fatal("%s: mask 0x%08x names lane %d, which this block does not have", op, mask, l);
    const ThreadState& o = m.threads[w0 + l];
    if (o.state == State::kExited) fatal("%s: mask 0x%08x names lane %d, which has exited", op, mask, l);
    if (o.state == State::kWarpWait && (o.op != op || o.mask != mask))
      fatal("lanes of one warp in different collectives: lane %d in %s (mask 0x%08x), lane %d in %s (mask 0x%08x)",
            lane, op, mask, l, o.op, o.mask);
    if (o.state != State::kWarpWait) complete = false;
  }
  if (!complete) {
    leave(t, false);  // the last lane to arrive runs combine and makes us runnable
    return;
  }
  void* slots[32] = {};
  for (int l = 0; l < 32; ++l)
    if (mask >> l & 1u) slots[l] = m.threads[w0 + l].data;
  combine(slots, mask);
  for (int l = 0; l < 32; ++l)
    if (mask >> l & 1u) {
      ThreadState& o = m.threads[w0 + l];
      o.state = State::kRunnable;
      o.op = nullptr;
      o.data = nullptr;
    }
}

void cp_async_issue(void* dst, const void* src, int size, int src_size) {
  ThreadState& t = current_thread("cp.async");
  AsyncGroup::Copy c;
  c.dst = dst;
  c.size = size;
  std::memset(c.bytes, 0, sizeof(c.bytes));
  if (src_size > 0) std::memcpy(c.bytes, src, static_cast<size_t>(src_size < size ? src_size : size));
  t.async_open.copies.push_back(c);
}

void cp_async_commit() {
  ThreadState& t = current_thread("cp.async.commit_group");
  t.async_done.push_back(std::move(t.async_open));
  t.async_open = AsyncGroup{};
}

void cp_async_wait(int pending_groups) {
  ThreadState& t = current_thread("cp.async.wait_group");
  flush_async(t, static_cast<size_t>(pending_groups < 0 ? 0 : pending_groups));
}

void* dynamic_smem() {
  current_thread("dynamic shared memory");
  Machine& m = M();
  return m.smem;
}

long launch_count() { return M().launches; }

std::string launched_kernels() {
  std::string out;
  for (const auto& [addr, count] : M().per_kernel) {
    Dl_info info{};
    std::string name = "?";
    if (dladdr(addr, &info) != 0 && info.dli_sname != nullptr) {
      int status = 0;
      char* d = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
      name = status == 0 && d != nullptr ? d : info.dli_sname;
      std::free(d);
    }
    out += std::to_string(count) + " " + name + "\n";
  }
  return out;
}

void run_grid(const LaunchConfig& cfg, void (*body)(void*), void* ctx) {
  Machine& m = M();
  if (m.cfg != nullptr) fatal("kernel %s launched from inside kernel %s (not supported)", cfg.name, m.cfg->name);
  const uint64_t nthreads = static_cast<uint64_t>(cfg.block.x) * cfg.block.y * cfg.block.z;
  const bool ok = cfg.grid.x >= 1 && cfg.grid.y >= 1 && cfg.grid.z >= 1 && cfg.grid.x <= 0x7fffffffu &&
                  cfg.grid.y <= 65535 && cfg.grid.z <= 65535 && nthreads >= 1 && nthreads <= kMaxThreads &&
                  cfg.block.z <= 64 && cfg.smem <= kMaxDynamicSmem;
  if (!ok) {
    m.last_error = cudaErrorInvalidConfiguration;
    return;
  }
  ++m.launches;
  ++m.per_kernel[cfg.kernel];
  m.cfg = &cfg;
  m.nthreads = static_cast<int>(nthreads);
  m.body = body;
  m.body_ctx = ctx;
  // Exactly the launch's bytes (ASan reports an access past them), garbage-filled like fresh shared memory.
  m.smem = cfg.smem > 0 ? static_cast<unsigned char*>(std::malloc(cfg.smem)) : nullptr;
  for (unsigned z = 0; z < cfg.grid.z; ++z)
    for (unsigned y = 0; y < cfg.grid.y; ++y)
      for (unsigned x = 0; x < cfg.grid.x; ++x) {
        m.block = uint3{x, y, z};
        if (m.smem != nullptr) std::memset(m.smem, 0xA5, cfg.smem);
        run_block();
      }
  std::free(m.smem);
  m.smem = nullptr;
  m.cfg = nullptr;
}

}  // namespace host
}  // namespace bivlm

// ---- runtime API ---------------------------------------------------------------------------------------------

cudaError_t cudaGetLastError() {
  const cudaError_t e = bivlm::host::M().last_error;
  bivlm::host::M().last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() { return bivlm::host::M().last_error; }
cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }

const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument";
    case cudaErrorMisalignedAddress:
      return "misaligned address";
    case cudaErrorLaunchFailure:
      return "unspecified launch failure";
  }
  return "unknown error";
}
