/* kvindex._native: the block index core in C (see docs/index.md for the layout).
 *
 * Plain CPython C API, C99. Every public method first converts its Python arguments into
 * C arrays (this may run Python code: attribute access, int conversion) and only then
 * mutates the tables without touching any Python object, so a failing conversion leaves the
 * index unchanged and no other thread can observe a half-applied block. The GIL is never
 * released; the service still wraps the index in LockedIndex (Python-level calls span
 * several C calls).
 *
 * Structures:
 *  - holder sets: interned engine bitmasks of any width (trailing zero words trimmed), with
 *    reference counts; id 0 is the empty set. Sets whose count drops to zero stay interned
 *    until a sweep (so the transition cache stays valid between sweeps).
 *  - per tier a key table, CPython-dict style: a dense entry array (content key, holder-set
 *    id) in insertion order plus an open-addressing index of u32 entry numbers. Re-storing a
 *    key moves it to the young end (like MemoryIndex's pop + insert); eviction takes the
 *    oldest live entries; dead entries are compacted away when the array fills.
 *  - per (engine slot, tier) an engine-hash table: open addressing with linear probing and
 *    backward-shift deletion over flat arrays (u64 hash, u64 value, u8 meta).
 */
#include "native.h"
#include <structmember.h> /* READONLY */


#define NTIERS 3
#define MAX_WORDS (MAX_SLOTS / 64)
#define TC_SIZE 8192
#define MAX_PLANES 30 /* lookups of up to 2**30 keys */

