"""Fused kernels of the LoMDM step, each with a PyTorch reference of the same signature.

- ``kernels.velocity_loss``: velocity-weighted masked cross-entropy and the velocity-matching
  term per token, plus the vocab-parallel (tensor-parallel output layer) form.
- ``kernels.scheduler``: the learned forward scheduler (NormSig exponents, alpha, velocity, log q).

``backend="auto"`` runs Triton on CUDA tensors and the reference elsewhere (``kernels.dispatch``).
Triton itself is imported only when a Triton backend runs. Import from the submodules; the package
re-exports nothing, so ``kernels.velocity_loss`` always names the module, not the function.
"""
