/* rsq_run: a command-line driver for an rsq C export (and an example of calling the runtime).
 *
 *   cc -O3 -o rsq_run rsq_run.c rsq_model.c rsq_runtime.c -lm
 *   ./rsq_run RESOLUTION [REPEATS] < images.f32 > logits.i32
 *   ./rsq_run -p RESOLUTION [REPEATS] < pixels.u8 > logits.i32
 *
 * Reads float32 images ([in_chans][RESOLUTION][RESOLUTION] each, normalised as in training, native
 * byte order), or with -p 8-bit pixels of the same shape (integer-only: rsq_run_pixels), from stdin until
 * it ends, and writes each image's int32 logits to stdout. With REPEATS > 1 every image runs that many
 * times and the mean milliseconds per image go to stderr. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "rsq_model.h"

/* Processor time (standard C, so the driver builds with newlib and on bare metal too); the runtime is
 * single-threaded, so on an otherwise idle core it is the elapsed time. */
static double now_ms(void) {
    return (double)clock() * 1e3 / CLOCKS_PER_SEC;
}

int main(int argc, char **argv) {
    const rsq_model *model = &RSQ_MODEL;
    int pixels = argc > 1 && strcmp(argv[1], "-p") == 0;
    argv += pixels;
    argc -= pixels;
    if (argc < 2 || argc > 3) {
        fprintf(stderr, "usage: rsq_run [-p] RESOLUTION [REPEATS] < images > logits.i32\n");
        return 2;
    }
    int resolution = atoi(argv[1]);
    long repeats = argc == 3 ? atol(argv[2]) : 1;
    size_t arena_bytes = rsq_arena_bytes(model, resolution);
    if (arena_bytes == 0 || repeats < 1) {
        fprintf(stderr, "rsq_run: resolution %s is not in this export (or REPEATS < 1)\n", argv[1]);
        return 2;
    }
    if (pixels && rsq_find_mode(model, resolution)->pixel_table == NULL) {
        fprintf(stderr, "rsq_run: this export records no input normalisation; feed float32 images without -p\n");
        return 2;
    }
    size_t values = (size_t)model->in_chans * resolution * resolution;
    size_t value_bytes = pixels ? 1 : sizeof(float);
    void *image = malloc(values * value_bytes);
    int32_t *logits = malloc((size_t)model->num_classes * sizeof(int32_t));
    void *arena = malloc(arena_bytes);
    if (!image || !logits || !arena) {
        fprintf(stderr, "rsq_run: out of memory (arena %zu bytes)\n", arena_bytes);
        return 1;
    }
    long images = 0;
    double total = 0.0;
    while (fread(image, value_bytes, values, stdin) == values) {
        double start = now_ms();
        for (long i = 0; i < repeats; i++) {
            if (pixels) rsq_run_pixels(model, resolution, (const uint8_t *)image, logits, arena);
            else rsq_run(model, resolution, (const float *)image, logits, arena);
        }
        total += now_ms() - start;
        fwrite(logits, sizeof(int32_t), (size_t)model->num_classes, stdout);
        images++;
    }
    if (repeats > 1 && images > 0)
        fprintf(stderr, "ms per image: %.4f (%ld images x %ld repeats, arena %zu bytes)\n",
                total / (double)(images * repeats), images, repeats, arena_bytes);
    free(image);
    free(logits);
    free(arena);
    return 0;
}