static inline uint64_t mix64(uint64_t x) {
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

static inline int popcount64(uint64_t x) { return __builtin_popcountll(x); }

/* ---------------------------------------------------------------------------------------
 * Holder sets
 */

#define HS_UNUSED 0xFFFFFFFFu

typedef struct {
    uint64_t **words; /* words[id]: nw[id] words (NULL when nw == 0) */
    uint32_t *nw;     /* HS_UNUSED for free ids */
    uint32_t *ref;
    uint32_t *pop;
    uint64_t *hash;
    uint32_t n, cap; /* ids 0..n-1 allocated */
    uint32_t *free_ids;
    uint32_t nfree, freecap;
    uint32_t *itab; /* intern table of ids (0 = empty slot) */
    uint32_t icap, ilive;
    uint32_t dead;    /* interned sets with ref 0 */
    uint32_t max_nw;  /* widest set ever interned (lookups size their masks by it) */
    size_t word_bytes; /* words allocated, for stats */
    /* transition cache: (from, slot, add) -> to */
    uint32_t tc_from[TC_SIZE];
    uint32_t tc_key[TC_SIZE]; /* slot << 1 | add, + 1 (0 = empty) */
    uint32_t tc_to[TC_SIZE];
} SetPool;

static uint64_t hs_hash_words(const uint64_t *w, uint32_t nw) {
    uint64_t h = mix64(0x9e3779b97f4a7c15ULL ^ nw);
    for (uint32_t i = 0; i < nw; i++) h = mix64(h ^ w[i]) + i;
    return h;
}

static int sp_init(SetPool *p) {
    memset(p, 0, sizeof(*p));
    p->cap = 16;
    p->words = calloc(p->cap, sizeof(uint64_t *));
    p->nw = calloc(p->cap, sizeof(uint32_t));
    p->ref = calloc(p->cap, sizeof(uint32_t));
    p->pop = calloc(p->cap, sizeof(uint32_t));
    p->hash = calloc(p->cap, sizeof(uint64_t));
    p->icap = 64;
    p->itab = calloc(p->icap, sizeof(uint32_t));
    if (!p->words || !p->nw || !p->ref || !p->pop || !p->hash || !p->itab) return -1;
    p->n = 1; /* id 0: the empty set */
    return 0;
}

static void sp_free(SetPool *p) {
    if (p->words)
        for (uint32_t i = 0; i < p->n; i++) free(p->words[i]);
    free(p->words);
    free(p->nw);
    free(p->ref);
    free(p->pop);
    free(p->hash);
    free(p->free_ids);
    free(p->itab);
    memset(p, 0, sizeof(*p));
}

static void sp_itab_put(uint32_t *itab, uint32_t icap, uint64_t h, uint32_t id) {
    uint32_t m = icap - 1, i = (uint32_t)h & m;
    while (itab[i]) i = (i + 1) & m;
    itab[i] = id;
}

static int sp_itab_resize(SetPool *p, uint32_t icap) {
    uint32_t *t = calloc(icap, sizeof(uint32_t));
    if (!t) return -1;
    for (uint32_t id = 1; id < p->n; id++)
        if (p->nw[id] != HS_UNUSED) sp_itab_put(t, icap, p->hash[id], id);
    free(p->itab);
    p->itab = t;
    p->icap = icap;
    return 0;
}

/* Intern w[0..nw) (trimmed, nw >= 1): the set's id, not increfed; 0 on allocation failure. */
static uint32_t sp_intern(SetPool *p, const uint64_t *w, uint32_t nw) {
    uint64_t h = hs_hash_words(w, nw);
    uint32_t m = p->icap - 1, i = (uint32_t)h & m;
    for (uint32_t id; (id = p->itab[i]) != 0; i = (i + 1) & m) {
        if (p->hash[id] == h && p->nw[id] == nw && memcmp(p->words[id], w, nw * 8) == 0)
            return id;
    }
    if ((p->ilive + 1) * 4 > p->icap * 3) {
        if (sp_itab_resize(p, p->icap * 2) < 0) return 0;
    }
    uint64_t *copy = malloc(nw * 8);
    if (!copy) return 0;
    uint32_t id;
    if (p->nfree) {
        id = p->free_ids[--p->nfree];
    } else {
        if (p->n == p->cap) {
            uint32_t cap = p->cap * 2;
            uint64_t **words = realloc(p->words, cap * sizeof(uint64_t *));
            if (!words) {
                free(copy);
                return 0;
            }
            p->words = words;
            uint32_t *nwv = realloc(p->nw, cap * sizeof(uint32_t));
            if (!nwv) {
                free(copy);
                return 0;
            }
            p->nw = nwv;
            uint32_t *ref = realloc(p->ref, cap * sizeof(uint32_t));
            if (!ref) {
                free(copy);
                return 0;
            }
            p->ref = ref;
            uint32_t *pop = realloc(p->pop, cap * sizeof(uint32_t));
            if (!pop) {
                free(copy);
                return 0;
            }
            p->pop = pop;
            uint64_t *hash = realloc(p->hash, cap * sizeof(uint64_t));
            if (!hash) {
                free(copy);
                return 0;
            }
            p->hash = hash;
            p->cap = cap;
        }
        id = p->n++;
    }
    memcpy(copy, w, nw * 8);
    uint32_t pc = 0;
    for (uint32_t k = 0; k < nw; k++) pc += (uint32_t)popcount64(w[k]);
    p->words[id] = copy;
    p->nw[id] = nw;
    p->ref[id] = 0;
    p->pop[id] = pc;
    p->hash[id] = h;
    p->word_bytes += nw * 8;
    if (nw > p->max_nw) p->max_nw = nw;
    p->dead++; /* ref 0 until the caller increfs */
    p->ilive++;
    sp_itab_put(p->itab, p->icap, h, id);
    return id;
}

static inline void sp_incref(SetPool *p, uint32_t id) {
    if (id && p->ref[id]++ == 0) p->dead--;
}

static inline void sp_decref(SetPool *p, uint32_t id) {
    if (id && --p->ref[id] == 0) p->dead++;
}

static inline int sp_has(const SetPool *p, uint32_t id, uint32_t slot) {
    uint32_t w = slot >> 6;
    return id && w < p->nw[id] && (p->words[id][w] >> (slot & 63) & 1);
}

/* The set `from` with `slot` added (add=1) or removed: its id (not increfed); 0 means the
 * empty set when removing; UINT32_MAX on allocation failure. */
static uint32_t sp_transition(SetPool *p, uint32_t from, uint32_t slot, int add) {
    uint32_t key = ((slot << 1) | (uint32_t)add) + 1;
    uint32_t c = (uint32_t)mix64(((uint64_t)from << 32) ^ key) & (TC_SIZE - 1);
    if (p->tc_key[c] == key && p->tc_from[c] == from) return p->tc_to[c];
    uint64_t tmp[MAX_WORDS];
    uint32_t nw = from ? p->nw[from] : 0;
    if (nw) memcpy(tmp, p->words[from], nw * 8);
    uint32_t w = slot >> 6;
    if (add) {
        while (nw <= w) tmp[nw++] = 0;
        tmp[w] |= 1ULL << (slot & 63);
    } else if (w < nw) {
        tmp[w] &= ~(1ULL << (slot & 63));
    }
    while (nw && tmp[nw - 1] == 0) nw--;
    uint32_t to = nw ? sp_intern(p, tmp, nw) : 0;
    if (nw && to == 0) return UINT32_MAX;
    p->tc_from[c] = from;
    p->tc_key[c] = key;
    p->tc_to[c] = to;
    return to;
}

/* Free interned sets nobody references (called between operations only). */
static void sp_sweep(SetPool *p) {
    if (p->dead < 1024 || p->dead * 2 < p->ilive) return;
    uint32_t need = p->nfree + p->dead;
    if (need > p->freecap) {
        uint32_t *f = realloc(p->free_ids, need * sizeof(uint32_t));
        if (!f) return; /* try again later */
        p->free_ids = f;
        p->freecap = need;
    }
    for (uint32_t id = 1; id < p->n; id++) {
        if (p->nw[id] != HS_UNUSED && p->ref[id] == 0) {
            free(p->words[id]);
            p->word_bytes -= p->nw[id] * 8;
            p->words[id] = NULL;
            p->nw[id] = HS_UNUSED;
            p->free_ids[p->nfree++] = id;
            p->ilive--;
        }
    }
    p->dead = 0;
    memset(p->itab, 0, p->icap * sizeof(uint32_t));
    for (uint32_t id = 1; id < p->n; id++)
        if (p->nw[id] != HS_UNUSED) sp_itab_put(p->itab, p->icap, p->hash[id], id);
    memset(p->tc_key, 0, sizeof(p->tc_key));
}

/* ---------------------------------------------------------------------------------------
 * Key tables (per tier): content key -> holder-set id, insertion ordered.
 */

typedef struct {
    uint32_t *index; /* entry number + 1, 0 = empty */
    uint32_t icap;
    uint64_t *ekey;
    uint32_t *eset; /* 0 = dead entry */
    uint32_t elen, ecap, head, live;
} KeyTable;

static void kt_free(KeyTable *t) {
    free(t->index);
    free(t->ekey);
    free(t->eset);
    memset(t, 0, sizeof(*t));
}

static inline uint32_t kt_home(const KeyTable *t, uint64_t key) {
    return (uint32_t)mix64(key) & (t->icap - 1);
}

/* Entry number of key, or -1. */
static inline int64_t kt_find(const KeyTable *t, uint64_t key, uint32_t *pos) {
    if (!t->icap) return -1;
    uint32_t m = t->icap - 1, i = kt_home(t, key);
    for (uint32_t v; (v = t->index[i]) != 0; i = (i + 1) & m) {
        if (t->ekey[v - 1] == key) {
            if (pos) *pos = i;
            return (int64_t)(v - 1);
        }
    }
    if (pos) *pos = i;
    return -1;
}

static void kt_reindex(KeyTable *t) {
    memset(t->index, 0, (size_t)t->icap * sizeof(uint32_t));
    uint32_t m = t->icap - 1;
    for (uint32_t e = t->head; e < t->elen; e++) {
        if (!t->eset[e]) continue;
        uint32_t i = kt_home(t, t->ekey[e]);
        while (t->index[i]) i = (i + 1) & m;
        t->index[i] = e + 1;
    }
}

/* Room for one more live key and one more entry. */
static int kt_reserve(KeyTable *t) {
    if ((uint64_t)(t->live + 1) * 10 > (uint64_t)t->icap * 7) {
        uint32_t icap = t->icap ? t->icap * 2 : 16;
        uint32_t *index = malloc((size_t)icap * sizeof(uint32_t));
        if (!index) return -1;
        free(t->index);
        t->index = index;
        t->icap = icap;
        kt_reindex(t);
    }
    if (t->elen == t->ecap) {
        uint32_t dead = t->elen - t->live;
        if (dead && dead >= t->elen / 4) {
            uint32_t j = 0;
            for (uint32_t e = t->head; e < t->elen; e++) {
                if (t->eset[e]) {
                    t->ekey[j] = t->ekey[e];
                    t->eset[j] = t->eset[e];
                    j++;
                }
            }
            t->elen = j;
            t->head = 0;
            kt_reindex(t);
        } else {
            uint32_t ecap = t->ecap ? t->ecap + t->ecap / 2 : 16;
            uint64_t *ekey = realloc(t->ekey, (size_t)ecap * 8);
            if (!ekey) return -1;
            t->ekey = ekey;
            uint32_t *eset = realloc(t->eset, (size_t)ecap * 4);
            if (!eset) return -1;
            t->eset = eset;
            t->ecap = ecap;
        }
    }
    return 0;
}

/* Backward-shift deletion of index position pos. */
static void kt_unindex(KeyTable *t, uint32_t pos) {
    uint32_t m = t->icap - 1, i = pos, j = pos;
    for (;;) {
        j = (j + 1) & m;
        uint32_t v = t->index[j];
        if (!v) break;
        uint32_t k = kt_home(t, t->ekey[v - 1]);
        if (((j - k) & m) >= ((j - i) & m)) {
            t->index[i] = v;
            i = j;
        }
    }
    t->index[i] = 0;
}

/* ---------------------------------------------------------------------------------------
 * Engine-hash tables (per engine slot and tier): engine hash -> content key(s).
 */

#define EH_USED 0x80
#define EH_MULTI 0x04
#define EH_KIND 0x03 /* 0 uint64 int, 1 negative int64, 2 bytes digest, 3 big-int digest */
/* physical copies of the block beyond the first (0-3; kvindex.index.base.MAX_COPIES = 4),
 * and MemoryIndex's copy flags: aged (one age_copies since the last confirming store) and
 * absorbed (a removal was taken by an extra copy; the claim needs a store) */
#define EH_COPIES 0x18
#define EH_COPY_ONE 0x08
#define EH_ABSORBED 0x20
#define EH_AGED 0x40
#define EH_COPY_STATE (EH_COPIES | EH_ABSORBED | EH_AGED)

typedef struct {
    uint64_t *hk;
    uint64_t *val; /* the key, or (multi) a pointer to uint64_t[1 + n] = {n, keys...} */
    uint8_t *meta;
    uint32_t cap, len;
    size_t multi_bytes;
} EHTable;

static inline uint32_t eh_home(uint32_t cap, uint64_t hk, uint8_t kind) {
    return (uint32_t)mix64(hk ^ ((uint64_t)kind * 0x9e3779b97f4a7c15ULL)) & (cap - 1);
}

static void eh_free(EHTable *t) {
    if (t->meta)
        for (uint32_t i = 0; i < t->cap; i++)
            if ((t->meta[i] & EH_USED) && (t->meta[i] & EH_MULTI))
                free((void *)(uintptr_t)t->val[i]);
    free(t->hk);
    free(t->val);
    free(t->meta);
    memset(t, 0, sizeof(*t));
}

static inline int64_t eh_find(const EHTable *t, uint64_t hk, uint8_t kind) {
    if (!t->cap) return -1;
    uint32_t m = t->cap - 1, i = eh_home(t->cap, hk, kind);
    for (uint8_t meta; (meta = t->meta[i]) & EH_USED; i = (i + 1) & m)
        if (t->hk[i] == hk && (meta & EH_KIND) == kind) return i;
    return -1;
}

static int eh_resize(EHTable *t, uint32_t cap) {
    uint64_t *hk = malloc((size_t)cap * 8), *val = malloc((size_t)cap * 8);
    uint8_t *meta = calloc(cap, 1);
    if (!hk || !val || !meta) {
        free(hk);
        free(val);
        free(meta);
        return -1;
    }
    uint32_t m = cap - 1;
    for (uint32_t s = 0; s < t->cap; s++) {
        if (!(t->meta[s] & EH_USED)) continue;
        uint32_t i = eh_home(cap, t->hk[s], t->meta[s] & EH_KIND);
        while (meta[i] & EH_USED) i = (i + 1) & m;
        hk[i] = t->hk[s];
        val[i] = t->val[s];
        meta[i] = t->meta[s];
    }
    free(t->hk);
    free(t->val);
    free(t->meta);
    t->hk = hk;
    t->val = val;
    t->meta = meta;
    t->cap = cap;
    return 0;
}

static int eh_reserve(EHTable *t, uint32_t extra) {
    uint64_t need = (uint64_t)t->len + extra;
    if (need * 5 <= (uint64_t)t->cap * 4) return 0;
    uint64_t cap = t->cap ? t->cap : 8;
    while (need * 5 > cap * 4) cap *= 2;
    if (cap > 0x80000000ULL) return -1;
    return eh_resize(t, (uint32_t)cap);
}

static void eh_delete_at(EHTable *t, uint32_t pos) {
    uint32_t m = t->cap - 1, i = pos, j = pos;
    for (;;) {
        j = (j + 1) & m;
        if (!(t->meta[j] & EH_USED)) break;
        uint32_t k = eh_home(t->cap, t->hk[j], t->meta[j] & EH_KIND);
        if (((j - k) & m) >= ((j - i) & m)) {
            t->hk[i] = t->hk[j];
            t->val[i] = t->val[j];
            t->meta[i] = t->meta[j];
            i = j;
        }
    }
    t->meta[i] = 0;
    t->len--;
}

/* ---------------------------------------------------------------------------------------
 * The core object
 */

typedef struct {
    PyObject_HEAD
    SetPool sets;
    KeyTable tiers[NTIERS];
    EHTable *eh; /* eh[slot * NTIERS + tier] */
    uint32_t nslots;
    uint64_t max_keys, keep_keys;
    uint64_t max_entries, keep_entries; /* the memory budget's share of entries */
    uint64_t orphans, orphan_threshold; /* entries evicted since the last orphan sweep */
    int copy_state;                     /* some entry may carry copy state (age_copies walks) */
    uint64_t entries, evictions;
} Core;

static int core_slots(Core *c, uint32_t slot) {
    if (slot < c->nslots) return 0;
    uint32_t n = c->nslots ? c->nslots : 8;
    while (n <= slot) n *= 2;
    EHTable *eh = realloc(c->eh, (size_t)n * NTIERS * sizeof(EHTable));
    if (!eh) return -1;
    memset(eh + (size_t)c->nslots * NTIERS, 0, (size_t)(n - c->nslots) * NTIERS * sizeof(EHTable));
    c->eh = eh;
    c->nslots = n;
    return 0;
}

/* Add slot to key's holders in tier (the key moves to the young end). */
static int core_hold(Core *c, KeyTable *t, uint64_t key, uint32_t slot) {
    if (kt_reserve(t) < 0) return -1;
    uint32_t pos;
    int64_t e = kt_find(t, key, &pos);
    uint32_t old = e >= 0 ? t->eset[e] : 0;
    uint32_t now = old;
    if (!sp_has(&c->sets, old, slot)) {
        now = sp_transition(&c->sets, old, slot, 1);
        if (now == UINT32_MAX) return -1;
        sp_incref(&c->sets, now);
        sp_decref(&c->sets, old);
        c->entries++;
    }
    if (e >= 0) {
        if ((uint32_t)e == t->elen - 1) {
            t->eset[e] = now;
            return 0;
        }
        t->eset[e] = 0; /* dead; the live copy goes to the end */
    } else {
        t->live++;
    }
    t->ekey[t->elen] = key;
    t->eset[t->elen] = now;
    t->index[pos] = ++t->elen;
    return 0;
}

/* Drop slot from key's holders in tier (position kept). */
static int core_unhold(Core *c, KeyTable *t, uint64_t key, uint32_t slot) {
    uint32_t pos;
    int64_t e = kt_find(t, key, &pos);
    if (e < 0) return 0;
    uint32_t old = t->eset[e];
    if (!sp_has(&c->sets, old, slot)) return 0;
    uint32_t now = sp_transition(&c->sets, old, slot, 0);
    if (now == UINT32_MAX) return -1;
    sp_incref(&c->sets, now);
    sp_decref(&c->sets, old);
    c->entries--;
    if (now) {
        t->eset[e] = now;
    } else {
        t->eset[e] = 0;
        t->live--;
        kt_unindex(t, pos);
    }
    return 0;
}

static int core_unhold_value(Core *c, KeyTable *t, uint8_t meta, uint64_t val, uint32_t slot) {
    if (!(meta & EH_MULTI)) return core_unhold(c, t, val, slot);
    const uint64_t *keys = (const uint64_t *)(uintptr_t)val;
    for (uint64_t k = 0; k < keys[0]; k++)
        if (core_unhold(c, t, keys[1 + k], slot) < 0) return -1;
    return 0;
}

static int core_sweep_orphans(Core *c);

/* MemoryIndex._evict, the same arithmetic: evict the oldest keys of the largest tier until
 * the key slots are within keep_keys and the entries within keep_entries. */
static void core_evict(Core *c) {
    uint64_t total = 0;
    for (int t = 0; t < NTIERS; t++) total += c->tiers[t].live;
    if (total <= c->max_keys && c->entries <= c->max_entries) return;
    uint64_t evicted_entries = 0;
    for (;;) {
        uint64_t slots = 0;
        for (int t = 0; t < NTIERS; t++) slots += c->tiers[t].live;
        uint64_t target = slots > c->keep_keys ? slots - c->keep_keys : 0;
        if (c->entries > c->keep_entries) {
            __uint128_t over = (__uint128_t)(c->entries - c->keep_entries) * slots;
            uint64_t by_entries = (uint64_t)((over + c->entries - 1) / c->entries);
            if (by_entries > target) target = by_entries;
        }
        if (!target || !slots) break;
        KeyTable *t = &c->tiers[0];
        for (int k = 1; k < NTIERS; k++)
            if (c->tiers[k].live > t->live) t = &c->tiers[k];
        uint64_t n = t->live < target ? t->live : target;
        if (!n) break;
        uint64_t done = 0;
        while (done < n) {
            uint32_t e = t->head++;
            uint32_t sid = t->eset[e];
            if (!sid) continue;
            uint32_t pos = 0;
            kt_find(t, t->ekey[e], &pos);
            kt_unindex(t, pos);
            c->entries -= c->sets.pop[sid];
            evicted_entries += c->sets.pop[sid];
            sp_decref(&c->sets, sid);
            t->eset[e] = 0;
            t->live--;
            done++;
        }
        c->evictions += n;
    }
    c->orphans += evicted_entries;
    if (c->orphans >= c->orphan_threshold) core_sweep_orphans(c);
}

/* -- argument conversion --------------------------------------------------------------- */

static int as_slot(PyObject *obj, uint32_t *slot) {
    unsigned long v = PyLong_AsUnsignedLong(obj);
    if (v == (unsigned long)-1 && PyErr_Occurred()) return -1;
    if (v >= MAX_SLOTS) {
        PyErr_Format(PyExc_OverflowError, "engine slot %lu out of range (max %d)", v,
                     MAX_SLOTS - 1);
        return -1;
    }
    *slot = (uint32_t)v;
    return 0;
}

static int as_tier(int tier) {
    if (tier < 0 || tier >= NTIERS) {
        PyErr_Format(PyExc_ValueError, "tier %d out of range", tier);
        return -1;
    }
    return 0;
}

static int as_key(PyObject *obj, uint64_t *key) {
    if (!PyLong_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "content keys must be int, not %.100s",
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(obj);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
            PyErr_Clear();
            PyErr_SetString(PyExc_OverflowError, "content keys must be in [0, 2**64)");
        }
        return -1;
    }
    *key = v;
    return 0;
}

