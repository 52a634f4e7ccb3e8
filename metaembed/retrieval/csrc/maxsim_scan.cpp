// MaxSim top-k of float32 queries over bf16 candidate vectors on x86-64 CPUs, with no float32 copy of the candidates.
//
//   score[q, i] = sum_{r < r_q} max_{j < r_c} <query[q, r], vectors[j, i]>,  top-k over i for every query q
//
// Two kernels, chosen by the caller (metaembed/retrieval/scan_kernel.py) from what the CPU reports here
// (`cpu_features`):
//
// amx   Intel AMX (Sapphire Rapids and later). The candidates are the A operand of TDPBF16PS, loaded straight from
//       the stored [r_c, N, D] bf16 rows (16 items x 32 dims per tile, no repacking). Each float32 query value is
//       split into three bf16 parts, q = hi + mid + lo (each the bf16 rounding of what is left; the residual is
//       below 2^-24 of q), packed once per search as B tiles. bf16 x bf16 products are exact in float32 and the
//       tile unit accumulates in float32, so hi + mid + lo products give <q, c> with float32 rounding only: the
//       scores of a float32 product, not of a bf16 one. Or two parts, hi + mid (a third fewer tile products and
//       loads where that saves a row block): each row's score then differs from the three-part one by at most
//       |lo| |c|; a short list of candidates is re-scored with three parts, and the top-k certified (top_amx).
// avx2  AVX2 + FMA (any x86-64 from Haswell / Zen on). Each 16 bf16 values are widened in registers (an unpack
//       with zeros puts them in the high halves of float32 lanes, one shuffle per 8 values) and multiplied with
//       FMAs by float32 queries whose dimensions were permuted once to the unpack order. For many query rows
//       (`top_avx2_gemm`), blocks of candidates sized to stay in L2 are widened into a per-thread float32 buffer
//       and multiplied by a float32 GEMM (MKL's sgemm, found in the process at run time; else ATen's mm).
//
// Both read every candidate value once from memory, keep a running max over the r_c tiers per (item, query row) in
// a small per-thread buffer, sum the r_q rows of each query, and offer the score to the thread's running top-k of
// that query (a score below the k-th best so far costs one comparison). Threads: torch's intra-op pool
// (at::parallel_for) over blocks of items; their lists are merged at the end. Temporaries: per thread, a few
// hundred KB plus the top-k lists (Q x 2k entries).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <mutex>
#include <utility>
#include <vector>

#if defined(__x86_64__) && defined(__linux__)
#define METAEMBED_X86 1
#include <cpuid.h>
#include <dlfcn.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

// The AMX code needs the amx-tile / amx-bf16 targets of GCC 11 or Clang 12. With an older compiler, or when built with
// -DMETAEMBED_NO_AMX (METAEMBED_KERNEL_AMX=0 in metaembed/retrieval/scan_kernel.py), the module keeps every other
// kernel and reports no AMX.
#if defined(METAEMBED_X86) && !defined(METAEMBED_NO_AMX) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define METAEMBED_AMX_BUILD 1
#endif

namespace {

constexpr int64_t kTileRows = 16;  // items (A) or query rows (B columns) per AMX tile
constexpr int64_t kTileDims = 32;  // bf16 values per tile row: 64 bytes, one cache line
constexpr int64_t kMaxSplits = 3;  // bf16 parts of each float32 query value: 3 (exact), or 2 (certified: top_amx)
constexpr int64_t kTileBytes = 1024;

#ifdef METAEMBED_X86

bool os_saves_ymm() {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return false;  // OSXSAVE
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return (lo & 6u) == 6u;  // XMM and YMM state
}

bool has_avx2_fma() {
    unsigned a, b, c, d;
    if (!os_saves_ymm()) return false;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 12))) return false;  // FMA
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    return b & (1u << 5);  // AVX2
}

// AMX-BF16 and AMX-TILE in CPUID, and the kernel's permission to use the tile state (Linux asks each process to
// request it: arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA).
bool enable_amx() {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (!(d & (1u << 22)) || !(d & (1u << 24))) return false;  // AMX-BF16, AMX-TILE
    constexpr long kGetPerm = 0x1022, kRequestPerm = 0x1023, kXtileData = 18;
    if (syscall(SYS_arch_prctl, kRequestPerm, kXtileData) != 0) return false;
    unsigned long granted = 0;
    if (syscall(SYS_arch_prctl, kGetPerm, &granted) != 0) return false;
    return granted & (1ul << kXtileData);
}

#endif  // METAEMBED_X86

// One tier's products folded into the running max: best[i][r] = max(best[i][r], hi + mid + lo) (or set, first);
// with two parts, hi + mid (the same float32 sum as the first two terms of three: (hi + mid) + lo). dots holds one
// row of virtual rows per item: all hi parts, then all mid, then all lo. (Inlined into the AMX code, where it is
// vectorised with that code's instructions; the portable reference scan runs it too.)
template <int Splits>
inline void fold_tier(const float* __restrict dots, int64_t virtual_rows, int64_t rows, int64_t items,
                      float* __restrict best, bool first) {
    for (int64_t i = 0; i < items; ++i) {
        const float* __restrict hi = dots + i * virtual_rows;
        const float* __restrict mid = hi + rows;
        const float* __restrict lo = mid + rows;
        float* __restrict running = best + i * rows;
        for (int64_t r = 0; r < rows; ++r) {
            const float dot = Splits == 3 ? hi[r] + mid[r] + lo[r] : hi[r] + mid[r];
            running[r] = first ? dot : std::max(running[r], dot);
        }
    }
}

#ifdef METAEMBED_AMX_BUILD
// ----------------------------------------------------------------------------------------------------------- AMX
#define METAEMBED_AMX __attribute__((target("amx-tile,amx-bf16,avx512f")))

struct alignas(64) TileConfig {
    uint8_t palette = 1;
    uint8_t start_row = 0;
    uint8_t reserved[14] = {};
    uint16_t bytes_per_row[16] = {};
    uint8_t rows[16] = {};
};

METAEMBED_AMX void configure_tiles() {
    TileConfig config;
    for (int t = 0; t < 8; ++t) {
        config.rows[t] = kTileRows;
        config.bytes_per_row[t] = kTileDims * 2;
    }
    // GCC 12 does not treat ldtilecfg as reading the struct and drops the stores above without this barrier.
    __asm__ volatile("" : : "r"(&config) : "memory");
    _tile_loadconfig(&config);
}

METAEMBED_AMX void release_tiles() { _tile_release(); }

// The B operand: "virtual rows", each query row's bf16 parts as rows (v = part * rows + row; 3 parts, or 2), 16 per
// tile, packed per row block as [D / 32][16 pairs of dimensions][16 virtual rows][2] bf16: 1 KB per 32 dimensions.
// Parts of one row are separate columns of the product (no tile accumulates twice per step, so the tile unit's
// latency never waits on itself); they are added when the tier is folded into the running max.

// One tier of one item block, 48 items (3 A tiles) x 16 virtual rows (1 B tile); C stored as [48][16] float32.
// a: item 0's first value; a_stride: bytes between items; q: one packed row block;
// next (or nullptr): the 48 rows (next_stride bytes apart) to prefetch into L2 meanwhile, a line per row per step.
METAEMBED_AMX void amx_tier_48x16(const char* a, int64_t a_stride, const char* q, int64_t k_steps, float* c,
                                  const char* next, int64_t next_stride) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    for (int64_t k = 0; k < k_steps; ++k) {
        const char* ak = a + 64 * k;
        if (next != nullptr) {
            if (next_stride == 64 * k_steps) {  // contiguous rows: in address order, which the L2 streamer follows
                const char* line = next + 64 * 48 * k;
                for (int64_t m = 0; m < 48; ++m) _mm_prefetch(line + 64 * m, _MM_HINT_T1);
            } else {
                for (int64_t m = 0; m < 48; ++m) _mm_prefetch(next + m * next_stride + 64 * k, _MM_HINT_T1);
            }
        }
        _tile_loadd(7, q + kTileBytes * k, 64);
        _tile_loadd(4, ak, a_stride);
        _tile_dpbf16ps(0, 4, 7);
        _tile_loadd(5, ak + 16 * a_stride, a_stride);
        _tile_dpbf16ps(1, 5, 7);
        _tile_loadd(6, ak + 32 * a_stride, a_stride);
        _tile_dpbf16ps(2, 6, 7);
    }
    _tile_stored(0, c, 64);
    _tile_stored(1, c + 16 * 16, 64);
    _tile_stored(2, c + 32 * 16, 64);
}

