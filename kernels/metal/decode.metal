// flash-attn-vec decode: one query position per row, the live KV range split over threadgroups.
//
// Threadgroup (b, KV head, block of GB query heads, part w) is one 32-lane simdgroup. The launch has
// NWG parts per row, sized on the host (by the length, or by the capacity when the lengths are on the
// device); a row uses at most one part per whole 32-key chunk of its own live range [lo, n), so that
// none is empty: the rest return at once and the reduce reads none of them. Part w takes the chunks
// w, w + parts, ... of [lo, n). For each key the lanes hold D / 32 dims of K and of every head's q,
// and simd_sum makes the score; lane j keeps key j's score, so the chunk's softmax is one simd_max and
// one simd_sum; then every lane adds p_j * V_j to its dims of O. All GB heads share each K/V load.
// Keys at or past n are never read: spare capacity may hold NaN. With NWG == 1 the threadgroup
// normalises and writes the output; otherwise it writes (m, l, unnormalised O) in fp32 to `work`, and
// decode_reduce merges them.
//
// Prefixed #defines: T (K/V, q and output type), D (head dim), GB (query heads per threadgroup).
// Scores are in base 2 (q is scaled by log2(e) / sqrt(D)): the softmax uses exp2.
#include <metal_stdlib>
using namespace metal;

#define E (D / 32)    // dims per lane: lane + 32 * e, so that a simdgroup's loads are contiguous
#define NEG (-1e30f)  // finite: fast math may assume no infinities

// c * tanh(x), from exp2 (finite under fast math; exp2 of -2|x| log2(e) cannot overflow).
static inline float capped(float x, float c) {
    float t = exp2(-2.8853900817779268f * fabs(x));
    float y = (1.0f - t) / (1.0f + t);
    return c * (x < 0.0f ? -y : y);
}

// p: HKV, G, NHB (blocks of GB heads), NWG, window (0: none), q strides (b, h), K/V strides (b, h, n),
// rows (B * Hq). softcap_log2e 0: no softcap.

// The parts a row uses: NWG, or fewer where its live range [lo, n) has fewer whole chunks.
static inline int parts_of(int n, int lo, constant long* p) { return min((int)p[3], max(1, (n - lo) / 32)); }

// The oldest key a query at position n - 1 sees.
static inline int oldest(int n, constant long* p) { return p[4] > 0 ? max(n - (int)p[4], 0) : 0; }

