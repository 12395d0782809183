/* edgemoe's expert-streaming eval callback, the part that runs for every graph node (stream.py).
 *
 * ggml's scheduler asks the eval callback about every node of every graph, twice for the nodes it says yes to:
 * ~600 calls per generated token on ERNIE's 28-layer graph. Crossing into Python for each costs more than the
 * arithmetic of a small MoE layer, so this file answers the questions that need no state in C and calls the
 * Python callback (stream.ExpertStreamer._on_node) only for the nodes streaming acts on:
 *   ask    MUL_MAT_ID                -> Python (binds an expert tensor to its stand-in once, waits for its reads)
 *   ask    a node named ffn_moe_topk-N -> yes (the routing result: the graph stops after it)
 *   ask    anything else               -> no
 *   answer ffn_moe_topk-N             -> Python (starts the reads of the routed experts)
 *   answer anything else               -> continue
 * No ggml header is needed: Python measures the offsets of ggml_tensor's fields from the loaded library's layout
 * (profile._GGMLTensor) and the op number of MUL_MAT_ID from ggml_op_name, and puts them in the state.
 */
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

typedef bool (*edgemoe_eval_cb)(void *tensor, bool ask, void *user_data);

struct edgemoe_stream_state {
    int64_t off_op;   /* offsetof(struct ggml_tensor, op) */
    int64_t off_name; /* offsetof(struct ggml_tensor, name) */
    int32_t op_mul_mat_id;
    int32_t pad;
    edgemoe_eval_cb python;
    uint64_t calls;        /* every call, for the statistics */
    uint64_t python_calls; /* the ones passed on */
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

bool edgemoe_stream_eval(void *tensor, bool ask, void *user_data) {
    struct edgemoe_stream_state *s = (struct edgemoe_stream_state *)user_data;
    const char *t = (const char *)tensor;
    s->calls++;
    if (ask) {
        int32_t op;
        memcpy(&op, t + s->off_op, sizeof op);
        if (op == s->op_mul_mat_id) {
            s->python_calls++;
            return s->python(tensor, ask, NULL);
        }
        return is_routing(t + s->off_name);
    }
    if (is_routing(t + s->off_name)) {
        s->python_calls++;
        return s->python(tensor, ask, NULL);
    }
    return true;
}
