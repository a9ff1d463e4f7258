//! Host kernels for NF4 weights (SIMD where the CPU has it, the core's reference otherwise).
