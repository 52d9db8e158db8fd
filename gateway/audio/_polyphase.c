/* The polyphase FIR of gateway/audio/resample.py (_Fir), compiled: every call's audio is resampled twice per
 * 80 ms frame, and numpy's per-call overhead and BLAS's packing of small strided matrices made that the largest
 * single cost of a gateway carrying hundreds of calls. Same filter, same output samples (float32 arithmetic; the
 * summation order differs, so results agree to float32 rounding). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* Built for AVX2 with FMA too, chosen at load time where the CPU has them. */
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define MULTIVERSIONED __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MULTIVERSIONED
#endif

/* Eight floats at a time (GCC/clang vector extensions: AVX in the x86-64-v3 build, two SSE halves otherwise). */
typedef float v8 __attribute__((vector_size(32)));

static inline v8 load8(const float *p) {
    v8 v;
    memcpy(&v, p, sizeof v);  /* unaligned */
    return v;
}

static inline float sum8(v8 v) {
    float s = 0;
    for (int l = 0; l < 8; ++l) s += v[l];
    return s;
}

/* One output: phase row `coefficients` (taps) dotted with window[base:base+taps]. */
static inline float dot(const float *window, const float *coefficients, Py_ssize_t taps) {
    v8 acc = {0};
    Py_ssize_t i = 0;
    for (; i + 8 <= taps; i += 8) acc += load8(window + i) * load8(coefficients + i);
    float sum = sum8(acc);
    for (; i < taps; ++i) sum += window[i] * coefficients[i];
    return sum;
}

/* The UP outputs of one period read one window through the rows of `wide` (their phases side by side, each
 * shifted to where it reads; UP x width): every block of input is loaded once for all of them. Written out for
 * the usual factors (2: 24 -> 16 kHz, 3: 16 -> 24 kHz) so that the accumulators stay in registers. */
static inline void period_2(const float *window, const float *wide, Py_ssize_t width, float *y) {
    v8 a0 = {0}, a1 = {0};
    Py_ssize_t i = 0;
    for (; i + 8 <= width; i += 8) {
        v8 x = load8(window + i);
        a0 += x * load8(wide + i);
        a1 += x * load8(wide + width + i);
    }
    float s0 = sum8(a0), s1 = sum8(a1);
    for (; i < width; ++i) {
        s0 += window[i] * wide[i];
        s1 += window[i] * wide[width + i];
    }
    y[0] = s0;
    y[1] = s1;
}

static inline void period_3(const float *window, const float *wide, Py_ssize_t width, float *y) {
    v8 a0 = {0}, a1 = {0}, a2 = {0};
    Py_ssize_t i = 0;
    for (; i + 8 <= width; i += 8) {
        v8 x = load8(window + i);
        a0 += x * load8(wide + i);
        a1 += x * load8(wide + width + i);
        a2 += x * load8(wide + 2 * width + i);
    }
    float s0 = sum8(a0), s1 = sum8(a1), s2 = sum8(a2);
    for (; i < width; ++i) {
        s0 += window[i] * wide[i];
        s1 += window[i] * wide[width + i];
        s2 += window[i] * wide[2 * width + i];
    }
    y[0] = s0;
    y[1] = s1;
    y[2] = s2;
}

/* Output n: float32 as it is, or int16 scaled by 32768, rounded to nearest even and clipped (returns 1 if so). */
static inline long store(float y, void *out, Py_ssize_t n, Py_ssize_t out_itemsize) {
    if (out_itemsize == 4) {
        ((float *)out)[n] = y;
        return 0;
    }
    float scaled = nearbyintf(y * 32768.0f);
    long clipped = 0;
    if (scaled > 32767.0f) {
        scaled = 32767.0f;
        clipped = 1;
    } else if (scaled < -32768.0f) {
        scaled = -32768.0f;
        clipped = 1;
    }
    ((int16_t *)out)[n] = (int16_t)scaled;
    return clipped;
}

static inline long single(const float *w, const float *p, Py_ssize_t up, Py_ssize_t down, Py_ssize_t taps,
                          Py_ssize_t window_start, Py_ssize_t k, void *out, Py_ssize_t n, Py_ssize_t out_itemsize) {
    return store(dot(w + k * down / up - (taps - 1) - window_start, p + (k * down % up) * taps, taps), out, n,
                 out_itemsize);
}

