// msl_cpu.h: enough of the Metal Shading Language, as C++ for clang, to run this project's .metal kernels on
// the CPU (fachat.kernels.metal.emulate). Only C headers: zig's libc++ would cost minutes on a fresh machine.
// The threads of one threadgroup run as cooperative fibers on one OS thread, so that barriers and simd-group
// collectives really synchronize; SUBSET.md says what a kernel may use.
#pragma once
#include <stdint.h>
#include <stdio.h>
#include <pthread.h>
#include <sys/mman.h>
#if !(defined(__x86_64__) && defined(__ELF__))
#include <ucontext.h>
#endif

// Address spaces mean nothing on the CPU; emulate.py turns in-body `threadgroup` variables into `static thread_local`.
#define device
#define constant
#define thread
#define threadgroup
#define kernel

typedef _Float16 half;
typedef unsigned char uchar;
typedef unsigned short ushort;
typedef unsigned int uint;
typedef unsigned long ulong;

// bfloat: the top 16 bits of a float, rounded to nearest even from float as Metal does; arithmetic goes
// through float (so it is rounded on store, not after every operation).
struct bfloat {
  uint16_t bits;
  bfloat() = default;
  bfloat(float f) {
    uint32_t u = __builtin_bit_cast(uint32_t, f);
    bits = (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)((u >> 16) | 0x40) : (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
  }
  operator float() const { return __builtin_bit_cast(float, (uint32_t)bits << 16); }
};

// ---------------------------------------------------------------- vectors
// Structs rather than ext_vector_type, which cannot take MSL's constructor syntax in C++. Sizes and alignments
// follow MSL (a 3-vector is padded like a 4-vector).
template <class T, int N> struct msl_vec_align { static const int value = sizeof(T) * (N == 3 ? 4 : N); };
template <class T, int N> struct alignas(msl_vec_align<T, N>::value) msl_vec;

// msl_scalar<S>::type exists for the scalars a vector operation broadcasts (for SFINAE).
template <class S> struct msl_scalar { typedef int type; };
template <class T, int N> struct msl_scalar<msl_vec<T, N>> {};

template <class T> struct alignas(msl_vec_align<T, 2>::value) msl_vec<T, 2> {
  T x, y;
  msl_vec() = default;
  msl_vec(T s) : x(s), y(s) {}
  msl_vec(T a, T b) : x(a), y(b) {}
  template <class U> explicit msl_vec(msl_vec<U, 2> v) : x(T(v.x)), y(T(v.y)) {}
  T& operator[](int i) { return (&x)[i]; }
  const T& operator[](int i) const { return (&x)[i]; }
  template <int... I> msl_vec<T, sizeof...(I)> swizzle() const { return msl_vec<T, sizeof...(I)>((*this)[I]...); }
};
template <class T> struct alignas(msl_vec_align<T, 3>::value) msl_vec<T, 3> {
  T x, y, z;
  msl_vec() = default;
  msl_vec(T s) : x(s), y(s), z(s) {}
  msl_vec(T a, T b, T c) : x(a), y(b), z(c) {}
  msl_vec(msl_vec<T, 2> a, T c) : x(a.x), y(a.y), z(c) {}
  msl_vec(T a, msl_vec<T, 2> b) : x(a), y(b.x), z(b.y) {}
  template <class U> explicit msl_vec(msl_vec<U, 3> v) : x(T(v.x)), y(T(v.y)), z(T(v.z)) {}
  T& operator[](int i) { return (&x)[i]; }
  const T& operator[](int i) const { return (&x)[i]; }
  template <int... I> msl_vec<T, sizeof...(I)> swizzle() const { return msl_vec<T, sizeof...(I)>((*this)[I]...); }
};
template <class T> struct alignas(msl_vec_align<T, 4>::value) msl_vec<T, 4> {
  T x, y, z, w;
  msl_vec() = default;
  msl_vec(T s) : x(s), y(s), z(s), w(s) {}
  msl_vec(T a, T b, T c, T d) : x(a), y(b), z(c), w(d) {}
  msl_vec(msl_vec<T, 2> a, msl_vec<T, 2> b) : x(a.x), y(a.y), z(b.x), w(b.y) {}
  msl_vec(msl_vec<T, 2> a, T c, T d) : x(a.x), y(a.y), z(c), w(d) {}
  msl_vec(T a, msl_vec<T, 2> b, T d) : x(a), y(b.x), z(b.y), w(d) {}
  msl_vec(T a, T b, msl_vec<T, 2> c) : x(a), y(b), z(c.x), w(c.y) {}
  msl_vec(msl_vec<T, 3> a, T d) : x(a.x), y(a.y), z(a.z), w(d) {}
  msl_vec(T a, msl_vec<T, 3> b) : x(a), y(b.x), z(b.y), w(b.z) {}
  template <class U> explicit msl_vec(msl_vec<U, 4> v) : x(T(v.x)), y(T(v.y)), z(T(v.z)), w(T(v.w)) {}
  T& operator[](int i) { return (&x)[i]; }
  const T& operator[](int i) const { return (&x)[i]; }
  template <int... I> msl_vec<T, sizeof...(I)> swizzle() const { return msl_vec<T, sizeof...(I)>((*this)[I]...); }
};

#define MSL_VEC_TYPES(T, name) \
  typedef msl_vec<T, 2> name##2;   \
  typedef msl_vec<T, 3> name##3;   \
  typedef msl_vec<T, 4> name##4;
MSL_VEC_TYPES(float, float)
MSL_VEC_TYPES(half, half)
MSL_VEC_TYPES(bfloat, bfloat)
MSL_VEC_TYPES(int, int)
MSL_VEC_TYPES(uint, uint)
MSL_VEC_TYPES(short, short)
MSL_VEC_TYPES(ushort, ushort)
MSL_VEC_TYPES(char, char)
MSL_VEC_TYPES(uchar, uchar)
MSL_VEC_TYPES(long, long)
MSL_VEC_TYPES(ulong, ulong)
MSL_VEC_TYPES(bool, bool)

// Element-wise operators: vector with vector, and vector with a scalar on either side (broadcast).
#define MSL_VEC_BROADCAST(op)                                                                                \
  template <class T, int N, class S, typename msl_scalar<S>::type = 0>                                       \
  auto operator op(msl_vec<T, N> a, S s) { return a op msl_vec<T, N>(T(s)); }                                \
  template <class T, int N, class S, typename msl_scalar<S>::type = 0>                                       \
  auto operator op(S s, msl_vec<T, N> b) { return msl_vec<T, N>(T(s)) op b; }
#define MSL_VEC_BINOP(op)                                                                                    \
  template <class T, int N> msl_vec<T, N> operator op(msl_vec<T, N> a, msl_vec<T, N> b) {                   \
    for (int i = 0; i < N; i++) a[i] = a[i] op b[i];                                                         \
    return a;                                                                                                \
  }                                                                                                          \
  MSL_VEC_BROADCAST(op)                                                                                      \
  template <class T, int N, class S> msl_vec<T, N>& operator op##=(msl_vec<T, N>& a, S b) { return a = a op b; }
MSL_VEC_BINOP(+)
MSL_VEC_BINOP(-)
MSL_VEC_BINOP(*)
MSL_VEC_BINOP(/)
MSL_VEC_BINOP(%)
MSL_VEC_BINOP(&)
MSL_VEC_BINOP(|)
MSL_VEC_BINOP(^)

#define MSL_VEC_CMP(op)                                                                     \
  template <class T, int N> msl_vec<bool, N> operator op(msl_vec<T, N> a, msl_vec<T, N> b) { \
    msl_vec<bool, N> r;                                                                       \
    for (int i = 0; i < N; i++) r[i] = a[i] op b[i];                                          \
    return r;                                                                                 \
  }                                                                                           \
  MSL_VEC_BROADCAST(op)
MSL_VEC_CMP(==)
MSL_VEC_CMP(!=)
MSL_VEC_CMP(<)
MSL_VEC_CMP(<=)
MSL_VEC_CMP(>)
MSL_VEC_CMP(>=)

template <class T, int N> msl_vec<T, N> operator-(msl_vec<T, N> a) {
  for (int i = 0; i < N; i++) a[i] = -a[i];
  return a;
}

// ---------------------------------------------------------------- the fiber runtime
struct msl_ids {  // what the generated entry wrapper hands to the kernel's attribute parameters
  uint32_t thread_position_in_grid[3], threadgroup_position_in_grid[3], thread_position_in_threadgroup[3],
      threads_per_threadgroup[3], dispatch_threads_per_threadgroup[3], threadgroups_per_grid[3], threads_per_grid[3],
      thread_index_in_threadgroup[3], thread_index_in_simdgroup[3], simdgroup_index_in_threadgroup[3],
      simdgroups_per_threadgroup[3], threads_per_simdgroup[3];
};
typedef void (*msl_entry)(void** args, const msl_ids* ids);

template <class T> struct msl_id_as_t {
  static T get(const uint32_t* v) { return T(v[0]); }
};
template <class T, int N> struct msl_id_as_t<msl_vec<T, N>> {
  static msl_vec<T, N> get(const uint32_t* v) {
    msl_vec<T, N> r;
    for (int i = 0; i < N; i++) r[i] = T(v[i]);
    return r;
  }
};
template <class T> T msl_id_as(const uint32_t* v) { return msl_id_as_t<T>::get(v); }
template <class T> struct msl_id_as_t<const T> : msl_id_as_t<T> {};

// The type of parameter I of a kernel, and how a bound argument (a pointer to its bytes) becomes that parameter.
template <int I, class A0, class... A> struct msl_nth { typedef typename msl_nth<I - 1, A...>::type type; };
template <class A0, class... A> struct msl_nth<0, A0, A...> { typedef A0 type; };
template <int I, class F> struct msl_param_t;
template <int I, class... A> struct msl_param_t<I, void (*)(A...)> { typedef typename msl_nth<I, A...>::type type; };
template <int I, class F> using msl_param = typename msl_param_t<I, F>::type;
template <class P> struct msl_bind_t {
  static P get(void* p) { return *(P*)p; }
};
template <class P> struct msl_bind_t<P*> {
  static P* get(void* p) { return (P*)p; }
};
template <class P> struct msl_bind_t<P&> {
  static P& get(void* p) { return *(P*)p; }
};
template <class P> P msl_bind(void* p) { return msl_bind_t<P>::get(p); }

enum { MSL_RUNNABLE, MSL_AT_BARRIER, MSL_AT_SIMD, MSL_DONE };
enum { MSL_SIMD = 32, MSL_MAX_GROUP = 1024, MSL_SLOT = 32, MSL_STACK = 256 * 1024 };

struct msl_fiber {
#if defined(__x86_64__) && defined(__ELF__)
  void* sp;
#else
  ucontext_t uc;
#endif
  int state, line, parity;
  uint32_t lane, simd;
  msl_ids ids;
};

struct msl_group {
  msl_fiber* fibers;
  char* stacks;
  int n;
  msl_entry entry;
  void** args;
#if defined(__x86_64__) && defined(__ELF__)
  void* sched_sp;
#else
  ucontext_t sched_uc;
#endif
  // Simd collectives: each lane posts here, then reads all lanes' posts once every live lane arrived. Two sets,
  // by the parity of a lane's collective count: a lane can post its next value before a slower one has read.
  unsigned char slot[2][MSL_MAX_GROUP / MSL_SIMD][MSL_SIMD][MSL_SLOT];
  uint32_t mask[2][MSL_MAX_GROUP / MSL_SIMD];
  // Simdgroup matrix operations, by the same parity: set at the release, cleared by the first lane that runs
  // after it (the leader); the leader leaves the result here for every lane.
  bool lead[2][MSL_MAX_GROUP / MSL_SIMD];
  alignas(16) unsigned char matrix[2][MSL_MAX_GROUP / MSL_SIMD][64 * sizeof(float)];
  char* err;
  int errlen, failed;
};

static __thread msl_group* msl_cur_group;
static __thread msl_fiber* msl_cur_fiber;

#if defined(__x86_64__) && defined(__ELF__)
// A context switch without glibc's swapcontext, which makes a sigprocmask syscall on every switch: save the
// callee-saved registers on the old stack, store its pointer, load the new one and pop.
extern "C" __attribute__((visibility("hidden"))) void msl_switch(void** save_sp, void* to_sp);
__asm__(
    ".text\n.globl msl_switch\n.hidden msl_switch\n.type msl_switch,@function\nmsl_switch:\n"
    "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
    "  movq %rsp, (%rdi)\n  movq %rsi, %rsp\n"
    "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n  ret\n"
    ".size msl_switch, .-msl_switch\n");
static void msl_to_fiber(msl_group* g, msl_fiber* f) { msl_switch(&g->sched_sp, f->sp); }
static void msl_to_scheduler(msl_group* g, msl_fiber* f) { msl_switch(&f->sp, g->sched_sp); }
#else
static void msl_to_fiber(msl_group* g, msl_fiber* f) { swapcontext(&g->sched_uc, &f->uc); }
static void msl_to_scheduler(msl_group* g, msl_fiber* f) { swapcontext(&f->uc, &g->sched_uc); }
#endif

static void msl_fiber_main() {
  msl_group* g = msl_cur_group;
  msl_fiber* f = msl_cur_fiber;
  g->entry(g->args, &f->ids);
  f->state = MSL_DONE;
  msl_to_scheduler(g, f);
  __builtin_unreachable();
}

static void msl_fiber_init(msl_fiber* f, char* stack) {
#if defined(__x86_64__) && defined(__ELF__)
  void** sp = (void**)(stack + MSL_STACK);
  *--sp = 0;                       // msl_fiber_main's return slot: it starts with rsp = 8 mod 16, as after a call
  *--sp = (void*)&msl_fiber_main;  // where msl_switch's ret goes
  for (int i = 0; i < 6; i++) *--sp = 0;
  f->sp = sp;
#else
  getcontext(&f->uc);
  f->uc.uc_stack.ss_sp = stack;
  f->uc.uc_stack.ss_size = MSL_STACK;
  f->uc.uc_link = 0;
  makecontext(&f->uc, msl_fiber_main, 0);
#endif
}

// Called on a fiber: record the error for Python and leave this threadgroup for good.
__attribute__((noreturn)) static void msl_fail(const char* msg) {
  msl_group* g = msl_cur_group;
  snprintf(g->err, g->errlen, "%s", msg);
  g->failed = 1;
  msl_to_scheduler(g, msl_cur_fiber);
  __builtin_unreachable();
}

static void msl_wait(int state, int line) {
  msl_fiber* f = msl_cur_fiber;
  f->state = state;
  f->line = line;
  msl_to_scheduler(msl_cur_group, f);
}

// Says where the threads stopped (how many in each place, and the first few of them), for a deadlock report.
static void msl_report_stuck(msl_group* g) {
  static const char* what[] = {"runnable", "at threadgroup_barrier", "at a simd-group collective", "returned"};
  enum { KINDS = 8, EXAMPLES = 4 };
  int state[KINDS], line[KINDS], count[KINDS] = {0}, example[KINDS][EXAMPLES], kinds = 0;
  for (int i = 0; i < g->n; i++) {
    msl_fiber* f = &g->fibers[i];
    int k = 0, at = f->state == MSL_DONE ? -1 : f->line;
    while (k < kinds && (state[k] != f->state || line[k] != at)) k++;
    if (k == KINDS) continue;
    if (k == kinds) state[k] = f->state, line[k] = at, kinds++;
    if (count[k] < EXAMPLES) example[k][count[k]] = i;
    count[k]++;
  }
  const uint32_t* tg = g->fibers[0].ids.threadgroup_position_in_grid;
  int len = snprintf(g->err, g->errlen, "threadgroup (%u,%u,%u) cannot go on: its threads do not all reach the same "
                     "barrier or simd-group collective (divergent control flow, or some returned early):", tg[0], tg[1], tg[2]);
  for (int k = 0; k < kinds && len < g->errlen; k++) {
    len += snprintf(g->err + len, g->errlen - len, "%s %d thread(s) %s", k ? ";" : "", count[k], what[state[k]]);
    if (line[k] >= 0 && len < g->errlen) len += snprintf(g->err + len, g->errlen - len, " (line %d)", line[k]);
    for (int e = 0; e < count[k] && e < EXAMPLES && len < g->errlen; e++)
      len += snprintf(g->err + len, g->errlen - len, "%s%d", e ? ", " : ", e.g. thread ", example[k][e]);
  }
  g->failed = 1;
}

// Lets simd-group s's waiting lanes go on when all its live lanes wait at the same collective.
static bool msl_release_simdgroup(msl_group* g, int s) {
  int lo = s * MSL_SIMD, hi = lo + MSL_SIMD < g->n ? lo + MSL_SIMD : g->n, line = -1, parity = 0;
  uint32_t mask = 0;
  for (int i = lo; i < hi; i++) {
    msl_fiber* f = &g->fibers[i];
    if (f->state == MSL_DONE) continue;
    if (line < 0) line = f->line, parity = f->parity;
    if (f->state != MSL_AT_SIMD || f->line != line || f->parity != parity) return false;
    mask |= 1u << (i - lo);
  }
  if (mask == 0) return false;
  g->mask[parity][s] = mask;
  g->lead[parity][s] = true;
  for (int i = lo; i < hi; i++)
    if (g->fibers[i].state == MSL_AT_SIMD) g->fibers[i].state = MSL_RUNNABLE;
  return true;
}

// Lets the threadgroup through a barrier that all its threads reached; any that returned make it a deadlock.
static bool msl_release_barrier(msl_group* g) {
  for (int i = 0; i < g->n; i++)
    if (g->fibers[i].state != MSL_AT_BARRIER || g->fibers[i].line != g->fibers[0].line) return false;
  for (int i = 0; i < g->n; i++) g->fibers[i].state = MSL_RUNNABLE;
  return true;
}

// Runs simd-group s until none of its lanes can go on (each at a threadgroup barrier, returned, or stuck);
// false on a kernel error.
static bool msl_run_simdgroup(msl_group* g, int s) {
  int lo = s * MSL_SIMD, hi = lo + MSL_SIMD < g->n ? lo + MSL_SIMD : g->n;
  do {
    for (int i = lo; i < hi; i++) {
      msl_fiber* f = &g->fibers[i];
      if (f->state != MSL_RUNNABLE) continue;
      msl_cur_fiber = f;
      msl_to_fiber(g, f);
      if (g->failed) return false;
    }
  } while (msl_release_simdgroup(g, s));
  return true;
}

// Runs threadgroup `index` of its dispatch to the end; false (with g->err set) on a kernel error, deadlock or
// divergence. Between two threadgroup barriers the simd-groups run one after another, each up to the next
// barrier, first to last or last to first by turns (starting the other way in every other threadgroup). So
// threadgroup memory that one simd-group writes and another reads with no barrier between shows the stale
// value in one of the orders, where simd-groups in step (or a GPU, often) would hide the missing barrier.
static bool msl_run_group(msl_group* g, uint64_t index) {
  for (int i = 0; i < g->n; i++) msl_fiber_init(&g->fibers[i], g->stacks + (size_t)i * MSL_STACK);
  msl_cur_group = g;
  int nsimd = (g->n + MSL_SIMD - 1) / MSL_SIMD;
  for (uint64_t turn = index;; turn++) {
    for (int k = 0; k < nsimd; k++)
      if (!msl_run_simdgroup(g, turn & 1 ? nsimd - 1 - k : k)) return false;
    int done = 0;
    for (int i = 0; i < g->n; i++) done += g->fibers[i].state == MSL_DONE;
    if (done == g->n) return true;
    if (!msl_release_barrier(g)) {
      msl_report_stuck(g);
      return false;
    }
  }
}

// A threadgroup's fibers and their stacks, kept per OS thread for its later calls: mapping, guarding and
// faulting in fresh stacks costs more than a small kernel's run. Unmapped when the thread exits.
static __thread msl_group* msl_pool;
static __thread size_t msl_pool_bytes;
static pthread_key_t msl_pool_key;
static pthread_once_t msl_pool_key_once = PTHREAD_ONCE_INIT;
static void msl_unmap_pool(void* pool) { munmap(pool, msl_pool_bytes); }
static void msl_make_pool_key() { pthread_key_create(&msl_pool_key, msl_unmap_pool); }

// Layout: the msl_group, its fibers, then (page aligned) one stack per thread.
static msl_group* msl_group_for(uint32_t threads) {
  size_t head = (sizeof(msl_group) + threads * sizeof(msl_fiber) + 4095) / 4096 * 4096;
  size_t bytes = head + (size_t)threads * MSL_STACK;
  if (bytes <= msl_pool_bytes) return msl_pool;
  if (msl_pool) munmap(msl_pool, msl_pool_bytes);
  msl_pool_bytes = 0;
  void* pool = mmap(0, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (pool == MAP_FAILED) return msl_pool = 0;
  msl_pool = (msl_group*)pool;
  msl_pool_bytes = bytes;
  msl_pool->fibers = (msl_fiber*)(msl_pool + 1);
  msl_pool->stacks = (char*)pool + head;
  for (uint32_t i = 0; i < threads; i++)  // a stack overflow faults instead of writing over the next one
    mprotect(msl_pool->stacks + (size_t)i * MSL_STACK, 4096, PROT_NONE);
  pthread_once(&msl_pool_key_once, msl_make_pool_key);
  pthread_setspecific(msl_pool_key, pool);
  return msl_pool;
}

// Runs threadgroups [first, last) of a dispatch (groups numbered x fastest). The last group along an axis is
// partial when the grid is not a multiple of the group size, as with Metal's dispatchThreads. Returns 0, or 1
// with a message in err. Python calls this from several OS threads, each on its own share of the groups.
extern "C" int msl_run(msl_entry entry, void** args, const uint32_t* grid, const uint32_t* group, uint64_t first,
                       uint64_t last, char* err, int errlen) {
  uint32_t ngroups[3], group_threads = group[0] * group[1] * group[2];
  for (int d = 0; d < 3; d++) ngroups[d] = (grid[d] + group[d] - 1) / group[d];
  msl_group* g = msl_group_for(group_threads);
  if (!g) {
    snprintf(err, errlen, "cannot map fiber stacks for %u threads", group_threads);
    return 1;
  }
  g->entry = entry;
  g->args = args;
  g->err = err;
  g->errlen = errlen;
  int failed = 0;
  for (uint64_t gi = first; gi < last && !failed; gi++) {
    uint32_t tg[3] = {(uint32_t)(gi % ngroups[0]), (uint32_t)(gi / ngroups[0] % ngroups[1]),
                      (uint32_t)(gi / ngroups[0] / ngroups[1])};
    uint32_t size[3];  // this group's extent: smaller than `group` at the grid's far edges
    for (int d = 0; d < 3; d++) size[d] = grid[d] - tg[d] * group[d] < group[d] ? grid[d] - tg[d] * group[d] : group[d];
    g->n = size[0] * size[1] * size[2];
    g->failed = 0;
    uint32_t nsimd = (g->n + MSL_SIMD - 1) / MSL_SIMD;
    for (int i = 0; i < g->n; i++) {
      msl_fiber* f = &g->fibers[i];
      msl_ids* t = &f->ids;
      uint32_t local[3] = {i % size[0], i / size[0] % size[1], i / size[0] / size[1]};
      for (int d = 0; d < 3; d++) {
        t->thread_position_in_threadgroup[d] = local[d];
        t->threadgroup_position_in_grid[d] = tg[d];
        t->thread_position_in_grid[d] = tg[d] * group[d] + local[d];
        t->threads_per_threadgroup[d] = size[d];
        t->dispatch_threads_per_threadgroup[d] = group[d];
        t->threadgroups_per_grid[d] = ngroups[d];
        t->threads_per_grid[d] = grid[d];
        t->thread_index_in_threadgroup[d] = t->thread_index_in_simdgroup[d] = t->simdgroup_index_in_threadgroup[d] =
            t->simdgroups_per_threadgroup[d] = t->threads_per_simdgroup[d] = 0;
      }
      t->thread_index_in_threadgroup[0] = i;
      t->thread_index_in_simdgroup[0] = f->lane = i % MSL_SIMD;
      t->simdgroup_index_in_threadgroup[0] = f->simd = i / MSL_SIMD;
      t->simdgroups_per_threadgroup[0] = nsimd;
      t->threads_per_simdgroup[0] = MSL_SIMD;
      f->state = MSL_RUNNABLE;
      f->parity = 0;
    }
    failed = !msl_run_group(g, gi);
  }
  return failed;
}

// ---------------------------------------------------------------- the metal namespace
namespace metal {

enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4, mem_threadgroup_imageblock = 8 };
inline mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(int(a) | int(b)); }

// ---- math. Scalar float uses clang builtins (no <math.h>, whose global exp(double) etc. would make calls on
// int ambiguous); half and bfloat compute in float and round back, vectors go element-wise.
#define MSL_UNARY(name, builtin)                                                \
  inline float name(float x) { return builtin(x); }                            \
  inline half name(half x) { return half(builtin(float(x))); }                 \
  inline bfloat name(bfloat x) { return bfloat(builtin(float(x))); }           \
  template <class T, int N> msl_vec<T, N> name(msl_vec<T, N> v) {              \
    for (int i = 0; i < N; i++) v[i] = name(v[i]);                             \
    return v;                                                                  \
  }
#define MSL_BINARY(name, builtin)                                                         \
  inline float name(float x, float y) { return builtin(x, y); }                          \
  inline half name(half x, half y) { return half(builtin(float(x), float(y))); }         \
  inline bfloat name(bfloat x, bfloat y) { return bfloat(builtin(float(x), float(y))); } \
  template <class T, int N> msl_vec<T, N> name(msl_vec<T, N> a, msl_vec<T, N> b) {       \
    for (int i = 0; i < N; i++) a[i] = name(a[i], b[i]);                                 \
    return a;                                                                            \
  }
inline float msl_rsqrt(float x) { return 1.0f / __builtin_sqrtf(x); }
MSL_UNARY(exp, __builtin_expf)
MSL_UNARY(exp2, __builtin_exp2f)
MSL_UNARY(exp10, __builtin_exp10f)
MSL_UNARY(log, __builtin_logf)
MSL_UNARY(log2, __builtin_log2f)
MSL_UNARY(log10, __builtin_log10f)
MSL_UNARY(sqrt, __builtin_sqrtf)
MSL_UNARY(rsqrt, msl_rsqrt)
MSL_UNARY(fabs, __builtin_fabsf)
MSL_UNARY(tanh, __builtin_tanhf)
MSL_UNARY(sin, __builtin_sinf)
MSL_UNARY(cos, __builtin_cosf)
MSL_UNARY(floor, __builtin_floorf)
MSL_UNARY(ceil, __builtin_ceilf)
MSL_UNARY(round, __builtin_roundf)
MSL_UNARY(trunc, __builtin_truncf)
MSL_BINARY(fmax, __builtin_fmaxf)
MSL_BINARY(fmin, __builtin_fminf)
MSL_BINARY(pow, __builtin_powf)
MSL_BINARY(powr, __builtin_powf)
MSL_BINARY(fmod, __builtin_fmodf)
// max/min on floating point follow fmax/fmin (a NaN operand yields the other), as Metal's do.
MSL_BINARY(max, __builtin_fmaxf)
MSL_BINARY(min, __builtin_fminf)
template <class T> T max(T a, T b) { return a > b ? a : b; }
template <class T> T min(T a, T b) { return a < b ? a : b; }
template <class T> T abs(T x) { return x < T(0) ? T(-x) : x; }
template <class T, int N> msl_vec<T, N> abs(msl_vec<T, N> v) {
  for (int i = 0; i < N; i++) v[i] = abs(v[i]);
  return v;
}
template <class T> T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }
template <class T> T saturate(T x) { return clamp(x, T(0), T(1)); }
template <class T> T fma(T a, T b, T c) { return a * b + c; }
template <class T> T mix(T a, T b, T t) { return a + (b - a) * t; }
template <class T> T select(T a, T b, bool c) { return c ? b : a; }
template <class T, int N> msl_vec<T, N> select(msl_vec<T, N> a, msl_vec<T, N> b, msl_vec<bool, N> c) {
  for (int i = 0; i < N; i++) a[i] = c[i] ? b[i] : a[i];
  return a;
}
template <class T, int N> T dot(msl_vec<T, N> a, msl_vec<T, N> b) {
  T r = a[0] * b[0];
  for (int i = 1; i < N; i++) r += a[i] * b[i];
  return r;
}
template <int N> bool all(msl_vec<bool, N> v) {
  for (int i = 0; i < N; i++) if (!v[i]) return false;
  return true;
}
template <int N> bool any(msl_vec<bool, N> v) {
  for (int i = 0; i < N; i++) if (v[i]) return true;
  return false;
}
template <class T> bool isnan(T x) { return __builtin_isnan(float(x)); }
template <class T> bool isinf(T x) { return __builtin_isinf(float(x)); }
template <class T> bool isfinite(T x) { return __builtin_isfinite(float(x)); }
template <class T> bool signbit(T x) { return __builtin_signbit(float(x)); }
template <class T, class U> T as_type(U x) {
  static_assert(sizeof(T) == sizeof(U), "as_type between types of different sizes");
  return __builtin_bit_cast(T, x);
}