static uint64_t digest_bytes(const unsigned char *s, Py_ssize_t n) {
    uint64_t h = mix64(0x243f6a8885a308d3ULL ^ (uint64_t)n);
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, s + i, 8);
        h = mix64(h ^ w) * 0x9e3779b97f4a7c15ULL;
    }
    uint64_t w = 0;
    memcpy(&w, s + i, (size_t)(n - i));
    return mix64(h ^ w ^ ((uint64_t)(n - i) << 59));
}

/* Engine hash -> (u64, kind). Ints in [0, 2**64) and [-2**63, 0) are exact; bytes and other
 * ints are 64-bit digests (see docs/index.md for the collision probability). */
static int as_engine_hash(PyObject *obj, uint64_t *hk, uint8_t *kind) {
    if (PyLong_Check(obj)) {
        unsigned long long u = PyLong_AsUnsignedLongLong(obj);
        if (!(u == (unsigned long long)-1 && PyErr_Occurred())) {
            *hk = u;
            *kind = 0;
            return 0;
        }
        PyErr_Clear();
        int overflow = 0;
        long long s = PyLong_AsLongLongAndOverflow(obj, &overflow);
        if (!overflow && !(s == -1 && PyErr_Occurred())) {
            *hk = (uint64_t)s;
            *kind = 1;
            return 0;
        }
        PyErr_Clear();
        /* a big int: digest its hexadecimal text (exact per value, rare) */
        PyObject *text = PyNumber_ToBase(obj, 16);
        if (!text) return -1;
        Py_ssize_t len;
        const char *raw = PyUnicode_AsUTF8AndSize(text, &len);
        if (!raw) {
            Py_DECREF(text);
            return -1;
        }
        *hk = digest_bytes((const unsigned char *)raw, len);
        *kind = 3;
        Py_DECREF(text);
        return 0;
    }
    if (PyBytes_Check(obj)) {
        *hk = digest_bytes((const unsigned char *)PyBytes_AS_STRING(obj), PyBytes_GET_SIZE(obj));
        *kind = 2;
        return 0;
    }
    PyErr_Format(PyExc_TypeError, "engine hashes must be int or bytes, not %.100s",
                 Py_TYPE(obj)->tp_name);
    return -1;
}

