/* rsq C runtime: runs an rsq integer export (`rsq export --format c`) in integer arithmetic only.
 *
 * The exported model is plain constant data (rsq_model.c, generated): the layer graph, the integer
 * weights bit-packed at their own bit width (stored once for every resolution), and per resolution the
 * requantization tables, each tensor's size and its place in one caller-provided arena. This file and
 * rsq_runtime.c are the same for every model. The arithmetic is the IntegerModel's (docs/export.md):
 * bit for bit what rsq.runtime (numpy) computes, which `rsq verify` and rsq's tests check.
 *
 * No heap, no threads, no floating point except the input's quantization (one float32 division and
 * one rounding per input value) and the optional dequantization of the logits.
 */
#ifndef RSQ_RUNTIME_H
#define RSQ_RUNTIME_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Output pixels a conv computes together (the export sizes the scratch for this many patches). */
#define RSQ_PIXEL_BLOCK 4

/* Op kinds: the IntegerModel's op kinds, in its order. */
enum { RSQ_QUANTIZE_INPUT, RSQ_REQUANTIZE, RSQ_CONV, RSQ_LINEAR, RSQ_ADD, RSQ_GLOBAL_AVG_POOL, RSQ_MAX_POOL };
/* Element types of tensors in the arena: narrow tensors are 8-bit, wide ones and the logits int32. */
enum { RSQ_F32, RSQ_I8, RSQ_U8, RSQ_I32 };

typedef struct {
    int32_t channels;
    int32_t type;                 /* RSQ_F32 (the input, never in the arena), RSQ_I8, RSQ_U8, RSQ_I32 */
} rsq_tensor;

typedef struct {
    const uint8_t *data;          /* `bits`-bit two's complement values, LSB first, rows [out][kh][kw][in / groups] */
    int32_t bits, out_channels, in_per_group, kh, kw;
} rsq_weight;

typedef struct {
    int32_t kind, in0, in1, out;  /* tensor indices (in1 = -1 unless an add) */
    int32_t weight;               /* index into the model's weights, -1 when none */
    int32_t kh, kw, sh, sw, ph, pw, groups;
} rsq_op;

/* One op's table at one resolution: q = clamp(rq(x, m0, shift), lo, hi), where
 * rq(x, m0, shift) = floor((x * m0 + 2^(30 + shift)) / 2^(31 + shift)) (round half up). */
typedef struct {
    const int32_t *bias, *m0, *shift;   /* conv / linear: one per output channel; else m0, shift: 1 entry */
    const int32_t *m0_b, *shift_b;      /* add: the second input's multiplier (m0, shift are the first's) */
    int32_t bias_shift, lo, hi;
} rsq_table;

typedef struct {
    int32_t resolution;
    float input_scale;            /* real value of one step of the quantized input */
    double logit_scale;           /* real value of one step of the int32 logits */
    const int16_t *pixel_table;   /* [in_chans][256]: an 8-bit pixel's quantized input (NULL: no mean/std known) */
    const rsq_table *tables;      /* one per op */
    const int32_t *height, *width;  /* per tensor */
    const int32_t *offset;        /* per tensor: byte offset in the arena (-1: the float input) */
    int32_t arena_bytes;          /* activations + scratch at this resolution */
    int32_t scratch_offset;       /* where the weight and patch scratch starts */
} rsq_mode;

typedef struct {
    const char *name;
    int32_t num_classes, in_chans;
    int32_t num_ops, num_tensors, num_weights, num_modes;
    int32_t input, output;        /* tensor indices */
    const rsq_op *ops;
    const rsq_tensor *tensors;
    const rsq_weight *weights;
    const rsq_mode *modes;        /* one per exported resolution, largest first */
    int32_t oc_block;             /* output channels whose weights a conv unpacks at a time (to int16 scratch) */
} rsq_model;

/* The mode of an exported resolution, or NULL. */
const rsq_mode *rsq_find_mode(const rsq_model *model, int resolution);

/* Bytes of arena rsq_run needs at `resolution` (0 if it was not exported). The arena must be 8-byte aligned. */
size_t rsq_arena_bytes(const rsq_model *model, int resolution);

/* Integer logits of one image: `input` is float32 [in_chans][resolution][resolution], normalised as in
 * training; `logits` receives num_classes int32 values (times the mode's logit_scale: the real logits).
 * Returns 0, or -1 when `resolution` was not exported. */
int rsq_run(const rsq_model *model, int resolution, const float *input, int32_t *logits, void *arena);

/* The same from 8-bit pixels, with no floating point at all: `pixels` is uint8 [in_chans][resolution][resolution]
 * (already at this resolution), and each pixel's quantized input comes from the mode's pixel_table (the
 * training normalisation (pixel / 255 - mean) / std and the input's quantization, evaluated at export in
 * float32 exactly as rsq computes them). Returns 0, -1 for a resolution that was not exported, -3 when the
 * export knows no normalisation. */
int rsq_run_pixels(const rsq_model *model, int resolution, const uint8_t *pixels, int32_t *logits, void *arena);

#ifdef __cplusplus
}
#endif

#endif /* RSQ_RUNTIME_H */