// One tier of one item block, 32 items (2 A tiles) x 32 virtual rows (2 B tiles: q0, q1); C stored as [32][c_stride]
// float32 (c_stride >= 32 floats); next: as above, rows next_first, next_first + next_step, ... of 32 (the groups of
// virtual rows of one tier share the prefetching of the next).
METAEMBED_AMX void amx_tier_32x32(const char* a, int64_t a_stride, const char* q0, const char* q1, int64_t k_steps,
                                  float* c, int64_t c_stride, const char* next, int64_t next_stride,
                                  int64_t next_first, int64_t next_step) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    // Tiles are not renamed: a load into a tile waits for the product reading it. So each operand is reloaded for
    // step k + 1 as soon as its last product of step k is issued, and a product's operands were loaded a product or
    // more before it.
    _tile_loadd(4, a, a_stride);
    _tile_loadd(6, q0, 64);
    _tile_loadd(7, q1, 64);
    _tile_loadd(5, a + 16 * a_stride, a_stride);
    for (int64_t k = 0; k < k_steps; ++k) {
        if (next != nullptr) {
            for (int64_t m = next_first; m < 32; m += next_step) {
                _mm_prefetch(next + m * next_stride + 64 * k, _MM_HINT_T1);
            }
        }
        const bool more = k + 1 < k_steps;
        const char* an = a + 64 * (k + 1);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        if (more) _tile_loadd(4, an, a_stride);
        _tile_dpbf16ps(2, 5, 6);
        if (more) _tile_loadd(6, q0 + kTileBytes * (k + 1), 64);
        _tile_dpbf16ps(3, 5, 7);
        if (more) {
            _tile_loadd(7, q1 + kTileBytes * (k + 1), 64);
            _tile_loadd(5, an + 16 * a_stride, a_stride);
        }
    }
    const int64_t bytes = c_stride * 4;
    _tile_stored(0, c, bytes);
    _tile_stored(1, c + 16, bytes);
    _tile_stored(2, c + 16 * c_stride, bytes);
    _tile_stored(3, c + 16 * c_stride + 16, bytes);
}

// One tier of one block of items multiplied by every row block of the packed queries and folded into the running
// max: the 48 x 16 step where the parts fill one row block, else the 32 x 32 step per pair of row blocks. The scan
// (top_amx_parts) and the re-score (amx_candidate_scores) both run this, so a pair's score is the same float32 value
// in both. next / next_stride: rows to prefetch meanwhile (nullptr: none).
METAEMBED_AMX void multiply_tier(const char* a, int64_t a_stride, const char* parts, int64_t row_blocks,
                                 int64_t splits, int64_t k_steps, int64_t rows, int64_t items, float* dots,
                                 float* best, bool first, const char* next, int64_t next_stride) {
    const int64_t virtual_rows = row_blocks * kTileRows, block_bytes = k_steps * kTileBytes;
    if (row_blocks == 1) {
        amx_tier_48x16(a, a_stride, parts, k_steps, dots, next, next_stride);
    } else {
        const int64_t groups = virtual_rows / 32;
        for (int64_t g = 0; g < groups; ++g) {
            const char* q0 = parts + 2 * g * block_bytes;
            amx_tier_32x32(a, a_stride, q0, q0 + block_bytes, k_steps, dots + g * 32, virtual_rows, next,
                           next_stride, g, groups);
        }
    }
    if (splits == 2) {
        fold_tier<2>(dots, virtual_rows, rows, items, best, first);
    } else {
        fold_tier<3>(dots, virtual_rows, rows, items, best, first);
    }
}
#endif  // METAEMBED_AMX_BUILD

#ifdef METAEMBED_X86

// ---------------------------------------------------------------------------------------------------------- AVX2
#define METAEMBED_AVX2 __attribute__((target("avx2,fma")))

METAEMBED_AVX2 inline float horizontal_sum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// Dot products of CB candidate vectors (bf16) with RB query rows (float32, permuted to the unpack order):
// out[c * RB + r] = <cand[c], q_r>. The unpacks read the candidates from memory (each 32 bytes twice, from L1), so
// the registers hold CB x RB accumulators (low and high halves apart when there are few, for more independent FMA
// chains), CB widened halves and one query vector. next (or nullptr): CB vectors (stride apart) to prefetch.
template <int CB, int RB>
METAEMBED_AVX2 void avx2_dots(const uint16_t* const* cand, const float* q, int64_t dim, float* out,
                              const uint16_t* next, int64_t stride) {
    constexpr bool apart = CB * RB <= 4;
    __m256 acc[CB][RB], high_acc[CB][RB];
    for (int c = 0; c < CB; ++c) {
        for (int r = 0; r < RB; ++r) acc[c][r] = high_acc[c][r] = _mm256_setzero_ps();
    }
    const __m256i zero = _mm256_setzero_si256();
    for (int64_t d = 0; d < dim; d += 16) {
        if (next != nullptr && d % 32 == 0) {
            for (int c = 0; c < CB; ++c) {
                _mm_prefetch(reinterpret_cast<const char*>(next + c * stride + d), _MM_HINT_T1);
            }
        }
        __m256 half[CB];
        for (int c = 0; c < CB; ++c) {
            const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cand[c] + d));
            half[c] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, raw));
        }
        for (int r = 0; r < RB; ++r) {
            const __m256 q_low = _mm256_loadu_ps(q + r * dim + d);
            for (int c = 0; c < CB; ++c) acc[c][r] = _mm256_fmadd_ps(half[c], q_low, acc[c][r]);
        }
        for (int c = 0; c < CB; ++c) {
            const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cand[c] + d));
            half[c] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, raw));
        }
        for (int r = 0; r < RB; ++r) {
            const __m256 q_high = _mm256_loadu_ps(q + r * dim + d + 8);
            for (int c = 0; c < CB; ++c) {
                if (apart) {
                    high_acc[c][r] = _mm256_fmadd_ps(half[c], q_high, high_acc[c][r]);
                } else {
                    acc[c][r] = _mm256_fmadd_ps(half[c], q_high, acc[c][r]);
                }
            }
        }
    }
    for (int c = 0; c < CB; ++c) {
        for (int r = 0; r < RB; ++r) out[c * RB + r] = horizontal_sum(_mm256_add_ps(acc[c][r], high_acc[c][r]));
    }
}


// ------------------------------------------------------------------------------------------- AVX2 widened + BLAS
// bf16 -> float32 is a 16-bit left shift: 16 values per step, in registers, into a buffer that stays in L2.
METAEMBED_AVX2 void widen_bf16(const uint16_t* src, float* dst, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
        const __m256i lo = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(raw)), 16);
        const __m256i hi = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(raw, 1)), 16);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), lo);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i + 8), hi);
    }
    for (; i < n; ++i) {
        const uint32_t bits = static_cast<uint32_t>(src[i]) << 16;
        std::memcpy(dst + i, &bits, 4);
    }
}

#endif  // METAEMBED_X86

void check_inputs(const torch::Tensor& vectors, int64_t r_c, int64_t count, int64_t k) {
    TORCH_CHECK(vectors.device().is_cpu() && vectors.scalar_type() == torch::kBFloat16 && vectors.dim() == 3,
                "vectors must be a CPU bf16 tensor [R, N, D]");
    TORCH_CHECK(vectors.stride(2) == 1, "vectors must have contiguous rows");
    TORCH_CHECK(1 <= r_c && r_c <= vectors.size(0), "r_c out of range");
    TORCH_CHECK(1 <= count && count <= vectors.size(1), "count out of range");
    TORCH_CHECK(1 <= k && k <= count, "k must be in 1..count");
}


// The float32 GEMM of the widened path: MKL's entry points where torch's BLAS is MKL (looked up at run time in the
// process, so that nothing is linked here), else ATen's mm on the same buffers.
using SgemmFn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                         const int*, const float*, const int*, const float*, float*, const int*);
using PackSizeFn = size_t (*)(int, int, int, int);
using PackFn = void (*)(int, int, int, int, int, int, float, const float*, int, float*);
using ComputeFn = void (*)(int, int, int, int, int, int, const float*, int, const float*, int, float, float*, int);
using ThreadsLocalFn = int (*)(int);
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112, kPacked = 151, kBMatrix = 162;

struct Blas {
    SgemmFn sgemm = nullptr;
    PackSizeFn pack_size = nullptr;
    PackFn pack = nullptr;
    ComputeFn compute = nullptr;
    ThreadsLocalFn threads_local = nullptr;
};

