// The CPU decode step of one row and one position as one op: fachat_cpu::decode_step, the arguments of
// engine/cpu_step.py's _step. The projections are torch's own kernels (nn.Linear's, the int4 and int8 ones
// of models/quant.py); what lies between them (RMSNorm, RoPE and the cache write, attention over the cache,
// SiLU-mul, the residual adds) is a loop over float32 here, not some 60 small torch ops a layer.
// Built on first use by kernels/cpu/__init__.py; float32 activations only (CpuStep checks).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_weight_int4pack_mm_for_cpu.h>
#include <ATen/ops/_weight_int8pack_mm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

using at::Tensor;
constexpr int64_t FLOAT = 0, INT4 = 1;  // cpu_step.py's projection kinds (2: INT8)
constexpr int64_t LANES = 16;           // partial sums a dot product keeps: one AVX-512 register

// Sums 16 partial sums pairwise: a tree the compiler vectorizes (a running sum would be 15 dependent adds).
inline float total16(float* part) {
  for (int64_t width = LANES / 2; width > 0; width /= 2)
    for (int64_t j = 0; j < width; ++j) part[j] += part[j + width];
  return part[0];
}

inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float part[LANES] = {};
  int64_t i = 0;
  for (; i + LANES <= n; i += LANES)
    for (int64_t j = 0; j < LANES; ++j) part[j] += a[i + j] * b[i + j];
  for (; i < n; ++i) part[0] += a[i] * b[i];
  return total16(part);
}