// fast:: and precise:: differ on the GPU only in accuracy; the CPU gives the accurate result for both.
namespace fast {
using metal::exp; using metal::exp2; using metal::log; using metal::log2; using metal::sqrt; using metal::rsqrt;
using metal::tanh; using metal::max; using metal::min; using metal::fmax; using metal::fmin; using metal::pow;
using metal::powr; using metal::sin; using metal::cos; using metal::clamp; using metal::abs; using metal::fabs;
using metal::exp10; using metal::log10;
}  // namespace fast
namespace precise = fast;

// Fibers share one address space and run one at a time, so the memory side of a barrier is free.
inline void threadgroup_barrier(mem_flags, int line = __builtin_LINE()) { msl_wait(MSL_AT_BARRIER, line); }

// Posts `value` for this lane's next simd-group collective and waits for every live lane of the simd-group.
// Returns the posts, by lane, and sets `parity` to the set they are in (they stay until the lanes' next collective
// but one: see msl_group::slot).
template <class T> unsigned char (*msl_post(const T& value, int line, int& parity))[MSL_SLOT] {
  static_assert(sizeof(T) <= MSL_SLOT, "simd-group collective on a type wider than 32 bytes");
  msl_fiber* f = msl_cur_fiber;
  parity = f->parity;
  unsigned char(*slots)[MSL_SLOT] = msl_cur_group->slot[parity][f->simd];
  __builtin_memcpy(slots[f->lane], &value, sizeof(T));
  msl_wait(MSL_AT_SIMD, line);
  f->parity ^= 1;
  return slots;
}

