/* Shared declarations of the kvindex._native extension (src/kvindex/_native_c/). */
#ifndef KVINDEX_NATIVE_H
#define KVINDEX_NATIVE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_SLOTS 65536 /* engine slots per index */

/* Interned attribute names of StoredBlock (set at module init). */
extern PyObject *str_engine_hash, *str_keys;

/* index.c: the block index core type */
extern PyTypeObject CoreType;

/* keys.c: chain keys (XXH3-64) and StoredBlock construction for ingest */
PyObject *native_xxh3_64(PyObject *mod, PyObject *args);
PyObject *native_chain_keys(PyObject *mod, PyObject *args);
PyObject *native_stored_blocks(PyObject *mod, PyObject *args);

#endif
