"""The layer ops both backends export (rms_norm, silu_mul, rope_write) against float64 math written here, and
what CUDA-graph capture needs of them and of decode_attention: no value read on the host.

The reference backend runs on the CPU; the triton one on CUDA where there is a GPU, else in Triton's CPU
interpreter (set up as tests/test_attention_backends.py's load_triton does), and its tests skip where triton does not import.
"""
from __future__ import annotations

import functools
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fachat.kernels import reference
from fachat.models import quant
from test_quant import kernel_weights

CUDA = torch.cuda.is_available()
TRITON_DEVICE = "cuda" if CUDA else "cpu"
F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
# Without a GPU the kernels go to Triton's interpreter, which triton chooses when it is imported: set
# TRITON_INTERPRET for this import only (triton_interpreter sets it again while the tests run).
saved = os.environ.get("TRITON_INTERPRET")
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
try:
    from fachat.kernels import triton as triton_backend
    from fachat.kernels.triton import decode, fused
    NO_TRITON = None
except ImportError as e:
    triton_backend = decode = fused = None
    NO_TRITON = f"the triton backend does not import ({e}); the test extra installs triton on Linux"
finally:
    if saved is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = saved

# A result may be off by this many units in the last place of its dtype, relative to the magnitude of the terms
# that make it (rounding of the inputs' products and sums; Triton's interpreter truncates to bfloat16). A wrong
# element, position or sign is off by the terms themselves.
ULPS = 8
ULP = {F32: 2.0 ** -23, F16: 2.0 ** -10, BF16: 2.0 ** -7}


pytestmark = pytest.mark.usefixtures("triton_interpreter")


@pytest.fixture(params=["reference", "triton"])
def backend(request):
    """(module, device) of a backend."""
    if request.param == "reference":
        return reference, "cpu"
    if NO_TRITON:
        pytest.skip(NO_TRITON)
    return triton_backend, TRITON_DEVICE


def check(out, expected, terms, dtype, msg, rounded_to=None):
    """out (any device) equals float64 expected within ULPS of terms, the elementwise magnitude of what was summed,
    in units of dtype's last place (rounded_to's, where the computation rounds to a coarser dtype on the way)."""
    out = out.cpu()
    assert out.dtype == dtype and out.shape == expected.shape, f"{out.dtype} {tuple(out.shape)}; {msg}"
    assert not out.isnan().any(), f"NaN in output; {msg}"
    err = (out.to(F64) - expected).abs()
    bound = ULPS * ULP[rounded_to or dtype] * (terms + torch.finfo(dtype).tiny)
    worst = (err / bound).argmax()
    assert (err <= bound).all(), \
        f"off by {err.flatten()[worst]:.3g} at {worst.item()} (allowed {bound.flatten()[worst]:.3g}); {msg}"


def randn(shape, gen, dtype, scale=1.0):
    """Normal values times scale, drawn in float64 on the CPU and rounded to dtype."""
    return (torch.randn(shape, generator=gen, dtype=F64) * scale).to(dtype)


# ---------------------------------------------------------------- rms_norm


def rms_normed(x, w, eps):
    """float64 RMSNorm of x (any dtype) times w."""
    x = x.to(F64)
    return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt() * w.to(F64)


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("H", [64, 576])
@pytest.mark.parametrize("B,L", [(1, 1), (2, 3)])
def test_rms_norm(B, L, H, dtype, backend, gen, seed):
    attn, device = backend
    x, w = randn((B, L, H), gen, dtype, 3.0), randn(H, gen, dtype)
    eps = float(torch.empty(()).uniform_(1e-6, 1e-4, generator=gen))
    y = rms_normed(x, w, eps)
    check(attn.rms_norm(x.to(device), w.to(device), eps), y, y.abs(), dtype,
          f"{attn.__name__} {dtype} B={B} L={L} H={H} seed={seed}")


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_rms_norm_strided_rows(dtype, backend, gen, seed):
    """The model's last-position rows h[:, -1] (a row stride of L * H)."""
    attn, device = backend
    B, L, H = 2, 3, 64
    x, w = randn((B, L, H), gen, dtype).to(device), randn(H, gen, dtype).to(device)
    y = rms_normed(x[:, -1].cpu(), w.cpu(), 1e-5)
    check(attn.rms_norm(x[:, -1], w, 1e-5), y, y.abs(), dtype, f"{attn.__name__} seed={seed}")


