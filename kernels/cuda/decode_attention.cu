// Paged decode attention for Hopper-class GPUs, compiled at run time (NVRTC through CuPy).
//
// Every warp streams its own work items, (sequence, KV head, context split), through a private
// ring of shared-memory stages filled by cp.async: a stage is one 16-token page of the head's K
// and V (plus the queries with an item's first page). Nothing waits across warps, the ring runs
// on from one item into the next, and the bytes in flight are bounded by shared memory rather
// than registers, which is what lets a few SMs keep HBM busy.
//
// Tensor cores do the math with tokens as the M dimension (16 per MMA) and the GQA group as N
// (8, the group padded): S^T = K Q^T, then O^T = V^T P^T with P^T moved into operand layout by
// movmatrix. Operands come from shared memory by ldmatrix (V transposed by it), whose tiles
// the rows' XOR swizzle keeps free of bank conflicts; an fp8 (e4m3) cache is widened to fp16
// in registers. The softmax maximum moves lazily, so most pages need no reduction across lanes.
//
// Layouts: q [seqs, heads, D] (heads contiguous), caches [blocks, kv_heads, 16, D] with each
// (block, head) page contiguous, block tables int32 [seqs, width], lengths int32 [seqs].
// Output: direct (one split) into out [seqs, heads, D]; otherwise per-split partial outputs and
// base-2 log-sum-exps that a reduce kernel combines (empty splits are never written: the reduce
// ignores splits past a sequence's length).

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;

#define PAGE 16
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ u32 smem_u32(const void* p) {
    u32 r;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
    return r;
}

__device__ __forceinline__ void cp_async16(u32 dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
}

__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;"); }

template <int N>
__device__ __forceinline__ void cp_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// A plain load (not asm), so the compiler may schedule it early but never above a wait.
__device__ __forceinline__ u32 lds32(const unsigned char* smem, u32 off) {
    return *reinterpret_cast<const u32*>(smem + off);
}

