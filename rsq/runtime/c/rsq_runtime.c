/* rsq C runtime (see rsq_runtime.h): the IntegerModel's seven ops on one image, activations NHWC.
 * Written for clarity and exactness first: a reference and a starting point for a target's own kernels. */
#include "rsq_runtime.h"

#include <math.h>
#include <string.h>

/* conv() keeps one accumulator per pixel of a block in a register of its own: four of them. */
typedef char rsq_pixel_block_is_four[RSQ_PIXEL_BLOCK == 4 ? 1 : -1];

/* floor(v / 2^bits) without relying on >> of a negative number (implementation-defined in C). */
static int64_t floor_shift(int64_t v, int bits) {
    return v >= 0 ? v >> bits : ~((~v) >> bits);
}

/* round-half-up(x * m0 / 2^(31 + shift)); the export keeps |x * m0| < 2^61. */
static int64_t requantize(int64_t x, int32_t m0, int32_t shift) {
    int total = 31 + shift;
    return floor_shift(x * (int64_t)m0 + ((int64_t)1 << (total - 1)), total);
}

static int64_t clamp(int64_t v, int32_t lo, int32_t hi) {
    return v < lo ? lo : (v > hi ? hi : v);
}

static int64_t load(const void *base, int32_t type, size_t i) {
    switch (type) {
    case RSQ_I8: return ((const int8_t *)base)[i];
    case RSQ_U8: return ((const uint8_t *)base)[i];
    default: return ((const int32_t *)base)[i];
    }
}

/* v is already clamped to the tensor's range, which its type holds. */
static void store(void *base, int32_t type, size_t i, int64_t v) {
    switch (type) {
    case RSQ_I8: ((int8_t *)base)[i] = (int8_t)v; break;
    case RSQ_U8: ((uint8_t *)base)[i] = (uint8_t)v; break;
    default: ((int32_t *)base)[i] = (int32_t)v; break;
    }
}

static void *tensor_at(const rsq_mode *mode, char *arena, int32_t t) {
    return arena + mode->offset[t];
}

static size_t tensor_size(const rsq_model *model, const rsq_mode *mode, int32_t t) {
    return (size_t)mode->height[t] * (size_t)mode->width[t] * (size_t)model->tensors[t].channels;
}

/* Weight rows first .. first + rows - 1 of a layer (each [kh][kw][in / groups]) as int16. The packed stream
 * carries a spare byte at its end, so reading two bytes at a value's first byte never runs past the array. */
static void unpack_rows(const rsq_weight *w, int32_t first, int32_t rows, int16_t *out) {
    size_t k = (size_t)w->kh * w->kw * w->in_per_group;
    size_t start = (size_t)first * k, count = (size_t)rows * k;
    if (w->bits == 8) {
        const int8_t *values = (const int8_t *)w->data + start;
        for (size_t i = 0; i < count; i++) out[i] = values[i];
        return;
    }
    uint32_t mask = (1u << w->bits) - 1u, sign = 1u << (w->bits - 1);
    for (size_t i = 0; i < count; i++) {
        size_t bit = (start + i) * (size_t)w->bits;
        uint32_t window = (uint32_t)w->data[bit >> 3] | ((uint32_t)w->data[(bit >> 3) + 1] << 8);
        uint32_t v = (window >> (bit & 7)) & mask;
        out[i] = (int16_t)((int32_t)(v ^ sign) - (int32_t)sign);  /* sign-extend a bits-wide value */
    }
}

/* The input's quantization, from float32 images or (pixels != NULL) from 8-bit pixels through the table. */
static void quantize_input(const rsq_model *model, const rsq_mode *mode, const rsq_op *op, const float *input,
                           const uint8_t *pixels, char *arena) {
    const rsq_table *t = &mode->tables[op - model->ops];
    int32_t h = mode->height[op->out], w = mode->width[op->out], c = model->tensors[op->out].channels;
    int32_t type = model->tensors[op->out].type;
    void *out = tensor_at(mode, arena, op->out);
    for (int32_t ch = 0; ch < c; ch++)
        for (int32_t y = 0; y < h; y++)
            for (int32_t x = 0; x < w; x++) {
                size_t at = ((size_t)ch * h + y) * w + x, to = ((size_t)y * w + x) * c + ch;
                if (pixels != NULL) {
                    store(out, type, to, mode->pixel_table[(size_t)ch * 256 + pixels[at]]);
                    continue;
                }
                /* float32 division, then round half to even: the fake quantizer's own arithmetic */
                float q = rintf(input[at] / mode->input_scale);
                q = q < (float)t->lo ? (float)t->lo : (q > (float)t->hi ? (float)t->hi : q);
                store(out, type, to, (int64_t)q);
            }
}

