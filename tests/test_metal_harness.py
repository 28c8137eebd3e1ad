"""The CPU emulation of Metal kernels (fachat.kernels.metal.emulate) against independent numpy/torch references.
Every kernel here is in one source (one compile) so the file stays fast; inputs are fresh random each run."""
import threading

import numpy as np
import pytest
import torch

from fachat.kernels.metal import emulate

pytestmark = pytest.mark.skipif(emulate.available() is not None, reason=str(emulate.available()))

SOURCE = r"""
#include <metal_stdlib>
using namespace metal;

// Each thread reads both neighbours' values out of threadgroup memory after a barrier.
kernel void neighbours(device float* out [[buffer(0)]], const device float* x [[buffer(1)]],
                       uint gid [[thread_position_in_grid]], uint tid [[thread_position_in_threadgroup]],
                       uint n [[threads_per_threadgroup]]) {
    threadgroup float shared[1024];
    shared[tid] = x[gid];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[gid] = shared[(tid + 1) % n] - 2.0f * shared[(tid + n - 1) % n];
}

// The same without the barrier: a thread reads its neighbour's slot before the neighbour has written it.
kernel void neighbours_no_barrier(device float* out [[buffer(0)]], const device float* x [[buffer(1)]],
                                  uint gid [[thread_position_in_grid]], uint tid [[thread_position_in_threadgroup]],
                                  uint n [[threads_per_threadgroup]]) {
    threadgroup float shared[1024];
    shared[tid] = x[gid];
    out[gid] = shared[(tid + 1) % n] - 2.0f * shared[(tid + n - 1) % n];
}

kernel void reductions(device float* out [[buffer(0)]], const device float* x [[buffer(1)]],
                       uint gid [[thread_position_in_grid]]) {
    float v = x[gid];
    out[3 * gid] = simd_sum(v);
    out[3 * gid + 1] = simd_max(v);
    out[3 * gid + 2] = simd_min(v);
}

kernel void shuffles(device float* out [[buffer(0)]], const device float* x [[buffer(1)]],
                     constant int* p [[buffer(2)]], uint gid [[thread_position_in_grid]]) {
    float v = x[gid];
    device float* o = out + 7 * gid;
    o[0] = simd_shuffle(v, ushort(p[0]));
    o[1] = simd_shuffle_xor(v, ushort(p[1]));
    o[2] = simd_shuffle_down(v, ushort(p[2]));
    o[3] = simd_shuffle_up(v, ushort(p[3]));
    o[4] = simd_broadcast(v, ushort(p[4]));
    o[5] = simd_prefix_exclusive_sum(v);
    o[6] = simd_broadcast_first(v);
}

kernel void diverge_at_barrier(device float* out [[buffer(0)]], uint tid [[thread_position_in_threadgroup]]) {
    if (tid % 7 == 3) return;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[tid] = 1.0f;
}

kernel void diverge_at_simd(device float* out [[buffer(0)]], uint lane [[thread_index_in_simdgroup]]) {
    if (lane < 16) {
        out[lane] = simd_sum(1.0f);
    } else {
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
}

// C (8 x 8, float) = A (8 x k) * B (k x 8), B given transposed (8 x k) and loaded with transpose; then every lane
// doubles the two elements it owns, which must reach the store.
template <typename T>
kernel void matmul(device float* c [[buffer(0)]], const device T* a [[buffer(1)]], const device T* bt [[buffer(2)]],
                   constant long& k [[buffer(3)]], ushort lane [[thread_index_in_simdgroup]]) {
    simdgroup_float8x8 acc = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    simdgroup_matrix<T, 8, 8> ma, mb;
    for (long i = 0; i < k; i += 8) {
        simdgroup_load(ma, a, k, ulong2(i, 0));
        simdgroup_load(mb, bt + i, k, ulong2(0, 0), true);
        simdgroup_multiply_accumulate(acc, ma, mb, acc);
    }
    acc.thread_elements() *= 2.0f;
    simdgroup_store(acc, c, 8);
}
template [[host_name("matmul_float")]] kernel void matmul<float>(device float*, const device float*,
    const device float*, constant long&, ushort);
template [[host_name("matmul_half")]] kernel void matmul<half>(device float*, const device half*,
    const device half*, constant long&, ushort);
template [[host_name("matmul_bfloat")]] kernel void matmul<bfloat>(device float*, const device bfloat*,
    const device bfloat*, constant long&, ushort);

// Matrices written again right after an operation that read them: each operation takes its operands' values as
// they are at the operation, as on the GPU.
kernel void matrix_values(device float* out [[buffer(0)]], const device float* d [[buffer(1)]]) {
    simdgroup_float8x8 a = make_filled_simdgroup_matrix<float, 8, 8>(1.0f);
    simdgroup_store(a, out, 8);
    a = make_filled_simdgroup_matrix<float, 8, 8>(2.0f);
    simdgroup_store(a, out + 64, 8);
    simdgroup_float8x8 dm, om = simdgroup_float8x8(1.0f), t;
    simdgroup_load(dm, d, 8);
    for (int i = 0; i < 3; i++) {
        simdgroup_multiply(t, dm, om);
        om = t;
    }
    simdgroup_store(om, out + 128, 8);
}

// Shared memory sized by products, macros and parentheses; the threads read each other's writes.
#define ROWS 4
#define COLS 16
kernel void product_sized(device float* out [[buffer(0)]], const device float* x [[buffer(1)]],
                          uint gid [[thread_position_in_grid]], uint tid [[thread_index_in_threadgroup]]) {
    threadgroup float a[ROWS * COLS], b[(ROWS) * (COLS / 2) * 2];
    threadgroup float2 c[ROWS * 2][COLS / (1 * 2)];
    threadgroup float* p = b;  // a pointer into threadgroup memory stays a pointer
    a[tid] = x[gid];
    p[tid] = 2.0f * x[gid];
    c[tid / 8][tid % 8] = float2(0.0f, 3.0f * x[gid]);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    const uint o = (tid + 1) % (ROWS * COLS);
    out[gid] = a[o] + b[o] + c[o / 8][o % 8].y;
}

// Simd-group `src` hands its values to the other through threadgroup memory: only a threadgroup barrier orders
// that. Simd-groups moving in step would meet at the simdgroup_barrier and hide the missing one.
kernel void hand_over(device float* out [[buffer(0)]], const device float* x [[buffer(1)]],
                      constant int& src [[buffer(2)]], constant int& barrier [[buffer(3)]],
                      uint gid [[thread_position_in_grid]], uint sg [[simdgroup_index_in_threadgroup]],
                      uint lane [[thread_index_in_simdgroup]]) {
    threadgroup float shared[32];
    if ((int)sg == src) shared[lane] = x[gid];
    simdgroup_barrier(mem_flags::mem_threadgroup);
    if (barrier) threadgroup_barrier(mem_flags::mem_threadgroup);
    out[gid] = shared[lane];
}

kernel void roundings(device half* h [[buffer(0)]], device bfloat* b [[buffer(1)]], const device float* x [[buffer(2)]],
                      device float4* v [[buffer(3)]], uint i [[thread_position_in_grid]]) {
    h[i] = half(x[i]);
    b[i] = bfloat(x[i]);
    if (i % 4 == 0) v[i / 4] = float4(half4(float4(x[i], x[i + 1], x[i + 2], x[i + 3])));
}

kernel void vectors(device float4* out [[buffer(0)]], const device float4* a [[buffer(1)]],
                    const device half4* b [[buffer(2)]], uint i [[thread_position_in_grid]]) {
    float4 x = a[i], y = float4(b[i]);
    float4 r = max(x, y) * 2.0f + float4(x.xy, 1.0f, float2(x.z, x[3]).y);
    out[4 * i] = r;
    out[4 * i + 1] = select(x, y, x < y) - exp2(float4(dot(x, y))) + select(float4(0), float4(1), x > 0.5f);
    r = float4(x.zyx.zyx / 4, 0);  // swizzles, read only
    r[3] = x.w;
    r -= 1;
    out[4 * i + 2] = -r;
    out[4 * i + 3] = float4(int4(x * 8.0f)) + float4(half4(x));
}

kernel void binding(device uint* ids [[buffer(0)]], device long* ints [[buffer(1)]], device float* floats [[buffer(2)]],
                    constant long& a [[buffer(3)]], constant int& b [[buffer(4)]], constant float& f [[buffer(5)]],
                    constant long* li [[buffer(6)]], constant float* lf [[buffer(7)]],
                    const device float* slice [[buffer(8)]], constant half& h [[buffer(9)]],
                    uint2 grid_pos [[thread_position_in_grid]], uint2 group_pos [[threadgroup_position_in_grid]],
                    uint2 local [[thread_position_in_threadgroup]], uint2 group_size [[threads_per_threadgroup]],
                    uint2 groups [[threadgroups_per_grid]], uint2 grid [[threads_per_grid]],
                    uint index [[thread_index_in_threadgroup]], ushort lane [[thread_index_in_simdgroup]],
                    uint simd [[simdgroup_index_in_threadgroup]], uint simds [[simdgroups_per_threadgroup]]) {
    device uint* o = ids + 16 * (grid_pos.y * grid.x + grid_pos.x);
    uint values[16] = {grid_pos.x, grid_pos.y, group_pos.x, group_pos.y, local.x, local.y, group_size.x,
                       group_size.y, groups.x, groups.y, grid.x, grid.y, index, lane, simd, simds};
    for (int i = 0; i < 16; i++) o[i] = values[i];
    if (grid_pos.x == 0 && grid_pos.y == 0) {
        ints[0] = a; ints[1] = b; ints[2] = li[0]; ints[3] = li[1]; ints[4] = li[2];
        floats[0] = f; floats[1] = lf[0]; floats[2] = lf[1]; floats[3] = slice[0]; floats[4] = slice[1]; floats[5] = h;
    }
}
"""


