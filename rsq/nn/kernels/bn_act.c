/* Training-mode BatchNorm fused with the ReLU after it (and, for a residual block's second BN, the add
 * before that ReLU), on a channels-last float32 tensor seen as rows of C channels: x[i * c + j].
 *
 *   forward:  y = max(x * a + b (+ r), 0)   with a = gamma * invstd, b = beta - mean * a per channel
 *   backward: g' = g where y > 0, else 0;  d beta = sum g';  d gamma = sum g' * xhat;
 *             dx = gamma * invstd * (g' - mean(g') - xhat * mean(g' * xhat)),  xhat = (x - mean) * invstd
 *
 * Each pass streams the tensors once, row by row, with the channel loop innermost (contiguous, so the
 * compiler vectorises it). Sums run in float over CHUNK rows, then into double, so that a sum over
 * 10^5 rows keeps float's precision. Single-threaded: rsq calls it from threads that each run one mode.
 * Built by rsq/nn/fused_bn.py with the system's C compiler; C99, no dependencies.
 */
#include <stdint.h>
#include <string.h>

#define CHUNK 64
#define MAX_CHANNELS 4096

int rsq_bn_max_channels(void) { return MAX_CHANNELS; }

/* y = max(x * a + b (+ r), 0); r may be NULL. Written so that a NaN passes through, as torch.relu lets it
 * (and its gradient, as ReLU's backward does): a diverging run must still show a non-finite loss. */
void rsq_bn_act_forward(const float *restrict x, const float *restrict r, int64_t rows, int64_t c,
                        const float *restrict a, const float *restrict b, float *restrict y) {
    for (int64_t i = 0; i < rows; i++) {
        const float *restrict xr = x + i * c;
        float *restrict yr = y + i * c;
        if (r) {
            const float *restrict rr = r + i * c;
            for (int64_t j = 0; j < c; j++) { float v = xr[j] * a[j] + b[j] + rr[j]; yr[j] = v < 0.f ? 0.f : v; }
        } else {
            for (int64_t j = 0; j < c; j++) { float v = xr[j] * a[j] + b[j]; yr[j] = v < 0.f ? 0.f : v; }
        }
    }
}

/* Where the backward's masked gradient comes from: recomputed from x (the ReLU's input is x * a + b), read
 * from the saved output y (an add came before the ReLU, so x alone does not decide), or already stored.
 * PLAIN: not a gradient; the forward's statistics, sum x and sum x^2. */
enum mask { FROM_X, FROM_Y, STORED, PLAIN };

static inline float masked(enum mask m, const float *restrict gr, const float *restrict xr, const float *restrict yr,
                           const float *restrict a, const float *restrict b, int64_t j) {
    if (m == FROM_X) return xr[j] * a[j] + b[j] <= 0.f ? 0.f : gr[j];
    if (m == FROM_Y) return yr[j] <= 0.f ? 0.f : gr[j];
    return gr[j];
}

/* First pass: sum_g = sum g', sum_gx = sum g' * xhat per channel (PLAIN: sum g, sum g^2); with FROM_Y, g' is
 * also stored in gm.
 * Always inlined with a constant m, so each caller gets a loop of its own without the branches. */
