/* rdkafka_perf: a small librdkafka driver for bench/vs_kafka.py, so that weir and Apache Kafka
 * are measured with the same standard C client and no client of weir's own.
 *
 *   rdkafka_perf create BROKERS TOPIC PARTITIONS
 *       creates a topic (replication factor 1) with the admin API
 *   rdkafka_perf produce BROKERS TOPIC RECORDS SIZE ACKS
 *       as fast as the client goes; ack latency from each delivery report
 *   rdkafka_perf consume BROKERS TOPIC RECORDS [batch]
 *       every partition from the beginning (assigned, no group), until RECORDS are read: one
 *       record per rd_kafka_consumer_poll, or with `batch` up to 10,000 per
 *       rd_kafka_consume_batch_queue (at many partitions the one-at-a-time application thread,
 *       not the broker, sets the rate)
 *   rdkafka_perf e2e BROKERS TOPIC RATE SECONDS SIZE ACKS
 *       a producer at RATE records/s and a consumer of the same topic in one process;
 *       latency from the send time written into each value to its arrival at the consumer
 *
 * Prints one JSON object on stdout. Client settings are the same for every broker: linger.ms=5,
 * batch.size=1 MiB, lz4 off, a random partition per record, fetch.wait.max.ms=100 (librdkafka's
 * defaults elsewhere).
 */
#include <inttypes.h>
#include <librdkafka/rdkafka.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static void die(const char *what, const char *detail) {
    fprintf(stderr, "rdkafka_perf: %s: %s\n", what, detail ? detail : "");
    exit(1);
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void set(rd_kafka_conf_t *conf, const char *key, const char *value) {
    char err[512];
    if (rd_kafka_conf_set(conf, key, value, err, sizeof err) != RD_KAFKA_CONF_OK)
        die(key, err);
}

static rd_kafka_conf_t *base_conf(const char *brokers) {
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    set(conf, "bootstrap.servers", brokers);
    set(conf, "api.version.request", "true");
    return conf;
}

/* --- latency samples ------------------------------------------------------------------------ */

typedef struct {
    int64_t *ns;
    size_t len, cap;
} samples_t;

static void push(samples_t *s, int64_t v) {
    if (s->len == s->cap) {
        s->cap = s->cap ? s->cap * 2 : 1 << 16;
        s->ns = realloc(s->ns, s->cap * sizeof *s->ns);
        if (!s->ns) die("out of memory", NULL);
    }
    s->ns[s->len++] = v;
}

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* Prints `"name_p50_ms": ..., ...` for the samples (sorted in place). */
static void print_percentiles(samples_t *s, const char *name) {
    static const double qs[] = {0.5, 0.99, 0.999};
    static const char *labels[] = {"p50", "p99", "p999"};
    qsort(s->ns, s->len, sizeof *s->ns, cmp_i64);
    for (int i = 0; i < 3; i++) {
        double v = 0;
        if (s->len) v = s->ns[(size_t)(qs[i] * (double)(s->len - 1))] / 1e6;
        printf(", \"%s_%s_ms\": %.3f", name, labels[i], v);
    }
    printf(", \"%s_max_ms\": %.3f", name, s->len ? s->ns[s->len - 1] / 1e6 : 0.0);
}

/* --- create -------------------------------------------------------------------------------- */

static int create(const char *brokers, const char *topic, int partitions) {
    char err[512];
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_PRODUCER, base_conf(brokers), err, sizeof err);
    if (!rk) die("admin client", err);
    rd_kafka_NewTopic_t *nt = rd_kafka_NewTopic_new(topic, partitions, 1, err, sizeof err);
    if (!nt) die("new topic", err);
    rd_kafka_queue_t *q = rd_kafka_queue_new(rk);
    rd_kafka_CreateTopics(rk, &nt, 1, NULL, q);
    rd_kafka_event_t *ev = rd_kafka_queue_poll(q, 60 * 1000);
    if (!ev) die("create topic", "no answer in 60 s");
    if (rd_kafka_event_error(ev)) die("create topic", rd_kafka_event_error_string(ev));
    size_t n;
    const rd_kafka_topic_result_t **res = rd_kafka_CreateTopics_result_topics(rd_kafka_event_CreateTopics_result(ev), &n);
    for (size_t i = 0; i < n; i++)
        if (rd_kafka_topic_result_error(res[i])) die("create topic", rd_kafka_topic_result_error_string(res[i]));
    printf("{\"topic\": \"%s\", \"partitions\": %d}\n", topic, partitions);
    rd_kafka_event_destroy(ev);
    rd_kafka_queue_destroy(q);
    rd_kafka_NewTopic_destroy(nt);
    rd_kafka_destroy(rk);
    return 0;
}

