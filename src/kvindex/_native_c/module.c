/* kvindex._native: module definition (the index core is index.c, ingest fast paths keys.c). */
#include "native.h"

static PyMethodDef module_methods[] = {
    {"stored_blocks", native_stored_blocks, METH_VARARGS,
     "stored_blocks(block_type, engine_hashes, keys, split, local) -> blocks."},
    {"xxh3_64", native_xxh3_64, METH_VARARGS,
     "xxh3_64(data, seed) -> XXH3-64 of data (<= 240 bytes), None if longer."},
    {"chain_keys", native_chain_keys, METH_VARARGS,
     "chain_keys(parent, token_ids, block_size) -> content keys (docs/keys.md, no extras)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT, "kvindex._native", "The native block index core.", -1, module_methods,
};

PyMODINIT_FUNC PyInit__native(void) {
    if (PyType_Ready(&CoreType) < 0) return NULL;
    str_engine_hash = PyUnicode_InternFromString("engine_hash");
    str_keys = PyUnicode_InternFromString("keys");
    if (!str_engine_hash || !str_keys) return NULL;
    PyObject *m = PyModule_Create(&native_module);
    if (!m) return NULL;
    Py_INCREF(&CoreType);
    if (PyModule_AddObject(m, "Core", (PyObject *)&CoreType) < 0) {
        Py_DECREF(&CoreType);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "MAX_SLOTS", MAX_SLOTS) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