template <bool F16>
__device__ __forceinline__ void mma(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    if (F16) {
        asm(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    } else {
        asm(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    }
}

__device__ __forceinline__ u32 transpose8x8(u32 x) {
    u32 y;
    asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(y) : "r"(x));
    return y;
}

// Two floats as one register of 16-bit pairs, ``lo`` in the low half.
template <bool F16>
__device__ __forceinline__ u32 pack2(float lo, float hi) {
    u32 r;
    if (F16) {
        asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    } else {
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    }
    return r;
}

// Two e4m3 values (the low 16 bits of ``x`` when ``high`` is false) as an fp16 pair; the half
// is picked inside the asm, so the conversion reads it in place (no shift).
__device__ __forceinline__ u32 e4m3x2_to_f16x2(u32 x, bool high) {
    u32 r;
    if (high) {
        asm("{ .reg .b16 l, h; mov.b32 {l, h}, %1; cvt.rn.f16x2.e4m3x2 %0, h; }"
            : "=r"(r) : "r"(x));
    } else {
        asm("{ .reg .b16 l, h; mov.b32 {l, h}, %1; cvt.rn.f16x2.e4m3x2 %0, l; }"
            : "=r"(r) : "r"(x));
    }
    return r;
}

__device__ __forceinline__ u32 bf16x2_to_f16x2(u32 x) {
    return pack2<true>(__uint_as_float(x << 16), __uint_as_float(x & 0xffff0000u));
}

__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// XOR swizzle of a row's 16-byte units by the row's low three bits: the eight rows of an
// ldmatrix tile (the same unit of eight consecutive rows) then hit eight distinct bank groups.
__device__ __forceinline__ int swizzle(int row) { return row & 7; }

// Four 8x8 tiles of 16-bit elements; lanes 8 t .. 8 t + 7 give the rows of tile t.
__device__ __forceinline__ void ldsm_x4(u32 addr, u32 (&r)[4]) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

__device__ __forceinline__ void ldsm_x4_trans(u32 addr, u32 (&r)[4]) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// How far (log2) a score may pass the running maximum before the maximum is moved.
#define LAZY_MAX 8.0f

template <int D, int KV_ELT, int GROUP, int PPS>
struct Layout {
    static constexpr int UNITS = D * KV_ELT / 16;       // 16-byte units per K/V row
    static constexpr int PAGE_BYTES = PAGE * D * KV_ELT;  // one head's K (or V) of a page
    static constexpr int Q_BYTES = GROUP * D * 2;
    static constexpr int V_OFFSET = PPS * PAGE_BYTES;     // a stage: PPS pages of K, of V, Q
    static constexpr int Q_OFFSET = 2 * PPS * PAGE_BYTES;
    static constexpr int STAGE_BYTES = Q_OFFSET + ((Q_BYTES + 127) / 128) * 128;
    static constexpr int KSTEPS = D / 16;
};

// Work items are (split, sequence, KV head), numbered split-major so the items with pages
// come first. Warps take them in order from a global counter, so a warp that drew short
// contexts takes more: lengths vary, and a static share would leave the longest share last.
struct Item {
    int seq, head, split;
};

__device__ __forceinline__ Item item_of(int item, int num_kv_heads, int num_seqs) {
    const int pair = item % (num_kv_heads * num_seqs);
    return Item{pair / num_kv_heads, pair % num_kv_heads, item / (num_kv_heads * num_seqs)};
}

template <int D, int KV_ELT, bool Q_F16, int GROUP, int WARPS, int STAGES, int PPS>
__global__ void __launch_bounds__(WARPS * 32, 1) decode_attention_kernel(
    const unsigned char* __restrict__ q, const unsigned char* __restrict__ k_cache,
    const unsigned char* __restrict__ v_cache, const int* __restrict__ tables,
    const int* __restrict__ lens, unsigned char* __restrict__ out, float* __restrict__ part_out,
    float* __restrict__ part_lse, int* __restrict__ counter, float scale_log2, int num_seqs,
    int num_kv_heads, int num_splits, int split_pages, int table_width, long long stride_qb,
    long long stride_kb, long long stride_kh, long long stride_vb, long long stride_vh,
    long long stride_tb, long long stride_ob, long long stride_oh, int direct) {
    using L = Layout<D, KV_ELT, GROUP, PPS>;
    constexpr bool F16 = Q_F16 || KV_ELT == 1;  // the MMA's operand type
    constexpr int QUEUE = STAGES + 1;  // items between the producer and the consumer
    extern __shared__ __align__(1024) unsigned char smem[];

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, qd = lane & 3;
    const int num_heads = num_kv_heads * GROUP;
    // splits past the longest context hold no pages: leave them out (every warp finds the
    // longest itself, so a CUDA graph replays this with whatever lengths the step has)
    int max_len = 0;
    for (int i = lane; i < num_seqs; i += 32) max_len = max(max_len, __ldg(lens + i));
#pragma unroll
    for (int off = 16; off > 0; off >>= 1)
        max_len = max(max_len, __shfl_xor_sync(0xffffffffu, max_len, off));
    const int used_splits =
        max(1, min(num_splits, ((max_len + PAGE - 1) / PAGE + split_pages - 1) / split_pages));
    const int items = used_splits * num_kv_heads * num_seqs;
    const u32 ring = warp * STAGES * L::STAGE_BYTES;  // offsets into smem
    const u32 smem_base = smem_u32(smem);
    int* queue = reinterpret_cast<int*>(smem + WARPS * STAGES * L::STAGE_BYTES) + warp * 2 * QUEUE;

    auto npages_of = [&](int split, int len) {
        int pages = (len + PAGE - 1) / PAGE - split * split_pages;
        return max(0, min(pages, split_pages));
    };
    // block-table entries [first, first + 32) of an item's split, one per lane
    auto load_window = [&](const Item& it, int first) {
        const int col = it.split * split_pages + first + lane;
        return (first + lane < split_pages && col < table_width)
                   ? __ldg(tables + it.seq * stride_tb + col)
                   : 0;
    };
    auto grab = [&]() { return lane == 0 ? atomicAdd(counter, 1) : 0; };

    // ---- the producer: items come through a pipeline of three (drawn, loaded, in use), each
    // step a whole item ahead of the next, so neither the counter nor the lengths and block
    // tables are ever waited for
    int drawn = grab();                       // lane 0: an item number, read one item later
    int n_item = -1, n_len = 0, n_window = 0;  // the next item, its length and first entries
    auto refill = [&]() {
        n_item = __shfl_sync(0xffffffffu, drawn, 0);
        if (n_item < items) {
            const Item it = item_of(n_item, num_kv_heads, num_seqs);
            n_len = __ldg(lens + it.seq);
            n_window = load_window(it, 0);
            drawn = grab();
        } else {
            n_item = -1;
        }
    };
    refill();
    Item p_it{0, 0, 0};
    int p_page = 0, p_npages = 0, p_window = 0, p_next_window = 0, p_base = 0, p_pushed = 0;
    bool p_done = false;
    long long p_k_head = 0, p_v_head = 0;
    const unsigned char* p_q = q;
    int issued = 0;
    // a lane's shared-memory offsets of its 16-byte units of a page: periodic in the copy index
    constexpr int ROWS_PER_COPY = 32 / L::UNITS, PERIOD = L::UNITS / 4;
    u32 dst_off[PERIOD];
#pragma unroll
    for (int k = 0; k < PERIOD; ++k) {
        const int row = k * ROWS_PER_COPY + lane / L::UNITS, unit = lane % L::UNITS;
        dst_off[k] = (u32)((row * L::UNITS + (unit ^ swizzle(row))) * 16);
    }
    auto push = [&](int item, int len) {
        if (lane == 0) {
            queue[2 * (p_pushed % QUEUE)] = item;
            queue[2 * (p_pushed % QUEUE) + 1] = len;
        }
        ++p_pushed;
    };

    auto issue = [&]() {
        while (p_page >= p_npages) {  // move on to the next item with pages
            if (p_done) return;
            if (n_item < 0) {
                p_done = true;
                push(-1, 0);
                return;
            }
            const int item = n_item, len = n_len;
            p_window = n_window;
            refill();
            p_it = item_of(item, num_kv_heads, num_seqs);
            p_npages = npages_of(p_it.split, len);
            p_page = 0;
            p_base = 0;
            if (p_npages == 0) {
                if (len == 0 && p_it.split == 0) {  // a zero-length row: define its output
                    const long long row = (long long)p_it.seq * num_heads + p_it.head * GROUP;
                    if (direct) {
                        for (int x = lane; x < GROUP * D / 8; x += 32) {
                            unsigned char* o =
                                out + (p_it.seq * stride_ob + p_it.head * GROUP * stride_oh) * 2;
                            const int h = x / (D / 8), u = x % (D / 8);
                            reinterpret_cast<uint4*>(o + h * stride_oh * 2)[u] =
                                make_uint4(0, 0, 0, 0);
                        }
                    } else {
                        for (int x = lane; x < GROUP * D / 4; x += 32) {
                            const int h = x / (D / 4), u = x % (D / 4);
                            reinterpret_cast<float4*>(part_out + (row + h) * num_splits * D)[u] =
                                make_float4(0.f, 0.f, 0.f, 0.f);
                        }
                        if (lane < GROUP) part_lse[(row + lane) * num_splits] = NEG_INF;
                    }
                }
                continue;
            }
            push(item, len);
            p_next_window = p_npages > 32 ? load_window(p_it, 32) : 0;
            p_k_head = p_it.head * stride_kh * KV_ELT;
            p_v_head = p_it.head * stride_vh * KV_ELT;
            p_q = q + (p_it.seq * stride_qb + p_it.head * GROUP * D) * 2;
        }
        if (p_page >= p_base + 32) {  // the next 32 block-table entries, and ask for the ones after
            p_base += 32;
            p_window = p_next_window;
            p_next_window = p_npages > p_base + 32 ? load_window(p_it, p_base + 32) : 0;
        }
        const u32 stage = smem_base + ring + (issued % STAGES) * L::STAGE_BYTES;
#pragma unroll
        for (int pp = 0; pp < PPS; ++pp) {
            const long long block = __shfl_sync(0xffffffffu, p_window, p_page + pp - p_base);
            if (p_page + pp >= p_npages) break;
            const unsigned char* k_src = k_cache + block * stride_kb * KV_ELT + p_k_head + lane * 16;
            const unsigned char* v_src = v_cache + block * stride_vb * KV_ELT + p_v_head + lane * 16;
            const u32 k_dst = stage + pp * L::PAGE_BYTES, v_dst = k_dst + L::V_OFFSET;
#pragma unroll
            for (int i = 0; i < L::PAGE_BYTES / 512; ++i) {
                const u32 off = dst_off[i % PERIOD] + (i / PERIOD) * PERIOD * 512;
                cp_async16(k_dst + off, k_src + i * 512);
                cp_async16(v_dst + off, v_src + i * 512);
            }
        }
        if (p_page == 0) {
            for (int x = lane; x < L::Q_BYTES / 16; x += 32)
                cp_async16(stage + L::Q_OFFSET + x * 16, p_q + x * 16);
        }
        p_page += PPS;
        ++issued;
    };

    for (int s = 0; s < STAGES - 1; ++s) {
        issue();
        cp_commit();
    }
    __syncwarp();

    // ---- the consumer: the items the producer queued, in order. Fragments come from shared
    // memory by ldmatrix (four 8x8 tiles a lane-quad row each, straight into MMA operand order);
    // every lane's offsets inside a page are fixed, so they are computed once here.
    u32 qf[L::KSTEPS][2];
    float acc[D / 16][4];
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.f, l1 = 0.f;
    int consumed = 0;
    // K (and an fp8 V): tile t = lane / 8 holds tokens 8 (t & 1) + lane % 8 of unit 2 j + t / 2.
    // The swizzled unit is 2 j ^ (t / 2 ^ row % 8): with pages 256-byte aligned, a lane's
    // address for step j is its address for step 0 with 32 j XORed in.
    static_assert(L::STAGE_BYTES % 256 == 0 && L::PAGE_BYTES % 256 == 0, "pages 256-aligned");
    const int k_row = (lane & 7) + ((lane >> 3) & 1) * 8;
    const u32 k_lane = (u32)((k_row * L::UNITS + ((lane >> 4) ^ swizzle(k_row))) * 16);
    // a 16-bit V, transposed: tile t holds tokens 8 (t / 2) + lane % 8 of unit 2 mt + (t & 1)
    const int v_row = (lane & 7) + (lane >> 4) * 8;
    const u32 v_lane = (u32)((v_row * L::UNITS + (((lane >> 3) & 1) ^ swizzle(v_row))) * 16);

    // The producer runs STAGES - 1 stages ahead, so by the time an item's last stage is
    // consumed it has queued the next item (or the end) at least one stage earlier.
    for (int popped = 0;; ++popped) {
        const int item = queue[2 * (popped % QUEUE)], len = queue[2 * (popped % QUEUE) + 1];
        if (item < 0) break;
        const Item it = item_of(item, num_kv_heads, num_seqs);
        const int seq = it.seq, head = it.head, split = it.split;
        const int npages = npages_of(split, len);
        m0 = m1 = NEG_INF;
        l0 = l1 = 0.f;
#pragma unroll
        for (int mt = 0; mt < D / 16; ++mt) acc[mt][0] = acc[mt][1] = acc[mt][2] = acc[mt][3] = 0.f;

        for (int page = 0; page < npages; page += PPS) {
            issue();
            cp_commit();
            cp_wait<STAGES - 1>();
            __syncwarp();
            const u32 kbase = smem_base + ring + (consumed % STAGES) * L::STAGE_BYTES;
            const u32 vbase = kbase + L::V_OFFSET;
            const int valid_pages = min(PPS, npages - page);
            if (page == 0) {  // this item's queries in B-operand order (dims ordered as K's)
                const u32 qbase = kbase + L::Q_OFFSET - smem_base + g * D * 2;
#pragma unroll
                for (int j = 0; j < L::KSTEPS; ++j) {
                    u32 w0 = 0, w1 = 0;
                    if (g < GROUP) {
                        if (KV_ELT == 2) {  // k 2qd, 2qd + 8 of the step: dims 16 j + 2qd, + 8
                            w0 = lds32(smem, qbase + (16 * j + 2 * qd) * 2);
                            w1 = lds32(smem, qbase + (16 * j + 2 * qd + 8) * 2);
                        } else {  // an fp8 step's k 2qd, 2qd + 8: dims 16 j + 4qd, + 2
                            const uint2 w = *reinterpret_cast<const uint2*>(
                                smem + qbase + (16 * j + 4 * qd) * 2);
                            w0 = w.x;
                            w1 = w.y;
                        }
                        if (F16 && !Q_F16) {
                            w0 = bf16x2_to_f16x2(w0);
                            w1 = bf16x2_to_f16x2(w1);
                        }
                    }
                    qf[j][0] = w0;
                    qf[j][1] = w1;
                }
            }
            // S^T = K Q^T per page: rows are the page's 16 tokens (g and g + 8), columns heads;
            // four accumulators keep the chains of dependent MMAs short
            float s[PPS][4];
#pragma unroll
            for (int pp = 0; pp < PPS; ++pp) {
                float part[4][4] = {};
                const u32 kpage = kbase + pp * L::PAGE_BYTES;
#pragma unroll
                for (int j = 0; j < L::UNITS / 2; ++j) {
                    u32 r[4];
                    ldsm_x4((kpage + k_lane) ^ (32 * j), r);
                    if (KV_ELT == 2) {
                        mma<F16>(part[j % 4], r[0], r[1], r[2], r[3], qf[j][0], qf[j][1]);
                    } else {  // two steps: units 2 j and 2 j + 1, low then high pairs
#pragma unroll
                        for (int h = 0; h < 2; ++h)
                            mma<F16>(part[(2 * j + h) % 4], e4m3x2_to_f16x2(r[2 * h], false),
                                     e4m3x2_to_f16x2(r[2 * h + 1], false),
                                     e4m3x2_to_f16x2(r[2 * h], true),
                                     e4m3x2_to_f16x2(r[2 * h + 1], true), qf[2 * j + h][0],
                                     qf[2 * j + h][1]);
                    }
                }
                const int tok0 = (split * split_pages + page + pp) * PAGE + g;
                const bool ok0 = pp < valid_pages && tok0 < len;
                const bool ok1 = pp < valid_pages && tok0 + 8 < len;
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float v = (part[0][e] + part[1][e]) + (part[2][e] + part[3][e]);
                    s[pp][e] = (e < 2 ? ok0 : ok1) ? v * scale_log2 : NEG_INF;
                }
            }
            // online softmax, per head (columns 2 qd and 2 qd + 1 of this lane). The running
            // maximum moves only when a score passes it by more than LAZY_MAX (then the exact
            // maximum is gathered and everything rescaled); below that the probabilities are
            // taken against the old maximum, at most 2^LAZY_MAX, exact in fp32 and fine in 16 bits
            bool over = false;
#pragma unroll
            for (int pp = 0; pp < PPS; ++pp)
                over |= s[pp][0] > m0 + LAZY_MAX || s[pp][2] > m0 + LAZY_MAX ||
                        s[pp][1] > m1 + LAZY_MAX || s[pp][3] > m1 + LAZY_MAX;
            if (__any_sync(0xffffffffu, over)) {
                float t0 = m0, t1 = m1;
#pragma unroll
                for (int pp = 0; pp < PPS; ++pp) {
                    t0 = fmaxf(t0, fmaxf(s[pp][0], s[pp][2]));
                    t1 = fmaxf(t1, fmaxf(s[pp][1], s[pp][3]));
                }
#pragma unroll
                for (int off = 4; off < 32; off <<= 1) {
                    t0 = fmaxf(t0, __shfl_xor_sync(0xffffffffu, t0, off));
                    t1 = fmaxf(t1, __shfl_xor_sync(0xffffffffu, t1, off));
                }
                const float a0 = fast_exp2(m0 - t0), a1 = fast_exp2(m1 - t1);
                l0 *= a0;
                l1 *= a1;
#pragma unroll
                for (int mt = 0; mt < D / 16; ++mt) {
                    acc[mt][0] *= a0;
                    acc[mt][1] *= a1;
                    acc[mt][2] *= a0;
                    acc[mt][3] *= a1;
                }
                m0 = t0;
                m1 = t1;
            }
#pragma unroll
            for (int pp = 0; pp < PPS; ++pp) {
                if (pp >= valid_pages) break;
                const float p0 = fast_exp2(s[pp][0] - m0), p1 = fast_exp2(s[pp][1] - m1);
                const float p2 = fast_exp2(s[pp][2] - m0), p3 = fast_exp2(s[pp][3] - m1);
                l0 += p0 + p2;
                l1 += p1 + p3;
                const u32 pb0 = transpose8x8(pack2<F16>(p0, p1));  // P^T rows: heads
                const u32 pb1 = transpose8x8(pack2<F16>(p2, p3));
                // O^T += V^T P^T, rows dims: a 16-bit V's tiles come transposed by ldmatrix;
                // an fp8 V's come as pairs of dims (one 16-bit element a token) and are
                // regrouped by token pairs before widening (rows 2 g and 2 g + 1 of unit mt)
                const u32 vpage = vbase + pp * L::PAGE_BYTES;
                if (KV_ELT == 2) {
#pragma unroll
                    for (int mt = 0; mt < D / 16; ++mt) {
                        u32 r[4];
                        ldsm_x4_trans((vpage + v_lane) ^ (32 * mt), r);
                        mma<F16>(acc[mt], r[0], r[1], r[2], r[3], pb0, pb1);
                    }
                } else {
#pragma unroll
                    for (int j = 0; j < L::UNITS / 2; ++j) {
                        u32 r[4];
                        ldsm_x4_trans((vpage + k_lane) ^ (32 * j), r);
#pragma unroll
                        for (int h = 0; h < 2; ++h) {
                            const u32 lo = __byte_perm(r[2 * h], 0, 0x3120);
                            const u32 hi = __byte_perm(r[2 * h + 1], 0, 0x3120);
                            mma<F16>(acc[2 * j + h], e4m3x2_to_f16x2(lo, false),
                                     e4m3x2_to_f16x2(lo, true), e4m3x2_to_f16x2(hi, false),
                                     e4m3x2_to_f16x2(hi, true), pb0, pb1);
                        }
                    }
                }
            }
            __syncwarp();
            ++consumed;
        }
        // the item's result: normalise by the row sums gathered over the quad's lanes
#pragma unroll
        for (int off = 4; off < 32; off <<= 1) {
            l0 += __shfl_xor_sync(0xffffffffu, l0, off);
            l1 += __shfl_xor_sync(0xffffffffu, l1, off);
        }
        const float inv0 = l0 > 0.f ? 1.f / l0 : 0.f, inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
#pragma unroll
        for (int hc = 0; hc < 2; ++hc) {
            const int h = 2 * qd + hc;
            if (h >= GROUP) continue;
            const float inv = hc ? inv1 : inv0;
            const int qhead = head * GROUP + h;
            // a lane's dims of unit mt: 16 mt + g and + 8 (16-bit V), 16 mt + 2 g and + 1 (fp8)
            if (direct) {
                unsigned char* o = out + (seq * stride_ob + qhead * stride_oh) * 2;
#pragma unroll
                for (int mt = 0; mt < D / 16; ++mt) {
                    const u32 pair = pack2<Q_F16>(acc[mt][hc] * inv, acc[mt][hc + 2] * inv);
                    if (KV_ELT == 2) {
                        reinterpret_cast<u16*>(o)[16 * mt + g] = (u16)(pair & 0xffff);
                        reinterpret_cast<u16*>(o)[16 * mt + g + 8] = (u16)(pair >> 16);
                    } else {
                        reinterpret_cast<u32*>(o)[8 * mt + g] = pair;
                    }
                }
            } else {
                const long long part = ((long long)seq * num_heads + qhead) * num_splits + split;
                float* o = part_out + part * D;
#pragma unroll
                for (int mt = 0; mt < D / 16; ++mt) {
                    if (KV_ELT == 2) {
                        o[16 * mt + g] = acc[mt][hc] * inv;
                        o[16 * mt + g + 8] = acc[mt][hc + 2] * inv;
                    } else {
                        reinterpret_cast<float2*>(o)[8 * mt + g] =
                            make_float2(acc[mt][hc] * inv, acc[mt][hc + 2] * inv);
                    }
                }
                if (g == 0) part_lse[part] = (hc ? m1 : m0) + __log2f(hc ? l1 : l0);
            }
        }
    }
    cp_wait<0>();
}

