# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The one bridge between Python and the C core (csrc/rustgpt_kernels.h).

Each function checks its arrays once (numpy.ndarray, float32 or int32, C-contiguous,
non-empty, outputs writable, shapes agreeing, token ids in range) and raises a
``ValidationError`` / ``ShapeMismatch`` naming the function and the array; then it calls
the C kernel without the GIL. Shapes follow the header's letters; the C trusts them.

The kernels of a training step can also be recorded into a ``Plan`` (``with Plan() as
plan:``) while they run, and replayed later by one ``plan.run()``: the same C calls on the
same arrays, without Python or the checks in between (see Plan).
"""

import math
import os

import numpy as np

from cpython.buffer cimport (PyBUF_C_CONTIGUOUS, PyBUF_FORMAT, PyBUF_WRITABLE,
                             PyBuffer_Release, PyObject_GetBuffer)
from cpython.pythread cimport PyThread_get_thread_ident
from libc.stdint cimport uint16_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy

from rustgpt.errors import ShapeMismatch, TokenError, ValidationError
from rustgpt.resources import max_threads, threads_bound_text


cdef extern from "rustgpt_kernels.h" nogil:
    int RG_SIMD_GENERIC, RG_SIMD_AVX2, RG_SIMD_AVX512
    int rg_simd_supported() noexcept
    int rg_simd_level() noexcept
    int rg_set_simd_level(int level) noexcept
    int rg_has_openmp() noexcept
    int rg_num_threads() noexcept
    void rg_set_num_threads(int n) noexcept
    int rg_set_local_threads(int n) noexcept
    void rg_run_streams(int n, const unsigned char *stream, const int *wait,
                        void (*run)(void *ctx, int j) noexcept nogil, void *ctx) noexcept
    int RG_ACT_NONE, RG_ACT_RELU, RG_ACT_GELU
    void rg_sgemm(float *C, const float *A, const float *B, int M, int N, int K,
                  int trans_a, int trans_b, int accumulate, const float *bias, int act,
                  float *pre) noexcept
    void rg_sgemm_many(int count, float **C, const float **A, const float **B, int M, int N,
                       int K, int trans_a, int trans_b, const int *accumulate) noexcept
    int RG_BF16_PORTABLE, RG_BF16_AVX512, RG_BF16_AMX
    int rg_bf16_supported() noexcept
    int rg_bf16_path() noexcept
    int rg_set_bf16_path(int path) noexcept
    void rg_to_bf16(uint16_t *out, const float *x, size_t n) noexcept
    void rg_gemm_bf16(float *C, const float *A, const float *B, const uint16_t *Bh, int M,
                      int N, int K, int trans_a, int trans_b, int accumulate, const float *bias,
                      int act, float *pre) noexcept
    void rg_bf16_pack_a(uint16_t *dst, const float *A, int M, int K, int trans_a,
                        int mr) noexcept
    void rg_bf16_pack_b(uint16_t *dst, const float *B, const uint16_t *Bh, int N, int K,
                        int trans_b) noexcept
    size_t rg_attention_scratch_size(int T, int D, int NH) noexcept
    void rg_attention_forward(float *out, float *att, float *scratch, const float *q,
                              const float *k, const float *v, int B, int T, int D, int NH,
                              int areas) noexcept
    void rg_attention_backward(float *dq, float *dk, float *dv, float *ds, float *scratch,
                               const float *dout, const float *att, const float *q,
                               const float *k, const float *v, int B, int T, int D, int NH,
                               int areas) noexcept
    void rg_attention_step(float *out, float *scratch, const float *q, const float *kcache,
                           const float *vcache, const int *n, int B, int Tmax, int D,
                           int NH) noexcept
    void rg_layernorm_forward(float *out, float *mean, float *rstd, const float *x,
                              const float *g, const float *b, int N, int D, float eps) noexcept
    void rg_layernorm_backward(float *dx, float *dg, float *db, const float *dout,
                               const float *x, const float *g, const float *mean,
                               const float *rstd, int N, int D, int accumulate) noexcept
    void rg_crossentropy_forward(float *losses, int *hits, const float *logits,
                                 const int *targets, int N, int V, int ignore_index) noexcept
    void rg_crossentropy_forward_backward(float *losses, float *dlogits, int *hits,
                                          const float *logits, const int *targets, int N,
                                          int V, int ignore_index, float dscale) noexcept
    double rg_adam_update(float *params, float *m, float *v, const float *grads, size_t n,
                          double lr, double beta1, double beta2, double eps,
                          double weight_decay, const size_t *decay, size_t ndecay, int t,
                          double max_norm) noexcept
    void rg_relu_forward(float *out, const float *x, size_t n) noexcept
    void rg_relu_backward(float *dx, const float *dout, const float *out, size_t n) noexcept
    void rg_gelu_forward(float *out, const float *x, size_t n) noexcept
    void rg_gelu_backward(float *dx, const float *dout, const float *x, size_t n) noexcept
    void rg_dropout(float *out, const float *x, size_t n, size_t row, float p,
                    const int *seed, int site) noexcept
    void rg_add(float *out, const float *a, const float *b, size_t n) noexcept
    void rg_bias_add(float *x, const float *b, int N, int C) noexcept
    void rg_colsum(float *db, const float *dy, int N, int C, int accumulate) noexcept
    void rg_embedding_forward(float *out, const int *ids, const float *wte, const float *wpe,
                              int B, int T, int D) noexcept
    void rg_embedding_backward(float *dwte, float *dwpe, const float *dout, const int *ids,
                               int B, int T, int D, int V, int Tmax, int accumulate_wte,
                               int accumulate_wpe) noexcept
    double rg_sum_squares(const float *x, size_t n) noexcept
    size_t rg_sum_squares_chunk(size_t n) noexcept
    void rg_sum_squares_part(double *part, const float *x, size_t n, int c) noexcept
    double rg_sum_squares_total(const double *parts, int count) noexcept
    ctypedef struct rg_update:
        pass
    void rg_adam_apply(float *params, float *m, float *v, const float *grads, size_t n,
                       double lr, double beta1, double beta2, double eps, double weight_decay,
                       const size_t *decay, size_t ndecay, int t, double max_norm, double norm,
                       void (*work)(void *, rg_update *) noexcept nogil, void *ctx) noexcept
    void rg_update_wait(rg_update *u, size_t end) noexcept
    int rg_update_busy(rg_update *u) noexcept


_F32 = np.dtype(np.float32)
_I32 = np.dtype(np.intc)
_U16 = np.dtype(np.uint16)  # bf16 numbers: the upper halves of float32s
_SIMD_NAMES = {RG_SIMD_GENERIC: "generic", RG_SIMD_AVX2: "avx2", RG_SIMD_AVX512: "avx512"}
_BF16_NAMES = {RG_BF16_PORTABLE: "portable", RG_BF16_AVX512: "avx512bf16", RG_BF16_AMX: "amx"}
_INT_MAX = 2**31 - 1


# ---- checks --------------------------------------------------------------------------------

cdef tuple _shape(object a, str fn, str name, int ndim):
    """a's shape after checking it is a numpy array of `ndim` dimensions."""
    if not isinstance(a, np.ndarray):
        raise ValidationError(f"{fn}: {name} is a {type(a).__name__}, expected a numpy array")
    if a.ndim != ndim:
        raise ValidationError(f"{fn}: {name} has {a.ndim} dimensions {a.shape}, expected {ndim}")
    return a.shape


cdef void *_data(object a, str fn, str name, object dtype, tuple shape, bint out) except NULL:
    """Pointer to a's data after checking dtype, shape, layout and (for outputs) writability.
    The caller holds `a`, so the pointer stays valid for the call. The fast path asks the
    buffer protocol for exactly what the kernel needs; anything else goes to _refuse."""
    cdef Py_buffer buf
    cdef void *ptr
    cdef Py_ssize_t i, ndim = len(shape)
    cdef int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (PyBUF_WRITABLE if out else 0)
    cdef char kind = b"f" if dtype is _F32 else b"H" if dtype is _U16 else b"i"
    cdef bint ok
    if type(a) is not np.ndarray:
        _refuse(a, fn, name, dtype, shape, out)
    try:
        PyObject_GetBuffer(a, &buf, flags)
    except (BufferError, ValueError):  # numpy says ValueError for a wrong layout
        _refuse(a, fn, name, dtype, shape, out)
    ok = (buf.format[0] == kind and buf.format[1] == 0 and buf.ndim == ndim
          and buf.len > 0 and buf.len <= 4 * <Py_ssize_t>_INT_MAX)
    if ok:
        for i in range(ndim):
            if buf.shape[i] != <Py_ssize_t>shape[i]:
                ok = False
    ptr = buf.buf
    PyBuffer_Release(&buf)
    if not ok:
        _refuse(a, fn, name, dtype, shape, out)
    return ptr


cdef int _refuse(object a, str fn, str name, object dtype, tuple shape, bint out) except -1:
    """Raise the error that says why `a` cannot be passed as `name`."""
    if not isinstance(a, np.ndarray):
        raise ValidationError(f"{fn}: {name} is a {type(a).__name__}, expected a numpy array")
    if a.dtype != dtype:
        raise ValidationError(f"{fn}: {name} has dtype {a.dtype}, expected {dtype}")
    if a.shape != shape:
        raise ShapeMismatch(f"{fn}: {name}", shape, a.shape)
    if a.size == 0:
        raise ValidationError(f"{fn}: {name} is empty {a.shape}, expected at least one element")
    if a.size > _INT_MAX:
        raise ValidationError(f"{fn}: {name} has {a.size} elements, more than {_INT_MAX}")
    if not a.flags.c_contiguous:
        raise ValidationError(f"{fn}: {name} is not C-contiguous (strides {a.strides}); "
                              f"pass numpy.ascontiguousarray({name})")
    if out and not a.flags.writeable:
        raise ValidationError(f"{fn}: {name} is read-only, expected a writable output array")
    raise ValidationError(f"{fn}: {name} cannot be passed to the kernel (dtype {a.dtype}, "
                          f"shape {a.shape}), expected a native-endian {dtype} array")


cdef float *_f(object a, str fn, str name, tuple shape, bint out=False) except NULL:
    return <float *>_data(a, fn, name, _F32, shape, out)


cdef inline bint _overlap(const float *x, Py_ssize_t nx, const float *y, Py_ssize_t ny):
    return x < y + ny and y < x + nx