/* --- produce -------------------------------------------------------------------------------- */

typedef struct {
    samples_t acks;
    long failed;
    atomic_long delivered;
} produce_state_t;

static void on_delivery(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque) {
    (void)rk;
    produce_state_t *st = opaque;
    if (m->err) {
        if (st->failed++ == 0) fprintf(stderr, "rdkafka_perf: delivery failed: %s\n", rd_kafka_err2str(m->err));
    } else {
        push(&st->acks, now_ns() - (int64_t)(intptr_t)m->_private);
    }
    atomic_fetch_add(&st->delivered, 1);
}

static rd_kafka_t *new_producer(const char *brokers, const char *acks, produce_state_t *st) {
    char err[512];
    rd_kafka_conf_t *conf = base_conf(brokers);
    set(conf, "acks", acks);
    set(conf, "linger.ms", "5");
    set(conf, "batch.size", "1048576");
    set(conf, "queue.buffering.max.messages", "1000000");
    set(conf, "queue.buffering.max.kbytes", "1048576");
    set(conf, "compression.codec", "none");
    /* Each keyless record to a random partition, not one partition per 10 ms: the partitions
     * end up even, so consumers of every partition finish together. */
    set(conf, "sticky.partitioning.linger.ms", "0");
    rd_kafka_conf_set_dr_msg_cb(conf, on_delivery);
    rd_kafka_conf_set_opaque(conf, st);
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, err, sizeof err);
    if (!rk) die("producer", err);
    return rk;
}

/* Sends one record (copied by librdkafka), waiting for queue space. */
static void send_one(rd_kafka_t *rk, const char *topic, char *value, size_t size, int64_t sent) {
    for (;;) {
        rd_kafka_resp_err_t e = rd_kafka_producev(
            rk, RD_KAFKA_V_TOPIC(topic), RD_KAFKA_V_VALUE(value, size),
            RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY), RD_KAFKA_V_OPAQUE((void *)(intptr_t)sent),
            RD_KAFKA_V_END);
        if (e == RD_KAFKA_RESP_ERR_NO_ERROR) return;
        if (e != RD_KAFKA_RESP_ERR__QUEUE_FULL) die("produce", rd_kafka_err2str(e));
        rd_kafka_poll(rk, 1);
    }
}

static int produce(const char *brokers, const char *topic, long records, size_t size, const char *acks) {
    produce_state_t st = {0};
    rd_kafka_t *rk = new_producer(brokers, acks, &st);
    char *value = malloc(size);
    for (size_t i = 0; i < size; i++) value[i] = (char)('a' + i % 26);
    int64_t start = now_ns();
    for (long i = 0; i < records; i++) {
        send_one(rk, topic, value, size, now_ns());
        if ((i & 1023) == 0) rd_kafka_poll(rk, 0);
    }
    rd_kafka_flush(rk, 120 * 1000);
    double secs = (now_ns() - start) / 1e9;
    rd_kafka_poll(rk, 0);
    printf("{\"records\": %ld, \"failed\": %ld, \"seconds\": %.6f", records, st.failed, secs);
    print_percentiles(&st.acks, "ack");
    printf("}\n");
    rd_kafka_destroy(rk);
    return st.failed ? 1 : 0;
}

/* --- consume -------------------------------------------------------------------------------- */