# ---------------------------------------------------------------- silu_mul


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("shape,I", [((1, 1), 64), ((2, 3), 1100)])  # 1100: a block and a ragged one
def test_silu_mul(shape, I, dtype, backend, gen, seed):
    attn, device = backend
    gate_up = randn((*shape, 2 * I), gen, dtype, 4.0)  # gates out to where the sigmoid saturates
    gate, up = gate_up.to(F64).split(I, dim=-1)
    y = gate / (1 + torch.exp(-gate)) * up
    # exp's relative error grows with its argument: where the sigmoid is small, silu carries |gate| of it.
    check(attn.silu_mul(gate_up.to(device)), y, y.abs() * (1 + gate.abs()), dtype,
          f"{attn.__name__} {dtype} I={I} seed={seed}")


# ---------------------------------------------------------------- rope_write


def rope_table(P, D, dtype):
    """cos, sin [P, D] in the rotate_half layout (both halves alike), as a model builds them."""
    inv_freq = 1.0 / 10000 ** (torch.arange(0, D, 2, dtype=F64) / D)
    angles = torch.outer(torch.arange(P, dtype=F64), inv_freq).repeat(1, 2)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotated(x, cos, sin):
    """x [..., D] turned by float64 cos, sin [..., D] -> (x', the magnitude of the terms that make each element)."""
    (x1, x2), (c1, c2), (s1, s2) = (t.chunk(2, dim=-1) for t in (x, cos, sin))
    out = torch.cat((x1 * c1 - x2 * s1, x2 * c2 + x1 * s2), -1)
    terms = torch.cat(((x1 * c1).abs() + (x2 * s1).abs(), (x2 * c2).abs() + (x1 * s2).abs()), -1)
    return out, terms


def check_rope_written(q, k_buf, v_buf, qkv, terms, positions, C, Hq, Hkv, dtype, msg, rounded_to=None):
    """q [B, Hq, L, D], and k and v written at positions [B, L] of caches holding NaN elsewhere, against the float64
    projection qkv [B, L, (Hq + 2 * Hkv) * D] (terms: the magnitude of what makes each of its elements; rounded_to:
    as check's)."""
    B, L, _ = qkv.shape
    D = q.shape[-1]
    x, t = qkv.view(B, L, Hq + 2 * Hkv, D), terms.view(B, L, Hq + 2 * Hkv, D)
    cos, sin = rope_table(C + 8, D, F64)
    c, s = cos[positions][:, :, None], sin[positions][:, :, None]  # [B, L, 1, D]
    (t1, t2), (c1, c2), (s1, s2) = (a.chunk(2, dim=-1) for a in (t, c.abs(), s.abs()))
    rot_terms = torch.cat((t1 * c1 + t2 * s1, t2 * c2 + t1 * s2), -1)
    q_ref, q_terms = rotated(x[:, :, :Hq], c, s)
    k_ref, k_terms = rotated(x[:, :, Hq:Hq + Hkv], c, s)
    q_terms, k_terms = q_terms + rot_terms[:, :, :Hq], k_terms + rot_terms[:, :, Hq:Hq + Hkv]
    check(q, q_ref.transpose(1, 2), q_terms.transpose(1, 2), dtype, f"q; {msg}", rounded_to)

    written = torch.zeros(B, v_buf.shape[2], dtype=torch.bool)
    written[torch.arange(B)[:, None], positions] = True
    k_got, v_got = k_buf.cpu().transpose(1, 2), v_buf.cpu().transpose(1, 2)  # [B, capacity, Hkv, D]
    k_written = written[:, :k_buf.shape[2]]
    assert k_got[~k_written].isnan().all() and v_got[~written].isnan().all(), f"wrote past the positions; {msg}"
    # k_got[written] holds each row's written positions in increasing order: the tokens sorted by position.
    by_position = torch.arange(B)[:, None], positions.argsort(-1)
    check(k_got[k_written], k_ref[by_position].flatten(0, 1), k_terms[by_position].flatten(0, 1), dtype, f"k; {msg}",
          rounded_to)
    v_ref, v_terms = x[:, :, Hq + Hkv:], t[:, :, Hq + Hkv:]
    check(v_got[written], v_ref[by_position].flatten(0, 1), v_terms[by_position].flatten(0, 1), dtype, f"v; {msg}",
          rounded_to)


