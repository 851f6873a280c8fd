/* Fused softmax + CE + Dice statistics and their gradient for many logit maps (CPU, float32).
 *
 * The CPU kernels of lomix_lightning/losses/ce_dice.py (ce_dice_forward / ce_dice_backward): one pass over each
 * map's logits instead of a dozen tensor operations. Plain C99, no Python or torch headers: compiled on first use
 * by lomix_lightning/_engine/_build.py and loaded with ctypes. Loops over pixels are written branch-free so the
 * compiler vectorises them (exp and log are Cephes-style polynomials, within 2 ulp of libm).
 *
 * Layout: logits (R, C, N) row-major, R = b * K rows (image i = r / K, map k = r % K), N pixels per image;
 * target (b, N) int64 class indices; valid (b, N) float mask or NULL.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 256
#define MAX_CLASSES 32
#define MAX_MEMBERS 16
#define SUB 64

static inline float exp_poly(float x) {
    /* exp(x) for x <= 0 (a softmax argument); below -87.3 the result is clamped to about 1e-38. */
    x = x < -87.3f ? -87.3f : x;
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float y = 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return y * scale;
}

static inline float log_poly(float x) {
    /* log(x) for a normal x > 0 (here the softmax denominator, in [1, C]). */
    int32_t ix;
    memcpy(&ix, &x, sizeof ix);
    int32_t e = ((ix >> 23) & 0xff) - 126;
    ix = (ix & 0x007fffff) | 0x3f000000;
    float m;
    memcpy(&m, &ix, sizeof m);
    int32_t small = m < 0.707106781186547524f;
    e -= small;
    m = m + (small ? m : 0.0f) - 1.0f;
    float z = m * m;
    float y = 7.0376836292e-2f;
    y = y * m - 1.1514610310e-1f;
    y = y * m + 1.1676998740e-1f;
    y = y * m - 1.2420140846e-1f;
    y = y * m + 1.4249322787e-1f;
    y = y * m - 1.6668057665e-1f;
    y = y * m + 2.0000714765e-1f;
    y = y * m - 2.4999993993e-1f;
    y = y * m + 3.3333331174e-1f;
    y = y * m * z;
    float fe = (float)e;
    y += -2.12194440e-4f * fe;
    y += -0.5f * z;
    return m + y + 0.693359375f * fe;
}

/* Softmax of one block, unnormalised: e[c][j] = exp(z - max) (stride BLOCK) from z (class stride `stride`), the
 * reciprocal inv[j] of its sum (so p = e * inv, formed where it is used) and, unless lse is NULL,
 * lse[j] = max + log(sum). e may be z itself (stride BLOCK): each element is read before it is written. */
static void softmax_block(const float *z, int64_t stride, int64_t c_count, int64_t width, float *e, float *lse,
                          float *inv) {
    float m[BLOCK], s[BLOCK];
    for (int64_t j = 0; j < width; ++j) m[j] = z[j];
    for (int64_t c = 1; c < c_count; ++c) {
        const float *zc = z + c * stride;
        for (int64_t j = 0; j < width; ++j) m[j] = zc[j] > m[j] ? zc[j] : m[j];
    }
    for (int64_t j = 0; j < width; ++j) s[j] = 0.0f;
    for (int64_t c = 0; c < c_count; ++c) {
        const float *zc = z + c * stride;
        float *ec = e + c * BLOCK;
        for (int64_t j = 0; j < width; ++j) {
            float ev = exp_poly(zc[j] - m[j]);
            ec[j] = ev;
            s[j] += ev;
        }
    }
    for (int64_t j = 0; j < width; ++j) {
        if (lse) lse[j] = m[j] + log_poly(s[j]);
        inv[j] = 1.0f / s[j];
    }
}

enum { OP_IDENTITY = 0, OP_ADD = 1, OP_MUL = 2, OP_CAT = 3, OP_AWF = 4 };

/* One operator group: K maps made of subsets of the L source maps of each image (mirrored by ctypes in
 * lomix_lightning/_engine/native.py; every field is 8 bytes). */
