// One 16-byte global store, shared by our kernels (attention.cu,
// modulation.cu). A uint4 assigned through a pointer leaves nvcc as four
// 4-byte stores when its members are computed (seen in the PTX), so the
// store is inline PTX; under host emulation a plain copy. Written for this
// project.
#pragma once

__device__ __forceinline__ void store16(void* p, uint4 v) {
#ifdef IPAFLUX_HOST_EMULATION
    memcpy(p, &v, sizeof v);
#else
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
                 : "memory");
#endif
}
