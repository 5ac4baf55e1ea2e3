/* kbit_matmul.c plus a CPython entry point for the one call that runs ~200 times a token: `matmul(weight
 * address, x address, rows of x, y address, threads)`. Why: through ctypes a call costs ~13 us in a real decode
 * step (argument conversion objects and libffi, cold between layers) against ~2 us of work in a small layer;
 * measured on SmolLM2-135M this entry point saves ~2.8 ms a token (6%), and on stories260K it is the difference
 * between slower and faster than dense. The same shared library is loaded by ctypes for everything else
 * (core/matvec.py); where Python.h is missing, matvec builds kbit_matmul.c alone and ctypes does it all. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "kbit_matmul.c"

static PyObject *py_matmul(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "matmul(weight, x, m, y, threads) takes 5 integers");
        return NULL;
    }
    const kbit_weight *w = PyLong_AsVoidPtr(args[0]);
    const float *x = PyLong_AsVoidPtr(args[1]);
    long long m = PyLong_AsLongLong(args[2]);
    float *y = PyLong_AsVoidPtr(args[3]);
    long threads = PyLong_AsLong(args[4]);
    if (PyErr_Occurred()) return NULL;
    if (!w || !x || !y) {
        PyErr_SetString(PyExc_ValueError, "matmul: a null address");
        return NULL;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS /* as ctypes does: other Python threads run while the kernel works */
    rc = kbit_matmul(w, x, (int64_t)m, y, (int)threads);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(rc);
}

static PyMethodDef methods[] = {
    {"matmul", (PyCFunction)(void (*)(void))py_matmul, METH_FASTCALL,
     "matmul(weight, x, m, y, threads) -> 0, or 1 when the kernel refuses the weight"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "kbit_kernel", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit_kbit_kernel(void) { return PyModule_Create(&module); }