typedef struct {
    int64_t op;
    const float *src;       /* (b, L, C, N): the maps the group is made of */
    const int64_t *target;  /* (b, N) class indices */
    const float *valid;     /* (b, N) mask, or NULL */
    const int32_t *members; /* subset k = members[offsets[k] .. offsets[k + 1]) */
    const int32_t *offsets;
    const float *weight;    /* cat/awf: subset k's 1x1 convolution (rows_k, |S| C) at weight + woff[k] */
    const float *bias;      /* cat/awf: its bias (rows_k) at bias + boff[k]; rows_k = C (cat) or |S| (awf) */
    const int64_t *woff;
    const int64_t *boff;
    int64_t num_src, num_subsets, c_count, n, tile, tiles_per_image;
    double *stats;          /* forward: (tiles, K, 1 + 2C) */
    const float *grad;      /* backward: (K, 1 + 2C), the statistics' gradient */
    float *grad_src;        /* backward: (b, L, C, N), accumulated (written when overwrite != 0, identity only) */
    float *grad_params;     /* backward, cat/awf: (tiles, P) per-tile gradient of [weight, bias] */
    int64_t num_params, weight_size, overwrite;
} Group;

/* out[r][j] = bias[r] + sum_{m, c} w[r][m C + c] x_{mem[m]}[c][j] for r < rows: a subset's 1x1 convolution over
 * the concatenation of its members, on one block (out stride BLOCK). Columns of SUB pixels are accumulated in
 * registers (SUB independent lanes keep the FMA units busy); a shorter last column takes the plain loop. */
static void conv_block(const float *w, const float *bias, int64_t rows, const float *x, const int32_t *mem,
                       int32_t size, int64_t c_count, int64_t n, int64_t width, float *out) {
    const int64_t cols = size * c_count;
    for (int64_t r = 0; r < rows; ++r) {
        const float *wr = w + r * cols;
        float *o = out + r * BLOCK;
        int64_t j0 = 0;
        for (; j0 + SUB <= width; j0 += SUB) {
            float acc[SUB];
            for (int l = 0; l < SUB; ++l) acc[l] = bias[r];
            for (int32_t m = 0; m < size; ++m)
                for (int64_t c = 0; c < c_count; ++c) {
                    const float wv = wr[m * c_count + c];
                    const float *xv = x + (mem[m] * c_count + c) * n + j0;
                    for (int l = 0; l < SUB; ++l) acc[l] += wv * xv[l];
                }
            for (int l = 0; l < SUB; ++l) o[j0 + l] = acc[l];
        }
        for (int64_t j = j0; j < width; ++j) {
            float acc = bias[r];
            for (int32_t m = 0; m < size; ++m)
                for (int64_t c = 0; c < c_count; ++c) acc += wr[m * c_count + c] * x[(mem[m] * c_count + c) * n + j];
            o[j] = acc;
        }
    }
}

/* lanes[0..7] += sum_j a[j] b[j], split over 8 lanes (32 independent partial sums inside; a fixed order). */
static void dot_lanes(const float *a, const float *b, int64_t width, float *lanes) {
    float acc[32];
    for (int l = 0; l < 32; ++l) acc[l] = 0.0f;
    int64_t j = 0;
    for (; j + 32 <= width; j += 32)
        for (int l = 0; l < 32; ++l) acc[l] += a[j + l] * b[j + l];
    for (; j < width; ++j) acc[j & 31] += a[j] * b[j];
    for (int l = 0; l < 8; ++l) lanes[l] += (acc[l] + acc[l + 8]) + (acc[l + 16] + acc[l + 24]);
}

static void sum_lanes(const float *a, int64_t width, float *lanes) {
    float acc[32];
    for (int l = 0; l < 32; ++l) acc[l] = 0.0f;
    int64_t j = 0;
    for (; j + 32 <= width; j += 32)
        for (int l = 0; l < 32; ++l) acc[l] += a[j + l];
    for (; j < width; ++j) acc[j & 31] += a[j];
    for (int l = 0; l < 8; ++l) lanes[l] += (acc[l] + acc[l + 8]) + (acc[l + 16] + acc[l + 24]);
}