// A simd-group collective: post `value`, wait, then read all the posts (as T, lane order) into `lanes`; returns
// the mask of lanes that took part.
template <class T> uint32_t msl_exchange(const T& value, T* lanes, int line) {
  int parity;
  unsigned char(*slots)[MSL_SLOT] = msl_post(value, line, parity);
  uint32_t mask = msl_cur_group->mask[parity][msl_cur_fiber->simd];
  for (int l = 0; l < MSL_SIMD; l++)
    if (mask >> l & 1) __builtin_memcpy(&lanes[l], slots[l], sizeof(T));
  return mask;
}

inline void simdgroup_barrier(mem_flags, int line = __builtin_LINE()) {
  char lanes[MSL_SIMD];
  msl_exchange(char(0), lanes, line);
}

inline uint msl_lane() { return msl_cur_fiber->lane; }

// Reductions combine the live lanes in lane order, so results are deterministic.
#define MSL_SIMD_REDUCE(name, combine)                                  \
  template <class T> T name(T x, int line = __builtin_LINE()) {         \
    T lanes[MSL_SIMD];                                                  \
    uint32_t mask = msl_exchange(x, lanes, line);                       \
    int first = __builtin_ctz(mask);                                    \
    T r = lanes[first];                                                 \
    for (int l = first + 1; l < MSL_SIMD; l++)                          \
      if (mask >> l & 1) r = combine;                                   \
    return r;                                                           \
  }