/* -- Core methods ------------------------------------------------------------------------ */

static PyObject *core_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    Core *c = (Core *)type->tp_alloc(type, 0);
    if (!c) return NULL;
    if (sp_init(&c->sets) < 0) {
        Py_DECREF(c);
        return PyErr_NoMemory();
    }
    c->max_keys = UINT64_MAX;
    c->keep_keys = UINT64_MAX;
    c->max_entries = UINT64_MAX;
    c->keep_entries = UINT64_MAX;
    c->orphan_threshold = 1024;
    return (PyObject *)c;
}

static int core_init(Core *c, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"max_keys",    "keep_keys",        "max_entries",
                             "keep_entries", "orphan_threshold", NULL};
    PyObject *max_obj, *keep_obj, *max_e_obj = NULL, *keep_e_obj = NULL, *orphan_obj = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|OOO", kwlist, &max_obj, &keep_obj,
                                     &max_e_obj, &keep_e_obj, &orphan_obj))
        return -1;
    unsigned long long max_keys = PyLong_AsUnsignedLongLong(max_obj);
    if (max_keys == (unsigned long long)-1 && PyErr_Occurred()) return -1;
    unsigned long long keep_keys = PyLong_AsUnsignedLongLong(keep_obj);
    if (keep_keys == (unsigned long long)-1 && PyErr_Occurred()) return -1;
    unsigned long long max_entries = UINT64_MAX, keep_entries = UINT64_MAX, orphans = 1024;
    if (max_e_obj) {
        max_entries = PyLong_AsUnsignedLongLong(max_e_obj);
        if (max_entries == (unsigned long long)-1 && PyErr_Occurred()) return -1;
    }
    if (keep_e_obj) {
        keep_entries = PyLong_AsUnsignedLongLong(keep_e_obj);
        if (keep_entries == (unsigned long long)-1 && PyErr_Occurred()) return -1;
    }
    if (orphan_obj) {
        orphans = PyLong_AsUnsignedLongLong(orphan_obj);
        if (orphans == (unsigned long long)-1 && PyErr_Occurred()) return -1;
    }
    if (keep_keys > max_keys || keep_entries > max_entries) {
        PyErr_SetString(PyExc_ValueError, "keep_keys/keep_entries must be <= their maximum");
        return -1;
    }
    c->max_keys = max_keys;
    c->keep_keys = keep_keys;
    c->max_entries = max_entries;
    c->keep_entries = keep_entries;
    c->orphan_threshold = orphans;
    return 0;
}

static void core_dealloc(Core *c) {
    for (int t = 0; t < NTIERS; t++) kt_free(&c->tiers[t]);
    if (c->eh)
        for (size_t i = 0; i < (size_t)c->nslots * NTIERS; i++) eh_free(&c->eh[i]);
    free(c->eh);
    sp_free(&c->sets);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

typedef struct {
    uint64_t hk;
    uint8_t kind;
    uint32_t nkeys;
    uint64_t first;  /* the key when nkeys == 1 */
    uint64_t *multi; /* malloc'd {n, keys...} when nkeys > 1 */
} ParsedBlock;

static void free_parsed(ParsedBlock *pb, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) free(pb[i].multi);
    PyMem_Free(pb);
}