static rd_kafka_t *new_consumer(const char *brokers) {
    char err[512];
    rd_kafka_conf_t *conf = base_conf(brokers);
    char group[64];
    snprintf(group, sizeof group, "rdkafka-perf-%ld", (long)now_ns());
    set(conf, "group.id", group); /* required by the API; never joined: partitions are assigned */
    set(conf, "enable.auto.commit", "false");
    set(conf, "fetch.wait.max.ms", "100");
    set(conf, "queued.max.messages.kbytes", "262144");
    set(conf, "enable.partition.eof", "false");
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, err, sizeof err);
    if (!rk) die("consumer", err);
    rd_kafka_poll_set_consumer(rk);
    return rk;
}

/* Assigns every partition of `topic` from `offset`. */
static void assign_all(rd_kafka_t *rk, const char *topic, int64_t offset) {
    const struct rd_kafka_metadata *md;
    rd_kafka_topic_t *t = rd_kafka_topic_new(rk, topic, NULL);
    rd_kafka_resp_err_t e;
    /* A topic created a moment ago may not be known to every part of the broker yet. */
    for (int64_t until = now_ns() + 10 * 1000000000LL;;) {
        if ((e = rd_kafka_metadata(rk, 0, t, &md, 10000))) die("metadata", rd_kafka_err2str(e));
        if (md->topic_cnt == 1 && !md->topics[0].err && md->topics[0].partition_cnt > 0) break;
        rd_kafka_metadata_destroy(md);
        if (now_ns() > until) die("metadata", "topic not found");
        struct timespec ts = {0, 100 * 1000000};
        nanosleep(&ts, NULL);
    }
    rd_kafka_topic_partition_list_t *list = rd_kafka_topic_partition_list_new(md->topics[0].partition_cnt);
    for (int i = 0; i < md->topics[0].partition_cnt; i++)
        rd_kafka_topic_partition_list_add(list, topic, md->topics[0].partitions[i].id)->offset = offset;
    rd_kafka_metadata_destroy(md);
    rd_kafka_topic_destroy(t);
    if ((e = rd_kafka_assign(rk, list))) die("assign", rd_kafka_err2str(e));
    rd_kafka_topic_partition_list_destroy(list);
}

static int consume(const char *brokers, const char *topic, long records, int batched) {
    rd_kafka_t *rk = new_consumer(brokers);
    int64_t start = now_ns();
    assign_all(rk, topic, RD_KAFKA_OFFSET_BEGINNING);
    long read = 0;
    size_t bytes = 0;
    int64_t idle_since = now_ns();
    rd_kafka_queue_t *queue = batched ? rd_kafka_queue_get_consumer(rk) : NULL;
    static rd_kafka_message_t *got[10000];
    while (read < records) {
        ssize_t n = queue ? rd_kafka_consume_batch_queue(queue, 100, got, 10000)
                          : (got[0] = rd_kafka_consumer_poll(rk, 100)) != NULL;
        if (n <= 0) {
            if (now_ns() - idle_since > 30 * 1000000000LL) break;
            continue;
        }
        idle_since = now_ns();
        for (ssize_t i = 0; i < n; i++) {
            rd_kafka_message_t *m = got[i];
            if (m->err) {
                fprintf(stderr, "rdkafka_perf: consume: %s\n", rd_kafka_message_errstr(m));
            } else {
                read++;
                bytes += m->len;
            }
            rd_kafka_message_destroy(m);
        }
    }
    if (queue) rd_kafka_queue_destroy(queue);
    double secs = (now_ns() - start) / 1e9;
    printf("{\"records\": %ld, \"bytes\": %zu, \"seconds\": %.6f}\n", read, bytes, secs);
    rd_kafka_consumer_close(rk);
    rd_kafka_destroy(rk);
    return read == records ? 0 : 1;
}

/* --- end to end ----------------------------------------------------------------------------- */

typedef struct {
    const char *brokers, *topic, *acks;
    long rate;
    double seconds;
    size_t size;
    long sent;
    produce_state_t st;
} e2e_producer_t;