/* Backward of conv_block for d (rows, stride BLOCK): grad_x of the members += w^T d; the weight and bias gradients
 * gw += d x^T, gb += sum d accumulate in 8 lanes per parameter (gw_lanes, gb_lanes; reduced per tile). */
static void conv_block_backward(const float *w, int64_t rows, const float *x, const int32_t *mem, int32_t size,
                                int64_t c_count, int64_t n, int64_t width, const float *d, float *gx, float *gw_lanes,
                                float *gb_lanes) {
    const int64_t cols = size * c_count;
    for (int32_t m = 0; m < size; ++m)
        for (int64_t c = 0; c < c_count; ++c) {
            const int64_t col = m * c_count + c;
            const float *xv = x + (mem[m] * c_count + c) * n;
            float *gxv = gx + (mem[m] * c_count + c) * n;
            int64_t j0 = 0;
            for (; j0 + SUB <= width; j0 += SUB) {
                float acc[SUB];
                for (int l = 0; l < SUB; ++l) acc[l] = 0.0f;
                for (int64_t r = 0; r < rows; ++r) {
                    const float wv = w[r * cols + col];
                    const float *dr = d + r * BLOCK + j0;
                    for (int l = 0; l < SUB; ++l) acc[l] += wv * dr[l];
                }
                for (int l = 0; l < SUB; ++l) gxv[j0 + l] += acc[l];
            }
            for (int64_t j = j0; j < width; ++j) {
                float acc = 0.0f;
                for (int64_t r = 0; r < rows; ++r) acc += w[r * cols + col] * d[r * BLOCK + j];
                gxv[j] += acc;
            }
            for (int64_t r = 0; r < rows; ++r) dot_lanes(d + r * BLOCK, xv, width, gw_lanes + 8 * (r * cols + col));
        }
    for (int64_t r = 0; r < rows; ++r) sum_lanes(d + r * BLOCK, width, gb_lanes + 8 * r);
}

/* The fused logits f[c][j] (stride BLOCK) of subset k on pixels j0 .. j0 + width of one image; att: the awf
 * member weights (size, BLOCK). */
static void fuse_block(const Group *g, int64_t image, int64_t k, int64_t j0, int64_t width, float *f, float *att) {
    const int32_t *mem = g->members + g->offsets[k];
    const int32_t size = g->offsets[k + 1] - g->offsets[k];
    const int64_t c_count = g->c_count, n = g->n;
    const float *x = g->src + image * g->num_src * c_count * n + j0;
    if (g->op == OP_CAT) {
        conv_block(g->weight + g->woff[k], g->bias + g->boff[k], c_count, x, mem, size, c_count, n, width, f);
        return;
    }
    if (g->op == OP_AWF) { /* scores, then their softmax over the members (in place) */
        float inv[BLOCK];
        conv_block(g->weight + g->woff[k], g->bias + g->boff[k], size, x, mem, size, c_count, n, width, att);
        softmax_block(att, BLOCK, size, width, att, NULL, inv);
        for (int32_t i = 0; i < size; ++i) {
            float *ai = att + i * BLOCK;
            for (int64_t j = 0; j < width; ++j) ai[j] *= inv[j];
        }
    }
    for (int64_t c = 0; c < c_count; ++c) {
        float *fc = f + c * BLOCK;
        const float *x0 = x + (mem[0] * c_count + c) * n;
        if (g->op == OP_AWF) {
            for (int64_t j = 0; j < width; ++j) fc[j] = att[j] * x0[j];
        } else {
            memcpy(fc, x0, width * sizeof(float));
        }
        for (int32_t i = 1; i < size; ++i) {
            const float *xi = x + (mem[i] * c_count + c) * n;
            const float *ai = att + i * BLOCK;
            if (g->op == OP_ADD) {
                for (int64_t j = 0; j < width; ++j) fc[j] += xi[j];
            } else if (g->op == OP_MUL) {
                for (int64_t j = 0; j < width; ++j) fc[j] *= xi[j];
            } else {
                for (int64_t j = 0; j < width; ++j) fc[j] += ai[j] * xi[j];
            }
        }
    }
}

