"""Kernels that multiply by a packed layer without building its float weight (issue 26).

:mod:`baq.kernels.layout` rebuilds a saved layer's codes at load time in a layout made for the
kernel (columns grouped by storage width, fixed-width fields in strided bytes);
:mod:`baq.kernels.decode` holds the numba loops that decode it, :mod:`baq.kernels.cpu` multiplies
activations by it on the CPU. Importing this package imports none of them: numba is loaded only
by the CPU kernel (the layout and its unpacking are torch alone).
"""
