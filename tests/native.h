/* What the C test programs in tests/ share (see tests/native.py). */
#ifndef RUSTGPT_TESTS_NATIVE_H
#define RUSTGPT_TESTS_NATIVE_H

#include <stdint.h>

static uint64_t native_seed = 88172645463325252ull;

/* The next number of a fixed xorshift64 sequence, in [-1, 1). */
static float uniform(void) {
    native_seed ^= native_seed << 13;
    native_seed ^= native_seed >> 7;
    native_seed ^= native_seed << 17;
    return (float)((native_seed >> 40) / (double)(1u << 24) * 2.0 - 1.0);
}

#endif
