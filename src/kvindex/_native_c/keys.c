/* kvindex._native: ingest fast paths (docs/index.md, "Ingest fast paths"). */
#include "native.h"
/* ---------------------------------------------------------------------------------------
 * XXH3-64 with a seed, inputs of 0..240 bytes (written from the XXH3 specification; the
 * chain keys of docs/keys.md). Bit-exactness against xxhash.xxh3_64_intdigest is tested by
 * tests/kvindex/test_native_keys.py; longer inputs are left to the xxhash package.
 */

static const uint8_t XXH3_SECRET[192] = {
    0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c,
    0xf7, 0x21, 0xad, 0x1c, 0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb,
    0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f, 0xcb, 0x79, 0xe6, 0x4e,
    0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21,
    0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6,
    0x81, 0x3a, 0x26, 0x4c, 0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb,
    0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3, 0x71, 0x64, 0x48, 0x97,
    0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8,
    0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7,
    0xc7, 0x0b, 0x4f, 0x1d, 0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31,
    0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64, 0xea, 0xc5, 0xac, 0x83,
    0x34, 0xd3, 0xeb, 0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb,
    0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0, 0xda, 0x49, 0xd3, 0x16, 0x55, 0x26,
    0x29, 0xd4, 0x68, 0x9e, 0x2b, 0x16, 0xbe, 0x58, 0x7d, 0x47, 0xa1, 0xfc,
    0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce, 0x45, 0xcb, 0x3a, 0x8f,
    0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e,
};

#define XP32_1 0x9E3779B1U
#define XP64_1 0x9E3779B185EBCA87ULL
#define XP64_2 0xC2B2AE3D27D4EB4FULL
#define XP64_3 0x165667B19E3779F9ULL
#define XP_MX1 0x165667919E3779F9ULL
#define XP_MX2 0x9FB21C651E98DF25ULL

static inline uint64_t rd64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = v << 8 | p[i];
    return v;
}

static inline uint32_t rd32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static inline uint64_t rotl64(uint64_t x, int r) { return x << r | x >> (64 - r); }

static inline uint64_t swap64(uint64_t x) { return __builtin_bswap64(x); }

static inline uint32_t swap32(uint32_t x) { return __builtin_bswap32(x); }

static inline uint64_t mul128_fold64(uint64_t a, uint64_t b) {
    __uint128_t p = (__uint128_t)a * b;
    return (uint64_t)p ^ (uint64_t)(p >> 64);
}

static inline uint64_t xxh64_avalanche(uint64_t h) {
    h ^= h >> 33;
    h *= XP64_2;
    h ^= h >> 29;
    h *= XP64_3;
    h ^= h >> 32;
    return h;
}

static inline uint64_t xxh3_avalanche(uint64_t h) {
    h ^= h >> 37;
    h *= XP_MX1;
    h ^= h >> 32;
    return h;
}

static inline uint64_t xxh3_rrmxmx(uint64_t h, uint64_t len) {
    h ^= rotl64(h, 49) ^ rotl64(h, 24);
    h *= XP_MX2;
    h ^= (h >> 35) + len;
    h *= XP_MX2;
    h ^= h >> 28;
    return h;
}

static inline uint64_t mix16(const uint8_t *in, const uint8_t *sec, uint64_t seed) {
    return mul128_fold64(rd64(in) ^ (rd64(sec) + seed), rd64(in + 8) ^ (rd64(sec + 8) - seed));
}