cdef Py_ssize_t _first_bad_id(const int *p, Py_ssize_t n, int V, bint allow_ignore,
                              int ignore) noexcept:
    """Index of the first of p[0 .. n) outside [0, V) (and, when allow_ignore, not equal to
    ignore), or -1 when all are in range."""
    cdef Py_ssize_t i
    for i in range(n):
        if (p[i] < 0 or p[i] >= V) and not (allow_ignore and p[i] == ignore):
            return i
    return -1


def scan_ids(ids, int V, bint allow_ignore=False, int ignore=-1):
    """int32 token ids checked and counted in C, without numpy temporaries: (-1, n) when
    every id lies in [0, V) or (with allow_ignore) equals ignore, n counting the ids that do
    not equal it; else (flat index of the first that fails, 0). The model's check of its
    inputs and targets."""
    fn = "scan_ids"
    cdef const int *p = <const int *>_data(ids, fn, "ids", _I32, ids.shape, False)
    cdef Py_ssize_t i, j, n = ids.size, count = 0
    i = _first_bad_id(p, n, V, allow_ignore, ignore)
    if i < 0:
        for j in range(n):
            count += not (allow_ignore and p[j] == ignore)
    return i, count


cdef int _check_id_range(const int *p, Py_ssize_t n, int V, bint allow_ignore, int ignore,
                         str fn, str name, object error) except -1:
    """Each of p[0 .. n) lies in [0, V) (or equals ignore, when allow_ignore); else raise
    `error` naming the array, the id and where it is."""
    cdef Py_ssize_t i = _first_bad_id(p, n, V, allow_ignore, ignore)
    if i >= 0:
        also = f" or ignore_index = {ignore}" if allow_ignore else ""
        raise error(f"{fn}: {name} holds token id {p[i]} at flat index {i}, expected ids "
                    f"in [0, {V}){also}")
    return 0


cdef int *_ids(object a, str fn, str name, tuple shape, int V) except NULL:
    """int32 token ids, each checked to lie in [0, V)."""
    cdef int *p = <int *>_data(a, fn, name, _I32, shape, False)
    cdef Py_ssize_t i, n = 1
    for i in range(len(shape)):
        n *= <Py_ssize_t>shape[i]
    _check_id_range(p, n, V, False, 0, fn, name, ValidationError)
    return p


cdef int _heads(str fn, int D, int NH) except -1:
    """The head size D / NH, after checking that NH heads divide D."""
    if NH < 1 or D % NH != 0:
        raise ValidationError(f"{fn}: num_heads = {NH} must be >= 1 and divide D = {D}")
    return D // NH


cdef int _apart(str fn, str name, const float *p, Py_ssize_t n, const float **others,
                const Py_ssize_t *sizes, int count, tuple names) except -1:
    """Scratch p[0, n) shares no memory with the arrays others[j] (sizes[j] floats, named
    names[j]), j < count."""
    cdef int j
    for j in range(count):
        if _overlap(p, n, others[j], sizes[j]):
            raise ValidationError(f"{fn}: {name} overlaps {names[j]}, expected separate "
                                  f"scratch")
    return 0


# ---- one kernel call as data: run now, and recorded into a Plan -------------------------

cdef enum:
    MANY = 4  # products of one sgemm_many call, at most (its Op holds 3 x MANY arrays)

cdef enum:
    OP_SGEMM, OP_SGEMM_MANY, OP_ATTENTION_FORWARD, OP_ATTENTION_BACKWARD, OP_LAYERNORM_FORWARD,
    OP_LAYERNORM_BACKWARD, OP_CROSSENTROPY_FORWARD_BACKWARD, OP_RELU_FORWARD,
    OP_RELU_BACKWARD, OP_GELU_FORWARD, OP_GELU_BACKWARD, OP_DROPOUT, OP_ADD, OP_BIAS_ADD,
    OP_COLSUM, OP_EMBEDDING_FORWARD, OP_EMBEDDING_BACKWARD, OP_GEMM_BF16, OP_TO_BF16,
    OP_CROSSENTROPY_FORWARD


cdef struct Op:
    int kind
    void *p[3 * MANY]  # the kernel's arrays, in its argument order
    int i[6]    # its int arguments (sizes, flags), in order
    size_t n    # element count of the flat kernels; sgemm_many's accumulate flags, as bits;
                # sgemm's and gemm_bf16's activation (RG_ACT_*)
    float f     # its float argument (eps, dscale, dropout's p)


cdef void _run(const Op *o) noexcept nogil:
    cdef float **p = <float **>o.p
    cdef const int *i = o.i
    cdef int acc[MANY]
    cdef int j
    if o.kind == OP_SGEMM:
        rg_sgemm(p[0], p[1], p[2], i[0], i[1], i[2], i[3], i[4], i[5], p[3], <int>o.n, p[4])
    elif o.kind == OP_SGEMM_MANY:  # C[0..MANY) in p[0..], A in p[MANY..], B in p[2 MANY..]
        for j in range(MANY):
            acc[j] = (o.n >> j) & 1
        rg_sgemm_many(i[5], p, <const float **>(p + MANY), <const float **>(p + 2 * MANY), i[0],
                      i[1], i[2], i[3], i[4], acc)
    elif o.kind == OP_ATTENTION_FORWARD:
        rg_attention_forward(p[0], p[1], p[2], p[3], p[4], p[5], i[0], i[1], i[2], i[3], i[4])
    elif o.kind == OP_ATTENTION_BACKWARD:
        rg_attention_backward(p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9],
                              i[0], i[1], i[2], i[3], i[4])
    elif o.kind == OP_LAYERNORM_FORWARD:
        rg_layernorm_forward(p[0], p[1], p[2], p[3], p[4], p[5], i[0], i[1], o.f)
    elif o.kind == OP_LAYERNORM_BACKWARD:
        rg_layernorm_backward(p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], i[0], i[1], i[2])
    elif o.kind == OP_CROSSENTROPY_FORWARD_BACKWARD:
        rg_crossentropy_forward_backward(p[0], p[1], <int *>o.p[2], p[3], <int *>o.p[4], i[0],
                                         i[1], i[2], o.f)
    elif o.kind == OP_CROSSENTROPY_FORWARD:
        rg_crossentropy_forward(p[0], <int *>o.p[1], p[2], <int *>o.p[3], i[0], i[1], i[2])
    elif o.kind == OP_RELU_FORWARD:
        rg_relu_forward(p[0], p[1], o.n)
    elif o.kind == OP_RELU_BACKWARD:
        rg_relu_backward(p[0], p[1], p[2], o.n)
    elif o.kind == OP_GELU_FORWARD:
        rg_gelu_forward(p[0], p[1], o.n)
    elif o.kind == OP_GELU_BACKWARD:
        rg_gelu_backward(p[0], p[1], p[2], o.n)
    elif o.kind == OP_DROPOUT:
        rg_dropout(p[0], p[1], o.n, i[1], o.f, <int *>o.p[2], i[0])
    elif o.kind == OP_ADD:
        rg_add(p[0], p[1], p[2], o.n)
    elif o.kind == OP_BIAS_ADD:
        rg_bias_add(p[0], p[1], i[0], i[1])
    elif o.kind == OP_COLSUM:
        rg_colsum(p[0], p[1], i[0], i[1], i[2])
    elif o.kind == OP_EMBEDDING_FORWARD:
        rg_embedding_forward(p[0], <int *>o.p[1], p[2], p[3], i[0], i[1], i[2])
    elif o.kind == OP_EMBEDDING_BACKWARD:
        rg_embedding_backward(p[0], p[1], p[2], <int *>o.p[3], i[0], i[1], i[2], i[3], i[4],
                              i[5] & 1, i[5] >> 1)
    elif o.kind == OP_GEMM_BF16:  # sgemm's arguments, and B's bf16 copy in p[5]
        rg_gemm_bf16(p[0], p[1], p[2], <uint16_t *>o.p[5], i[0], i[1], i[2], i[3], i[4], i[5],
                     p[3], <int>o.n, p[4])
    elif o.kind == OP_TO_BF16:
        rg_to_bf16(<uint16_t *>o.p[0], p[1], o.n)


cdef int _check_ids(const Op *o) except -1:
    """The int arrays of a recorded op still hold ids in range (checked again at replay:
    their contents may have changed since)."""
    if o.kind == OP_CROSSENTROPY_FORWARD_BACKWARD:
        _check_id_range(<int *>o.p[4], o.i[0], o.i[1], True, o.i[2],
                        "crossentropy_forward_backward", "targets", TokenError)
    elif o.kind == OP_CROSSENTROPY_FORWARD:
        _check_id_range(<int *>o.p[3], o.i[0], o.i[1], True, o.i[2],
                        "crossentropy_forward", "targets", TokenError)
    elif o.kind == OP_EMBEDDING_FORWARD:
        _check_id_range(<int *>o.p[1], <Py_ssize_t>o.i[0] * o.i[1], o.i[3], False, 0,
                        "embedding_forward", "ids", TokenError)
    elif o.kind == OP_EMBEDDING_BACKWARD:
        _check_id_range(<int *>o.p[3], <Py_ssize_t>o.i[0] * o.i[1], o.i[3], False, 0,
                        "embedding_backward", "ids", TokenError)
    return 0


cdef dict _recording = {}  # thread id -> the plan that thread is recording


cdef inline Plan _recorder():
    """The plan the calling thread is recording, or None."""
    if not _recording:
        return None
    return _recording.get(PyThread_get_thread_ident())


cdef int _submit(Op *op, tuple arrays) except -1:
    """Run one checked kernel call; record it too if this thread is recording a plan."""
    cdef Plan plan = _recorder()
    if plan is not None:
        plan._append(op, arrays)
    with nogil:
        _run(op)
    return 0


cdef int _not_recorded(str fn) except -1:
    """Refuse a kernel whose result Python reads back (a plan could not replay it)."""
    if _recorder() is not None:
        raise ValidationError(f"{fn} cannot be recorded in a Plan: a replay would not "
                              f"return its result")
    return 0