const Blas& blas() {
    static const Blas found = [] {
        Blas b;
#ifdef METAEMBED_X86
        b.sgemm = reinterpret_cast<SgemmFn>(dlsym(RTLD_DEFAULT, "sgemm_"));
        b.pack_size = reinterpret_cast<PackSizeFn>(dlsym(RTLD_DEFAULT, "cblas_sgemm_pack_get_size"));
        b.pack = reinterpret_cast<PackFn>(dlsym(RTLD_DEFAULT, "cblas_sgemm_pack"));
        b.compute = reinterpret_cast<ComputeFn>(dlsym(RTLD_DEFAULT, "cblas_sgemm_compute"));
        b.threads_local = reinterpret_cast<ThreadsLocalFn>(dlsym(RTLD_DEFAULT, "MKL_Set_Num_Threads_Local"));
        if (b.pack_size == nullptr || b.pack == nullptr || b.compute == nullptr) b.pack_size = nullptr;
#endif
        return b;
    }();
    return found;
}

// Column-major C[m x n] = op(A) op(B) (as BLAS has it), through sgemm_ or, without it, ATen's mm.
void gemm_column_major(const Blas& found, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float* a,
                       int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc) {
    if (found.sgemm != nullptr) {
        const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
        const int mi = m, ni = n, ki = k, la = lda, lb = ldb, lc = ldc;
        const float one = 1.0f, zero = 0.0f;
        found.sgemm(&ta, &tb, &mi, &ni, &ki, &one, a, &la, b, &lb, &zero, c, &lc);
        return;
    }
    // Row-major view: C^T[n x m] = op(B)^T op(A)^T.
    auto opt = torch::TensorOptions().dtype(torch::kFloat32);
    auto bt = trans_b ? torch::from_blob(const_cast<float*>(b), {n, k}, {1, ldb}, opt)
                      : torch::from_blob(const_cast<float*>(b), {n, k}, {ldb, 1}, opt);
    auto at_ = trans_a ? torch::from_blob(const_cast<float*>(a), {k, m}, {1, lda}, opt)
                       : torch::from_blob(const_cast<float*>(a), {k, m}, {lda, 1}, opt);
    auto ct = torch::from_blob(c, {n, m}, {ldc, 1}, opt);
    at::mm_out(ct, bt, at_);
}

using Entry = std::pair<float, int64_t>;  // (score, item)

// The one order of every top-k here: higher score first, and among equal scores the lower item. (A thread offers its
// items in increasing order, so a score equal to its list's bar comes from a later item: it is rejected rightly.)
struct Better {
    bool operator()(const Entry& a, const Entry& b) const {
        return a.first > b.first || (a.first == b.first && a.second < b.second);
    }
};

// An item's score for one query: its r_q rows' maxima summed in order (the scan and the re-score sum alike).
inline float row_sum(const float* rows, int64_t r_q) {
    float total = 0.0f;
    for (int64_t r = 0; r < r_q; ++r) total += rows[r];
    return total;
}

// The running top-k of every query within one thread's share of the items: scores are appended while they beat the
// k-th best kept so far; when the buffer is full it is cut back to its best k (nth_element), raising the bar.
#ifdef METAEMBED_X86
#define METAEMBED_VECTORISED __attribute__((target("avx2,fma")))  // called only by kernels that need AVX2
#else
#define METAEMBED_VECTORISED
#endif

class RunningTop {
   public:
    RunningTop(int64_t num_queries, int64_t k)
        : k_(k), capacity_(std::max<int64_t>(2 * k, k + 64)), lists_(num_queries),
          bars_(num_queries, -std::numeric_limits<float>::infinity()), totals_(num_queries) {
        for (auto& list : lists_) list.reserve(capacity_);
    }

    // out[i, q] = sum over the r_q rows of query q of best[i][row]: item first + i's scores, offered to the lists.
    // A list takes every score until it first fills (its bar is -inf), then only scores above its k-th best.
    METAEMBED_VECTORISED void offer(const float* best, int64_t row_stride, int64_t items, int64_t r_q,
                                    int64_t first) {
        const int64_t num_queries = static_cast<int64_t>(lists_.size());
        const float* bars = bars_.data();
        float* sums = totals_.data();
        for (int64_t i = 0; i < items; ++i) {
            const float* row = best + i * row_stride;
            const float* totals = row;
            if (r_q > 1) {
                for (int64_t q = 0; q < num_queries; ++q) sums[q] = row_sum(row + q * r_q, r_q);
                totals = sums;
            }
            // The usual case once the bars have risen: nothing to insert. A count of the scores above their bars
            // (not an early exit) lets the compiler test 8 queries per instruction.
            int above = 0;
            for (int64_t q = 0; q < num_queries; ++q) above += totals[q] > bars[q];
            if (above == 0) continue;
            for (int64_t q = 0; q < num_queries; ++q) {
                if (totals[q] > bars_[q]) {
                    auto& list = lists_[q];
                    list.emplace_back(totals[q], first + i);
                    if (static_cast<int64_t>(list.size()) == capacity_) cut(list, bars_[q]);
                }
            }
        }
    }

    void cut(std::vector<Entry>& list, float& bar) const {
        std::nth_element(list.begin(), list.begin() + (k_ - 1), list.end(), Better());
        list.resize(k_);
        bar = list.back().first;
    }

    std::vector<std::vector<Entry>>& lists() { return lists_; }

   private:
    int64_t k_, capacity_;
    std::vector<std::vector<Entry>> lists_;
    std::vector<float> bars_, totals_;
};

// Every thread's lists merged: (scores [Q, k] float32 descending, positions [Q, k] int64).
std::vector<torch::Tensor> merge(std::vector<std::vector<Entry>>& lists, int64_t num_queries, int64_t k) {
    auto scores = torch::empty({num_queries, k}, torch::kFloat32);
    auto positions = torch::empty({num_queries, k}, torch::kInt64);
    float* s = scores.data_ptr<float>();
    int64_t* p = positions.data_ptr<int64_t>();
    for (int64_t q = 0; q < num_queries; ++q) {
        std::vector<Entry> all;
        for (size_t t = q; t < lists.size(); t += num_queries) all.insert(all.end(), lists[t].begin(), lists[t].end());
        TORCH_CHECK(static_cast<int64_t>(all.size()) >= k,
                    "fewer than k finite scores: the index or the queries hold NaN or inf");
        std::partial_sort(all.begin(), all.begin() + k, all.end(), Better());
        for (int64_t i = 0; i < k; ++i) {
            s[q * k + i] = all[i].first;
            p[q * k + i] = all[i].second;
        }
    }
    return {scores, positions};
}

// Runs block(b, first, last_block_of_this_thread, best, top) over item blocks in parallel; collects the lists.
template <class Block>
std::vector<torch::Tensor> run_blocks(int64_t blocks, int64_t num_queries, int64_t k, const Block& block) {
    std::mutex mutex;
    std::vector<std::vector<Entry>> lists;  // thread-major: lists[t * Q + q]
    at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
        RunningTop top(num_queries, k);
        block(first, last, top);
        std::lock_guard<std::mutex> guard(mutex);
        for (auto& list : top.lists()) lists.push_back(std::move(list));
    });
    return merge(lists, num_queries, k);
}

}  // namespace

// [avx2 + fma usable, amx-bf16 usable (permission granted)]: what this CPU and operating system let the kernels use.
std::vector<bool> cpu_features() {
#if defined(METAEMBED_AMX_BUILD)
    return {has_avx2_fma(), enable_amx()};
#elif defined(METAEMBED_X86)
    return {has_avx2_fma(), false};
#else
    return {false, false};
#endif
}

// True when every value is finite: the kernels' top-k lists assume finite scores (the caller falls back otherwise).
bool all_finite(const torch::Tensor& values) {
    TORCH_CHECK(values.scalar_type() == torch::kFloat32 && values.is_contiguous(),
                "values must be float32, contiguous");
    const float* v = values.data_ptr<float>();
    bool finite = true;
    for (int64_t i = 0; i < values.numel(); ++i) finite &= std::isfinite(v[i]);
    return finite;
}

void check_query_rows(const torch::Tensor& query_rows, int64_t divisor) {
    TORCH_CHECK(query_rows.device().is_cpu() && query_rows.scalar_type() == torch::kFloat32 &&
                    query_rows.is_contiguous() && query_rows.dim() == 2,
                "query rows must be a contiguous float32 CPU tensor [rows, D]");
    TORCH_CHECK(query_rows.size(1) % divisor == 0, "query rows: D must be a multiple of ", divisor);
}