// e^x to about 1 ulp, as 2^n e^r with |r| <= ln 2 / 2 and r's Taylor series to r^7, in plain arithmetic so that
// loops of it vectorize (std::exp does not). x below -87 gives about 1e-38 rather than 0; NaN stays NaN.
inline float exp_fast(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = std::nearbyint(x * 1.44269504f);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // x - n ln 2, ln 2 in two parts
  float e = 1.f / 5040;
  e = e * r + 1.f / 720;
  e = e * r + 1.f / 120;
  e = e * r + 1.f / 24;
  e = e * r + 1.f / 6;
  e = e * r + 0.5f;
  e = e * r + 1.f;
  e = e * r + 1.f;
  const int32_t bits = (int32_t(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return e * scale;
}

// The projection of x [K] (float32) as the module computes it: float32 in, or x rounded to the quantized
// kernel's dtype (its scales'); its output as float32, plus the bias.
Tensor project(const Tensor& x, int64_t kind, const Tensor& a, const Tensor& b, const std::optional<Tensor>& bias) {
  Tensor y;
  if (kind == FLOAT) {
    y = at::linear(x, a);
  } else {
    Tensor rows = x.to(b.scalar_type());
    y = kind == INT4 ? at::_weight_int4pack_mm_for_cpu(rows, a, rows.size(1) / b.size(0), b)
                     : at::_weight_int8pack_mm(rows, a, b);
    y = y.to(at::kFloat);
  }
  if (bias.has_value()) y = y.add(*bias);
  return y.contiguous();
}

// RMSNorm of h [H] times weight, into a new [1, H] float32 tensor.
Tensor rms_norm(const float* h, const Tensor& weight, double eps, int64_t H) {
  double squares = 0;
  for (int64_t i = 0; i < H; ++i) squares += double(h[i]) * h[i];
  const float r = float(1.0 / std::sqrt(squares / H + eps));
  Tensor out = at::empty({1, H}, at::kFloat);
  float* o = out.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  for (int64_t i = 0; i < H; ++i) o[i] = w[i] * (h[i] * r);
  return out;
}

// Rotates head x [D] in place by cos, sin [D] (rotate_half layout).
void rope(float* x, const float* cos, const float* sin, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    x[i] = a * cos[i] - b * sin[i];
    x[i + half] = b * cos[i + half] + a * sin[i + half];
  }
}

// Attention of the `group` query heads q [group, D] that read one KV head over its keys t0..t1-1 (k and v rows
// `row` apart), unnormalised: the largest score `top` [group], the sum of exp(score - top) `total` [group], and
// that sum of V's rows `acc` [group, D]. p [group, t1 - t0]: scratch for the scores.
void attend(const float* __restrict q, const float* __restrict k, const float* __restrict v, int64_t row,
            int64_t t0, int64_t t1, int64_t D, int64_t group, float scale, float* __restrict p,
            float* __restrict top, float* __restrict total, float* __restrict acc) {
  const int64_t n = t1 - t0;
  for (int64_t t = 0; t < n; ++t)
    for (int64_t g = 0; g < group; ++g) p[g * n + t] = dot(q + g * D, k + (t0 + t) * row, D) * scale;
  for (int64_t g = 0; g < group; ++g) {
    float* s = p + g * n;
    float m = -INFINITY;
    for (int64_t t = 0; t < n; ++t) m = std::max(m, s[t]);
    float part[LANES] = {};
    int64_t t = 0;
    for (; t + LANES <= n; t += LANES)
      for (int64_t j = 0; j < LANES; ++j) part[j] += s[t + j] = exp_fast(s[t + j] - m);
    for (; t < n; ++t) part[0] += s[t] = exp_fast(s[t] - m);
    top[g] = m;
    total[g] = total16(part);
  }
  std::fill(acc, acc + group * D, 0.f);
  for (int64_t t = 0; t < n; ++t) {
    const float* vt = v + (t0 + t) * row;
    for (int64_t g = 0; g < group; ++g) {
      const float w = p[g * n + t];
      float* __restrict o = acc + g * D;
      for (int64_t d = 0; d < D; ++d) o[d] += w * vt[d];
    }
  }
}

// Attention of every query head over T keys, into out [n_heads, D]: each KV head's keys in chunks of CHUNK, a
// task each (threads share them where the work is worth it), then per head the chunks' partial sums rescaled to
// the largest score and normalised.
void attention(const float* q, const float* k, const float* v, int64_t head, int64_t row, int64_t T, int64_t D,
               int64_t n_kv_heads, int64_t group, float scale, float* out) {
  constexpr int64_t CHUNK = 128;
  const int64_t chunks = (T + CHUNK - 1) / CHUNK, tasks = n_kv_heads * chunks, width = group * (D + 2);
  std::vector<float> parts(tasks * width);  // per task: top [group], total [group], acc [group, D]
  const int64_t grain = T * D * group >= 8192 ? 1 : tasks;
  at::parallel_for(0, tasks, grain, [&](int64_t first, int64_t last) {
    std::vector<float> p(group * CHUNK);
    for (int64_t task = first; task < last; ++task) {
      const int64_t j = task / chunks, t0 = task % chunks * CHUNK;
      float* part = parts.data() + task * width;
      attend(q + j * group * D, k + j * head, v + j * head, row, t0, std::min(t0 + CHUNK, T), D, group, scale,
             p.data(), part, part + group, part + 2 * group);
    }
  });
  for (int64_t j = 0; j < n_kv_heads; ++j)
    for (int64_t g = 0; g < group; ++g) {
      const float* first = parts.data() + j * chunks * width;
      float m = -INFINITY;
      for (int64_t c = 0; c < chunks; ++c) m = std::max(m, first[c * width + g]);
      float* o = out + (j * group + g) * D;
      std::fill(o, o + D, 0.f);
      float total = 0.f;
      for (int64_t c = 0; c < chunks; ++c) {
        const float* part = first + c * width;
        const float w = exp_fast(part[g] - m);
        total += w * part[group + g];
        const float* acc = part + 2 * group + g * D;
        for (int64_t d = 0; d < D; ++d) o[d] += w * acc[d];
      }
      const float inverse = 1.f / total;
      for (int64_t d = 0; d < D; ++d) o[d] *= inverse;
    }
}

Tensor decode_step(const Tensor& token, const Tensor& position, at::TensorList embed, at::IntArrayRef kinds,
                   at::TensorList a, at::TensorList b, const c10::List<std::optional<Tensor>>& biases,
                   at::TensorList norms, double eps, at::TensorList k_cache, at::TensorList v_cache,
                   const Tensor& cos, const Tensor& sin, int64_t n_heads, int64_t n_kv_heads, double scale) {
  const int64_t id = token.item<int64_t>(), pos = position.item<int64_t>(), T = pos + 1;
  const int64_t D = cos.size(-1), group = n_heads / n_kv_heads, turned = n_heads + n_kv_heads;
  const int64_t H = norms[0].size(0), layers = int64_t(k_cache.size());
  // What the loops below take for granted (CpuStep passes nothing else): a bad call fails here, not in memory.
  TORCH_CHECK(id >= 0 && id < embed[0].size(0), "decode_step: token ", id, " is outside the embedding");
  TORCH_CHECK(pos >= 0 && pos < cos.size(0), "decode_step: position ", pos, " is outside the RoPE table");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.stride(1) == 1 &&
              sin.stride(1) == 1, "decode_step: cos and sin must be float32 rows");
  TORCH_CHECK(embed[0].stride(1) == 1 && (embed.size() == 1 ? embed[0].scalar_type() == at::kFloat
                                                            : embed[0].scalar_type() == at::kChar),
              "decode_step: the embedding must be float32 rows, or int8 rows with scales");
  TORCH_CHECK(int64_t(v_cache.size()) == layers && int64_t(norms.size()) == 2 * layers + 1 &&
              int64_t(kinds.size()) == 4 * layers + 1, "decode_step: layer counts disagree");
  for (int64_t i = 0; i < layers; ++i) {
    for (const Tensor& c : {k_cache[i], v_cache[i]})
      TORCH_CHECK(c.scalar_type() == at::kFloat && c.stride(3) == 1 && c.size(1) == n_kv_heads &&
                  c.size(3) == D && pos < c.size(2) && c.strides() == k_cache[i].strides(),
                  "decode_step: layer ", i, "'s caches must be float32 [1, KV heads, capacity > position, D]");
  }
  for (const Tensor& n : norms)
    TORCH_CHECK(n.scalar_type() == at::kFloat && n.is_contiguous() && n.size(0) == H,
                "decode_step: norm weights must be float32 [hidden]");
  // The residual stream, float32: the embedding's row (an int8 row times its scale, or a float row).
  std::vector<float> h(H);
  if (embed.size() == 1) {
    const float* row = embed[0].data_ptr<float>() + id * embed[0].stride(0);
    std::copy(row, row + H, h.begin());
  } else {
    const int8_t* row = embed[0].data_ptr<int8_t>() + id * embed[0].stride(0);
    const float s = embed[1][id].item<float>();
    for (int64_t i = 0; i < H; ++i) h[i] = float(row[i]) * s;
  }
  const float* cos_p = cos.data_ptr<float>() + pos * cos.stride(0);
  const float* sin_p = sin.data_ptr<float>() + pos * sin.stride(0);
  Tensor o = at::empty({1, n_heads * D}, at::kFloat);
  for (int64_t i = 0; i < layers; ++i) {
    const int64_t p = 4 * i;
    // q, k, v; q and k rotated; k and v written into the caches at pos
    Tensor qkv = project(rms_norm(h.data(), norms[2 * i], eps, H), kinds[p], a[p], b[p], biases.get(p));
    float* x = qkv.data_ptr<float>();
    for (int64_t j = 0; j < turned; ++j) rope(x + j * D, cos_p, sin_p, D);
    float* kc = k_cache[i].data_ptr<float>();
    float* vc = v_cache[i].data_ptr<float>();
    const int64_t head = k_cache[i].stride(1), row = k_cache[i].stride(2);
    for (int64_t j = 0; j < n_kv_heads; ++j) {
      std::copy(x + (n_heads + j) * D, x + (n_heads + j + 1) * D, kc + j * head + pos * row);
      std::copy(x + (turned + j) * D, x + (turned + j + 1) * D, vc + j * head + pos * row);
    }
    attention(x, kc, vc, head, row, T, D, n_kv_heads, group, float(scale), o.data_ptr<float>());
    Tensor y = project(o, kinds[p + 1], a[p + 1], b[p + 1], biases.get(p + 1));
    const float* yp = y.data_ptr<float>();
    for (int64_t j = 0; j < H; ++j) h[j] += yp[j];
    // MLP: gate then up, SiLU(gate) * up, down
    Tensor gate_up = project(rms_norm(h.data(), norms[2 * i + 1], eps, H), kinds[p + 2], a[p + 2], b[p + 2],
                             biases.get(p + 2));
    const int64_t I = gate_up.size(-1) / 2;
    Tensor m = at::empty({1, I}, at::kFloat);
    const float* gu = gate_up.data_ptr<float>();
    float* mp = m.data_ptr<float>();
    for (int64_t j = 0; j < I; ++j) mp[j] = gu[j] / (1.f + exp_fast(-gu[j])) * gu[I + j];
    y = project(m, kinds[p + 3], a[p + 3], b[p + 3], biases.get(p + 3));
    yp = y.data_ptr<float>();
    for (int64_t j = 0; j < H; ++j) h[j] += yp[j];
  }
  const int64_t p = 4 * layers;
  return project(rms_norm(h.data(), norms[2 * layers], eps, H), kinds[p], a[p], b[p], biases.get(p));
}

}  // namespace

TORCH_LIBRARY(fachat_cpu, m) {
  m.def("decode_step(Tensor token, Tensor position, Tensor[] embed, int[] kinds, Tensor[] a, Tensor[] b, "
        "Tensor?[] biases, Tensor[] norms, float eps, Tensor(a!)[] k_cache, Tensor(b!)[] v_cache, Tensor cos, "
        "Tensor sin, int n_heads, int n_kv_heads, float scale) -> Tensor");
  m.impl("decode_step", c10::DispatchKey::CPU, TORCH_FN(decode_step));
}