PyObject *str_engine_hash, *str_keys;


/* Reading StoredBlock.engine_hash / .keys: a slots dataclass keeps them in member slots at
 * fixed offsets. The offsets of the last block type seen are cached, guarded by the type's
 * version tag (any change to the class invalidates it) and by generic attribute lookup
 * (no __getattribute__/__getattr__ override); anything else takes PyObject_GetAttr. */
#ifndef Py_T_OBJECT_EX
#define Py_T_OBJECT_EX 16
#endif

static struct {
    PyTypeObject *type; /* strong reference */
    unsigned int version;
    Py_ssize_t off_hash, off_keys;
} block_slots;

static Py_ssize_t member_offset(PyTypeObject *type, PyObject *name) {
    PyObject *d = _PyType_Lookup(type, name); /* borrowed */
    if (!d || !Py_IS_TYPE(d, &PyMemberDescr_Type)) return -1;
    PyMemberDef *m = ((PyMemberDescrObject *)d)->d_member;
    if (m->type != Py_T_OBJECT_EX || (m->flags & READONLY)) return -1;
    return m->offset;
}

static int block_slots_valid(PyTypeObject *t) {
    return t == block_slots.type && (t->tp_flags & Py_TPFLAGS_VALID_VERSION_TAG) &&
           t->tp_version_tag == block_slots.version && t->tp_getattro == PyObject_GenericGetAttr;
}

/* New references to block.engine_hash and block.keys. */
static int block_fields(PyObject *block, PyObject **eh, PyObject **keys) {
    PyTypeObject *t = Py_TYPE(block);
    if (block_slots_valid(t)) {
        PyObject *a = *(PyObject **)((char *)block + block_slots.off_hash);
        PyObject *b = *(PyObject **)((char *)block + block_slots.off_keys);
        if (a && b) {
            Py_INCREF(a);
            Py_INCREF(b);
            *eh = a;
            *keys = b;
            return 0;
        }
    }
    *eh = PyObject_GetAttr(block, str_engine_hash);
    if (!*eh) return -1;
    *keys = PyObject_GetAttr(block, str_keys);
    if (!*keys) {
        Py_CLEAR(*eh);
        return -1;
    }
    if (t != block_slots.type && t->tp_getattro == PyObject_GenericGetAttr) {
        Py_ssize_t oh = member_offset(t, str_engine_hash), ok = member_offset(t, str_keys);
        if (oh >= 0 && ok >= 0 && (t->tp_flags & Py_TPFLAGS_VALID_VERSION_TAG)) {
            Py_INCREF(t);
            Py_XDECREF(block_slots.type);
            block_slots.type = t;
            block_slots.version = t->tp_version_tag;
            block_slots.off_hash = oh;
            block_slots.off_keys = ok;
        }
    }
    return 0;
}

/* store(slot, tier, blocks, copies_from=-1): blocks are objects with .engine_hash and .keys;
 * from position copies_from on (>= 0), a block already held with the same keys is another
 * physical copy of it. */
static PyObject *core_store(Core *c, PyObject *args) {
    PyObject *slot_obj, *blocks;
    int tier;
    Py_ssize_t copies_from = -1;
    uint32_t slot;
    if (!PyArg_ParseTuple(args, "OiO|n", &slot_obj, &tier, &blocks, &copies_from)) return NULL;
    if (as_slot(slot_obj, &slot) < 0 || as_tier(tier) < 0) return NULL;
    PyObject *seq = PySequence_Fast(blocks, "blocks must be a sequence");
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    ParsedBlock *pb = PyMem_Calloc(n ? (size_t)n : 1, sizeof(ParsedBlock));
    if (!pb) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    Py_ssize_t parsed = 0;
    for (; parsed < n; parsed++) {
        PyObject *block = PySequence_Fast_GET_ITEM(seq, parsed);
        ParsedBlock *b = &pb[parsed];
        PyObject *eh, *keys;
        if (block_fields(block, &eh, &keys) < 0) goto fail;
        int rc = as_engine_hash(eh, &b->hk, &b->kind);
        Py_DECREF(eh);
        if (rc < 0) {
            Py_DECREF(keys);
            goto fail;
        }
        PyObject *kseq = PySequence_Fast(keys, "StoredBlock.keys must be a sequence");
        Py_DECREF(keys);
        if (!kseq) goto fail;
        Py_ssize_t nk = PySequence_Fast_GET_SIZE(kseq);
        if (nk == 0 || nk > 0xFFFFFFF) {
            Py_DECREF(kseq);
            PyErr_SetString(PyExc_ValueError, "a stored block needs 1 or more content keys");
            goto fail;
        }
        b->nkeys = (uint32_t)nk;
        if (nk > 1) {
            b->multi = malloc((size_t)(nk + 1) * 8);
            if (!b->multi) {
                Py_DECREF(kseq);
                PyErr_NoMemory();
                goto fail;
            }
            b->multi[0] = (uint64_t)nk;
        }
        for (Py_ssize_t k = 0; k < nk; k++) {
            uint64_t key;
            if (as_key(PySequence_Fast_GET_ITEM(kseq, k), &key) < 0) {
                Py_DECREF(kseq);
                goto fail;
            }
            if (nk == 1)
                b->first = key;
            else
                b->multi[1 + k] = key;
        }
        Py_DECREF(kseq);
    }
    Py_DECREF(seq);
    seq = NULL;
    /* mutation phase: no Python objects from here on */
    if (core_slots(c, slot) < 0) goto nomem;
    EHTable *mine = &c->eh[(size_t)slot * NTIERS + tier];
    if (n > 0xFFFFFFF || eh_reserve(mine, (uint32_t)n) < 0) goto nomem;
    KeyTable *t = &c->tiers[tier];
    for (Py_ssize_t i = 0; i < n; i++) {
        ParsedBlock *b = &pb[i];
        int64_t pos = eh_find(mine, b->hk, b->kind);
        uint64_t val = b->nkeys == 1 ? b->first : (uint64_t)(uintptr_t)b->multi;
        uint8_t meta = EH_USED | b->kind | (b->nkeys > 1 ? EH_MULTI : 0);
        if (pos >= 0) {
            uint8_t old_meta = mine->meta[pos];
            int same;
            if (old_meta & EH_MULTI) {
                uint64_t *old = (uint64_t *)(uintptr_t)mine->val[pos];
                same = b->nkeys > 1 && old[0] == b->nkeys &&
                       memcmp(old + 1, b->multi + 1, (size_t)b->nkeys * 8) == 0;
                mine->multi_bytes -= (size_t)(old[0] + 1) * 8;
                free(old);
            } else {
                same = b->nkeys == 1 && mine->val[pos] == b->first;
            }
            if (same) { /* the same block again: confirmed (flags go), maybe one more copy */
                uint8_t extra = old_meta & EH_COPIES;
                if (copies_from >= 0 && i >= copies_from && extra != EH_COPIES)
                    extra += EH_COPY_ONE;
                meta |= extra;
                if (extra) c->copy_state = 1;
            }
        } else {
            uint32_t m = mine->cap - 1, j = eh_home(mine->cap, b->hk, b->kind);
            while (mine->meta[j] & EH_USED) j = (j + 1) & m;
            pos = j;
            mine->hk[pos] = b->hk;
            mine->len++;
        }
        mine->val[pos] = val;
        mine->meta[pos] = meta;
        if (b->multi) mine->multi_bytes += (size_t)(b->nkeys + 1) * 8;
        b->multi = NULL; /* owned by the table now */
        const uint64_t *keys = b->nkeys == 1 ? &b->first : (const uint64_t *)(uintptr_t)val + 1;
        for (uint32_t k = 0; k < b->nkeys; k++)
            if (core_hold(c, t, keys[k], slot) < 0) goto nomem;
    }
    free_parsed(pb, n);
    sp_sweep(&c->sets);
    Py_RETURN_NONE;
nomem:
    free_parsed(pb, n);
    return PyErr_NoMemory();
fail:
    Py_XDECREF(seq);
    free_parsed(pb, n);
    return NULL;
}