/* Gathers output pixel (oy, ox)'s receptive field in group g into an int16 patch (zeros for padding). */
static void gather_patch(const rsq_tensor *ti, const void *in, const rsq_op *op, int32_t h, int32_t wd, int32_t c,
                         int32_t cin, int32_t g, int32_t oy, int32_t ox, int16_t *patch) {
    int32_t n = 0;
    for (int32_t ky = 0; ky < op->kh; ky++) {
        int32_t iy = oy * op->sh - op->ph + ky;
        for (int32_t kx = 0; kx < op->kw; kx++) {
            int32_t ix = ox * op->sw - op->pw + kx;
            size_t at = ((size_t)iy * wd + ix) * c + (size_t)g * cin;
            if (iy < 0 || iy >= h || ix < 0 || ix >= wd) {
                memset(patch + n, 0, sizeof(int16_t) * (size_t)cin);  /* zero point 0 */
            } else if (ti->type == RSQ_U8) {
                const uint8_t *src = (const uint8_t *)in + at;
                for (int32_t j = 0; j < cin; j++) patch[n + j] = src[j];
            } else if (ti->type == RSQ_I8) {
                const int8_t *src = (const int8_t *)in + at;
                for (int32_t j = 0; j < cin; j++) patch[n + j] = src[j];
            } else {
                for (int32_t j = 0; j < cin; j++) patch[n + j] = (int16_t)load(in, ti->type, at + j);
            }
            n += cin;
        }
    }
}

/* conv and linear (a linear is a 1x1 conv on a 1x1 input), a block of output channels at a time: the
 * block's weight rows are unpacked to int16 once (model->oc_block rows: the scratch stays small and in
 * cache), then the output pixels go by RSQ_PIXEL_BLOCK (4) at a time: their receptive fields are gathered
 * into patches, and each weight row takes its dot product with the four patches in one pass (each weight
 * is loaded once for four pixels). */
static void conv(const rsq_model *model, const rsq_mode *mode, const rsq_op *op, char *arena) {
    const rsq_table *t = &mode->tables[op - model->ops];
    const rsq_weight *w = &model->weights[op->weight];
    const rsq_tensor *ti = &model->tensors[op->in0], *to = &model->tensors[op->out];
    int32_t h = mode->height[op->in0], wd = mode->width[op->in0], c = ti->channels;
    int32_t oh = mode->height[op->out], ow = mode->width[op->out], oc = to->channels;
    int32_t cin = c / op->groups, cout = oc / op->groups;
    int32_t k = op->kh * op->kw * cin;
    int16_t *rows = (int16_t *)(arena + mode->scratch_offset);
    int16_t *patch = rows + (size_t)model->oc_block * k;  /* RSQ_PIXEL_BLOCK patches of k values */
    const int16_t *p0 = patch, *p1 = patch + k, *p2 = patch + 2 * (size_t)k, *p3 = patch + 3 * (size_t)k;
    const void *in = tensor_at(mode, arena, op->in0);
    void *out = tensor_at(mode, arena, op->out);
    for (int32_t g = 0; g < op->groups; g++)
        for (int32_t first = g * cout; first < (g + 1) * cout; first += model->oc_block) {
            int32_t last = first + model->oc_block < (g + 1) * cout ? first + model->oc_block : (g + 1) * cout;
            unpack_rows(w, first, last - first, rows);
            for (int32_t oy = 0; oy < oh; oy++)
                for (int32_t ox = 0; ox < ow; ox += RSQ_PIXEL_BLOCK) {
                    int32_t n = ow - ox < RSQ_PIXEL_BLOCK ? ow - ox : RSQ_PIXEL_BLOCK;
                    for (int32_t p = 0; p < RSQ_PIXEL_BLOCK; p++) {
                        if (p < n) gather_patch(ti, in, op, h, wd, c, cin, g, oy, ox + p, patch + (size_t)p * k);
                        else memset(patch + (size_t)p * k, 0, sizeof(int16_t) * (size_t)k);  /* row's end */
                    }
                    for (int32_t o = first; o < last; o++) {
                        const int16_t *row = rows + (size_t)(o - first) * k;
                        int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;  /* the export bounds each below 2^29 */
                        for (int32_t j = 0; j < k; j++) {
                            int32_t weight = row[j];
                            a0 += p0[j] * weight;
                            a1 += p1[j] * weight;
                            a2 += p2[j] * weight;
                            a3 += p3[j] * weight;
                        }
                        int32_t acc[RSQ_PIXEL_BLOCK] = {a0, a1, a2, a3};
                        for (int32_t p = 0; p < n; p++) {
                            int64_t x = ((int64_t)acc[p] << t->bias_shift) + t->bias[o];
                            int64_t q = clamp(requantize(x, t->m0[o], t->shift[o]), t->lo, t->hi);
                            store(out, to->type, ((size_t)oy * ow + ox + p) * oc + o, q);
                        }
                    }
                }
        }
}

static void requantize_op(const rsq_model *model, const rsq_mode *mode, const rsq_op *op, char *arena) {
    const rsq_table *t = &mode->tables[op - model->ops];
    int32_t ti = model->tensors[op->in0].type, to = model->tensors[op->out].type;
    const void *in = tensor_at(mode, arena, op->in0);
    void *out = tensor_at(mode, arena, op->out);
    size_t n = tensor_size(model, mode, op->out);
    for (size_t i = 0; i < n; i++)
        store(out, to, i, clamp(requantize(load(in, ti, i), t->m0[0], t->shift[0]), t->lo, t->hi));
}

