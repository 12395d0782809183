// Isolates the step of ggml's SVE+i8mm q4_K/q6_K dot product (nrc == 2, `case 256: case 512:` branch in
// ggml-cpu/arch/arm/quants.c) that breaks on 512-bit SVE: the bsums of two q8_K rows are loaded with an all-true
// predicate and de-interleaved with svuzp1/svuzp2. The kernel then reads lanes 0-7 as row 0's pair sums and lanes
// 8-15 as row 1's - true for 256-bit vectors (16 x int16). With 512-bit vectors each load takes 32 int16 (16 past
// the end of bsums[16]) and uzp1/uzp2 place row 1's sums in lanes 16-23, so lanes 8-15 hold bytes of whatever
// follows row 0's bsums. Prints "lanes 8-15 are row 1: yes|no" and the vector length.
// Build: aarch64-linux-gnu-gcc -O2 -march=armv9-a+sve2 sve512_q8k_bsums.c; run under qemu-aarch64 -cpu max,...
#include <arm_sve.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#define QK_K 256
typedef struct {  // ggml's block_q8_K layout
    float d;
    int8_t qs[QK_K];
    int16_t bsums[QK_K / 16];
} block_q8_K;

int main(void) {
    static block_q8_K y[4];  // rows 0 and 1 as the kernel sees them (vy0[i], vy1[i]), each followed by more blocks
    memset(y, 0x55, sizeof y);  // "whatever follows": a recognisable filler
    for (int r = 0; r < 2; ++r)
        for (int k = 0; k < QK_K / 16; ++k) y[2 * r].bsums[k] = (int16_t)(100 * (r + 1) + k);

    const svbool_t all = svptrue_pat_b8(SV_ALL);  // pg256_all in the kernel
    svint16_t a = svld1_s16(all, y[0].bsums), b = svld1_s16(all, y[2].bsums);
    svint16_t q8sums = svadd_s16_x(all, svuzp1_s16(a, b), svuzp2_s16(a, b));
    int16_t lanes[128];
    svst1_s16(svptrue_b16(), lanes, q8sums);

    int ok = 1;
    for (int k = 0; k < 8; ++k) {
        int want0 = y[0].bsums[2 * k] + y[0].bsums[2 * k + 1];
        int want1 = y[2].bsums[2 * k] + y[2].bsums[2 * k + 1];
        ok &= lanes[k] == want0 && lanes[8 + k] == want1;
    }
    printf("vector bits: %d\n", (int)svcntb() * 8);
    printf("lanes 0-15:");
    for (int k = 0; k < 16; ++k) printf(" %d", lanes[k]);
    printf("\nlanes 8-15 are row 1: %s\n", ok ? "yes" : "no");
    return 0;
}