MSL_SIMD_REDUCE(simd_sum, r + lanes[l])
MSL_SIMD_REDUCE(simd_product, r * lanes[l])
MSL_SIMD_REDUCE(simd_max, max(r, lanes[l]))
MSL_SIMD_REDUCE(simd_min, min(r, lanes[l]))
MSL_SIMD_REDUCE(simd_and, r & lanes[l])
MSL_SIMD_REDUCE(simd_or, r | lanes[l])
MSL_SIMD_REDUCE(simd_xor, r ^ lanes[l])

template <class T> T msl_prefix_sum(T x, bool inclusive, int line) {
  T lanes[MSL_SIMD];
  uint32_t mask = msl_exchange(x, lanes, line);
  T r = T(0);
  for (uint l = 0; l < msl_lane(); l++)
    if (mask >> l & 1) r = r + lanes[l];
  return inclusive ? r + x : r;
}
template <class T> T simd_prefix_exclusive_sum(T x, int line = __builtin_LINE()) { return msl_prefix_sum(x, false, line); }
template <class T> T simd_prefix_inclusive_sum(T x, int line = __builtin_LINE()) { return msl_prefix_sum(x, true, line); }

// The value of lane `src`; `fallback` when that lane is outside the simd-group or not live (undefined in Metal).
template <class T> T msl_from_lane(T x, int src, T fallback, int line) {
  T lanes[MSL_SIMD];
  uint32_t mask = msl_exchange(x, lanes, line);
  return src >= 0 && src < MSL_SIMD && (mask >> src & 1) ? lanes[src] : fallback;
}
template <class T> T simd_shuffle(T x, ushort lane, int line = __builtin_LINE()) { return msl_from_lane(x, lane, T(0), line); }
template <class T> T simd_broadcast(T x, ushort lane, int line = __builtin_LINE()) { return msl_from_lane(x, lane, T(0), line); }
template <class T> T simd_shuffle_xor(T x, ushort mask, int line = __builtin_LINE()) {
  return msl_from_lane(x, int(msl_lane() ^ mask), T(0), line);
}
// Metal: the upper (down) or lower (up) `delta` lanes keep their own value; the rotate forms wrap around.
template <class T> T simd_shuffle_down(T x, ushort delta, int line = __builtin_LINE()) {
  return msl_from_lane(x, int(msl_lane() + delta), x, line);
}
template <class T> T simd_shuffle_up(T x, ushort delta, int line = __builtin_LINE()) {
  return msl_from_lane(x, int(msl_lane()) - int(delta), x, line);
}
template <class T> T simd_shuffle_rotate_down(T x, ushort delta, int line = __builtin_LINE()) {
  return msl_from_lane(x, int((msl_lane() + delta) % MSL_SIMD), T(0), line);
}
template <class T> T simd_shuffle_rotate_up(T x, ushort delta, int line = __builtin_LINE()) {
  return msl_from_lane(x, int((msl_lane() + MSL_SIMD - delta % MSL_SIMD) % MSL_SIMD), T(0), line);
}
template <class T> T simd_broadcast_first(T x, int line = __builtin_LINE()) {
  T lanes[MSL_SIMD];
  return lanes[__builtin_ctz(msl_exchange(x, lanes, line))];
}
inline bool simd_all(bool x, int line = __builtin_LINE()) { return simd_min(int(x), line) != 0; }
inline bool simd_any(bool x, int line = __builtin_LINE()) { return simd_max(int(x), line) != 0; }
inline bool simd_is_first(int line = __builtin_LINE()) {
  uint lanes[MSL_SIMD];
  return __builtin_ctz(msl_exchange(uint(0), lanes, line)) == int(msl_lane());
}

}  // namespace metal