@pytest.fixture(scope="module")
def lib():
    return emulate.compile_shader(SOURCE)


def neighbours_reference(x: np.ndarray, group: int) -> np.ndarray:
    groups = x.reshape(-1, group).astype(np.float64)
    return (np.roll(groups, -1, axis=1) - 2 * np.roll(groups, 1, axis=1)).reshape(-1)


def test_barrier_orders_shared_memory(lib):
    group = 96  # three simd-groups: the barrier must hold across them
    x = torch.randn(5 * group)
    out = torch.empty_like(x)
    lib.neighbours(out, x, threads=x.numel(), group_size=group)
    np.testing.assert_allclose(out.numpy(), neighbours_reference(x.numpy(), group), rtol=1e-6, atol=1e-6)


def test_missing_barrier_gives_wrong_output(lib):
    group = 64
    x = torch.randn(4 * group)
    out = torch.empty_like(x)
    lib.neighbours_no_barrier(out, x, threads=x.numel(), group_size=group)
    assert not np.allclose(out.numpy(), neighbours_reference(x.numpy(), group), atol=1e-3)


def test_simd_reductions_over_full_and_partial_simdgroups(lib):
    group = 48  # each threadgroup: one simd-group of 32 lanes, then one of 16
    x = torch.randn(3 * group) + 4  # all positive: a sum, max or min that took in an absent lane would show it
    out = torch.empty(3 * x.numel())
    lib.reductions(out, x, threads=x.numel(), group_size=group)
    got = out.view(-1, 3).numpy()
    for start in range(0, x.numel(), group):
        for lo, hi in ((start, start + 32), (start + 32, start + group)):
            lanes = x[lo:hi].double().numpy()
            np.testing.assert_allclose(got[lo:hi, 0], lanes.sum(), rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(got[lo:hi, 1], lanes.max())
            np.testing.assert_array_equal(got[lo:hi, 2], lanes.min())


def test_simd_shuffles_and_broadcasts(lib):
    rng = np.random.default_rng()
    src, mask, down, up, lane = (int(v) for v in rng.integers(1, 32, size=5))
    x = torch.randn(128)
    out = torch.empty(7 * x.numel())
    lib.shuffles(out, x, torch.tensor([src, mask, down, up, lane], dtype=torch.int32), threads=x.numel(), group_size=64)
    got = out.view(-1, 7).numpy()
    for start in range(0, x.numel(), 32):
        v = x[start:start + 32].double().numpy()
        ids = np.arange(32)
        np.testing.assert_array_equal(got[start:start + 32, 0], v[src])
        np.testing.assert_array_equal(got[start:start + 32, 1], v[ids ^ mask])
        np.testing.assert_array_equal(got[start:start + 32, 2], np.where(ids + down < 32, v[np.minimum(ids + down, 31)], v))
        np.testing.assert_array_equal(got[start:start + 32, 3], np.where(ids >= up, v[np.maximum(ids - up, 0)], v))
        np.testing.assert_array_equal(got[start:start + 32, 4], v[lane])
        np.testing.assert_allclose(got[start:start + 32, 5], np.concatenate([[0], np.cumsum(v)[:-1]]), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(got[start:start + 32, 6], v[0])


def run_with_timeout(call, seconds=60):
    """Runs call() in a thread; returns the exception it raised (None if none), failing if it hangs."""
    raised = []

    def target():
        try:
            call()
        except Exception as e:  # noqa: BLE001 (the test inspects whatever it was)
            raised.append(e)

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), "the kernel hung instead of reporting the divergence"
    return raised[0] if raised else None


def test_divergent_barrier_is_an_error_not_a_hang(lib):
    out = torch.zeros(64)
    error = run_with_timeout(lambda: lib.diverge_at_barrier(out, threads=64, group_size=64))
    assert isinstance(error, emulate.KernelError)
    assert "threadgroup_barrier" in str(error) and "returned" in str(error), str(error)


def test_divergent_simd_collective_is_an_error_not_a_hang(lib):
    out = torch.zeros(32)
    error = run_with_timeout(lambda: lib.diverge_at_simd(out, threads=32, group_size=32))
    assert isinstance(error, emulate.KernelError)
    assert "simd-group collective" in str(error), str(error)


@pytest.mark.parametrize("dtype, name, tol", [(torch.float32, "matmul_float", 1e-5), (torch.float16, "matmul_half", 1e-5),
                                              (torch.bfloat16, "matmul_bfloat", 1e-5)])
def test_simdgroup_matrix_multiply_accumulate(lib, dtype, name, tol):
    k = 32
    a = torch.randn(8, k).to(dtype)
    b = torch.randn(k, 8).to(dtype)
    c = torch.empty(8, 8)
    getattr(lib, name)(c, a, b.t().contiguous(), k, threads=32, group_size=32)
    reference = 2 * (a.double().numpy() @ b.double().numpy())  # inputs as rounded to dtype, products in float64
    np.testing.assert_allclose(c.numpy(), reference, rtol=tol, atol=tol * np.abs(reference).max())


def test_half_and_bfloat_round_like_torch(lib):
    specials = [0.0, -0.0, float("inf"), -float("inf"), float("nan"), 65504.0, 65520.0, 1e-8, 6e-8, 3.4e38, 1.0 + 2**-11,
                1.0 + 3 * 2**-11, 1.0 + 2**-8, 1.0 + 3 * 2**-8]
    scale = torch.tensor([1e-6, 1e-3, 1.0, 1e3, 1e30]).repeat_interleave(200)
    x = torch.cat([torch.tensor(specials), torch.randn(scale.numel()) * scale, torch.zeros(2)])
    h, b = torch.empty(x.numel(), dtype=torch.float16), torch.empty(x.numel(), dtype=torch.bfloat16)
    v = torch.empty(x.numel())
    lib.roundings(h, b, x, v, threads=x.numel(), group_size=64)
    assert torch.equal(h.view(torch.int16), x.to(torch.float16).view(torch.int16))
    assert torch.equal(b.view(torch.int16)[x == x], x.to(torch.bfloat16).view(torch.int16)[x == x])
    assert b[x != x].isnan().all()
    assert torch.equal(v.view(torch.int32), x.to(torch.float16).float().view(torch.int32))


def test_vector_types(lib):
    a = torch.randn(16, 4)
    b = torch.randn(16, 4).half()
    out = torch.empty(16, 4, 4)
    lib.vectors(out, a, b, threads=16, group_size=16)
    x, y = a.double().numpy(), b.double().numpy()
    dot = (x * y).sum(1, keepdims=True)
    expected = [np.maximum(x, y) * 2 + np.stack([x[:, 0], x[:, 1], np.ones(16), x[:, 3]], 1),
                np.where(x < y, y, x) - np.exp2(dot) + (x > 0.5),
                -(np.concatenate([x[:, :3] / 4, x[:, 3:]], 1) - 1),
                np.trunc(x.astype(np.float32) * 8) + a.half().double().numpy()]
    np.testing.assert_allclose(out.numpy(), np.stack(expected, 1), rtol=1e-5, atol=1e-5)


def test_argument_binding_and_thread_ids(lib):
    rng = np.random.default_rng()
    a = int(rng.integers(-2**40, 2**40))
    b = int(rng.integers(-2**31, 2**31))
    f, h = float(rng.normal()), float(rng.normal())
    li, lf = [int(v) for v in rng.integers(-2**40, 2**40, size=3)], [float(v) for v in rng.normal(size=2)]
    base = torch.randn(64)
    offset = int(rng.integers(1, 60))
    width, height, gx, gy = 37, 5, 16, 4  # neither dimension a multiple of the group: partial edge groups
    ids = torch.zeros(width * height * 16, dtype=torch.int32)
    ints, floats = torch.zeros(5, dtype=torch.int64), torch.zeros(6)
    lib.binding(ids, ints, floats, a, b, f, li, lf, base[offset:], h, threads=(width, height), group_size=(gx, gy),
                arg_casts={4: "int32", 9: "fp16"})
    assert ints.tolist() == [a, b, *li]
    expected_floats = [np.float32(f), *np.float32(lf), base[offset], base[offset + 1], np.float16(np.float32(h))]
    np.testing.assert_array_equal(floats.numpy(), np.array(expected_floats, dtype=np.float32))
    y, x = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    size_x, size_y = np.minimum(gx, width - x // gx * gx), np.minimum(gy, height - y // gy * gy)
    index = x % gx + y % gy * size_x
    expected = [x, y, x // gx, y // gy, x % gx, y % gy, size_x, size_y, np.full_like(x, 3), np.full_like(x, 2),
                np.full_like(x, width), np.full_like(x, height), index, index % 32, index // 32,
                (size_x * size_y + 31) // 32]
    np.testing.assert_array_equal(ids.view(height, width, 16).numpy(), np.stack(expected, axis=-1))


def test_defaults_and_errors_of_the_call(lib):
    x = torch.randn(200)
    out = torch.empty_like(x)
    lib.neighbours(out, x)  # threads default to the first tensor's numel, the group to min(numel, 1024)
    np.testing.assert_allclose(out.numpy(), neighbours_reference(x.numpy(), 200), rtol=1e-6, atol=1e-6)
    assert lib.neighbours.max_threads_per_threadgroup == 1024 and lib.neighbours.thread_execution_width == 32
    with pytest.raises(AttributeError, match="neighbours"):
        lib.no_such_kernel
    with pytest.raises(TypeError, match="buffer"):
        lib.neighbours(out)
    with pytest.raises(ValueError, match="1024"):
        lib.neighbours(out, x, threads=(64, 64), group_size=(64, 32))


def test_compile_error_names_the_problem():
    source = "#include <metal_stdlib>\nusing namespace metal;\n\nkernel void broken(device float* out [[buffer(0)]]) {\n" \
             "    out[0] = undeclared_value;\n}\n"
    with pytest.raises(SyntaxError, match=r"(?s)shader\.metal:5.*undeclared_value"):
        emulate.compile_shader(source)



def test_simdgroup_matrix_operations_take_values(lib):
    """A matrix overwritten right after its store, and a product copied into its own operand in a loop: each
    operation reads its operands as they were at the operation, whatever a lane writes next."""
    d = torch.randn(8, 8)
    out = torch.empty(3, 8, 8)
    lib.matrix_values(out, d, threads=32, group_size=32)
    assert torch.equal(out[0], torch.ones(8, 8)) and torch.equal(out[1], torch.full((8, 8), 2.0))
    dd = d.double().numpy()
    np.testing.assert_allclose(out[2].numpy(), dd @ dd @ dd, rtol=1e-5, atol=1e-5 * np.abs(dd @ dd @ dd).max())


def test_threadgroup_arrays_sized_by_any_expression_are_shared(lib):
    x = torch.randn(4 * 64)
    out = torch.empty_like(x)
    lib.product_sized(out, x, threads=x.numel(), group_size=64)
    expected = 6 * x.view(-1, 64).roll(-1, dims=1).reshape(-1)
    np.testing.assert_allclose(out.numpy(), expected.numpy(), rtol=1e-6, atol=1e-6)


def test_threadgroup_declaration_it_cannot_place_is_a_compile_error():
    source = "#include <metal_stdlib>\nusing namespace metal;\n#define SHARED threadgroup float s[64]\n" \
             "kernel void hidden(device float* out [[buffer(0)]], uint i [[thread_position_in_grid]]) {\n" \
             "    SHARED;\n    s[i] = 1.0f;\n    out[i] = s[i];\n}\n"
    with pytest.raises(SyntaxError, match=r"line 3.*threadgroup"):
        emulate.compile_shader(source)


@pytest.mark.parametrize("src", [0, 1])
def test_missing_barrier_between_simdgroups_gives_wrong_output(lib, src):
    """Data handed from simd-group 0 to 1 and from 1 to 0: the simd-groups do not run in step between threadgroup
    barriers, and not in one fixed order, so either hand-over without its barrier reads stale memory."""
    groups = 4
    for barrier in (1, 0):
        x = torch.randn(groups * 64)
        out = torch.empty_like(x)
        lib.hand_over(out, x, src, barrier, threads=x.numel(), group_size=64, arg_casts="int32")
        expected = x.view(groups, 2, 32)[:, src:src + 1].expand(groups, 2, 32).reshape(-1)
        if barrier:
            assert torch.equal(out, expected)
        else:
            assert not torch.equal(out, expected)