static int parse_hashes(PyObject *obj, uint64_t **hk_out, uint8_t **kind_out, Py_ssize_t *n_out) {
    PyObject *seq = PySequence_Fast(obj, "engine_hashes must be a sequence");
    if (!seq) return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    uint64_t *hk = PyMem_Malloc((n ? (size_t)n : 1) * 8);
    uint8_t *kind = PyMem_Malloc(n ? (size_t)n : 1);
    if (!hk || !kind) {
        PyMem_Free(hk);
        PyMem_Free(kind);
        Py_DECREF(seq);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (as_engine_hash(PySequence_Fast_GET_ITEM(seq, i), &hk[i], &kind[i]) < 0) {
            PyMem_Free(hk);
            PyMem_Free(kind);
            Py_DECREF(seq);
            return -1;
        }
    }
    Py_DECREF(seq);
    *hk_out = hk;
    *kind_out = kind;
    *n_out = n;
    return 0;
}

/* Remove the engine-hash entry at pos, dropping the engine's holder bits for its keys. */
static int core_drop_at(Core *c, EHTable *mine, KeyTable *t, uint32_t pos, uint32_t slot) {
    uint8_t meta = mine->meta[pos];
    uint64_t val = mine->val[pos];
    eh_delete_at(mine, (uint32_t)pos);
    int rc = core_unhold_value(c, t, meta, val, slot);
    if (meta & EH_MULTI) {
        mine->multi_bytes -= (size_t)(((uint64_t *)(uintptr_t)val)[0] + 1) * 8;
        free((void *)(uintptr_t)val);
    }
    return rc;
}

/* Is any key of an engine-hash entry still held by slot in tier? */
static int eh_entry_held(Core *c, KeyTable *t, uint8_t meta, uint64_t val, uint32_t slot) {
    const uint64_t *keys = &val;
    uint64_t n = 1;
    if (meta & EH_MULTI) {
        keys = (const uint64_t *)(uintptr_t)val + 1;
        n = ((const uint64_t *)(uintptr_t)val)[0];
    }
    for (uint64_t k = 0; k < n; k++) {
        int64_t e = kt_find(t, keys[k], NULL);
        if (e >= 0 && sp_has(&c->sets, t->eset[e], slot)) return 1;
    }
    return 0;
}

/* Drop engine-hash entries none of whose keys their engine holds any more (the keys were
 * evicted by the capacity bound): what MemoryIndex._sweep_orphans does. */
static int core_sweep_orphans(Core *c) {
    c->orphans = 0;
    for (uint32_t slot = 0; slot < c->nslots; slot++) {
        for (int tier = 0; tier < NTIERS; tier++) {
            EHTable *mine = &c->eh[(size_t)slot * NTIERS + tier];
            KeyTable *t = &c->tiers[tier];
            uint32_t i = 0;
            while (i < mine->cap && mine->len) {
                uint8_t meta = mine->meta[i];
                if (!(meta & EH_USED) || eh_entry_held(c, t, meta, mine->val[i], slot)) {
                    i++;
                    continue;
                }
                uint64_t val = mine->val[i];
                eh_delete_at(mine, i); /* a later entry may move here: look at i again */
                if (meta & EH_MULTI) {
                    mine->multi_bytes -= (size_t)(((uint64_t *)(uintptr_t)val)[0] + 1) * 8;
                    free((void *)(uintptr_t)val);
                }
            }
        }
    }
    return 0;
}

/* remove(slot, tier, engine_hashes) */
static PyObject *core_remove(Core *c, PyObject *args) {
    PyObject *slot_obj, *hashes;
    int tier;
    uint32_t slot;
    if (!PyArg_ParseTuple(args, "OiO", &slot_obj, &tier, &hashes)) return NULL;
    if (as_slot(slot_obj, &slot) < 0 || as_tier(tier) < 0) return NULL;
    uint64_t *hk;
    uint8_t *kind;
    Py_ssize_t n;
    if (parse_hashes(hashes, &hk, &kind, &n) < 0) return NULL;
    int rc = 0;
    if (slot < c->nslots) {
        EHTable *mine = &c->eh[(size_t)slot * NTIERS + tier];
        for (Py_ssize_t i = 0; i < n && mine->len; i++) {
            int64_t pos = eh_find(mine, hk[i], kind[i]);
            if (pos >= 0 && (mine->meta[pos] & EH_COPIES)) {
                /* another physical copy remains: still held, until age_copies unless a
                 * store confirms it */
                uint8_t meta = mine->meta[pos] - EH_COPY_ONE;
                mine->meta[pos] = (uint8_t)((meta & ~EH_AGED) | EH_ABSORBED);
                c->copy_state = 1;
                continue;
            }
            if (pos >= 0 && core_drop_at(c, mine, &c->tiers[tier], (uint32_t)pos, slot) < 0) {
                rc = -1;
                break;
            }
        }
    }
    PyMem_Free(hk);
    PyMem_Free(kind);
    if (rc < 0) return PyErr_NoMemory();
    sp_sweep(&c->sets);
    Py_RETURN_NONE;
}

static int core_clear_tier(Core *c, uint32_t slot, int tier) {
    if (slot >= c->nslots) return 0;
    EHTable *mine = &c->eh[(size_t)slot * NTIERS + tier];
    KeyTable *t = &c->tiers[tier];
    for (uint32_t i = 0; i < mine->cap; i++) {
        uint8_t meta = mine->meta[i];
        if (!(meta & EH_USED)) continue;
        if (core_unhold_value(c, t, meta, mine->val[i], slot) < 0) return -1;
    }
    eh_free(mine);
    return 0;
}

/* clear(slot, tier): tier -1 clears every tier */
static PyObject *core_clear(Core *c, PyObject *args) {
    PyObject *slot_obj;
    int tier;
    uint32_t slot;
    if (!PyArg_ParseTuple(args, "Oi", &slot_obj, &tier)) return NULL;
    if (as_slot(slot_obj, &slot) < 0) return NULL;
    if (tier != -1 && as_tier(tier) < 0) return NULL;
    for (int t = 0; t < NTIERS; t++) {
        if (tier != -1 && t != tier) continue;
        if (core_clear_tier(c, slot, t) < 0) return PyErr_NoMemory();
    }
    sp_sweep(&c->sets);
    Py_RETURN_NONE;
}

/* age_copies(): MemoryIndex.age_copies over the meta bytes (walks the engine-hash tables
 * while any entry may carry copy state). */