static void add(const rsq_model *model, const rsq_mode *mode, const rsq_op *op, char *arena) {
    const rsq_table *t = &mode->tables[op - model->ops];
    int32_t ta = model->tensors[op->in0].type, tb = model->tensors[op->in1].type;
    int32_t to = model->tensors[op->out].type;
    const void *a = tensor_at(mode, arena, op->in0), *b = tensor_at(mode, arena, op->in1);
    void *out = tensor_at(mode, arena, op->out);
    size_t n = tensor_size(model, mode, op->out);
    for (size_t i = 0; i < n; i++) {
        int64_t sum = requantize(load(a, ta, i), t->m0[0], t->shift[0]) + requantize(load(b, tb, i), t->m0_b[0],
                                                                                      t->shift_b[0]);
        store(out, to, i, clamp(sum, t->lo, t->hi));
    }
}

static void global_avg_pool(const rsq_model *model, const rsq_mode *mode, const rsq_op *op, char *arena) {
    const rsq_table *t = &mode->tables[op - model->ops];
    int32_t ti = model->tensors[op->in0].type, to = model->tensors[op->out].type;
    int32_t c = model->tensors[op->in0].channels;
    size_t pixels = (size_t)mode->height[op->in0] * mode->width[op->in0];
    const void *in = tensor_at(mode, arena, op->in0);
    void *out = tensor_at(mode, arena, op->out);
    for (int32_t ch = 0; ch < c; ch++) {
        int64_t sum = 0;  /* the multiplier has fewer mantissa bits where this sum can pass 2^31 */
        for (size_t p = 0; p < pixels; p++) sum += load(in, ti, p * c + ch);
        store(out, to, ch, clamp(requantize(sum, t->m0[0], t->shift[0]), t->lo, t->hi));
    }
}

/* The max of integers on one grid; padding never wins (it is minus infinity). */
static void max_pool(const rsq_model *model, const rsq_mode *mode, const rsq_op *op, char *arena) {
    int32_t type = model->tensors[op->in0].type, c = model->tensors[op->in0].channels;
    int32_t h = mode->height[op->in0], w = mode->width[op->in0];
    int32_t oh = mode->height[op->out], ow = mode->width[op->out];
    const void *in = tensor_at(mode, arena, op->in0);
    void *out = tensor_at(mode, arena, op->out);
    for (int32_t oy = 0; oy < oh; oy++)
        for (int32_t ox = 0; ox < ow; ox++)
            for (int32_t ch = 0; ch < c; ch++) {
                int64_t best = INT64_MIN;
                for (int32_t ky = 0; ky < op->kh; ky++) {
                    int32_t iy = oy * op->sh - op->ph + ky;
                    if (iy < 0 || iy >= h) continue;
                    for (int32_t kx = 0; kx < op->kw; kx++) {
                        int32_t ix = ox * op->sw - op->pw + kx;
                        if (ix < 0 || ix >= w) continue;
                        int64_t v = load(in, type, ((size_t)iy * w + ix) * c + ch);
                        if (v > best) best = v;
                    }
                }
                store(out, type, ((size_t)oy * ow + ox) * c + ch, best);
            }
}

const rsq_mode *rsq_find_mode(const rsq_model *model, int resolution) {
    for (int32_t i = 0; i < model->num_modes; i++)
        if (model->modes[i].resolution == resolution) return &model->modes[i];
    return NULL;
}

size_t rsq_arena_bytes(const rsq_model *model, int resolution) {
    const rsq_mode *mode = rsq_find_mode(model, resolution);
    return mode ? (size_t)mode->arena_bytes : 0;
}

static int run(const rsq_model *model, int resolution, const float *input, const uint8_t *pixels,
               int32_t *logits, void *arena) {
    const rsq_mode *mode = rsq_find_mode(model, resolution);
    if (mode == NULL) return -1;
    if (pixels != NULL && mode->pixel_table == NULL) return -3;
    char *base = (char *)arena;
    for (int32_t i = 0; i < model->num_ops; i++) {
        const rsq_op *op = &model->ops[i];
        switch (op->kind) {
        case RSQ_QUANTIZE_INPUT: quantize_input(model, mode, op, input, pixels, base); break;
        case RSQ_REQUANTIZE: requantize_op(model, mode, op, base); break;
        case RSQ_CONV:
        case RSQ_LINEAR: conv(model, mode, op, base); break;
        case RSQ_ADD: add(model, mode, op, base); break;
        case RSQ_GLOBAL_AVG_POOL: global_avg_pool(model, mode, op, base); break;
        case RSQ_MAX_POOL: max_pool(model, mode, op, base); break;
        default: return -2;
        }
    }
    memcpy(logits, tensor_at(mode, base, model->output), sizeof(int32_t) * (size_t)model->num_classes);
    return 0;
}

int rsq_run(const rsq_model *model, int resolution, const float *input, int32_t *logits, void *arena) {
    return run(model, resolution, input, NULL, logits, arena);
}

int rsq_run_pixels(const rsq_model *model, int resolution, const uint8_t *pixels, int32_t *logits, void *arena) {
    return run(model, resolution, NULL, pixels, logits, arena);
}