static void *e2e_produce(void *arg) {
    e2e_producer_t *p = arg;
    rd_kafka_t *rk = new_producer(p->brokers, p->acks, &p->st);
    char *value = calloc(1, p->size < 8 ? 8 : p->size);
    int64_t start = now_ns(), interval = 1000000000LL / p->rate;
    long total = (long)(p->rate * p->seconds);
    for (long i = 0; i < total; i++) {
        int64_t due = start + i * interval, t;
        while ((t = now_ns()) < due) {
            rd_kafka_poll(rk, 0);
            int64_t left = due - now_ns();
            if (left > 200000) {
                struct timespec ts = {0, left - 100000};
                nanosleep(&ts, NULL);
            }
        }
        memcpy(value, &t, sizeof t);
        send_one(rk, p->topic, value, p->size < 8 ? 8 : p->size, t);
        p->sent++;
    }
    rd_kafka_flush(rk, 60 * 1000);
    rd_kafka_destroy(rk);
    free(value);
    return NULL;
}

static int e2e(const char *brokers, const char *topic, long rate, double seconds, size_t size, const char *acks) {
    rd_kafka_t *rk = new_consumer(brokers);
    assign_all(rk, topic, RD_KAFKA_OFFSET_BEGINNING);
    /* Let the consumer reach the (empty) log before anything is sent. */
    for (int64_t until = now_ns() + 1000000000LL; now_ns() < until;) {
        rd_kafka_message_t *m = rd_kafka_consumer_poll(rk, 100);
        if (m) rd_kafka_message_destroy(m);
    }
    e2e_producer_t p = {.brokers = brokers, .topic = topic, .acks = acks, .rate = rate, .seconds = seconds, .size = size};
    pthread_t thread;
    pthread_create(&thread, NULL, e2e_produce, &p);
    samples_t lat = {0};
    long expected = (long)(rate * seconds);
    int64_t idle_since = now_ns();
    while ((long)lat.len < expected) {
        rd_kafka_message_t *m = rd_kafka_consumer_poll(rk, 100);
        int64_t t = now_ns();
        if (!m) {
            if (t - idle_since > 30 * 1000000000LL) break;
            continue;
        }
        idle_since = t;
        if (!m->err && m->len >= 8) {
            int64_t sent;
            memcpy(&sent, m->payload, sizeof sent);
            push(&lat, t - sent);
        }
        rd_kafka_message_destroy(m);
    }
    pthread_join(thread, NULL);
    printf("{\"records\": %zu, \"sent\": %ld, \"failed\": %ld", lat.len, p.sent, p.st.failed);
    print_percentiles(&lat, "e2e");
    print_percentiles(&p.st.acks, "ack");
    printf("}\n");
    rd_kafka_consumer_close(rk);
    rd_kafka_destroy(rk);
    return (long)lat.len == expected && !p.st.failed ? 0 : 1;
}

int main(int argc, char **argv) {
    if (argc >= 5 && !strcmp(argv[1], "create"))
        return create(argv[2], argv[3], atoi(argv[4]));
    if (argc >= 7 && !strcmp(argv[1], "produce"))
        return produce(argv[2], argv[3], atol(argv[4]), (size_t)atol(argv[5]), argv[6]);
    if (argc >= 5 && !strcmp(argv[1], "consume"))
        return consume(argv[2], argv[3], atol(argv[4]), argc >= 6 && !strcmp(argv[5], "batch"));
    if (argc >= 8 && !strcmp(argv[1], "e2e"))
        return e2e(argv[2], argv[3], atol(argv[4]), atof(argv[5]), (size_t)atol(argv[6]), argv[7]);
    fprintf(stderr,
            "usage: rdkafka_perf create BROKERS TOPIC PARTITIONS\n"
            "       rdkafka_perf produce BROKERS TOPIC RECORDS SIZE ACKS\n"
            "       rdkafka_perf consume BROKERS TOPIC RECORDS\n"
            "       rdkafka_perf e2e BROKERS TOPIC RATE SECONDS SIZE ACKS\n");
    return 2;
}
