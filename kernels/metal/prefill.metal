// Flash prefill: Lq > 1 queries on top of a cached past, bottom-right causal.
//
// Query i sits at position n - Lq + i and sees keys at positions <= its own (only the last `window`
// of them with a window). A threadgroup takes BM rows of one KV head's queries, position-major
// (row = i * G + g), so that the G query heads of a group share every K/V tile and a block spans
// few positions; each of its NSG simdgroups owns 8 rows. Key tiles of BN keys go through
// threadgroup memory (K, then V, as float) into simdgroup_float8x8 products with an
// online softmax in fp32. Scores, probabilities and O stay in simdgroup matrices: each lane works on
// the two elements it holds (thread_elements(), in the layout MLX's steel kernels rely on: row
// (lane / 4 & 4) + lane / 2 % 4, columns (lane / 4 & 2) * 2 + lane % 2 * 2 and the next), and the four
// lanes of a row (lane bits 0 and 3) combine their maxima and sums by simd_shuffle_xor.
// Only the tiles from the block's oldest visible key up to its newest query are read: fully masked
// tiles are skipped, and keys at or past n never read (spare capacity may hold NaN).
//
// Prefixed #defines: T (q, K/V and output type), D (head dim), BN (keys per tile, and query rows per
// threadgroup: 16 or 32). Scores are in base 2 (q is scaled by log2(e) / sqrt(D)): the softmax uses exp2.
#include <metal_stdlib>
using namespace metal;

#define BM BN           // rows per threadgroup: Q is staged in the tile's memory
#define NSG (BM / 8)
#define TILE (BN * D)   // floats of the shared tile
#define NEG (-1e30f)    // finite: fast math may assume no infinities

// c * tanh(x), from exp2 (finite under fast math; exp2 of -2|x| log2(e) cannot overflow).
static inline float capped(float x, float c) {
    float t = exp2(-2.8853900817779268f * fabs(x));
    float y = (1.0f - t) / (1.0f + t);
    return c * (x < 0.0f ? -y : y);
}

// Keys [j, j + cnt) of K or V into tile [BN, D] as float: rows past cnt are zeros, never keys past n.
static inline void stage(threadgroup float* tile, device const T* src, int j, int cnt, int skn, uint tid) {
    for (uint x = tid; x < BN * D; x += NSG * 32) {
        const int r = x / D;
        tile[x] = r < cnt ? float(src[(j + r) * skn + x % D]) : 0.0f;
    }
}