MULTIVERSIONED static long filter(const float *w, const float *p, const float *wide, Py_ssize_t up, Py_ssize_t down,
                                  Py_ssize_t taps, Py_ssize_t span, Py_ssize_t window_start, Py_ssize_t first,
                                  Py_ssize_t count, void *out, Py_ssize_t out_itemsize) {
    long clipped = 0;
    Py_ssize_t n = 0;
    if (up == 2 || up == 3) {
        for (; n < count && (first + n) % up != 0; ++n)  /* single outputs up to the first whole period */
            clipped += single(w, p, up, down, taps, window_start, first + n, out, n, out_itemsize);
        /* whole periods: output m * up + j reads from input m * down - (taps - 1) through row j of `wide` */
        Py_ssize_t width = taps + span;
        float y[3];
        for (; n + up <= count; n += up) {
            const float *window = w + (first + n) / up * down - (taps - 1) - window_start;
            if (up == 2)
                period_2(window, wide, width, y);
            else
                period_3(window, wide, width, y);
            for (Py_ssize_t j = 0; j < up; ++j) clipped += store(y[j], out, n + j, out_itemsize);
        }
    }
    for (; n < count; ++n)  /* what is left, and every output for other factors */
        clipped += single(w, p, up, down, taps, window_start, first + n, out, n, out_itemsize);
    return clipped;
}

static int get_buffer(PyObject *obj, Py_buffer *view, int writable, Py_ssize_t itemsize, const char *name) {
    if (PyObject_GetBuffer(obj, view, (writable ? PyBUF_WRITABLE : 0) | PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) != 0)
        return -1;
    if (view->itemsize != itemsize && !(writable && view->itemsize == 2)) {
        PyErr_Format(PyExc_TypeError, "%s: items of %zd bytes are not taken", name, view->itemsize);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* run(window, phases, wide, up, down, taps, window_start, first, out) -> clipped
 *
 * Output k = first + n (n < len(out)) reads the input at window index k*down//up - (taps-1) - window_start
 * through phase k*down % up (a row of `phases`, float32 [up, taps]); `wide` holds the same coefficients as whole
 * periods read them (float32 [up, taps + span], span = (up-1)*down//up). `window` is float32. `out` is float32,
 * or int16 (see `store`); returns the samples clipped. Raises ValueError if an output would read outside the
 * window. The work is microseconds: the interpreter lock is kept (releasing it would cost more than it frees). */
static PyObject *run(PyObject *self, PyObject *args) {
    PyObject *window_obj, *phases_obj, *wide_obj, *out_obj;
    Py_ssize_t up, down, taps, window_start, first;
    if (!PyArg_ParseTuple(args, "OOOnnnnnO", &window_obj, &phases_obj, &wide_obj, &up, &down, &taps, &window_start,
                          &first, &out_obj))
        return NULL;
    if (up <= 0 || down <= 0 || taps <= 0) {
        PyErr_SetString(PyExc_ValueError, "up, down and taps must be positive");
        return NULL;
    }
    Py_buffer window, phases, wide, out;
    if (get_buffer(window_obj, &window, 0, 4, "window") != 0) return NULL;
    if (get_buffer(phases_obj, &phases, 0, 4, "phases") != 0) {
        PyBuffer_Release(&window);
        return NULL;
    }
    if (get_buffer(wide_obj, &wide, 0, 4, "wide") != 0) {
        PyBuffer_Release(&window);
        PyBuffer_Release(&phases);
        return NULL;
    }
    if (get_buffer(out_obj, &out, 1, 4, "out") != 0) {
        PyBuffer_Release(&window);
        PyBuffer_Release(&phases);
        PyBuffer_Release(&wide);
        return NULL;
    }
    PyObject *result = NULL;
    Py_ssize_t span = (up - 1) * down / up;
    Py_ssize_t window_len = window.len / 4, count = out.len / out.itemsize;
    if (phases.len / 4 != up * taps || wide.len / 4 != up * (taps + span)) {
        PyErr_SetString(PyExc_ValueError, "phases must hold up * taps coefficients, wide up * (taps + span)");
        goto done;
    }
    if (count > 0) {
        Py_ssize_t lowest = first * down / up - (taps - 1) - window_start;
        Py_ssize_t highest = (first + count - 1) * down / up + span - window_start;
        if (first < 0 || lowest < 0 || highest >= window_len) {
            PyErr_SetString(PyExc_ValueError, "an output would read outside the window");
            goto done;
        }
    }
    result = PyLong_FromLong(filter((const float *)window.buf, (const float *)phases.buf, (const float *)wide.buf, up,
                                    down, taps, span, window_start, first, count, out.buf, out.itemsize));
done:
    PyBuffer_Release(&window);
    PyBuffer_Release(&phases);
    PyBuffer_Release(&wide);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"run", run, METH_VARARGS, "Polyphase FIR outputs into a float32 or int16 buffer; returns samples clipped."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_polyphase", NULL, -1, methods};

PyMODINIT_FUNC PyInit__polyphase(void) { return PyModule_Create(&module); }
