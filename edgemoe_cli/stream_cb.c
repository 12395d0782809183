/* edgemoe's expert streaming, the parts that run for every graph node and every read (stream.py has the design).
 *
 * ggml's scheduler asks the eval callback about every node of every graph, and again for the nodes it said yes to:
 * ~340 calls per generated token on a 5-layer ERNIE graph, ~1900 at the 21B's 28 layers. Crossing into Python for
 * each costs more than a small MoE layer's arithmetic, and Python reader threads contend for the interpreter lock
 * with the callback that waits for them. So this file answers the nodes, reads the expert slices and waits for them in C; Python
 * (stream.ExpertStreamer) is called once per MoE layer and step, at the routing result, to decide what to read and
 * what to evict, and the first time it meets an expert tensor, to bind it:
 *   ask    MUL_MAT_ID over a bound expert tensor -> wait for its slot's reads; yes while another projection of the
 *                                                  layer is still being read (so the next wait holds back nothing)
 *   ask    MUL_MAT_ID over anything else         -> Python (binds an expert tensor, then as above)
 *   ask    a node named ffn_moe_topk-<layer>      -> yes (the routing result: the graph stops after it)
 *   ask    anything else                          -> no
 *   answer ffn_moe_topk-<layer>                   -> Python (submits the reads of the routed experts' slices)
 *   answer anything else                          -> continue
 * Reads run on a few POSIX threads: pread until the needed bytes are in (O_DIRECT or buffered, as Python opened the
 * descriptor), then the slot's count of reads in flight goes down. The first failed read is kept (errno) for
 * Python to raise once decoding returns. No ggml header is needed: Python measures ggml_tensor's field offsets
 * from the loaded library's layout (profile._GGMLTensor) and the op number of MUL_MAT_ID from ggml_op_name.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

typedef bool (*edgemoe_eval_cb)(void *tensor, bool ask, void *user_data);

#define EDGEMOE_MAX_SLOTS 4096 /* expert tensors: 3 per MoE layer */
#define EDGEMOE_MAX_READERS 16

struct job {
    struct job *next;
    int32_t slot, fd, drop_cache;
    char *into;
    int64_t offset, size, need;
};

struct edgemoe_stream {
    int64_t off_op, off_name, off_src0;
    int32_t op_mul_mat_id;
    edgemoe_eval_cb python;
    /* slots: one per expert tensor, numbered by Python */
    int32_t n_slots;
    void *tensor[EDGEMOE_MAX_SLOTS]; /* the ggml tensor bound to the slot, once seen */
    int32_t layer[EDGEMOE_MAX_SLOTS];
    int32_t pending[EDGEMOE_MAX_SLOTS]; /* reads submitted and not finished */
    /* the read queue */
    pthread_mutex_t lock;
    pthread_cond_t work, done;
    struct job *head, *tail;
    pthread_t readers[EDGEMOE_MAX_READERS];
    int32_t n_readers, stopping;
    /* statistics */
    uint64_t calls, python_calls, bytes_read, reads, wait_ns;
    int32_t error; /* errno of the first failed read, or -1 for a file that ended early */
};

static const char ROUTING[] = "ffn_moe_topk-";