kernel void decode_partial(device const T* q [[buffer(0)]], device const T* k [[buffer(1)]],
                           device const T* v [[buffer(2)]], device const int* lens [[buffer(3)]],
                           constant long* p [[buffer(4)]], constant float& qk_scale [[buffer(5)]],
                           constant float& softcap_log2e [[buffer(6)]], device float* work [[buffer(7)]],
                           device T* out [[buffer(8)]], uint tg [[threadgroup_position_in_grid]],
                           uint lane [[thread_index_in_simdgroup]]) {
    const long HKV = p[0], G = p[1], NHB = p[2], NWG = p[3], rows = p[10];
    const long w = tg % NWG, hb = tg / NWG % NHB, hk = tg / (NWG * NHB) % HKV, b = tg / (NWG * NHB * HKV);
    const int n = lens[b], lo = oldest(n, p);
    const int parts = parts_of(n, lo, p);
    if (w >= parts) return;  // the whole threadgroup: no collective is left waiting
    device const T* kb = k + b * p[7] + hk * p[8];
    device const T* vb = v + b * p[7] + hk * p[8];
    const int skn = (int)p[9];  // a key's stride: 32-bit index math in the loops

    float qr[GB][E], o[GB][E], m[GB], l[GB];
    for (int g = 0; g < GB; g++) {
        const long h = hb * GB + g;  // within the KV head's group
        for (int e = 0; e < E; e++) {
            qr[g][e] = h < G ? float(q[b * p[5] + (hk * G + h) * p[6] + lane + 32 * e]) * qk_scale : 0.0f;
            o[g][e] = 0.0f;
        }
        m[g] = NEG;
        l[g] = 0.0f;
    }

    for (int c0 = lo + 32 * (int)w; c0 < n; c0 += 32 * parts) {
        const int cnt = min(32, n - c0);
        float s[GB];
        for (int g = 0; g < GB; g++) s[g] = NEG;
        for (int j = 0; j < cnt; j++) {
            float kr[E];
            for (int e = 0; e < E; e++) kr[e] = float(kb[(c0 + j) * skn + lane + 32 * e]);
            for (int g = 0; g < GB; g++) {
                float dot = 0.0f;
                for (int e = 0; e < E; e++) dot += qr[g][e] * kr[e];
                dot = simd_sum(dot);
                if (softcap_log2e > 0.0f) dot = capped(dot, softcap_log2e);
                if ((int)lane == j) s[g] = dot;
            }
        }
        for (int g = 0; g < GB; g++) {
            const float mn = max(m[g], simd_max(s[g]));
            const float alpha = exp2(m[g] - mn);
            s[g] = (int)lane < cnt ? exp2(s[g] - mn) : 0.0f;  // s becomes p
            l[g] = l[g] * alpha + simd_sum(s[g]);
            m[g] = mn;
            for (int e = 0; e < E; e++) o[g][e] *= alpha;
        }
        for (int j = 0; j < cnt; j++) {
            float vr[E];
            for (int e = 0; e < E; e++) vr[e] = float(vb[(c0 + j) * skn + lane + 32 * e]);
            for (int g = 0; g < GB; g++) {
                const float pj = simd_shuffle(s[g], (ushort)j);
                for (int e = 0; e < E; e++) o[g][e] += pj * vr[e];
            }
        }
    }

    for (int g = 0; g < GB; g++) {
        if (hb * GB + g >= G) break;
        const long row = (b * HKV + hk) * G + hb * GB + g;  // b * Hq + query head
        if (NWG == 1) {
            for (int e = 0; e < E; e++) out[row * D + lane + 32 * e] = T(o[g][e] / l[g]);
        } else {
            // work: m [rows, NWG], l [rows, NWG], o [rows, NWG, D]
            const long at = row * NWG + w;
            if (lane == 0) {
                work[at] = m[g];
                work[rows * NWG + at] = l[g];
            }
            for (int e = 0; e < E; e++) work[2 * rows * NWG + at * D + lane + 32 * e] = o[g][e];
        }
    }
}

// One simdgroup per row: rescales the row's parts by exp2(m_i - m), sums them and divides.
kernel void decode_reduce(device const float* work [[buffer(0)]], device const int* lens [[buffer(1)]],
                          constant long* p [[buffer(2)]], device T* out [[buffer(3)]],
                          uint row [[threadgroup_position_in_grid]], uint lane [[thread_index_in_simdgroup]]) {
    const long NWG = p[3], rows = p[10];
    const int n = lens[row / (p[0] * p[1])];
    const int parts = parts_of(n, oldest(n, p), p);
    device const float* ms = work + row * NWG;
    device const float* ls = work + rows * NWG + row * NWG;
    device const float* os = work + 2 * rows * NWG + row * NWG * D;
    float mx = NEG;
    for (long i = lane; i < parts; i += 32) mx = max(mx, ms[i]);
    mx = simd_max(mx);
    float sum = 0.0f, acc[E];
    for (int e = 0; e < E; e++) acc[e] = 0.0f;
    for (long i = 0; i < parts; i++) {
        const float wi = exp2(ms[i] - mx);  // the same address in every lane: one load
        sum += wi * ls[i];
        for (int e = 0; e < E; e++) acc[e] += wi * os[i * D + lane + 32 * e];
    }
    for (int e = 0; e < E; e++) out[row * D + lane + 32 * e] = T(acc[e] / sum);
}
