"""The CUDA backend: ``register`` loads the compiled ``bivlm_kernels._C`` (``csrc/``) and registers its kernels,
``routing`` picks tensor-core / CUDA-core / segmented kernels by format and M, ``tc_repack`` builds the load-time
layouts of the tensor-core kernels. Only ``register`` needs the extension; the others import anywhere.
"""