static void load_target(const Group *g, int64_t image, int64_t j0, int64_t width, int32_t *t, float *v) {
    const int64_t *tr = g->target + image * g->n + j0;
    const float *vr = g->valid ? g->valid + image * g->n + j0 : NULL;
    for (int64_t j = 0; j < width; ++j) {
        t[j] = (int32_t)tr[j];
        v[j] = vr ? vr[j] : 1.0f;
    }
}

/* An ignored pixel (v = 0) counts in nothing, whatever its logits (even all -inf, or NaN): its fused logits f are
 * set to 0 before the softmax, so every term it adds is an exact 0 (as F.cross_entropy's ignore_index skips it). */
static void clear_ignored(const Group *g, int64_t c_count, int64_t width, const float *v, float *f) {
    if (!g->valid) return;
    for (int64_t c = 0; c < c_count; ++c) {
        float *fc = f + c * BLOCK;
        for (int64_t j = 0; j < width; ++j) fc[j] = v[j] != 0.0f ? fc[j] : 0.0f;
    }
}

/* CE + Dice statistics of every subset of the group on one tile: stats[tile] (K, 1 + 2C) double, per subset
 * [sum -log p_t, I_1..I_C, Q_1..Q_C]. Sums run per pixel lane (vectorisable) and are reduced in double per tile, so
 * the result does not depend on how tiles are shared among threads. Masked logits follow F.cross_entropy: a -inf
 * in a class other than the target adds nothing to CE (the target logit is selected, never multiplied by 0), a -inf
 * target logit makes CE +inf, a NaN or +inf logit makes it NaN; ignored pixels count in nothing. */
static void group_forward(const Group *g, int64_t tile) {
    const int64_t c_count = g->c_count, width_stats = 1 + 2 * c_count;
    float f[MAX_CLASSES * BLOCK], p[MAX_CLASSES * BLOCK], att[MAX_MEMBERS * BLOCK], lse[BLOCK], v[BLOCK], inv[BLOCK];
    float acc_i[MAX_CLASSES * BLOCK], acc_q[MAX_CLASSES * BLOCK], acc_ce[BLOCK];
    int32_t t[BLOCK];
    const int64_t image = tile / g->tiles_per_image;
    const int64_t start = (tile % g->tiles_per_image) * g->tile;
    const int64_t stop = start + g->tile < g->n ? start + g->tile : g->n;
    for (int64_t k = 0; k < g->num_subsets; ++k) {
        memset(acc_i, 0, sizeof(float) * c_count * BLOCK);
        memset(acc_q, 0, sizeof(float) * c_count * BLOCK);
        memset(acc_ce, 0, sizeof acc_ce);
        for (int64_t j0 = start; j0 < stop; j0 += BLOCK) {
            const int64_t width = stop - j0 < BLOCK ? stop - j0 : BLOCK;
            fuse_block(g, image, k, j0, width, f, att);
            load_target(g, image, j0, width, t, v);
            clear_ignored(g, c_count, width, v, f);
            softmax_block(f, BLOCK, c_count, width, p, lse, inv);
            for (int64_t j = 0; j < width; ++j) acc_ce[j] += v[j] * lse[j];
            for (int64_t c = 0; c < c_count; ++c) {
                const float *fc = f + c * BLOCK, *pc = p + c * BLOCK;
                float *ai = acc_i + c * BLOCK, *aq = acc_q + c * BLOCK;
                for (int64_t j = 0; j < width; ++j) {
                    const float pj = pc[j] * inv[j];
                    const int32_t hit = t[j] == (int32_t)c;
                    ai[j] += hit ? v[j] * pj : 0.0f;
                    aq[j] += v[j] * pj * pj;
                    acc_ce[j] -= hit ? v[j] * fc[j] : 0.0f; /* a select: 0 * -inf would be NaN */
                }
            }
        }
        double *out = g->stats + (tile * g->num_subsets + k) * width_stats;
        double ce = 0.0;
        for (int64_t j = 0; j < BLOCK; ++j) ce += acc_ce[j];
        out[0] = ce;
        for (int64_t c = 0; c < c_count; ++c) {
            double inter = 0.0, squares = 0.0;
            for (int64_t j = 0; j < BLOCK; ++j) {
                inter += acc_i[c * BLOCK + j];
                squares += acc_q[c * BLOCK + j];
            }
            out[1 + c] = inter;
            out[1 + c_count + c] = squares;
        }
    }
}