cdef class Plan:
    """Kernel calls recorded while they run, replayed in C by ``run()``.

        with Plan() as plan:      # every kernel call of this thread runs and is recorded
            model_step(...)
        plan.run()                # the same calls again, on the same arrays

    A plan keeps a reference to every array it was recorded with, so its pointers stay
    valid; a replay reads whatever those arrays hold by then (new token ids copied into
    the recorded ids array, updated parameters). Token ids and targets are checked again
    before each replay. Kernels whose result Python reads (sum_squares, adam_update, ...)
    refuse to be recorded. A plan records the calls of the thread that entered it; each
    thread records one plan at a time."""

    cdef Op *ops
    cdef Py_ssize_t n, cap
    cdef list arrays
    cdef bint entered
    cdef size_t *needs  # needs[j]: params[0, needs[j]) the first calls up to j read
    cdef tuple needs_for  # (calls, addresses of params, m, v, grads) needs was worked out for
    # the two-stream schedule (see _streams): per item, its stream, the item of the other
    # stream it waits for (-1: none), and what it does: call `start + task` when task >= 0,
    # else sum the squares of chunk -1 - task of the gradients into parts
    cdef unsigned char *stream
    cdef int *wait
    cdef int *task
    cdef double *parts
    cdef Py_ssize_t items, chunks
    cdef tuple streams_for  # (start, address and size of the gradients) it was made for

    def __cinit__(self):
        self.ops = NULL
        self.n = self.cap = 0
        self.arrays = []
        self.entered = False
        self.needs = NULL
        self.needs_for = None
        self.stream = NULL
        self.wait = NULL
        self.task = NULL
        self.parts = NULL
        self.items = self.chunks = 0
        self.streams_for = None

    def __dealloc__(self):
        free(self.ops)
        free(self.needs)
        free(self.stream)
        free(self.wait)
        free(self.task)
        free(self.parts)

    cdef int _append(self, const Op *op, tuple arrays) except -1:
        cdef Op *grown
        if self.n == self.cap:
            grown = <Op *>realloc(self.ops, (2 * self.cap + 16) * sizeof(Op))
            if grown == NULL:
                raise MemoryError("Plan: out of memory recording a kernel call")
            self.ops, self.cap = grown, 2 * self.cap + 16
        self.ops[self.n] = op[0]
        self.n += 1
        self.arrays.append(arrays)
        return 0

    def __enter__(self):
        thread = PyThread_get_thread_ident()
        if thread in _recording:
            raise ValidationError("Plan: this thread is recording another plan, expected "
                                  "one at a time")
        if self.entered:
            raise ValidationError("Plan: already recorded, expected a new Plan()")
        self.entered = True
        _recording[thread] = self
        return self

    def __exit__(self, *exc):
        _recording.pop(PyThread_get_thread_ident(), None)
        return False

    def __len__(self):
        return self.n

    def run(self, AdamStep update=None, Py_ssize_t forward=0, bint streams=False,
            grads=None):
        """Replay every recorded call, in order, without the GIL.

        ``forward``: the number of leading calls that make a step's forward pass. With
        `update` (an AdamStep not yet applied), the update is applied first, overlapped
        with those calls: one thread replays them while the others update the parameters,
        and each call waits for the parameters it reads (see AdamStep). Those calls must
        not touch the update's m, v or grads. With ``streams``, the calls after them run
        as two streams on one thread each: the leaf calls (whose outputs no later call
        reads, as a backward pass's weight gradients) on one, the rest on the other, each
        call waiting for the calls of the other stream whose memory it shares (worth it
        where the calls are too small to split well, as a batch-1 step's). The results
        are the same as update.apply() then run(), bit for bit.

        With `grads` (a flat float32 array), returns sum_squares(grads) after the replay,
        the same bits; with streams, the leaf stream sums each of sum_squares' chunks as
        soon as the calls that write it are done."""
        cdef Py_ssize_t j, start = 0
        cdef _Overlap work
        cdef _Items items
        cdef const float *g = NULL
        cdef size_t n = 0
        cdef double total = 0.0
        self._check_replay("Plan.run: the plan")
        if not 0 <= forward <= self.n:
            raise ValidationError(f"Plan.run: forward = {forward}, expected 0 to {self.n} "
                                  f"calls")
        if grads is not None:
            n = _shape(grads, "Plan.run", "grads", 1)[0]
            g = _f(grads, "Plan.run", "grads", (n,))
        if update is not None:
            update._check_unapplied("Plan.run")
            work.ops, work.n, work.needs = self.ops, forward, self._needs(update, forward)
            work.ran = 0
            with nogil:
                update._apply(_replay_overlapped, &work)
            start = work.ran
        if streams:
            self._streams(forward, <size_t>g, n)
            items.ops, items.task, items.parts, items.grads, items.n = (
                self.ops + forward, self.task, self.parts, g, n)
        with nogil:
            for j in range(start, forward if streams else self.n):
                _run(&self.ops[j])
            if streams:
                rg_run_streams(<int>self.items, self.stream, self.wait, _run_item, &items)
                total = rg_sum_squares_total(self.parts, <int>self.chunks)
            elif g != NULL:
                total = rg_sum_squares(g, n)
        return total if g != NULL else None

    cdef int _check_replay(self, str what) except -1:
        """Refuse a replay of a plan still being recorded (`what`: who says so), and check
        its token ids again (their arrays may hold others by now)."""
        cdef Py_ssize_t j
        if self in _recording.values():
            raise ValidationError(f"{what} is still being recorded")
        for j in range(self.n):
            _check_ids(&self.ops[j])
        return 0

    def streams(self, Py_ssize_t forward, grads=None):
        """The two-stream schedule ``run(..., forward, streams=True, grads)`` follows after
        the first `forward` calls: per item (stream, the item of the other stream it waits
        for or -1, what it does), what it does being ("call", index counted from
        `forward`) or ("norm", chunk of the gradients)."""
        cdef size_t n = 0
        cdef const float *g = NULL
        if not 0 <= forward <= self.n:
            raise ValidationError(f"Plan.streams: forward = {forward}, expected 0 to {self.n}")
        if grads is not None:
            n = _shape(grads, "Plan.streams", "grads", 1)[0]
            g = _f(grads, "Plan.streams", "grads", (n,))
        self._streams(forward, <size_t>g, n)
        return [(self.stream[j], self.wait[j],
                 ("call", self.task[j]) if self.task[j] >= 0 else ("norm", -1 - self.task[j]))
                for j in range(self.items)]

    cdef void _free_streams(self) noexcept:
        free(self.stream)
        free(self.wait)
        free(self.task)
        free(self.parts)
        self.stream, self.wait, self.task, self.parts = NULL, NULL, NULL, NULL
        self.streams_for = None

    cdef int _streams(self, Py_ssize_t start, size_t grads, size_t n) except -1:
        """The two-stream schedule of calls start..n-1 (cached). A call is a leaf (stream
        1) when it writes something and no later call touches what it writes; calls i < k
        of different streams that share memory, one of them writing it, make k wait for i.
        Every array of a call counts as read, its outputs (the kernel's first arguments)
        as written too. Leaves after the last non-leaf call run on stream 0 instead. With
        gradients (address, n floats), each of sum_squares' chunks of them is summed right
        after the last call that writes it, waiting for the last such call of the other
        stream: on stream 1, or on the two streams in turn for chunks written after the
        last non-leaf call."""
        key = (start, grads, n)
        if self.streams_for == key:
            return 0
        cdef Py_ssize_t m = self.n - start, j
        ops, lo, hi, out = [], [], [], []
        for j in range(start, self.n):
            outputs = _outputs(&self.ops[j])
            for i, a in enumerate(self.arrays[j]):
                a_lo, a_hi = _span(a)
                ops.append(j - start)
                lo.append(a_lo)
                hi.append(a_hi)
                out.append(i < outputs)
        op, lo, hi, out = (np.array(x, dtype) for x, dtype in
                           ((ops, np.intp), (lo, np.uint64), (hi, np.uint64), (out, bool)))
        shared = (lo[:, None] < hi[None, :]) & (lo[None, :] < hi[:, None])
        later = op[None, :] > op[:, None]  # [r, q]: range q belongs to a later call
        touched_later = (shared & later).any(axis=1)
        leaf = np.ones(m, bool)
        np.logical_and.at(leaf, op[out], ~touched_later[out])
        leaf &= np.bincount(op[out], minlength=m) > 0
        # stream 1 takes the leaves, but those after the last other call go to stream 0,
        # which has nothing left to do by then
        rest = np.nonzero(~leaf)[0]
        tail = rest[rest.size - 1] if rest.size else m
        on1 = leaf & (np.arange(m) < tail)
        conflict = np.zeros((m, m), bool)
        r, q = np.nonzero(shared & later & (out[:, None] | out[None, :]))
        conflict[op[r], op[q]] = True  # [i, k]: call k waits for call i, if in the other stream
        conflict &= on1[:, None] != on1[None, :]
        waits = np.where(conflict.any(axis=0),
                         m - 1 - np.argmax(conflict[::-1], axis=0), -1) if m else []
        # each gradient chunk's last writer in either stream (-1: none)
        chunk = rg_sum_squares_chunk(n) if n else 1
        count = (n + chunk - 1) // chunk
        last = [[-1] * count, [-1] * count]
        end = grads + 4 * n
        for k in np.nonzero(out)[0]:
            a, b = max(int(lo[k]), grads), min(int(hi[k]), end)
            for c in range((a - grads) // 4 // chunk, ((b - grads) // 4 - 1) // chunk + 1
                           if a < b else 0):
                s_ = int(on1[op[k]])
                last[s_][c] = max(last[s_][c], int(op[k]))
        # the items in order: each call, then the chunks it is the last writer of, on
        # stream 1, or on both in turn where the streams' other work is over
        after, side, turn = {}, [1] * count, 1
        for c in range(count):
            p_ = max(last[0][c], last[1][c])
            after.setdefault(p_, []).append(c)
            if p_ > tail:
                side[c], turn = turn, 1 - turn
        order = [-1 - c for c in after.get(-1, [])]
        for j in range(m):
            order.append(j)
            order.extend(-1 - c for c in after.get(j, []))
        position = {t: i for i, t in enumerate(order)}
        self._free_streams()
        self.items, self.chunks = len(order), count
        self.stream = <unsigned char *>malloc(self.items + 1)
        self.wait = <int *>malloc((self.items + 1) * sizeof(int))
        self.task = <int *>malloc((self.items + 1) * sizeof(int))
        self.parts = <double *>malloc((count + 1) * sizeof(double))
        if self.stream == NULL or self.wait == NULL or self.task == NULL or self.parts == NULL:
            self._free_streams()
            raise MemoryError("Plan.run: out of memory")
        for i, t in enumerate(order):
            self.task[i] = t
            if t >= 0:
                self.stream[i] = on1[t]
                self.wait[i] = position[waits[t]] if waits[t] >= 0 else -1
            else:
                s_ = side[-1 - t]
                self.stream[i] = s_
                w = last[1 - s_][-1 - t]
                self.wait[i] = position[w] if w >= 0 else -1
        self.streams_for = key
        return 0

    cdef size_t *_needs(self, AdamStep update, Py_ssize_t overlap) except NULL:
        """needs[j] for the first `overlap` calls (cached): the end of the part of
        update's params that calls 0..j read, in elements; refuses calls that touch the
        update's m, v or grads."""
        cdef size_t base = <size_t>update.params_ptr, end = 0, lo, hi
        cdef size_t size = 4 * update.n
        cdef Py_ssize_t j
        key = (overlap, base, <size_t>update.m_ptr, <size_t>update.v_ptr,
               <size_t>update.grads_ptr)
        if self.needs_for == key:
            return self.needs
        free(self.needs)
        self.needs_for = None
        self.needs = <size_t *>malloc((overlap + 1) * sizeof(size_t))
        if self.needs == NULL:
            raise MemoryError("Plan.run: out of memory")
        for j in range(overlap):
            for a in self.arrays[j]:
                lo, hi = _span(a)
                for name, other in (("m", update.m), ("v", update.v), ("grads", update.grads)):
                    if np.may_share_memory(a, other):
                        raise ValidationError(f"Plan.run: call {j} of the overlapped ones "
                                              f"uses the update's {name}, expected calls "
                                              f"that leave m, v and grads alone")
                if lo < base + size and hi > base:
                    end = max(end, (min(hi, base + size) - base + 3) // 4)
            self.needs[j] = end
        self.needs_for = key
        return self.needs


cdef tuple _span(object a):
    """The bytes [lo, hi) of memory a recorded call's array covers."""
    lo = a.__array_interface__["data"][0]
    return lo, lo + a.nbytes


cdef Py_ssize_t _outputs(const Op *o) noexcept:
    """How many of the arrays of a call (in the kernel's argument order) it writes."""
    if o.kind == OP_SGEMM_MANY:
        return o.i[5]
    if o.kind == OP_SGEMM or o.kind == OP_GEMM_BF16:
        return 1 + (o.p[4] != NULL)  # C, and pre when given
    if o.kind == OP_ATTENTION_BACKWARD:
        return 5
    if o.kind == OP_LAYERNORM_BACKWARD:
        return 2 + (o.p[2] != NULL)  # dx, dg, and db when given
    if o.kind in (OP_ATTENTION_FORWARD, OP_LAYERNORM_FORWARD,
                  OP_CROSSENTROPY_FORWARD_BACKWARD):
        return 3
    if o.kind == OP_EMBEDDING_BACKWARD or o.kind == OP_CROSSENTROPY_FORWARD:
        return 2
    return 1


cdef struct _Items:
    const Op *ops  # the plan's calls from the first of the streams on
    const int *task
    double *parts
    const float *grads
    size_t n


cdef void _run_item(void *ctx, int j) noexcept nogil:
    """rg_run_streams' item j of a plan's schedule: a call, or a chunk of the norm."""
    cdef _Items *w = <_Items *>ctx
    cdef int t = w.task[j]
    if t >= 0:
        _run(&w.ops[t])
    else:
        rg_sum_squares_part(&w.parts[-1 - t], w.grads, w.n, -1 - t)


cdef struct _Pair:
    const Op *a  # stream 0's calls: items 0 .. na - 1
    const Op *b  # stream 1's: items na on
    Py_ssize_t na


cdef void _run_pair_item(void *ctx, int j) noexcept nogil:
    """rg_run_streams' item j of run_pair: a call of the first plan, then of the second."""
    cdef _Pair *w = <_Pair *>ctx
    if j < w.na:
        _run(&w.a[j])
    else:
        _run(&w.b[j - w.na])


def run_pair(Plan first, Plan second):
    """Replay two plans side by side without the GIL: `first` on one thread and `second` on
    another, each call on one kernel thread (on a single thread, first then second). The
    two must write nothing that the other reads or writes (a training step's two halves
    of a batch, each on its own activations and gradients)."""
    cdef Py_ssize_t j, n = first.n + second.n
    cdef _Pair pair
    first._check_replay("run_pair: a plan")
    second._check_replay("run_pair: a plan")
    cdef unsigned char *stream = <unsigned char *>malloc(n + 1)
    cdef int *wait = <int *>malloc((n + 1) * sizeof(int))
    if stream == NULL or wait == NULL:
        free(stream)
        free(wait)
        raise MemoryError("run_pair: out of memory")
    for j in range(n):
        stream[j] = j >= first.n
        wait[j] = -1
    pair.a, pair.b, pair.na = first.ops, second.ops, first.n
    with nogil:
        rg_run_streams(<int>n, stream, wait, _run_pair_item, &pair)
    free(stream)
    free(wait)


cdef struct _Overlap:
    const Op *ops
    Py_ssize_t n
    const size_t *needs
    Py_ssize_t ran  # calls replayed while the update ran


cdef void _replay_overlapped(void *ctx, rg_update *u) noexcept nogil:
    """The work rg_adam_apply overlaps with the update: a plan's first calls, each once
    the parameters it reads are updated, until the update needs no more help."""
    cdef _Overlap *w = <_Overlap *>ctx
    while w.ran < w.n and rg_update_busy(u):
        rg_update_wait(u, w.needs[w.ran])
        _run(&w.ops[w.ran])
        w.ran += 1


cdef class AdamStep:
    """One Adam / AdamW step whose gradient norm is known, to be applied later: by
    ``apply()``, or overlapped with the first calls of a plan by ``Plan.run(step, n)``
    (one thread replays those calls while the others update the parameters, in buffer
    order; each call waits for the part of the parameters it reads). Either way the
    parameters and moments come out as ``adam_update`` leaves them, bit for bit, given
    the same grads (and decay ranges); the step applies once.

        norm = math.sqrt(sum_squares(grads))        # finite
        step = AdamStep(params, m, v, grads, lr, beta1, beta2, eps, weight_decay, t,
                        max_norm, norm, decay)
    """

    cdef readonly object params, m, v, grads
    cdef float *params_ptr
    cdef float *m_ptr
    cdef float *v_ptr
    cdef const float *grads_ptr
    cdef size_t n
    cdef double lr, beta1, beta2, eps, weight_decay, max_norm, norm
    cdef int t
    cdef size_t whole[2]
    cdef size_t *decay_ptr  # a copy of the decay ranges: the caller's array may change
    cdef size_t ndecay
    cdef readonly bint applied

    def __init__(self, params, m, v, grads, double lr, double beta1, double beta2,
                 double eps, double weight_decay, int t, double max_norm, double norm,
                 decay=None):
        fn = "AdamStep"
        s = _shape(params, fn, "params", 1)
        _check_adam(fn, t, beta1, beta2)
        if not math.isfinite(norm) or norm < 0:
            raise ValidationError(f"{fn}: norm = {norm}, expected the finite gradient norm")
        self.params_ptr = _f(params, fn, "params", s, True)
        self.m_ptr = _f(m, fn, "m", s, True)
        self.v_ptr = _f(v, fn, "v", s, True)
        self.grads_ptr = _f(grads, fn, "grads", s)
        cdef const size_t *ranges = _decay_ranges(fn, decay, s[0], self.whole, &self.ndecay)
        free(self.decay_ptr)
        self.decay_ptr = <size_t *>malloc(2 * self.ndecay * sizeof(size_t) + 1)
        if self.decay_ptr == NULL:
            raise MemoryError(f"{fn}: out of memory")
        memcpy(self.decay_ptr, ranges, 2 * self.ndecay * sizeof(size_t))
        self.params, self.m, self.v, self.grads = params, m, v, grads
        self.n = s[0]
        self.lr, self.beta1, self.beta2, self.eps = lr, beta1, beta2, eps
        self.weight_decay, self.t, self.max_norm, self.norm = weight_decay, t, max_norm, norm
        self.applied = False

    def __dealloc__(self):
        free(self.decay_ptr)

    cdef int _check_unapplied(self, str fn) except -1:
        if self.applied:
            raise ValidationError(f"{fn}: this AdamStep was applied already, expected a new one")
        return 0

    cdef void _apply(self, void (*work)(void *, rg_update *) noexcept nogil,
                     void *ctx) noexcept nogil:
        rg_adam_apply(self.params_ptr, self.m_ptr, self.v_ptr, self.grads_ptr, self.n,
                      self.lr, self.beta1, self.beta2, self.eps, self.weight_decay,
                      self.decay_ptr, self.ndecay, self.t, self.max_norm, self.norm, work, ctx)
        self.applied = True

    def apply(self):
        """Update the parameters and moments now, on every thread."""
        self._check_unapplied("AdamStep.apply")
        _not_recorded("AdamStep.apply")
        with nogil:
            self._apply(NULL, NULL)


# ---- runtime ---------------------------------------------------------------------------------

def physical_cores():
    """Number of physical cores this process may run on (hyper-threads not counted)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        base = f"/sys/devices/system/cpu/cpu{cpu}/topology/"
        try:
            with open(base + "physical_package_id") as pkg, open(base + "core_id") as core:
                cores.add((pkg.read().strip(), core.read().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores))


def _thread_count(n, str fn, int least):
    """n as an int, checked to lie in [least, max_threads()]: far more threads than CPUs
    only slow the kernels down, and tens of thousands crash the OpenMP runtime."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < least:
        raise ValidationError(f"{fn}: n = {n!r}, expected an integer >= {least}")
    if n > max_threads():
        raise ValidationError(f"{fn}: n = {n!r}, expected at most {threads_bound_text()}")
    return int(n)


def set_num_threads(n):
    """Use `n` OpenMP threads in the kernels of every thread of the process (1 <= n <=
    resources.max_threads(); a no-op without OpenMP)."""
    rg_set_num_threads(_thread_count(n, "set_num_threads", 1))


def set_local_threads(n):
    """Use `n` threads in the kernels this thread calls (1 <= n <= resources.max_threads()),
    or go back to the process-wide count (n = 0); other threads are not affected. Returns
    the local count it replaces (0: there was none)."""
    return rg_set_local_threads(_thread_count(n, "set_local_threads", 0))


def get_num_threads():
    """Threads the kernels this thread calls use now."""
    return rg_num_threads()


def set_simd(name):
    """Force the SIMD path: 'generic', 'avx2' or 'avx512' (clamped to what the CPU has).
    Returns the path now in use."""
    levels = {v: k for k, v in _SIMD_NAMES.items()}
    if name not in levels:
        raise ValidationError(f"set_simd: name = {name!r}, expected one of {sorted(levels)}")
    return _SIMD_NAMES[rg_set_simd_level(levels[name])]


def kernels_info():
    """What the extension was built with and uses now: OpenMP, threads, SIMD path."""
    return {
        "openmp": bool(rg_has_openmp()),
        "num_threads": rg_num_threads(),
        "physical_cores": physical_cores(),
        "simd": _SIMD_NAMES[rg_simd_level()],
        "simd_supported": _SIMD_NAMES[rg_simd_supported()],
        "bf16": _BF16_NAMES[rg_bf16_path()],
        "bf16_supported": bf16_paths(),
    }


# OMP_NUM_THREADS wins (OpenMP reads it itself); otherwise one thread per physical core.
# rustgpt/__init__.py bounds the variable before OpenMP loads, unless another library
# loaded OpenMP first: then its count is bounded here.
if not os.environ.get("OMP_NUM_THREADS"):
    rg_set_num_threads(physical_cores())
elif rg_num_threads() > max_threads():
    rg_set_num_threads(max_threads())


# ---- matmul -----------------------------------------------------------------------------------

cdef tuple _gemm_dims(str fn, object A, str a_name, object B, str b_name, bint trans_a,
                      bint trans_b):
    """A's and B's shapes, and (M, N, K) of op(A) (M, K) @ op(B) (K, N), checked to agree."""
    sa = _shape(A, fn, a_name, 2)
    sb = _shape(B, fn, b_name, 2)
    M, K = (sa[1], sa[0]) if trans_a else sa
    N, kb = (sb[0], sb[1]) if trans_b else (sb[1], sb[0])
    if kb != K:
        raise ShapeMismatch(f"{fn}: {b_name}{'^T' if trans_b else ''}", (K, N), (kb, N))
    return sa, sb, (M, N, K)


_ACTIVATIONS = {None: RG_ACT_NONE, "relu": RG_ACT_RELU, "gelu": RG_ACT_GELU}


def sgemm(C, A, B, bint trans_a=False, bint trans_b=False, bint accumulate=False, bias=None,
          activation=None, pre=None):
    """C = op(A) @ op(B) (C += ... when accumulate). op(A): (M, K), op(B): (K, N), C: (M, N).
    Then C += bias (N,) per row, when given; pre = C, when given (M, N): the values before
    the activation, as gelu_backward takes them; and C = activation(C) for activation
    "relu" or "gelu" (None: none). All on each tile of C as it is finished: the same bits
    as bias_add and relu_forward or gelu_forward after the product, without their passes
    over C."""
    fn = "sgemm"
    if activation not in _ACTIVATIONS:
        raise ValidationError(f"{fn}: activation = {activation!r}, expected None, 'relu' or "
                              f"'gelu'")
    sa, sb, dims = _gemm_dims(fn, A, "A", B, "B", trans_a, trans_b)
    cdef int M = dims[0], N = dims[1], K = dims[2]
    cdef const float *a = _f(A, fn, "A", sa)
    cdef const float *b = _f(B, fn, "B", sb)
    cdef float *c = _f(C, fn, "C", (M, N), True)
    cdef const float *bp = NULL
    cdef float *pp = NULL
    if bias is not None:
        bp = _f(bias, fn, "bias", (N,))
        if _overlap(c, M * N, bp, N):
            raise ValidationError(f"{fn}: C overlaps bias, expected a separate output array")
    if _overlap(c, M * N, a, M * K) or _overlap(c, M * N, b, K * N):
        raise ValidationError(f"{fn}: C overlaps an input, expected a separate output array")
    if pre is not None:
        pp = _f(pre, fn, "pre", (M, N), True)
        if (_overlap(pp, M * N, c, M * N) or _overlap(pp, M * N, a, M * K)
                or _overlap(pp, M * N, b, K * N) or (bp != NULL and _overlap(pp, M * N, bp, N))):
            raise ValidationError(f"{fn}: pre overlaps C or an input, expected a separate "
                                  f"output array")
    cdef Op op
    op.kind, op.p[0], op.p[1], op.p[2], op.p[3] = OP_SGEMM, c, <void *>a, <void *>b, <void *>bp
    op.p[4] = pp
    op.i[0], op.i[1], op.i[2], op.i[3], op.i[4], op.i[5] = M, N, K, trans_a, trans_b, accumulate
    op.n = _ACTIVATIONS[activation]
    cdef Bf16Matmuls mode = _bf16_mode()
    if mode is not None:
        B = mode._route(&op, B, <Py_ssize_t>K * N)
    # outputs first (Plan's rule): C, pre
    _submit(&op, tuple(x for x in (C, pre, A, B, bias) if x is not None))


def sgemm_many(Cs, As, Bs, bint trans_a=False, bint trans_b=False, accumulate=False):
    """C[i] = op(A[i]) @ op(B[i]) for i in order (+= where accumulate: one bool, or one per
    product): up to 4 products of one shape and transposition in one parallel region, for
    small matrices faster than as many sgemm calls, with the same results bit for bit. A C
    may recur, and then accumulates in order:
    ``sgemm_many((dx, dx), (dq, dk), (wq, wk), trans_b=True, accumulate=(False, True))`` is
    dx = dq wq^T + dk wk^T."""
    fn = "sgemm_many"
    try:
        Cs, As, Bs = tuple(Cs), tuple(As), tuple(Bs)
    except TypeError:
        raise ValidationError(f"{fn}: Cs, As and Bs must be sequences of arrays") from None
    cdef int count = len(Cs)
    if not 1 <= count <= MANY or len(As) != count or len(Bs) != count:
        raise ValidationError(f"{fn}: {len(Cs)}, {len(As)} and {len(Bs)} arrays in Cs, As and "
                              f"Bs, expected the same number, 1 to {MANY}")
    if isinstance(accumulate, (bool, np.bool_)):
        flags = (accumulate,) * count
    else:
        try:
            flags = tuple(accumulate)
        except TypeError:
            flags = ()
    if len(flags) != count or not all(isinstance(f, (bool, np.bool_)) for f in flags):
        raise ValidationError(f"{fn}: accumulate = {accumulate!r}, expected a bool or {count} "
                              f"bools")
    sa, sb, dims = _gemm_dims(fn, As[0], "As[0]", Bs[0], "Bs[0]", trans_a, trans_b)
    cdef int M = dims[0], N = dims[1], K = dims[2]
    cdef Op op
    cdef int j, l
    cdef float *c
    op.kind, op.n = OP_SGEMM_MANY, 0
    for j in range(count):
        op.p[MANY + j] = _f(As[j], fn, f"As[{j}]", sa)
        op.p[2 * MANY + j] = _f(Bs[j], fn, f"Bs[{j}]", sb)
    for j in range(count):
        op.p[j] = c = _f(Cs[j], fn, f"Cs[{j}]", (M, N), True)
        op.n |= (<size_t>bool(flags[j])) << j
        for l in range(count):
            if (_overlap(c, M * N, <float *>op.p[MANY + l], M * K)
                    or _overlap(c, M * N, <float *>op.p[2 * MANY + l], K * N)):
                raise ValidationError(f"{fn}: Cs[{j}] overlaps an input, expected separate "
                                      f"output arrays")
        for l in range(j):
            if op.p[l] != c and _overlap(c, M * N, <float *>op.p[l], M * N):
                raise ValidationError(f"{fn}: Cs[{j}] overlaps Cs[{l}] without being it, "
                                      f"expected the same array or a separate one")
    op.i[0], op.i[1], op.i[2], op.i[3], op.i[4], op.i[5] = M, N, K, trans_a, trans_b, count
    cdef Bf16Matmuls mode = _bf16_mode()
    cdef Op one
    if mode is not None:  # the products one after another: the same sums into a C that recurs
        for j in range(count):
            one.kind, one.p[0], one.p[1], one.p[2] = OP_SGEMM, op.p[j], op.p[MANY + j], op.p[2 * MANY + j]
            one.p[3] = one.p[4] = NULL
            one.i[0], one.i[1], one.i[2], one.i[3], one.i[4] = M, N, K, trans_a, trans_b
            one.i[5], one.n = bool(flags[j]), RG_ACT_NONE
            B = mode._route(&one, Bs[j], <Py_ssize_t>K * N)
            _submit(&one, (Cs[j], As[j], B))
        return
    _submit(&op, Cs + As + Bs)


# ---- bf16 matmuls ---------------------------------------------------------------------------

def bf16_paths():
    """Names of the bf16 matmul paths this CPU runs, best last: 'portable' always, then
    'avx512bf16' (vdpbf16ps) and 'amx' (tile multiply-adds; also needs Linux to grant the
    process the tile state) where the CPU has them."""
    have = rg_bf16_supported()
    return [name for path, name in sorted(_BF16_NAMES.items()) if have >> path & 1]


def set_bf16(name):
    """Force the path of bf16 matmuls: 'portable', 'avx512bf16' or 'amx'. Raises
    ValidationError when this CPU (or, for AMX, the OS) does not run it; the path in use is
    then unchanged. Returns the path now in use."""
    paths = {v: k for k, v in _BF16_NAMES.items()}
    if name not in paths:
        raise ValidationError(f"set_bf16: name = {name!r}, expected one of {sorted(paths)}")
    status = rg_set_bf16_path(paths[name])
    if status == -2:
        raise ValidationError(f"set_bf16: the OS refused this process the AMX tile state "
                              f"(arch_prctl ARCH_REQ_XCOMP_PERM), expected one of "
                              f"{bf16_paths()}")
    if status != 0:
        raise ValidationError(f"set_bf16: this CPU has no {name} path, expected one of "
                              f"{bf16_paths()}")
    return _BF16_NAMES[rg_bf16_path()]


def to_bf16(out, x):
    """out = x rounded to bf16 (to nearest, ties to even), each the upper 16 bits of a
    float32, as uint16. x: float32, any shape; out: uint16 of x's shape."""
    fn = "to_bf16"
    shape = x.shape if isinstance(x, np.ndarray) else ()
    cdef const float *xp = _f(x, fn, "x", shape)
    cdef void *op = _data(out, fn, "out", _U16, shape, True)
    cdef Op o
    o.kind, o.p[0], o.p[1], o.n = OP_TO_BF16, op, <void *>xp, x.size
    _submit(&o, (out, x))


def bf16_pack_a(A, bint trans_a=False, int mr=1):
    """The packed bf16 A every bf16 path reads (see the header's rg_bf16_pack_a), a new
    uint16 array (Mp, Kp): op(A) (M, K) rounded, Kp = K rounded up to 32, Mp = M rounded up
    to mr, zeros in the padding."""
    fn = "bf16_pack_a"
    sa = _shape(A, fn, "A", 2)
    cdef int M = sa[1] if trans_a else sa[0], Kd = sa[0] if trans_a else sa[1]
    if mr < 1:
        raise ValidationError(f"{fn}: mr = {mr}, expected >= 1")
    cdef const float *ap = _f(A, fn, "A", sa)
    out = np.empty(((M + mr - 1) // mr * mr, (Kd + 31) // 32 * 32), np.uint16)
    cdef uint16_t *dp = <uint16_t *>_data(out, fn, "out", _U16, out.shape, True)
    with nogil:
        rg_bf16_pack_a(dp, ap, M, Kd, trans_a, mr)
    return out


def bf16_pack_b(B, bint trans_b=False, Bh=None):
    """The packed bf16 B every bf16 path reads (see the header's rg_bf16_pack_b), a new
    uint16 array (ceil(N / 32), Kp / 2, 32, 2): out[c, q, j, r] = bf16(op(B)[2q + r,
    32c + j]), zeros in the padding. With Bh (B's bf16 copy, uint16 of B's shape), read
    from it instead of rounding B."""
    fn = "bf16_pack_b"
    sb = _shape(B, fn, "B", 2)
    cdef int N = sb[0] if trans_b else sb[1], Kd = sb[1] if trans_b else sb[0]
    cdef const float *bp = _f(B, fn, "B", sb)
    cdef const uint16_t *hp = NULL
    if Bh is not None:
        hp = <const uint16_t *>_data(Bh, fn, "Bh", _U16, sb, False)
    out = np.empty(((N + 31) // 32, (Kd + 31) // 32 * 16, 32, 2), np.uint16)
    cdef uint16_t *dp = <uint16_t *>_data(out, fn, "out", _U16, out.shape, True)
    with nogil:
        rg_bf16_pack_b(dp, NULL if hp != NULL else bp, hp, N, Kd, trans_b)
    return out


cdef dict _bf16_modes = {}  # thread id -> the Bf16Matmuls that thread is in


cdef inline Bf16Matmuls _bf16_mode():
    """The Bf16Matmuls the calling thread is in, or None."""
    if not _bf16_modes:
        return None
    return _bf16_modes.get(PyThread_get_thread_ident())


cdef class Bf16Matmuls:
    """While entered, every sgemm and sgemm_many of this thread multiplies in bf16
    (rg_gemm_bf16: operands rounded to bf16, sums in float32), and is recorded so into a
    Plan; other kernels are unchanged.

        copy = np.empty(params.size, np.uint16)
        to_bf16(copy, params)                      # after every change of params
        with Bf16Matmuls(params, copy):
            ...                                    # x @ W reads W's bf16 copy

    values: a flat float32 array (a model's parameters) and copy: its bf16 copy (uint16,
    the same length), which the caller keeps current (to_bf16): a B operand that lies in
    values is read from the copy at the same offset; any other operand (activations) is
    rounded as it is packed. Without them, every operand is rounded as packed. Entries
    nest; leaving one restores the mode before it."""

    cdef readonly object values, copy
    cdef size_t lo, n
    cdef uint16_t *copy_ptr
    cdef object thread, before

    def __init__(self, values=None, copy=None):
        fn = "Bf16Matmuls"
        self.lo = self.n = 0
        self.copy_ptr = NULL
        if (values is None) != (copy is None):
            raise ValidationError(f"{fn}: values and copy go together, expected both or "
                                  f"neither")
        if values is not None:
            s = _shape(values, fn, "values", 1)
            self.lo = <size_t>_f(values, fn, "values", s)
            self.copy_ptr = <uint16_t *>_data(copy, fn, "copy", _U16, s, False)
            self.n = s[0]
        self.values, self.copy = values, copy

    def __enter__(self):
        self.thread = PyThread_get_thread_ident()
        self.before = _bf16_modes.get(self.thread)
        _bf16_modes[self.thread] = self
        return self

    def __exit__(self, *exc):
        if self.before is None:
            _bf16_modes.pop(self.thread, None)
        else:
            _bf16_modes[self.thread] = self.before
        return False

    cdef object _route(self, Op *op, object B, Py_ssize_t nb):
        """Make op, an OP_SGEMM whose B has nb floats, its bf16 product; returns the
        array it reads for B: the copy when B lies in values (p[5] its bf16 data, p[2]
        NULL), else B (rounded as packed; p[5] NULL)."""
        cdef size_t b = <size_t>op.p[2]
        op.kind, op.p[5] = OP_GEMM_BF16, NULL
        if self.n and self.lo <= b and b + 4 * <size_t>nb <= self.lo + 4 * self.n:
            op.p[5], op.p[2] = self.copy_ptr + (b - self.lo) // 4, NULL
            return self.copy
        return B


# ---- attention --------------------------------------------------------------------------------

_CORES = physical_cores()  # attention_scratch_shape's least number of areas


def attention_scratch_shape(int T, int D, int num_heads):
    """Shape of the scratch attention_forward and attention_backward take for sequences of
    T: (areas, S), one area of S floats (about hs (2 T + 32), hs = D / NH) per thread the
    kernels may run on: as many as this thread's kernels use now or the physical cores,
    whichever is more (the kernels run on at most `areas` threads). A model keeps one for
    every layer and batch size."""
    fn = "attention_scratch_shape"
    _heads(fn, D, num_heads)
    if T < 1:
        raise ValidationError(f"{fn}: T = {T}, expected >= 1")
    return (max(rg_num_threads(), _CORES),
            <Py_ssize_t>rg_attention_scratch_size(T, D, num_heads))


cdef float *_scratch(object scratch, str fn, int T, int D, int NH, int *areas,
                    Py_ssize_t *n) except NULL:
    """scratch's data after checking it is (areas, S) for T; sets areas and n (its floats)."""
    cdef Py_ssize_t a = _shape(scratch, fn, "scratch", 2)[0]
    cdef Py_ssize_t S = rg_attention_scratch_size(T, D, NH)
    cdef float *p = _f(scratch, fn, "scratch", (a, S), True)
    areas[0], n[0] = <int>a, a * S  # a * S <= _INT_MAX, as _f checked
    return p


def attention_forward(out, att, q, k, v, int num_heads, scratch=None):
    """Causal softmax attention. q, k, v, out: (B, T, D); att: (B, NH, T, T) saved
    probabilities. scratch (areas, S), attention_scratch_shape's or with fewer areas (then
    fewer threads), is overwritten; without it, a new array is used (a model passes one it
    keeps)."""
    fn = "attention_forward"
    s = _shape(q, fn, "q", 3)
    cdef int B = s[0], T = s[1], D = s[2], NH = num_heads, areas
    _heads(fn, D, NH)
    cdef const float *qp = _f(q, fn, "q", s)
    cdef const float *kp = _f(k, fn, "k", s)
    cdef const float *vp = _f(v, fn, "v", s)
    cdef float *op = _f(out, fn, "out", s, True)
    cdef float *ap = _f(att, fn, "att", (B, NH, T, T), True)
    if scratch is None:
        scratch = np.empty(attention_scratch_shape(T, D, NH), np.float32)
    cdef Py_ssize_t n = <Py_ssize_t>B * T * D, ns
    cdef float *sp = _scratch(scratch, fn, T, D, NH, &areas, &ns)
    cdef const float *others[5]
    cdef Py_ssize_t sizes[5]
    others[:] = [op, ap, qp, kp, vp]
    sizes[:] = [n, <Py_ssize_t>B * NH * T * T, n, n, n]
    _apart(fn, "scratch", sp, ns, others, sizes, 5, ("out", "att", "q", "k", "v"))
    cdef Op o
    o.kind, o.p[0], o.p[1], o.p[2] = OP_ATTENTION_FORWARD, op, ap, sp
    o.p[3], o.p[4], o.p[5] = <void *>qp, <void *>kp, <void *>vp
    o.i[0], o.i[1], o.i[2], o.i[3], o.i[4] = B, T, D, NH, areas
    _submit(&o, (out, att, scratch, q, k, v))


def attention_backward(dq, dk, dv, dout, att, q, k, v, int num_heads, ds=None, scratch=None):
    """Backward of attention_forward: overwrites dq, dk, dv (B, T, D). ds, scratch of att's
    shape (B, NH, T, T), gets the gradients of the scaled scores on and below the diagonal
    (the rest unspecified); scratch is overwritten, as attention_forward's. Without them,
    new arrays are used (a model passes ones it keeps)."""
    fn = "attention_backward"
    s = _shape(q, fn, "q", 3)
    cdef int B = s[0], T = s[1], D = s[2], NH = num_heads, areas
    _heads(fn, D, NH)
    if ds is None:
        ds = np.empty((B, NH, T, T), np.float32)
    cdef const float *qp = _f(q, fn, "q", s)
    cdef const float *kp = _f(k, fn, "k", s)
    cdef const float *vp = _f(v, fn, "v", s)
    cdef const float *dop = _f(dout, fn, "dout", s)
    cdef const float *ap = _f(att, fn, "att", (B, NH, T, T))
    cdef float *dqp = _f(dq, fn, "dq", s, True)
    cdef float *dkp = _f(dk, fn, "dk", s, True)
    cdef float *dvp = _f(dv, fn, "dv", s, True)
    cdef float *dsp = _f(ds, fn, "ds", (B, NH, T, T), True)
    if scratch is None:
        scratch = np.empty(attention_scratch_shape(T, D, NH), np.float32)
    cdef Py_ssize_t n = <Py_ssize_t>B * T * D, nds = <Py_ssize_t>B * NH * T * T, ns
    cdef float *sp = _scratch(scratch, fn, T, D, NH, &areas, &ns)
    cdef const float *others[9]
    cdef Py_ssize_t sizes[9]
    others[:] = [ap, dop, qp, kp, vp, dqp, dkp, dvp, dsp]
    sizes[:] = [nds, n, n, n, n, n, n, n, nds]
    names = ("att", "dout", "q", "k", "v", "dq", "dk", "dv", "ds")
    _apart(fn, "ds", dsp, nds, others, sizes, 8, names)
    _apart(fn, "scratch", sp, ns, others, sizes, 9, names)
    cdef Op o
    o.kind, o.p[0], o.p[1], o.p[2], o.p[3], o.p[4] = OP_ATTENTION_BACKWARD, dqp, dkp, dvp, dsp, sp
    o.p[5], o.p[6], o.p[7], o.p[8], o.p[9] = (<void *>dop, <void *>ap, <void *>qp, <void *>kp,
                                              <void *>vp)
    o.i[0], o.i[1], o.i[2], o.i[3], o.i[4] = B, T, D, NH, areas
    _submit(&o, (dq, dk, dv, ds, scratch, dout, att, q, k, v))


def attention_step(out, q, kcache, vcache, n, int num_heads, scratch=None):
    """One decoding step: row b of q (B, D) attends to rows 0..n[b]-1 of its kcache, vcache
    (B, Tmax, D) rows. n: the rows' lengths, int32 (B,), or one int for every row.
    scratch: (B, NH, Tmax), overwritten (without it, a new array)."""
    fn = "attention_step"
    s = _shape(kcache, fn, "kcache", 3)
    cdef int B = s[0], Tmax = s[1], D = s[2], NH = num_heads
    cdef int b
    _heads(fn, D, NH)
    one = isinstance(n, (int, np.integer))
    lengths = np.full(B, n, np.intc) if one else n
    cdef const int *lp = <const int *>_data(lengths, fn, "n", _I32, (B,), False)
    for b in range(B):
        if lp[b] < 1 or lp[b] > Tmax:
            raise ValidationError(f"{fn}: n{'' if one else f'[{b}]'} = {lp[b]}, expected "
                                  f"1 <= n <= Tmax = {Tmax}")
    if scratch is None:
        scratch = np.empty((B, NH, Tmax), np.float32)
    cdef const float *kp = _f(kcache, fn, "kcache", s)
    cdef const float *vp = _f(vcache, fn, "vcache", s)
    cdef const float *qp = _f(q, fn, "q", (B, D))
    cdef float *op = _f(out, fn, "out", (B, D), True)
    cdef float *sp = _f(scratch, fn, "scratch", (B, NH, Tmax), True)
    cdef Py_ssize_t nc = <Py_ssize_t>B * Tmax * D
    cdef const float *others[4]
    cdef Py_ssize_t sizes[4]
    others[:] = [op, qp, kp, vp]
    sizes[:] = [<Py_ssize_t>B * D, <Py_ssize_t>B * D, nc, nc]
    _apart(fn, "scratch", sp, <Py_ssize_t>B * NH * Tmax, others, sizes, 4,
           ("out", "q", "kcache", "vcache"))
    _not_recorded(fn)
    with nogil:
        rg_attention_step(op, sp, qp, kp, vp, lp, B, Tmax, D, NH)


# ---- layer norm -----------------------------------------------------------------------------

def layernorm_forward(out, mean, rstd, x, g, b, float eps=1e-5):
    """out = (x - mean) * rstd * g + b per row. x, out: (N, D); g: (D); b: (D), or None for
    a norm without bias; mean, rstd: (N)."""
    fn = "layernorm_forward"
    s = _shape(x, fn, "x", 2)
    cdef int N = s[0], D = s[1]
    if not eps > 0:
        raise ValidationError(f"{fn}: eps = {eps}, expected > 0")
    cdef const float *xp = _f(x, fn, "x", s)
    cdef const float *gp = _f(g, fn, "g", (D,))
    cdef const float *bp = NULL if b is None else _f(b, fn, "b", (D,))
    cdef float *op = _f(out, fn, "out", s, True)
    cdef float *mp = _f(mean, fn, "mean", (N,), True)
    cdef float *rp = _f(rstd, fn, "rstd", (N,), True)
    cdef Op o
    o.kind, o.p[0], o.p[1], o.p[2] = OP_LAYERNORM_FORWARD, op, mp, rp
    o.p[3], o.p[4], o.p[5] = <void *>xp, <void *>gp, <void *>bp
    o.i[0], o.i[1], o.f = N, D, eps
    _submit(&o, (out, mean, rstd, x, g) + (() if b is None else (b,)))


def layernorm_backward(dx, dg, db, dout, x, g, mean, rstd, bint accumulate=True):
    """Overwrites dx (N, D) (may be dout itself); adds into dg, db (D), or overwrites them
    when not accumulate. db None: a norm without bias."""
    fn = "layernorm_backward"
    s = _shape(x, fn, "x", 2)
    cdef int N = s[0], D = s[1]
    cdef const float *xp = _f(x, fn, "x", s)
    cdef const float *dop = _f(dout, fn, "dout", s)
    cdef const float *gp = _f(g, fn, "g", (D,))
    cdef const float *mp = _f(mean, fn, "mean", (N,))
    cdef const float *rp = _f(rstd, fn, "rstd", (N,))
    cdef float *dxp = _f(dx, fn, "dx", s, True)
    cdef float *dgp = _f(dg, fn, "dg", (D,), True)
    cdef float *dbp = NULL if db is None else _f(db, fn, "db", (D,), True)
    cdef Op o
    o.kind, o.p[0], o.p[1], o.p[2], o.p[3] = OP_LAYERNORM_BACKWARD, dxp, dgp, dbp, <void *>dop
    o.p[4], o.p[5], o.p[6], o.p[7] = <void *>xp, <void *>gp, <void *>mp, <void *>rp
    o.i[0], o.i[1], o.i[2] = N, D, accumulate
    # outputs first (Plan's rule): dx, dg, db
    _submit(&o, tuple(a for a in (dx, dg, db, dout, x, g, mean, rstd) if a is not None))


# ---- cross-entropy ---------------------------------------------------------------------------

cdef int *_targets(object targets, str fn, int N, int V, int ignore_index) except NULL:
    """int32 target ids (N,), each in [0, V) or ignore_index."""
    cdef int *p = <int *>_data(targets, fn, "targets", _I32, (N,), False)
    cdef Py_ssize_t i = _first_bad_id(p, N, V, True, ignore_index)
    if i >= 0:
        raise ValidationError(f"{fn}: targets[{i}] = {p[i]}, expected an id in [0, {V}) "
                              f"or ignore_index = {ignore_index}")
    return p


def crossentropy_forward(losses, hits, logits, targets, int ignore_index=-1):
    """losses[i] = -log softmax(logits[i])[targets[i]]; hits[i] = 1 where the target's logit
    is the row's largest (ties count), else 0; both 0 where ignored. logits: (N, V);
    losses float32 (N,), hits int32 (N,)."""
    fn = "crossentropy_forward"
    s = _shape(logits, fn, "logits", 2)
    cdef int N = s[0], V = s[1]
    cdef const float *lp = _f(logits, fn, "logits", s)
    cdef const int *tp = _targets(targets, fn, N, V, ignore_index)
    cdef float *op = _f(losses, fn, "losses", (N,), True)
    cdef int *hp = <int *>_data(hits, fn, "hits", _I32, (N,), True)
    cdef Op o
    o.kind, o.p[0], o.p[1], o.p[2], o.p[3] = (OP_CROSSENTROPY_FORWARD, op, hp, <void *>lp,
                                              <void *>tp)
    o.i[0], o.i[1], o.i[2] = N, V, ignore_index
    _submit(&o, (losses, hits, logits, targets))


def crossentropy_forward_backward(losses, dlogits, hits, logits, targets,
                                  int ignore_index=-1, float dscale=1.0):
    """Fused loss, hits (as crossentropy_forward) and gradient: dlogits = (softmax - onehot)
    * dscale; dlogits may be logits."""
    fn = "crossentropy_forward_backward"
    s = _shape(logits, fn, "logits", 2)
    cdef int N = s[0], V = s[1]
    cdef const float *lp = _f(logits, fn, "logits", s)
    cdef const int *tp = _targets(targets, fn, N, V, ignore_index)
    cdef float *op = _f(losses, fn, "losses", (N,), True)
    cdef float *dp = _f(dlogits, fn, "dlogits", s, True)
    cdef int *hp = <int *>_data(hits, fn, "hits", _I32, (N,), True)
    cdef Op o
    o.kind, o.p[0], o.p[1], o.p[2], o.p[3], o.p[4] = (OP_CROSSENTROPY_FORWARD_BACKWARD, op, dp,
                                                      hp, <void *>lp, <void *>tp)
    o.i[0], o.i[1], o.i[2], o.f = N, V, ignore_index, dscale
    _submit(&o, (losses, dlogits, hits, logits, targets))


# ---- Adam ---------------------------------------------------------------------------------------

cdef int _check_adam(str fn, int t, double beta1, double beta2) except -1:
    if t < 1:
        raise ValidationError(f"{fn}: t = {t}, expected a step number >= 1")
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ValidationError(f"{fn}: beta1 = {beta1}, beta2 = {beta2}, expected each in [0, 1)")
    return 0


cdef const size_t *_decay_ranges(str fn, object decay, size_t n, size_t *whole,
                                 size_t *count) except NULL:
    """The C's table of the ranges that take weight decay, and their count in *count:
    `decay`'s data, an (R, 2) intp array of [start, end) ranges, ascending, disjoint,
    non-empty and within n (checked; the caller holds decay); None: the whole buffer,
    written to `whole`."""
    cdef Py_buffer buf
    cdef const Py_ssize_t *r
    cdef Py_ssize_t j, R, at = 0
    cdef bint ok = False
    if decay is None:
        whole[0], whole[1], count[0] = 0, n, 1
        return whole
    s = _shape(decay, fn, "decay", 2)
    try:
        PyObject_GetBuffer(decay, &buf, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT)
        ok = ((buf.format[0] == b"l" or buf.format[0] == b"q") and buf.format[1] == 0
              and buf.itemsize == sizeof(Py_ssize_t) and buf.shape[1] == 2)
        r, R = <const Py_ssize_t *>buf.buf, buf.shape[0]
        PyBuffer_Release(&buf)
    except (BufferError, ValueError):  # numpy says ValueError for a wrong layout
        pass
    if not ok:
        raise ValidationError(f"{fn}: decay has dtype {decay.dtype} and shape {s}, expected "
                              f"a C-contiguous intp array (R, 2) of [start, end) ranges")
    for j in range(R):
        if not at <= r[2 * j] < r[2 * j + 1] <= <Py_ssize_t>n:
            raise ValidationError(f"{fn}: decay range {j} is [{r[2 * j]}, {r[2 * j + 1]}), "
                                  f"expected {at} <= start < end <= {n} (ranges ascending, "
                                  f"disjoint, non-empty)")
        at = r[2 * j + 1]
    count[0] = R
    return <const size_t *>r if R else whole


def adam_update(params, m, v, grads, double lr, double beta1=0.9, double beta2=0.999,
                double eps=1e-8, double weight_decay=0.0, int t=1, double max_norm=0.0,
                decay=None):
    """One fused Adam/AdamW step over flat float32 buffers of equal length, grads clipped
    to global L2 norm max_norm (0: no clipping) (see the header). `decay`: the ranges of
    the buffer that take the weight decay, an (R, 2) intp array of [start, end), ascending
    and disjoint (None: all of it). Returns the gradient norm before clipping; a NaN or
    infinite norm leaves params, m and v unchanged."""
    fn = "adam_update"
    s = _shape(params, fn, "params", 1)
    cdef size_t n = s[0]
    _check_adam(fn, t, beta1, beta2)
    cdef float *pp = _f(params, fn, "params", s, True)
    cdef float *mp = _f(m, fn, "m", s, True)
    cdef float *vp = _f(v, fn, "v", s, True)
    cdef const float *gp = _f(grads, fn, "grads", s)
    cdef size_t whole[2]
    cdef size_t ndecay
    cdef const size_t *dp = _decay_ranges(fn, decay, n, whole, &ndecay)
    cdef double norm
    _not_recorded(fn)
    with nogil:
        norm = rg_adam_update(pp, mp, vp, gp, n, lr, beta1, beta2, eps, weight_decay, dp,
                              ndecay, t, max_norm)
    return norm


# ---- elementwise, bias, embedding, norms ---------------------------------------------------

cdef int _elementwise(int kind, str fn, tuple names, tuple arrays) except -1:
    """Submit flat op `kind` over float32 arrays of one shape (arrays[1]'s): arrays[0] is
    written, the others read."""
    cdef Op o
    cdef Py_ssize_t j
    src = arrays[1]
    shape = src.shape if isinstance(src, np.ndarray) else ()
    for j in (*range(1, len(arrays)), 0):  # the inputs first: their errors say most
        o.p[j] = _f(arrays[j], fn, names[j], shape, j == 0)
    o.kind, o.n = kind, src.size
    _submit(&o, arrays)
    return 0


def relu_forward(out, x):
    """out = max(x, 0); out may be x. Any shape, out the same."""
    _elementwise(OP_RELU_FORWARD, "relu_forward", ("out", "x"), (out, x))


def relu_backward(dx, dout, out):
    """dx = dout where out > 0 else 0; dx may be dout. out is the forward's output."""
    _elementwise(OP_RELU_BACKWARD, "relu_backward", ("dx", "dout", "out"), (dx, dout, out))


def gelu_forward(out, x):
    """out = gelu(x) = x * Phi(x), the exact (erf) form; out may be x. Any shape, out the
    same."""
    _elementwise(OP_GELU_FORWARD, "gelu_forward", ("out", "x"), (out, x))


def gelu_backward(dx, dout, x):
    """dx = dout * gelu'(x); dx may be dout. x is the forward's input (sgemm's pre)."""
    _elementwise(OP_GELU_BACKWARD, "gelu_backward", ("dx", "dout", "x"), (dx, dout, x))


def dropout(out, x, float p, seed, int site=0):
    """out = x / (1 - p) where kept, 0 where dropped (probability p, 0 <= p < 1); out may be
    x. The mask is a hash of (seed, site, index): the same for the same int32 seed (3,) and
    site, so dropout on the gradient is dropout's backward. seed[2]: the index of x's first
    row (x: (B, ...)) in the whole batch, whose rows' masks do not depend on where the
    batch is cut. A plan's replay reads the seed array as it is then (a step writes its own
    seed there first)."""
    fn = "dropout"
    if not 0.0 <= p < 1.0:
        raise ValidationError(f"{fn}: p = {p}, expected 0 <= p < 1")
    shape = x.shape if isinstance(x, np.ndarray) else ()
    cdef const float *xp = _f(x, fn, "x", shape)
    cdef float *op = _f(out, fn, "out", shape, True)
    cdef const int *sp = <const int *>_data(seed, fn, "seed", _I32, (3,), False)
    cdef Op o
    o.kind, o.p[0], o.p[1], o.p[2] = OP_DROPOUT, op, <void *>xp, <void *>sp
    o.i[0], o.i[1], o.n, o.f = site, x.size // shape[0] if len(shape) else 1, x.size, p
    _submit(&o, (out, x, seed))


def add(out, a, b):
    """out = a + b elementwise; out may be a or b. Any shape, all three the same."""
    _elementwise(OP_ADD, "add", ("out", "a", "b"), (out, a, b))


def bias_add(x, b):
    """x += b row by row. x: (N, C); b: (C)."""
    fn = "bias_add"
    s = _shape(x, fn, "x", 2)
    cdef int N = s[0], C = s[1]
    cdef float *xp = _f(x, fn, "x", s, True)
    cdef const float *bp = _f(b, fn, "b", (C,))
    cdef Op o
    o.kind, o.p[0], o.p[1], o.i[0], o.i[1] = OP_BIAS_ADD, xp, <void *>bp, N, C
    _submit(&o, (x, b))


def colsum(db, dy, bint accumulate=True):
    """db += dy summed over rows (db = ... when not accumulate). dy: (N, C); db: (C)."""
    fn = "colsum"
    s = _shape(dy, fn, "dy", 2)
    cdef int N = s[0], C = s[1]
    cdef const float *dyp = _f(dy, fn, "dy", s)
    cdef float *dbp = _f(db, fn, "db", (C,), True)
    cdef Op o
    o.kind, o.p[0], o.p[1], o.i[0], o.i[1], o.i[2] = OP_COLSUM, dbp, <void *>dyp, N, C, accumulate
    _submit(&o, (db, dy))


def embedding_forward(out, ids, wte, wpe):
    """out[b, t] = wte[ids[b, t]] + wpe[t]. ids: (B, T) int32; wte: (V, D); wpe: (Tmax, D)."""
    fn = "embedding_forward"
    s = _shape(ids, fn, "ids", 2)
    sw = _shape(wte, fn, "wte", 2)
    sp = _shape(wpe, fn, "wpe", 2)
    cdef int B = s[0], T = s[1], V = sw[0], D = sw[1], Tmax = sp[0]
    if T > Tmax:
        raise ValidationError(f"{fn}: sequence length T = {T} exceeds max_seq_len = {Tmax}")
    cdef const float *wtep = _f(wte, fn, "wte", sw)
    cdef const float *wpep = _f(wpe, fn, "wpe", (Tmax, D))
    cdef const int *ip = _ids(ids, fn, "ids", s, V)
    cdef float *op = _f(out, fn, "out", (B, T, D), True)
    cdef Op o
    o.kind, o.p[0], o.p[1], o.p[2], o.p[3] = (OP_EMBEDDING_FORWARD, op, <void *>ip, <void *>wtep,
                                              <void *>wpep)
    o.i[0], o.i[1], o.i[2], o.i[3] = B, T, D, V
    _submit(&o, (out, ids, wte, wpe))


def embedding_backward(dwte, dwpe, dout, ids, accumulate=True):
    """dwte[ids[b, t]] += dout[b, t]; dwpe[t] += dout[b, t], into zeroed dwte, dwpe when
    not accumulate (a bool for both, or a pair of bools: (dwte's, dwpe's))."""
    fn = "embedding_backward"
    if isinstance(accumulate, (bool, np.bool_)):
        flags = (accumulate, accumulate)
    else:
        try:
            flags = tuple(accumulate)
        except TypeError:
            flags = ()
    if len(flags) != 2 or not all(isinstance(f, (bool, np.bool_)) for f in flags):
        raise ValidationError(f"{fn}: accumulate = {accumulate!r}, expected a bool or 2 bools")
    s = _shape(dout, fn, "dout", 3)
    sw = _shape(dwte, fn, "dwte", 2)
    sp = _shape(dwpe, fn, "dwpe", 2)
    cdef int B = s[0], T = s[1], D = s[2], V = sw[0], Tmax = sp[0]
    if T > Tmax:
        raise ValidationError(f"{fn}: sequence length T = {T} exceeds max_seq_len = {Tmax}")
    cdef const float *dop = _f(dout, fn, "dout", s)
    cdef const int *ip = _ids(ids, fn, "ids", (B, T), V)
    cdef float *dwtep = _f(dwte, fn, "dwte", (V, D), True)
    cdef float *dwpep = _f(dwpe, fn, "dwpe", (Tmax, D), True)
    cdef Op o
    o.kind, o.p[0], o.p[1], o.p[2], o.p[3] = (OP_EMBEDDING_BACKWARD, dwtep, dwpep, <void *>dop,
                                              <void *>ip)
    o.i[0], o.i[1], o.i[2], o.i[3], o.i[4] = B, T, D, V, Tmax
    o.i[5] = bool(flags[0]) | bool(flags[1]) << 1  # bits: dwte's, dwpe's accumulate
    _submit(&o, (dwte, dwpe, dout, ids))


def sum_squares(x):
    """Sum of x**2 over a flat float32 array, accumulated in float64."""
    fn = "sum_squares"
    s = _shape(x, fn, "x", 1)
    cdef const float *xp = _f(x, fn, "x", s)
    cdef size_t n = s[0]
    cdef double r
    _not_recorded(fn)
    with nogil:
        r = rg_sum_squares(xp, n)
    return r