static inline void gradient_sums(enum mask m, const float *restrict g, const float *restrict x,
                                 const float *restrict y, const float *restrict a, const float *restrict b,
                                 int64_t rows, int64_t c, const float *restrict mean, const float *restrict invstd,
                                 float *restrict gm, double *restrict sum_g, double *restrict sum_gx) {
    float ps[MAX_CHANNELS], pq[MAX_CHANNELS];
    memset(sum_g, 0, c * sizeof(double));
    memset(sum_gx, 0, c * sizeof(double));
    for (int64_t i0 = 0; i0 < rows; i0 += CHUNK) {
        int64_t i1 = i0 + CHUNK < rows ? i0 + CHUNK : rows;
        for (int64_t j = 0; j < c; j++) { ps[j] = 0.f; pq[j] = 0.f; }
        for (int64_t i = i0; i < i1; i++) {
            const float *restrict gr = g + i * c, *restrict xr = x + i * c, *restrict yr = y ? y + i * c : 0;
            for (int64_t j = 0; j < c; j++) {
                float gv = masked(m, gr, xr, yr, a, b, j);
                if (m == FROM_Y) gm[i * c + j] = gv;
                ps[j] += gv;
                pq[j] += gv * (m == PLAIN ? gv : (xr[j] - mean[j]) * invstd[j]);
            }
        }
        for (int64_t j = 0; j < c; j++) { sum_g[j] += ps[j]; sum_gx[j] += pq[j]; }
    }
}

/* per channel: s = sum x, q = sum x^2 */
void rsq_bn_sums(const float *restrict x, int64_t rows, int64_t c, double *restrict s, double *restrict q) {
    gradient_sums(PLAIN, x, x, 0, 0, 0, rows, c, 0, 0, 0, s, q);
}

/* Second pass: dx = gamma * invstd * (g' - mean(g') - xhat * mean(g' * xhat)), g' from g by m (FROM_X or STORED). */
static inline void input_gradient(enum mask m, const float *restrict g, const float *restrict x,
                                  const float *restrict a, const float *restrict b, int64_t rows, int64_t c,
                                  const float *restrict mean, const float *restrict invstd,
                                  const float *restrict gamma, const double *restrict sum_g,
                                  const double *restrict sum_gx, float *restrict dx) {
    float k[MAX_CHANNELS], mg[MAX_CHANNELS], mgx[MAX_CHANNELS];
    for (int64_t j = 0; j < c; j++) {
        k[j] = gamma[j] * invstd[j];
        mg[j] = (float)(sum_g[j] / rows);
        mgx[j] = (float)(sum_gx[j] / rows);
    }
    for (int64_t i = 0; i < rows; i++) {
        const float *restrict gr = g + i * c, *restrict xr = x + i * c;
        float *restrict dr = dx + i * c;
        for (int64_t j = 0; j < c; j++) {
            float gv = masked(m, gr, xr, 0, a, b, j);
            float xhat = (xr[j] - mean[j]) * invstd[j];
            dr[j] = k[j] * (gv - mg[j] - xhat * mgx[j]);
        }
    }
}

/* Backward of max(x * a + b, 0): the ReLU's mask is recomputed from x exactly as the forward computed it,
 * so only g and x are read (twice each); the masked gradient is never stored. */
void rsq_bn_relu_backward(const float *restrict g, const float *restrict x, int64_t rows, int64_t c,
                          const float *restrict a, const float *restrict b, const float *restrict mean,
                          const float *restrict invstd, const float *restrict gamma,
                          float *restrict dx, double *restrict sum_g, double *restrict sum_gx) {
    gradient_sums(FROM_X, g, x, 0, a, b, rows, c, mean, invstd, 0, sum_g, sum_gx);
    input_gradient(FROM_X, g, x, a, b, rows, c, mean, invstd, gamma, sum_g, sum_gx, dx);
}

/* Backward of max(x * a + b + r, 0): the mask comes from the saved output y; the masked gradient gm is the
 * residual input's gradient too, so it is stored and read back for dx. */
void rsq_bn_add_relu_backward(const float *restrict g, const float *restrict y, const float *restrict x,
                              int64_t rows, int64_t c, const float *restrict mean, const float *restrict invstd,
                              const float *restrict gamma, float *restrict gm, float *restrict dx,
                              double *restrict sum_g, double *restrict sum_gx) {
    gradient_sums(FROM_Y, g, x, y, 0, 0, rows, c, mean, invstd, gm, sum_g, sum_gx);
    input_gradient(STORED, gm, x, 0, 0, rows, c, mean, invstd, gamma, sum_g, sum_gx, dx);
}