/* exactly "ffn_moe_topk-<layer>", as stream._ROUTING_NODE: not the views llama.cpp derives from it */
static bool is_routing(const char *name) {
    if (strncmp(name, ROUTING, sizeof(ROUTING) - 1) != 0) return false;
    const char *digit = name + sizeof(ROUTING) - 1;
    if (*digit == '\0') return false;
    for (; *digit; digit++)
        if (*digit < '0' || *digit > '9') return false;
    return true;
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int read_job(const struct job *j) {
    int64_t got = 0;
    while (got < j->need) {
        ssize_t n = pread(j->fd, j->into + got, (size_t)(j->size - got), (off_t)(j->offset + got));
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return errno;
        if (n == 0) return -1;
        got += n;
    }
#ifdef POSIX_FADV_DONTNEED
    if (j->drop_cache) posix_fadvise(j->fd, (off_t)j->offset, (off_t)j->size, POSIX_FADV_DONTNEED);
#endif
    return 0;
}

static void *reader(void *arg) {
    struct edgemoe_stream *s = (struct edgemoe_stream *)arg;
    pthread_mutex_lock(&s->lock);
    for (;;) {
        while (!s->head && !s->stopping) pthread_cond_wait(&s->work, &s->lock);
        if (!s->head) break;
        struct job *j = s->head;
        s->head = j->next;
        if (!s->head) s->tail = NULL;
        pthread_mutex_unlock(&s->lock);
        int err = read_job(j);
        pthread_mutex_lock(&s->lock);
        if (err && !s->error) s->error = err;
        s->pending[j->slot]--;
        s->reads++;
        if (!err) s->bytes_read += (uint64_t)j->need;
        pthread_cond_broadcast(&s->done);
        free(j);
    }
    pthread_mutex_unlock(&s->lock);
    return NULL;
}

struct edgemoe_stream *edgemoe_stream_new(int64_t off_op, int64_t off_name, int64_t off_src0, int32_t op_mul_mat_id,
                                          edgemoe_eval_cb python, int32_t n_slots, int32_t n_readers) {
    if (n_slots < 0 || n_slots > EDGEMOE_MAX_SLOTS || n_readers < 1 || n_readers > EDGEMOE_MAX_READERS) return NULL;
    struct edgemoe_stream *s = (struct edgemoe_stream *)calloc(1, sizeof *s);
    if (!s) return NULL;
    s->off_op = off_op;
    s->off_name = off_name;
    s->off_src0 = off_src0;
    s->op_mul_mat_id = op_mul_mat_id;
    s->python = python;
    s->n_slots = n_slots;
    pthread_mutex_init(&s->lock, NULL);
    pthread_cond_init(&s->work, NULL);
    pthread_cond_init(&s->done, NULL);
    for (int i = 0; i < n_readers; i++) {
        if (pthread_create(&s->readers[i], NULL, reader, s) != 0) break;
        s->n_readers++;
    }
    return s;
}

/* the expert tensor `tensor` (a ggml_tensor address) of `layer` is slot `slot` */
int32_t edgemoe_stream_bind(struct edgemoe_stream *s, int32_t slot, void *tensor, int32_t layer) {
    if (slot < 0 || slot >= s->n_slots) return -1;
    pthread_mutex_lock(&s->lock);
    s->tensor[slot] = tensor;
    s->layer[slot] = layer;
    pthread_mutex_unlock(&s->lock);
    return 0;
}

/* one read as Python describes it: `size` bytes at `offset` of `fd` into `into`, at least `need` of them */
struct edgemoe_read {
    int32_t slot, fd, drop_cache, pad;
    int64_t into, offset, size, need;
};

/* queue `n` reads, in this order, with one wake-up of the readers (a layer's reads come together) */
int32_t edgemoe_stream_submit(struct edgemoe_stream *s, const struct edgemoe_read *reads, int32_t n) {
    struct job *first = NULL, *last = NULL;
    for (int32_t i = 0; i < n; i++) {
        const struct edgemoe_read *r = &reads[i];
        struct job *j = (r->slot < 0 || r->slot >= s->n_slots || r->need > r->size || r->need < 0)
                            ? NULL
                            : (struct job *)calloc(1, sizeof *j);
        if (!j) {
            while (first) {
                struct job *next = first->next;
                free(first);
                first = next;
            }
            return -1;
        }
        j->slot = r->slot;
        j->fd = r->fd;
        j->into = (char *)(intptr_t)r->into;
        j->offset = r->offset;
        j->size = r->size;
        j->need = r->need;
        j->drop_cache = r->drop_cache;
        if (last) last->next = j;
        else first = j;
        last = j;
    }
    if (!first) return 0;
    pthread_mutex_lock(&s->lock);
    for (struct job *j = first; j; j = j->next) s->pending[j->slot]++;
    if (s->tail) s->tail->next = first;
    else s->head = first;
    s->tail = last;
    pthread_cond_broadcast(&s->work);
    pthread_mutex_unlock(&s->lock);
    return 0;
}

/* wait until no read is in flight */
void edgemoe_stream_drain(struct edgemoe_stream *s) {
    uint64_t start = now_ns();
    pthread_mutex_lock(&s->lock);
    for (;;) {
        bool busy = s->head != NULL;
        for (int32_t i = 0; i < s->n_slots && !busy; i++) busy = s->pending[i] > 0;
        if (!busy) break;
        pthread_cond_wait(&s->done, &s->lock);
    }
    s->wait_ns += now_ns() - start;
    pthread_mutex_unlock(&s->lock);
}

/* calls, python_calls, bytes_read, reads, wait_ns, error */
void edgemoe_stream_stats(struct edgemoe_stream *s, int64_t out[6]) {
    pthread_mutex_lock(&s->lock);
    out[0] = (int64_t)s->calls;
    out[1] = (int64_t)s->python_calls;
    out[2] = (int64_t)s->bytes_read;
    out[3] = (int64_t)s->reads;
    out[4] = (int64_t)s->wait_ns;
    out[5] = s->error;
    pthread_mutex_unlock(&s->lock);
}

void edgemoe_stream_free(struct edgemoe_stream *s) {
    if (!s) return;
    pthread_mutex_lock(&s->lock);
    s->stopping = 1;
    pthread_cond_broadcast(&s->work);
    pthread_mutex_unlock(&s->lock);
    for (int i = 0; i < s->n_readers; i++) pthread_join(s->readers[i], NULL);
    while (s->head) {
        struct job *j = s->head;
        s->head = j->next;
        free(j);
    }
    pthread_mutex_destroy(&s->lock);
    pthread_cond_destroy(&s->work);
    pthread_cond_destroy(&s->done);
    free(s);
}

static int32_t slot_of(struct edgemoe_stream *s, void *tensor) {
    for (int32_t i = 0; i < s->n_slots; i++)
        if (s->tensor[i] == tensor) return i;
    return -1;
}

/* before an expert matmul: wait for its slot's reads; true while another slot of the layer is still reading */
static bool await_slot(struct edgemoe_stream *s, int32_t slot) {
    uint64_t start = now_ns();
    pthread_mutex_lock(&s->lock);
    while (s->pending[slot] > 0) pthread_cond_wait(&s->done, &s->lock);
    bool more = false;
    for (int32_t i = 0; i < s->n_slots && !more; i++) more = s->layer[i] == s->layer[slot] && s->pending[i] > 0;
    s->wait_ns += now_ns() - start;
    pthread_mutex_unlock(&s->lock);
    return more;
}

bool edgemoe_stream_eval(void *tensor, bool ask, void *user_data) {
    struct edgemoe_stream *s = (struct edgemoe_stream *)user_data;
    const char *t = (const char *)tensor;
    s->calls++;
    if (ask) {
        int32_t op;
        memcpy(&op, t + s->off_op, sizeof op);
        if (op == s->op_mul_mat_id) {
            void *src0;
            memcpy(&src0, t + s->off_src0, sizeof src0);
            int32_t slot = slot_of(s, src0);
            if (slot < 0) {
                s->python_calls++;
                bool answer = s->python(tensor, ask, NULL); /* binds it if it is an expert tensor */
                slot = slot_of(s, src0);
                if (slot < 0) return answer;
            }
            return await_slot(s, slot);
        }
        return is_routing(t + s->off_name);
    }
    if (is_routing(t + s->off_name)) {
        s->python_calls++;
        return s->python(tensor, ask, NULL);
    }
    return true;
}