// ---- simdgroup_matrix<T, Cols, Rows>, 8x8 only. Every lane holds the whole matrix. On the GPU a lane holds just
// its 2 elements (thread_elements()), and a lane may change only those; so an operation rebuilds each operand from
// its owners' copies, and every lane gets the whole result. Products accumulate in float.
template <class T, int C, int R> struct alignas(2 * sizeof(T)) simdgroup_matrix {
  static_assert(C == 8 && R == 8, "the emulation has 8x8 simdgroup matrices only");
  static_assert(sizeof(T) <= sizeof(float), "simdgroup matrices of half, bfloat or float only");
  T e[8][8];  // [row][column]
  simdgroup_matrix() = default;
  explicit simdgroup_matrix(T diagonal) {
    for (int r = 0; r < 8; r++)
      for (int c = 0; c < 8; c++) e[r][c] = r == c ? diagonal : T(0);
  }
  msl_vec<T, 2>& thread_elements();
};
typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
typedef simdgroup_matrix<half, 8, 8> simdgroup_half8x8;
typedef simdgroup_matrix<bfloat, 8, 8> simdgroup_bfloat8x8;

// The two elements (row, col) and (row, col + 1) that a lane owns on Apple GPUs (the layout MLX relies on).
inline void msl_owned(uint lane, int& row, int& col) {
  row = (lane / 4 & 4) + lane / 2 % 4;
  col = (lane / 4 & 2) * 2 + lane % 2 * 2;
}
template <class T, int C, int R> msl_vec<T, 2>& simdgroup_matrix<T, C, R>::thread_elements() {
  int row, col;
  msl_owned(metal::msl_lane(), row, col);
  return *(msl_vec<T, 2>*)&e[row][col];
}