// B tile blocks for `rows` query rows split into `splits` parts: 16 virtual rows each, an even number beyond one.
int64_t part_blocks(int64_t rows, int64_t splits) {
    const int64_t blocks = (splits * rows + kTileRows - 1) / kTileRows;
    return blocks > 1 ? blocks + blocks % 2 : blocks;
}

// bf16 rounding to nearest even, as c10::BFloat16 rounds finite values (the queries are checked finite), without
// its branch for NaN: a loop of these compiles to vector code.
inline uint16_t bf16_bits(float value) {
    uint32_t bits;
    std::memcpy(&bits, &value, 4);
    return static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

inline float bf16_value(uint16_t half) {
    const uint32_t bits = static_cast<uint32_t>(half) << 16;
    float value;
    std::memcpy(&value, &bits, 4);
    return value;
}

// The parts of one row's values, part after part: split[p * D + d] (a loop the compiler vectorises).
template <int Splits>
void split_row(const float* __restrict row, int64_t dim, uint16_t* __restrict split) {
    for (int64_t d = 0; d < dim; ++d) {
        float rest = row[d];
        for (int p = 0; p < Splits; ++p) {
            const uint16_t part = bf16_bits(rest);
            split[p * dim + d] = part;
            rest -= bf16_value(part);
        }
    }
}

// q: [rows, D] float32, finite; out: part_blocks(rows, splits) * D / 32 tiles of 16 x 32 bf16, zeroed by the caller.
// Virtual row v = p * rows + r is column n = v % 16 of block v / 16; its dimensions 2i and 2i + 1 (pair i % 16 of
// tile step i / 16) sit side by side at (block * D / 32 + i / 16) * 512 + (i % 16) * 32 + 2n, which is
// block * 16 D + 32 i + 2n.
void pack_query_parts(const float* q, int64_t rows, int64_t dim, int64_t splits, uint16_t* out) {
    std::vector<uint16_t> split(splits * dim);
    for (int64_t r = 0; r < rows; ++r) {
        if (splits == 2) {
            split_row<2>(q + r * dim, dim, split.data());
        } else {
            split_row<3>(q + r * dim, dim, split.data());
        }
        for (int64_t p = 0; p < splits; ++p) {
            const int64_t v = p * rows + r;
            uint16_t* column = out + (v / kTileRows) * kTileRows * dim + 2 * (v % kTileRows);
            const uint16_t* values = split.data() + p * dim;
            for (int64_t i = 0; i < dim / 2; ++i) std::memcpy(column + 32 * i, values + 2 * i, 4);
        }
    }
}

// The B tiles of top_amx from float32 query rows [rows, D]. Each value is split into bf16 parts, hi = bf16(q),
// mid = bf16(q - hi) and (splits = 3) lo = bf16(q - hi - mid) (each rounded to nearest even, as torch rounds; each
// subtraction is exact), which become the "virtual rows" part * rows + row; each tile holds 16 virtual rows x 32
// dimensions, pairs of consecutive dimensions side by side (the VNNI layout): [row blocks, D / 32, 16 pairs, 16 rows
// x 2] bf16, zero rows padding to whole blocks (and, beyond one, an even number of them). Two parts leave out lo:
// q - hi - mid, under 2^-16 |q|.
torch::Tensor amx_query_parts(const torch::Tensor& query_rows, int64_t splits) {
    check_query_rows(query_rows, kTileDims);
    TORCH_CHECK(splits == 2 || splits == kMaxSplits, "splits must be 2 or 3");
    TORCH_CHECK(all_finite(query_rows), "query rows must be finite");
    const int64_t rows = query_rows.size(0), dim = query_rows.size(1);
    auto parts = torch::zeros({part_blocks(rows, splits), dim / kTileDims, kTileRows, kTileDims}, torch::kBFloat16);
    pack_query_parts(query_rows.data_ptr<float>(), rows, dim, splits, reinterpret_cast<uint16_t*>(parts.data_ptr()));
    return parts;
}

// [Q] float64: a bound on |two-part score - three-part score| of each query ([Q, r_q, D] float32, finite) against
// any item whose vectors' L2 norms are at most max_norm.
// Per row and tier, the two-part dot product is the three-part one without its lo term: the float32 sum
// hi + mid + lo is (hi + mid) + lo (fold_tier), and the tile unit accumulates each part in its own column, so
// hi + mid is the same float32 value in both. They differ by |<lo, c>|, at most |lo| |c| with |lo| (bf16 of
// q - hi - mid) at most |q - hi - mid| (1 + 2^-8); plus the rounding of that addition and of the sum over rows
// (2^-24 each, relative to at most |q| |c|). A max over tiers moves by at most the largest difference. The factor
// (1 + 2^-6) covers the float32 accumulation of <lo, c> and of the norms, here and in max_norm (relative error at
// most D * 2^-24 each, for D up to 2^16).
torch::Tensor amx_two_part_bounds(const torch::Tensor& queries, double max_norm) {
    TORCH_CHECK(queries.dim() == 3, "queries must be [Q, r_q, D]");
    const auto rows = queries.view({-1, queries.size(2)});
    check_query_rows(rows, 1);
    const int64_t num_queries = queries.size(0), r_q = queries.size(1), dim = queries.size(2);
    auto bounds = torch::empty({num_queries}, torch::kFloat64);
    const float* q = rows.data_ptr<float>();
    double* out = bounds.data_ptr<double>();
    for (int64_t i = 0; i < num_queries; ++i) {
        double total = 0.0;
        for (int64_t r = 0; r < r_q; ++r) {
            const float* row = q + (i * r_q + r) * dim;
            double left = 0.0, whole = 0.0;  // in float64: no square of a small value underflows
#pragma omp simd reduction(+ : left, whole)
            for (int64_t d = 0; d < dim; ++d) {
                float rest = row[d];
                for (int p = 0; p < 2; ++p) rest -= bf16_value(bf16_bits(rest));  // q - hi - mid, exact
                left += static_cast<double>(rest) * rest;
                whole += static_cast<double>(row[d]) * row[d];
            }
            total += std::sqrt(left) * (1 + 0x1p-8) + (2 * r_q + 1) * 0x1p-24 * std::sqrt(whole);
        }
        // Absolute terms for values below float32's normal range: lo rounded to a bf16 subnormal (2^-134 per value),
        // and the tile unit flushing subnormal sums to zero (2^-126 per accumulation, D / 2 per dot product).
        const double tiny = std::sqrt(static_cast<double>(dim)) * 0x1p-134 * max_norm + dim * 0x1p-126;
        out[i] = (1 + 0x1p-6) * max_norm * total + (2 * r_q + 1) * tiny;
    }
    return bounds;
}

// The query rows of top_avx2 from float32 rows [rows, D]: zero rows pad to a multiple of `group`, and within every 16
// dimensions the values go in the order the kernel's unpacks widen the candidates (0-3, 8-11, then 4-7, 12-15).
torch::Tensor avx2_query_rows(const torch::Tensor& query_rows, int64_t group) {
    check_query_rows(query_rows, 16);
    TORCH_CHECK(group >= 1, "group must be positive");
    static constexpr int64_t kOrder[16] = {0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15};
    const int64_t rows = query_rows.size(0), dim = query_rows.size(1);
    auto permuted = torch::zeros({(rows + group - 1) / group * group, dim}, torch::kFloat32);
    const float* q = query_rows.data_ptr<float>();
    float* out = permuted.data_ptr<float>();
    for (int64_t r = 0; r < rows; ++r) {
        for (int64_t d = 0; d < dim; d += 16) {
            for (int64_t j = 0; j < 16; ++j) out[r * dim + d + j] = q[r * dim + d + kOrder[j]];
        }
    }
    return permuted;
}

// Top-k of Q queries by MaxSim over items 0..count of `vectors` at budget (r_q, r_c), with AMX.
// query_parts: [row_blocks, D / 32, 16, 32] bf16: the packed virtual rows (part * Q * r_q + row: the hi, mid and
// (splits = 3) lo parts of every row; zero beyond splits * Q * r_q; an even number of row blocks when more than one).
// Returns (scores [Q, k], positions [Q, k]).
std::vector<torch::Tensor> top_amx_parts(const torch::Tensor& vectors, int64_t r_c, int64_t count,
                                         const torch::Tensor& query_parts, int64_t splits, int64_t num_queries,
                                         int64_t r_q, int64_t k) {
    check_inputs(vectors, r_c, count, k);
#ifdef METAEMBED_AMX_BUILD
    const int64_t dim = vectors.size(2), k_steps = dim / kTileDims, row_blocks = query_parts.size(0);
    const int64_t rows = num_queries * r_q;
    TORCH_CHECK(dim % kTileDims == 0, "the AMX kernel needs D a multiple of 32");
    TORCH_CHECK(query_parts.scalar_type() == torch::kBFloat16 && query_parts.is_contiguous() &&
                    query_parts.dim() == 4 && query_parts.size(1) == k_steps && query_parts.size(2) == kTileRows &&
                    query_parts.size(3) == kTileDims && row_blocks * kTileRows >= splits * rows &&
                    (row_blocks == 1 || row_blocks % 2 == 0),
                "query_parts has the wrong shape");
    const bool narrow = row_blocks == 1;  // 48 items x 16 virtual rows per tile product, else 32 x 32
    const int64_t block_items = narrow ? 48 : 32;
    const int64_t virtual_rows = row_blocks * kTileRows, blocks = (count + block_items - 1) / block_items;
    const int64_t item_stride = vectors.stride(1) * 2, tier_stride = vectors.stride(0) * 2;  // bytes
    const char* base = reinterpret_cast<const char*>(vectors.data_ptr());
    const char* parts = reinterpret_cast<const char*>(query_parts.data_ptr());
    // The rows of (block b, tier j), or nullptr for a partial block (copied, zero-padded, by the caller).
    auto rows_of = [&](int64_t b, int64_t j) -> const char* {
        if (b * block_items + block_items > count) return nullptr;
        return base + j * tier_stride + b * block_items * item_stride;
    };
    return run_blocks(blocks, num_queries, k, [&](int64_t first, int64_t last, RunningTop& top) {
        configure_tiles();
        // dots: one tier's products [items][virtual rows]; best: the running max over tiers [items][rows].
        std::vector<float> dots(block_items * virtual_rows), best(block_items * rows);
        std::vector<char> padded;
        for (int64_t b = first; b < last; ++b) {
            const int64_t items = std::min(block_items, count - b * block_items);
            for (int64_t j = 0; j < r_c; ++j) {
                const char* a = rows_of(b, j);
                int64_t a_stride = item_stride;
                if (a == nullptr) {
                    padded.assign(block_items * dim * 2, 0);
                    const char* source = base + j * tier_stride + b * block_items * item_stride;
                    for (int64_t i = 0; i < items; ++i) {
                        std::memcpy(&padded[i * dim * 2], source + i * item_stride, dim * 2);
                    }
                    a = padded.data();
                    a_stride = dim * 2;
                }
                // Prefetched into L2 while this tier is multiplied: the next tier, or the next block's first.
                const char* next = j + 1 < r_c ? rows_of(b, j + 1) : b + 1 < last ? rows_of(b + 1, 0) : nullptr;
                multiply_tier(a, a_stride, parts, row_blocks, splits, k_steps, rows, items, dots.data(), best.data(),
                              j == 0, next, item_stride);
            }
            top.offer(best.data(), rows, items, r_q, b * block_items);
        }
        release_tiles();
    });
#else
    TORCH_CHECK(false, "the AMX kernel is not in this build (x86-64 Linux, GCC 11 or Clang 12, AMX not disabled)");
#endif
}

// The three-part AMX scores of each query against its own candidates: out[q, c] = MaxSim at budget (r_q, r_c) of
// query q ([Q, r_q, D] float32, finite) and item candidates[q, c] ([Q, K] int64), the same float32 value a scan
// of the whole index by top_amx computes for that pair (the same tile products, fold and sum over rows). Each
// block of candidates is copied from its scattered rows into one per-thread buffer, which is the A operand.
torch::Tensor amx_candidate_scores(const torch::Tensor& vectors, int64_t r_c, const torch::Tensor& queries,
                                   const torch::Tensor& candidates) {
    check_inputs(vectors, r_c, vectors.size(1), 1);
    TORCH_CHECK(queries.dim() == 3 && queries.scalar_type() == torch::kFloat32 && queries.is_contiguous() &&
                    queries.size(2) == vectors.size(2),
                "queries must be [Q, r_q, D] float32 contiguous");
    TORCH_CHECK(candidates.dim() == 2 && candidates.scalar_type() == torch::kInt64 && candidates.is_contiguous() &&
                    candidates.size(0) == queries.size(0),
                "candidates must be [Q, K] int64 contiguous");
    const int64_t num_queries = queries.size(0), r_q = queries.size(1), dim = vectors.size(2);
    const int64_t kept = candidates.size(1), count = vectors.size(1);
    TORCH_CHECK(dim % kTileDims == 0, "the AMX kernel needs D a multiple of 32");
    const int64_t* wanted = candidates.data_ptr<int64_t>();
    for (int64_t i = 0; i < num_queries * kept; ++i) {
        TORCH_CHECK(wanted[i] >= 0 && wanted[i] < count, "candidate ", wanted[i], " is not an item of the index");
    }
    auto out = torch::empty({num_queries, kept}, torch::kFloat32);
#ifdef METAEMBED_AMX_BUILD
    const int64_t k_steps = dim / kTileDims, item_stride = vectors.stride(1) * 2, tier_stride = vectors.stride(0) * 2;
    const char* base = reinterpret_cast<const char*>(vectors.data_ptr());
    float* scores = out.data_ptr<float>();
    const float* query_values = queries.data_ptr<float>();
    const int64_t row_blocks = part_blocks(r_q, kMaxSplits), virtual_rows = row_blocks * kTileRows;
    const int64_t block_items = row_blocks == 1 ? 48 : 32, blocks = (kept + block_items - 1) / block_items;
    // Tasks are (query, block of candidates), so that one query's candidates also go over every thread.
    at::parallel_for(0, num_queries * blocks, 1, [&](int64_t begin, int64_t end) {
        configure_tiles();
        std::vector<char> rows(48 * dim * 2);
        std::vector<uint16_t> parts(row_blocks * k_steps * kTileRows * kTileDims);
        std::vector<float> dots(block_items * virtual_rows), best(block_items * r_q);
        const char* packed = reinterpret_cast<const char*>(parts.data());
        int64_t packed_query = -1;  // (padding rows and columns of the tiles: products that are never read)
        for (int64_t task = begin; task < end; ++task) {
            const int64_t q = task / blocks, first = (task % blocks) * block_items;
            if (q != packed_query) {
                pack_query_parts(query_values + q * r_q * dim, r_q, dim, kMaxSplits, parts.data());
                packed_query = q;
            }
            const int64_t items = std::min(block_items, kept - first);
            for (int64_t j = 0; j < r_c; ++j) {
                for (int64_t i = 0; i < items; ++i) {
                    const int64_t item = wanted[q * kept + first + i];
                    std::memcpy(&rows[i * dim * 2], base + j * tier_stride + item * item_stride, dim * 2);
                }
                multiply_tier(rows.data(), dim * 2, packed, row_blocks, kMaxSplits, k_steps, r_q, items, dots.data(),
                              best.data(), j == 0, nullptr, 0);
            }
            for (int64_t i = 0; i < items; ++i) scores[q * kept + first + i] = row_sum(best.data() + i * r_q, r_q);
        }
        release_tiles();
    });
#else
    TORCH_CHECK(false, "the AMX kernel is not in this build (x86-64 Linux, GCC 11 or Clang 12, AMX not disabled)");
#endif
    return out;
}

// Top-k of Q queries by MaxSim over items 0..count of `vectors` at budget (r_q, r_c), with AVX2 + FMA.
// query_rows: [rows, D] float32, rows >= Q * r_q a multiple of `row_group` (1, 2, 3 or 4; zero rows beyond), each
// row's dimensions permuted within every 16 to the unpack order (0-3, 8-11, then 4-7, 12-15). Groups of 1-3 rows
// are multiplied with 3 candidates at a time, groups of 4 with 2.
std::vector<torch::Tensor> top_avx2_rows(const torch::Tensor& vectors, int64_t r_c, int64_t count,
                                         const torch::Tensor& query_rows, int64_t num_queries, int64_t r_q,
                                    int64_t row_group, int64_t k) {
    check_inputs(vectors, r_c, count, k);
#ifdef METAEMBED_X86
    const int64_t dim = vectors.size(2), rows = query_rows.size(0);
    TORCH_CHECK(dim % 16 == 0, "the AVX2 kernel needs D a multiple of 16");
    TORCH_CHECK(1 <= row_group && row_group <= 6 && row_group != 5, "row_group must be 1, 2, 3, 4 or 6");
    TORCH_CHECK(query_rows.scalar_type() == torch::kFloat32 && query_rows.is_contiguous() && query_rows.dim() == 2 &&
                    query_rows.size(1) == dim && rows >= num_queries * r_q && rows % row_group == 0,
                "query_rows has the wrong shape");
    // A block of 2 x (candidates per micro-kernel) items (12 KB of bf16 at D = 1,024 for 6) and one group of query
    // rows (12-16 KB) stay in L1 while the groups pass over the block.
    const int64_t per_call = row_group >= 4 ? 2 : 3, block_items = 2 * per_call;
    const int64_t blocks = (count + block_items - 1) / block_items;
    const int64_t item_stride = vectors.stride(1), tier_stride = vectors.stride(0);  // elements
    const uint16_t* base = reinterpret_cast<const uint16_t*>(vectors.data_ptr());
    const float* queries = query_rows.data_ptr<float>();
    return run_blocks(blocks, num_queries, k, [&](int64_t first, int64_t last, RunningTop& top) {
        std::vector<float> best(block_items * rows);
        float dots[16];
        const uint16_t* cand[3];
        for (int64_t b = first; b < last; ++b) {
            const int64_t items = std::min(block_items, count - b * block_items);
            for (int64_t j = 0; j < r_c; ++j) {
                const uint16_t* tier = base + j * tier_stride + b * block_items * item_stride;
                // Prefetched while this tier is multiplied: the next tier, or the next block's first.
                const uint16_t* next = j + 1 < r_c ? tier + tier_stride
                                       : b + 1 < last ? base + (b + 1) * block_items * item_stride : nullptr;
                for (int64_t g = 0; g < rows; g += row_group) {
                    const float* q = queries + g * dim;
                    for (int64_t i = 0; i < items; i += per_call) {
                        for (int64_t c = 0; c < per_call; ++c) {  // past the last item: repeat it, ignore the result
                            cand[c] = tier + std::min(i + c, items - 1) * item_stride;
                        }
                        const uint16_t* ahead = g == 0 && next != nullptr ? next + i * item_stride : nullptr;
                        switch (row_group) {
                            case 6: avx2_dots<2, 6>(cand, q, dim, dots, ahead, item_stride); break;
                            case 4: avx2_dots<2, 4>(cand, q, dim, dots, ahead, item_stride); break;
                            case 3: avx2_dots<3, 3>(cand, q, dim, dots, ahead, item_stride); break;
                            case 2: avx2_dots<3, 2>(cand, q, dim, dots, ahead, item_stride); break;
                            default: avx2_dots<3, 1>(cand, q, dim, dots, ahead, item_stride); break;
                        }
                        for (int64_t c = 0; c < per_call && i + c < items; ++c) {
                            float* dst = best.data() + (i + c) * rows + g;
                            for (int64_t r = 0; r < row_group; ++r) {
                                const float v = dots[c * row_group + r];
                                dst[r] = j == 0 ? v : std::max(dst[r], v);
                            }
                        }
                    }
                }
            }
            top.offer(best.data(), rows, items, r_q, b * block_items);
        }
    });
#else
    TORCH_CHECK(false, "the AVX2 kernel needs an x86-64 Linux build");
#endif
}

// Top-k of Q queries by MaxSim over items 0..count of `vectors` at budget (r_q, r_c), for many query rows: each
// block of `block_items` items (all r_c tiers: r_c * block_items vectors, sized by the caller to stay in L2) is
// widened to float32 with AVX2 into one per-thread buffer (never a float32 copy of the index) and multiplied by the
// float32 query rows with a float32 GEMM, C[vectors x rows] (MKL's sgemm where torch's BLAS is MKL, the queries
// packed once per call with cblas_sgemm_pack where MKL has it; else ATen's mm); then the max over the tiers, the sum
// over each query's rows and the running top-k, as in top_avx2. Item blocks go over torch's threads, each GEMM on
// one thread. query_rows: [Q * r_q, D] float32 contiguous, dimensions in their natural order.
// library: 0 = MKL where found, 1 = ATen's mm (the fallback, forced for tests).
std::vector<torch::Tensor> top_avx2_gemm(const torch::Tensor& vectors, int64_t r_c, int64_t count,
                                         const torch::Tensor& query_rows, int64_t num_queries, int64_t r_q, int64_t k,
                                         int64_t block_items, int64_t library) {
    check_inputs(vectors, r_c, count, k);
#ifdef METAEMBED_X86
    const int64_t dim = vectors.size(2), rows = num_queries * r_q;
    TORCH_CHECK(dim % 16 == 0, "the AVX2 kernel needs D a multiple of 16");
    TORCH_CHECK(query_rows.scalar_type() == torch::kFloat32 && query_rows.is_contiguous() && query_rows.dim() == 2 &&
                    query_rows.size(0) == rows && query_rows.size(1) == dim,
                "query_rows has the wrong shape");
    TORCH_CHECK(block_items >= 1, "block_items must be positive");
    const int64_t blocks = (count + block_items - 1) / block_items, m = r_c * block_items;
    const int64_t item_stride = vectors.stride(1), tier_stride = vectors.stride(0);  // elements
    const uint16_t* base = reinterpret_cast<const uint16_t*>(vectors.data_ptr());
    const float* queries = query_rows.data_ptr<float>();
    const Blas& found = library == 0 ? blas() : Blas();
    const bool packed = found.pack_size != nullptr;
    std::vector<float> pack;
    if (packed) {  // the queries as MKL's packed B operand of C[m x rows] = W[m x D] Q^T, shared by the threads
        pack.resize(found.pack_size(kBMatrix, m, rows, dim) / 4 + 16);
        found.pack(kRowMajor, kBMatrix, kTrans, m, rows, dim, 1.0f, queries, dim, pack.data());
    }
    return run_blocks(blocks, num_queries, k, [&](int64_t first, int64_t last, RunningTop& top) {
        const int previous = found.threads_local != nullptr ? found.threads_local(1) : 0;
        // widened: [tier][item][D] float32 (zero past the last item); dots: [vector][row]; best: [item][row]
        std::vector<float> widened(m * dim), dots(m * rows), best(block_items * rows);
        for (int64_t b = first; b < last; ++b) {
            const int64_t items = std::min(block_items, count - b * block_items);
            for (int64_t j = 0; j < r_c; ++j) {
                const uint16_t* tier = base + j * tier_stride + b * block_items * item_stride;
                float* out = widened.data() + j * block_items * dim;
                if (item_stride == dim) {
                    widen_bf16(tier, out, items * dim);
                } else {
                    for (int64_t i = 0; i < items; ++i) widen_bf16(tier + i * item_stride, out + i * dim, dim);
                }
                if (items < block_items) std::fill(out + items * dim, out + block_items * dim, 0.0f);
            }
            if (packed) {
                found.compute(kRowMajor, kNoTrans, kPacked, m, rows, dim, widened.data(), dim, pack.data(), dim, 0.0f,
                              dots.data(), rows);
            } else {  // row-major C[m x rows] = column-major C'[rows x m] = Q W^T
                gemm_column_major(found, true, false, rows, m, dim, queries, dim, widened.data(), dim, dots.data(),
                                  rows);
            }
            for (int64_t i = 0; i < items; ++i) {  // best[i][r] = max over tiers j of dots[j * block_items + i][r]
                float* running = best.data() + i * rows;
                std::copy(dots.data() + i * rows, dots.data() + (i + 1) * rows, running);
                for (int64_t j = 1; j < r_c; ++j) {
                    const float* d = dots.data() + (j * block_items + i) * rows;
                    for (int64_t r = 0; r < rows; ++r) running[r] = std::max(running[r], d[r]);
                }
            }
            top.offer(best.data(), rows, items, r_q, b * block_items);
        }
        if (found.threads_local != nullptr) found.threads_local(previous);
    });
#else
    TORCH_CHECK(false, "the AVX2 kernel needs an x86-64 Linux build");
#endif
}

// The entry points: queries [Q, r_q, D] float32 contiguous, as the index holds them; each packs them as its kernel
// takes them. An empty result means a query value is not finite (the caller then scans with torch).
// finite_query_rows: the queries as rows [Q * r_q, D], or an undefined tensor where a value is not finite.
torch::Tensor finite_query_rows(const torch::Tensor& queries) {
    TORCH_CHECK(queries.dim() == 3, "queries must be [Q, r_q, D]");
    return all_finite(queries) ? queries.view({-1, queries.size(2)}) : torch::Tensor();
}

// ------------------------------------------------------------------------------------- two parts, certified
// max_norm: a bound on the L2 norm of every vector of the first r_c tiers, or negative where none is known.
// With one, where two parts per query value need fewer B tile blocks than three (a third fewer tile products and
// loads) and the re-score below costs little next to the scan (16 Q K <= count), the scan runs with two parts,
// certified: it keeps K = k + rescore_extra(k) candidates per query, and every item left out scores at most the K-th
// two-part score plus amx_two_part_bounds with three parts. The K candidates are re-scored with three parts; where
// the k-th best of them beats that bound, their top-k is the three-part top-k, with three-part scores. Else (scores
// within the bound of each other over more than K - k ranks at the k-th place, e.g. an item stored K - k + 1 times
// there) those queries are scanned again together with three parts.
int64_t rescore_extra(int64_t k) { return std::max<int64_t>(8, k / 8); }

bool amx_uses_two_parts(int64_t num_queries, int64_t r_q, int64_t k, int64_t count, double max_norm) {
    const int64_t rows = num_queries * r_q;
    return max_norm >= 0 && std::isfinite(max_norm) && part_blocks(rows, 2) < part_blocks(rows, kMaxSplits) &&
           16 * num_queries * (k + rescore_extra(k)) <= count;
}

// The certificate, on scores alone. Per query: the K candidates of the two-part scan (two_part: their two-part
// scores, descending, the K-th last), their three-part scores (three_part), and the bound on |two-part - three-part|.
// Writes the three-part top-k of the candidates (higher score first, the lower item among equals) to s / p where its
// k-th score beats every item left out (> the K-th two-part score + bound); returns the queries where it does not.
std::vector<int64_t> certify(const float* two_part, const int64_t* candidates, const float* three_part,
                             const double* bound, int64_t num_queries, int64_t kept, int64_t k, float* s, int64_t* p) {
    std::vector<Entry> list(kept);
    std::vector<int64_t> uncertain;
    for (int64_t q = 0; q < num_queries; ++q) {
        for (int64_t c = 0; c < kept; ++c) list[c] = {three_part[q * kept + c], candidates[q * kept + c]};
        std::partial_sort(list.begin(), list.begin() + k, list.end(), Better());
        const double left_out = static_cast<double>(two_part[q * kept + kept - 1]) + bound[q];
        if (!(static_cast<double>(list[k - 1].first) > left_out)) {
            uncertain.push_back(q);
            continue;
        }
        for (int64_t i = 0; i < k; ++i) {
            s[q * k + i] = list[i].first;
            p[q * k + i] = list[i].second;
        }
    }
    return uncertain;
}

// The top-k of a scan whose scores come in two and three bf16 parts per query value, certified where two parts run.
// scan(rows [n * r_q, D], splits, n, k) -> (scores [n, k], positions [n, k]): the scan with `splits` parts;
// rescore(queries [Q, r_q, D], candidates [Q, K]) -> [Q, K]: each pair's three-part score, the same float32 value
// the three-part scan computes for it. The AMX kernel (top_amx) and its portable reference (top_two_part_reference)
// run this same code, so the certificate is tested on every CPU.
template <class Scan, class Rescore>
std::vector<torch::Tensor> top_certified(const torch::Tensor& queries, int64_t count, int64_t k, double max_norm,
                                         const Scan& scan, const Rescore& rescore) {
    const auto rows = finite_query_rows(queries);
    if (!rows.defined()) return {};
    const int64_t num_queries = queries.size(0), r_q = queries.size(1), kept = k + rescore_extra(k);
    if (!amx_uses_two_parts(num_queries, r_q, k, count, max_norm)) return scan(rows, kMaxSplits, num_queries, k);
    const std::vector<torch::Tensor> found = scan(rows, 2, num_queries, kept);
    const auto bounds = amx_two_part_bounds(queries, max_norm);
    const torch::Tensor exact = rescore(queries, found[1]);
    auto scores = torch::empty({num_queries, k}, torch::kFloat32);
    auto positions = torch::empty({num_queries, k}, torch::kInt64);
    float* s = scores.data_ptr<float>();
    int64_t* p = positions.data_ptr<int64_t>();
    const auto uncertain = certify(found[0].data_ptr<float>(), found[1].data_ptr<int64_t>(), exact.data_ptr<float>(),
                                   bounds.data_ptr<double>(), num_queries, kept, k, s, p);
    if (!uncertain.empty()) {  // (kept < count: 16 * kept <= count)
        auto again_rows = torch::empty({static_cast<int64_t>(uncertain.size()) * r_q, rows.size(1)}, torch::kFloat32);
        for (size_t u = 0; u < uncertain.size(); ++u) {
            again_rows.narrow(0, u * r_q, r_q).copy_(rows.narrow(0, uncertain[u] * r_q, r_q));
        }
        const std::vector<torch::Tensor> again = scan(again_rows, kMaxSplits, static_cast<int64_t>(uncertain.size()), k);
        for (size_t u = 0; u < uncertain.size(); ++u) {
            std::memcpy(s + uncertain[u] * k, again[0].data_ptr<float>() + u * k, k * sizeof(float));
            std::memcpy(p + uncertain[u] * k, again[1].data_ptr<int64_t>() + u * k, k * sizeof(int64_t));
        }
    }
    return {scores, positions};
}

std::vector<torch::Tensor> top_amx(const torch::Tensor& vectors, int64_t r_c, int64_t count,
                                   const torch::Tensor& queries, int64_t k, double max_norm) {
    auto scan = [&](const torch::Tensor& rows, int64_t splits, int64_t num_queries, int64_t top) {
        return top_amx_parts(vectors, r_c, count, amx_query_parts(rows, splits), splits, num_queries, rows.size(0) /
                             num_queries, top);
    };
    auto rescore = [&](const torch::Tensor& q, const torch::Tensor& candidates) {
        return amx_candidate_scores(vectors, r_c, q, candidates);
    };
    return top_certified(queries, count, k, max_norm, scan, rescore);
}

// ------------------------------------------------------------------------------- the portable reference scan
// What the AMX kernel computes, on any CPU, for tests of the two-part certificate where there are no tiles: the same
// bf16 parts of each query value, each part's dot product accumulated on its own in float32, folded (fold_tier) and
// summed over rows (RunningTop, row_sum) as the kernel does. Within a part the float32 sum runs in another order than
// the tile unit's, so a score may differ from the kernel's by float32 rounding, but two and three parts relate as
// they do on the tiles: the same hi and mid sums, lo added last. Plain scalar code: for tests, not for speed.

// dots[i * virtual_rows + v] = <parts[v], item i> in float32, d in order, for `items` candidates at cand[i].
void reference_tier_dots(const float* parts, int64_t virtual_rows, const uint16_t* const* cand, int64_t items,
                         int64_t dim, float* dots) {
    std::vector<float> widened(dim);
    for (int64_t i = 0; i < items; ++i) {
        for (int64_t d = 0; d < dim; ++d) widened[d] = bf16_value(cand[i][d]);
        for (int64_t v = 0; v < virtual_rows; ++v) {
            const float* part = parts + v * dim;
            float dot = 0.0f;
            for (int64_t d = 0; d < dim; ++d) dot += part[d] * widened[d];
            dots[i * virtual_rows + v] = dot;
        }
    }
}

// Virtual rows [splits * rows, D] float32 (v = part * rows + row), as pack_query_parts splits them.
std::vector<float> reference_parts(const float* q, int64_t rows, int64_t dim, int64_t splits) {
    std::vector<uint16_t> split(splits * dim);
    std::vector<float> parts(splits * rows * dim);
    for (int64_t r = 0; r < rows; ++r) {
        if (splits == 2) {
            split_row<2>(q + r * dim, dim, split.data());
        } else {
            split_row<3>(q + r * dim, dim, split.data());
        }
        for (int64_t p = 0; p < splits; ++p) {
            for (int64_t d = 0; d < dim; ++d) parts[((p * rows) + r) * dim + d] = bf16_value(split[p * dim + d]);
        }
    }
    return parts;
}

void fold(int64_t splits, const float* dots, int64_t virtual_rows, int64_t rows, int64_t items, float* best,
          bool first) {
    if (splits == 2) {
        fold_tier<2>(dots, virtual_rows, rows, items, best, first);
    } else {
        fold_tier<3>(dots, virtual_rows, rows, items, best, first);
    }
}

std::vector<torch::Tensor> top_reference_parts(const torch::Tensor& vectors, int64_t r_c, int64_t count,
                                               const torch::Tensor& rows, int64_t splits, int64_t num_queries,
                                               int64_t k) {
    check_inputs(vectors, r_c, count, k);
    constexpr int64_t kBlock = 48;
    const int64_t dim = vectors.size(2), query_rows = rows.size(0), r_q = query_rows / num_queries;
    const int64_t virtual_rows = splits * query_rows, blocks = (count + kBlock - 1) / kBlock;
    const auto parts = reference_parts(rows.data_ptr<float>(), query_rows, dim, splits);
    const uint16_t* base = reinterpret_cast<const uint16_t*>(vectors.data_ptr());
    return run_blocks(blocks, num_queries, k, [&](int64_t first, int64_t last, RunningTop& top) {
        std::vector<float> dots(kBlock * virtual_rows), best(kBlock * query_rows);
        const uint16_t* cand[kBlock];
        for (int64_t b = first; b < last; ++b) {
            const int64_t items = std::min(kBlock, count - b * kBlock);
            for (int64_t j = 0; j < r_c; ++j) {
                for (int64_t i = 0; i < items; ++i) {
                    cand[i] = base + j * vectors.stride(0) + (b * kBlock + i) * vectors.stride(1);
                }
                reference_tier_dots(parts.data(), virtual_rows, cand, items, dim, dots.data());
                fold(splits, dots.data(), virtual_rows, query_rows, items, best.data(), j == 0);
            }
            top.offer(best.data(), query_rows, items, r_q, b * kBlock);
        }
    });
}

torch::Tensor reference_candidate_scores(const torch::Tensor& vectors, int64_t r_c, const torch::Tensor& queries,
                                         const torch::Tensor& candidates) {
    const int64_t num_queries = queries.size(0), r_q = queries.size(1), dim = vectors.size(2);
    const int64_t kept = candidates.size(1), virtual_rows = kMaxSplits * r_q;
    auto out = torch::empty({num_queries, kept}, torch::kFloat32);
    const uint16_t* base = reinterpret_cast<const uint16_t*>(vectors.data_ptr());
    const int64_t* wanted = candidates.data_ptr<int64_t>();
    std::vector<float> dots(virtual_rows), best(r_q);
    for (int64_t q = 0; q < num_queries; ++q) {
        const auto parts = reference_parts(queries.data_ptr<float>() + q * r_q * dim, r_q, dim, kMaxSplits);
        for (int64_t c = 0; c < kept; ++c) {
            for (int64_t j = 0; j < r_c; ++j) {
                const uint16_t* cand = base + j * vectors.stride(0) + wanted[q * kept + c] * vectors.stride(1);
                reference_tier_dots(parts.data(), virtual_rows, &cand, 1, dim, dots.data());
                fold(kMaxSplits, dots.data(), virtual_rows, r_q, 1, best.data(), j == 0);
            }
            out.data_ptr<float>()[q * kept + c] = row_sum(best.data(), r_q);
        }
    }
    return out;
}

// top_amx on the portable reference scan: the same parts, the same certificate, no tiles.
std::vector<torch::Tensor> top_two_part_reference(const torch::Tensor& vectors, int64_t r_c, int64_t count,
                                                  const torch::Tensor& queries, int64_t k, double max_norm) {
    TORCH_CHECK(vectors.size(2) == queries.size(2), "queries and vectors differ in D");
    auto scan = [&](const torch::Tensor& rows, int64_t splits, int64_t num_queries, int64_t top) {
        return top_reference_parts(vectors, r_c, count, rows, splits, num_queries, top);
    };
    auto rescore = [&](const torch::Tensor& q, const torch::Tensor& candidates) {
        return reference_candidate_scores(vectors, r_c, q.contiguous(), candidates);
    };
    return top_certified(queries, count, k, max_norm, scan, rescore);
}

// The certificate on given scores ([Q, K] each, two-part descending; bounds [Q] float64): (scores [Q, k], positions
// [Q, k], uncertain [Q] bool); the rows of an uncertain query are left as they were (zero).
std::vector<torch::Tensor> certify_top_k(const torch::Tensor& two_part, const torch::Tensor& candidates,
                                         const torch::Tensor& three_part, const torch::Tensor& bounds, int64_t k) {
    const int64_t num_queries = two_part.size(0), kept = two_part.size(1);
    TORCH_CHECK(two_part.scalar_type() == torch::kFloat32 && three_part.scalar_type() == torch::kFloat32 &&
                    candidates.scalar_type() == torch::kInt64 && bounds.scalar_type() == torch::kFloat64 &&
                    two_part.is_contiguous() && three_part.is_contiguous() && candidates.is_contiguous() &&
                    candidates.sizes() == two_part.sizes() && three_part.sizes() == two_part.sizes() &&
                    bounds.dim() == 1 && bounds.size(0) == num_queries && 1 <= k && k <= kept,
                "certify_top_k: two_part / three_part [Q, K] float32, candidates [Q, K] int64, bounds [Q] float64");
    auto scores = torch::zeros({num_queries, k}, torch::kFloat32);
    auto positions = torch::zeros({num_queries, k}, torch::kInt64);
    auto uncertain = torch::zeros({num_queries}, torch::kBool);
    const auto left = certify(two_part.data_ptr<float>(), candidates.data_ptr<int64_t>(), three_part.data_ptr<float>(),
                              bounds.data_ptr<double>(), num_queries, kept, k, scores.data_ptr<float>(),
                              positions.data_ptr<int64_t>());
    for (const int64_t q : left) uncertain[q] = true;
    return {scores, positions, uncertain};
}

std::vector<torch::Tensor> top_avx2(const torch::Tensor& vectors, int64_t r_c, int64_t count,
                                    const torch::Tensor& queries, int64_t row_group, int64_t k) {
    const auto rows = finite_query_rows(queries);
    if (!rows.defined()) return {};
    return top_avx2_rows(vectors, r_c, count, avx2_query_rows(rows, row_group), queries.size(0), queries.size(1),
                         row_group, k);
}

std::vector<torch::Tensor> top_avx2_widened(const torch::Tensor& vectors, int64_t r_c, int64_t count,
                                            const torch::Tensor& queries, int64_t k, int64_t block_items,
                                            int64_t library) {
    const auto rows = finite_query_rows(queries);
    if (!rows.defined()) return {};
    return top_avx2_gemm(vectors, r_c, count, rows, queries.size(0), queries.size(1), k, block_items, library);
}

// [MKL's sgemm found, its packed GEMM found]: what top_avx2_gemm multiplies with here (else ATen's mm).
std::vector<bool> gemm_library() { return {blas().sgemm != nullptr, blas().pack_size != nullptr}; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("cpu_features", &cpu_features, "[avx2 + fma usable, amx-bf16 usable (permission granted)]");
    m.def("top_amx", &top_amx, "MaxSim top-k with AMX tiles", py::call_guard<py::gil_scoped_release>());
    m.def("top_avx2", &top_avx2, "MaxSim top-k with AVX2 + FMA", py::call_guard<py::gil_scoped_release>());
    m.def("top_avx2_gemm", &top_avx2_widened, "MaxSim top-k: bf16 blocks widened with AVX2, float32 GEMM",
          py::call_guard<py::gil_scoped_release>());
    m.def("amx_candidate_scores", &amx_candidate_scores, "three-part AMX MaxSim of each query and its candidates",
          py::call_guard<py::gil_scoped_release>());
    m.def("amx_query_parts", &amx_query_parts, "top_amx's B tiles from float32 query rows [rows, D]");
    m.def("amx_two_part_bounds", &amx_two_part_bounds, "[Q]: bound on |two-part - three-part score| per query");
    m.def("amx_uses_two_parts", &amx_uses_two_parts, "whether top_amx scans these queries with two parts");
    m.def("top_two_part_reference", &top_two_part_reference,
          "top_amx on a portable scalar scan of the same bf16 parts (tests of the certificate on any CPU)",
          py::call_guard<py::gil_scoped_release>());
    m.def("certify_top_k", &certify_top_k, "the two-part certificate on given scores: (scores, positions, uncertain)");
    m.def("gemm_library", &gemm_library, "[MKL sgemm found, MKL packed GEMM found]");
}