/* -1 when len > 240 (not handled here) */
static int xxh3_64_seeded(const uint8_t *in, size_t len, uint64_t seed, uint64_t *out) {
    const uint8_t *sec = XXH3_SECRET;
    if (len > 240) return -1;
    if (len == 0) {
        *out = xxh64_avalanche(seed ^ (rd64(sec + 56) ^ rd64(sec + 64)));
    } else if (len <= 3) {
        uint32_t combined = (uint32_t)in[0] << 16 | (uint32_t)in[len >> 1] << 24 |
                            (uint32_t)in[len - 1] | (uint32_t)len << 8;
        uint64_t bitflip = (uint64_t)(rd32(sec) ^ rd32(sec + 4)) + seed;
        *out = xxh64_avalanche((uint64_t)combined ^ bitflip);
    } else if (len <= 8) {
        seed ^= (uint64_t)swap32((uint32_t)seed) << 32;
        uint64_t bitflip = (rd64(sec + 8) ^ rd64(sec + 16)) - seed;
        uint64_t in64 = (uint64_t)rd32(in + len - 4) + ((uint64_t)rd32(in) << 32);
        *out = xxh3_rrmxmx(in64 ^ bitflip, len);
    } else if (len <= 16) {
        uint64_t lo = rd64(in) ^ ((rd64(sec + 24) ^ rd64(sec + 32)) + seed);
        uint64_t hi = rd64(in + len - 8) ^ ((rd64(sec + 40) ^ rd64(sec + 48)) - seed);
        *out = xxh3_avalanche(len + swap64(lo) + hi + mul128_fold64(lo, hi));
    } else if (len <= 128) {
        uint64_t acc = len * XP64_1;
        if (len > 32) {
            if (len > 64) {
                if (len > 96) {
                    acc += mix16(in + 48, sec + 96, seed);
                    acc += mix16(in + len - 64, sec + 112, seed);
                }
                acc += mix16(in + 32, sec + 64, seed);
                acc += mix16(in + len - 48, sec + 80, seed);
            }
            acc += mix16(in + 16, sec + 32, seed);
            acc += mix16(in + len - 32, sec + 48, seed);
        }
        acc += mix16(in, sec, seed);
        acc += mix16(in + len - 16, sec + 16, seed);
        *out = xxh3_avalanche(acc);
    } else {
        uint64_t acc = len * XP64_1;
        size_t rounds = len / 16;
        for (size_t i = 0; i < 8; i++) acc += mix16(in + 16 * i, sec + 16 * i, seed);
        acc = xxh3_avalanche(acc);
        for (size_t i = 8; i < rounds; i++) acc += mix16(in + 16 * i, sec + 16 * (i - 8) + 3, seed);
        acc += mix16(in + len - 16, sec + 136 - 17, seed);
        *out = xxh3_avalanche(acc);
    }
    return 0;
}

/* xxh3_64(data: bytes, seed: int) -> int, or None when len(data) > 240 (tests only) */
PyObject *native_xxh3_64(PyObject *mod, PyObject *args) {
    Py_buffer buf;
    unsigned long long seed;
    if (!PyArg_ParseTuple(args, "y*K", &buf, &seed)) return NULL;
    uint64_t h;
    int rc = xxh3_64_seeded(buf.buf, (size_t)buf.len, seed, &h);
    PyBuffer_Release(&buf);
    if (rc < 0) Py_RETURN_NONE;
    return PyLong_FromUnsignedLongLong(h);
}

/* chain_keys(parent, token_ids, block_size) -> [keys] of the full blocks, chained as in
 * docs/keys.md (no extras); None when this fast path does not apply (token_ids not a list
 * or tuple, block_size < 1 or > 60), so the caller uses the Python path. */