struct msl_matrix_post { const void* p[3]; };  // what a lane shows the others in a matrix operation

// A simdgroup_matrix operation of all 32 lanes, with value semantics as on the GPU: a lane may overwrite an
// operand, or the memory that was loaded, as soon as the operation returns. Once all lanes arrived, the first
// to run after the release (the leader) does `op` for the simd-group while the others have not gone on, so
// memory and every lane's matrices still hold their values at the operation; the others never look at them.
// op(posts, scratch) reads the lanes' posts and may leave a matrix in the simd-group's scratch, which is returned
// to every lane. Post `uniform`, unless -1, must be the same on every lane.
template <class Op> const void* msl_matrix_op(const char* name, msl_matrix_post mine, int uniform, int line, Op op) {
  msl_group* g = msl_cur_group;
  int parity, s = msl_cur_fiber->simd;
  unsigned char(*slots)[MSL_SLOT] = metal::msl_post(mine, line, parity);
  if (g->lead[parity][s]) {
    g->lead[parity][s] = false;
    if (g->mask[parity][s] != 0xffffffffu) msl_fail("a simdgroup_matrix operation needs all 32 lanes of its simd-group");
    msl_matrix_post lanes[MSL_SIMD];
    for (int l = 0; l < MSL_SIMD; l++) {
      __builtin_memcpy(&lanes[l], slots[l], sizeof mine);
      if (uniform >= 0 && lanes[l].p[uniform] != lanes[0].p[uniform]) {
        char msg[160];
        snprintf(msg, sizeof msg, "%s (line %d): the lanes of a simd-group passed different pointers", name, line);
        msl_fail(msg);
      }
    }
    op(lanes, g->matrix[parity][s]);
  }
  return g->matrix[parity][s];
}
// Operand k of the posts, each element taken from the copy of the lane that owns it.
template <class M> M msl_matrix_from_owners(const msl_matrix_post* lanes, int k) {
  M m;
  for (uint l = 0; l < MSL_SIMD; l++) {
    int row, col;
    msl_owned(l, row, col);
    const M* src = (const M*)lanes[l].p[k];
    m.e[row][col] = src->e[row][col];
    m.e[row][col + 1] = src->e[row][col + 1];
  }
  return m;
}