def rope_inputs(B, L, Hkv, D, C, dtype, device, gen):
    """cos, sin [C + 8, D]; distinct positions [B, L] (none 0, not in order, different per row); and K/V caches that
    are the first C positions of NaN buffers with room for 5 and 9 more (strides not of their shape, nor each other's)."""
    cos, sin = rope_table(C + 8, D, dtype)
    positions = torch.stack([torch.randperm(C - 1, generator=gen)[:L] + 1 for _ in range(B)])
    k_buf, v_buf = (torch.full((B, Hkv, C + spare, D), float("nan"), dtype=dtype, device=device) for spare in (5, 9))
    return cos.to(device), sin.to(device), positions, k_buf, v_buf


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("Hq,Hkv", [(9, 3), (4, 2)])
@pytest.mark.parametrize("B,L", [(1, 1), (2, 1), (1, 3), (2, 3)])
def test_rope_write(B, L, Hq, Hkv, D, dtype, backend, gen, seed):
    attn, device = backend
    C = 24  # cache capacity; the table has more rows than that
    qkv = randn((B, L, (Hq + 2 * Hkv) * D), gen, dtype, 2.0)
    cos, sin, positions, k_buf, v_buf = rope_inputs(B, L, Hkv, D, C, dtype, device, gen)
    msg = f"{attn.__name__} {dtype} B={B} L={L} Hq={Hq} Hkv={Hkv} D={D} positions={positions.tolist()} seed={seed}"
    q = attn.rope_write(qkv.to(device), cos, sin, positions.to(device), k_buf[:, :, :C], v_buf[:, :, :C], Hq, Hkv)
    check_rope_written(q, k_buf, v_buf, qkv.to(F64), torch.zeros(qkv.shape, dtype=F64), positions, C, Hq, Hkv, dtype,
                       msg)
    written = v_buf.cpu().transpose(1, 2)[torch.arange(B)[:, None], positions]  # [B, L, Hkv, D]
    v = qkv.view(B, L, Hq + 2 * Hkv, D)[:, :, Hq + Hkv:]
    assert torch.equal(written, v), f"v is not copied as it is; {msg}"


# ---------------------------------------------------------------- projections with their neighbours
# (B, L): one and a few rows (the triton backend's one-kernel path), and more than GEMV_ROWS (torch's matmul)
PROJECTION_ROWS = [(1, 1), (3, 1), (1, 3), (2, 3)]


def projection_cases(dtypes):
    """Parametrises a test over dtypes, with and without a bias, PROJECTION_ROWS and float or int4 weights."""
    def mark(test):
        for parametrize in (pytest.mark.parametrize("dtype", dtypes), pytest.mark.parametrize("bias", [False, True]),
                            pytest.mark.parametrize("B,L", PROJECTION_ROWS),
                            pytest.mark.parametrize("weights", ["float", "int4"])):
            test = parametrize(test)
        return test
    return mark


def projection(x, w, bias, norm=None):
    """float64 (x or rms_norm(x)) @ w.T + bias, and the magnitude of the terms of each element."""
    x = rms_normed(x, norm[0], norm[1]) if norm is not None else x.to(F64)
    w = w.to(F64)
    y, terms = x @ w.T, x.abs() @ w.abs().T
    if bias is not None:
        y, terms = y + bias.to(F64), terms + bias.to(F64).abs()
    return y, terms