/* Backward of group_forward on one tile: per map dL/dz_c = b_c p_c^2 + p_c (g - a_t p_t - sum_k b_k p_k^2)
 * + y_c (a_t p_t - g) with a = dL/dI, b = 2 dL/dQ, g = dL/d(sum -log p_t); then the fusion's own backward into
 * grad_src (and, for cat/awf, the tile's row of grad_params). */
static void group_backward(const Group *g, int64_t tile) {
    const int64_t c_count = g->c_count, n = g->n;
    float f[MAX_CLASSES * BLOCK], p[MAX_CLASSES * BLOCK], att[MAX_MEMBERS * BLOCK], lse[BLOCK], v[BLOCK];
    float apt[BLOCK], shift[BLOCK], tmp[BLOCK], da[MAX_MEMBERS * BLOCK], inv[BLOCK];
    int32_t t[BLOCK];
    const int64_t image = tile / g->tiles_per_image;
    const int64_t start = (tile % g->tiles_per_image) * g->tile;
    const int64_t stop = start + g->tile < n ? start + g->tile : n;
    const float *x = g->src + image * g->num_src * c_count * n;
    float *gx = g->grad_src + image * g->num_src * c_count * n;
    float *gw = g->grad_params ? g->grad_params + tile * g->num_params : NULL;
    float *lanes = gw ? calloc((size_t)(8 * g->num_params), sizeof(float)) : NULL; /* 8 lanes per parameter */
    if (gw && !lanes) { /* out of memory: a NaN gradient, never a silently wrong one */
        for (int64_t i = 0; i < g->num_params; ++i) gw[i] = NAN;
        return;
    }
    for (int64_t k = 0; k < g->num_subsets; ++k) {
        const float *gk = g->grad + k * (1 + 2 * c_count);
        const float g_ce = gk[0], *a = gk + 1, *b_half = gk + 1 + c_count;
        const int32_t *mem = g->members + g->offsets[k];
        const int32_t size = g->offsets[k + 1] - g->offsets[k];
        for (int64_t j0 = start; j0 < stop; j0 += BLOCK) {
            const int64_t width = stop - j0 < BLOCK ? stop - j0 : BLOCK;
            fuse_block(g, image, k, j0, width, f, att);
            load_target(g, image, j0, width, t, v);
            clear_ignored(g, c_count, width, v, f);
            softmax_block(f, BLOCK, c_count, width, p, lse, inv);
            for (int64_t j = 0; j < width; ++j) apt[j] = shift[j] = 0.0f;
            for (int64_t c = 0; c < c_count; ++c) {
                const float *pc = p + c * BLOCK;
                const float ac = a[c], bc = 2.0f * b_half[c];
                for (int64_t j = 0; j < width; ++j) {
                    const float pj = pc[j] * inv[j];
                    apt[j] += t[j] == (int32_t)c ? ac * pj : 0.0f;
                    shift[j] += bc * pj * pj;
                }
            }
            for (int64_t j = 0; j < width; ++j) shift[j] = g_ce - apt[j] - shift[j];
            for (int64_t c = 0; c < c_count; ++c) { /* f := dL/df, in place */
                const float *pc = p + c * BLOCK;
                float *fc = f + c * BLOCK;
                const float bc = 2.0f * b_half[c];
                for (int64_t j = 0; j < width; ++j) {
                    const float pj = pc[j] * inv[j];
                    float hit = t[j] == (int32_t)c ? apt[j] - g_ce : 0.0f;
                    fc[j] = v[j] * (pj * (bc * pj + shift[j]) + hit);
                }
            }
            if (g->op == OP_CAT) {
                conv_block_backward(g->weight + g->woff[k], c_count, x + j0, mem, size, c_count, n, width, f, gx + j0,
                                    lanes + 8 * g->woff[k], lanes + 8 * (g->weight_size + g->boff[k]));
                continue;
            }
            if (g->op == OP_AWF)
                for (int64_t j = 0; j < size * BLOCK; ++j) da[j] = 0.0f;
            for (int64_t c = 0; c < c_count; ++c) {
                const float *fc = f + c * BLOCK;
                for (int32_t i = 0; i < size; ++i) {
                    float *gxi = gx + (mem[i] * c_count + c) * n + j0;
                    const float *xi = x + (mem[i] * c_count + c) * n + j0;
                    if (g->op == OP_IDENTITY && g->overwrite) {
                        memcpy(gxi, fc, width * sizeof(float));
                    } else if (g->op == OP_IDENTITY || g->op == OP_ADD) {
                        for (int64_t j = 0; j < width; ++j) gxi[j] += fc[j];
                    } else if (g->op == OP_MUL) { /* the product of the other members */
                        for (int64_t j = 0; j < width; ++j) tmp[j] = fc[j];
                        for (int32_t o = 0; o < size; ++o) {
                            if (o == i) continue;
                            const float *xo = x + (mem[o] * c_count + c) * n + j0;
                            for (int64_t j = 0; j < width; ++j) tmp[j] *= xo[j];
                        }
                        for (int64_t j = 0; j < width; ++j) gxi[j] += tmp[j];
                    } else {
                        const float *ai = att + i * BLOCK;
                        float *dai = da + i * BLOCK;
                        for (int64_t j = 0; j < width; ++j) {
                            gxi[j] += fc[j] * ai[j];
                            dai[j] += fc[j] * xi[j];
                        }
                    }
                }
            }
            if (g->op == OP_AWF) { /* softmax over the members, backward: ds_i = a_i (da_i - sum_m a_m da_m) */
                for (int64_t j = 0; j < width; ++j) tmp[j] = 0.0f;
                for (int32_t i = 0; i < size; ++i)
                    for (int64_t j = 0; j < width; ++j) tmp[j] += att[i * BLOCK + j] * da[i * BLOCK + j];
                for (int32_t i = 0; i < size; ++i)
                    for (int64_t j = 0; j < width; ++j)
                        da[i * BLOCK + j] = att[i * BLOCK + j] * (da[i * BLOCK + j] - tmp[j]);
                conv_block_backward(g->weight + g->woff[k], size, x + j0, mem, size, c_count, n, width, da, gx + j0,
                                    lanes + 8 * g->woff[k], lanes + 8 * (g->weight_size + g->boff[k]));
            }
        }
    }
    if (lanes) {
        for (int64_t i = 0; i < g->num_params; ++i) {
            const float *li = lanes + 8 * i;
            gw[i] = ((li[0] + li[1]) + (li[2] + li[3])) + ((li[4] + li[5]) + (li[6] + li[7]));
        }
        free(lanes);
    }
}

/* Exported entry points (ctypes): statistics (forward) or gradients (backward) of num_groups operator groups over
 * the same maps, on tiles [tile0, tile1). Each tile runs every group in turn, so its maps stay in cache; tiles are
 * shared among `threads` OpenMP threads when built with OpenMP. Loaded after torch, the library binds to the libgomp
 * that torch already loaded, so these loops run on torch's own thread team. In backward the first group (the
 * original maps, overwrite != 0) writes grad_src before the others accumulate into it. */
void lomix_groups_forward(const Group *groups, int64_t num_groups, int64_t tile0, int64_t tile1, int32_t threads) {
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads)
#endif
    for (int64_t t = tile0; t < tile1; ++t)
        for (int64_t i = 0; i < num_groups; ++i) group_forward(groups + i, t);
    (void)threads;
}

void lomix_groups_backward(const Group *groups, int64_t num_groups, int64_t tile0, int64_t tile1, int32_t threads) {
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads)
#endif
    for (int64_t t = tile0; t < tile1; ++t)
        for (int64_t i = 0; i < num_groups; ++i) group_backward(groups + i, t);
    (void)threads;
}

/* 1 if built with OpenMP (the entry points then share tiles among their threads themselves), else 0. */
int32_t lomix_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