PyObject *native_chain_keys(PyObject *mod, PyObject *args) {
    PyObject *parent_obj, *tokens;
    Py_ssize_t block;
    if (!PyArg_ParseTuple(args, "OOn", &parent_obj, &tokens, &block)) return NULL;
    if (block < 1 || block > 60 || !(PyList_Check(tokens) || PyTuple_Check(tokens)))
        Py_RETURN_NONE;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(tokens);
    Py_ssize_t full = n / block;
    if (full == 0) return PyList_New(0);
    /* modulo 2**64, as the xxhash package takes its seed */
    if (!PyLong_Check(parent_obj)) {
        PyErr_Format(PyExc_TypeError, "parent must be int, not %.100s",
                     Py_TYPE(parent_obj)->tp_name);
        return NULL;
    }
    unsigned long long key = PyLong_AsUnsignedLongLongMask(parent_obj);
    if (key == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    PyObject **items = PySequence_Fast_ITEMS(tokens);
    PyObject *out = PyList_New(full);
    if (!out) return NULL;
    uint8_t data[240];
    for (Py_ssize_t b = 0; b < full; b++) {
        for (Py_ssize_t t = 0; t < block; t++) {
            PyObject *item = items[b * block + t];
            if (!PyLong_Check(item)) {
                Py_DECREF(out);
                PyErr_Format(PyExc_TypeError, "token ids must be int, not %.100s",
                             Py_TYPE(item)->tp_name);
                return NULL;
            }
            unsigned long v = PyLong_AsUnsignedLong(item);
            if ((v == (unsigned long)-1 && PyErr_Occurred()) || v > 0xFFFFFFFFUL) {
                Py_DECREF(out);
                PyErr_Clear();
                PyErr_SetString(PyExc_OverflowError, "token ids must fit in 32 bits");
                return NULL;
            }
            uint8_t *d = data + 4 * t;
            d[0] = (uint8_t)v;
            d[1] = (uint8_t)(v >> 8);
            d[2] = (uint8_t)(v >> 16);
            d[3] = (uint8_t)(v >> 24);
        }
        uint64_t h;
        xxh3_64_seeded(data, (size_t)block * 4, key, &h);
        key = h;
        PyObject *k = PyLong_FromUnsignedLongLong(h);
        if (!k) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, b, k);
    }
    return out;
}


/* stored_blocks(block_type, engine_hashes, keys, split, local) -> [block_type(h, keys[i*split:
 * (i+1)*split]) ...], and local[h] = the block's last key; None unless both are lists. Instances are made the way the
 * frozen slots dataclass's own __init__ makes them (object.__setattr__ of each field);
 * tests/kvindex/test_native_keys.py checks they equal StoredBlock(...) field for field. */
PyObject *native_stored_blocks(PyObject *mod, PyObject *args) {
    PyTypeObject *type;
    PyObject *hashes, *keys, *local;
    Py_ssize_t split;
    if (!PyArg_ParseTuple(args, "O!OOnO!", &PyType_Type, &type, &hashes, &keys, &split,
                          &PyDict_Type, &local))
        return NULL;
    if (!(type->tp_flags & Py_TPFLAGS_HEAPTYPE) || type->tp_itemsize != 0) {
        PyErr_SetString(PyExc_TypeError, "block_type must be a class with __slots__");
        return NULL;
    }
    if (!PyList_Check(hashes) || !PyList_Check(keys)) Py_RETURN_NONE; /* caller's path */
    Py_ssize_t n = PyList_GET_SIZE(hashes);
    if (split < 1 || PyList_GET_SIZE(keys) != n * split) {
        PyErr_SetString(PyExc_ValueError, "need len(keys) == len(engine_hashes) * split >= 1");
        return NULL;
    }
    PyObject *out = PyList_New(n);
    if (!out) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *h = PyList_GET_ITEM(hashes, i);
        PyObject *group = PyList_GetSlice(keys, i * split, (i + 1) * split);
        if (!group) goto fail;
        PyObject *tuple = PyList_AsTuple(group);
        Py_DECREF(group);
        if (!tuple) goto fail;
        PyObject *block = type->tp_alloc(type, 0);
        if (!block) {
            Py_DECREF(tuple);
            goto fail;
        }
        PyList_SET_ITEM(out, i, block);
        int rc = PyObject_GenericSetAttr(block, str_engine_hash, h);
        if (rc == 0) rc = PyObject_GenericSetAttr(block, str_keys, tuple);
        if (rc == 0) rc = PyDict_SetItem(local, h, PyTuple_GET_ITEM(tuple, split - 1));
        Py_DECREF(tuple);
        if (rc < 0) goto fail;
    }
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

