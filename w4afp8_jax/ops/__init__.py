"""One module per op of the pipeline, named like its CUDA files in ffi_cuda/ and its tests.

Each module holds the public wrapper (argument checks), the pure-JAX reference and the FFI
call. The public functions are re-exported by the package (`w4afp8_jax.grouped_gemm`, ...);
this package deliberately re-exports nothing, so `w4afp8_jax.ops.<op>` is always the module.
"""