static PyObject *core_age_copies(Core *c, PyObject *unused) {
    if (!c->copy_state) Py_RETURN_NONE;
    int left = 0, rc = 0;
    for (uint32_t slot = 0; slot < c->nslots && rc == 0; slot++) {
        for (int tier = 0; tier < NTIERS && rc == 0; tier++) {
            EHTable *mine = &c->eh[(size_t)slot * NTIERS + tier];
            uint32_t i = 0;
            while (i < mine->cap && mine->len) {
                uint8_t meta = mine->meta[i];
                if (!(meta & EH_USED) || !(meta & (EH_COPIES | EH_ABSORBED))) {
                    i++;
                    continue;
                }
                if (!(meta & EH_AGED)) {
                    mine->meta[i] = meta | EH_AGED;
                    left = 1;
                    i++;
                    continue;
                }
                if (meta & EH_ABSORBED) { /* unconfirmed: the engine may not hold it */
                    if (core_drop_at(c, mine, &c->tiers[tier], i, slot) < 0) {
                        rc = -1;
                        break;
                    }
                    continue; /* a later entry may have moved here */
                }
                mine->meta[i] = meta & (uint8_t)~EH_COPY_STATE;
                i++;
            }
        }
    }
    c->copy_state = left;
    sp_sweep(&c->sets);
    if (rc < 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *core_evict_if_needed(Core *c, PyObject *unused) {
    core_evict(c);
    sp_sweep(&c->sets);
    Py_RETURN_NONE;
}

static PyObject *last_key(uint8_t meta, uint64_t val) {
    if (meta & EH_MULTI) {
        const uint64_t *k = (const uint64_t *)(uintptr_t)val;
        return PyLong_FromUnsignedLongLong(k[k[0]]);
    }
    return PyLong_FromUnsignedLongLong(val);
}

/* resolve(slot, engine_hash) -> the block's last key in the best tier holding it, or None */
static PyObject *core_resolve(Core *c, PyObject *args) {
    PyObject *slot_obj, *hash_obj;
    uint32_t slot;
    uint64_t hk;
    uint8_t kind;
    if (!PyArg_ParseTuple(args, "OO", &slot_obj, &hash_obj)) return NULL;
    if (as_slot(slot_obj, &slot) < 0 || as_engine_hash(hash_obj, &hk, &kind) < 0) return NULL;
    if (slot >= c->nslots) Py_RETURN_NONE;
    for (int t = 0; t < NTIERS; t++) {
        EHTable *mine = &c->eh[(size_t)slot * NTIERS + t];
        int64_t pos = eh_find(mine, hk, kind);
        if (pos >= 0) return last_key(mine->meta[pos], mine->val[pos]);
    }
    Py_RETURN_NONE;
}

/* Vertical (bit-sliced) counters: planes[p * nw + w] is bit p of the counts of slots in
 * word w; adding a mask increments every slot in it at once. */
static inline void vadd(uint64_t *planes, uint32_t nplanes, uint32_t nw, uint32_t w,
                        uint64_t mask) {
    for (uint32_t p = 0; p < nplanes && mask; p++) {
        uint64_t *cell = &planes[(size_t)p * nw + w];
        uint64_t carry = *cell & mask;
        *cell ^= mask;
        mask = carry;
    }
}

static uint32_t vget(const uint64_t *planes, uint32_t nplanes, uint32_t nw, uint32_t slot) {
    uint32_t v = 0, w = slot >> 6, b = slot & 63;
    for (uint32_t p = 0; p < nplanes; p++) v |= (uint32_t)(planes[(size_t)p * nw + w] >> b & 1) << p;
    return v;
}

static inline uint64_t set_word(const SetPool *p, uint32_t id, uint32_t w) {
    return id && w < p->nw[id] ? p->words[id][w] : 0;
}

/* lookup(keys, slots_or_None) -> [(slot, blocks, gpu, cpu, storage)] in MemoryIndex order */
static PyObject *core_lookup(Core *c, PyObject *args) {
    PyObject *keys_obj, *active_obj;
    if (!PyArg_ParseTuple(args, "OO", &keys_obj, &active_obj)) return NULL;
    /* the widest mask in play */
    uint32_t nw = c->sets.max_nw ? c->sets.max_nw : 1;
    PyObject *seq = PySequence_Fast(keys_obj, "keys must be a sequence");
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    uint64_t *keys = PyMem_Malloc((n ? (size_t)n : 1) * 8);
    uint64_t *work = PyMem_Calloc((size_t)(4 + 2 * MAX_PLANES) * nw, 8);
    PyObject *result = NULL;
    if (!keys || !work) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t usable = n; /* keys from here on cannot be held (not in [0, 2**64)) */
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *k = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyLong_Check(k)) {
            PyErr_Format(PyExc_TypeError, "content keys must be int, not %.100s",
                         Py_TYPE(k)->tp_name);
            goto done;
        }
        unsigned long long v = PyLong_AsUnsignedLongLong(k);
        if (v == (unsigned long long)-1 && PyErr_Occurred()) {
            if (!PyErr_ExceptionMatches(PyExc_OverflowError)) goto done;
            PyErr_Clear();
            usable = i;
            break;
        }
        keys[i] = v;
    }
    uint64_t *active = work;                      /* nw words */
    uint64_t *below_cpu = work + 2 * (size_t)nw;  /* nw */
    uint64_t *below_sto = work + 3 * (size_t)nw;  /* nw */
    uint64_t *planes_cpu = work + 4 * (size_t)nw; /* nplanes * nw */
    uint64_t *planes_sto = work + (4 + MAX_PLANES) * (size_t)nw;
    uint32_t nplanes = 0;
    while (nplanes < MAX_PLANES && ((uint64_t)1 << nplanes) <= (uint64_t)usable) nplanes++;
    if (usable >= ((Py_ssize_t)1 << MAX_PLANES)) {
        PyErr_SetString(PyExc_OverflowError, "too many keys in one lookup");
        goto done;
    }
    if (active_obj == Py_None) {
        memset(active, 0xFF, (size_t)nw * 8);
    } else {
        PyObject *aseq = PySequence_Fast(active_obj, "engine slots must be a sequence");
        if (!aseq) goto done;
        for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(aseq); i++) {
            uint32_t slot;
            if (as_slot(PySequence_Fast_GET_ITEM(aseq, i), &slot) < 0) {
                Py_DECREF(aseq);
                goto done;
            }
            if ((slot >> 6) < nw) active[slot >> 6] |= 1ULL << (slot & 63);
        }
        Py_DECREF(aseq);
    }
    /* records of (slot, blocks): engines drop once, so at most nw * 64 */
    uint32_t *rec_slot = PyMem_Malloc((size_t)nw * 64 * 4);
    uint32_t *rec_blocks = PyMem_Malloc((size_t)nw * 64 * 4);
    if (!rec_slot || !rec_blocks) {
        PyMem_Free(rec_slot);
        PyMem_Free(rec_blocks);
        PyErr_NoMemory();
        goto done;
    }
    uint32_t nrec = 0;
    const SetPool *sp = &c->sets;
    KeyTable *gpu = &c->tiers[0], *cpu = &c->tiers[1], *sto = &c->tiers[2];
    int lower = cpu->live || sto->live;
    uint32_t pg = UINT32_MAX, pc = UINT32_MAX, ps = UINT32_MAX; /* previous triple */
    int any_below = 0;
    Py_ssize_t position = 0;
    for (Py_ssize_t i = 0; i < usable; i++) {
        int64_t e;
        uint32_t g = (e = kt_find(gpu, keys[i], NULL)) >= 0 ? gpu->eset[e] : 0;
        uint32_t cc = 0, s = 0;
        if (lower) {
            cc = (e = kt_find(cpu, keys[i], NULL)) >= 0 ? cpu->eset[e] : 0;
            s = (e = kt_find(sto, keys[i], NULL)) >= 0 ? sto->eset[e] : 0;
        }
        if (g != pg || cc != pc || s != ps || position == 0) {
            /* recompute held and the lower-tier masks (active only shrinks) */
            int none = 1;
            any_below = 0;
            for (uint32_t w = 0; w < nw; w++) {
                uint64_t gw = set_word(sp, g, w), cw = set_word(sp, cc, w);
                uint64_t hw = (gw | cw | set_word(sp, s, w)) & active[w];
                uint64_t dropped = active[w] & ~hw;
                if (dropped && position) {
                    while (dropped) {
                        uint64_t low = dropped & (~dropped + 1);
                        rec_slot[nrec] = w * 64 + (uint32_t)__builtin_ctzll(dropped);
                        rec_blocks[nrec++] = (uint32_t)position;
                        dropped ^= low;
                    }
                }
                uint64_t below = hw & ~gw;
                below_cpu[w] = below & cw;
                below_sto[w] = below & ~cw;
                if (below) any_below = 1;
                if (hw) none = 0;
                active[w] = hw;
            }
            pg = g;
            pc = cc;
            ps = s;
            if (none) {
                position++;
                break;
            }
        }
        if (any_below) {
            for (uint32_t w = 0; w < nw; w++) {
                if (below_cpu[w]) vadd(planes_cpu, nplanes, nw, w, below_cpu[w]);
                if (below_sto[w]) vadd(planes_sto, nplanes, nw, w, below_sto[w]);
            }
        }
        position++;
    }
    /* engines still matching at the end (of the keys, or before an out-of-range key that
     * nobody can hold) */
    if (position) {
        for (uint32_t w = 0; w < nw; w++) {
            uint64_t left = active[w];
            while (left) {
                uint64_t low = left & (~left + 1);
                rec_slot[nrec] = w * 64 + (uint32_t)__builtin_ctzll(left);
                rec_blocks[nrec++] = (uint32_t)position;
                left ^= low;
            }
        }
    }
    result = PyList_New(nrec);
    if (!result) goto free_rec;
    for (uint32_t r = 0; r < nrec; r++) {
        uint32_t slot = rec_slot[r], blocks = rec_blocks[r];
        uint32_t n_cpu = vget(planes_cpu, nplanes, nw, slot);
        uint32_t n_sto = vget(planes_sto, nplanes, nw, slot);
        PyObject *item = Py_BuildValue("(IIIII)", slot, blocks, blocks - n_cpu - n_sto, n_cpu,
                                       n_sto);
        if (!item) {
            Py_CLEAR(result);
            break;
        }
        PyList_SET_ITEM(result, r, item);
    }
