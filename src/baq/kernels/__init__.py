"""Kernels that multiply by a packed layer without building its float weight (issue 26).

:mod:`baq.kernels.runtime` picks the kernel: the native one (:mod:`baq.kernels.lanes` rebuilds a
saved layer's codes at load time as lane fields, :mod:`baq.kernels.native` runs the C++ of
``lanes.cpp``, compiled at first use), or where nothing compiles the numba one
(:mod:`baq.kernels.layout`'s part streams, :mod:`baq.kernels.decode` and :mod:`baq.kernels.cpu`).
Importing this package imports none of them; numba is loaded only by the fallback.
"""