// A streaming read of ``n16`` 16-byte units. Each CTA reads whole tiles of THREADS * UNROLL
// contiguous units, UNROLL independent loads in flight per thread; the XOR of everything read
// is stored per thread so no load can be dropped.
template <int UNROLL, int THREADS, int CTAS_PER_SM>
__global__ void __launch_bounds__(THREADS, CTAS_PER_SM) stream_read_kernel(
    const uint4* __restrict__ src, long long n16, uint4* __restrict__ sink) {
    constexpr long long TILE = (long long)THREADS * UNROLL;
    uint4 x = make_uint4(0, 0, 0, 0);
    const long long tiles = n16 / TILE;
    for (long long t = blockIdx.x; t < tiles; t += gridDim.x) {
        const uint4* base = src + t * TILE + threadIdx.x;
        uint4 v[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) v[u] = __ldcs(base + u * THREADS);
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            x.x ^= v[u].x;
            x.y ^= v[u].y;
            x.z ^= v[u].z;
            x.w ^= v[u].w;
        }
    }
    for (long long i = tiles * TILE + (long long)blockIdx.x * THREADS + threadIdx.x; i < n16;
         i += (long long)gridDim.x * THREADS) {
        const uint4 v = __ldcs(src + i);
        x.x ^= v.x;
        x.y ^= v.y;
        x.z ^= v.z;
        x.w ^= v.w;
    }
    sink[(long long)blockIdx.x * THREADS + threadIdx.x] = x;
}