free_rec:
    PyMem_Free(rec_slot);
    PyMem_Free(rec_blocks);
done:
    Py_DECREF(seq);
    PyMem_Free(keys);
    PyMem_Free(work);
    return result;
}

/* slots_with_blocks() -> slots holding at least one engine hash in some tier */
static PyObject *core_slots_with_blocks(Core *c, PyObject *unused) {
    PyObject *out = PyList_New(0);
    if (!out) return NULL;
    for (uint32_t s = 0; s < c->nslots; s++) {
        int any = 0;
        for (int t = 0; t < NTIERS; t++) any |= c->eh[(size_t)s * NTIERS + t].len != 0;
        if (!any) continue;
        PyObject *v = PyLong_FromUnsignedLong(s);
        if (!v || PyList_Append(out, v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(v);
    }
    return out;
}

static size_t core_bytes(const Core *c) {
    size_t b = sizeof(Core);
    for (int t = 0; t < NTIERS; t++) {
        const KeyTable *k = &c->tiers[t];
        b += (size_t)k->icap * 4 + (size_t)k->ecap * 12;
    }
    b += (size_t)c->nslots * NTIERS * sizeof(EHTable);
    for (size_t i = 0; i < (size_t)c->nslots * NTIERS; i++)
        b += (size_t)c->eh[i].cap * 17 + c->eh[i].multi_bytes;
    const SetPool *p = &c->sets;
    b += (size_t)p->cap * (sizeof(uint64_t *) + 3 * 4 + 8) + (size_t)p->icap * 4 +
         (size_t)p->freecap * 4 + p->word_bytes;
    return b;
}

/* stats() -> (keys, entries, evictions, approx_bytes, key_slots) */
static PyObject *core_stats(Core *c, PyObject *unused) {
    KeyTable *g = &c->tiers[0], *cpu = &c->tiers[1], *sto = &c->tiers[2];
    uint64_t keys = g->live;
    if (cpu->live || sto->live) {
        for (uint32_t e = cpu->head; e < cpu->elen; e++)
            if (cpu->eset[e] && kt_find(g, cpu->ekey[e], NULL) < 0) keys++;
        for (uint32_t e = sto->head; e < sto->elen; e++)
            if (sto->eset[e] && kt_find(g, sto->ekey[e], NULL) < 0 &&
                kt_find(cpu, sto->ekey[e], NULL) < 0)
                keys++;
    }
    uint64_t slots = (uint64_t)g->live + cpu->live + sto->live;
    return Py_BuildValue("(KKKnK)", (unsigned long long)keys, (unsigned long long)c->entries,
                         (unsigned long long)c->evictions, (Py_ssize_t)core_bytes(c),
                         (unsigned long long)slots);
}

static PyMethodDef core_methods[] = {
    {"store", (PyCFunction)core_store, METH_VARARGS,
     "store(slot, tier, blocks): the engine slot holds these StoredBlocks in tier."},
    {"remove", (PyCFunction)core_remove, METH_VARARGS,
     "remove(slot, tier, engine_hashes): drop these engine blocks from tier."},
    {"clear", (PyCFunction)core_clear, METH_VARARGS,
     "clear(slot, tier): drop everything the slot holds in tier (-1: every tier)."},
    {"age_copies", (PyCFunction)core_age_copies, METH_NOARGS,
     "One tick of the copy clock (MemoryIndex.age_copies)."},
    {"evict_if_needed", (PyCFunction)core_evict_if_needed, METH_NOARGS,
     "Evict the oldest key slots when more than max_keys are held."},
    {"resolve", (PyCFunction)core_resolve, METH_VARARGS,
     "resolve(slot, engine_hash) -> last content key of the block, or None."},
    {"lookup", (PyCFunction)core_lookup, METH_VARARGS,
     "lookup(keys, slots_or_None) -> [(slot, blocks, gpu, cpu, storage)]."},
    {"slots_with_blocks", (PyCFunction)core_slots_with_blocks, METH_NOARGS,
     "Engine slots holding at least one block."},
    {"stats", (PyCFunction)core_stats, METH_NOARGS,
     "stats() -> (keys, entries, evictions, approx_bytes, key_slots)."},
    {NULL, NULL, 0, NULL},
};

PyTypeObject CoreType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "kvindex._native.Core",
    .tp_basicsize = sizeof(Core),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The native block index core (used through kvindex.index.native.NativeIndex).",
    .tp_new = core_new,
    .tp_init = (initproc)core_init,
    .tp_dealloc = (destructor)core_dealloc,
    .tp_methods = core_methods,
};


