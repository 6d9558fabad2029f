#ifndef BATON_CRABBITMQ_SHIM_H
#define BATON_CRABBITMQ_SHIM_H

// rabbitmq-c 0.12+ installs <rabbitmq-c/amqp.h>; 0.11 (Debian 12) has flat headers.
#if __has_include(<rabbitmq-c/amqp.h>)
#include <rabbitmq-c/amqp.h>
#include <rabbitmq-c/tcp_socket.h>
#include <rabbitmq-c/ssl_socket.h>
#elif __has_include(<amqp.h>)
#include <amqp.h>
#include <amqp_tcp_socket.h>
#include <amqp_ssl_socket.h>
#else
#error "rabbitmq-c headers not found: install librabbitmq-dev (Debian/Ubuntu) or rabbitmq-c (Homebrew)"
#endif

// amqp_login_with_properties is C-variadic, which Swift cannot call: fix the PLAIN arguments here.
static inline amqp_rpc_reply_t CBaton_amqp_login_plain(
    amqp_connection_state_t state, char const *vhost, int channel_max, int frame_max, int heartbeat,
    const amqp_table_t *client_properties, char const *user, char const *password) {
    return amqp_login_with_properties(state, vhost, channel_max, frame_max, heartbeat, client_properties,
                                      AMQP_SASL_METHOD_PLAIN, user, password);
}

// Field values are tagged unions; build them here so Swift never writes a union member by hand.
static inline amqp_field_value_t CBaton_field_utf8(amqp_bytes_t value) {
    amqp_field_value_t field;
    field.kind = AMQP_FIELD_KIND_UTF8;
    field.value.bytes = value;
    return field;
}

static inline amqp_field_value_t CBaton_field_bool(int value) {
    amqp_field_value_t field;
    field.kind = AMQP_FIELD_KIND_BOOLEAN;
    field.value.boolean = value ? 1 : 0;
    return field;
}

static inline amqp_field_value_t CBaton_field_i64(int64_t value) {
    amqp_field_value_t field;
    field.kind = AMQP_FIELD_KIND_I64;
    field.value.i64 = value;
    return field;
}

static inline amqp_field_value_t CBaton_field_table(amqp_table_t value) {
    amqp_field_value_t field;
    field.kind = AMQP_FIELD_KIND_TABLE;
    field.value.table = value;
    return field;
}

#endif