// p: HKV, G, Lq, window (0: none), row blocks per KV head, q strides (b, h, i), K/V strides (b, h, n).
// softcap_log2e 0: no softcap. out is contiguous [B, Hq, Lq, D].
kernel void prefill(device const T* q [[buffer(0)]], device const T* k [[buffer(1)]],
                    device const T* v [[buffer(2)]], device const int* lens [[buffer(3)]],
                    constant long* p [[buffer(4)]], constant float& qk_scale [[buffer(5)]],
                    constant float& softcap_log2e [[buffer(6)]], device T* out [[buffer(7)]],
                    uint tg [[threadgroup_position_in_grid]], uint tid [[thread_index_in_threadgroup]],
                    uint sg [[simdgroup_index_in_threadgroup]], uint lane [[thread_index_in_simdgroup]]) {
    threadgroup float tile[TILE];  // Q [BM, D], then per key tile K, then V [BN, D]

    // Positions and counts in 32 bits (lengths are int32); offsets into buffers in 64.
    const int HKV = p[0], G = p[1], Lq = p[2], window = p[3], NMB = p[4];
    const int mb = tg % NMB, hk = tg / NMB % HKV, b = tg / (NMB * HKV);
    const int n = lens[b], past = n - Lq, rows = G * Lq, r0 = mb * BM;
    const int i_lo = r0 / G, i_hi = (min(r0 + BM, rows) - 1) / G;  // the block's query positions
    const int hi = past + i_hi + 1;  // <= n
    const int lo = window > 0 ? max(past + i_lo - window + 1, 0) : 0;
    device const T* kb = k + b * p[8] + hk * p[9];
    device const T* vb = v + b * p[8] + hk * p[9];
    const int skn = (int)p[10];  // a key's stride: 32-bit index math in the loops

    // This lane's elements of every 8x8 block: row fr, columns fc and fc + 1.
    const int fr = (lane / 4 & 4) + lane / 2 % 4, fc = (lane / 4 & 2) * 2 + lane % 2 * 2;
    const int row = r0 + sg * 8 + fr;
    const int pos = past + (row < rows ? row / G : Lq - 1);  // padding rows stand at the last position

    for (uint x = tid; x < BM * D; x += NSG * 32) {
        const int rr = r0 + x / D;
        tile[x] = rr < rows ? float(q[b * p[5] + (hk * G + rr % G) * p[6] + rr / G * p[7] + x % D]) * qk_scale
                            : 0.0f;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    simdgroup_float8x8 qm[D / 8], om[D / 8], sm[BN / 8], km;
    for (int c = 0; c < D / 8; c++) {
        simdgroup_load(qm[c], tile + sg * 8 * D + c * 8, D);
        om[c] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    }
    float m = NEG, l = 0.0f;

    for (int j = lo; j < hi; j += BN) {
        const int cnt = min(BN, hi - j);
        threadgroup_barrier(mem_flags::mem_threadgroup);  // every simdgroup is done with the last V
        stage(tile, kb, j, cnt, skn, tid);
        threadgroup_barrier(mem_flags::mem_threadgroup);
        for (int cb = 0; cb < BN / 8; cb++) {
            sm[cb] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
            for (int c = 0; c < D / 8; c++) {
                simdgroup_load(km, tile + cb * 8 * D + c * 8, D, ulong2(0, 0), true);  // K^T's block
                simdgroup_multiply_accumulate(sm[cb], qm[c], km, sm[cb]);
            }
        }

        float mx = NEG;
        for (int cb = 0; cb < BN / 8; cb++) {
            for (int e = 0; e < 2; e++) {
                const int key = j + cb * 8 + fc + e;
                const bool seen = key < j + cnt && key <= pos && (window <= 0 || key > pos - window);
                const float x = sm[cb].thread_elements()[e];
                sm[cb].thread_elements()[e] = seen ? (softcap_log2e > 0.0f ? capped(x, softcap_log2e) : x) : NEG;
                mx = max(mx, float(sm[cb].thread_elements()[e]));
            }
        }
        mx = max(mx, simd_shuffle_xor(mx, (ushort)1));
        mx = max(mx, simd_shuffle_xor(mx, (ushort)8));
        const float mn = max(m, mx);
        const float alpha = exp2(m - mn);
        float sum = 0.0f;
        for (int cb = 0; cb < BN / 8; cb++) {
            for (int e = 0; e < 2; e++) {
                // Masked keys weigh 0 even for a row that has seen no key yet (mn == NEG).
                const float s = sm[cb].thread_elements()[e];
                const float pr = s > NEG ? exp2(s - mn) : 0.0f;
                sm[cb].thread_elements()[e] = pr;
                sum += pr;
            }
        }
        sum += simd_shuffle_xor(sum, (ushort)1);
        sum += simd_shuffle_xor(sum, (ushort)8);
        l = l * alpha + sum;
        m = mn;
        for (int c = 0; c < D / 8; c++) {
            om[c].thread_elements()[0] *= alpha;
            om[c].thread_elements()[1] *= alpha;
        }

        threadgroup_barrier(mem_flags::mem_threadgroup);  // every simdgroup is done with K
        stage(tile, vb, j, cnt, skn, tid);
        threadgroup_barrier(mem_flags::mem_threadgroup);
        for (int c = 0; c < D / 8; c++) {
            for (int kc = 0; kc < BN / 8; kc++) {
                simdgroup_load(km, tile + kc * 8 * D + c * 8, D);
                simdgroup_multiply_accumulate(om[c], sm[kc], km, om[c]);
            }
        }
    }

    if (row < rows) {
        device T* o = out + ((long)(b * HKV * G + hk * G + row % G) * Lq + row / G) * D + fc;
        for (int c = 0; c < D / 8; c++) {
            o[c * 8] = T(om[c].thread_elements()[0] / l);
            o[c * 8 + 1] = T(om[c].thread_elements()[1] / l);
        }
    }
}