namespace metal {
template <class T, int C, int R> simdgroup_matrix<T, C, R> make_filled_simdgroup_matrix(T value) {
  simdgroup_matrix<T, C, R> m;
  for (int r = 0; r < 8; r++)
    for (int c = 0; c < 8; c++) m.e[r][c] = value;
  return m;
}
// matrix_origin is (column, row) of the block's corner in the source; with transpose the block read there is
// transposed on the way in (and likewise on the way out in simdgroup_store).
template <class T, int C, int R, class U>
void simdgroup_load(simdgroup_matrix<T, C, R>& d, const U* src, ulong elements_per_row = C, ulong2 matrix_origin = ulong2(0),
                    bool transpose_matrix = false, int line = __builtin_LINE()) {
  typedef simdgroup_matrix<T, C, R> M;
  d = *(const M*)msl_matrix_op("simdgroup_load", {{src}}, 0, line, [&](const msl_matrix_post*, void* scratch) {
    M& m = *(M*)scratch;
    const U* corner = src + matrix_origin.y * elements_per_row + matrix_origin.x;
    for (int r = 0; r < 8; r++)
      for (int c = 0; c < 8; c++)
        m.e[r][c] = T(float(transpose_matrix ? corner[c * elements_per_row + r] : corner[r * elements_per_row + c]));
  });
}
template <class T, int C, int R, class U>
void simdgroup_store(const simdgroup_matrix<T, C, R>& a, U* dst, ulong elements_per_row = C, ulong2 matrix_origin = ulong2(0),
                     bool transpose_matrix = false, int line = __builtin_LINE()) {
  msl_matrix_op("simdgroup_store", {{&a, dst}}, 1, line, [&](const msl_matrix_post* lanes, void*) {
    simdgroup_matrix<T, C, R> m = msl_matrix_from_owners<simdgroup_matrix<T, C, R>>(lanes, 0);
    U* corner = dst + matrix_origin.y * elements_per_row + matrix_origin.x;
    for (int r = 0; r < 8; r++)
      for (int c = 0; c < 8; c++)
        (transpose_matrix ? corner[c * elements_per_row + r] : corner[r * elements_per_row + c]) = U(float(m.e[r][c]));
  });
}
// d = a * b + c, summed in float and rounded once to d's element type.
template <class TD, class TA, class TB, class TC>
void simdgroup_multiply_accumulate(simdgroup_matrix<TD, 8, 8>& d, const simdgroup_matrix<TA, 8, 8>& a,
                                   const simdgroup_matrix<TB, 8, 8>& b, const simdgroup_matrix<TC, 8, 8>& c,
                                   int line = __builtin_LINE()) {
  typedef simdgroup_matrix<TD, 8, 8> M;
  d = *(const M*)msl_matrix_op("simdgroup_multiply_accumulate", {{&a, &b, &c}}, -1, line,
                               [](const msl_matrix_post* lanes, void* scratch) {
    simdgroup_matrix<TA, 8, 8> ma = msl_matrix_from_owners<simdgroup_matrix<TA, 8, 8>>(lanes, 0);
    simdgroup_matrix<TB, 8, 8> mb = msl_matrix_from_owners<simdgroup_matrix<TB, 8, 8>>(lanes, 1);
    simdgroup_matrix<TC, 8, 8> mc = msl_matrix_from_owners<simdgroup_matrix<TC, 8, 8>>(lanes, 2);
    M& m = *(M*)scratch;
    for (int r = 0; r < 8; r++)
      for (int col = 0; col < 8; col++) {
        float acc = float(mc.e[r][col]);
        for (int k = 0; k < 8; k++) acc += float(ma.e[r][k]) * float(mb.e[k][col]);
        m.e[r][col] = TD(acc);
      }
  });
}
template <class TD, class TA, class TB>
void simdgroup_multiply(simdgroup_matrix<TD, 8, 8>& d, const simdgroup_matrix<TA, 8, 8>& a, const simdgroup_matrix<TB, 8, 8>& b,
                        int line = __builtin_LINE()) {
  simdgroup_multiply_accumulate(d, a, b, make_filled_simdgroup_matrix<TD, 8, 8>(TD(0)), line);
}
}  // namespace metal
using metal::mem_flags;

#define INFINITY __builtin_inff()
#define NAN __builtin_nanf("")
#define FLT_MAX __FLT_MAX__
#define FLT_MIN __FLT_MIN__
#define HALF_MAX 65504.0f
#define M_PI_F 3.14159265358979323846f
#define M_LOG2E_F 1.44269504088896340736f
#define M_LN2_F 0.69314718055994530942f