def projection_inputs(B, L, K, N, dtype, gen, bias):
    x, w = randn((B, L, K), gen, dtype, 2.0), randn((N, K), gen, dtype, K ** -0.5)
    return x, w, randn(N, gen, dtype) if bias else None


def to(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


def linear(w, b):
    """An nn.Linear holding w [N, K] and b, as the model passes its layers to the projections."""
    layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
    layer.weight = torch.nn.Parameter(w, requires_grad=False)
    if b is not None:
        layer.bias = torch.nn.Parameter(b, requires_grad=False)
    return layer


def layer_of(w, b, weights, attn, device, rows):
    """(the layer the projection gets, the float64 weights it computes with, the dtype it rounds to on the way or
    None): w itself, or (weights "int4") an Int4Linear of w's int4 codes in the layout the triton kernels read,
    which computes with the kernel's weights; for more than GEMV_ROWS rows in bfloat16, as torch's int4 kernels."""
    if weights == "float":
        return linear(*to(device, w, b)), w.to(F64), None
    if attn is reference:
        pytest.skip("the reference backend's Int4Linear rounds to bfloat16 as torch's kernels do: tests/test_quant.py")
    codes = quant.quantize_int4(w.float())
    layer = quant.Int4Linear(codes, b, torch.device(device), portable=True)
    return layer, kernel_weights(codes), BF16 if rows > fused.GEMV_ROWS else None


@projection_cases([F32, F16, BF16])
def test_norm_linear(B, L, bias, weights, dtype, backend, gen, seed):
    attn, device = backend
    K, N = 224, 100  # neither a block's multiple (K: groups of 32 for int4)
    x, w, b = projection_inputs(B, L, K, N, dtype, gen, bias)
    layer, w, rounded_to = layer_of(w, b, weights, attn, device, B * L)
    nw, eps = randn(K, gen, dtype), float(torch.empty(()).uniform_(1e-6, 1e-4, generator=gen))
    y, terms = projection(x, w, b, (nw, eps))
    check(attn.norm_linear(*to(device, x, nw), eps, layer), y, terms, dtype,
          f"{attn.__name__} {weights} {dtype} B={B} L={L} bias={bias} seed={seed}", rounded_to)


@projection_cases([F32, BF16])
def test_norm_silu_mul(B, L, bias, weights, dtype, backend, gen, seed):
    attn, device = backend
    K, I = 96, 150
    x, w, b = projection_inputs(B, L, K, 2 * I, dtype, gen, bias)
    layer, w, rounded_to = layer_of(w, b, weights, attn, device, B * L)
    nw = randn(K, gen, dtype)
    gate_up, terms = projection(x, w, b, (nw, 1e-5))
    (gate, up), (t_gate, t_up) = gate_up.split(I, -1), terms.split(I, -1)
    silu = gate / (1 + torch.exp(-gate))
    y = silu * up
    # silu's slope is at most 1.1; exp's relative error grows with its argument (as in test_silu_mul)
    y_terms = 1.1 * t_gate * up.abs() + silu.abs() * t_up + y.abs() * (1 + gate.abs())
    check(attn.norm_silu_mul(*to(device, x, nw), 1e-5, layer), y, y_terms, dtype,
          f"{attn.__name__} {weights} {dtype} B={B} L={L} bias={bias} seed={seed}", rounded_to)


@projection_cases([F32, BF16])
def test_linear_add(B, L, bias, weights, dtype, backend, gen, seed):
    attn, device = backend
    K, N = 288, 72
    x, w, b = projection_inputs(B, L, K, N, dtype, gen, bias)
    layer, w, rounded_to = layer_of(w, b, weights, attn, device, B * L)
    residual = randn((B, L, N), gen, dtype, 3.0)
    y, terms = projection(x, w, b)
    y, terms = y + residual.to(F64), terms + residual.to(F64).abs()
    check(attn.linear_add(*to(device, x), layer, *to(device, residual)), y, terms, dtype,
          f"{attn.__name__} {weights} {dtype} B={B} L={L} bias={bias} seed={seed}", rounded_to)


@pytest.mark.parametrize("D,Hq,Hkv", [(64, 9, 3), (128, 4, 2)])
@projection_cases([F32, BF16])
def test_norm_rope_write(B, L, D, Hq, Hkv, bias, weights, dtype, backend, gen, seed):
    attn, device = backend
    K, C = 96, 24
    x, w, b = projection_inputs(B, L, K, (Hq + 2 * Hkv) * D, dtype, gen, bias)
    layer, w, rounded_to = layer_of(w, b, weights, attn, device, B * L)
    nw = randn(K, gen, dtype)
    cos, sin, positions, k_buf, v_buf = rope_inputs(B, L, Hkv, D, C, dtype, device, gen)
    msg = f"{attn.__name__} {weights} {dtype} B={B} L={L} Hq={Hq} Hkv={Hkv} D={D} bias={bias} seed={seed}"
    q = attn.norm_rope_write(*to(device, x, nw), 1e-5, layer, cos, sin, positions.to(device),
                             k_buf[:, :, :C], v_buf[:, :, :C], Hq, Hkv)
    qkv, terms = projection(x, w, b, (nw, 1e-5))
    check_rope_written(q, k_buf, v_buf, qkv, terms, positions, C, Hq, Hkv, dtype, msg, rounded_to)


# The interpreter runs a projection as one program of every row and all of K (gemv_blocks); on a GPU it is many
# programs of a few rows (int4: SiLU's and RoPE's halves paired in a tile), each over several steps of K. These
# sizes cut N and K both ways, a partial last step included (K 224: 64 + 64 + 64 + 32, or 128 + 96); the
# interpreter takes 15 to 25 s for each.
_patched_metas = []  # launch arguments made under patched block sizes, alive for good: launchers key on their ids


@pytest.mark.skipif(NO_TRITON is not None, reason=NO_TRITON or "")
@pytest.mark.parametrize("weights,block_r,block_k", [("float", 2, 64), ("int4", 4, 128)])
def test_projections_at_gpu_like_block_sizes(weights, block_r, block_k, monkeypatch, gen, seed):
    monkeypatch.setattr(fused, "gemv_blocks", lambda rows, K, int4: (block_r, block_k))
    for name in ("_linear_meta", "_rope_linear_meta"):
        fresh = functools.cache(getattr(fused, name).__wrapped__)
        _patched_metas.append(fresh)
        monkeypatch.setattr(fused, name, fresh)
    backend = triton_backend, TRITON_DEVICE
    for B, L in [(2, 1)]:
        test_norm_linear(B, L, True, weights, BF16, backend, gen, seed)
        test_norm_silu_mul(B, L, True, weights, BF16, backend, gen, seed)
        test_linear_add(B, L, True, weights, BF16, backend, gen, seed)
        test_norm_rope_write(B, L, 64, 9, 3, True, weights, BF16, backend, gen, seed)


# ---------------------------------------------------------------- the model on the triton backend


@pytest.mark.skipif(NO_TRITON is not None, reason=NO_TRITON or "")
@pytest.mark.parametrize("variant,n_prompt", [("llama", 3), ("qwen2", 9), ("mistral-window", 9)])
def test_model_on_the_triton_backend_matches_transformers(variant, n_prompt, tmp_path, monkeypatch, gen, seed):
    """A tiny model (head_dim 64) on the triton backend (on the CPU: in the interpreter), prefilled with n_prompt
    tokens (3: the few-rows kernels; 9: torch's matmul) and then decoding token by token, against transformers'
    float32 logits for the whole sequence; and its greedy tokens against transformers' generate."""
    from fachat import Engine
    from fachat.engine.runner import Runner
    from fachat.kernels.dispatch import BACKEND_ENV
    from tiny import make_tiny_model

    window = dict(sliding_window=6) if variant == "mistral-window" else {}  # shorter than the sequence
    peer = make_tiny_model(tmp_path, variant, seed=seed, head_dim=64, **window)
    monkeypatch.setenv(BACKEND_ENV, "triton")
    engine = Engine.load(tmp_path, device=TRITON_DEVICE, dtype="float32")
    assert engine.attention_backend == "triton"
    ids = torch.randint(3, engine.args.vocab_size, (n_prompt + 6,), generator=gen).tolist()
    runner = Runner(engine.model, engine.new_cache(), graphs=False)
    got = torch.cat([runner.prefill(ids[:n_prompt])[None]] + [runner.prefill([t])[None] for t in ids[n_prompt:]])
    with torch.no_grad():
        want = peer(torch.tensor([ids])).logits[0, n_prompt - 1:]
    err = ((got.cpu() - want).abs().max() / want.abs().max()).item()
    assert err < 1e-4, f"{variant}: logits off by {err:.2e} of the largest; seed={seed}"
    tokens = engine.generate(ids[:n_prompt], max_new_tokens=6, temperature=0).tokens
    with torch.no_grad():
        expected = peer.generate(torch.tensor([ids[:n_prompt]]), max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert tokens == expected[0, n_prompt:].tolist()[:len(tokens)], f"{variant}: seed={seed}"


# ---------------------------------------------------------------- graph capture: no value read on the host


def test_reference_rope_write_reads_no_position():
    """On meta tensors (shapes without data) any read of a value raises."""
    B, L, Hq, Hkv, D, C = 2, 3, 4, 2, 64, 16
    meta = dict(device="meta")
    q = reference.rope_write(torch.empty(B, L, (Hq + 2 * Hkv) * D, **meta), torch.empty(C, D, **meta),
                             torch.empty(C, D, **meta), torch.empty(B, L, dtype=torch.long, **meta),
                             torch.empty(B, Hkv, C, D, **meta), torch.empty(B, Hkv, C, D, **meta), Hq, Hkv)
    assert q.shape == (B, Hq, L, D)


class HostReads(TorchDispatchMode):
    """Counts reads of a tensor's value by item(), int(), bool() (aten._local_scalar_dense): each one waits for
    the GPU, and CUDA-graph capture refuses them. tolist() of a CPU tensor reads without dispatch: the capture
    test below catches that on a GPU."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.reads += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


@pytest.mark.skipif(NO_TRITON is not None, reason=NO_TRITON or "")
def test_triton_reads_no_position_or_length_on_the_host(gen):
    """rope_write, and decode_attention with lengths on the device, whether given num_partitions or left to
    the split (which takes the capacity's). An int() of a length is counted (the count's own check)."""
    device = TRITON_DEVICE
    B, L, Hq, Hkv, D, C = 2, 1, 4, 2, 64, 80
    cos, sin = rope_table(C, D, F32)
    k_cache, v_cache = torch.randn(2, B, Hkv, C, D, generator=gen).to(device)
    qkv = torch.randn(B, L, (Hq + 2 * Hkv) * D, generator=gen).to(device)
    positions = torch.tensor([[69], [4]], device=device)
    with HostReads() as mode:
        q = triton_backend.rope_write(qkv, cos.to(device), sin.to(device), positions, k_cache, v_cache, Hq, Hkv)
    assert mode.reads == 0, f"rope_write read {mode.reads} values on the host"
    kv_len = positions[:, 0] + 1
    expected = reference.decode_attention(q[:, :, 0].cpu(), k_cache.cpu(), v_cache.cpu(), kv_len.cpu())
    with HostReads() as mode:
        int(kv_len[0])
    assert mode.reads == 1, "the counter missed an int()"
    for num_partitions in (2, None):
        with HostReads() as mode:
            out = decode.decode_attention(q[:, :, 0], k_cache, v_cache, kv_len, num_partitions=num_partitions)
        assert mode.reads == 0, f"num_partitions={num_partitions}: {mode.reads} host reads"
        assert torch.allclose(out.cpu(), expected, atol=1e-5, rtol=1e-4), f"num_partitions={num_partitions}"


@pytest.mark.skipif(not CUDA or NO_TRITON is not None, reason=NO_TRITON or "CUDA graphs need a GPU")
def test_triton_decode_step_replays_from_a_cuda_graph(gen):
    """A decode step's ops captured once, replayed at other positions and lengths: bit for bit what they give
    eagerly there (the same kernels; on Hopper with PDL, captured as programmatic edges)."""
    B, Hq, Hkv, D, H, I, C, dtype = 2, 8, 2, 128, 256, 512, 300, BF16
    cos, sin = (t.cuda() for t in rope_table(C, D, dtype))

    def inputs():
        return dict(x=randn((B, 1, H), gen, dtype), weight=randn(H, gen, dtype),
                    gate_up=randn((B, 1, 2 * I), gen, dtype), qkv=randn((B, 1, (Hq + 2 * Hkv) * D), gen, dtype),
                    k_cache=randn((B, Hkv, C, D), gen, dtype), v_cache=randn((B, Hkv, C, D), gen, dtype),
                    positions=torch.randint(0, C, (B, 1), generator=gen))

    def step(x, weight, gate_up, qkv, k_cache, v_cache, positions):
        attn = triton_backend
        q = attn.rope_write(qkv, cos, sin, positions, k_cache, v_cache, Hq, Hkv)
        o = attn.decode_attention(q[:, :, 0], k_cache, v_cache, positions[:, 0] + 1, num_partitions=4)
        return attn.rms_norm(x, weight, 1e-5), attn.silu_mul(gate_up), q, o

    static = {name: t.cuda() for name, t in inputs().items()}
    side = torch.cuda.Stream()  # warm-up (compiling) off the capturing stream, as torch.cuda.graph asks
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(**static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = step(**static)
    for _ in range(2):
        fresh = {name: t.cuda() for name, t in inputs().items()}
        for name, t in fresh.items():
            static[name].copy_(t)
        graph.replay()
        eager = step(**fresh)
        for i, (a, b) in enumerate(zip((*replayed, static["k_cache"], static["v_cache"]),
                                       (*eager, fresh["k_cache"], fresh["v_cache"]), strict=True)):
            assert torch.equal(a, b), f"output {i} of the replay differs from the eager step"


# ---------------------------------------------------------------- reference attention at batch 1


@pytest.mark.parametrize("fn", ["decode", "prefill"])
def test_reference_batch_one_tensor_length_runs_the_unmasked_path(fn, gen, monkeypatch, seed):
    """kv_len as a [1] tensor gives the int's result bit for bit, without building a mask (the CPU decode path
    passes tensor lengths)."""
    Hkv, G, D, Lq, n = 2, 3, 64, 1 if fn == "decode" else 5, 300
    q = torch.randn(1, Hkv * G, Lq, D, generator=gen)
    k, v = torch.randn(2, 1, Hkv, n + 7, D, generator=gen)
    k[:, :, n:] = v[:, :, n:] = float("nan")
    attention = reference.decode_attention if fn == "decode" else reference.prefill_attention
    q = q[:, :, 0] if fn == "decode" else q
    expected = attention(q, k, v, n)
    monkeypatch.setattr(reference, "_zero_past_rows", lambda *a: pytest.fail("took the per-row lengths' path"))
    if fn == "decode":  # the int path builds no mask (prefill's causal mask is built on both paths)
        monkeypatch.setattr(reference, "key_mask", lambda *a: pytest.fail("a mask was built"))
    for dtype in (torch.int64, torch.int32):
        assert torch.equal(attention(q, k, v, torch.tensor([n], dtype=dtype)), expected), f"{dtype} seed={seed}"
